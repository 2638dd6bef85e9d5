"""Shared pieces of the kernel tests: the tolerance table, error measures, input builders and the
reference-versus-kernel recipe.

The recipe, for one function and one case:
1. draw q, k, v (and the slice arguments) and round them to the test dtype;
2. run the float64 reference (compodistill_kernels.attention.naive) on those *rounded* inputs upcast
   to float64, backward with shared random upstream gradients (do, dlse, dslc, and 3.7 for a loss);
3. run the kernel from fresh leaves of the test dtype with the same upstream gradients;
4. compare every output and dq, dk, dv by named relative errors ‖x − ref‖ / ‖ref‖, failing on any NaN.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

import compodistill_kernels as ck
from compodistill_kernels.attention import naive

from ..common import (DEVICE, DTYPE_NAMES, HAS_CUDA, TRITON_SKIP_REASON, assert_finite,  # noqa: F401 (re-exported)
                      assert_no_nan, interpreting, rel_err, triton_runnable)

# ---------------------------------------------------------------------------------------------------
# Tolerances: one table. Relative errors ‖x − ref‖ / ‖ref‖ against the float64 reference computed from
# the same inputs already rounded to the test dtype, so the table measures the kernel's arithmetic only.
#   float64 (torch path only): exact up to summation order.
#   float32: IEEE fp32 on the CPU (torch, and Triton's interpreter, which runs numpy). The kernels use
#            input_precision="ieee" for fp32, not TF32; on CUDA ex2.approx and L ~ 1000 sums cost a
#            little more ("float32-cuda").
#   float16 / bfloat16: P and dS are rounded to the input dtype before the second matmuls, and out and
#            the grads are stored in it (fp16 10-bit, bf16 7-bit mantissa). bf16 Triton runs only on
#            CUDA (the interpreter has no bf16); the torch path runs it anywhere.
#   lse, slc and loss are formed in fp32 from fp32 scores of the rounded inputs, whatever the dtype.
# Measured worst cases, for scale (test_attention.py under the interpreter / test_cuda.py on an H100):
#   fp32 all ~4e-7 / out 2e-6, grads 8e-6, slc 4e-6;  fp16 out 3e-4, grads 4e-4 / 9e-4, lse, slc,
#   loss < 5e-6;  bf16 (H100) out 2e-3, grads 6e-3, lse, slc, loss < 5e-6.
# ---------------------------------------------------------------------------------------------------
TOLERANCES = {
    #                  out     lse     slc     loss    grad (dq, dk, dv)
    "float64":       (1e-10, 1e-10, 1e-10, 1e-10, 1e-10),
    "float32":       (1e-5, 1e-5, 1e-5, 1e-5, 1e-5),
    "float32-cuda":  (5e-5, 1e-5, 5e-5, 5e-5, 1e-4),
    "float16":       (5e-3, 1e-4, 1e-4, 1e-4, 1e-2),
    "bfloat16":      (2e-2, 1e-4, 1e-4, 1e-4, 3e-2),
}
_TOL_FIELDS = ("out", "lse", "slc", "loss", "grad")


def tolerance(dtype: torch.dtype, device="cpu", backend="torch") -> dict:
    """Per-quantity tolerances for results computed in `dtype` on `device` by `backend`."""
    name = str(dtype).replace("torch.", "")
    if name == "float32" and torch.device(device).type == "cuda":
        name = "float32-cuda"
    return dict(zip(_TOL_FIELDS, TOLERANCES[name]))


# ---------------------------------------------------------------------------------------------------
# Error measures and assertions
# ---------------------------------------------------------------------------------------------------
def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float, allow_neg_inf: bool = False) -> None:
    """Named relative-error check: no NaN (nor inf, unless allowed and matching ref), rel_err <= tol."""
    assert_finite(name, x, allow_neg_inf=allow_neg_inf)
    err = rel_err(x, ref, name)
    if not err <= tol:
        finite = torch.isfinite(ref)
        xd, rd = x.detach().double(), ref.detach().double().to(x.device)
        max_abs = (xd - rd)[finite.to(x.device)].abs().max().item() if finite.any() else float("nan")
        raise AssertionError(f"{name}: relative error {err:.3e} > tolerance {tol:.1e} "
                             f"(max abs diff {max_abs:.3e}, ref norm {rd[finite.to(x.device)].norm().item():.3e}, "
                             f"dtype {x.dtype})")


@contextlib.contextmanager
def poisoned_empty():
    """Within the block, torch.empty / torch.empty_like return NaN-filled floating tensors and
    max-filled integer tensors, so an output or scratch buffer that a kernel leaves partly unwritten,
    or reads before writing, shows up as NaN or a wrong value instead of passing by luck."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.requires_grad:  # a leaf made by library code (e.g. checkpoint's dummy), not an output buffer
            return t
        with torch.no_grad():
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype != torch.bool and not t.is_complex():
                t.fill_(torch.iinfo(t.dtype).max)
        return t

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


# ---------------------------------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One attention problem. Per-sample tuples (pad, vs, qs) have one entry per sample.

    pad: left-padding length per sample (key_padding_mask False on [0, pad)); None = no mask.
    vs/vl: visual_start per sample and visual_len; qs/ql: query_start per sample and query_len.
    weight: row_weight None, "random" (with one zero entry), "zeros", or "zero_first" (sample 0 all 0).
    teacher: "random" or "zero_rows" (every other teacher row is all zero).
    """

    B: int
    Hq: int
    Hkv: int
    L: int
    D: int
    causal: bool = True
    pad: Optional[Tuple[int, ...]] = None
    scale: Optional[float] = None
    vs: Tuple[int, ...] = (0,)
    vl: int = 1
    qs: Tuple[int, ...] = (0,)
    ql: int = 1
    weight: Optional[str] = None
    teacher: str = "random"
    q_mult: float = 1.0
    eps: float = 1e-8

    @property
    def id(self) -> str:
        def seq(t):
            return ",".join(str(i) for i in t)
        parts = [f"B{self.B}Hq{self.Hq}Hkv{self.Hkv}-L{self.L}-D{self.D}", "causal" if self.causal else "full"]
        if self.pad is not None:
            parts.append(f"pad{seq(self.pad)}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.q_mult != 1.0:
            parts.append(f"qx{self.q_mult:g}")
        return "-".join(parts)

    @property
    def slice_id(self) -> str:
        def seq(t):
            return ",".join(str(i) for i in t)
        parts = [self.id, f"vis{seq(self.vs)}+{self.vl}", f"rows{seq(self.qs)}+{self.ql}"]
        if self.weight is not None:
            parts.append(f"w-{self.weight}")
        if self.teacher != "random":
            parts.append(f"teacher-{self.teacher}")
        if self.eps != 1e-8:
            parts.append(f"eps{self.eps:g}")
        return "-".join(parts)


@dataclass
class Inputs:
    q: torch.Tensor  # test dtype, device, no grad
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    visual_start: torch.Tensor
    query_start: torch.Tensor
    row_weight: Optional[torch.Tensor]
    teacher: torch.Tensor
    do: torch.Tensor  # upstream gradients, float32 (values representable in the test dtype)
    dlse: torch.Tensor
    dslc_rows: torch.Tensor
    dslc_mean: torch.Tensor


LOSS_GRAD = 3.7  # upstream gradient of the loss (not 1, so a missing factor shows)


def rows_with_key(mask: Optional[torch.Tensor], causal: bool, B: int, L: int) -> torch.Tensor:
    """(B, L) bool: query row i of sample b has at least one allowed key."""
    allowed = torch.ones(B, L, dtype=torch.bool) if mask is None else mask.cpu()
    if causal:
        return torch.cumsum(allowed.int(), dim=1) > 0
    return allowed.any(dim=1, keepdim=True).expand(B, L)


def make_inputs(case: Case, dtype: torch.dtype, device, gen: torch.Generator) -> Inputs:
    """Fresh random inputs for `case`, drawn on the CPU from `gen` (same values on any device)."""
    B, Hq, Hkv, L, D = case.B, case.Hq, case.Hkv, case.L, case.D

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    def rounded(x):  # values exactly representable in the test dtype
        return x.to(dtype).to(torch.float32)

    q = (randn(B, Hq, L, D) * case.q_mult).to(dtype).to(device)
    k = randn(B, Hkv, L, D).to(dtype).to(device)
    v = randn(B, Hkv, L, D).to(dtype).to(device)
    mask = None
    if case.pad is not None:
        mask = (torch.arange(L)[None, :] >= torch.tensor(case.pad)[:, None]).to(device)
    vs = torch.tensor(_per_sample(case.vs, B), dtype=torch.int64, device=device)
    qs = torch.tensor(_per_sample(case.qs, B), dtype=torch.int64, device=device)

    row_weight = None
    if case.weight is not None:
        w = torch.rand(B, case.ql, generator=gen) * 2
        if case.weight == "random":
            w[0, 0] = 0.0
        elif case.weight == "zeros":
            w.zero_()
        elif case.weight == "zero_first":
            w[0] = 0.0
        else:
            raise ValueError(case.weight)
        row_weight = w.to(device)
    teacher = torch.rand(B, case.ql, case.vl, generator=gen)
    if case.teacher == "zero_rows":
        teacher[:, ::2] = 0.0
    has_key = rows_with_key(mask, case.causal, B, L)
    return Inputs(
        q=q, k=k, v=v, mask=mask, visual_start=vs, query_start=qs, row_weight=row_weight,
        teacher=teacher.to(device),
        do=rounded(randn(B, Hq, L, D)).to(device),
        # no upstream gradient into a −inf lse (a row without any allowed key)
        dlse=(randn(B, Hq, L) * has_key[:, None, :]).to(device),
        dslc_rows=randn(B, case.ql, case.vl).to(device),
        dslc_mean=randn(B, case.vl).to(device),
    )


def _per_sample(t, B):
    t = tuple(t)
    if len(t) == 1:
        return t * B
    assert len(t) == B, f"per-sample tuple {t} needs {B} entries"
    return t


# ---------------------------------------------------------------------------------------------------
# Running the functions
# ---------------------------------------------------------------------------------------------------
KINDS = ("flash", "slice_rows", "slice_mean", "align")
OUTPUT_NAMES = {"flash": ("out", "lse"), "slice_rows": ("out", "slc"), "slice_mean": ("out", "slc"),
                "align": ("out", "loss")}


def call(kind: str, case: Case, inp: Inputs, q, k, v, backend: Optional[str], deterministic: Optional[bool] = None):
    """Run `kind` on (q, k, v); backend None runs the float64 naive reference on float64 copies of the
    other inputs. deterministic None leaves the functions' default backward."""
    ref = backend is None
    mask = inp.mask
    common = dict(causal=case.causal, softmax_scale=case.scale, key_padding_mask=mask)
    if not ref:
        common["backend"] = backend
        if deterministic is not None:
            common["deterministic"] = deterministic
    row_weight = inp.row_weight
    teacher = inp.teacher
    if ref:
        row_weight = None if row_weight is None else row_weight.double()
        teacher = teacher.double()
    slice_args = (inp.visual_start, case.vl, inp.query_start, case.ql)
    if kind == "flash":
        fn = naive.naive_flash_attention if ref else ck.flash_attention
        return fn(q, k, v, **common)
    if kind in ("slice_rows", "slice_mean"):
        fn = naive.naive_attention_with_visual_slice if ref else ck.attention_with_visual_slice
        return fn(q, k, v, *slice_args, reduce=kind[len("slice_"):], row_weight=row_weight, **common)
    if kind == "align":
        fn = naive.naive_attention_with_alignment if ref else ck.attention_with_alignment
        return fn(q, k, v, teacher, *slice_args, row_weight=row_weight, eps=case.eps, **common)
    raise ValueError(kind)


def upstream(kind: str, inp: Inputs):
    second = {"flash": inp.dlse, "slice_rows": inp.dslc_rows, "slice_mean": inp.dslc_mean,
              "align": torch.tensor(LOSS_GRAD)}[kind]
    return inp.do, second


def forward_backward(kind: str, case: Case, inp: Inputs, backend: Optional[str], dtype=None,
                     deterministic: Optional[bool] = None):
    """Forward and backward on fresh leaves; returns ({name: output}, {dq, dk, dv}). Kernel runs (backend
    not None) allocate under poisoned_empty()."""
    dtype = torch.float64 if backend is None else dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (inp.q, inp.k, inp.v)]
    grads = [g.to(device=inp.q.device) for g in upstream(kind, inp)]
    with poisoned_empty() if backend is not None else contextlib.nullcontext():
        outs = call(kind, case, inp, *leaves, backend, deterministic)
        torch.autograd.backward(list(outs), [g.to(dtype=o.dtype) for o, g in zip(outs, grads)])
    for name, leaf in zip("qkv", leaves):
        assert leaf.grad is not None, f"d{name}: no gradient reached {name}"
    named = dict(zip(OUTPUT_NAMES[kind], (o.detach() for o in outs)))
    return named, {f"d{n}": leaf.grad.detach().clone() for n, leaf in zip("qkv", leaves)}


def check_contract(kind: str, case: Case, outs: dict, dtype: torch.dtype) -> None:
    """Output shapes and dtypes as in the kernel contract (docs/kernels.md)."""
    B, Hq, L, D = case.B, case.Hq, case.L, case.D
    out = outs["out"]
    assert tuple(out.shape) == (B, Hq, L, D), f"out: shape {tuple(out.shape)}"
    assert out.dtype == dtype, f"out: dtype {out.dtype}, expected {dtype}"
    expected = {"flash": ("lse", (B, Hq, L)), "slice_rows": ("slc", (B, case.ql, case.vl)),
                "slice_mean": ("slc", (B, case.vl)), "align": ("loss", ())}[kind]
    name, shape = expected
    t = outs[name]
    assert tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)}, expected {shape}"
    assert t.dtype == torch.float32, f"{name}: dtype {t.dtype}, expected torch.float32"


def check_against_reference(kind: str, case: Case, backend: str, dtype: torch.dtype, device, gen,
                            tol: Optional[dict] = None, deterministic: Optional[bool] = None):
    """The full recipe for one case; returns (kernel outputs, kernel grads, ref outputs, ref grads).
    deterministic picks the Triton backward (None: the functions' default)."""
    inp = make_inputs(case, dtype, device, gen)
    ref_outs, ref_grads = forward_backward(kind, case, inp, None)
    outs, grads = forward_backward(kind, case, inp, backend, dtype, deterministic)
    check_contract(kind, case, outs, dtype)
    tol = tol or tolerance(dtype, device, backend)
    for name, ref in ref_outs.items():
        assert_close(name, outs[name], ref, tol[name], allow_neg_inf=(name == "lse"))
    for name, ref in ref_grads.items():
        assert_close(name, grads[name], ref, tol["grad"])
    return outs, grads, ref_outs, ref_grads
