"""Launchers and autograd for the Triton kernels. The launchers are the only place that allocates
outputs and picks block sizes and grids."""

from __future__ import annotations

import contextlib

import torch
import triton

from . import triton_kernels as tk

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# kind -> (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by (is_fp32, BLOCK_D). Sizes keep every
# kernel inside sm_80's 164 KiB of shared memory; tests/test_compile.py compiles each for sm_80 and sm_90.
_CONFIGS = {
    "fwd": {
        (False, 16): (128, 64, 4, 3), (False, 32): (128, 64, 4, 3), (False, 64): (128, 64, 4, 3),
        (False, 128): (128, 64, 8, 3), (False, 256): (64, 32, 8, 2),
        (True, 16): (64, 64, 4, 2), (True, 32): (64, 64, 4, 2), (True, 64): (64, 32, 4, 2),
        (True, 128): (64, 32, 4, 2), (True, 256): (32, 32, 4, 1),
    },
    "bwd": {
        (False, 16): (64, 64, 4, 2), (False, 32): (64, 64, 4, 2), (False, 64): (64, 64, 4, 2),
        (False, 128): (64, 64, 8, 2), (False, 256): (32, 32, 4, 1),
        (True, 16): (32, 32, 4, 1), (True, 32): (32, 32, 4, 1), (True, 64): (32, 32, 4, 1),
        (True, 128): (32, 32, 4, 1), (True, 256): (16, 32, 4, 1),
    },
    "slice": {
        (False, 16): (64, 64, 4, 2), (False, 32): (64, 64, 4, 2), (False, 64): (64, 64, 4, 2),
        (False, 128): (64, 64, 4, 2), (False, 256): (32, 32, 4, 1),
        (True, 16): (32, 32, 4, 1), (True, 32): (32, 32, 4, 1), (True, 64): (32, 32, 4, 1),
        (True, 128): (32, 32, 4, 1), (True, 256): (16, 32, 4, 1),
    },
}
_BLOCK_OVERRIDE = None


@contextlib.contextmanager
def block_size_override(block_m, block_n):
    """Force tile sizes (tests use small tiles to cover multi-tile loops on short sequences)."""
    global _BLOCK_OVERRIDE
    previous, _BLOCK_OVERRIDE = _BLOCK_OVERRIDE, (block_m, block_n)
    try:
        yield
    finally:
        _BLOCK_OVERRIDE = previous


def block_d_for(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(kind, dtype, head_dim):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for a kernel kind, dtype and head dim."""
    block_d = block_d_for(head_dim)
    bm, bn, warps, stages = _CONFIGS[kind][(dtype == torch.float32, block_d)]
    if _BLOCK_OVERRIDE is not None:
        bm, bn = _BLOCK_OVERRIDE
    return bm, bn, block_d, warps, stages


def precision_for(dtype):
    # fp32 inputs get true fp32 products; tf32 would cost ~3e-4 relative error
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_arg(q, key_padding_mask):
    if key_padding_mask is None:
        return q.new_empty(1, dtype=torch.uint8), 0
    mask = key_padding_mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0)


def _strides(q, k, mask_stride):
    return (q.stride(0), q.stride(1), k.stride(0), k.stride(1), mask_stride)


def attn_fwd(q, k, v, scale, causal, mask):
    B, H, L, D = q.shape
    bm, bn, bd, warps, stages = launch_config("fwd", q.dtype, D)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    kpm, mask_stride = _mask_arg(q, mask)
    grid = (triton.cdiv(L, bm), B * H)
    tk._attn_fwd_kernel[grid](
        q, k, v, out, lse, kpm, *_strides(q, k, mask_stride), H, H // k.shape[1], L, D, scale * tk.LOG2E,
        CAUSAL=causal, HAS_MASK=mask is not None, PRECISION=precision_for(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return out, lse


def slice_fwd(q, k, lse, scale, causal, mask, spec, mode, weight=None, teacher=None):
    """mode 0: slice (B, Lq, Nv); 1: per-row-tile Σ w·a partials (B, n_row_tiles, Nv); 2: per-column-tile
    partial row stats a·t, |a|², |t|² (B, n_col_tiles, Lq, 3)."""
    B, H, L, D = q.shape
    Lq, Nv = spec.query_len, spec.visual_len
    bm, bn, bd, warps, stages = launch_config("slice", q.dtype, D)
    grid = (triton.cdiv(Lq, bm), triton.cdiv(Nv, bn), B)
    f32 = dict(device=q.device, dtype=torch.float32)
    shape = {0: (B, Lq, Nv), 1: (B, grid[0], Nv), 2: (B, grid[1], Lq, 3)}[mode]
    out = torch.empty(shape, **f32)
    dummy = torch.empty(1, **f32)
    kpm, mask_stride = _mask_arg(q, mask)
    tk._slice_fwd_kernel[grid](
        q, k, lse, kpm, spec.visual_start, spec.query_start,
        weight if weight is not None else dummy, teacher if teacher is not None else dummy,
        out if mode == 0 else dummy, out if mode == 1 else dummy, out if mode == 2 else dummy,
        *_strides(q, k, mask_stride), H, H // k.shape[1], L, D, Lq, Nv, scale * tk.LOG2E, 1.0 / H,
        CAUSAL=causal, HAS_MASK=mask is not None, MODE=mode, PRECISION=precision_for(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return out


def attn_bwd(q, k, v, out, lse, dout, dlse, scale, causal, mask, spec=None, slice_grad=None):
    """dq, dk, dv from the output's gradient dout and the lse's gradient dlse (both as produced by autograd).

    slice_grad = (mode, gin, rowc1, rowc2, colv, teacher) adds the slice's gradient G (see _slice_bwd_kernel).
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    dout = dout.contiguous()
    kpm, mask_stride = _mask_arg(q, mask)
    strides = _strides(q, k, mask_stride)
    bd = block_d_for(D)
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    pre_m = 64
    tk._bwd_preprocess_kernel[(triton.cdiv(L, pre_m), B * H)](
        out, dout, dlse, delta, L, D, BLOCK_M=pre_m, BLOCK_D=bd)

    f32 = dict(device=q.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    dummy_i = torch.zeros(1, device=q.device, dtype=torch.int32)
    g = None
    if slice_grad is not None:
        mode, gin, rowc1, rowc2, colv, teacher = slice_grad
        Lq, Nv = spec.query_len, spec.visual_len
        g = torch.empty(B, Lq, Nv, **f32)
        bm, bn, bd, warps, stages = launch_config("slice", q.dtype, D)
        grid = (triton.cdiv(Lq, bm), triton.cdiv(Nv, bn), B)
        dg_part = torch.empty(B, H, grid[1], Lq, **f32)
        tk._slice_bwd_kernel[grid](
            q, k, lse, kpm, spec.visual_start, spec.query_start,
            *(x if x is not None else dummy for x in (gin, rowc1, rowc2, colv, teacher)), g, dg_part,
            *strides, H, H // Hkv, L, D, Lq, Nv, scale * tk.LOG2E, 1.0 / H,
            CAUSAL=causal, HAS_MASK=mask is not None, MODE=mode, PRECISION=precision_for(q.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        # Δ_h[qs_b + i] += (1/H) Σ_j P_h[i, j] G[i, j], summed over the column tiles in a fixed order
        rows = (spec.query_start.long()[:, None] + torch.arange(Lq, device=q.device))[:, None, :].expand(B, H, Lq)
        delta.scatter_add_(2, rows, dg_part.sum(dim=2))
    has_g = g is not None
    vs = spec.visual_start if has_g else dummy_i
    qs = spec.query_start if has_g else dummy_i
    Lq, Nv = (spec.query_len, spec.visual_len) if has_g else (1, 1)
    g_arg = g if has_g else dummy

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    bm, bn, bd, warps, stages = launch_config("bwd", q.dtype, D)
    common = dict(CAUSAL=causal, HAS_MASK=mask is not None, HAS_G=has_g, PRECISION=precision_for(q.dtype),
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    tk._attn_bwd_dkdv_kernel[(triton.cdiv(L, bn), B * Hkv)](
        q, k, v, dout, lse, delta, kpm, vs, qs, g_arg, dk, dv, *strides,
        H, Hkv, H // Hkv, L, D, Lq, Nv, scale * tk.LOG2E, scale, **common)
    tk._attn_bwd_dq_kernel[(triton.cdiv(L, bm), B * H)](
        q, k, v, dout, lse, delta, kpm, vs, qs, g_arg, dq, *strides,
        H, H // Hkv, L, D, Lq, Nv, scale * tk.LOG2E, scale, **common)
    return dq, dk, dv


def _safe_div(num, den):
    return num / torch.where(den > 0, den, torch.ones_like(den))


class _FusedAttention(torch.autograd.Function):
    """Outputs (out, lse, aux); aux is the slice (mode "rows"), its weighted row mean ("mean"), the
    alignment loss ("align") or None ("flash")."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, mask, spec, mode, teacher, eps):
        out, lse = attn_fwd(q, k, v, scale, causal, mask)
        aux, weight, stats = None, None, None
        if mode in ("mean", "align"):  # the slice itself (mode "rows") is unweighted
            B, Lq = q.shape[0], spec.query_len
            weight = spec.row_weight if spec.row_weight is not None else \
                torch.ones(B, Lq, device=q.device, dtype=torch.float32)
            weight = weight.contiguous()
        if mode == "rows":
            aux = slice_fwd(q, k, lse, scale, causal, mask, spec, 0)
        elif mode == "mean":
            part = slice_fwd(q, k, lse, scale, causal, mask, spec, 1, weight=weight)
            aux = _safe_div(part.sum(dim=1), weight.sum(dim=1, keepdim=True))
        elif mode == "align":
            teacher = teacher.to(torch.float32).contiguous()  # one kernel signature for any teacher dtype
            stats = slice_fwd(q, k, lse, scale, causal, mask, spec, 2, teacher=teacher).sum(dim=1)
            cos = stats[..., 0] / (stats[..., 1].sqrt().clamp_min(eps) * stats[..., 2].sqrt().clamp_min(eps))
            aux = _safe_div((weight * (1.0 - cos)).sum(), weight.sum())
        ctx.save_for_backward(q, k, v, out, lse, mask, weight, teacher if mode == "align" else None, stats)
        ctx.args = (scale, causal, spec, mode, eps)
        if aux is None:
            return out, lse
        return out, lse, aux

    @staticmethod
    def backward(ctx, dout, dlse, daux=None):
        q, k, v, out, lse, mask, weight, teacher, stats = ctx.saved_tensors
        scale, causal, spec, mode, eps = ctx.args
        slice_grad = None
        if mode == "rows":
            slice_grad = (0, daux.to(torch.float32).contiguous(), None, None, None, None)
        elif mode == "mean":
            rowc1 = _safe_div(weight, weight.sum(dim=1, keepdim=True)).contiguous()
            slice_grad = (1, None, rowc1, None, daux.contiguous(), None)
        elif mode == "align":
            # loss = Σ w(1 − cos)/W, cos = a·t / (n_a n_t), n = max(|x|, eps), ∂n_a/∂a = a/|a| (0 at a = 0):
            # ∂loss/∂a = c1·t + c2·a with c1 = −w/(W n_a n_t), c2 = w·(a·t)/(W n_a² n_t |a|)
            a_dot_t, a_norm, t_norm = stats[..., 0], stats[..., 1].sqrt(), stats[..., 2].sqrt()
            n_a, n_t = a_norm.clamp_min(eps), t_norm.clamp_min(eps)
            w = daux * _safe_div(weight, weight.sum())
            rowc1 = (-w / (n_a * n_t)).contiguous()
            rowc2 = _safe_div(w * a_dot_t, n_a * n_a * n_t * a_norm).contiguous()
            slice_grad = (2, None, rowc1, rowc2, None, teacher)
        dq, dk, dv = attn_bwd(q, k, v, out, lse, dout, dlse.contiguous(), scale, causal, mask, spec, slice_grad)
        return dq, dk, dv, None, None, None, None, None, None, None


def triton_attention(q, k, v, scale, causal, key_padding_mask, spec, mode, teacher=None, eps=1e-8):
    """(out, lse, aux) for mode in {"flash", "rows", "mean", "align"}, differentiable w.r.t. q, k, v."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = key_padding_mask.contiguous() if key_padding_mask is not None else None
    res = _FusedAttention.apply(q, k, v, scale, causal, mask, spec, mode, teacher, eps)
    if mode == "flash":
        out, lse = res
        return out, lse, None
    return res
