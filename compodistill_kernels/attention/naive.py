"""Naive reference for the attention kernels: full L×L matrices, plain einsum, any float dtype.

Used by the tests (in float64) and by the benchmarks (as the eager baseline). It materializes every
attention probability, so it is only for checking and for measuring what eager attention costs.

Shapes: q (B, Hq, L, D); k, v (B, Hkv, L, D) with Hq % Hkv == 0; key_padding_mask (B, L) bool,
True = real token; visual_start, query_start (B,) integer tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_attention_probs(q, k, *, causal=True, softmax_scale=None, key_padding_mask=None):
    """Return (probs (B, Hq, L, L), lse (B, Hq, L)) in the dtype of q.

    A row with no allowed key has probabilities 0 and lse −inf.
    """
    B, Hq, L, D = q.shape
    group = Hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    k = k.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(B, 1, L, L)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(s - lse) with lse = -inf would be nan; such rows have no allowed key, so their probabilities are 0.
    finite = torch.isfinite(lse)
    safe_lse = torch.where(finite, lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse[..., None]).masked_fill(~allowed, 0.0)
    return probs, lse


def naive_flash_attention(q, k, v, *, causal=True, softmax_scale=None, key_padding_mask=None):
    """Return (out (B, Hq, L, D), lse (B, Hq, L)); reference for `flash_attention`."""
    probs, lse = naive_attention_probs(
        q, k, causal=causal, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask
    )
    group = q.shape[1] // v.shape[1]
    out = torch.einsum("bhij,bhjd->bhid", probs, v.repeat_interleave(group, dim=1))
    return out, lse


def naive_visual_slice(probs, visual_start, visual_len, query_start, query_len):
    """Head-mean slice a[b, i, j] = mean_h probs[b, h, query_start[b] + i, visual_start[b] + j].

    probs (B, H, L, L) -> (B, query_len, visual_len).
    """
    rows = []
    for b in range(probs.shape[0]):
        qs, vs = int(query_start[b]), int(visual_start[b])
        rows.append(probs[b, :, qs : qs + query_len, vs : vs + visual_len].mean(dim=0))
    return torch.stack(rows)


def naive_weighted_row_mean(slc, row_weight=None):
    """(B, R, N) -> (B, N): Σ_i w_i slc[:, i] / Σ_i w_i, uniform weights if None, 0 where Σ w = 0."""
    if row_weight is None:
        return slc.mean(dim=1)
    w = row_weight.to(slc.dtype)
    total = w.sum(dim=1, keepdim=True)
    return torch.einsum("bi,bij->bj", w, slc) / torch.where(total > 0, total, torch.ones_like(total))


def naive_attention_with_visual_slice(q, k, v, visual_start, visual_len, query_start, query_len, *,
                                      reduce="rows", row_weight=None, causal=True, softmax_scale=None,
                                      key_padding_mask=None):
    """Reference for `attention_with_visual_slice`: (out, slc)."""
    probs, _ = naive_attention_probs(
        q, k, causal=causal, softmax_scale=softmax_scale, key_padding_mask=key_padding_mask
    )
    group = q.shape[1] // v.shape[1]
    out = torch.einsum("bhij,bhjd->bhid", probs, v.repeat_interleave(group, dim=1))
    slc = naive_visual_slice(probs, visual_start, visual_len, query_start, query_len)
    if reduce == "mean":
        slc = naive_weighted_row_mean(slc, row_weight)
    return out, slc


def naive_alignment_loss(student_slice, teacher_slice, row_weight=None, eps=1e-8):
    """Σ_{b,i} w·(1 − cos(student[b, i], teacher[b, i])) / Σ w, 0 when Σ w = 0.

    Cosine exactly as torch.nn.functional.cosine_similarity(..., dim=-1, eps=eps).
    """
    cos = F.cosine_similarity(student_slice, teacher_slice.to(student_slice.dtype), dim=-1, eps=eps)
    if row_weight is None:
        row_weight = torch.ones_like(cos)
    w = row_weight.to(cos.dtype)
    total = w.sum()
    return (w * (1.0 - cos)).sum() / torch.where(total > 0, total, torch.ones_like(total))


def naive_attention_with_alignment(q, k, v, teacher_slice, visual_start, visual_len, query_start,
                                   query_len, *, row_weight=None, eps=1e-8, causal=True,
                                   softmax_scale=None, key_padding_mask=None):
    """Reference for `attention_with_alignment`: (out, loss)."""
    out, slc = naive_attention_with_visual_slice(
        q, k, v, visual_start, visual_len, query_start, query_len, reduce="rows", causal=causal,
        softmax_scale=softmax_scale, key_padding_mask=key_padding_mask,
    )
    return out, naive_alignment_loss(slc, teacher_slice, row_weight, eps)


def naive_indexed_slice(probs, visual_index, query_index):
    """Head-mean slice a[b, i, j] = mean_h probs[b, h, query_index[b, i], visual_index[b, j]], exactly 0
    where either index is padding (−1). probs (B, H, L, L) -> (B, Nq, Nv)."""
    B = probs.shape[0]
    out = probs.new_zeros(B, query_index.shape[1], visual_index.shape[1])
    for b in range(B):
        rows = [i for i, p in enumerate(query_index[b].tolist()) if p >= 0]
        cols = [j for j, p in enumerate(visual_index[b].tolist()) if p >= 0]
        if rows and cols:
            block = probs[b][:, query_index[b, rows].long()][:, :, visual_index[b, cols].long()].mean(dim=0)
            out[b, torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = block
    return out


def naive_indexed_attention(q, k, v, visual_index, query_index, *, teacher_slice=None, reduce="rows",
                            row_weight=None, eps=1e-8, causal=True, softmax_scale=None, key_padding_mask=None):
    """Reference for the index form of `attention_with_visual_slice` (teacher_slice None) and of
    `attention_with_alignment`: (out, slice / its row mean / the loss). Padded rows weigh 0; the cosine
    runs over each sample's real columns only; the teacher's padding entries are never read."""
    probs, _ = naive_attention_probs(q, k, causal=causal, softmax_scale=softmax_scale,
                                     key_padding_mask=key_padding_mask)
    group = q.shape[1] // v.shape[1]
    out = torch.einsum("bhij,bhjd->bhid", probs, v.repeat_interleave(group, dim=1))
    slc = naive_indexed_slice(probs, visual_index, query_index)
    real_rows = (query_index >= 0).to(slc.dtype)
    weight = real_rows if row_weight is None else row_weight.to(slc.dtype) * real_rows
    if teacher_slice is None:
        return out, (slc if reduce == "rows" else naive_weighted_row_mean(slc, weight))
    terms = []
    for b in range(q.shape[0]):
        cols = (visual_index[b] >= 0).nonzero().flatten()
        for i in (query_index[b] >= 0).nonzero().flatten().tolist():
            cos = F.cosine_similarity(slc[b, i, cols], teacher_slice[b, i, cols].to(slc.dtype), dim=0, eps=eps)
            terms.append(weight[b, i] * (1.0 - cos))
    total = weight.sum()
    loss = torch.stack(terms).sum() / torch.where(total > 0, total, torch.ones_like(total)) if terms \
        else slc.new_zeros(())
    return out, loss
