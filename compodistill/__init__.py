"""CompoDistill: distill a large multimodal LLM teacher into a small student with logit KD plus
attention distillation over the visual tokens.

The attention alignment runs in the fused kernels of `compodistill_kernels` (imported separately; the
kernels never import this package). The trainer, models and data are planned; `python -m
compodistill.train` is currently a kernels demo.
"""

__version__ = "0.1.0"
