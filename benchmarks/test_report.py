"""Tests of `python -m benchmarks.report`: on the JSON of a real CPU smoke run of the benchmarks, on a
hand-made CUDA run (targets, ceiling, OOM rows), and on bad inputs."""

import json
import os
import subprocess
import sys

import pytest

from . import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory):
    """pytest-benchmark JSON of the CPU smoke cases of two benchmark files, timed briefly."""
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_flash.py", "benchmarks/test_bench_train_step.py",
           "-q", "-k", "(cpu or tiny) and not flex", "-p", "no:cacheprovider", f"--benchmark-json={path}",
           "--benchmark-max-time=0.02", "--benchmark-min-rounds=2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return path


def test_report_of_a_cpu_smoke_run(smoke_json, tmp_path):
    out, plots = tmp_path / "RESULTS.md", tmp_path / "plots"
    assert report.main(["--json", str(smoke_json), "--out", str(out), "--plots", str(plots)]) == 0
    text = out.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "Device: CPU" in text and "torch " in text and "Triton " in text and "Python " in text
    assert "CPU smoke run" in text and "not performance figures" in text
    assert "command: `pytest " in text
    assert "| L | mode | provider | median ms | TFLOP/s |" in text
    assert "× eager" in text and "| 96 | full | **ours** |" in text
    assert "### DFT training step" in text and "### Longest L" in text
    pngs = sorted(plots.glob("*.png"))
    assert {p.name.split("_")[1] for p in pngs} >= {"flash", "train-step"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert f"](plots/{png.name})" in text


def test_report_keeps_the_rest_of_the_file(smoke_json, tmp_path):
    out = tmp_path / "RESULTS.md"
    measured = "# Benchmark results\n\n## Measured earlier\n\n| L | ms |\n|---|---|\n| 8192 | 9.41 |\n"
    out.write_text(measured)
    for _ in range(2):  # the second run replaces the marked section instead of adding one
        report.main(["--json", str(smoke_json), "--out", str(out), "--no-plots"])
    text = out.read_text()
    assert text.startswith(measured.rstrip("\n"))
    assert text.count(report.BEGIN) == 1 and text.count("## Generated benchmark report") == 1
    out.write_text(text + "\n## Notes after the report\n")
    report.main(["--json", str(smoke_json), "--out", str(out), "--no-plots"])
    assert out.read_text().rstrip().endswith("## Notes after the report")


def _bench(op, provider, mode, seq_len, ms, peak, **extra):
    info = dict(op=op, provider=provider, mode=mode, model="qwen1.5-4b", heads=20, kv_heads=20, head_dim=128,
                batch=1, seq_len=seq_len, visual_tokens=729, query_rows=seq_len - 764, dtype="bfloat16",
                device="cuda", peak_mib=peak, flops=7 * 20 * seq_len ** 2 * 128, **extra)
    return {"name": f"test[{provider}]", "extra_info": info, "stats": {"median": ms * 1e-3, "rounds": 10}}


def test_report_of_a_cuda_run_judges_the_targets(tmp_path):
    env = dict(device="cuda", device_name="NVIDIA H100 80GB HBM3", capability="9.0", device_memory_gib=79.1,
               torch="2.11.0+cu130", triton="3.6.0", cuda="13.0", python="3.12.3", transformers="5.0", xformers=None,
               driver="580.159.04")
    train = dict(teacher="qwen1.5-4b", student="qwen1.5-1.8b", teacher_layers=20, student_layers=12, vocab=151936)
    data = {
        "machine_info": {"compodistill": env}, "datetime": "2026-11-23T10:00:00", "version": "gpu_suite",
        "benchmarks": [
            _bench("alignment", "eager", "full", 8192, 72.0, 13000.0),
            _bench("alignment", "sdpa+slice", "full", 8192, 9.0, 1400.0),
            _bench("alignment", "sdpa-flash", "full", 8192, 2.4, 270.0),
            _bench("alignment", "ours", "full", 4096, 2.0, 110.0),
            _bench("alignment", "ours", "full", 8192, 4.0, 220.0),
            _bench("alignment", "ours-onepass", "full", 8192, 3.0, 230.0),
            _bench("flash", "ours", "forward", 4096, 0.9, 60.0),
            _bench("slice_export", "ours", "forward", 4096, 1.08, 70.0),
            _bench("train_step", "ours", "full", 8192, 400.0, 20000.0, resident_mib=9000.0,
                   peak_total_mib=29000.0, **train),
        ],
        "compodistill": {"command": "python -m benchmarks.gpu_suite --out out",
                         "oom": [dict(_bench("train_step", "eager", "full", 8192, 0, None, **train)["extra_info"])],
                         "ceilings": {"matmul_dtype": "bfloat16", "matmul_n": 8192, "matmul_tflops": 780.0,
                                      "bf16_matmul_tflops": 780.0, "copy_tbps": 3.1},
                         "correctness": {"command": "-m pytest tests/kernels/test_cuda.py -k 'bf16 or fp16'",
                                         "passed": 66, "failed": 0, "errors": 0, "skipped": 0, "returncode": 0,
                                         "wall_s": 101.0, "ok": True, "failures": []},
                         "skipped": [{"op": "flash", "mode": "forward", "provider": "ours-onepass",
                                      "reason": "the forward is ours'"}],
                         "sections": {"flex": {"status": "skipped", "reason": "time budget"}}},
    }
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "R.md"
    report.main(["--json", str(path), "--out", str(out), "--plots", str(tmp_path / "plots")])
    text = out.read_text()
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0" in text and "CUDA 13.0" in text
    assert "driver 580.159.04" in text
    assert "% of 780" in text and "CPU smoke" not in text  # the measured ceiling, not the table's 790
    assert "bfloat16 matmul 8192³ 780 TFLOP/s; device copy 3.1 TB/s" in text
    assert "66 passed, 0 failed, 0 errors, 0 skipped" in text and "**ok**" in text
    # ours: 2.4 / 4.0 = 0.6 of SDPA-flash (met), 9 / 4 = 2.25× SDPA + slice (met); one-pass 0.8×, 3×
    assert "ours: fused fwd+bwd with alignment ≥ 0.6× the speed of SDPA-flash" in text and "| 0.6× | met" in text
    assert "ours-onepass: fused fwd+bwd with alignment ≥ 0.6×" in text and "| 0.8× | met" in text
    assert "≥ 1.5× faster than SDPA + slice from the LSE" in text and "| 2.25× | met" in text
    assert "plain forward ≥ 400 TFLOP/s" in text and "| 334 | not met" in text
    assert "slice export forward ≤ 25% over our plain forward" in text and "+20.0% | met" in text
    assert "attention memory ≥ 50× below eager" in text and "59.1× | met" in text
    assert "attention memory linear in L" in text and "per doubling 2.00× | met" in text
    assert "eager OOM, ours fits | met" in text
    assert "| 8192 | eager | OOM |" in text
    assert "× ours" in text  # the one-pass row against the two-kernel one
    assert "step `flex`: skipped (time budget)" in text
    assert "skipped (the forward is ours'): ours-onepass flash forward" in text


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("not json {", "not JSON"),
    (json.dumps({"rows": []}), "not a pytest-benchmark JSON"),
    (json.dumps({"machine_info": {}, "benchmarks": []}), "no timed CompoDistill benchmark"),
], ids=["missing", "not-json", "not-pytest-benchmark", "no-rows"])
def test_report_rejects_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        report.load_run(str(path))
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--json", str(path), "--out", str(tmp_path / "R.md")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


def test_report_rejects_a_file_with_one_marker(smoke_json, tmp_path):
    out = tmp_path / "R.md"
    out.write_text(f"# Results\n\n{report.BEGIN}\nhalf a section\n")
    with pytest.raises(SystemExit):
        report.main(["--json", str(smoke_json), "--out", str(out), "--no-plots"])
    assert out.read_text() == f"# Results\n\n{report.BEGIN}\nhalf a section\n"
