"""Where a LLaVA keeps its parts. The only module that knows transformers' attribute paths.

Every function takes an `MLLM`, a transformers `LlavaForConditionalGeneration` (ours or plain), or
either of those wrapped by peft, so callers never write `model.model.vision_tower` themselves:

    vision_tower(m)     the vision encoder (SigLIP)
    projector(m)        the multimodal projector (a TAFProjector after TAF)
    language_model(m)   the decoder stack (embeddings, layers, final norm), without the LM head
    lm_head(m)          the output projection to the vocabulary
    backbone(m)         vision tower + projector + decoder stack (transformers' LlavaModel)
    text_config(m)      the language model's config

and `CHECKPOINT_KEY_MAPPING`, the renaming from the older checkpoint key layout of LLaVA to the current one.
"""
from __future__ import annotations

from torch import nn


# transformers has written LLaVA checkpoints in two key layouts:
#   older (and what LlavaForConditionalGeneration.save_pretrained still writes in 5.x):
#       language_model.model.*, language_model.lm_head.*, vision_tower.*, multi_modal_projector.*
#   current module names: model.language_model.*, lm_head.*, model.vision_tower.*, model.multi_modal_projector.*
# Passed as from_pretrained(key_mapping=...), it renames the first into the second; keys already in the
# second layout match none of the patterns and pass unchanged.
CHECKPOINT_KEY_MAPPING = {
    r"^language_model\.lm_head\.": "lm_head.",
    r"^language_model\.model\.": "model.language_model.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
}


def unwrap_peft(model):
    """The transformers model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_model(model) -> nn.Module:
    """The transformers model of an `MLLM`, a peft wrapper or the model itself."""
    model = getattr(model, "model", model) if _is_mllm(model) else model
    return unwrap_peft(model)


def _is_mllm(model) -> bool:
    # MLLM is a dataclass holding (model, tokenizer, image_processor); not an nn.Module.
    return not isinstance(model, nn.Module) and hasattr(model, "tokenizer") and hasattr(model, "model")


def backbone(model) -> nn.Module:
    """transformers' LlavaModel: vision tower, projector and decoder stack, no LM head."""
    base = base_model(model)
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "multi_modal_projector"):
        raise ValueError(f"model: expected a LLaVA (LlavaForConditionalGeneration), got {type(base).__name__}")
    return inner


def vision_tower(model) -> nn.Module:
    return backbone(model).vision_tower


def projector(model) -> nn.Module:
    return backbone(model).multi_modal_projector


def set_projector(model, module: nn.Module) -> None:
    backbone(model).multi_modal_projector = module


def language_model(model) -> nn.Module:
    """The decoder stack of a LLaVA, or of a plain causal LM (its `.model`)."""
    base = base_model(model)
    inner = getattr(base, "model", base)
    return getattr(inner, "language_model", inner)


def lm_head(model) -> nn.Module:
    return base_model(model).lm_head


def text_config(model):
    config = base_model(model).config
    return getattr(config, "text_config", config)
