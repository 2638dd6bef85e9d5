"""LLaVA-style teacher and student models, TAF, and the kernel-backed attention for transformers."""
from . import parts
from .attention import (AttentionProbe, SliceRows, enable_compodistill_attention,
                        register_compodistill_attention)
from .mllm import (MLLM, PRESETS, TAFProjector, apply_taf, build_from_checkpoints, build_preset,
                   enable_gradient_checkpointing, load_mllm, load_pretrained, visual_token_positions)
from .tokenizer import IMAGE_TOKEN, build_tiny_tokenizer

__all__ = [
    "AttentionProbe", "SliceRows", "enable_compodistill_attention", "register_compodistill_attention",
    "MLLM", "PRESETS", "TAFProjector", "apply_taf", "build_from_checkpoints", "build_preset", "enable_gradient_checkpointing", "load_mllm",
    "load_pretrained", "visual_token_positions", "IMAGE_TOKEN", "build_tiny_tokenizer", "parts",
]
