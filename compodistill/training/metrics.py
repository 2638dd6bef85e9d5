"""The run's metrics file (`metrics.jsonl`, one JSON record per logged step) and its loss plot."""
from __future__ import annotations

import json
import os


def append_metrics(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop the records of steps after `last_step` (a resumed run logs them again)."""
    if not os.path.exists(path):
        return
    kept = [record for record in read_metrics(path) if record["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(path + ".tmp", path)


def plot_losses(metrics_path: str, png_path: str, title: str = "") -> str | None:
    """Loss components against the optimizer step, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("loss", "lm", "kd", "vat"):
        if name in records[0]:
            ax.plot([r["step"] for r in records], [r[name] for r in records], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
