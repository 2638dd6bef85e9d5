"""The `python -m compodistill.train` kernels demo: a few steps on the CPU lower the alignment loss."""

import math

from compodistill.train import main


def test_demo_loss_decreases():
    result = main(["--steps", "15", "--device", "cpu", "--backend", "torch", "--seed", "1"])
    initial, final = result["initial_loss"], result["final_loss"]
    assert math.isfinite(initial) and math.isfinite(final)
    assert all(math.isfinite(x) for x in result["losses"])
    assert final < 0.5 * initial, (initial, final)


def test_demo_is_deterministic():
    args = ["--steps", "3", "--device", "cpu", "--backend", "torch", "--seed", "7"]
    assert main(args)["losses"] == main(args)["losses"]
