"""Cross-check of the pytest benchmarks with triton.testing.do_bench on a CUDA GPU.

    python -m benchmarks.run_gpu --op alignment --models qwen1.5-4b --lens 1024 2048 4096 8192 \\
        [--batch 1] [--modes forward full] [--providers ours eager] [--out results.json]

The same providers and steps as `pytest benchmarks/` (providers.py), timed by do_bench (median of CUDA-
event timings, L2 cache flushed between runs) instead of pytest-benchmark's wall clock. Modes: forward
and full (do_bench has no untimed setup, which the backward-only mode needs). Prints a Markdown table
(device, versions, shapes) and writes the raw numbers as JSON. The main report is `python -m
benchmarks.report` on pytest-benchmark's JSON; this runner produced the first H100 table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from .providers import OPS, PROVIDERS, attention_flops, make_step, skip_reason
from .shapes import MODELS, SEQ_LENS, Case

MODES = ("forward", "full")


def measure(op, provider, case, mode):
    from triton.testing import do_bench

    torch.cuda.empty_cache()
    failed = False
    try:
        step, _ = make_step(op, provider, case, mode)
        step.run_once()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step.run_once()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(step.run_once, warmup=25, rep=100, return_mode="median")
        del step
    except torch.cuda.OutOfMemoryError:
        failed = True
    if failed:
        torch.cuda.empty_cache()
        return {"oom": True}
    flops = attention_flops(case.batch, case.shape.heads, case.seq_len, case.shape.head_dim, mode)
    return {"ms": ms, "tflops": flops / ms * 1e-9, "peak_gib": peak / 2**30}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="alignment", choices=OPS)
    parser.add_argument("--models", nargs="+", default=["qwen1.5-4b"], choices=sorted(MODELS))
    parser.add_argument("--lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--providers", nargs="+", default=None, help="default: every provider of --op")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (on the CPU, run `pytest benchmarks/`, which runs the CPU smoke cases)")
    providers = args.providers or list(PROVIDERS[args.op])
    unknown = set(providers) - set(PROVIDERS[args.op])
    if unknown:
        parser.error(f"--providers: {sorted(unknown)} are not providers of {args.op} {PROVIDERS[args.op]}")
    import triton
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.date.today().isoformat(), "op": args.op, "dtype": "bf16", "batch": args.batch}
    rows = []
    for model in args.models:
        for seq_len in args.lens:
            case = Case(MODELS[model], args.batch, seq_len, "cuda")
            for mode in args.modes:
                for provider in providers:
                    reason = skip_reason(provider, "cuda", mode)
                    result = {"skipped": reason} if reason else measure(args.op, provider, case, mode)
                    rows.append({"model": model, "L": seq_len, "mode": mode, "provider": provider, **result})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{env}\n")
    print("| model | L | mode | provider | median ms | TFLOP/s | peak GiB | × sdpa-flash |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['model']} | {r['L']} | {r['mode']} | {r['provider']} | "
                  f"{'OOM' if r.get('oom') else 'skipped'} | | | |")
            continue
        ref = next((x for x in rows if x["model"] == r["model"] and x["L"] == r["L"] and x["mode"] == r["mode"]
                    and x["provider"] == "sdpa-flash" and "ms" in x), None)
        ratio = f"{ref['ms'] / r['ms']:.2f}" if ref else ""
        print(f"| {r['model']} | {r['L']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r['peak_gib']:.2f} | {ratio} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
