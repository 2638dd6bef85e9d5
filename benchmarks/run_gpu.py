"""Time and peak memory of every provider on a CUDA GPU, with triton.testing.do_bench (median).

    python -m benchmarks.run_gpu --out benchmarks/results.json [--models qwen1.5-4b] [--lens 1024 2048]

Prints a Markdown table (device, versions, shapes) and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import triton
from triton.testing import do_bench

from .providers import PROVIDERS, attention_flops, build, make_inputs
from .shapes import MODELS, SEQ_LENS

MODES = ("forward", "full")


def measure(provider, shape, batch, seq_len, dtype, mode):
    torch.cuda.empty_cache()
    q, k, v, starts, lens, teacher = make_inputs(shape, batch, seq_len, dtype, "cuda")
    f = build(provider, q, k, v, starts, lens, teacher)

    if mode == "forward":
        def step():
            with torch.no_grad():
                f()
    else:
        def step():
            f().backward()
            q.grad = k.grad = v.grad = None
    try:
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    except torch.OutOfMemoryError:
        return {"oom": True}
    flops = attention_flops(batch, shape.heads, seq_len, shape.head_dim, mode)
    return {"ms": ms, "tflops": flops / ms * 1e-9, "peak_gib": peak / 2**30}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen1.5-4b"], choices=sorted(MODELS))
    parser.add_argument("--lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.date.today().isoformat(), "dtype": args.dtype, "batch": args.batch}
    rows = []
    for model in args.models:
        shape = MODELS[model]
        for seq_len in args.lens:
            for mode in MODES:
                for provider in args.providers:
                    r = measure(provider, shape, args.batch, seq_len, dtype, mode)
                    rows.append({"model": model, "L": seq_len, "mode": mode, "provider": provider, **r})
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{env}\n")
    print("| model | L | mode | provider | median ms | TFLOP/s | peak GiB | × sdpa-flash |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["model"] == r["model"] and x["L"] == r["L"] and x["mode"] == r["mode"]
                    and x["provider"] == "sdpa-flash" and "ms" in x), None)
        if r.get("oom"):
            print(f"| {r['model']} | {r['L']} | {r['mode']} | {r['provider']} | OOM | | | |")
            continue
        ratio = f"{ref['ms'] / r['ms']:.2f}" if ref else ""
        print(f"| {r['model']} | {r['L']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r['peak_gib']:.2f} | {ratio} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
