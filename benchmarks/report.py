"""Turn benchmark JSON into Markdown tables and plots: the JSON of `pytest benchmarks/ --benchmark-json FILE`
or the gpu_suite.json of `python -m benchmarks.gpu_suite` (the same layout).

    python -m benchmarks.report --json bench.json [more.json ...] [--out benchmarks/RESULTS.md]
                                [--plots benchmarks/plots]

For each JSON file (one run, one device): the device and versions, the date and the command, the measured
ceilings and the correctness result (gpu_suite runs), then per op, model shape and batch a table of median
time, TFLOP/s (and % of the bf16 matmul ceiling: measured, else the H100/H200 figure), peak memory and the
ratios to every baseline, recomputed here from the medians; the training-step tables; the kernel targets
(benchmarks/README.md) with their measured values (CUDA runs only); what was not measured and why; and
PNG plots of time and memory against L per provider.

The generated text goes between the markers `<!-- report:begin -->` and `<!-- report:end -->` of --out:
everything else in the file (hand-written, measured sections) is kept. A file without the markers gets
them appended at its end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from .providers import MODES, OUR_PROVIDERS, OURS, OURS_ONE_PASS, PROVIDERS

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
# bf16 dense matmul measured on an H100 (the H200 has the same GH100 compute die; an H200 here measured
# 770-800), used when a run did not measure its own; published causal forward at d=128 on the H100:
# FA2 ~300–330 TFLOP/s.
BF16_CEILING_TFLOPS = {"H100": 790.0, "H200": 790.0}
FA2_CAUSAL_FWD = "~300–330 TFLOP/s"
OP_TITLES = {
    "alignment": "Attention + fused cosine alignment loss (student side of VAT)",
    "slice_export": "Attention + visual slice export (teacher side of VAT)",
    "flash": "Plain causal attention",
    "train_step": "DFT training step (teacher forward with slice export, student forward + backward)",
    "train_fit": "Longest L whose DFT training step fits in GPU memory",
}
ATTENTION_OPS = ("alignment", "slice_export", "flash")
# One colour per provider in every plot (matplotlib's tab10 cycle).
PROVIDER_COLORS = {"eager": "C0", "sdpa+slice": "C1", "xformers+slice": "C2", "flex+slice": "C4", "sdpa-flash": "C3",
                   "xformers": "C2", "flex": "C4", OURS: "C9", OURS_ONE_PASS: "C6"}
# The kernel targets (benchmarks/README.md), judged on CUDA runs.
TARGET_VS_SDPA_FLASH = 0.6    # fused fwd+bwd with alignment / SDPA-flash fwd+bwd without, speed, L = 8192
TARGET_VS_SDPA_SLICE = 1.5    # fused fwd+bwd with alignment / SDPA + slice from the LSE, speed, L = 8192
TARGET_FWD_TFLOPS = 400.0     # plain causal forward
TARGET_EXPORT_OVERHEAD = 0.25  # slice export forward over our plain forward, L = 4096
TARGET_MEMORY_VS_EAGER = 50.0  # attention peak memory, eager / ours, fwd+bwd with alignment, L = 8192
LINEAR_PER_DOUBLING = 2.3      # peak memory growth per doubling of L still called linear
MEMORY_BASELINES = ("eager", "sdpa-flash")


@dataclass
class Run:
    """One pytest-benchmark JSON file: its environment and its rows (one per benchmark or OOM case)."""

    path: str
    env: dict
    measured: str
    command: str
    rows: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # the JSON's "compodistill" section: ceilings, correctness, ...
    tool: str = "pytest-benchmark"

    @property
    def ceiling(self):
        """bf16 matmul TFLOP/s: as measured in this run, else the known figure for the device (None)."""
        measured = (self.extra.get("ceilings") or {}).get("bf16_matmul_tflops")
        if measured:
            return float(measured)
        name = self.env.get("device_name", "") if self.env.get("device") == "cuda" else ""
        return next((value for key, value in BF16_CEILING_TFLOPS.items() if key in name), None)


def _fail(path, why):
    raise ValueError(f"--json {path}: {why}")


def load_run(path) -> Run:
    """Read and check one pytest-benchmark JSON file written by `pytest benchmarks/ --benchmark-json`."""
    if not os.path.isfile(path):
        _fail(path, "no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _fail(path, f"not JSON ({err})")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or \
            not isinstance(data.get("machine_info"), dict):
        _fail(path, "not a pytest-benchmark JSON file (expected a 'benchmarks' list and a 'machine_info' object; "
                    "write one with `pytest benchmarks/ --benchmark-json FILE`)")
    ours = data.get("compodistill") or {}
    machine = data["machine_info"]
    env = machine.get("compodistill") or {"device": "unknown", "device_name": machine.get("processor") or "unknown",
                                           "python": machine.get("python_version")}
    run = Run(path, env, str(data.get("datetime", "")), ours.get("command", ""), extra=ours,
              tool="gpu_suite" if data.get("version") == "gpu_suite" else "pytest-benchmark")
    for bench in data["benchmarks"]:
        info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
        if "op" not in info or "provider" not in info:
            continue  # a benchmark that is not one of ours
        if not isinstance(stats.get("median"), (int, float)):
            _fail(path, f"benchmark {bench.get('name')!r} has no median in its stats")
        row = dict(info, median_ms=stats["median"] * 1e3, oom=False, rounds=stats.get("rounds"))
        if info.get("flops"):
            row["tflops"] = info["flops"] / stats["median"] / 1e12
        run.rows.append(row)
    run.rows += [dict(case, oom=True) for case in ours.get("oom", [])]
    if not run.rows:
        _fail(path, "holds no timed CompoDistill benchmark (benchmarks with extra_info.op); runs with "
                    "--benchmark-disable write no timings")
    return run


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------

def _fmt(x, digits=3):
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _ratio(x):
    return "" if x is None else f"{_fmt(x)}×"


def _rank(op, provider):
    known = list(PROVIDERS.get(op, ())) + ["eager", *OUR_PROVIDERS]
    return (known.index(provider) if provider in known else len(known), provider)


def _provider_order(op, providers):
    return sorted(providers, key=lambda p: _rank(op, p))


def _problem(row):
    return (row["op"], row.get("model"), row.get("batch"), row.get("seq_len"), row.get("dtype"), row.get("device"),
            row.get("mode"))


def with_ratios(rows):
    """Each row with speed[b] = time of b / time of the row and memory[b] = peak of b / peak of the row,
    for every other provider b measured on the same problem."""
    by_problem = defaultdict(dict)
    for row in rows:
        if not row["oom"]:
            by_problem[_problem(row)][row["provider"]] = row
    out = []
    for row in rows:
        row = dict(row, speed={}, memory={})
        if not row["oom"]:
            for provider, other in by_problem[_problem(row)].items():
                if provider == row["provider"]:
                    continue
                row["speed"][provider] = other["median_ms"] / row["median_ms"]
                if other.get("peak_mib") and row.get("peak_mib"):
                    row["memory"][provider] = other["peak_mib"] / row["peak_mib"]
        out.append(row)
    return out


def _markdown_table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def attention_tables(rows, ceiling):
    groups = defaultdict(list)
    for row in rows:
        if row["op"] in ATTENTION_OPS:
            groups[(row["op"], row["model"], row["batch"], row["dtype"])].append(row)
    sections = []
    for (op, model, batch, dtype), group in sorted(groups.items(), key=lambda kv: (ATTENTION_OPS.index(kv[0][0]),
                                                                                   kv[0][1], kv[0][2])):
        first = group[0]
        providers = _provider_order(op, {r["provider"] for r in group})
        # every other provider, and ours for the one-pass variant
        baselines = [p for p in providers if p not in OUR_PROVIDERS]
        baselines += [OURS] if OURS in providers and OURS_ONE_PASS in providers else []
        has_memory = any(r.get("peak_mib") for r in group)
        memory_baselines = [p for p in MEMORY_BASELINES if p in providers] if has_memory else []
        header = ["L", "mode", "provider", "median ms", "TFLOP/s"]
        header += [f"% of {ceiling:.0f}"] if ceiling else []
        header += ["peak MiB"] if has_memory else []
        header += [f"× {b}" for b in baselines] + [f"mem ÷ {b}" for b in memory_baselines]
        lines = []
        order = {p: i for i, p in enumerate(providers)}
        for row in sorted(group, key=lambda r: (r["seq_len"], MODES.index(r["mode"]), order[r["provider"]])):
            cells = [str(row["seq_len"]), row["mode"], f"**{row['provider']}**" if row["provider"] in OUR_PROVIDERS
                     else row["provider"]]
            if row["oom"]:
                cells += ["OOM", ""] + ([""] if ceiling else []) + (["OOM"] if has_memory else [])
                cells += [""] * (len(baselines) + len(memory_baselines))
            else:
                tflops = row.get("tflops")
                cells += [_fmt(row["median_ms"]), _fmt(tflops)]
                cells += [_fmt(100 * tflops / ceiling, 2) if tflops else ""] if ceiling else []
                cells += [_fmt(row.get("peak_mib"))] if has_memory else []
                cells += [_ratio(row["speed"].get(b)) for b in baselines]
                cells += [_ratio(row["memory"].get(b)) for b in memory_baselines]
            lines.append(cells)
        title = (f"### {OP_TITLES[op]}: {model} ({first['heads']} query / {first['kv_heads']} kv heads, "
                 f"d={first['head_dim']}), batch {batch}, {dtype}")
        note = "" if op == "flash" else (f"{first['visual_tokens']} visual keys; query rows = the text rows after "
                                         f"the image (L − {first['seq_len'] - first['query_rows']}).\n\n")
        sections.append(f"{title}\n\n{note}{_markdown_table(header, lines)}")
    return sections


def _gib(mib):
    return None if mib is None else mib / 1024


def train_tables(rows):
    sections = []
    steps = [r for r in rows if r["op"] == "train_step"]
    if steps:
        first = steps[0]
        header = ["L", "provider", "step ms", "tokens/s", "peak GiB above models", "peak GiB total", "× eager",
                  "mem ÷ eager"]
        lines = []
        for row in sorted(steps, key=lambda r: (r["seq_len"], _rank("train_step", r["provider"]))):
            if row["oom"]:
                lines.append([str(row["seq_len"]), row["provider"], "OOM", "", "OOM", "OOM", "", ""])
                continue
            lines.append([str(row["seq_len"]), row["provider"], _fmt(row["median_ms"]), _fmt(row.get("tokens_per_s")),
                          _fmt(_gib(row.get("peak_mib"))), _fmt(_gib(row.get("peak_total_mib"))),
                          _ratio(row["speed"].get("eager")), _ratio(row["memory"].get("eager"))])
        sections.append(
            f"### {OP_TITLES['train_step']}\n\nTeacher {first['teacher']} shapes ({first['teacher_layers']} layers), "
            f"student {first['student']} shapes ({first['student_layers']} layers), vocabulary {first['vocab']}, "
            f"batch {first['batch']}, {first['visual_tokens']} visual tokens, {first['dtype']}; lm + kd + vat, "
            f"VAT on every student layer.\n\n{_markdown_table(header, lines)}")
    fits = [r for r in rows if r["op"] == "train_fit"]
    if fits:
        header = ["provider", "longest L that fits", "first L out of memory", "search", "step ms at longest",
                  "peak GiB at longest"]
        lines = []
        for row in sorted(fits, key=lambda r: r["provider"]):
            search = f"{row.get('search_start')} … {row.get('search_cap')}, doubling"
            if row["oom"]:
                lines.append([row["provider"], "none", str(row.get("search_start")), search, "", ""])
                continue
            lines.append([row["provider"], str(row.get("longest_fitting_seq_len")),
                          str(row.get("first_oom_seq_len") or f"none up to {row.get('search_cap')}"), search,
                          _fmt(row["median_ms"]), _fmt(_gib(row.get("peak_mib")))])
        sections.append(f"### {OP_TITLES['train_fit']}\n\n{_markdown_table(header, lines)}")
    return sections


def _find(rows, **want):
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def targets(rows, env, ceiling=None):
    """The kernel targets with the measured values (CUDA runs; on the CPU they are not judged)."""
    if env.get("device") != "cuda":
        return "Targets: not judged, this run had no CUDA GPU (they are measured on H100/H200 only)."
    lines = []

    def verdict(ok):
        return "met" if ok else "not met"

    def where(row, **extra):
        fields = dict(model=row["model"], B=row["batch"], L=row["seq_len"], **extra)
        return "(" + ", ".join(f"{k}={v}" if k != "model" else str(v) for k, v in fields.items()) + ")"

    for provider in OUR_PROVIDERS:
        full = [r for r in _find(rows, op="alignment", mode="full", provider=provider, seq_len=8192) if not r["oom"]]
        for row in sorted(full, key=lambda r: (r["model"], r["batch"])):
            ratio = row["speed"].get("sdpa-flash")
            if ratio is not None:
                lines.append([f"{provider}: fused fwd+bwd with alignment ≥ {TARGET_VS_SDPA_FLASH}× the speed of "
                              f"SDPA-flash fwd+bwd without alignment {where(row)}", _ratio(ratio),
                              verdict(ratio >= TARGET_VS_SDPA_FLASH)])
            ratio = row["speed"].get("sdpa+slice")
            if ratio is not None:
                lines.append([f"{provider}: fused fwd+bwd with alignment ≥ {TARGET_VS_SDPA_SLICE}× faster than SDPA + "
                              f"slice from the LSE {where(row)}", _ratio(ratio), verdict(ratio >= TARGET_VS_SDPA_SLICE)])
    fwd = [r for r in _find(rows, op="flash", mode="forward", provider=OURS) if not r["oom"] and r.get("tflops")]
    best = max(fwd, key=lambda r: r["tflops"], default=None)
    if best is not None:
        lines.append([f"plain forward ≥ {TARGET_FWD_TFLOPS:.0f} TFLOP/s, best length {where(best)}; bf16 matmul "
                      f"ceiling {_fmt(ceiling) or '?'}, FA2 {FA2_CAUSAL_FWD}", _fmt(best["tflops"]),
                      verdict(best["tflops"] >= TARGET_FWD_TFLOPS)])
    for row in _find(rows, op="slice_export", mode="forward", provider=OURS, seq_len=4096):
        plain = [r for r in _find(rows, op="flash", mode="forward", provider=OURS, seq_len=4096, model=row["model"],
                                  batch=row["batch"]) if not r["oom"]]
        if row["oom"] or not plain:
            continue
        overhead = row["median_ms"] / plain[0]["median_ms"] - 1
        lines.append([f"slice export forward ≤ {TARGET_EXPORT_OVERHEAD:.0%} over our plain forward {where(row)}",
                      f"{overhead:+.1%}", verdict(overhead <= TARGET_EXPORT_OVERHEAD)])
    for provider in OUR_PROVIDERS:
        full = [r for r in _find(rows, op="alignment", mode="full", provider=provider) if not r["oom"]]
        for row in sorted((r for r in full if r["seq_len"] == 8192), key=lambda r: (r["model"], r["batch"])):
            text = f"{provider}: attention memory ≥ {TARGET_MEMORY_VS_EAGER:.0f}× below eager, fwd+bwd {where(row)}"
            if _find(rows, op="alignment", mode="full", provider="eager", model=row["model"], batch=row["batch"],
                     seq_len=8192, oom=True):
                lines.append([text, "eager OOM", "met"])
            elif row["memory"].get("eager") is not None:
                ratio = row["memory"]["eager"]
                lines.append([text, _ratio(ratio), verdict(ratio >= TARGET_MEMORY_VS_EAGER)])
        by_group = defaultdict(dict)
        for row in full:
            if row.get("peak_mib"):
                by_group[(row["model"], row["batch"])][row["seq_len"]] = row["peak_mib"]
        for (model, batch), peaks in sorted(by_group.items()):
            lengths = sorted(peaks)
            growth = [peaks[b] / peaks[a] * (a / b) * 2 for a, b in zip(lengths, lengths[1:])]
            if not growth:
                continue
            shown = ", ".join(f"L={n}: {_fmt(peaks[n])} MiB" for n in lengths)
            lines.append([f"{provider}: attention memory linear in L ({model}, B={batch}; {shown})",
                          "per doubling " + ", ".join(f"{g:.2f}×" for g in growth),
                          verdict(all(g <= LINEAR_PER_DOUBLING for g in growth))])
    for row in _find(rows, op="train_step", provider=OURS, seq_len=8192):
        eager = _find(rows, op="train_step", provider="eager", seq_len=8192)
        if row["oom"]:
            lines.append(["training step fits at L=8192 where eager OOMs", "ours OOM", "not met"])
        elif eager:
            ok = eager[0]["oom"]
            lines.append(["training step fits at L=8192 where eager OOMs",
                          "eager OOM, ours fits" if ok else "both fit", verdict(ok)])
    if not lines:
        return "Targets: this run holds none of the cases the targets name."
    return "Targets (benchmarks/README.md)\n\n" + _markdown_table(["target", "measured", "verdict"], lines)


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------

def _slug(text):
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-").lower()


def plot_run(run, rows, plot_dir):
    """PNG plots of time and peak memory against L, one line per provider; returns [(title, path)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(plot_dir, exist_ok=True)
    groups = defaultdict(list)
    for row in rows:
        if not row["oom"] and row["op"] != "train_fit":
            groups[(row["op"], row["model"], row["batch"], row["dtype"])].append(row)
    swept = {k: g for k, g in groups.items() if len({r["seq_len"] for r in g}) > 1}
    groups = swept or groups  # a smoke run has one L per group: plot its points anyway
    prefix = _slug(run.env.get("device_name", run.env.get("device", "run")))
    written = []
    for (op, model, batch, dtype), group in sorted(groups.items()):
        modes = [m for m in MODES if any(r["mode"] == m for r in group)]
        has_memory = any(r.get("peak_mib") for r in group)
        nrows = 2 if has_memory else 1
        fig, axes = plt.subplots(nrows, len(modes), figsize=(max(7.0, 4.2 * len(modes)), 3.4 * nrows), squeeze=False)
        for col, mode in enumerate(modes):
            in_mode = [r for r in group if r["mode"] == mode]
            for provider in _provider_order(op, {r["provider"] for r in in_mode}):
                points = sorted((r["seq_len"], r["median_ms"], r.get("peak_mib")) for r in in_mode
                                if r["provider"] == provider)
                style = dict(marker="o", linewidth=2.2 if provider in OUR_PROVIDERS else 1.2, label=provider,
                             color=PROVIDER_COLORS.get(provider, "C7"))
                axes[0][col].plot([p[0] for p in points], [p[1] for p in points], **style)
                if has_memory:
                    mem = [(p[0], p[2]) for p in points if p[2]]
                    axes[1][col].plot([m[0] for m in mem], [m[1] for m in mem], **style)
            axes[0][col].set_title(f"{mode}")
            axes[0][col].set_ylabel("median ms")
            if has_memory:
                axes[1][col].set_ylabel("peak MiB")
            lengths = sorted({r["seq_len"] for r in in_mode})
            for row_axes in axes:
                ax = row_axes[col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(lengths, [str(n) for n in lengths])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_xlabel("L")
                ax.grid(True, which="both", alpha=0.3)
        labelled = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                labelled.setdefault(label, handle)
        order = _provider_order(op, labelled)
        fig.legend([labelled[p] for p in order], order, loc="upper right", fontsize=7)
        title = f"{op}, {model}, batch {batch}, {dtype} — {run.env.get('device_name', '')}"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0, 0.88, 1))
        path = os.path.join(plot_dir, f"{prefix}_{_slug(op)}_{_slug(model)}_b{batch}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append((title, path))
    return written


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------

def _environment_lines(run):
    env = run.env
    versions = ", ".join(f"{name} {env[key]}" for name, key in
                         (("torch", "torch"), ("Triton", "triton"), ("CUDA", "cuda"), ("transformers", "transformers"),
                          ("xformers", "xformers"), ("Python", "python")) if env.get(key))
    if env.get("device") == "cuda":
        device = (f"{env.get('device_name')} (compute capability {env.get('capability')}, "
                  f"{env.get('device_memory_gib')} GiB)")
    else:
        device = f"CPU ({env.get('device_name')}, {env.get('cpu_count')} cores)"
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    commit = f"; commit {env['git_commit'][:12]}" if str(env.get("git_commit", "")).strip("0123456789abcdef") == "" \
        and env.get("git_commit") else ""
    lines = [f"- Device: {device}{driver}; {versions}{'' if env.get('xformers') else '; xformers not installed'}.",
             f"- Measured: {run.measured or env.get('date', '?')}; file `{os.path.basename(run.path)}`; "
             f"command: `{run.command or 'pytest benchmarks/ --benchmark-json FILE'}`{commit}."]
    ceilings = run.extra.get("ceilings")
    if ceilings:
        lines.append(f"- Measured ceilings: {ceilings['matmul_dtype']} matmul {ceilings['matmul_n']}³ "
                     f"{_fmt(ceilings['matmul_tflops'])} TFLOP/s; device copy {_fmt(ceilings['copy_tbps'])} TB/s "
                     "(bytes read + written).")
    check = run.extra.get("correctness")
    if check:
        counts = ", ".join(f"{check[key]} {key}" for key in ("passed", "failed", "errors", "skipped") if key in check)
        lines.append(f"- Correctness (`{check.get('command', '')}`, autotuning off): {counts or 'no result'}; exit "
                     f"{check.get('returncode')} in {check.get('wall_s')} s; "
                     f"{'**ok**' if check.get('ok') else '**NOT OK**'}.")
        for failure in check.get("failures", [])[:10]:
            lines.append(f"  - {failure['kind']}: `{failure['test']}`: {failure['message'][:200]}")
    if env.get("device") != "cuda":
        lines.insert(0, "- **CPU smoke run**: the CUDA cases were skipped; the tiny CPU shapes ran the PyTorch path. "
                        "These timings only show that the benchmarks run; they are not performance figures.")
    return lines


def not_measured(run):
    """What a run left out and why: skipped steps and cases (grouped by reason) and errors."""
    lines = []
    for name, section in (run.extra.get("sections") or {}).items():
        if section.get("status") != "done":
            lines.append(f"- step `{name}`: {section.get('status')}" +
                         (f" ({section['reason']})" if section.get("reason") else ""))
    by_reason = defaultdict(set)
    for case in run.extra.get("skipped") or []:
        by_reason[case.get("reason", "?")].add(f"{case.get('provider')} {case.get('op')} {case.get('mode')}")
    for reason, cases in sorted(by_reason.items()):
        lines.append(f"- skipped ({reason}): " + ", ".join(sorted(cases)))
    for error in run.extra.get("errors") or []:
        lines.append(f"- error in {error.get('where')}: `{str(error.get('error'))[:300]}`")
    if not lines:
        return []
    return ["Not measured in this run:", ""] + lines + [""]


METHOD = (
    "- Time: pytest benchmarks: median of pytest-benchmark's rounds, a CUDA round ending with "
    "`torch.cuda.synchronize()`; gpu_suite: median of `triton.testing.do_bench` (warmup 25 ms, rep 100 ms, "
    "L2 flushed between runs), the training step the median of 3 steps. "
    "`forward` runs under no_grad; `full` = forward + dq, dk, dv; `backward` times the gradient computation "
    "alone (the forward runs untimed before every round).\n"
    "- TFLOP/s: attention FLOPs only (docs/kernels.md: causal forward 2·B·H·L²·D, backward 2.5×, full 3.5×), so "
    "providers that also compute slices show lower TFLOP/s for their extra work. "
    f"H100/H200 bf16 matmul ceiling ~790 TFLOP/s; published FA2 causal forward at d=128 {FA2_CAUSAL_FWD}.\n"
    "- Peak: `torch.cuda.max_memory_allocated()` after a reset, minus the memory allocated before the step "
    "(inputs, and in the training step the models, are not counted); in `backward` it covers the untimed "
    "forward too, whose saved tensors the backward needs.\n"
    "- `× b`: time of baseline b / time of this row (above 1: this row is faster); `mem ÷ b`: peak of b / "
    "peak of this row. Recomputed from the medians in the JSON.")


def render(runs, plot_dir, out_path, argv):
    parts = [BEGIN, "## Generated benchmark report", "",
             f"Written by `python -m benchmarks.report {' '.join(shlex.quote(a) for a in argv)}` on "
             f"{datetime.date.today().isoformat()}. Everything between the report markers is regenerated; the "
             "rest of this file is kept.", "", METHOD, ""]
    for run in runs:
        rows = with_ratios(run.rows)
        kind = run.env.get("device_name") if run.env.get("device") == "cuda" else "CPU smoke"
        parts += [f"### Run: {kind}, {run.measured[:10] or run.env.get('date', '')}", ""]
        parts += _environment_lines(run) + [""]
        parts += [targets(rows, run.env, run.ceiling), ""]
        for section in attention_tables(rows, run.ceiling) + train_tables(rows):
            parts += [section, ""]
        parts += not_measured(run)
        if plot_dir:
            plots = plot_run(run, rows, plot_dir)
            base = os.path.dirname(os.path.abspath(out_path))
            parts += ["Plots (time and peak memory against L, per provider):", ""]
            parts += [f"![{title}]({os.path.relpath(os.path.abspath(path), base)})" for title, path in plots] + [""]
    parts.append(END)
    return "\n".join(parts) + "\n"


def write_report(text, out_path):
    """Replace the marked section of out_path with text (appending it when there are no markers)."""
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as fh:
            old = fh.read()
        if BEGIN in old and END in old and old.index(BEGIN) < old.index(END):
            new = old[:old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):]
        elif BEGIN in old or END in old:
            raise ValueError(f"--out {out_path}: has only one of the markers {BEGIN} / {END}, or them out of order")
        else:
            new = old.rstrip("\n") + "\n\n" + text
    else:
        new = "# Benchmark results\n\n" + text
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        fh.write(new if new.endswith("\n") else new + "\n")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="pytest-benchmark JSON → Markdown tables and PNG plots")
    parser.add_argument("--json", nargs="+", required=True, metavar="FILE",
                        help="pytest-benchmark JSON file(s) from `pytest benchmarks/ --benchmark-json FILE`")
    parser.add_argument("--out", default=os.path.join("benchmarks", "RESULTS.md"),
                        help="Markdown file; the section between the report markers is replaced (default %(default)s)")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="folder for the PNG plots (default: plots/ next to --out)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = parser.parse_args(argv)
    plot_dir = None if args.no_plots else (args.plots or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                                      "plots"))
    try:
        runs = [load_run(path) for path in args.json]
        text = render(runs, plot_dir, args.out, argv)
        write_report(text, args.out)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.out}" + (f" and plots in {plot_dir}" if plot_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
