"""Flash-style attention with fused visual-attention slices and a fused cosine alignment loss."""

from .api import attention_with_alignment, attention_with_visual_slice, flash_attention
from .validate import BACKENDS

__all__ = ["BACKENDS", "flash_attention", "attention_with_visual_slice", "attention_with_alignment"]
