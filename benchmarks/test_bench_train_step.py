"""Benchmark: one DFT training step end to end, our attention against eager `output_attentions`.

The step (see train_step.py): teacher forward with slice export, student forward with lm + kd + vat,
student backward. Models on CUDA: Qwen1.5-4B-shaped teacher and Qwen1.5-1.8B-shaped student (real
hidden sizes, heads, MLP and vocabulary), truncated in depth, 729 visual tokens, batch 1, bf16; on the
CPU the tiny presets. Recorded: step time, peak memory above the resident models (peak_mib) and in total
(peak_total_mib), the ratios to eager, and, in test_longest_fitting_length, the longest L (doubling from
1024 up to Qwen1.5's 32768) whose step fits in GPU memory.
"""

import pytest
import torch

from .harness import (HAS_CUDA, NEEDS_CUDA, assert_finite, out_of_memory, record,
                      timed)
from .providers import Step
from .shapes import (CPU_TRAIN_CASE, CPU_TRAIN_MAX_SEQ, SEQ_LENS, TRAIN_BATCH, TRAIN_MAX_SEQ_LEN, TRAIN_STUDENT,
                     TRAIN_TEACHER, TrainCase, case_by_id, train_cases)
from .train_step import PROVIDERS, dft_setup, longest_fitting_length, make_batch, make_train_step, train_info

# Losses of each provider per CPU case: both paths compute the same losses, which the smoke run checks.
_CPU_LOSSES = {}


def _skip_without_cuda(device):
    return [pytest.mark.skip(reason=NEEDS_CUDA)] if device == "cuda" and not HAS_CUDA else []


STEP_PARAMS = [pytest.param(case.id, provider, id=f"{case.id}-{provider}", marks=_skip_without_cuda(case.device))
               for case in train_cases() for provider in PROVIDERS]
FIT_PARAMS = [pytest.param(device, provider, id=f"{device}-{provider}", marks=_skip_without_cuda(device))
              for device in ("cpu", "cuda") for provider in PROVIDERS]


def _setup(case: TrainCase, layers):
    if case.device == "cpu":
        return dft_setup(case.teacher, case.student, "cpu")
    return dft_setup(case.teacher, case.student, "cuda", *layers)


def _resident_mib(device):
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None


@pytest.mark.parametrize("case, provider", STEP_PARAMS)
def test_train_step(benchmark, request, train_layers, case, provider):
    case = case_by_id(case)
    setup = _setup(case, train_layers)
    info = train_info(setup, case, provider)
    benchmark.group = f"train_step {case.id}"
    oom = None
    try:
        batch = make_batch(setup, case.batch, case.seq_len)
        step = Step(make_train_step(setup, provider, batch))
        resident = _resident_mib(case.device)
        median_ms, peak, losses = timed(benchmark, request.config, step, case.device, min_rounds=3)
        del step, batch
    except torch.cuda.OutOfMemoryError as error:
        oom = str(error)
    if oom is not None:
        out_of_memory(info, provider, oom)
    assert_finite(tuple(losses.values()))
    record(benchmark, ("train_step", case.id, info["dtype"], "full"), provider, info, median_ms, peak)
    if peak is not None:
        benchmark.extra_info.update(resident_mib=resident, peak_total_mib=resident + peak)
    if median_ms:
        benchmark.extra_info["tokens_per_s"] = case.batch * case.seq_len / (median_ms * 1e-3)
    if case.device == "cpu":
        _CPU_LOSSES.setdefault(case.id, {})[provider] = losses
        if len(_CPU_LOSSES[case.id]) == len(PROVIDERS):
            ours, eager = _CPU_LOSSES[case.id]["ours"], _CPU_LOSSES[case.id]["eager"]
            for name in ("lm", "kd", "vat", "loss"):
                torch.testing.assert_close(ours[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device, provider", FIT_PARAMS)
def test_longest_fitting_length(benchmark, request, train_layers, device, provider):
    """Double L until a step runs out of GPU memory (or reaches the cap), then time the longest that fit.
    On the CPU nothing runs out: the search runs the tiny models up to a small cap, as a smoke check."""
    if device == "cpu":
        template, start, cap = CPU_TRAIN_CASE, CPU_TRAIN_CASE.seq_len, CPU_TRAIN_MAX_SEQ
    else:
        template = TrainCase(TRAIN_TEACHER, TRAIN_STUDENT, TRAIN_BATCH, SEQ_LENS[0], "cuda")
        start, cap = SEQ_LENS[0], TRAIN_MAX_SEQ_LEN
    setup = _setup(template, train_layers)
    found = longest_fitting_length(setup, provider, template.batch, start, cap, device)
    peaks, longest, first_oom = found.peaks, found.longest, found.first_oom
    case = TrainCase(template.teacher, template.student, template.batch, longest or start, device)
    info = train_info(setup, case, provider)
    info.update(op="train_fit", search_start=start, search_cap=cap, first_oom_seq_len=first_oom,
                longest_fitting_seq_len=longest, peak_mib_by_seq_len={str(k): v for k, v in peaks.items()})
    benchmark.group = f"train_fit {template.teacher}->{template.student}"
    if longest is None:
        out_of_memory(info, provider, f"no length from {start} fits")
    oom = None
    try:
        step = Step(make_train_step(setup, provider, make_batch(setup, template.batch, longest)))
        median_ms, peak, _ = timed(benchmark, request.config, step, device, min_rounds=3)
        del step
    except torch.cuda.OutOfMemoryError as error:  # fragmentation after the search's OOM
        oom = str(error)
    if oom is not None:
        out_of_memory(info, provider, oom)
    record(benchmark, ("train_fit", info["model"], info["dtype"], "full"), provider, info, median_ms, peak)
    assert longest >= start
