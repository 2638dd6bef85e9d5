"""The main job's default, `python -m compodistill.train`: the miniature, quick.

The teacher learns to describe scenes; three students learn from it for the same number of steps from
the same initialisation and batches: SFT (captions only), KD (+ logit distillation) and CompoDistill
(+ visual attention alignment + the teacher's projector). Two seeds each. The run prints the CR table
(caption likelihood, per subset and mean ± std over seeds, with binomial standard errors), the claims
checked against the seed spread, and the layer-wise attention similarity to the teacher, and writes
`<root>/summary.json` and `<root>/results.md` with figures. Everything resumes: a second run reuses
the models on disk (`--from-scratch` retrains).
"""
from __future__ import annotations

import os
import shutil

from . import report
from .miniature import DEMO_VARIANTS, SCALES, figures, run_miniature, text_report, variants_named

# What the demo writes under its root; --from-scratch removes exactly these.
OWNED = ("data", "vision", "teacher", "summary.json", "results.md", "figures", "timings.json")


def run_demo(root: str = "runs/demo", *, quick: bool = False, from_scratch: bool = False, seeds=None,
             progress: bool = True) -> int:
    scale = SCALES["smoke" if quick else "demo"]
    if from_scratch and os.path.isdir(root):
        for name in os.listdir(root):
            if name in OWNED or name.startswith("seed"):
                path = os.path.join(root, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    summary = run_miniature(root, scale=scale, variants=variants_named(DEMO_VARIANTS), seeds=seeds, progress=progress)
    pictures = figures(summary, os.path.join(root, "figures"))
    text = text_report(summary)
    body = [f"# CompoDistill demo ({scale.name} scale)", "", text, "",
            f"{summary['seconds'] / 60:.1f} min; figures: " + ", ".join(os.path.relpath(p, root) for p in pictures.values())]
    report.write_text(os.path.join(root, "results.md"), "\n".join(body) + "\n")
    print("\n" + text)
    print(f"\n[demo] {summary['seconds'] / 60:.1f} min; wrote {root}/summary.json, results.md and figures/")
    return 0
