"""`python -m compodistill.train`: run one stage, a chain of stages, or (with no arguments) the demo.

    python -m compodistill.train                                   # end-to-end demo on the CPU (~11 min on 2 cores)
    python -m compodistill.train --quick                           # the same, small (~2 min)
    python -m compodistill.train --config configs/dft.yaml optim.lr=1e-4 train.max_steps=100
    python -m compodistill.train --pipeline compodistill --root runs   # DPT → DFT → SFT
    python -m compodistill.train --pipeline ablations               # the miniature reproduction → results/miniature.md
    python -m compodistill.train --config dft --resume            # continue from the last checkpoint
    accelerate launch -m compodistill.train --config dft          # DDP / FSDP / DeepSpeed via accelerate

A stage's overrides are `key=value` pairs on its YAML (values parsed as YAML). In a pipeline each stage
starts from the previous stage's `final/` model, writes to `<root>/<stage>`, and uses the teacher
`<root>/teacher-finetune/final` unless `model.teacher=...` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import load_config, packaged_config_names

PIPELINES = {
    "teacher": ("teacher-pretrain", "teacher-finetune"),
    "compodistill": ("dpt", "dft", "sft"),
    "baselines": ("baseline-sft", "baseline-kd"),
}


def pipeline_overrides(pipeline: str, root: str) -> list[tuple[str, list[str]]]:
    """(stage, overrides) for each stage of a named pipeline rooted at `root`."""
    if pipeline not in PIPELINES:
        raise ValueError(f"--pipeline: expected one of {sorted(PIPELINES)}, got {pipeline!r}")
    stages, plan = PIPELINES[pipeline], []
    for i, stage in enumerate(stages):
        overrides = [f"output_dir={root}/{stage}"]
        if i > 0:
            overrides.append(f"model.path={root}/{stages[i - 1]}/final")
        if pipeline != "teacher":
            overrides.append(f"model.teacher={root}/teacher-finetune/final")
        plan.append((stage, overrides))
    return plan


def run_stage(config_name: str, overrides, *, resume=False, progress=True) -> dict:
    from .recipe import Recipe

    config = load_config(config_name, overrides)
    return Recipe(config, resume=resume, progress=progress).run()


def run_pipeline(pipeline: str, root: str, overrides=(), *, resume=False, progress=True) -> list[dict]:
    results = []
    for stage, chain in pipeline_overrides(pipeline, root):
        # With --resume, stages whose final model exists are done; the first unfinished one resumes.
        if resume and os.path.isfile(os.path.join(root, stage, "final", "config.json")):
            print(f"{stage}: already finished ({root}/{stage}/final)")
            continue
        result = run_stage(stage, chain + list(overrides), resume=resume, progress=progress)
        results.append(result)
        if result["status"] != "finished":
            break
    return results


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m compodistill.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"packaged configs: {', '.join(packaged_config_names())}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. optim.lr=1e-4)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--config", help="a stage YAML, or the name of a packaged one (dpt, dft, sft, ...)")
    mode.add_argument("--pipeline", choices=sorted(PIPELINES) + ["ablations"],
                      help="run a chain of stages, or 'ablations': the miniature reproduction (compodistill.miniature)")
    parser.add_argument("--root", default="runs", help="output root of a pipeline (default runs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--quick", action="store_true", help="demo: the small version (~2 min on 2 cores)")
    parser.add_argument("--from-scratch", action="store_true", help="demo: retrain the teacher even if one exists")
    parser.add_argument("--demo-root", default="runs/demo", help="demo: output folder (default runs/demo)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--scale", default="full", help="ablations: 'full' (the committed results) or 'smoke'")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="ablations: seeds (default: the scale's)")
    parser.add_argument("--results", default="results/miniature.md", help="ablations: the Markdown table to write")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = not args.no_progress
    try:
        if args.config:
            result = run_stage(args.config, args.overrides, resume=args.resume, progress=progress)
            return 0 if result["status"] == "finished" else 130
        if args.pipeline == "ablations":
            from .miniature import command_line, run_ablations

            root = args.root if args.root != "runs" else "runs/miniature"
            run_ablations(root, scale=args.scale, results=args.results, seeds=args.seeds, progress=progress,
                          command=command_line(argv if argv is not None else sys.argv[1:]))
            return 0
        if args.pipeline:
            results = run_pipeline(args.pipeline, args.root, args.overrides, resume=args.resume, progress=progress)
            return 0 if all(r["status"] == "finished" for r in results) else 130
        if args.overrides:
            parser.error("overrides need --config or --pipeline")
        from .demo import run_demo

        return run_demo(args.demo_root, quick=args.quick, from_scratch=args.from_scratch, resume=args.resume,
                        progress=progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
