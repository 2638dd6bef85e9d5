"""Where each supported Hugging Face VLM family keeps its parts, and strict loading of any of them.

`parts.py` knows one architecture (our LLaVA). The distillation code also has to run on checkpoints of
other families, loaded through `AutoModelForImageTextToText` / `AutoProcessor`, whose modules sit under
different attribute paths and whose processors return different image inputs. A `Family` records those
differences as data (attribute paths, config fields, input keys), so one set of methods serves all:

    family.image_token_ids(config)   ids of the tokens that become visual features in the LM
    family.backbone(model)           vision tower + projector + decoder stack, returns last_hidden_state
    family.vision_tower(model), family.projector(model), family.set_projector(model, module)
    family.language_model(model)     the decoder stack, without the LM head
    family.lm_head(model), family.text_config(model)
    family.model_inputs(batch)       the image inputs of a processor output that the backbone takes
    family.projector_shape(model)    (in, out) of a Linear–act–Linear projector, else None

Supported: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-1.5, InternVL (the transformers-native
format) and Idefics3 / SmolVLM. `family_of(model or config)` picks the family from `config.model_type`;
`load_vlm(path)` loads a local checkpoint folder and refuses one whose weights do not match the model.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .parts import unwrap_peft


def _get_path(root, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _config_of(model_or_config):
    if isinstance(model_or_config, nn.Module):
        return unwrap_peft(model_or_config).config
    return model_or_config


@dataclass(frozen=True)
class Family:
    """One VLM family: how to find its parts and inputs. All paths are relative to the
    `...ForConditionalGeneration` model (after removing a peft wrapper).

    name: the family's name (a key of FAMILIES).
    model_types: the `config.model_type` values of its checkpoints.
    image_token_fields: config fields holding the id(s) of the per-patch image token, the one the
        processor repeats once per visual feature; start/end markers, row separators and video tokens
        are not visual features and are not listed.
    vision_path, projector_path, language_model_path: where the vision encoder, the projector from
        vision features to LM width, and the decoder stack sit. For the Qwen families the projector (the
        patch merger) lives inside the vision encoder module.
    input_keys: the image inputs of a processor output that the backbone's forward takes.
    processor_requires: import names the family's processor needs beyond transformers. transformers 5
        needs torchvision for any video processor; where the processor's video processor is optional,
        `load_processor` builds it for images only without torchvision. SmolVLM's requires a video
        processor (so torchvision) and num2words.
    """

    name: str
    model_types: tuple
    image_token_fields: tuple
    vision_path: str
    projector_path: str | None
    language_model_path: str
    input_keys: tuple
    processor_requires: tuple = ()

    def missing_requirements(self) -> tuple:
        """The packages of `processor_requires` that are not installed here."""
        return tuple(name for name in self.processor_requires if importlib.util.find_spec(name) is None)

    def image_token_ids(self, config) -> tuple:
        """The id(s) whose positions in input_ids carry visual features (config or model)."""
        config = _config_of(config)
        ids = []
        for field in self.image_token_fields:
            value = getattr(config, field, None)
            if value is None:
                raise ValueError(f"config: a {self.name} config needs {field!r} (the image token id), found none")
            ids.append(int(value))
        return tuple(ids)

    def _base(self, model):
        base = unwrap_peft(model)
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        if model_type not in self.model_types:
            raise ValueError(f"model: expected a {self.name} model (model_type in {self.model_types}), "
                             f"got {type(base).__name__} with model_type {model_type!r}")
        return base

    def backbone(self, model) -> nn.Module:
        """The `...Model` inside the conditional-generation model: vision tower, projector and decoder
        stack; its forward returns `last_hidden_state` (no LM head)."""
        return self._base(model).model

    def vision_tower(self, model) -> nn.Module:
        return _get_path(self._base(model), self.vision_path)

    def projector(self, model) -> nn.Module | None:
        if self.projector_path is None:
            return None
        return _get_path(self._base(model), self.projector_path)

    def set_projector(self, model, module: nn.Module) -> None:
        """Replace the projector (e.g. by a teacher-adapter fetch); the module must map the same vision
        features to the same LM width."""
        if self.projector_path is None:
            raise ValueError(f"model: a {self.name} model has no separate projector to replace")
        parent_path, _, name = self.projector_path.rpartition(".")
        setattr(_get_path(self._base(model), parent_path), name, module)

    def language_model(self, model) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm), without the LM head."""
        return _get_path(self._base(model), self.language_model_path)

    def lm_head(self, model) -> nn.Module:
        return self._base(model).lm_head

    def text_config(self, model):
        return self._base(model).config.text_config

    def model_inputs(self, batch: dict, dtype: torch.dtype | None = None) -> dict:
        """The image inputs among `batch` (a processor output or collated batch) that the backbone's
        forward takes besides input_ids and attention_mask. Floating tensors (pixels) are cast to
        `dtype` when given, since processors return fp32 whatever the model runs in."""
        picked = {}
        for key in self.input_keys:
            value = batch.get(key)
            if value is None:
                continue
            if dtype is not None and torch.is_tensor(value) and value.is_floating_point():
                value = value.to(dtype)
            picked[key] = value
        return picked

    def projector_shape(self, model) -> tuple | None:
        """(in_features, out_features) of the projector when it is a two-layer MLP (Linear, activation,
        Linear, possibly behind a norm), else None. Only such a projector can be fetched from a teacher
        into a student: its input is the shared vision feature width and its output the LM width."""
        projector = self.projector(model)
        if projector is None:
            return None
        linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
        if len(linears) != 2:
            return None
        return (linears[0].in_features, linears[-1].out_features)


# Qwen: mm_token_type_ids marks image/video tokens for the multimodal RoPE positions; without it the
# model warns and falls back to text positions. OneVision: batch_num_images switches off anyres tiling
# for samples with several images, as its processor does when it counts their tokens.
_QWEN_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
_ONEVISION_INPUTS = ("pixel_values", "image_sizes", "batch_num_images")
_IDEFICS_INPUTS = ("pixel_values", "pixel_attention_mask")

FAMILIES: dict = {
    family.name: family
    for family in (
        Family("qwen2_vl", ("qwen2_vl",), ("image_token_id",), "model.visual", "model.visual.merger",
               "model.language_model", _QWEN_INPUTS),
        Family("qwen2_5_vl", ("qwen2_5_vl",), ("image_token_id",), "model.visual", "model.visual.merger",
               "model.language_model", _QWEN_INPUTS),
        Family("qwen3_vl", ("qwen3_vl",), ("image_token_id",), "model.visual", "model.visual.merger",
               "model.language_model", _QWEN_INPUTS),
        Family("llava_onevision", ("llava_onevision",), ("image_token_index",), "model.vision_tower",
               "model.multi_modal_projector", "model.language_model", _ONEVISION_INPUTS),
        Family("llava", ("llava",), ("image_token_index",), "model.vision_tower", "model.multi_modal_projector",
               "model.language_model", ("pixel_values",)),
        Family("internvl", ("internvl",), ("image_token_id",), "model.vision_tower", "model.multi_modal_projector",
               "model.language_model", ("pixel_values",)),
        Family("idefics3", ("idefics3",), ("image_token_id",), "model.vision_model", "model.connector",
               "model.text_model", _IDEFICS_INPUTS),
        Family("smolvlm", ("smolvlm",), ("image_token_id",), "model.vision_model", "model.connector",
               "model.text_model", _IDEFICS_INPUTS, ("torchvision", "num2words")),
    )
}

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES.values() for model_type in family.model_types}


def family_of(model_or_config) -> Family:
    """The Family of a model (peft-wrapped or not) or of its config, from `config.model_type`."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"model_type {model_type!r} is not a supported VLM family; supported: "
                         f"{sorted(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


@dataclass
class VLM:
    """A loaded checkpoint: the transformers model, its processor and its family."""

    model: Any
    processor: Any
    family: Family


def load_vlm(path, *, torch_dtype=None) -> VLM:
    """Load a local VLM checkpoint folder with `AutoModelForImageTextToText` and `AutoProcessor`.

    Strict: a weight the model expects but the checkpoint lacks, a checkpoint weight the model has no
    place for, or one of the wrong shape raises ValueError. transformers would otherwise initialise the
    missing ones at random and go on, and a distillation run would train from a half-random teacher.
    Weights tied to a loaded one (lm_head.weight with tie_word_embeddings) are not missing.
    A folder that does not exist or holds no config.json is a ValueError, and so is an unsupported
    model_type; ImportError when the family's processor needs a package that is not installed.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not an existing checkpoint folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"path: {path!r} has no config.json; expected a save_pretrained folder")
    family = family_of(AutoConfig.from_pretrained(path))
    missing = family.missing_requirements()
    if missing:
        # Checked first: transformers would fail later, inside AutoProcessor, with an unrelated message.
        raise ImportError(f"{family.name}: its processor needs {', '.join(missing)} (pip install {' '.join(missing)})")
    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    # ignore_mismatched_sizes only keeps transformers from raising its own RuntimeError first: a wrong
    # shape is reported in the loading info and refused by _check_loading like a missing weight.
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True,
                                                              ignore_mismatched_sizes=True, **kwargs)
    _check_loading(path, model, info)
    return VLM(model=model.eval(), processor=load_processor(path), family=family)


def image_only_processor_class(processor_class):
    """A subclass of a transformers processor class without its video processor.

    In transformers 5 a processor whose __init__ takes a video_processor cannot be built or loaded
    without torchvision (the video processors' base class needs it), even to process images only. The
    subclass drops video_processor from the processor's attributes: it is built from the tokenizer and
    the image processor alone, saves and loads them as the full class does, and processes text and
    images exactly as the full processor; videos are not supported by it.
    """
    import inspect

    parameter = inspect.signature(processor_class.__init__).parameters.get("video_processor")
    if "video_processor" not in processor_class.get_attributes() or (
            parameter is not None and parameter.default is inspect.Parameter.empty):
        return processor_class

    attributes = [name for name in processor_class.get_attributes() if name != "video_processor"]

    class ImageOnlyProcessor(processor_class):
        @classmethod
        def get_attributes(cls):
            return list(attributes)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    ImageOnlyProcessor.__module__ = processor_class.__module__
    return ImageOnlyProcessor


def load_processor(path):
    """The processor of a local checkpoint folder: `AutoProcessor`, or where that cannot load the video
    processor (torchvision is not installed, or the folder holds none) the same processor class for
    images only (`image_only_processor_class`)."""
    import json

    import transformers
    from transformers import AutoProcessor

    path = os.fspath(path)
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ImportError, AttributeError, TypeError, ValueError) as error:
        config_file = os.path.join(path, "processor_config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"path: {path!r} holds no processor (processor_config.json): {error}") from error
        with open(config_file) as f:
            name = json.load(f).get("processor_class")
        processor_class = getattr(transformers, name or "", None)
        if processor_class is None or "video_processor" not in processor_class.get_attributes():
            raise
        return image_only_processor_class(processor_class).from_pretrained(path)


def _check_loading(path: str, model: nn.Module, info: dict) -> None:
    missing = set(info.get("missing_keys") or ()) - _tied_to_loaded(model, set(info.get("missing_keys") or ()))
    problems = []
    if missing:
        problems.append(f"missing {sorted(missing)}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {sorted(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append("wrong shape " + ", ".join(f"{key} {tuple(saved)} vs {tuple(expected)}"
                                                   for key, saved, expected in sorted(info["mismatched_keys"])))
    for field in ("error_msgs", "conversion_errors"):
        if info.get(field):
            problems.append(f"{field} {info[field]}")
    if problems:
        raise ValueError(f"checkpoint {path!r} does not match its model: " + "; ".join(problems))


def _tied_to_loaded(model: nn.Module, missing: set) -> set:
    """The missing keys whose parameter is the same tensor as a parameter that was loaded."""
    names_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    tied = set()
    for names in names_of.values():
        if len(names) > 1 and any(name not in missing for name in names):
            tied.update(name for name in names if name in missing)
    return tied


def visual_index(input_ids: torch.Tensor, image_token_ids) -> torch.Tensor:
    """(B, Nv) int64: row b holds the ascending positions of sample b's visual tokens, padded at the end
    with -1; Nv is the largest count in the batch (at least 1, so a batch without images still gives a
    well-formed index)."""
    if not torch.is_tensor(input_ids) or input_ids.ndim != 2 or input_ids.is_floating_point() or input_ids.is_complex():
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a (B, L) integer tensor, got {shape}")
    ids = torch.as_tensor(tuple(int(i) for i in image_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    visual = torch.isin(input_ids, ids)
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    # Non-visual positions are pushed past every visual one, so an ascending sort puts the visual first.
    order = torch.where(visual, positions, positions + length).sort(dim=1).values
    count = max(int(visual.sum(dim=1).max()) if visual.numel() else 0, 1)
    order = order[:, :count]
    if order.shape[1] < count:  # an empty sequence: one column of padding
        order = torch.nn.functional.pad(order, (0, count - order.shape[1]), value=length)
    return torch.where(order < length, order, torch.full_like(order, -1)).to(torch.int64)
