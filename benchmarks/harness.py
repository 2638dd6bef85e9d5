"""Measurement shared by the benchmark files.

Every benchmark records in `benchmark.extra_info`: what ran (op, provider, mode, shape, dtype, device),
median_ms (median of pytest-benchmark's rounds), tflops (the FLOPs of docs/kernels.md / median), peak_mib
(`torch.cuda.max_memory_allocated` after a reset, minus the memory allocated before the step: the inputs
and the models are not counted; in backward mode the untimed forward before it is included), and for
every baseline measured earlier in the session on the same problem the ratios x_<baseline> = baseline
time / this time and mem_x_<baseline> = baseline peak / this peak. `python -m benchmarks.report`
recomputes all ratios from the JSON, whatever the test order was.

A CUDA step synchronizes at its end, so a round's wall time covers the kernels it launched. A case that
runs out of GPU memory is skipped, and recorded in the JSON's "compodistill" → "oom" list.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import time

import pytest
import torch

from .providers import MODES, PROVIDERS, attention_flops, make_step, skip_reason
from .shapes import attention_cases, case_by_id

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = "needs a CUDA GPU"
MAX_ROUNDS = 10_000

# (op, problem id, dtype, mode) -> {provider: {"median_ms": ..., "peak_mib": ...}}, for the ratios.
SESSION_RESULTS: dict = {}
# Cases that ran out of GPU memory, written into the JSON by conftest.
OOM_CASES: list = []


def environment() -> dict:
    """Device and versions, stored in the JSON's machine_info for the report."""
    import transformers
    import triton

    try:
        import xformers
        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = None
    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "xformers": xformers_version,
           "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "date": datetime.date.today().isoformat()}
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        env.update(device="cuda", device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    else:
        env.update(device="cpu", device_name=platform.processor() or platform.machine())
    return env


def attention_params(op):
    """pytest params (case, mode, provider) for `op`: per case and mode, baselines first and ours last.
    CUDA cases skip without a GPU; providers skip where they cannot run."""
    params = []
    for case in attention_cases():
        for mode in MODES:
            for provider in PROVIDERS[op]:
                reason = NEEDS_CUDA if case.device == "cuda" and not HAS_CUDA else \
                    skip_reason(provider, case.device, mode)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                params.append(pytest.param(case.id, mode, provider, id=f"{case.id}-{mode}-{provider}", marks=marks))
    return params


def _option(config, name, default):
    try:
        value = config.getoption(name)
    except ValueError:
        return default
    return default if value is None else value


def free_memory():
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


def peak_memory_mib(run, device):
    """Peak allocated during run() above what was allocated before it, in MiB (None off CUDA)."""
    if device != "cuda":
        run()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def timed(benchmark, config, step, device, *, min_rounds=None):
    """Warm up, measure the peak memory of one step, then time it with pytest-benchmark.

    Returns (median_ms or None when benchmarks are disabled, peak_mib or None, the last step's result).
    The round count follows pytest-benchmark's options: about --benchmark-max-time seconds, at least
    --benchmark-min-rounds rounds.
    """
    if benchmark.disabled:
        return None, None, benchmark.pedantic(step.target, setup=step.setup)
    step.run_once()  # compiles, autotunes, fills caches
    start = time.perf_counter()
    peak = peak_memory_mib(step.run_once, device)
    elapsed = time.perf_counter() - start
    max_time = float(_option(config, "benchmark_max_time", 1.0))
    min_rounds = min_rounds or int(_option(config, "benchmark_min_rounds", 5))
    rounds = max(min_rounds, min(MAX_ROUNDS, math.ceil(max_time / max(elapsed, 1e-9))))
    result = benchmark.pedantic(step.target, setup=step.setup, rounds=rounds,
                                warmup_rounds=min(rounds, 3 if device == "cuda" else 1), iterations=1)
    return benchmark.stats.stats.median * 1e3, peak, result


def record(benchmark, key, provider, info, median_ms, peak_mib, flops=None):
    """Fill extra_info with the measurement and the ratios to the baselines measured so far."""
    extra = benchmark.extra_info
    extra.update(info)
    extra.update(provider=provider, median_ms=median_ms, peak_mib=peak_mib)
    if flops is not None:
        extra["flops"] = flops
        extra["tflops"] = flops / (median_ms * 1e-3) / 1e12 if median_ms else None
    if median_ms is None:
        return
    seen = SESSION_RESULTS.setdefault(key, {})
    for baseline, other in seen.items():
        if baseline == provider:
            continue
        extra[f"x_{baseline}"] = other["median_ms"] / median_ms
        if other["peak_mib"] and peak_mib:
            extra[f"mem_x_{baseline}"] = other["peak_mib"] / peak_mib
    seen[provider] = {"median_ms": median_ms, "peak_mib": peak_mib}


def out_of_memory(info, provider, message):
    """Free the memory, record an OOM case for the JSON and skip the test. Call it outside the except
    block: the exception's traceback holds the step's tensors."""
    free_memory()
    OOM_CASES.append({**info, "provider": provider, "oom": True})
    pytest.skip(f"out of GPU memory: {message.splitlines()[0][:200] if message else ''}")


def assert_finite(result):
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            assert torch.isfinite(t).all(), "non-finite values in a benchmark result"


def attention_info(op, case, mode):
    """What ran, as recorded beside every attention measurement (pytest benchmarks and gpu_suite alike)."""
    shape = case.shape
    vs, nv, qs, lq = case.layout()
    return dict(op=op, mode=mode, model=shape.name, heads=shape.heads, kv_heads=shape.kv_heads,
                head_dim=shape.head_dim, batch=case.batch, seq_len=case.seq_len, visual_tokens=nv,
                query_rows=lq, dtype=str(case.dtype).replace("torch.", ""), device=case.device)


def run_attention_case(benchmark, request, op, case_id, mode, provider):
    """Time `provider` on `op` for one case and mode, and record the numbers in extra_info."""
    case = case_by_id(case_id)
    shape = case.shape
    info = attention_info(op, case, mode)
    benchmark.group = f"{op} {case.id} {info['dtype']} {mode}"
    flops = attention_flops(case.batch, shape.heads, case.seq_len, shape.head_dim, mode)
    free_memory()
    oom = None
    try:
        step, _ = make_step(op, provider, case, mode)
        median_ms, peak, result = timed(benchmark, request.config, step, case.device)
        assert_finite(result)
        del step, result
    except torch.cuda.OutOfMemoryError as error:
        oom = str(error)
    if oom is not None:
        out_of_memory(info, provider, oom)
    record(benchmark, (op, case.id, info["dtype"], mode), provider, info, median_ms, peak, flops)
