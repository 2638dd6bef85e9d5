"""The compiled Triton kernels on a CUDA GPU against the float64 reference computed on the GPU.

bf16, fp16 and fp32; sequence lengths near 1000 with SigLIP-sized images (576 and 729 visual tokens);
head dims 64, 80 and 128; Qwen1.5-1.8B-like heads (16/16) and grouped-query heads (20/4); all three
functions with backward, both backwards (the default two-kernel one and the one-pass one with atomic dQ);
NaN edge cases at these sizes. Its CPU twin (small shapes, interpreter) is
tests/kernels/test_attention.py, which on a GPU machine also runs against the compiled kernels.
"""

import pytest
import torch

from .helpers import DTYPE_NAMES, Case, assert_finite, check_against_reference, forward_backward, interpreting, \
    make_inputs

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (runs the compiled Triton kernels)", allow_module_level=True)
if interpreting():
    pytest.skip("TRITON_INTERPRET=1 is set: the interpreter would run instead of the compiler",
                allow_module_level=True)

DTYPES = [pytest.param(d, id=DTYPE_NAMES[d]) for d in (torch.bfloat16, torch.float16, torch.float32)]
KINDS = ("flash", "slice_rows", "slice_mean", "align")

CASES = [
    # student-like: 16 heads, d=128, 729 visual tokens (SigLIP so400m-384), text rows after the image
    Case(B=1, Hq=16, Hkv=16, L=1024, D=128, causal=True, vs=(35,), vl=729, qs=(764,), ql=260, weight="random"),
    # teacher-like head count with GQA 20/4; visual rows → visual keys, as in the public code
    Case(B=1, Hq=20, Hkv=4, L=1000, D=128, causal=True, vs=(40,), vl=729, qs=(40,), ql=729),
    # d=64, per-sample offsets, left padding on sample 1, 576 visual tokens (CLIP-336)
    Case(B=2, Hq=16, Hkv=16, L=1000, D=64, causal=True, pad=(0, 37), vs=(14, 40), vl=576, qs=(600, 620), ql=380,
         weight="random"),
    # d=80 (non-power of two), non-causal, GQA 20/4, odd length
    Case(B=2, Hq=20, Hkv=4, L=777, D=80, causal=False, pad=(11, 0), vs=(5, 50), vl=300, qs=(0, 100), ql=400,
         scale=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.slice_id)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_against_reference(dtype, kind, case, gen):
    check_against_reference(kind, case, "triton", dtype, "cuda", gen)


EDGE_CASES = [
    # causal + 100 left-padded tokens: rows 0-99 of sample 1 have no key (out 0, lse −inf); the slice
    # rows start inside the padding and the image straddles its end
    pytest.param(Case(B=2, Hq=16, Hkv=4, L=1024, D=128, causal=True, pad=(0, 100), vs=(20, 60), vl=729, qs=(0, 0),
                      ql=300, weight="random"), id="rows-without-any-key"),
    # query rows before the image (causal → student rows 0) and all-zero teacher rows
    pytest.param(Case(B=2, Hq=16, Hkv=16, L=1000, D=64, causal=True, vs=(500, 600), vl=400, qs=(100, 300), ql=500,
                      teacher="zero_rows"), id="rows-before-image-zero-teacher"),
    # a sample whose weights are all 0, and image at the very end
    pytest.param(Case(B=2, Hq=16, Hkv=16, L=1000, D=64, causal=True, vs=(271, 200), vl=729, qs=(500, 600), ql=400,
                      weight="zero_first"), id="zero-weight-sample-image-at-end"),
    # scores around ±100
    pytest.param(Case(B=1, Hq=16, Hkv=16, L=1024, D=128, causal=True, q_mult=25.0, vs=(35,), vl=729, qs=(764,),
                      ql=260, weight="random"), id="large-logits"),
]


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_edge_cases(dtype, case, gen):
    for kind in KINDS:
        check_against_reference(kind, case, "triton", dtype, "cuda", gen)


def test_all_row_weights_zero(gen):
    case = Case(B=2, Hq=16, Hkv=16, L=1000, D=64, causal=True, vs=(14, 40), vl=576, qs=(600, 620), ql=380,
                weight="zeros")
    outs, grads, _, _ = check_against_reference("align", case, "triton", torch.bfloat16, "cuda", gen)
    assert outs["loss"].item() == 0.0


ONE_PASS_CASES = [CASES[0], CASES[1], EDGE_CASES[0].values[0]]


@pytest.mark.parametrize("case", ONE_PASS_CASES, ids=lambda c: c.slice_id)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_pass_backward_against_reference(dtype, kind, case, gen):
    check_against_reference(kind, case, "triton", dtype, "cuda", gen, deterministic=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype, gen):
    # the default backward has no atomics: two runs give bit-identical outputs and gradients
    case = CASES[2]
    inp = make_inputs(case, dtype, "cuda", gen)
    first = forward_backward("align", case, inp, "triton", dtype)
    second = forward_backward("align", case, inp, "triton", dtype)
    for a, b in zip(first, second):
        for name in a:
            assert_finite(name, a[name])
            assert torch.equal(a[name], b[name]), f"{name}: differs between two identical runs"
