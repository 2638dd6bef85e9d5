"""The two Triton backwards against the float64 reference: deterministic=True (two kernels, dK/dV per key
tile then dQ per query tile, no atomics) and deterministic=False (one pass, dK/dV per key tile with dQ
accumulated in fp32 by atomics). Both fold in the alignment terms (G in dS, the extra Δ term).

Under the interpreter programs run one after another, so the atomics are exercised for correctness
(several key tiles adding into the same dQ rows, with forced small tiles), not for races; the GPU twin is
tests/kernels/test_cuda.py::test_one_pass_backward_against_reference.
"""

import contextlib

import pytest
import torch

import compodistill_kernels as ck
from .helpers import DEVICE, DTYPE_NAMES, TRITON_SKIP_REASON, Case, check_against_reference, make_inputs, \
    rel_err, triton_runnable

KINDS = ("flash", "slice_rows", "slice_mean", "align")
BACKWARDS = [pytest.param(True, id="two-kernel"), pytest.param(False, id="one-pass")]

# Awkward shapes: L not a multiple of any tile, odd head dims, GQA and MQA, left padding with rows that
# see no key, causal and not, per-sample offsets with the image and the rows crossing tile borders.
CASES = {
    "gqa-causal-pad": Case(B=2, Hq=4, Hkv=2, L=45, D=24, causal=True, pad=(0, 7), vs=(3, 9), vl=20, qs=(20, 25),
                           ql=18, weight="random"),
    "mqa-full-pad": Case(B=2, Hq=3, Hkv=1, L=37, D=16, causal=False, pad=(5, 0), vs=(7, 2), vl=13, qs=(1, 20),
                         ql=15, weight="random"),
    "mha-causal-vis-rows": Case(B=1, Hq=2, Hkv=2, L=50, D=40, causal=True, vs=(6,), vl=30, qs=(6,), ql=30),
    "gqa-full-scale": Case(B=2, Hq=4, Hkv=1, L=29, D=32, causal=False, scale=0.3, vs=(0, 4), vl=11, qs=(10, 3),
                           ql=19),
}
# (BLOCK_M, BLOCK_N): None keeps the launchers' defaults (one tile covers these lengths); small tiles make
# several key tiles add into every dQ row, and rectangular ones move the diagonal inside the tiles.
TILES = [None, (16, 16), (16, 32)]

pytestmark = pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)


def _tile_id(tiles):
    return "default-tiles" if tiles is None else f"tiles{tiles[0]}x{tiles[1]}"


PARAMS = [
    pytest.param(deterministic, dtype, tiles, name,
                 id=f"{'two-kernel' if deterministic else 'one-pass'}-{DTYPE_NAMES[dtype]}-{_tile_id(tiles)}-{name}")
    for deterministic in (True, False) for dtype in (torch.float32, torch.float16) for tiles in TILES
    for name in CASES
    # every case at 16x16 in both dtypes; the other tilings in one dtype each, on two cases
    if tiles == (16, 16) or (name in ("gqa-causal-pad", "mqa-full-pad") and (dtype == torch.float32) == (tiles is None))
]


@pytest.mark.parametrize("deterministic, dtype, tiles, name", PARAMS)
def test_backward_against_reference(deterministic, dtype, tiles, name, gen):
    from compodistill_kernels.attention.triton_impl import block_size_override
    case = CASES[name]
    with block_size_override(*tiles) if tiles is not None else contextlib.nullcontext():
        for kind in KINDS:
            check_against_reference(kind, case, "triton", dtype, DEVICE, gen, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", BACKWARDS)
def test_each_backward_runs_its_own_kernels(deterministic, monkeypatch, gen):
    from compodistill_kernels.attention import triton_impl
    kinds = []
    real_launch = triton_impl._launch

    def spy(kind, *args, **kwargs):
        kinds.append(kind)
        return real_launch(kind, *args, **kwargs)

    monkeypatch.setattr(triton_impl, "_launch", spy)
    check_against_reference("align", CASES["gqa-causal-pad"], "triton", torch.float32, DEVICE, gen,
                            deterministic=deterministic)
    expected = {"fwd", "slice", "dkdv", "dq"} if deterministic else {"fwd", "slice", "onepass"}
    assert set(kinds) == expected, kinds


def test_default_is_the_deterministic_backward(monkeypatch, gen):
    from compodistill_kernels.attention import triton_impl
    kinds = []
    real_launch = triton_impl._launch
    monkeypatch.setattr(triton_impl, "_launch", lambda kind, *a, **kw: kinds.append(kind) or real_launch(kind, *a, **kw))
    check_against_reference("flash", CASES["mqa-full-pad"], "triton", torch.float32, DEVICE, gen)
    assert "dq" in kinds and "onepass" not in kinds


def test_both_backwards_agree(gen):
    # fp32: the two orders of summation of dQ agree to rounding
    case = CASES["gqa-causal-pad"]
    inp = make_inputs(case, torch.float32, DEVICE, gen)
    grads = {}
    for deterministic in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (inp.q, inp.k, inp.v)]
        out, loss = ck.attention_with_alignment(*leaves, inp.teacher, inp.visual_start, case.vl, inp.query_start,
                                                case.ql, row_weight=inp.row_weight, key_padding_mask=inp.mask,
                                                backend="triton", deterministic=deterministic)
        torch.autograd.backward([out, loss], [inp.do, torch.tensor(3.7)])
        grads[deterministic] = [leaf.grad for leaf in leaves]
    for name, a, b in zip(("dq", "dk", "dv"), grads[True], grads[False]):
        assert rel_err(b, a, name) < 1e-6, name


BAD_VALUES = [1, 0, None, "yes", "False", 1.0, torch.tensor(True)]
FUNCS = ("flash_attention", "attention_with_visual_slice", "attention_with_alignment")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_deterministic_must_be_a_bool(func, value, backend):
    B, H, L, D = 2, 2, 12, 8
    q = torch.randn(B, H, L, D, device=DEVICE)
    slice_args = (torch.tensor([1, 2]), 4, torch.tensor([6, 7]), 3)
    with pytest.raises(ValueError, match=r"^deterministic\b"):
        if func == "flash_attention":
            ck.flash_attention(q, q, q, backend=backend, deterministic=value)
        elif func == "attention_with_visual_slice":
            ck.attention_with_visual_slice(q, q, q, *slice_args, backend=backend, deterministic=value)
        else:
            ck.attention_with_alignment(q, q, q, torch.rand(B, 3, 4, device=DEVICE), *slice_args, backend=backend,
                                        deterministic=value)


@pytest.mark.parametrize("deterministic", BACKWARDS)
def test_torch_backend_accepts_either_value(deterministic, gen):
    # the PyTorch path has no atomics: the keyword is accepted and gives the same result
    check_against_reference("align", CASES["mqa-full-pad"], "torch", torch.float32, "cpu", gen,
                            deterministic=deterministic)
