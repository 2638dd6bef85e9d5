"""The GPU suite's dry run: every step of `python -m benchmarks.gpu_suite` on the CPU with tiny shapes, so that
the unattended GPU run cannot fail on a typo. Checks what a GPU run must bring back: the files (at most 8,
with plain names, at most two folders down), the JSON the report reads, and a row for every provider that
can run here."""

import json
import os
import re

import pytest

from . import gpu_suite, report
from .providers import PROVIDERS


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite") / "out"
    code = gpu_suite.main(["--dry-run", "--out", str(out)])
    return code, out


def test_dry_run_runs_every_step(dry_run):
    code, out = dry_run
    data = json.loads((out / gpu_suite.JSON_NAME).read_text())
    ours = data["compodistill"]
    assert code == 0, ours["errors"]
    assert ours["dry_run"] is True and not ours["errors"]
    steps = ("environment", "ceilings", "correctness", "kernels", "train_step", "flex", "train_fit", "report")
    assert {name: s["status"] for name, s in ours["sections"].items()} == {name: "done" for name in steps}
    env = data["machine_info"]["compodistill"]
    assert env["torch"] and env["triton"] and env["git_commit"]
    assert ours["ceilings"]["matmul_tflops"] > 0 and ours["ceilings"]["copy_tbps"] > 0
    # the CUDA tests skip themselves without a GPU; the subprocess, its JUnit file and its parsing ran
    assert ours["correctness"]["ok"] and ours["correctness"]["skipped"] >= 1


def test_dry_run_measures_every_provider(dry_run):
    _, out = dry_run
    data = json.loads((out / gpu_suite.JSON_NAME).read_text())
    measured = {(b["extra_info"]["op"], b["extra_info"]["provider"], b["extra_info"]["mode"], b["extra_info"]["seq_len"])
                for b in data["benchmarks"]}
    skipped = {(s["op"], s["provider"], s["mode"], s["seq_len"]) for s in data["compodistill"]["skipped"]}
    for op in gpu_suite.OPS:
        for provider in PROVIDERS[op]:
            for mode in gpu_suite.MODES:
                for seq_len in gpu_suite.dry_plan().lens:
                    key = (op, provider, mode, seq_len)
                    assert key in measured or key in skipped, f"{key}: neither measured nor skipped"
        assert (op, "ours", "full", 96) in measured and (op, "ours-onepass", "full", 96) in measured
        assert (op, "eager", "full", 96) in measured and (op, "sdpa-flash", "forward", 96) in measured
    ops = {b["extra_info"]["op"] for b in data["benchmarks"]}
    assert {"train_step", "train_fit"} <= ops
    run = report.load_run(str(out / gpu_suite.JSON_NAME))
    assert run.tool == "gpu_suite" and run.extra["ceilings"]


def test_dry_run_output_fits_what_a_gpu_lease_brings_back(dry_run):
    _, out = dry_run
    files = [os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names]
    assert len(files) <= 8, files
    for path in files:
        assert path.count(os.sep) <= 2, path
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in path.split(os.sep)), path
    assert {gpu_suite.JSON_NAME, gpu_suite.LOG_NAME, gpu_suite.RESULTS_NAME} <= set(files)
    assert any(path.startswith(gpu_suite.PLOTS_DIR + os.sep) and path.endswith(".png") for path in files)
    text = (out / gpu_suite.RESULTS_NAME).read_text()
    assert "## Generated benchmark report" in text and "CPU smoke run" in text
    assert "Measured ceilings" in text and "Correctness" in text and "ours-onepass" in text


def test_without_a_gpu_the_suite_asks_for_the_dry_run(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run")
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main(["--out", "unused"])
    assert exit_info.value.code == 2 and "--dry-run" in capsys.readouterr().err
