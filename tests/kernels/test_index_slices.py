"""The index form of the slice contract: visual_index (B, Nv) / query_index (B, Nq) positions per
sample, padded at the end with -1, visual tokens in several runs and of different counts per sample.
Checked against the float64 reference (naive.naive_indexed_attention), forward and gradients, on the
torch backend and on Triton (under the interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

import compodistill_kernels as ck
from compodistill_kernels.attention import naive

from .helpers import TRITON_SKIP_REASON, rel_err, triton_runnable

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_runnable(),
                                                                       reason=TRITON_SKIP_REASON))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _padded(rows, width=None):
    width = width or max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64)


def _case(gen, *, B=2, Hq=4, Hkv=2, L=37, D=16):
    q = torch.randn(B, Hq, L, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=gen, dtype=torch.float64)
    # sample 0: two images of 3 and 4 tokens with a separator between; sample 1: twice as many tokens in
    # three runs (tiles), so sample 0 is padded
    visual = _padded([[2, 3, 4, 6, 7, 8, 9], [1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 16]])
    query = _padded([list(range(10, 30)), list(range(17, 36, 2))])
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -3:] = False  # right padding of sample 0
    return q, k, v, visual, query, mask


def _run(fn, backend, dtype, q, k, v, **kwargs):
    leaves = [t.to(DEVICE, dtype).detach().requires_grad_() for t in (q, k, v)]
    moved = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in kwargs.items()}
    out, aux = fn(*leaves, backend=backend, **moved)
    return out, aux, leaves


def _grads(out, aux, leaves, gen_seed=3):
    gen = torch.Generator().manual_seed(gen_seed)
    do = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    da = torch.randn(aux.shape, generator=gen, dtype=torch.float64) if aux.dim() else torch.tensor(3.7)
    total = (out.double() * do.to(out.device)).sum() + (aux.double() * da.to(aux.device)).sum()
    return torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["rows", "mean"])
def test_indexed_slice_matches_reference(backend, reduce):
    gen = torch.Generator().manual_seed(0)
    q, k, v, visual, query, mask = _case(gen)
    weight = torch.rand(query.shape, generator=gen, dtype=torch.float64) + 0.1
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_slc = naive.naive_indexed_attention(*ref_leaves, visual, query, reduce=reduce,
                                                     row_weight=weight, key_padding_mask=mask)
    ref_grads = _grads(ref_out, ref_slc, ref_leaves)
    out, slc, leaves = _run(ck.attention_with_visual_slice, backend, torch.float32, q, k, v, visual_index=visual,
                            query_index=query, reduce=reduce, row_weight=weight.float(), key_padding_mask=mask)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(slc, ref_slc) < 1e-5
    for g, ref in zip(_grads(out, slc, leaves), ref_grads):
        assert rel_err(g, ref) < 1e-5
    if reduce == "rows":
        assert slc.shape == (2, query.shape[1], visual.shape[1])
        pad = (query < 0)[:, :, None] | (visual < 0)[:, None, :]
        assert torch.all(slc.cpu()[pad] == 0)
        assert slc[0, :, :7].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_indexed_alignment_matches_reference_and_ignores_teacher_padding(backend):
    gen = torch.Generator().manual_seed(1)
    q, k, v, visual, query, mask = _case(gen)
    teacher = torch.rand(2, query.shape[1], visual.shape[1], generator=gen, dtype=torch.float64)
    pad = (query < 0)[:, :, None] | (visual < 0)[:, None, :]
    weight = torch.rand(query.shape, generator=gen, dtype=torch.float64) + 0.1
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_loss = naive.naive_indexed_attention(*ref_leaves, visual, query, teacher_slice=teacher,
                                                      row_weight=weight, key_padding_mask=mask)
    ref_grads = _grads(ref_out, ref_loss, ref_leaves)
    poisoned = teacher.masked_fill(pad, float("nan")).float()
    out, loss, leaves = _run(ck.attention_with_alignment, backend, torch.float32, q, k, v, teacher_slice=poisoned,
                             visual_index=visual, query_index=query, row_weight=weight.float(), key_padding_mask=mask)
    got, want = float(loss.detach()), float(ref_loss.detach())
    assert torch.isfinite(loss) and abs(got - want) < 1e-5 * max(1.0, abs(want))
    for g, ref in zip(_grads(out, loss, leaves), ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_index_equals_start_and_length(backend):
    gen = torch.Generator().manual_seed(2)
    q, k, v, _, _, mask = _case(gen)
    start, length = torch.tensor([3, 5]), 6
    visual = start[:, None] + torch.arange(length)
    query = torch.tensor([12, 20])[:, None] + torch.arange(9)
    _, a, _ = _run(ck.attention_with_visual_slice, backend, torch.float32, q, k, v, visual_index=visual,
                   query_index=query, key_padding_mask=mask)
    _, b, _ = _run(ck.attention_with_visual_slice, backend, torch.float32, q, k, v, visual_start=start,
                   visual_len=length, query_start=torch.tensor([12, 20]), query_len=9, key_padding_mask=mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, message", [
    (_padded([[1, 2, 40], [3]]), "visual_index: expected positions in \\[0, L=37\\)"),
    (_padded([[1, -1, 2], [3]]), "visual_index: expected padding \\(-1\\) only at the end"),
    (_padded([[1, 2, 2], [3]]), "visual_index: expected each position at most once"),
    (torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "visual_index: expected an integer"),
    (torch.tensor([1, 2]), "visual_index: expected shape \\(B=2, N\\)"),
])
def test_bad_index_is_a_value_error(bad, message):
    q, k, v, _, query, _ = _case(torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=message):
        ck.attention_with_visual_slice(q.float(), k.float(), v.float(), visual_index=bad, query_index=query,
                                       backend="torch")


def test_index_and_span_together_is_a_value_error():
    q, k, v, visual, query, _ = _case(torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="visual_index: given together with visual_start"):
        ck.attention_with_visual_slice(q.float(), k.float(), v.float(), torch.tensor([0, 0]), 3,
                                       visual_index=visual, query_index=query, backend="torch")
