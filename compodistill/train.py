"""`python -m compodistill.train`: train one stage, a chain of stages, or (with no arguments) the demo.

    python -m compodistill.train                                      # the miniature demo on the CPU
    python -m compodistill.train --config compodistill/configs/dft.yaml optim.lr=1e-4 train.max_steps=100
    python -m compodistill.train --config dft --resume                # continue from the newest good checkpoint
    python -m compodistill.train --pipeline compodistill --root runs  # DPT → DFT → SFT
    python -m compodistill.train --pipeline ablations                 # the full miniature reproduction
    accelerate launch -m compodistill.train --config dft              # DDP / FSDP / DeepSpeed via accelerate

Options and `key=value` overrides may come in any order. Overrides are parsed as YAML and apply to the
stage's config (every stage of a pipeline). In a pipeline each stage starts from the previous stage's
`final/` model, writes to `<root>/<stage>`, and learns from `<root>/teacher-finetune/final` unless
`model.teacher=...` says otherwise.
"""
from __future__ import annotations

import argparse
import sys

from .training import PIPELINES, describe, load_config, packaged_config_names, pipeline_plan, run_plan

EXPERIMENTS = ("ablations",)
DEFAULT_ROOTS = {"pipeline": "runs", "ablations": "runs/miniature", "demo": "runs/demo"}
# Options that only some modes take: given to another mode, they are an error rather than ignored.
MODE_OPTIONS = {"quick": ("demo",), "from_scratch": ("demo",), "scale": ("ablations",), "seeds": ("ablations", "demo"),
                "results": ("ablations",), "root": ("pipeline", "ablations", "demo")}


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m compodistill.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"packaged configs: {', '.join(packaged_config_names())}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. optim.lr=1e-4)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--config", help="a stage YAML, or the name of a packaged one (dpt, dft, sft, ...)")
    mode.add_argument("--pipeline", choices=sorted(PIPELINES) + list(EXPERIMENTS),
                      help="a chain of packaged stages, or 'ablations': the full miniature reproduction")
    parser.add_argument("--root", default=None,
                        help=f"output root (default: {DEFAULT_ROOTS['pipeline']} for a pipeline, "
                             f"{DEFAULT_ROOTS['ablations']} for ablations, {DEFAULT_ROOTS['demo']} for the demo)")
    parser.add_argument("--resume", action="store_true",
                        help="continue: skip finished stages, resume a stopped one from its newest good checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--quick", action="store_true", help="demo: the CI-sized smoke version (about a minute)")
    parser.add_argument("--from-scratch", action="store_true", help="demo: retrain everything found on disk")
    parser.add_argument("--scale", default=None, help="ablations: 'full' (the committed results) or 'smoke'")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="demo/ablations: student seeds")
    parser.add_argument("--results", default=None, help="ablations: the Markdown report to write "
                                                         "(default results/miniature.md)")
    return parser


def _mode(args) -> str:
    if args.config:
        return "config"
    if args.pipeline in EXPERIMENTS:
        return args.pipeline
    return "pipeline" if args.pipeline else "demo"


def _check_mode_options(parser, args, mode):
    for option, modes in MODE_OPTIONS.items():
        value = getattr(args, option)
        if value not in (None, False) and mode not in modes:
            parser.error(f"--{option.replace('_', '-')} applies to {' and '.join(modes)}, not to {mode}")
    if args.overrides and mode not in ("config", "pipeline"):
        parser.error(f"key=value overrides need --config or --pipeline (got {args.overrides[0]!r})")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    mode = _mode(args)
    _check_mode_options(parser, args, mode)
    progress = not args.no_progress
    if not progress:
        _quiet_library_progress_bars()
    root = args.root or DEFAULT_ROOTS.get(mode)
    try:
        if mode == "config":
            results = run_plan([load_config(args.config, args.overrides)], resume=args.resume, progress=progress)
        elif mode == "pipeline":
            results = run_plan(pipeline_plan(args.pipeline, root, args.overrides), resume=args.resume,
                               progress=progress, report=lambda r: print(describe(r)))
        elif mode == "ablations":
            from .experiments.miniature import run_ablations

            run_ablations(root, scale=args.scale or "full", results=args.results or "results/miniature.md",
                          seeds=args.seeds, progress=progress, command=_command(argv))
            return 0
        else:
            from .experiments.demo import run_demo

            return run_demo(root, quick=args.quick, from_scratch=args.from_scratch, seeds=args.seeds,
                            progress=progress)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if all(r.finished for r in results) else 130


def _quiet_library_progress_bars() -> None:
    """--no-progress also hides the bars of datasets (tokenising) and transformers (loading, saving)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _command(argv) -> str:
    import shlex

    words = sys.argv[1:] if argv is None else argv
    return "python -m compodistill.train " + " ".join(shlex.quote(str(w)) for w in words)


if __name__ == "__main__":
    sys.exit(main())
