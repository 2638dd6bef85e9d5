"""Training: the stage config, the recipe that trains one stage, and the runner that chains stages.

    from compodistill.training import load_config, run_plan
    results = run_plan([load_config("dft", ["output_dir=runs/dft"])])
"""
from .checkpoints import latest_checkpoint
from .config import StageConfig, dump_config, evolve, load_config, packaged_config_names
from .metrics import plot_losses, read_metrics
from .recipe import Recipe, StageResult, lr_lambda
from .runner import PIPELINES, describe, is_finished, pipeline_plan, run_plan, run_stage

__all__ = [
    "StageConfig", "load_config", "evolve", "dump_config", "packaged_config_names", "Recipe", "StageResult",
    "lr_lambda", "run_plan", "run_stage", "pipeline_plan", "PIPELINES", "describe", "is_finished",
    "latest_checkpoint", "read_metrics", "plot_losses",
]
