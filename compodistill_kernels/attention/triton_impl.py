"""Launchers and autograd for the Triton kernels. The launchers are the only place that allocates
outputs and picks block sizes and grids."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from . import triton_kernels as tk
from .validate import interpreting

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel kind, keyed by
# (is_fp32, BLOCK_D). The first entry of each space is the default: the only one used in the interpreter,
# with COMPODISTILL_KERNELS_AUTOTUNE=0, under CUDA graph capture, and for keys with a single entry. On CUDA
# the launchers time every entry once per (kind, flags, dtype, BLOCK_D, L bucket) and keep the fastest.
# Kinds: "fwd" (_attn_fwd_kernel), "slice" (_slice_fwd_kernel and _slice_bwd_kernel), "dkdv"
# (_attn_bwd_dkdv_kernel: BLOCK_N keys per program, BLOCK_M queries per step) and "dq" (_attn_bwd_dq_kernel:
# BLOCK_M queries per program, BLOCK_N keys per step).
# Every entry fits sm_80's 163 KiB of shared memory, compiles for sm_80 and sm_90 without spills, and for
# fp16/bf16 at BLOCK_D <= 128 uses wgmma on sm_90: aot_check compiles the whole space
# (tests/kernels/test_compile_sm80_sm90.py). Wider spaces only at the models' head dims (BLOCK_D 64 and 128).
_DEFAULTS = {
    "fwd": {
        (False, 16): (128, 64, 4, 3), (False, 32): (128, 64, 4, 3), (False, 64): (128, 64, 4, 3),
        (False, 128): (128, 64, 8, 3), (False, 256): (64, 32, 8, 2),
        (True, 16): (64, 64, 4, 2), (True, 32): (64, 64, 4, 2), (True, 64): (64, 32, 4, 2),
        (True, 128): (64, 32, 4, 2), (True, 256): (32, 32, 4, 1),
    },
    "dkdv": {
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
_DEFAULTS["dq"] = dict(_DEFAULTS["dkdv"])
# Further candidates for the autotuner (fp16/bf16 only). Larger tiles re-read K/V (forward, dQ) or Q/dO
# (dK/dV) fewer times; smaller ones give more programs at short L (L = 2048, 20 heads: 320 forward
# programs of 128 rows for 132 SMs). Shared memory of the largest, (128, 128, 8, 3) forward at D = 128:
# 224 KiB on sm_90 (limit 227), 160 KiB on sm_80 (limit 163).
_TUNE_EXTRA = {
    "fwd": {(False, 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            (False, 128): [(128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)]},
    "dkdv": {(False, 64): [(64, 128, 8, 2), (32, 64, 4, 2)], (False, 128): [(32, 128, 8, 2), (32, 64, 4, 2)]},
    "dq": {(False, 64): [(128, 64, 8, 2), (128, 32, 8, 2)], (False, 128): [(128, 64, 8, 2), (128, 32, 8, 2)]},
    "slice": {(False, 64): [(64, 128, 8, 2), (128, 64, 8, 2)], (False, 128): [(64, 128, 8, 2), (128, 64, 8, 2)]},
}
KINDS = tuple(_DEFAULTS)
_BLOCK_OVERRIDE = None
_TUNED = {}  # (kind, key...) -> chosen (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)


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


def config_space(kind, dtype, head_dim):
    """Every (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) the launchers may pick for a kernel kind,
    dtype and head dim; the default first."""
    block_d = block_d_for(head_dim)
    key = (dtype == torch.float32, block_d)
    space = [_DEFAULTS[kind][key]] + list(_TUNE_EXTRA.get(kind, {}).get(key, ()))
    return [(bm, bn, block_d, warps, stages) for bm, bn, warps, stages in space]


def launch_config(kind, dtype, head_dim):
    """The default (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages), with block_size_override applied."""
    bm, bn, block_d, warps, stages = config_space(kind, dtype, head_dim)[0]
    if _BLOCK_OVERRIDE is not None:
        bm, bn = _BLOCK_OVERRIDE
    return bm, bn, block_d, warps, stages


def autotune_enabled(device) -> bool:
    """Timing configurations needs compiled kernels on a CUDA device; COMPODISTILL_KERNELS_AUTOTUNE=0 turns it off."""
    return (torch.device(device).type == "cuda" and not interpreting()
            and os.environ.get("COMPODISTILL_KERNELS_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no"))


def _length_bucket(n):
    return triton.next_power_of_2(max(int(n), 1))


def _fastest(space, run):
    """The configuration of `space` with the smallest median time of run(cfg). Safe for every kernel here:
    each writes only its own outputs, which run(cfg) allocates, and reads nothing it writes."""
    best, best_ms, error = None, float("inf"), None
    for cfg in space:
        try:
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except (OutOfResources, CompilationError) as exc:  # e.g. a GPU with less shared memory than sm_80
            error = exc
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise error if error is not None else RuntimeError(f"no configuration of {space} could be timed")
    return best


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _launch(kind, dtype, head_dim, key, device, run):
    """run(cfg) with the configuration for this launch: the default (or block_size_override) where no
    timing is possible or wanted, else the fastest of config_space, timed once per key and remembered."""
    space = config_space(kind, dtype, head_dim)
    if _BLOCK_OVERRIDE is not None or len(space) == 1 or not autotune_enabled(device):
        return run(launch_config(kind, dtype, head_dim))
    full_key = (kind, dtype, space[0][2], torch.device(device).index) + tuple(key)
    cfg = _TUNED.get(full_key)
    if cfg is None:
        if _capturing():  # timing would synchronize inside the capture
            return run(space[0])
        cfg = _TUNED[full_key] = _fastest(space, run)
    return run(cfg)


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
    kpm, mask_stride = _mask_arg(q, mask)

    def run(cfg):
        bm, bn, bd, warps, stages = cfg
        out = torch.empty_like(q)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        tk._attn_fwd_kernel[(triton.cdiv(L, bm), B * H)](
            q, k, v, out, lse, kpm, *_strides(q, k, mask_stride), H, H // k.shape[1], L, D, scale * tk.LOG2E,
            CAUSAL=causal, HAS_MASK=mask is not None, PRECISION=precision_for(q.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        return out, lse

    key = (causal, mask is not None, H // k.shape[1], _length_bucket(L))
    return _launch("fwd", q.dtype, D, key, q.device, run)


def _slice_key(spec, causal, mask, mode, group, L):
    return (mode, causal, mask is not None, group, _length_bucket(L), _length_bucket(spec.query_len),
            _length_bucket(spec.visual_len))


def slice_fwd(q, k, lse, scale, causal, mask, spec, mode, weight=None, teacher=None):
    """mode 0: slice (B, Lq, Nv); 1: per-row-tile Σ w·a partials (B, n_row_tiles, Nv); 2: per-column-tile
    partial row stats a·t, |a|², |t|² (B, n_col_tiles, Lq, 3)."""
    B, H, L, D = q.shape
    Lq, Nv = spec.query_len, spec.visual_len
    f32 = dict(device=q.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    kpm, mask_stride = _mask_arg(q, mask)

    def run(cfg):
        bm, bn, bd, warps, stages = cfg
        grid = (triton.cdiv(Lq, bm), triton.cdiv(Nv, bn), B)
        shape = {0: (B, Lq, Nv), 1: (B, grid[0], Nv), 2: (B, grid[1], Lq, 3)}[mode]
        out = torch.empty(shape, **f32)
        tk._slice_fwd_kernel[grid](
            q, k, lse, kpm, spec.visual_start, spec.query_start,
            weight if weight is not None else dummy, teacher if teacher is not None else dummy,
            out if mode == 0 else dummy, out if mode == 1 else dummy, out if mode == 2 else dummy,
            *_strides(q, k, mask_stride), H, H // k.shape[1], L, D, Lq, Nv, scale * tk.LOG2E, 1.0 / H,
            CAUSAL=causal, HAS_MASK=mask is not None, MODE=mode, PRECISION=precision_for(q.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        return out

    key = ("fwd",) + _slice_key(spec, causal, mask, mode, H // k.shape[1], L)
    return _launch("slice", q.dtype, D, key, q.device, run)


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

        def run_slice(cfg):
            bm, bn, bd, warps, stages = cfg
            grid = (triton.cdiv(Lq, bm), triton.cdiv(Nv, bn), B)
            g = torch.empty(B, Lq, Nv, **f32)
            dg_part = torch.empty(B, H, grid[1], Lq, **f32)
            tk._slice_bwd_kernel[grid](
                q, k, lse, kpm, spec.visual_start, spec.query_start,
                *(x if x is not None else dummy for x in (gin, rowc1, rowc2, colv, teacher)), g, dg_part,
                *strides, H, H // Hkv, L, D, Lq, Nv, scale * tk.LOG2E, 1.0 / H,
                CAUSAL=causal, HAS_MASK=mask is not None, MODE=mode, PRECISION=precision_for(q.dtype),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
            return g, dg_part

        # the tuner may run the kernel several times: the accumulation into Δ stays outside it
        key = ("bwd",) + _slice_key(spec, causal, mask, mode, H // Hkv, L)
        g, dg_part = _launch("slice", q.dtype, D, key, q.device, run_slice)
        # Δ_h[qs_b + i] += (1/H) Σ_j P_h[i, j] G[i, j], summed over the column tiles in a fixed order. Rows
        # outside [0, L) (offsets left unchecked, see validate.device_value_checks) have P = 0 in the kernel:
        # clamping their index adds 0 instead of indexing out of bounds.
        rows = (spec.query_start.long()[:, None] + torch.arange(Lq, device=q.device)).clamp(0, L - 1)
        rows = rows[:, None, :].expand(B, H, Lq)
        delta.scatter_add_(2, rows, dg_part.sum(dim=2))
    has_g = g is not None
    vs = spec.visual_start if has_g else dummy_i
    qs = spec.query_start if has_g else dummy_i
    Lq, Nv = (spec.query_len, spec.visual_len) if has_g else (1, 1)
    g_arg = g if has_g else dummy
    flags = dict(CAUSAL=causal, HAS_MASK=mask is not None, HAS_G=has_g, PRECISION=precision_for(q.dtype))
    key = (causal, mask is not None, has_g, H // Hkv, _length_bucket(L))

    def run_dkdv(cfg):
        bm, bn, bd, warps, stages = cfg
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        tk._attn_bwd_dkdv_kernel[(triton.cdiv(L, bn), B * Hkv)](
            q, k, v, dout, lse, delta, kpm, vs, qs, g_arg, dk, dv, *strides,
            H, Hkv, H // Hkv, L, D, Lq, Nv, scale * tk.LOG2E, scale, **flags,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        return dk, dv

    def run_dq(cfg):
        bm, bn, bd, warps, stages = cfg
        dq = torch.empty_like(q)
        tk._attn_bwd_dq_kernel[(triton.cdiv(L, bm), B * H)](
            q, k, v, dout, lse, delta, kpm, vs, qs, g_arg, dq, *strides,
            H, H // Hkv, L, D, Lq, Nv, scale * tk.LOG2E, scale, **flags,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        return dq

    dk, dv = _launch("dkdv", q.dtype, D, key, q.device, run_dkdv)
    dq = _launch("dq", q.dtype, D, key, q.device, run_dq)
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
