from pathlib import Path

from setuptools import find_packages, setup

# Two import packages: `compodistill` (the library) and `compodistill_kernels` (the kernels, which import
# only torch and triton). The kernel folder is not called `kernels/`: that name belongs to Hugging Face's
# `kernels` distribution, which transformers imports, and a folder of that name on sys.path (the
# repository root under `python -m` or pytest) would shadow it.
packages = find_packages(include=["compodistill", "compodistill.*", "compodistill_kernels", "compodistill_kernels.*"])

setup(
    name="compodistill",
    version="0.1.0",
    description="CompoDistill: attention distillation for compositional reasoning in multimodal LLMs, "
    "with fused Triton attention-alignment kernels",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=packages,
    package_data={"compodistill.configs": ["*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "triton>=3.0",
        # AttentionInterface/AttentionMaskInterface registration and per-sub-config attention selection.
        "transformers>=5.0,<6",
        "tokenizers",
        "safetensors",
        "pillow",
        "datasets>=2.14",
        "accelerate>=1.0",
        "peft>=0.13",
        "tensorboard",
        "matplotlib",
        "numpy",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "ruff>=0.6,<1"],
        "bench": ["xformers"],
    },
)
