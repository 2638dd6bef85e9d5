"""Public attention functions. Each validates its arguments, picks a backend and returns outputs that
are differentiable with respect to q, k and v."""

from __future__ import annotations

from . import torch_impl
from .validate import (BACKENDS, SliceMode, check_common, check_deterministic, check_eps, check_qkv, check_reduce,
                       check_slice, check_triton_shapes, resolve_backend)


def _prepare(q, k, v, backend, causal, softmax_scale, key_padding_mask, deterministic):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    check_deterministic(deterministic)
    check_qkv(q, k, v, backend)
    backend = resolve_backend(backend, q)
    if backend == "triton":
        check_triton_shapes(q)
    scale = check_common(q, causal, softmax_scale, key_padding_mask)
    return backend, scale


def flash_attention(q, k, v, *, causal=True, softmax_scale=None, key_padding_mask=None, backend="auto",
                    deterministic=True):
    """Attention output and log-sum-exp, without forming the L×L matrix.

    Args:
        q: (B, Hq, L, D) float16, bfloat16 or float32 (float64 on backend="torch").
        k, v: (B, Hkv, L, D), same dtype and device as q, Hq % Hkv == 0 (grouped-query attention).
        causal: key j is visible to query i only if j <= i.
        softmax_scale: defaults to 1/sqrt(D).
        key_padding_mask: (B, L) bool, True = real token; padded keys are never attended.
        backend: "triton", "torch" or "auto" (Triton for CUDA tensors, torch otherwise).
        deterministic: which Triton backward runs. True (default): two kernels, dK/dV per key tile and
            dQ per query tile, no atomics, bit-identical gradients from run to run. False: one kernel,
            dK/dV per key tile with dQ accumulated in fp32 by atomics (five matmuls per tile instead of
            seven); the order of the dQ sums, and so its last bits, varies between runs. The torch
            backend is deterministic either way.

    Returns:
        out (B, Hq, L, D) in q's dtype; lse (B, Hq, L) float32, natural log. A row with no visible key
        gets out 0 and lse −inf. Both are differentiable with respect to q, k, v.

    Memory kept for the backward: q, k, v, out and lse (Triton); q, k, v (torch, which recomputes).
    """
    backend, scale = _prepare(q, k, v, backend, causal, softmax_scale, key_padding_mask, deterministic)
    if backend == "triton":
        from .triton_impl import triton_attention
        out, lse, _ = triton_attention(q, k, v, scale, causal, key_padding_mask, None, None,
                                       deterministic=deterministic)
        return out, lse
    return torch_impl.flash_forward(q, k, v, scale, causal, key_padding_mask)


def attention_with_visual_slice(q, k, v, visual_start=None, visual_len=None, query_start=None, query_len=None, *,
                                visual_index=None, query_index=None, reduce="rows", row_weight=None, causal=True,
                                softmax_scale=None, key_padding_mask=None, backend="auto", deterministic=True):
    """Attention output plus the head-averaged attention of some query rows over the visual keys.

    The slice is a[b, i, j] = (1/Hq) Σ_h P_h[query_index[b, i], visual_index[b, j]], where P_h is head h's
    softmax(q kᵀ · scale) with the causal and padding masks applied.

    Which rows and keys, per sample, in either of two forms (each axis independently):
        visual_index: (B, Nv) int64 sequence positions of the visual keys, in any number of runs (several
            images, tiles, row separators between them); a sample with fewer than Nv visual tokens pads
            its row at the end with −1. query_index: (B, Nq), the query rows, the same way. Every real
            entry lies in [0, L) and appears once per sample; −1 before a real entry is an error.
        visual_start, query_start: (B,) integer offsets, and visual_len, query_len: ints >= 1, the
            contiguous special case visual_index[b] = visual_start[b] + [0, visual_len); start + len must
            lie in [0, L] for every sample.

    Args:
        q, k, v, causal, softmax_scale, key_padding_mask, backend, deterministic: as in `flash_attention`.
        reduce: "rows" returns the slice (B, Nq, Nv), exactly 0 on every padding entry; "mean" returns its
            row_weight-weighted mean over a sample's real rows (B, Nv), 0 for a sample whose real rows'
            weights sum to 0.
        row_weight: (B, Nq) non-negative weights for reduce="mean" (uniform if None; padded rows weigh 0
            whatever they hold); ignored by reduce="rows".

    Returns:
        out (B, Hq, L, D) in q's dtype; slc float32. Both differentiable with respect to q, k, v.

    Memory kept for the backward: q, k, v, out, lse and the indices (Triton); the slice gradient
    (B, Nq, Nv) float32 and two (B, L) int32 maps from positions to slice rows and columns exist only
    inside the backward.
    """
    mode = check_reduce(reduce)
    backend, scale = _prepare(q, k, v, backend, causal, softmax_scale, key_padding_mask, deterministic)
    spec = check_slice(q, visual_start, visual_len, query_start, query_len, row_weight,
                       visual_index=visual_index, query_index=query_index)
    if backend == "triton":
        from .triton_impl import triton_attention
        out, _, slc = triton_attention(q, k, v, scale, causal, key_padding_mask, spec, mode,
                                       deterministic=deterministic)
        return out, slc
    return torch_impl.visual_slice_forward(q, k, v, scale, causal, key_padding_mask, spec, mode)


def attention_with_alignment(q, k, v, teacher_slice, visual_start=None, visual_len=None, query_start=None,
                             query_len=None, *, visual_index=None, query_index=None, row_weight=None, eps=1e-8,
                             causal=True, softmax_scale=None, key_padding_mask=None, backend="auto",
                             deterministic=True):
    """Attention output plus the cosine alignment loss of the student's visual slice to the teacher's.

    loss = Σ_{b,i real} w[b,i] · (1 − cos(a[b,i,:], teacher_slice[b,i,:])) / Σ_{b,i real} w[b,i], with a the
    head-mean visual slice of `attention_with_visual_slice`, the cosine over a sample's real columns only
    and exactly as torch.nn.functional.cosine_similarity(..., dim=-1, eps=eps). The loss is 0 if the real
    rows' weights sum to 0.

    Args:
        teacher_slice: (B, Nq, Nv) floating point, finite on the real entries; entries in a padded row or
            column are ignored whatever they hold. No gradient flows into it.
        row_weight: (B, Nq) non-negative weights (uniform if None; padded rows weigh 0).
        eps: cosine epsilon, > 0.
        visual_index, query_index (or the four start/len arguments) and everything else as in
        `attention_with_visual_slice`.

    Returns:
        out (B, Hq, L, D) in q's dtype; loss, a 0-dim float32 tensor. Both differentiable w.r.t. q, k, v.

    Memory kept for the backward (Triton): q, k, v, out, lse, the indices, the teacher slice, the student
    slice (B, Nq, Nv) float32 (so the backward computes each head's probabilities on the visual columns
    once, not twice) and four floats per slice row; nothing L×L. The slice gradient, of the same shape,
    exists only inside the backward.
    """
    eps = check_eps(eps)
    backend, scale = _prepare(q, k, v, backend, causal, softmax_scale, key_padding_mask, deterministic)
    spec = check_slice(q, visual_start, visual_len, query_start, query_len, row_weight, teacher_slice,
                       visual_index=visual_index, query_index=query_index)
    teacher_slice = teacher_slice.detach()
    if backend == "triton":
        from .triton_impl import triton_attention
        out, _, loss = triton_attention(q, k, v, scale, causal, key_padding_mask, spec, SliceMode.ALIGN,
                                        teacher_slice, eps, deterministic=deterministic)
        return out, loss
    return torch_impl.visual_slice_forward(q, k, v, scale, causal, key_padding_mask, spec, SliceMode.ALIGN,
                                           teacher_slice, eps)
