"""Benchmark: the library's training step on the miniature's tiny models against a plain PyTorch loop
(tiny_step.py), SFT and CompoDistill students, batch 64 of dense captions over cached vision features,
on the CPU.

The target (not asserted; reported in extra_info and by the report script): the library's time per step
within 2x of the plain loop's. The first step's losses of the two must agree, which is asserted. With
--benchmark-disable (CI's smoke) the stage runs 2 steps at batch 8; otherwise 10 steps at batch 64.
"""
import pytest
import torch

from .tiny_step import VARIANTS, PlainLoop, library_first_losses, tiny_setup, time_library

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _sizes(benchmark):
    return (8, 2) if benchmark.disabled else (64, 10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_step_against_plain_pytorch(benchmark, tmp_path, variant):
    batch, steps = _sizes(benchmark)
    setup = tiny_setup(str(tmp_path), variant, batch=batch, steps=steps)
    plain = PlainLoop(setup)

    # Same initial weights, same batch: the same losses (only the attention implementation differs).
    want = library_first_losses(setup)
    with torch.no_grad():
        got = {k: float(v) for k, v in plain.losses(setup.batches[0]).items()}
    assert set(got) == set(want), (got, want)
    for name, value in want.items():
        assert abs(got[name] - value) <= 1e-4 * max(1.0, abs(value)), (name, got, want)

    plain.train(setup.batches[:1])  # warm-up (allocator, first-call overheads) on a copy's optimizer
    plain = PlainLoop(setup)
    plain_seconds = plain.train(setup.batches)
    library_seconds = benchmark.pedantic(time_library, args=(setup,), rounds=1, iterations=1)
    benchmark.extra_info.update(
        variant=variant, batch=batch, steps=steps, threads=torch.get_num_threads(),
        plain_ms_per_step=1e3 * plain_seconds / steps, library_ms_per_step=1e3 * library_seconds / steps,
        ratio_library_to_plain=library_seconds / plain_seconds, target_ratio=2.0)
    print(f"\n[tiny step] {variant}: library {1e3 * library_seconds / steps:.0f} ms/step, plain PyTorch "
          f"{1e3 * plain_seconds / steps:.0f} ms/step, ratio {library_seconds / plain_seconds:.2f} (target <= 2)")
