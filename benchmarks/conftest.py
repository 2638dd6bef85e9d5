"""pytest configuration of the benchmarks: registry filters, the device and versions in the JSON's
machine_info, the OOM list and the command in the JSON.

    pytest benchmarks/                                   # every case this machine can run
    pytest benchmarks/ --benchmark-disable -q            # smoke: each case once, no timing (CI)
    pytest benchmarks/ --bench-models qwen1.5-4b --bench-lens 4096,8192 --benchmark-json out.json
    python -m benchmarks.report --json out.json --out benchmarks/RESULTS.md --plots benchmarks/plots

Without a CUDA GPU the CUDA cases skip ("needs a CUDA GPU") and their CPU twins run the PyTorch path
on the CPU smoke shape.
"""

import os

import pytest
import torch

from .harness import HAS_CUDA, OOM_CASES, environment
from .shapes import TRAIN_LAYERS, case_by_id

if not HAS_CUDA and "OMP_NUM_THREADS" not in os.environ:
    # The CPU smoke shapes take microseconds of work per op: with several threads, OpenMP's spin-waits
    # and (on a shared machine) waits for a free core cost ~100x the work itself.
    torch.set_num_threads(1)

FILTERS = {
    "bench_models": ("--bench-models", str, "model names (shapes.MODELS, or train-step teacher/student)"),
    "bench_lens": ("--bench-lens", int, "sequence lengths"),
    "bench_batches": ("--bench-batches", int, "batch sizes"),
    "bench_providers": ("--bench-providers", str, "providers (e.g. ours,eager,sdpa-flash)"),
}


def pytest_addoption(parser):
    group = parser.getgroup("compodistill benchmarks", "filters on the CUDA cases of the shape registry")
    for dest, (flag, _, what) in FILTERS.items():
        group.addoption(flag, dest=dest, default=None, metavar="A,B,...",
                        help=f"comma-separated {what}; only matching CUDA cases run (CPU smoke cases always run)")
    group.addoption("--bench-train-layers", dest="bench_train_layers", default=None, metavar="TEACHER,STUDENT",
                    help="layers of the training-step models on CUDA (default: shapes.TRAIN_LAYERS, half depth; "
                         "40,24 is the full Qwen1.5-4B / 1.8B depth)")


@pytest.fixture(scope="session")
def train_layers(request):
    """(teacher layers, student layers) of the training-step models on CUDA."""
    raw = request.config.getoption("bench_train_layers")
    if not raw:
        return TRAIN_LAYERS["teacher"], TRAIN_LAYERS["student"]
    try:
        teacher, student = (int(x) for x in raw.split(","))
    except ValueError:
        teacher = student = 0
    if teacher < 1 or student < 1:
        raise pytest.UsageError(f"--bench-train-layers: expected two positive ints TEACHER,STUDENT, got {raw!r}")
    return teacher, student


def _wanted(config):
    wanted = {}
    for dest, (flag, kind, _) in FILTERS.items():
        raw = config.getoption(dest)
        if raw:
            try:
                wanted[dest] = {kind(x.strip()) for x in raw.split(",") if x.strip()}
            except ValueError:
                raise pytest.UsageError(f"{flag}: expected comma-separated {kind.__name__} values, "
                                        f"got {raw!r}") from None
    return wanted


def _matches(params, wanted):
    case = params.get("case")
    if isinstance(case, str):
        case = case_by_id(case)
    if getattr(case, "device", params.get("device")) != "cuda":
        return True
    checks = {"bench_providers": {params.get("provider")}}
    if case is not None:
        names = {getattr(getattr(case, "shape", None), "name", None), getattr(case, "teacher", None),
                 getattr(case, "student", None)} - {None}
        checks.update(bench_models=names, bench_lens={case.seq_len}, bench_batches={case.batch})
    return all(checks[dest] & values for dest, values in wanted.items() if dest in checks)


def pytest_collection_modifyitems(config, items):
    wanted = _wanted(config)
    if not wanted:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (keep if _matches(params, wanted) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    if HAS_CUDA:
        return f"compodistill benchmarks: CUDA cases run on {torch.cuda.get_device_name()}"
    return ("compodistill benchmarks: no CUDA GPU, CUDA cases skip; the CPU smoke shapes run the PyTorch path "
            "(CPU timings are smoke checks, not performance figures)")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["compodistill"] = environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["compodistill"] = {
        "oom": list(OOM_CASES),
        "command": " ".join(["pytest", *config.invocation_params.args]),
    }
