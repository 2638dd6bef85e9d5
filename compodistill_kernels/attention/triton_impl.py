"""Launchers and autograd for the Triton kernels. The launchers are the only place that allocates
outputs and picks block sizes and grids."""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from . import triton_kernels as tk
from .validate import SliceMode, interpreting

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel kind, keyed by
# (is_fp32, BLOCK_D). The first entry of each space is the default: the only one used in the interpreter,
# with COMPODISTILL_KERNELS_AUTOTUNE=0, under CUDA graph capture, and for keys with a single entry. On CUDA
# the launchers time every entry once per (kind, flags, dtype, BLOCK_D, L bucket) and keep the fastest.
# Kinds: "fwd" (_attn_fwd_kernel), "slice" (_slice_fwd_kernel and _slice_bwd_kernel), "dkdv"
# (_attn_bwd_dkdv_kernel: BLOCK_N keys per program, BLOCK_M queries per step), "dq" (_attn_bwd_dq_kernel:
# BLOCK_M queries per program, BLOCK_N keys per step) and "onepass" (_attn_bwd_dkdv_kernel with ATOMIC_DQ, the
# one-pass backward: as "dkdv", plus a (BLOCK_M, BLOCK_D) fp32 dQ tile per step).
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
_DEFAULTS["onepass"] = dict(_DEFAULTS["dkdv"])
# Further candidates for the autotuner (fp16/bf16 only). Larger tiles re-read K/V (forward, dQ) or Q/dO
# (dK/dV) fewer times; smaller ones give more programs at short L (L = 2048, 20 heads: 320 forward
# programs of 128 rows for 132 SMs). Shared memory of the largest, (128, 128, 8, 3) forward at D = 128:
# 224 KiB on sm_90 (limit 227), 160 KiB on sm_80 (limit 163).
_TUNE_EXTRA = {
    "fwd": {(False, 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            (False, 128): [(128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)]},
    "dkdv": {(False, 64): [(64, 128, 8, 2), (32, 64, 4, 2)], (False, 128): [(32, 128, 8, 2), (32, 64, 4, 2)]},
    "dq": {(False, 64): [(128, 64, 8, 2), (128, 32, 8, 2)], (False, 128): [(128, 64, 8, 2), (128, 32, 8, 2)]},
    # one-pass: every candidate at the 255-register cap on sm_80 and sm_90 without spills (the fp32 dQ tile
    # adds to dK/dV's accumulators); (64, 128, 8, 2) at D = 128 takes 160 KiB on sm_90, 128 KiB on sm_80
    "onepass": {(False, 64): [(64, 128, 8, 2), (128, 64, 8, 2)], (False, 128): [(32, 64, 4, 2), (64, 128, 8, 2)]},
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
            ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
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
    """The stride arguments every kernel takes, by name."""
    return dict(stride_qb=q.stride(0), stride_qh=q.stride(1), stride_kb=k.stride(0), stride_kh=k.stride(1),
                stride_mb=mask_stride)


def _tiles(cfg):
    """Block sizes and launch options of a configuration, as kernel keyword arguments."""
    bm, bn, bd, warps, stages = cfg
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)


class SliceGrad(NamedTuple):
    """G = ∂loss/∂a, the gradient of the head-mean visual slice a (B, Lq, Nv), in the factored form of its
    slice mode; the backward expands it tile by tile (_slice_bwd_kernel), so a full G exists only as one
    transient (B, Lq, Nv) fp32 buffer inside the backward. Fields a mode does not use are None.

    ROWS:  G[b, i, j] = dslice[b, i, j], the upstream gradient of the slice.
    MEAN:  the output is m[b, j] = Σ_i w[b, i] a[b, i, j] / W_b with W_b = Σ_i w[b, i], so
           G[b, i, j] = row_share[b, i] · dmean[b, j] with row_share = w / W_b and dmean = ∂loss/∂m.
    ALIGN: loss = Σ w (1 − cos) / W, cos = a·t / (n_a n_t), n_x = max(|x|, eps) per row, ∂n_a/∂a = a/|a|
           (0 at a = 0), so G[b, i, j] = teacher_coef[b, i] · t[b, i, j] + student_coef[b, i] · a[b, i, j]
           with teacher_coef = −w / (W n_a n_t) and student_coef = w (a·t) / (W n_a² n_t |a|), both times the
           loss's upstream gradient; a is the slice the forward wrote, t the teacher slice.
    """

    mode: SliceMode
    dslice: Optional[torch.Tensor] = None        # ROWS: (B, Lq, Nv) float32
    row_share: Optional[torch.Tensor] = None     # MEAN: (B, Lq) float32
    dmean: Optional[torch.Tensor] = None         # MEAN: (B, Nv) float32
    teacher_coef: Optional[torch.Tensor] = None  # ALIGN: (B, Lq) float32
    student_coef: Optional[torch.Tensor] = None  # ALIGN: (B, Lq) float32
    teacher: Optional[torch.Tensor] = None       # ALIGN: (B, Lq, Nv) float32
    student: Optional[torch.Tensor] = None       # ALIGN: (B, Lq, Nv) float32, the forward's slice a


def attn_fwd(q, k, v, scale, causal, mask):
    B, H, L, D = q.shape
    kpm, mask_stride = _mask_arg(q, mask)

    def run(cfg):
        out = torch.empty_like(q)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        tk._attn_fwd_kernel[(triton.cdiv(L, cfg[0]), B * H)](
            Q=q, K=k, V=v, OUT=out, LSE=lse, KPM=kpm, **_strides(q, k, mask_stride),
            H=H, GROUP=H // k.shape[1], L=L, D=D, qk_scale=scale * tk.LOG2E,
            CAUSAL=causal, HAS_MASK=mask is not None, PRECISION=precision_for(q.dtype), **_tiles(cfg))
        return out, lse

    key = (causal, mask is not None, H // k.shape[1], _length_bucket(L))
    return _launch("fwd", q.dtype, D, key, q.device, run)


def _slice_key(spec, causal, mask, mode, group, L):
    return (int(mode), causal, mask is not None, group, _length_bucket(L), _length_bucket(spec.query_len),
            _length_bucket(spec.visual_len))


def slice_fwd(q, k, lse, scale, causal, mask, spec, mode, weight=None, teacher=None):
    """By slice mode: ROWS -> the slice (B, Lq, Nv); MEAN -> per-row-tile partial sums Σ w·a
    (B, n_row_tiles, Nv); ALIGN -> (the slice (B, Lq, Nv), per-column-tile partial row stats a·t, |a|², |t|²
    (B, n_col_tiles, Lq, 3))."""
    mode = SliceMode(mode)
    B, H, L, D = q.shape
    Lq, Nv = spec.query_len, spec.visual_len
    f32 = dict(device=q.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    kpm, mask_stride = _mask_arg(q, mask)

    def run(cfg):
        grid = (triton.cdiv(Lq, cfg[0]), triton.cdiv(Nv, cfg[1]), B)
        slc = torch.empty(B, Lq, Nv, **f32) if mode in (SliceMode.ROWS, SliceMode.ALIGN) else dummy
        row_tile_sums = torch.empty(B, grid[0], Nv, **f32) if mode == SliceMode.MEAN else dummy
        row_stats = torch.empty(B, grid[1], Lq, 3, **f32) if mode == SliceMode.ALIGN else dummy
        tk._slice_fwd_kernel[grid](
            Q=q, K=k, LSE=lse, KPM=kpm, VI=spec.visual_index, QI=spec.query_index,
            ROW_WEIGHT=weight if weight is not None else dummy, TEACHER=teacher if teacher is not None else dummy,
            SLC=slc, ROW_TILE_SUMS=row_tile_sums, ROW_STATS=row_stats, **_strides(q, k, mask_stride),
            H=H, GROUP=H // k.shape[1], L=L, D=D, Lq=Lq, Nv=Nv, qk_scale=scale * tk.LOG2E, inv_h=1.0 / H,
            CAUSAL=causal, HAS_MASK=mask is not None, MODE=mode.value, PRECISION=precision_for(q.dtype),
            **_tiles(cfg))
        if mode == SliceMode.ROWS:
            return slc
        if mode == SliceMode.MEAN:
            return row_tile_sums
        return slc, row_stats

    key = ("fwd",) + _slice_key(spec, causal, mask, mode, H // k.shape[1], L)
    return _launch("slice", q.dtype, D, key, q.device, run)


def _slice_grad_term(q, k, lse, delta, scale, causal, mask, spec, grad: SliceGrad):
    """G/H (B, Lq, Nv) for the dS term of the visual key tiles; adds (1/H) Σ_j P_h G to delta in place."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    Lq, Nv = spec.query_len, spec.visual_len
    f32 = dict(device=q.device, dtype=torch.float32)
    dummy = torch.empty(1, **f32)
    kpm, mask_stride = _mask_arg(q, mask)

    def arg(x):
        return x if x is not None else dummy

    def run(cfg):
        grid = (triton.cdiv(Lq, cfg[0]), triton.cdiv(Nv, cfg[1]), B)
        g = torch.empty(B, Lq, Nv, **f32)
        delta_part = torch.empty(B, H, grid[1], Lq, **f32)
        tk._slice_bwd_kernel[grid](
            Q=q, K=k, LSE=lse, KPM=kpm, VI=spec.visual_index, QI=spec.query_index,
            DSLICE=arg(grad.dslice), ROW_SHARE=arg(grad.row_share), DMEAN=arg(grad.dmean),
            TEACHER_COEF=arg(grad.teacher_coef), STUDENT_COEF=arg(grad.student_coef), TEACHER=arg(grad.teacher),
            SLC=arg(grad.student), G=g, DELTA_PART=delta_part, **_strides(q, k, mask_stride),
            H=H, GROUP=H // Hkv, L=L, D=D, Lq=Lq, Nv=Nv, qk_scale=scale * tk.LOG2E, inv_h=1.0 / H,
            CAUSAL=causal, HAS_MASK=mask is not None, MODE=SliceMode(grad.mode).value,
            PRECISION=precision_for(q.dtype), **_tiles(cfg))
        return g, delta_part

    # the tuner may run the kernel several times: the accumulation into Δ stays outside it
    key = ("bwd",) + _slice_key(spec, causal, mask, grad.mode, H // Hkv, L)
    g, delta_part = _launch("slice", q.dtype, D, key, q.device, run)
    # Δ_h[query_index[b, i]] += (1/H) Σ_j P_h[i, j] G[i, j], summed over the column tiles in a fixed order.
    # Padded rows, and rows outside [0, L) (indices left unchecked, see validate.device_value_checks), have
    # P = 0 in the kernel: clamping their index adds 0 instead of indexing out of bounds.
    rows = spec.query_index.long().clamp(0, L - 1)
    rows = rows[:, None, :].expand(B, H, Lq)
    delta.scatter_add_(2, rows, delta_part.sum(dim=2))
    return g


def inverse_maps(spec, L):
    """What the backward kernels need to find slice entries while they walk the sequence in order:
    (row_of_pos, col_of_pos) (B, L) int32, the slice row / column at each position or −1, and
    (query_range, visual_range) (B, 2) int32, [lo, hi) spanning each sample's real positions (lo = L,
    hi = 0 for a sample with none), so tiles outside them skip the map lookups. Indices outside [0, L)
    (left unchecked by device_value_checks(False)) are dropped: they have P = 0 anyway."""
    def one(index):
        B, n = index.shape
        idx = index.long()
        real = (idx >= 0) & (idx < L)
        inverse = torch.full((B, L + 1), -1, dtype=torch.int32, device=index.device)
        # padding goes to the spare column L, dropped below
        inverse.scatter_(1, torch.where(real, idx, L),
                         torch.arange(n, dtype=torch.int32, device=index.device).expand(B, n).contiguous())
        lo = torch.where(real, idx, L).amin(dim=1)
        hi = torch.where(real, idx + 1, 0).amax(dim=1)
        return inverse[:, :L].contiguous(), torch.stack([lo, hi], dim=1).to(torch.int32).contiguous()

    row_of_pos, query_range = one(spec.query_index)
    col_of_pos, visual_range = one(spec.visual_index)
    return row_of_pos, col_of_pos, query_range, visual_range


def attn_bwd(q, k, v, out, lse, dout, dlse, scale, causal, mask, spec=None, slice_grad=None, deterministic=True):
    """dq, dk, dv from the output's gradient dout and the lse's gradient dlse (both as produced by autograd).

    slice_grad (a SliceGrad) adds the slice's gradient G. deterministic=True runs the two-kernel backward
    (dK/dV per key tile, then dQ per query tile: no atomics, bit-identical runs); False the one-pass
    backward (dK/dV per key tile, dQ accumulated in fp32 by atomics: fewer matmuls, run-to-run rounding
    differences in dq).
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    dout = dout.contiguous()
    kpm, mask_stride = _mask_arg(q, mask)
    strides = _strides(q, k, mask_stride)
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    pre_m = 64
    tk._bwd_preprocess_kernel[(triton.cdiv(L, pre_m), B * H)](
        OUT=out, DO=dout, DLSE=dlse, DELTA=delta, L=L, D=D, BLOCK_M=pre_m, BLOCK_D=block_d_for(D))

    f32 = dict(device=q.device, dtype=torch.float32)
    has_g = slice_grad is not None
    if has_g:
        g = _slice_grad_term(q, k, lse, delta, scale, causal, mask, spec, slice_grad)
        row_of_pos, col_of_pos, query_range, visual_range = inverse_maps(spec, L)
        Lq, Nv = spec.query_len, spec.visual_len
    else:
        g = torch.empty(1, **f32)
        row_of_pos = col_of_pos = query_range = visual_range = torch.zeros(2, device=q.device, dtype=torch.int32)
        Lq = Nv = 1
    common = dict(Q=q, K=k, V=v, DO=dout, LSE=lse, DELTA=delta, KPM=kpm, ROW_OF_POS=row_of_pos,
                  COL_OF_POS=col_of_pos, QRANGE=query_range, VRANGE=visual_range, G=g, **strides, H=H,
                  GROUP=H // Hkv, L=L, D=D, Lq=Lq, Nv=Nv, qk_scale=scale * tk.LOG2E, sm_scale=scale,
                  CAUSAL=causal, HAS_MASK=mask is not None, HAS_G=has_g, PRECISION=precision_for(q.dtype))
    key = (causal, mask is not None, has_g, H // Hkv, _length_bucket(L))

    def run_dkdv(cfg, atomic_dq=False):
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dq_acc = torch.zeros(B, H, L, D, **f32) if atomic_dq else torch.empty(1, **f32)
        tk._attn_bwd_dkdv_kernel[(triton.cdiv(L, cfg[1]), B * Hkv)](
            **common, DK=dk, DV=dv, DQ_ACC=dq_acc, HKV=Hkv, ATOMIC_DQ=atomic_dq, **_tiles(cfg))
        return dk, dv, dq_acc

    if not deterministic:
        dk, dv, dq_acc = _launch("onepass", q.dtype, D, key, q.device, lambda cfg: run_dkdv(cfg, atomic_dq=True))
        return dq_acc.mul_(scale).to(q.dtype), dk, dv

    def run_dq(cfg):
        dq = torch.empty_like(q)
        tk._attn_bwd_dq_kernel[(triton.cdiv(L, cfg[0]), B * H)](**common, DQ=dq, **_tiles(cfg))
        return dq

    dk, dv, _ = _launch("dkdv", q.dtype, D, key, q.device, run_dkdv)
    dq = _launch("dq", q.dtype, D, key, q.device, run_dq)
    return dq, dk, dv


def _safe_div(num, den):
    return num / torch.where(den > 0, den, torch.ones_like(den))


class _FusedAttention(torch.autograd.Function):
    """Outputs (out, lse, aux); aux is the slice (SliceMode.ROWS), its weighted row mean (MEAN), the
    alignment loss (ALIGN) or absent (mode None: plain attention)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, mask, spec, mode, teacher, eps, deterministic):
        out, lse = attn_fwd(q, k, v, scale, causal, mask)
        aux, weight, slc, stats = None, None, None, None
        if mode in (SliceMode.MEAN, SliceMode.ALIGN):  # the slice itself (ROWS) is unweighted
            B, Lq = q.shape[0], spec.query_len
            weight = spec.row_weight if spec.row_weight is not None else \
                torch.ones(B, Lq, device=q.device, dtype=torch.float32)
            weight = weight.contiguous()
        if mode == SliceMode.ROWS:
            aux = slice_fwd(q, k, lse, scale, causal, mask, spec, mode)
        elif mode == SliceMode.MEAN:
            row_tile_sums = slice_fwd(q, k, lse, scale, causal, mask, spec, mode, weight=weight)
            aux = _safe_div(row_tile_sums.sum(dim=1), weight.sum(dim=1, keepdim=True))
        elif mode == SliceMode.ALIGN:
            teacher = teacher.to(torch.float32).contiguous()  # one kernel signature for any teacher dtype
            slc, stats = slice_fwd(q, k, lse, scale, causal, mask, spec, mode, teacher=teacher)
            stats = stats.sum(dim=1)
            cos = stats[..., 0] / (stats[..., 1].sqrt().clamp_min(eps) * stats[..., 2].sqrt().clamp_min(eps))
            aux = _safe_div((weight * (1.0 - cos)).sum(), weight.sum())
        align = mode == SliceMode.ALIGN
        ctx.save_for_backward(q, k, v, out, lse, mask, weight, teacher if align else None, slc, stats)
        ctx.args = (scale, causal, spec, mode, eps, deterministic)
        if aux is None:
            return out, lse
        return out, lse, aux

    @staticmethod
    def backward(ctx, dout, dlse, daux=None):
        q, k, v, out, lse, mask, weight, teacher, slc, stats = ctx.saved_tensors
        scale, causal, spec, mode, eps, deterministic = ctx.args
        slice_grad = None
        if mode == SliceMode.ROWS:
            slice_grad = SliceGrad(mode, dslice=daux.to(torch.float32).contiguous())
        elif mode == SliceMode.MEAN:
            row_share = _safe_div(weight, weight.sum(dim=1, keepdim=True)).contiguous()
            slice_grad = SliceGrad(mode, row_share=row_share, dmean=daux.to(torch.float32).contiguous())
        elif mode == SliceMode.ALIGN:
            a_dot_t, a_norm, t_norm = stats[..., 0], stats[..., 1].sqrt(), stats[..., 2].sqrt()
            n_a, n_t = a_norm.clamp_min(eps), t_norm.clamp_min(eps)
            w = daux * _safe_div(weight, weight.sum())
            slice_grad = SliceGrad(mode, teacher_coef=(-w / (n_a * n_t)).contiguous(),
                                   student_coef=_safe_div(w * a_dot_t, n_a * n_a * n_t * a_norm).contiguous(),
                                   teacher=teacher, student=slc)
        dq, dk, dv = attn_bwd(q, k, v, out, lse, dout, dlse.contiguous(), scale, causal, mask, spec, slice_grad,
                              deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def triton_attention(q, k, v, scale, causal, key_padding_mask, spec, mode, teacher=None, eps=1e-8,
                     deterministic=True):
    """(out, lse, aux) for mode a SliceMode, or None for plain attention (aux None); differentiable w.r.t.
    q, k, v. deterministic selects the backward (see attn_bwd)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = key_padding_mask.contiguous() if key_padding_mask is not None else None
    mode = None if mode is None else SliceMode(mode)
    res = _FusedAttention.apply(q, k, v, scale, causal, mask, spec, mode, teacher, eps, deterministic)
    if mode is None:
        out, lse = res
        return out, lse, None
    return res
