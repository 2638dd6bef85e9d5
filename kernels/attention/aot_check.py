"""Ahead-of-time compilation of every Triton kernel configuration the launchers can pick, for real GPU
targets, on any machine (no GPU needed): the interpreter accepts kernels that a GPU compile rejects.

    python -m compodistill_kernels.attention.aot_check --arch 80 90

The launchers run on meta tensors with the kernels swapped for recorders, so the compiled signatures,
flags, block sizes, warps and stages are exactly the ones a real launch would use. Each compiled cubin's
registers, shared memory and local memory (spills) are read with Triton's bundled cuobjdump.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_impl, triton_kernels
from .validate import SliceSpec

# Max dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KERNEL_NAMES = ("_attn_fwd_kernel", "_slice_fwd_kernel", "_bwd_preprocess_kernel", "_slice_bwd_kernel",
                "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
              torch.uint8: "*u8", torch.int64: "*i64"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs))
        return launch


@contextmanager
def _recording(sink):
    saved = {name: getattr(triton_kernels, name) for name in KERNEL_NAMES}
    try:
        for name, fn in saved.items():
            setattr(triton_kernels, name, _Recorder(fn, sink))
        yield
    finally:
        for name, fn in saved.items():
            setattr(triton_kernels, name, fn)


def _signature(fn, args, kwargs):
    names = fn.arg_names
    signature, constexprs = {}, {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = _PTR_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    options = {}
    for name, value in kwargs.items():
        if name in _LAUNCH_OPTIONS:
            options[name] = value
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    return signature, constexprs, options


def recorded_launches(dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(16, 24, 64, 80, 128, 256),
                      flag_sets=((True, True), (False, False))):
    """Every distinct (kernel, signature, constexprs, options) the launchers produce for these dtypes,
    head dims and (causal, key padding mask) flag sets, with each slice mode."""
    sink = []
    B, H, Hkv, L, Lq, Nv = 2, 4, 2, 300, 40, 60
    with _recording(sink):
        for dtype in dtypes:
            for D in head_dims:
                for causal, masked in flag_sets:
                    q = torch.empty(B, H, L, D, dtype=dtype, device="meta")
                    k = torch.empty(B, Hkv, L, D, dtype=dtype, device="meta")
                    mask = torch.empty(B, L, dtype=torch.bool, device="meta") if masked else None
                    offsets = torch.empty(B, dtype=torch.int32, device="meta")
                    spec = SliceSpec(offsets, Nv, offsets, Lq, None)
                    out, lse = triton_impl.attn_fwd(q, k, k, 0.1, causal, mask)
                    f32 = dict(dtype=torch.float32, device="meta")
                    rows, teacher, w = torch.empty(B, Lq, Nv, **f32), torch.empty(B, Lq, Nv, **f32), torch.empty(B, Lq, **f32)
                    for mode in (0, 1, 2):
                        triton_impl.slice_fwd(q, k, lse, 0.1, causal, mask, spec, mode, weight=w, teacher=teacher)
                    triton_impl.attn_bwd(q, k, k, out, lse, out, lse, 0.1, causal, mask)
                    grads = {0: (0, rows, None, None, None, None),
                             1: (1, None, w, None, torch.empty(B, Nv, **f32), None),
                             2: (2, None, w, w, None, teacher)}
                    for mode in (0, 1, 2):
                        triton_impl.attn_bwd(q, k, k, out, lse, out, lse, 0.1, causal, mask, spec, grads[mode])
    unique = {}
    for fn, args, kwargs in sink:
        signature, constexprs, options = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))
        unique[key] = (fn, signature, constexprs, options)
    return list(unique.values())


def resource_usage(cubin: bytes):
    """(registers, shared bytes, local bytes) of the single function in a cubin, via cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    reg, _, _, local = map(int, found.groups())
    return reg, local


def compile_one(fn, signature, constexprs, options, arch):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, local = resource_usage(compiled.asm["cubin"])
    return {
        "kernel": fn.__name__, "arch": arch,
        "config": ", ".join(f"{k}={v}" for k, v in constexprs.items()) + f", {options}",
        "dtype": next((t[1:] for n, t in signature.items() if n == "Q"), "?"),
        "registers": regs, "shared": compiled.metadata.shared, "local": local,
        "wgmma": "wgmma" in compiled.asm["ptx"],
    }


def _compile_job(job):
    index, arch = job
    fn, signature, constexprs, options = _JOBS[index]
    try:
        return compile_one(fn, signature, constexprs, options, arch), None
    except Exception as exc:  # report every failing configuration, then fail
        return None, f"FAIL sm_{arch} {fn.__name__} {constexprs} {options}: {type(exc).__name__}: {exc}"


_JOBS = []


def compile_all(launches, archs, workers=None):
    """Compile every launch for every arch in a process pool; yields (result, error) pairs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _JOBS[:] = launches
    jobs = [(i, arch) for arch in archs for i in range(len(launches))]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield from map(_compile_job, jobs)
        return
    # fork shares the recorded launches with the workers; each compiles independently
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_compile_job, jobs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[16, 24, 64, 80, 128, 256])
    parser.add_argument("--all-flags", action="store_true",
                        help="every (causal, padding mask) combination at every head dim; by default the "
                             "flags-off variants are compiled at head dim 64 only")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot_check: unset TRITON_INTERPRET; the interpreter cannot compile for a GPU")
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtypes = tuple(names[d] for d in args.dtype)
    if args.all_flags:
        launches = recorded_launches(dtypes, tuple(args.head_dims),
                                     ((True, True), (True, False), (False, True), (False, False)))
    else:
        launches = recorded_launches(dtypes, tuple(args.head_dims), ((True, True),))
        launches += recorded_launches(dtypes, (64,), ((False, False),))
    failures = 0
    print(f"{'arch':>4} {'kernel':<24} {'dtype':<5} {'regs':>4} {'shared':>7} {'local':>5} wgmma  config")
    for r, error in compile_all(launches, args.arch, args.workers):
        if error is not None:
            failures += 1
            print(error, flush=True)
            continue
        over = r["shared"] > SHARED_LIMIT[r["arch"]]
        failures += over
        print(f"{r['arch']:>4} {r['kernel']:<24} {r['dtype']:<5} {r['registers']:>4} {r['shared']:>7} "
              f"{r['local']:>5} {str(r['wgmma']):<6} {r['config']}" + ("  SHARED OVER LIMIT" if over else ""),
              flush=True)
    print(f"{len(launches) * len(args.arch)} compilations, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
