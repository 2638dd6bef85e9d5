"""Distillation losses: VAT (layer matching and attention alignment), logit KD, and the Distiller."""
from .distiller import DistillConfig, Distiller, KDConfig, LossWeights, check_compatible
from .kd import KD_KINDS, lm_and_kd_losses
from .layers import LayerMatch, adaptive_match, match_layers, target_layers
from .vat import VAT_PRESETS, VATConfig, query_rows, slice_loss

__all__ = [
    "DistillConfig", "LossWeights", "KDConfig", "Distiller", "check_compatible", "KD_KINDS", "lm_and_kd_losses",
    "LayerMatch", "adaptive_match", "match_layers", "target_layers", "VAT_PRESETS", "VATConfig",
    "query_rows", "slice_loss",
]
