from setuptools import setup

setup(
    name="compodistill",
    version="0.1.0",
    description="CompoDistill: attention distillation for compositional reasoning in multimodal LLMs, "
    "with fused Triton attention-alignment kernels",
    packages=["compodistill", "compodistill_kernels", "compodistill_kernels.attention"],
    package_dir={"compodistill": "compodistill", "compodistill_kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "triton>=3.0", "numpy"],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4"],
        "bench": ["xformers"],
    },
)
