"""Every GPU measurement of the kernels, in one unattended run that fits a short GPU window.

    python -m benchmarks.gpu_suite --out DIR             # on a CUDA GPU (H100/H200: about 6-9 minutes)
    python -m benchmarks.gpu_suite --dry-run --out DIR   # on the CPU: tiny shapes, the same code paths

What it does, in this order, each step under a share of one time budget (--budget-s, default 540 s) so
that the whole run ends in time; a step that fails or runs out of time is recorded as such and the run
goes on:

1. environment: device, driver, torch, Triton, CUDA and library versions, the git commit;
2. ceilings: the measured bf16 matmul rate (8192³) and device copy bandwidth;
3. correctness: the CUDA kernel tests in bf16 and fp16 (tests/kernels/test_cuda.py, both backwards,
   against the float64 reference), a subset that runs in under 2 minutes, as a pytest subprocess;
4. kernels: side by side in this one process, Qwen1.5-4B heads (20/20, d = 128), bf16, causal, 729 visual
   tokens after a 35-token prompt, the text rows after the image as query rows, L in {2048, 4096, 8192},
   batch 1; every provider of benchmarks/providers.py (ours with either backward, eager with
   materialized probabilities, SDPA-flash without alignment, SDPA + the slice from its LSE, xformers where
   installed) for the alignment, the slice export and plain attention, forward and forward + backward;
   median time (triton.testing.do_bench), TFLOP/s, peak memory;
5. train_step: the DFT training step at one length, eager against ours (benchmarks/train_step.py);
6. flex: FlexAttention with its LSE (compiled; the slowest to prepare, so it runs with the time left);
7. train_fit: the longest L whose training step fits in GPU memory, per provider, with the time left;
8. report: the Markdown tables (ratios, targets) and the plots, through benchmarks/report.py.

Everything goes into --out (at most 8 files, the limit of what a GPU lease brings back): gpu_suite.json
(pytest-benchmark's JSON layout, so `python -m benchmarks.report --json` reads it, plus the environment,
ceilings, correctness result, autotuner picks, skipped cases and errors), gpu_suite.log, RESULTS.md (the
generated report section) and plots/*.png. The JSON is rewritten after every step, so a run cut short
still leaves what it measured. benchmarks/README.md has the one command and what to do with the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import torch

from .harness import attention_info, environment, free_memory, peak_memory_mib
from .providers import OURS, PROVIDERS, attention_flops, make_step, skip_reason
from .shapes import (CPU_SMOKE, CPU_TRAIN_CASE, CPU_TRAIN_MAX_SEQ, MODELS, TRAIN_BATCH, TRAIN_MAX_SEQ_LEN,
                     TRAIN_STUDENT, TRAIN_TEACHER, Case, TrainCase)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("benchmarks", "out")
JSON_NAME, LOG_NAME, RESULTS_NAME, PLOTS_DIR = "gpu_suite.json", "gpu_suite.log", "RESULTS.md", "plots"
OPS = ("alignment", "flash", "slice_export")  # the order they run in: the headline op first
MODES = ("forward", "full")                    # do_bench has no untimed setup, which "backward" needs
FLEX_PROVIDERS = ("flex", "flex+slice")
# The correctness subset: the compiled kernels against float64 in bf16 and fp16 (fp32 is covered by the
# interpreter tests on any machine). Autotuning off: the default configurations, compiled once each.
CORRECTNESS_TESTS = ("tests/kernels/test_cuda.py", "-k", "bf16 or fp16")


@dataclass(frozen=True)
class Plan:
    """The shapes and sizes of one run: the GPU plan, or the CPU dry run's tiny twin of it."""

    device: str
    dry_run: bool
    attention: object          # shapes.AttnShape
    lens: tuple
    batch: int
    visual_tokens: int
    prompt: int
    train: TrainCase
    train_fit_cap: int
    matmul_n: int
    copy_numel: int
    warmup_ms: int = 25
    rep_ms: int = 100
    correctness_timeout_s: float = 150.0

    def cases(self):
        return [Case(self.attention, self.batch, seq_len, self.device, self.visual_tokens, self.prompt)
                for seq_len in self.lens]


def gpu_plan(lens, train_len) -> Plan:
    return Plan(device="cuda", dry_run=False, attention=MODELS["qwen1.5-4b"], lens=tuple(lens), batch=1,
                visual_tokens=729, prompt=35, train=TrainCase(TRAIN_TEACHER, TRAIN_STUDENT, TRAIN_BATCH, train_len,
                                                              "cuda"),
                train_fit_cap=TRAIN_MAX_SEQ_LEN, matmul_n=8192, copy_numel=2 ** 28)


def dry_plan() -> Plan:
    return Plan(device="cpu", dry_run=True, attention=CPU_SMOKE, lens=(64, 96), batch=1, visual_tokens=24,
                prompt=8, train=CPU_TRAIN_CASE, train_fit_cap=CPU_TRAIN_MAX_SEQ, matmul_n=256, copy_numel=2 ** 20,
                correctness_timeout_s=120.0)


class Budget:
    """Seconds left of the run's time budget."""

    def __init__(self, seconds):
        self.seconds, self.start = float(seconds), time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.start

    def left(self):
        return self.seconds - self.elapsed()


@dataclass
class Suite:
    plan: Plan
    out: str
    budget: Budget
    argv: list
    env: dict = field(default_factory=dict)
    benchmarks: list = field(default_factory=list)  # pytest-benchmark entries
    oom: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    sections: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    # -- output ---------------------------------------------------------------------------------------
    def log(self, message):
        line = f"[{self.budget.elapsed():6.1f} s] {message}"
        print(line, flush=True)
        with open(os.path.join(self.out, LOG_NAME), "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def json_path(self):
        return os.path.join(self.out, JSON_NAME)

    def write_json(self):
        data = {
            "machine_info": {"compodistill": self.env, "python_version": platform.python_version()},
            "datetime": datetime.datetime.now().isoformat(timespec="seconds"),
            "version": "gpu_suite",
            "benchmarks": self.benchmarks,
            "compodistill": {"command": " ".join(["python -m benchmarks.gpu_suite", *map(shlex.quote, self.argv)]),
                             "oom": self.oom, "skipped": self.skipped, "errors": self.errors,
                             "sections": self.sections, "dry_run": self.plan.dry_run,
                             "budget_s": self.budget.seconds, **self.extra},
        }
        tmp = self.json_path() + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)
        os.replace(tmp, self.json_path())

    def error(self, where, exc):
        self.errors.append({"where": where, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=8)[-3000:]})
        self.log(f"ERROR in {where}: {type(exc).__name__}: {str(exc)[:300]}")

    # -- steps ----------------------------------------------------------------------------------------
    def section(self, name, fn, need_s=0.0):
        """Run one step unless less than need_s seconds are left; record its status and time."""
        if self.budget.left() < need_s:
            self.sections[name] = {"status": "skipped", "reason": f"time budget: {self.budget.left():.0f} s left, "
                                                                  f"needs {need_s:.0f} s"}
            self.log(f"skip {name}: {self.sections[name]['reason']}")
            self.write_json()
            return
        self.log(f"start {name}")
        start = time.monotonic()
        status = "done"
        try:
            fn()
        except Exception as exc:  # a step that breaks must not cost the steps after it
            self.error(name, exc)
            status = "failed"
        self.sections[name] = {"status": status, "seconds": round(time.monotonic() - start, 1)}
        self.log(f"{status} {name} in {self.sections[name]['seconds']} s")
        self.write_json()


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

def median_ms(fn, plan: Plan):
    """Median time of fn() in ms: do_bench (CUDA events, L2 flushed) on a GPU, wall clock on the CPU."""
    if plan.device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=plan.warmup_ms, rep=plan.rep_ms, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _entry(name, info, ms, rounds, **extra):
    info = dict(info, median_ms=ms, **extra)
    return {"name": name, "group": f"{info['op']} {info.get('model')} L{info.get('seq_len')} {info.get('mode')}",
            "extra_info": info, "stats": {"median": ms * 1e-3, "rounds": rounds}}


# ---------------------------------------------------------------------------------------------------
# 1-2. Environment and ceilings
# ---------------------------------------------------------------------------------------------------

def _command_output(cmd):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({type(exc).__name__})"
    return done.stdout.strip() if done.returncode == 0 else f"unavailable (exit {done.returncode})"


def collect_environment(suite: Suite):
    env = environment()
    env.update(git_commit=_command_output(["git", "rev-parse", "HEAD"]),
               autotune=os.environ.get("COMPODISTILL_KERNELS_AUTOTUNE", "1"), dry_run=suite.plan.dry_run)
    if suite.plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(sm_count=props.multi_processor_count, l2_cache_mib=getattr(props, "L2_cache_size", 0) / 2**20,
                   cudnn=torch.backends.cudnn.version(),
                   nvidia_smi=_command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                               "clocks.max.sm,power.limit", "--format=csv,noheader"]))
        env["driver"] = env["nvidia_smi"].split(",")[1].strip() if env["nvidia_smi"].count(",") >= 1 else None
    suite.env = env
    suite.log("environment: " + ", ".join(f"{k}={env.get(k)}" for k in ("device_name", "driver", "torch", "triton",
                                                                        "cuda", "git_commit")))


def _time_matmul(n, dtype, plan):
    a = torch.randn(n, n, device=plan.device, dtype=dtype)
    b = torch.randn(n, n, device=plan.device, dtype=dtype)
    return median_ms(lambda: a @ b, plan)


def _time_copy(numel, dtype, plan):
    """(ms, bytes moved) of a device copy of random data (not zeros), counting bytes read and written."""
    x = torch.randn(numel, device=plan.device, dtype=dtype)
    y = torch.empty_like(x)
    return median_ms(lambda: y.copy_(x), plan), 2 * x.numel() * x.element_size()


def measure_ceilings(suite: Suite):
    plan = suite.plan
    dtype = torch.bfloat16 if plan.device == "cuda" else torch.float32  # CPU matmul in bf16 is not a ceiling
    n = plan.matmul_n
    matmul_ms = _time_matmul(n, dtype, plan)
    copy_ms, moved = _time_copy(plan.copy_numel, dtype, plan)
    free_memory()
    ceilings = {"matmul_dtype": str(dtype).replace("torch.", ""), "matmul_n": n, "matmul_ms": matmul_ms,
                "matmul_tflops": 2 * n ** 3 / (matmul_ms * 1e-3) / 1e12, "copy_bytes": moved, "copy_ms": copy_ms,
                "copy_tbps": moved / (copy_ms * 1e-3) / 1e12}
    if dtype == torch.bfloat16:
        ceilings["bf16_matmul_tflops"] = ceilings["matmul_tflops"]
    suite.extra["ceilings"] = ceilings
    suite.log(f"ceilings: {ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.1f} TFLOP/s, "
              f"copy {ceilings['copy_tbps']:.3f} TB/s")


# ---------------------------------------------------------------------------------------------------
# 3. Correctness
# ---------------------------------------------------------------------------------------------------

def parse_junit(path):
    """(counts {tests, failed, errors, skipped, passed, seconds}, [failed or erroring tests]) from a pytest
    JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = counts.pop("failures")
    counts["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            found = case.find(tag)
            if found is not None:
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                                 "message": (found.get("message") or "")[:500]})
    return counts, failures


def run_correctness(suite: Suite):
    plan = suite.plan
    timeout = max(10.0, min(plan.correctness_timeout_s, suite.budget.left() - 30))
    env = dict(os.environ, COMPODISTILL_KERNELS_AUTOTUNE="0", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORRECTNESS_TESTS,
               f"--junitxml={junit}"]
        result = {"command": " ".join(shlex.quote(c) for c in cmd[1:]).replace(junit, "JUNIT"),
                  "timeout_s": round(timeout)}
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            result["returncode"] = done.returncode
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            result["returncode"] = "timeout"
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        result["wall_s"] = round(time.monotonic() - start, 1)
        if os.path.exists(junit):
            counts, failures = parse_junit(junit)
            result.update(counts, failures=failures)
    # pytest exits 5 when nothing was collected: on a machine without CUDA the module skips itself
    result["ok"] = result.get("returncode") in (0, 5) and not result.get("failures") and "tests" in result
    suite.extra["correctness"] = result
    for line in output.strip().splitlines()[-25:]:
        suite.log(f"  pytest | {line}")
    suite.log(f"correctness: {result.get('passed', '?')} passed, {result.get('failed', '?')} failed, "
              f"{result.get('errors', '?')} errors, {result.get('skipped', '?')} "
              f"skipped, exit {result.get('returncode')} in {result['wall_s']} s")


# ---------------------------------------------------------------------------------------------------
# 4, 6. Attention kernels
# ---------------------------------------------------------------------------------------------------

def measure_attention(suite: Suite, op, provider, case, mode):
    plan = suite.plan
    info = dict(attention_info(op, case, mode), provider=provider)
    where = f"{op} {case.id} {mode} {provider}"
    reason = skip_reason(provider, case.device, mode)
    if reason:
        suite.skipped.append({**info, "reason": reason})
        return
    free_memory()
    failed = None
    try:
        step, _ = make_step(op, provider, case, mode)
        step.run_once()  # compiles and autotunes
        peak = peak_memory_mib(step.run_once, case.device)
        ms = median_ms(step.run_once, plan)
        del step
    except torch.cuda.OutOfMemoryError as exc:
        failed = ("oom", str(exc).splitlines()[0][:200])
    except Exception as exc:  # e.g. a baseline that does not support this torch or shape
        suite.error(where, exc)
        failed = ("error", None)
    if failed is not None:
        free_memory()
        if failed[0] == "oom":
            suite.oom.append({**info, "oom": True})
            suite.log(f"{where}: out of memory")
        return
    flops = attention_flops(case.batch, case.shape.heads, case.seq_len, case.shape.head_dim, mode)
    suite.benchmarks.append(_entry(f"gpu_suite[{op}-{case.id}-{mode}-{provider}]", info, ms, None,
                                   peak_mib=peak, flops=flops, tflops=flops / (ms * 1e-3) / 1e12))
    suite.log(f"{where}: {ms:.3f} ms, {flops / (ms * 1e-3) / 1e12:.1f} TFLOP/s"
              + (f", peak {peak:.1f} MiB" if peak is not None else ""))


def run_kernels(suite: Suite, flex: bool, reserve_s: float):
    """Every (op, L, mode, provider) in order, flex providers only when flex is True; stops starting new
    measurements when fewer than reserve_s seconds are left."""
    for op in OPS:
        for case in suite.plan.cases():
            for mode in MODES:
                for provider in PROVIDERS[op]:
                    if (provider in FLEX_PROVIDERS) != flex:
                        continue
                    if suite.budget.left() < reserve_s:
                        suite.skipped.append({**attention_info(op, case, mode), "provider": provider,
                                              "reason": "time budget"})
                        continue
                    measure_attention(suite, op, provider, case, mode)
    if suite.plan.device == "cuda":
        from compodistill_kernels.attention import triton_impl
        suite.extra["autotune_picks"] = [{"key": repr(key), "config": list(cfg)}
                                         for key, cfg in triton_impl._TUNED.items()]


# ---------------------------------------------------------------------------------------------------
# 5, 7. Training step
# ---------------------------------------------------------------------------------------------------

def _train_setup(plan):
    from .train_step import dft_setup
    return dft_setup(plan.train.teacher, plan.train.student, plan.device)


def _resident_mib(device):
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None


def run_train_step(suite: Suite):
    from .train_step import PROVIDERS as TRAIN_PROVIDERS
    from .train_step import make_batch, make_train_step, train_info
    plan, case = suite.plan, suite.plan.train
    setup = _train_setup(plan)
    losses = {}
    for provider in TRAIN_PROVIDERS:
        info = train_info(setup, case, provider)
        failed = False
        try:
            step = make_train_step(setup, provider, make_batch(setup, case.batch, case.seq_len))
            resident = _resident_mib(plan.device)
            losses[provider] = step()  # warm-up: compiles, autotunes
            peak = peak_memory_mib(step, plan.device)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()  # ends with a device synchronize
                times.append(time.perf_counter() - start)
            del step
        except torch.cuda.OutOfMemoryError:
            failed = True
        if failed:
            free_memory()
            suite.oom.append({**info, "oom": True})
            suite.log(f"train_step {case.id} {provider}: out of memory")
            continue
        ms = statistics.median(times) * 1e3
        extra = dict(peak_mib=peak, tokens_per_s=case.batch * case.seq_len / (ms * 1e-3))
        if peak is not None:
            extra.update(resident_mib=resident, peak_total_mib=resident + peak)
        suite.benchmarks.append(_entry(f"gpu_suite[train_step-{case.id}-{provider}]", info, ms, len(times), **extra))
        suite.log(f"train_step {case.id} {provider}: {ms:.1f} ms" + (f", peak {peak:.0f} MiB" if peak else ""))
        free_memory()
    if len(losses) == 2:  # both paths compute the same losses; bf16 on a GPU rounds them differently
        ours, eager = losses[OURS], losses["eager"]
        suite.extra["train_step_losses"] = {name: {"ours": float(ours[name]), "eager": float(eager[name])}
                                            for name in ours}


def run_train_fit(suite: Suite, reserve_s: float):
    from .train_step import PROVIDERS as TRAIN_PROVIDERS
    from .train_step import longest_fitting_length, train_info
    plan = suite.plan
    setup = _train_setup(plan)
    start_len = plan.train.seq_len
    for provider in TRAIN_PROVIDERS:
        found = longest_fitting_length(setup, provider, plan.train.batch, start_len, plan.train_fit_cap, plan.device,
                                       warmup=True, time_left=lambda: suite.budget.left() >= reserve_s)
        peaks, longest, longest_ms = found.peaks, found.longest, found.longest_ms
        first_oom, stopped = found.first_oom, found.stopped
        case = TrainCase(plan.train.teacher, plan.train.student, plan.train.batch, longest or start_len, plan.device)
        info = dict(train_info(setup, case, provider), op="train_fit", search_start=start_len,
                    search_cap=plan.train_fit_cap, first_oom_seq_len=first_oom, longest_fitting_seq_len=longest,
                    peak_mib_by_seq_len={str(k): v for k, v in peaks.items()}, stopped=stopped)
        if longest is None:
            suite.oom.append({**info, "oom": True})
        else:
            suite.benchmarks.append(_entry(f"gpu_suite[train_fit-{provider}]", info, longest_ms, 1,
                                           peak_mib=peaks[longest]))
        suite.log(f"train_fit {provider}: longest {longest}, first OOM {first_oom}" +
                  (f" (stopped: {stopped})" if stopped else ""))


# ---------------------------------------------------------------------------------------------------
# 8. Report
# ---------------------------------------------------------------------------------------------------

def write_report(suite: Suite):
    from . import report
    if not suite.benchmarks:
        raise RuntimeError("nothing was measured: no report to write")
    report.main(["--json", suite.json_path(), "--out", os.path.join(suite.out, RESULTS_NAME),
                 "--plots", os.path.join(suite.out, PLOTS_DIR)])


# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run on the CPU with tiny shapes through the same steps (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall-clock budget of the whole run in seconds (default %(default)s: 9 minutes)")
    parser.add_argument("--lens", type=int, nargs="+", default=[2048, 4096, 8192],
                        help="sequence lengths of the kernel benchmarks (GPU; default %(default)s)")
    parser.add_argument("--train-len", type=int, default=4096,
                        help="sequence length of the training-step benchmark (GPU; default %(default)s)")
    parser.add_argument("--skip", nargs="+", default=[],
                        choices=["ceilings", "correctness", "kernels", "train_step", "flex", "train_fit"],
                        help="steps to leave out")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run to check the suite on the CPU")
    plan = dry_plan() if args.dry_run else gpu_plan(args.lens, args.train_len)
    os.makedirs(args.out, exist_ok=True)
    for name in (LOG_NAME, JSON_NAME, RESULTS_NAME):  # a fresh run, not an append to an earlier one
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))
    suite = Suite(plan, args.out, Budget(args.budget_s), argv)
    suite.log(f"gpu_suite {'dry run on the CPU' if plan.dry_run else 'on ' + torch.cuda.get_device_name()}, "
              f"budget {args.budget_s:.0f} s, out {os.path.abspath(args.out)}")
    # Each step's need_s: the time it must have left to start; reserves keep room for the report.
    steps = [
        ("environment", lambda: collect_environment(suite), 0),
        ("ceilings", lambda: measure_ceilings(suite), 30),
        ("correctness", lambda: run_correctness(suite), 60),
        ("kernels", lambda: run_kernels(suite, flex=False, reserve_s=0.3 * args.budget_s), 60),
        ("train_step", lambda: run_train_step(suite), 60),
        # a FlexAttention measurement compiles its forward and backward first: up to a minute or more
        ("flex", lambda: run_kernels(suite, flex=True, reserve_s=90 if not plan.dry_run else 0), 120),
        ("train_fit", lambda: run_train_fit(suite, reserve_s=30 if not plan.dry_run else 0), 60),
        ("report", lambda: write_report(suite), 0),
    ]
    if plan.dry_run:
        steps = [(name, fn, 0) for name, fn, _ in steps]
    for name, fn, need_s in steps:
        if name in args.skip:
            suite.sections[name] = {"status": "skipped", "reason": "--skip"}
            continue
        suite.section(name, fn, need_s)
    suite.log(f"wrote {os.path.abspath(args.out)}: " + ", ".join(sorted(os.listdir(args.out))))
    failed = [name for name, s in suite.sections.items() if s["status"] == "failed"]
    correctness = suite.extra.get("correctness", {})
    if failed or (correctness and not correctness.get("ok")):
        suite.log(f"finished with problems: failed steps {failed}, correctness ok={correctness.get('ok')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
