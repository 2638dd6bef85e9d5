"""Test configuration shared by tests/kernels and tests/library.

Without a GPU, Triton's kernels run in its CPU interpreter. TRITON_INTERPRET is read when kernels are
decorated, so it is set here, before anything imports compodistill_kernels' Triton module. On a GPU
machine it is left alone, so the real compiler runs.
"""

import os
import zlib

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from .common import DEVICE, HAS_CUDA, interpreting  # noqa: E402


def pytest_report_header(config):
    if HAS_CUDA and not interpreting():
        mode = f"compiled on {torch.cuda.get_device_name()}"
    elif interpreting():
        mode = "interpreted on the CPU (TRITON_INTERPRET=1)"
    else:
        mode = "not runnable here (no CUDA, TRITON_INTERPRET unset): triton cases skip"
    return f"compodistill_kernels tests: Triton kernels {mode}; kernel tests run on {DEVICE}"


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the test's id: fresh inputs per test, reproducible per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """The procedural benchmark at size "tiny" (seed 0, with the compositional split), generated once per
    test session: (folder, summary). Read it, never write into it."""
    from compodistill.data.synth import generate

    out = tmp_path_factory.mktemp("tiny-benchmark") / "synth"
    summary = generate(str(out), seed=0, size="tiny", compositional=True)
    return out, summary
