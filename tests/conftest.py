"""Test configuration for the kernel tests.

Without a GPU, Triton's kernels run in its CPU interpreter. TRITON_INTERPRET is read when kernels are
decorated, so it is set here, before anything imports compodistill_kernels' Triton module. On a GPU
machine it is left alone, so the real compiler runs.
"""

import os
import sys
import zlib

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

# tests/helpers.py is imported by name from the test files.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

import helpers  # noqa: E402


def pytest_report_header(config):
    if helpers.HAS_CUDA and not helpers.interpreting():
        mode = f"compiled on {torch.cuda.get_device_name()}"
    elif helpers.interpreting():
        mode = "interpreted on the CPU (TRITON_INTERPRET=1)"
    else:
        mode = "not runnable here (no CUDA, TRITON_INTERPRET unset): triton cases skip"
    return f"compodistill_kernels tests: Triton kernels {mode}; kernel tests run on {helpers.DEVICE}"


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
