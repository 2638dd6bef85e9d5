"""Ahead-of-time compilation of every Triton kernel configuration the launchers can pick, for real GPU
targets, on any machine (no GPU needed): the interpreter accepts kernels that a GPU compile rejects.

    python -m compodistill_kernels.attention.aot_check --arch 80 90

The launchers run on meta tensors with the kernels swapped for recorders, so the compiled signatures,
flags, block sizes, warps and stages are exactly the ones a real launch would use, and every entry of
the launchers' autotuning space (triton_impl.config_space) is recorded, not only the default. Arguments
are specialized as Triton's JIT does at launch (16-byte aligned pointers, integers divisible by 16, an
integer 1 as a constant), so the code compiled here is the code a GPU would run for these shapes. Each
compiled cubin's registers, shared memory and local memory (spills) are read with Triton's bundled
cuobjdump; the PTX says whether Hopper's wgmma is used.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from . import triton_impl, triton_kernels
from .validate import SliceMode, SliceSpec

# Max dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KERNEL_NAMES = ("_attn_fwd_kernel", "_slice_fwd_kernel", "_bwd_preprocess_kernel", "_slice_bwd_kernel",
                "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs))
        return launch


def _launch_every_config(kind, dtype, head_dim, key, device, run):
    """Stands in for triton_impl._launch: runs (records) every configuration of the autotuning space."""
    for cfg in triton_impl.config_space(kind, dtype, head_dim):
        result = run(cfg)
    return result


@contextmanager
def _recording(sink):
    saved = {name: getattr(triton_kernels, name) for name in KERNEL_NAMES}
    saved_launch = triton_impl._launch
    try:
        for name, fn in saved.items():
            setattr(triton_kernels, name, _Recorder(fn, sink))
        triton_impl._launch = _launch_every_config
        yield
    finally:
        for name, fn in saved.items():
            setattr(triton_kernels, name, fn)
        triton_impl._launch = saved_launch


def _parameters(fn):
    """[(name, is_constexpr)] of a kernel, compiled (JITFunction) or interpreted (TRITON_INTERPRET=1)."""
    if hasattr(fn, "params"):
        return [(p.name, p.is_constexpr) for p in fn.params]
    return [(name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(fn.fn).parameters.items()]


def _signature(fn, args, kwargs):
    """(signature, constexprs, attrs, options) as Triton's JIT specializes this launch: pointers (torch
    allocations are 16-byte aligned; meta tensors report address 0) and integers divisible by 16 get
    tt.divisibility=16, an integer equal to 1 becomes a constant. The launchers pass every argument by
    keyword; positional ones are bound to the kernel's parameters in order."""
    options = {name: kwargs[name] for name in _LAUNCH_OPTIONS if name in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update((name, value) for name, value in kwargs.items() if name not in _LAUNCH_OPTIONS)
    unknown = set(bound) - set(fn.arg_names)
    missing = set(fn.arg_names) - set(bound)
    if unknown or missing:
        raise TypeError(f"{fn.__name__}: unknown arguments {sorted(unknown)}, missing {sorted(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, is_constexpr) in enumerate(_parameters(fn)):
        value = bound[name]
        if is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        if not isinstance(value, (torch.Tensor, bool, int, float)):
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(index,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs, options


def recorded_launches(dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(16, 24, 64, 80, 128, 256),
                      flag_sets=((True, True), (False, False)), group=1):
    """Every distinct (kernel, signature, constexprs, attrs, options) the launchers produce for these dtypes,
    head dims and (causal, key padding mask) flag sets, with each slice mode, both backwards (two-kernel
    and one-pass) and every configuration of the autotuning space. group = Hq / Hkv: 1 (the models'
    multi-head attention) is specialized as a constant by the JIT, so grouped-query attention (group > 1)
    compiles to different code."""
    sink = []
    B, Hkv, L, Lq, Nv = 2, 2, 300, 40, 60
    H = Hkv * group
    with _recording(sink):
        for dtype in dtypes:
            for D in head_dims:
                for causal, masked in flag_sets:
                    q = torch.empty(B, H, L, D, dtype=dtype, device="meta")
                    k = torch.empty(B, Hkv, L, D, dtype=dtype, device="meta")
                    mask = torch.empty(B, L, dtype=torch.bool, device="meta") if masked else None
                    spec = SliceSpec(torch.empty(B, Nv, dtype=torch.int32, device="meta"),
                                     torch.empty(B, Lq, dtype=torch.int32, device="meta"), None)
                    out, lse = triton_impl.attn_fwd(q, k, k, 0.1, causal, mask)
                    f32 = dict(dtype=torch.float32, device="meta")
                    rows, teacher, w = torch.empty(B, Lq, Nv, **f32), torch.empty(B, Lq, Nv, **f32), torch.empty(B, Lq, **f32)
                    for mode in SliceMode:
                        triton_impl.slice_fwd(q, k, lse, 0.1, causal, mask, spec, mode, weight=w, teacher=teacher)
                    SliceGrad = triton_impl.SliceGrad
                    grads = [None, SliceGrad(SliceMode.ROWS, dslice=rows),
                             SliceGrad(SliceMode.MEAN, row_share=w, dmean=torch.empty(B, Nv, **f32)),
                             SliceGrad(SliceMode.ALIGN, teacher_coef=w, student_coef=w, teacher=teacher,
                                       student=rows)]
                    for deterministic in (True, False):
                        for grad in grads:
                            triton_impl.attn_bwd(q, k, k, out, lse, out, lse, 0.1, causal, mask,
                                                 spec if grad is not None else None, grad, deterministic)
    unique = {}
    for fn, args, kwargs in sink:
        signature, constexprs, attrs, options = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), tuple(sorted(options.items())))
        unique[key] = (fn, signature, constexprs, attrs, options)
    return list(unique.values())


def resource_usage(cubin: bytes):
    """(registers, local bytes) of the single function in a cubin, via cuobjdump; local memory > 0 means
    spills (Triton kernels use no stack arrays)."""
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


def compile_one(fn, signature, constexprs, attrs, options, arch):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
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
    fn, signature, constexprs, attrs, options = _JOBS[index]
    try:
        return compile_one(fn, signature, constexprs, attrs, options, arch), None
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
                        help="every (causal, padding mask) combination at every head dim, and grouped-query "
                             "heads with the flags on and off; by default the flags-off variants are compiled "
                             "at head dim 64 only, with grouped-query heads")
    parser.add_argument("--kernels", nargs="+", default=None, choices=KERNEL_NAMES,
                        help="compile only these kernels (default: all)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot_check: unset TRITON_INTERPRET; the interpreter cannot compile for a GPU")
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtypes = tuple(names[d] for d in args.dtype)
    if args.all_flags:
        launches = recorded_launches(dtypes, tuple(args.head_dims),
                                     ((True, True), (True, False), (False, True), (False, False)))
        launches += recorded_launches(dtypes, tuple(args.head_dims), ((True, True), (False, False)), group=2)
    else:
        # multi-head (group 1) at every head dim; grouped-query (group 2) with the flags off at head dim 64
        launches = recorded_launches(dtypes, tuple(args.head_dims), ((True, True),))
        launches += recorded_launches(dtypes, (64,), ((False, False),), group=2)
    if args.kernels:
        launches = [launch for launch in launches if launch[0].__name__ in args.kernels]
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
