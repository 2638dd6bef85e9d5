"""The tile-level shortcuts of the Triton kernels against the float64 reference, under forced small tiles:
the causal split (inner tiles without the causal and bounds masks, edge tiles with them), the slice
tiles skipped because the causal mask hides them, and the visual-range tests of the backward's G term.
Also: the autotuning space is what aot_check compiles, and the tuner never runs where it cannot time.

Small tiles (16, 32) make sequences of a few dozen tokens span several tiles, so every stage of every
loop runs: L not a multiple of the tile, visual ranges starting and ending mid-tile or inside one
tile, query rows crossing the diagonal, per-sample offsets, grouped-query heads and padding.
"""

import pytest
import torch

from .helpers import DEVICE, DTYPE_NAMES, TRITON_SKIP_REASON, Case, check_against_reference, triton_runnable

pytestmark = pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)

KINDS = ("flash", "slice_rows", "slice_mean", "align")

# name -> case; L = 45 is 2 full 16-tiles + 13 (and 1 full 32-tile + 13).
CASES = {
    # visual columns 5..26: start mid tile 0, end mid tile 1; text rows after the image, per sample
    "vis-mid-tile-text-rows": Case(B=2, Hq=4, Hkv=2, L=45, D=16, causal=True, vs=(5, 9), vl=22, qs=(27, 31),
                                   ql=14, weight="random"),
    # visual rows → visual keys (the public code's preset): rows cross the diagonal, so slice tiles
    # above it are hidden by the causal mask and skipped
    "vis-rows-on-diagonal": Case(B=2, Hq=3, Hkv=1, L=45, D=24, causal=True, vs=(5, 9), vl=36, qs=(5, 9), ql=36,
                                 weight="random"),
    # the whole visual range inside one 16-tile (18..26), query rows start before the image
    "vis-inside-one-tile": Case(B=1, Hq=2, Hkv=2, L=45, D=16, causal=True, vs=(18,), vl=9, qs=(10,), ql=30),
    # left padding covering the start of the image in sample 1; rows 0-6 of sample 1 see no key
    "padding-over-image": Case(B=2, Hq=4, Hkv=2, L=45, D=16, causal=True, pad=(0, 7), vs=(3, 4), vl=20,
                               qs=(0, 2), ql=40, weight="random"),
    # rows entirely before the image in one sample, after it in the other
    "rows-before-image": Case(B=2, Hq=2, Hkv=1, L=45, D=16, causal=True, vs=(30, 2), vl=12, qs=(3, 20), ql=20),
    # non-causal: the ragged last key tile is the only edge tile
    "full-attention-pad": Case(B=2, Hq=4, Hkv=2, L=45, D=16, causal=False, pad=(5, 0), vs=(7, 20), vl=17,
                               qs=(1, 25), ql=19, weight="random"),
    # L shorter than one tile
    "shorter-than-a-tile": Case(B=2, Hq=2, Hkv=1, L=11, D=16, causal=True, vs=(1, 3), vl=6, qs=(2, 0), ql=9),
}

TILES = [(16, 16), (16, 32), (32, 16)]


def hidden_slice_tiles(case, block_m, block_n):
    """Number of (sample, slice-row tile, visual-column tile) triples that the causal mask hides entirely."""
    if not case.causal:
        return 0
    count = 0
    vs_all = case.vs * case.B if len(case.vs) == 1 else case.vs
    qs_all = case.qs * case.B if len(case.qs) == 1 else case.qs
    for vs, qs in zip(vs_all, qs_all):
        for r0 in range(0, case.ql, block_m):
            last_row = qs + min(r0 + block_m, case.ql) - 1
            count += sum(vs + c0 > last_row for c0 in range(0, case.vl, block_n))
    return count


# Rectangular tiles (BLOCK_M != BLOCK_N) change where the diagonal falls inside a tile and which tiles are
# edge tiles; they run on the cases whose ranges cross tile borders.
RECTANGULAR = ("vis-mid-tile-text-rows", "vis-rows-on-diagonal", "padding-over-image", "full-attention-pad")
PARAMS = [
    pytest.param(dtype, bm, bn, name, id=f"{DTYPE_NAMES[dtype]}-tiles{bm}x{bn}-{name}")
    for name in CASES for bm, bn in TILES for dtype in (torch.float32, torch.float16)
    # keep the run short: every case at 16x16 in both dtypes, the rectangular tiles in one dtype each
    if (bm, bn) == (16, 16) or (name in RECTANGULAR and (dtype == torch.float32) == (bm < bn))
]


@pytest.mark.parametrize("dtype, block_m, block_n, name", PARAMS)
def test_small_tiles_against_reference(dtype, block_m, block_n, name, gen):
    from compodistill_kernels.attention.triton_impl import block_size_override
    case = CASES[name]
    with block_size_override(block_m, block_n):
        for kind in KINDS:
            check_against_reference(kind, case, "triton", dtype, DEVICE, gen)


def test_cases_reach_the_hidden_tile_skip():
    # the diagonal case must actually contain slice tiles that the kernels skip, at every tile shape
    for bm, bn in TILES:
        assert hidden_slice_tiles(CASES["vis-rows-on-diagonal"], bm, bn) > 0
        assert hidden_slice_tiles(CASES["rows-before-image"], bm, bn) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_NAMES.get)
def test_hidden_tiles_give_exact_zeros(dtype, gen):
    # rows before the image: the skipped tiles must write exact zeros (slc), not leave poison (NaN)
    from compodistill_kernels.attention.triton_impl import block_size_override
    case = CASES["rows-before-image"]
    with block_size_override(16, 16):
        outs = check_against_reference("slice_rows", case, "triton", dtype, DEVICE, gen)[0]
    slc = outs["slc"]
    assert torch.all(slc[0] == 0), "sample 0: every slice row precedes the image"
    assert torch.all(slc[1].sum(-1) > 0), "sample 1: every slice row follows the image"


# --------------------------------------------------------------------------------------------------
# Autotuning space
# --------------------------------------------------------------------------------------------------
# kind -> the kernels launched with its configurations; the one-pass backward is the dK/dV kernel with ATOMIC_DQ
KERNELS_OF_KIND = {"fwd": ("_attn_fwd_kernel",), "slice": ("_slice_fwd_kernel", "_slice_bwd_kernel"),
                   "dkdv": ("_attn_bwd_dkdv_kernel",), "dq": ("_attn_bwd_dq_kernel",),
                   "onepass": ("_attn_bwd_dkdv_kernel",)}


def _launch_kind(name, constexprs):
    if name == "_attn_bwd_dkdv_kernel":
        return "onepass" if constexprs["ATOMIC_DQ"] else "dkdv"
    return next(kind for kind, names in KERNELS_OF_KIND.items() if name in names)


def test_aot_check_enumerates_the_whole_autotune_space():
    from compodistill_kernels.attention import aot_check, triton_impl
    dtypes, head_dims = (torch.float16, torch.bfloat16, torch.float32), (16, 64, 80, 128, 256)
    launches = aot_check.recorded_launches(dtypes, head_dims, ((True, True),))
    assert set(KERNELS_OF_KIND) == set(triton_impl.KINDS)
    tuned = 0
    for kind, names in KERNELS_OF_KIND.items():
        for dtype in dtypes:
            ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
            for D in head_dims:
                space = triton_impl.config_space(kind, dtype, D)
                tuned += len(space) > 1
                assert len(set(space)) == len(space), f"{kind} {dtype} D={D}: duplicate configurations"
                for name in names:
                    compiled = {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], o["num_warps"], o["num_stages"])
                                for fn, sig, c, _, o in launches
                                if fn.__name__ == name and _launch_kind(name, c) == kind and sig["Q"] == ptr
                                and c["BLOCK_D"] == space[0][2]}
                    assert compiled == set(space), f"{name} ({kind}) {dtype} D={D}: aot_check compiles " \
                                                   f"{compiled}, the autotuner may pick {set(space)}"
    assert tuned > 0, "no kernel kind has more than one configuration to choose from"


def test_autotune_spaces_at_the_model_head_dims():
    from compodistill_kernels.attention import triton_impl
    for kind in triton_impl.KINDS:
        for dtype in (torch.float16, torch.bfloat16):
            for D in (64, 128):
                assert len(triton_impl.config_space(kind, dtype, D)) >= 2, (kind, dtype, D)
        # fp32 and the other head dims keep a single configuration (nothing to time)
        assert len(triton_impl.config_space(kind, torch.float32, 128)) == 1


def test_launcher_never_times_configurations_without_a_gpu(monkeypatch, gen):
    # the interpreter runs the default configuration: timing would need a GPU, and would be slow
    from compodistill_kernels.attention import triton_impl

    def no_timing(*args, **kwargs):
        raise AssertionError("the launcher tried to time configurations")

    monkeypatch.setattr(triton_impl, "_fastest", no_timing)
    assert not triton_impl.autotune_enabled(DEVICE)
    check_against_reference("align", CASES["vis-mid-tile-text-rows"], "triton", torch.float32, DEVICE, gen)


def test_launcher_tunes_once_per_key_and_respects_the_override(monkeypatch):
    from compodistill_kernels.attention import triton_impl
    timed, ran = [], []
    space = triton_impl.config_space("fwd", torch.bfloat16, 128)

    def fastest(candidates, run):
        timed.append(list(candidates))
        return candidates[-1]

    def run(cfg):
        ran.append(cfg)
        return cfg

    monkeypatch.setattr(triton_impl, "_fastest", fastest)
    monkeypatch.setattr(triton_impl, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(triton_impl, "_TUNED", {})
    key = (True, False, 1, 4096)
    assert triton_impl._launch("fwd", torch.bfloat16, 128, key, "cpu", run) == space[-1]
    assert triton_impl._launch("fwd", torch.bfloat16, 128, key, "cpu", run) == space[-1]
    assert timed == [space], "one timing pass per key"
    assert triton_impl._launch("fwd", torch.bfloat16, 128, (True, False, 1, 8192), "cpu", run) == space[-1]
    assert len(timed) == 2, "a new length bucket is timed again"
    with triton_impl.block_size_override(16, 32):
        cfg = triton_impl._launch("fwd", torch.bfloat16, 128, key, "cpu", run)
    assert cfg[:2] == (16, 32) and cfg[2:] == space[0][2:]
    monkeypatch.setattr(triton_impl, "autotune_enabled", lambda device: False)
    assert triton_impl._launch("fwd", torch.bfloat16, 128, (False, False, 1, 64), "cpu", run) == space[0]


def test_autotune_switch(monkeypatch):
    from compodistill_kernels.attention import triton_impl
    monkeypatch.setenv("COMPODISTILL_KERNELS_AUTOTUNE", "0")
    assert not triton_impl.autotune_enabled("cuda")
    assert not triton_impl.autotune_enabled("cpu")
