"""Tables, JSON summaries and figures shared by the experiments.

Numbers come in as per-seed evaluation records {subset: accuracy} with their item counts; they go out as
mean ± standard deviation over seeds (sample standard deviation, n − 1), the binomial standard error of
one run's accuracy √(p(1 − p)/n), and the pooled seed spread of two rows √((s_a² + s_b²)/2).
"""
from __future__ import annotations

import json
import math
import os
import platform


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def pooled_std(a: float, b: float) -> float:
    return math.sqrt((a * a + b * b) / 2.0)


def aggregate(per_seed: list[dict], subsets) -> dict:
    """One row from per-seed records {"cr": {subset: acc}, "count": {subset: n}}: per-subset mean and
    std over seeds, the mean over subsets of each seed and their mean and std, the mean binomial SE."""
    per_seed_means = [sum(r["cr"][s] for s in subsets) / len(subsets) for r in per_seed]
    cr_mean, cr_std = mean_std(per_seed_means)
    cr = {s: mean_std(r["cr"][s] for r in per_seed) for s in subsets}
    se = {s: sum(binomial_se(r["cr"][s], r["count"][s]) for r in per_seed) / len(per_seed) for s in subsets}
    return {"cr": {s: m for s, (m, _) in cr.items()}, "cr_subset_std": {s: v for s, (_, v) in cr.items()},
            "cr_mean": cr_mean, "cr_std": cr_std, "per_seed_cr_mean": per_seed_means, "se": se}


def percent(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def cr_table(rows: dict, subsets, *, with_std: bool = True) -> str:
    """Markdown: one line per model, its mean CR (± seed std) and each subset."""
    lines = ["| model | CR mean | " + " | ".join(subsets) + " |", "|---|---:|" + "---:|" * len(subsets)]
    for name, row in rows.items():
        cells = [percent(row["cr_mean"], row["cr_std"] if with_std else None)]
        cells += [percent(row["cr"][s], row["cr_subset_std"][s] if with_std else None) for s in subsets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def se_table(rows: dict, subsets) -> str:
    lines = ["| model | " + " | ".join(subsets) + " |", "|---|" + "---:|" * len(subsets)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row['se'][s]:.1f}" for s in subsets) + " |")
    return "\n".join(lines)


def write_json(path: str, data) -> None:
    """Atomically: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=list)
    os.replace(path + ".tmp", path)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str, curves: dict, *, xlabel: str, ylabel: str, title: str, chance: float | None = None):
    """Line plot of {label: {x: (mean, std)}} with std bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, points in curves.items():
        xs = sorted(points)
        means = [points[x][0] for x in xs]
        stds = [points[x][1] for x in xs]
        (line,) = ax.plot(xs, means, marker="o", label=label)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.15)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bins(path: str, bins_by_model: dict, *, title: str):
    """Bar groups: mean answer probability per attention-similarity bin, one colour per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    width = 0.8 / max(1, len(bins_by_model))
    for k, (label, bins) in enumerate(bins_by_model.items()):
        xs = [i + k * width for i in range(len(bins))]
        ax.bar(xs, [b["mean_probability"] for b in bins], width=width, label=label)
        for x, b in zip(xs, bins):
            ax.text(x, 0.01, str(b["count"]), ha="center", fontsize=6, rotation=90)
    first = next(iter(bins_by_model.values()), [])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(first))])
    ax.set_xticklabels([f"{b['low']:.2f}–{b['high']:.2f}" for b in first], fontsize=7)
    ax.set_xlabel("attention similarity to the teacher (bin)")
    ax.set_ylabel("mean probability of the true caption winning")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
