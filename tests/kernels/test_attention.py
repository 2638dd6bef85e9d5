"""Kernels against the float64 reference: out, lse / slc / loss, and dq, dk, dv, for both backends.

On a machine without a GPU the Triton cases run in Triton's CPU interpreter (TRITON_INTERPRET=1, set
by conftest.py), so shapes stay small; tests/kernels/test_cuda.py is the GPU twin with large shapes and bf16.
"""

import pytest
import torch

from ..common import backend_dtypes
from .helpers import DEVICE, DTYPE_NAMES, TRITON_SKIP_REASON, Case, check_against_reference, \
    triton_runnable


BACKEND_DTYPES = backend_dtypes()

# Awkward shapes: non-power-of-two L and D, GQA and MQA, head dims 96 and 128 kept tiny.
S37 = dict(B=2, Hq=4, Hkv=2, L=37, D=24)
S64 = dict(B=1, Hq=2, Hkv=2, L=64, D=16)
S50 = dict(B=2, Hq=3, Hkv=1, L=50, D=80)
S19 = dict(B=1, Hq=2, Hkv=1, L=19, D=96)
S13 = dict(B=2, Hq=2, Hkv=2, L=13, D=128)

FLASH_CASES = [
    *(Case(**s, causal=c) for s in (S37, S64, S50, S19, S13) for c in (True, False)),
    Case(**S37, causal=True, pad=(0, 6)),  # left padding: rows 0-5 of sample 1 see no key
    Case(**S50, causal=False, pad=(9, 0)),
    Case(**S64, causal=True, scale=0.3),
    Case(**S13, causal=False, pad=(4, 0), scale=0.05),
]

# Per-sample offsets differ between samples; rows before, inside and after the image; query range at
# the end of the sequence; query_len = 1; padded visual columns; row_weight given and None.
SLICE_CASES = [
    Case(**S37, causal=True, vs=(4, 9), vl=12, qs=(20, 14), ql=10, weight="random"),
    Case(**S37, causal=False, pad=(0, 6), vs=(2, 4), vl=10, qs=(0, 3), ql=9),
    Case(**S64, causal=True, scale=0.2, vs=(10,), vl=30, qs=(10,), ql=30),  # visual rows → visual keys
    Case(**S50, causal=True, pad=(5, 0), vs=(8, 12), vl=20, qs=(30, 35), ql=15, weight="random"),
    Case(**S37, causal=True, vs=(0, 5), vl=7, qs=(36, 20), ql=1),
    Case(**S19, causal=True, vs=(3,), vl=8, qs=(11,), ql=8, weight="random"),
    Case(**S13, causal=False, vs=(0, 5), vl=8, qs=(2, 0), ql=6, weight="random"),
]

# The alignment also with a large eps, where cosine_similarity clamps |a| (torch still passes the norm's
# gradient a/|a| through the clamp; the kernels must match that exactly).
ALIGN_CASES = SLICE_CASES + [Case(**S37, causal=True, pad=(3, 0), vs=(4, 9), vl=12, qs=(20, 14), ql=10,
                                  weight="random", eps=0.5)]


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_flash_attention(backend, dtype, case, gen):
    check_against_reference("flash", case, backend, dtype, DEVICE, gen)


@pytest.mark.parametrize("case", SLICE_CASES, ids=lambda c: c.slice_id)
@pytest.mark.parametrize("reduce", ["rows", "mean"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_attention_with_visual_slice(backend, dtype, reduce, case, gen):
    check_against_reference(f"slice_{reduce}", case, backend, dtype, DEVICE, gen)


@pytest.mark.parametrize("case", ALIGN_CASES, ids=lambda c: c.slice_id)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_attention_with_alignment(backend, dtype, case, gen):
    check_against_reference("align", case, backend, dtype, DEVICE, gen)


# Small tiles make short sequences span several tiles, so the multi-tile loops, the causal diagonal
# tiles, ragged last tiles and visual/slice ranges straddling tile borders all run under the interpreter.
TILE_CASES = [
    Case(**S37, causal=True, pad=(0, 6), vs=(4, 9), vl=12, qs=(20, 14), ql=10, weight="random"),
    Case(**S50, causal=False, pad=(5, 0), vs=(8, 12), vl=20, qs=(30, 35), ql=15, weight="random"),
]


TILE_PARAMS = [
    pytest.param(dtype, bm, bn, case, id=f"{DTYPE_NAMES[dtype]}-tiles{bm}x{bn}-{case.slice_id}")
    for dtype, bm, bn, case in [
        (torch.float32, 16, 16, TILE_CASES[0]), (torch.float16, 16, 16, TILE_CASES[0]),
        (torch.float32, 16, 16, TILE_CASES[1]), (torch.float16, 16, 16, TILE_CASES[1]),
        (torch.float32, 16, 32, TILE_CASES[0]), (torch.float16, 32, 16, TILE_CASES[0]),  # BLOCK_M != BLOCK_N
    ]
]


@pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("dtype, block_m, block_n, case", TILE_PARAMS)
def test_triton_small_tiles(dtype, block_m, block_n, case, gen):
    from compodistill_kernels.attention.triton_impl import block_size_override
    with block_size_override(block_m, block_n):
        for kind in ("flash", "slice_rows", "slice_mean", "align"):
            check_against_reference(kind, case, "triton", dtype, DEVICE, gen)
