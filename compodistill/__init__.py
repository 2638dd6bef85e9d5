"""CompoDistill: distill a large multimodal LLM teacher into a small student with logit KD plus
attention distillation over the visual tokens (VAT) and the teacher's projector (TAF).

Layers, each importing only the ones before it:

- `compodistill_kernels` (a separate package): the fused attention kernels; they never import this one.
- `compodistill.models`, `compodistill.data`, `compodistill.distill`: models and checkpoints, data and
  benchmarks, the losses (KD, VAT, TAF) and the distiller.
- `compodistill.training`: typed stage configs, the recipe and the one stage runner
  (`python -m compodistill.train`); `compodistill.evaluate` scores saved models.
- `compodistill.experiments`: the miniature reproduction and the demo built on the runner.
"""

__version__ = "0.1.0"
