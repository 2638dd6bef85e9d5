"""compodistill_kernels: attention kernels for CompoDistill (imports only torch and triton).

    out, lse = flash_attention(q, k, v, causal=True)
    out, slc = attention_with_visual_slice(q, k, v, visual_index=visual_index, query_index=query_index)
    out, loss = attention_with_alignment(q, k, v, teacher_slice, visual_index=visual_index,
                                         query_index=query_index)

visual_index (B, Nv) and query_index (B, Nq) are int64 sequence positions per sample, padded at the end
with -1; the contiguous case can also be given as visual_start, visual_len, query_start, query_len.
"""

from .attention import BACKENDS, attention_with_alignment, attention_with_visual_slice, flash_attention

__all__ = ["BACKENDS", "flash_attention", "attention_with_visual_slice", "attention_with_alignment"]
__version__ = "0.1.0"
