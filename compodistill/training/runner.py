"""Run a plan: an ordered list of stage configs, each trained by the recipe.

    results = run_plan([dpt_config, dft_config, sft_config], resume=True)

With `resume=True` a stage whose final model is on disk is skipped (its result says "skipped" and
points at the model), and a stage with checkpoints continues from the newest good one; without it every
stage trains from scratch. An interrupted stage (SIGINT/SIGTERM) ends the plan: its result says
"interrupted", and running the same plan again with `resume=True` continues where it stopped.

`pipeline_plan` builds the packaged chains (the teacher's two stages, CompoDistill's DPT → DFT → SFT,
the baselines), each stage starting from the previous stage's final model.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable, Sequence

from .config import StageConfig, evolve, load_config
from .recipe import Recipe, StageResult

PIPELINES = {
    "teacher": ("teacher-pretrain", "teacher-finetune"),
    "compodistill": ("dpt", "dft", "sft"),
    "baselines": ("baseline-sft", "baseline-kd"),
}


def is_finished(config: StageConfig) -> bool:
    """The stage's final model is on disk (it is written to a temporary folder and renamed, so it is
    either complete or absent)."""
    return os.path.isfile(os.path.join(config.final_dir, "config.json"))


def run_stage(config: StageConfig, *, resume: bool = True, progress: bool = True) -> StageResult:
    """One stage; with `resume`, skipped when finished and continued from its checkpoints otherwise."""
    if resume and is_finished(config):
        return StageResult(config.stage, "skipped", config.output_dir, final=config.final_dir,
                           metrics=os.path.join(config.output_dir, "metrics.jsonl"))
    return Recipe(config, resume=resume, progress=progress).run()


def run_plan(plan: Sequence[StageConfig], *, resume: bool = True, progress: bool = True,
             report: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run the stages of `plan` in order; stops after an interrupted stage. Returns one result per stage
    that ran or was skipped; `report(result)` is called after each (e.g. `lambda r: print(describe(r))`)."""
    results = []
    for config in plan:
        result = run_stage(config, resume=resume, progress=progress)
        results.append(result)
        if report is not None:
            report(result)
        if not result.finished:
            break
    return results


def describe(result: StageResult) -> str:
    if result.status == "skipped":
        return f"{result.name}: already finished ({result.final})"
    if result.status == "interrupted":
        return f"{result.name}: interrupted at step {result.step}; checkpoint {result.checkpoint}"
    return f"{result.name}: finished {result.step} steps in {result.seconds:.0f} s → {result.final}"


def _overridden(overrides, key: str) -> bool:
    return any(item.split("=", 1)[0].strip() == key for item in overrides)


def pipeline_plan(name: str, root: str, overrides: Sequence[str] = ()) -> list[StageConfig]:
    """The stages of a packaged pipeline under `root`: stage s writes `<root>/<s>`, starts from the
    previous stage's final model, and (outside the teacher's own pipeline) learns from the teacher
    `<root>/teacher-finetune/final`. `overrides` (key=value) apply to every stage and win over these
    defaults."""
    if name not in PIPELINES:
        raise ValueError(f"--pipeline: expected one of {sorted(PIPELINES)}, got {name!r}")
    overrides = list(overrides)
    plan: list[StageConfig] = []
    for stage in PIPELINES[name]:
        config = load_config(stage, overrides)
        model = config.model
        if plan and not _overridden(overrides, "model.path"):
            model = replace(model, path=plan[-1].final_dir)
        if name != "teacher" and not _overridden(overrides, "model.teacher"):
            model = replace(model, teacher=os.path.join(root, "teacher-finetune", "final"))
        output_dir = config.output_dir if _overridden(overrides, "output_dir") else os.path.join(root, stage)
        plan.append(evolve(config, model=model, output_dir=output_dir))
    return plan
