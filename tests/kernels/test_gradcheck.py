"""float64 torch.autograd.gradcheck of the torch backend's hand-chunked, checkpointed path, through
every output (out and lse / slc / loss), for all three functions. Tiny shapes with GQA, padding,
per-sample offsets and row weights."""

import pytest
import torch

import compodistill_kernels as ck

B, Hq, Hkv, L, D = 2, 4, 2, 9, 3
VS, VL, QS, QL = [1, 3], 4, [4, 2], 5

CASES = [
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(causal=False), id="full"),
    # sample 1 padded on the left; under causal its rows 0-1 have no key (lse −inf is masked below)
    pytest.param(dict(causal=True, pad=2, scale=0.7), id="causal-pad-scale"),
    pytest.param(dict(causal=False, pad=3), id="full-pad"),
]


def inputs(opts, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).requires_grad_()
    mask = None
    if "pad" in opts:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, :opts["pad"]] = False
    kw = dict(causal=opts["causal"], softmax_scale=opts.get("scale"), key_padding_mask=mask, backend="torch")
    extra = dict(
        offsets=(torch.tensor(VS), VL, torch.tensor(QS), QL),
        row_weight=torch.rand(B, QL, generator=g, dtype=torch.float64) + 0.1,
        teacher=torch.rand(B, QL, VL, generator=g, dtype=torch.float64),
    )
    return (q, k, v), kw, extra


def finite_lse(lse):
    """lse with its −inf entries (rows without any key) replaced by 0: their gradient is 0."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


@pytest.mark.parametrize("opts", CASES)
def test_gradcheck_flash_attention(opts):
    qkv, kw, _ = inputs(opts, 0)

    def fn(q, k, v):
        out, lse = ck.flash_attention(q, k, v, **kw)
        return out, finite_lse(lse)

    assert torch.autograd.gradcheck(fn, qkv, fast_mode=True)


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize("reduce, weighted", [("rows", False), ("mean", False), ("mean", True)],
                         ids=["rows", "mean", "mean-weighted"])
def test_gradcheck_visual_slice(opts, reduce, weighted):
    qkv, kw, extra = inputs(opts, 1)
    row_weight = extra["row_weight"] if weighted else None

    def fn(q, k, v):
        return ck.attention_with_visual_slice(q, k, v, *extra["offsets"], reduce=reduce, row_weight=row_weight,
                                              **kw)

    assert torch.autograd.gradcheck(fn, qkv, fast_mode=True)


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_gradcheck_alignment(opts, weighted):
    qkv, kw, extra = inputs(opts, 2)
    row_weight = extra["row_weight"] if weighted else None

    def fn(q, k, v):
        return ck.attention_with_alignment(q, k, v, extra["teacher"], *extra["offsets"], row_weight=row_weight,
                                           **kw)

    assert torch.autograd.gradcheck(fn, qkv, fast_mode=True)


@pytest.mark.parametrize("opts", CASES[2:3])
def test_gradcheck_full_jacobian_of_the_loss(opts):
    # Slow-mode gradcheck (every Jacobian entry) of the scalar loss; the tests above use fast mode.
    qkv, kw, extra = inputs(opts, 3)

    def fn(q, k, v):
        return ck.attention_with_alignment(q, k, v, extra["teacher"], *extra["offsets"],
                                           row_weight=extra["row_weight"], **kw)[1]

    assert torch.autograd.gradcheck(fn, qkv)
