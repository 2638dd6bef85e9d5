"""compodistill_kernels: attention kernels for CompoDistill (imports only torch and triton).

    out, lse = flash_attention(q, k, v, causal=True)
    out, slc = attention_with_visual_slice(q, k, v, visual_start, visual_len, query_start, query_len)
    out, loss = attention_with_alignment(q, k, v, teacher_slice, visual_start, visual_len,
                                         query_start, query_len)
"""

from .attention import BACKENDS, attention_with_alignment, attention_with_visual_slice, flash_attention

__all__ = ["BACKENDS", "flash_attention", "attention_with_visual_slice", "attention_with_alignment"]
__version__ = "0.1.0"
