"""What the kernel tests and the library tests share: where Triton can run, the (backend, dtype) grid,
and the one relative-error measure with its NaN/inf checks."""

from __future__ import annotations

import os

import pytest
import torch

from compodistill_kernels.attention.validate import interpreting, triton_available

#: The repository root: the working directory for tests that run the CLIs as a user would.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAS_CUDA = torch.cuda.is_available()

# Where the kernel tests run: compiled kernels on a GPU, else Triton's interpreter on CPU tensors.
DEVICE = "cuda" if HAS_CUDA and not interpreting() else "cpu"

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

TRITON_SKIP_REASON = ("backend='triton' needs the triton package and either a CUDA GPU or TRITON_INTERPRET=1 "
                      "(tests/conftest.py sets it when there is no GPU)")


def triton_runnable() -> bool:
    """backend="triton" can run here: compiled on a CUDA GPU, or interpreted on CPU tensors."""
    return triton_available() and (interpreting() or HAS_CUDA)


def backend_dtypes(*, torch_bf16: bool = True):
    """pytest params (backend, dtype) for the kernel tests. The interpreter has no bf16 (a bf16 tl.dot
    multiplies raw bit patterns), so Triton bf16 runs only where the kernels are compiled."""
    pairs = [("torch", torch.float32), ("torch", torch.float16)]
    if torch_bf16:
        pairs.append(("torch", torch.bfloat16))
    pairs += [("triton", torch.float32), ("triton", torch.float16)]
    if HAS_CUDA and not interpreting():
        pairs.append(("triton", torch.bfloat16))
    marks = {"triton": pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)}
    return [pytest.param(b, d, id=f"{b}-{DTYPE_NAMES[d]}", marks=marks.get(b, ())) for b, d in pairs]


def assert_no_nan(name: str, x: torch.Tensor) -> None:
    """Fail, naming the tensor, if x holds any NaN."""
    bad = torch.isnan(x)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} NaN of {x.numel()} entries (first at index {first})")


def assert_finite(name: str, x: torch.Tensor, allow_neg_inf: bool = False) -> None:
    """Fail on NaN, on +inf, and on -inf unless allow_neg_inf (lse of a row with no allowed key)."""
    assert_no_nan(name, x)
    bad = torch.isposinf(x) if allow_neg_inf else torch.isinf(x)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} infinite entries (first at index {first})")


def rel_err(x: torch.Tensor, ref: torch.Tensor, name: str = "tensor") -> float:
    """‖x − ref‖ / ‖ref‖ in float64, over the entries where ref is finite.

    Infinite entries (the −inf lse of rows without an allowed key) must sit at the same positions with
    the same sign in x and ref, else AssertionError. When ‖ref‖ = 0 the absolute error ‖x‖ is returned.
    """
    if tuple(x.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(device=x.device, dtype=torch.float64)
    x_inf, ref_inf = torch.isinf(x), torch.isinf(ref)
    if x_inf.any() or ref_inf.any():
        mismatch = (x_inf != ref_inf) | (ref_inf & (x != ref))
        if mismatch.any():
            first = tuple(int(i) for i in mismatch.nonzero()[0])
            raise AssertionError(f"{name}: infinite entries differ from the reference at {int(mismatch.sum())} "
                                 f"positions (first at {first}: got {x[first].item()}, "
                                 f"expected {ref[first].item()})")
        x, ref = x[~ref_inf], ref[~ref_inf]
    diff = torch.linalg.vector_norm(x - ref).item()
    norm = torch.linalg.vector_norm(ref).item()
    return diff / norm if norm > 0 else diff
