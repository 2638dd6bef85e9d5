"""LLaVA-style multimodal LLMs: SigLIP vision tower, mlp2x_gelu projector, Qwen2-architecture LM.

Three ways to get one, all returning an `MLLM` (model, tokenizer, image processor):

- `build_from_checkpoints(vision_tower=..., language_model=...)`: local Hugging Face checkpoints of a
  SigLIP model and a Qwen1.5/Qwen2 causal LM, joined by a fresh or loaded projector;
- `load_pretrained(path)`: a folder written by `MLLM.save_pretrained` (or any Qwen2-based LLaVA
  checkpoint in the Hugging Face format);
- `build_preset("tiny-teacher" | "tiny-student")`: small models built offline from configs, with an
  offline tokenizer, for tests and the demo. They go through the same classes as the real models.

`load_mllm(spec)` accepts any of the three forms (a preset name, a folder, or a dict of paths).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import parts
from .tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, build_tiny_tokenizer

SUPPORTED_TEXT_MODELS = ("qwen2",)


class MLPProjector(nn.Module):
    """LLaVA's mlp2x_gelu: Linear(in → out), GELU, Linear(out → out).

    Attribute names match transformers' LlavaMultiModalProjector, so state dicts load either way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_features, out_features, bias=bias)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


class TAFProjector(nn.Module):
    """Teacher adapter fetch: x_v = post(fetched(z)).

    `fetched` is the teacher's trained projector (vision → teacher hidden), kept frozen; `post` is the
    student's trainable Linear(teacher hidden → student hidden).
    """

    def __init__(self, vision_features: int, teacher_hidden: int, student_hidden: int, bias: bool = True):
        super().__init__()
        self.fetched = MLPProjector(vision_features, teacher_hidden, bias=bias)
        self.post = nn.Linear(teacher_hidden, student_hidden, bias=True)

    def forward(self, features):
        return self.post(self.fetched(features))


def _llava_class():
    from transformers import LlavaForConditionalGeneration

    class CompoDistillLlava(LlavaForConditionalGeneration):
        """transformers' LlavaForConditionalGeneration whose projector becomes a `TAFProjector` when
        the config carries `taf_hidden_size` (the teacher's hidden size), so TAF students round-trip
        through `save_pretrained` / `from_pretrained`."""

        def __init__(self, config):
            super().__init__(config)
            taf_hidden = getattr(config, "taf_hidden_size", None)
            if taf_hidden:
                self.model.multi_modal_projector = TAFProjector(
                    _vision_feature_size(config), taf_hidden, config.text_config.hidden_size,
                    bias=config.multimodal_projector_bias,
                )

    return CompoDistillLlava


_LLAVA_CLASS = None


def llava_class():
    """The `CompoDistillLlava` class (built lazily so that importing this module stays cheap)."""
    global _LLAVA_CLASS
    if _LLAVA_CLASS is None:
        _LLAVA_CLASS = _llava_class()
    return _LLAVA_CLASS


def _vision_feature_size(config) -> int:
    layers = config.vision_feature_layer
    return config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))


VISION_FEATURE_STRATEGIES = ("full", "default")


def image_token_count(config) -> int:
    """Visual tokens per image of a LlavaConfig, as transformers' LLaVA produces them.

    The vision tower gives one position per patch, (image_size // patch_size)². With
    vision_feature_select_strategy="full" every position becomes a visual token; with "default" the
    first position is dropped (LLaVA's CLS slot for CLIP towers; SigLIP has no CLS token, so there it
    is a real patch that is lost). A list of vision_feature_layer concatenates the layers' features per
    position (wider features, the same count). Raises ValueError for any other strategy.
    """
    strategy = getattr(config, "vision_feature_select_strategy", "full")
    if strategy not in VISION_FEATURE_STRATEGIES:
        raise ValueError(f"config.vision_feature_select_strategy: expected one of {VISION_FEATURE_STRATEGIES}, "
                         f"got {strategy!r}")
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches - 1 if strategy == "default" else patches


@dataclass
class MLLM:
    """A multimodal model with the tokenizer and image processor that belong to it."""

    model: Any
    tokenizer: Any
    image_processor: Any

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (`image_token_count`): one per vision patch with
        vision_feature_select_strategy="full", one fewer with "default"."""
        return image_token_count(self.model.config)

    def save_pretrained(self, path: str, **kwargs):
        """Write model, tokenizer and image processor to one folder that `load_pretrained` reads."""
        self.model.save_pretrained(path, **kwargs)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


# ---------------------------------------------------------------------------------------------------
# Tiny presets
# ---------------------------------------------------------------------------------------------------

_TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=64, patch_size=16)
_TINY_TEXT_COMMON = dict(max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, attention_dropout=0.0)
PRESETS = {
    # GQA teacher (Qwen2-style), MHA student (Qwen1.5-style); twice the depth, as 40 vs 24 layers.
    "tiny-teacher": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2), vision=_TINY_VISION),
    "tiny-student": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4), vision=_TINY_VISION),
    # The miniature reproduction's pair (compodistill.experiments.miniature): one vision patch per grid
    # cell; a 4-layer teacher of width 128 and a 3-layer student of width 64.
    "miniature-teacher": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4), vision=_TINY_VISION),
    "miniature-student": dict(text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2), vision=_TINY_VISION),
}


def build_preset(name: str, *, seed: int = 0, text_overrides: dict | None = None,
                 vision_overrides: dict | None = None, torch_dtype=None) -> MLLM:
    """Build a named tiny model offline, with random weights drawn from `seed`.

    `text_overrides` / `vision_overrides` replace entries of the preset's Qwen2 / SigLIP configs
    (e.g. {"num_hidden_layers": 6}).
    """
    from transformers import Qwen2Config, SiglipVisionConfig

    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    tokenizer = build_tiny_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64  # rows padded to a multiple of 64, as Qwen pads its embeddings
    text = Qwen2Config(**{"vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None,
                          **_TINY_TEXT_COMMON, **preset["text"], **(text_overrides or {})})
    vision = SiglipVisionConfig(**{**preset["vision"], **(vision_overrides or {})})
    image_processor = _tiny_image_processor(vision.image_size)
    config = _llava_config(vision, text, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1)
    with _seeded(seed):
        model = llava_class()(config)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return MLLM(model.eval(), tokenizer, image_processor)


def _tiny_image_processor(size: int):
    """SigLIP's preprocessing (resize, rescale, normalise to [-1, 1]) on its PIL backend, which needs no
    torchvision."""
    try:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as processor
    except ImportError:  # transformers releases before the PIL/torchvision backend split
        from transformers import SiglipImageProcessor as processor
    return processor(size={"height": size, "width": size})


class _seeded:
    """Fork the global RNG so that building a model from `seed` does not disturb the caller's stream."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.fork = torch.random.fork_rng(devices=[])
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


def _llava_config(vision_config, text_config, image_token_id: int, *, vision_feature_layer: int = -2):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        # SigLIP has no CLS token: every patch is a visual token.
        vision_feature_select_strategy="full",
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------------------------------------
# Real checkpoints
# ---------------------------------------------------------------------------------------------------

def build_from_checkpoints(vision_tower: str, language_model: str, *, projector: str | None = None,
                           vision_feature_layer: int = -2, torch_dtype=None, seed: int = 0) -> MLLM:
    """Join a local SigLIP checkpoint and a local Qwen1.5/Qwen2 causal-LM checkpoint into a LLaVA.

    Args:
        vision_tower: folder of a SigLIP model (e.g. google/siglip-so400m-patch14-384) or of a SigLIP
            vision model; only the vision weights are used.
        language_model: folder of a Qwen2-architecture causal LM (Qwen1.5 and Qwen2 both are); the
            tokenizer comes from here, with `<image>` added as a special token if missing.
        projector: optional file (.bin/.pt/.safetensors) with trained projector weights, in LLaVA's
            original naming (`mm_projector.0/2`) or transformers' (`multi_modal_projector.linear_1/2`),
            with any prefix. Fresh weights (drawn from `seed`) if None.
        vision_feature_layer: which vision hidden state feeds the projector (-2 as in LLaVA).
        torch_dtype: dtype to load the weights in (default float32).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    for arg, path in (("vision_tower", vision_tower), ("language_model", language_model)):
        if not os.path.isdir(path):
            raise ValueError(f"{arg}: expected a local checkpoint folder, {path!r} is not a directory")
    text_config = AutoConfig.from_pretrained(language_model)
    if text_config.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"language_model: expected a Qwen2-architecture checkpoint (model_type in "
                         f"{SUPPORTED_TEXT_MODELS}), got model_type={text_config.model_type!r}")
    vision_config = AutoConfig.from_pretrained(vision_tower)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    if vision_config.model_type != "siglip_vision_model":
        raise ValueError(f"vision_tower: expected a SigLIP checkpoint, got model_type={vision_config.model_type!r}")

    tokenizer = AutoTokenizer.from_pretrained(language_model)
    _prepare_tokenizer(tokenizer)
    dtype = torch_dtype or torch.float32
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=dtype)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    vision = SiglipVisionModel.from_pretrained(vision_tower, dtype=dtype)

    config = _llava_config(vision.config, lm.config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                           vision_feature_layer=vision_feature_layer)
    with torch.device("meta"):
        model = llava_class()(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    with _seeded(seed):
        model.model.multi_modal_projector = MLPProjector(
            _vision_feature_size(config), config.text_config.hidden_size).to(dtype)
    if projector is not None:
        load_projector(model.model.multi_modal_projector, projector)
    leftover = [name for name, p in model.state_dict().items() if p.is_meta]
    if leftover:
        raise RuntimeError(f"weights left uninitialised after assembling the model: {leftover[:5]}")
    image_processor = _image_processor_for(vision_tower, vision.config.image_size)
    return MLLM(model.eval(), tokenizer, image_processor)


def _prepare_tokenizer(tokenizer):
    """Make a Qwen tokenizer fit for LLaVA data: an `<image>` token, a pad token, a chat template."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def _image_processor_for(vision_tower: str, image_size: int):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(vision_tower)
    except (OSError, ValueError):
        # A bare vision checkpoint without preprocessor_config.json: SigLIP's own preprocessing.
        return _tiny_image_processor(image_size)


_PROJECTOR_KEY_NAMES = {"mm_projector.0": "linear_1", "mm_projector.2": "linear_2",
                        "multi_modal_projector.linear_1": "linear_1", "multi_modal_projector.linear_2": "linear_2"}


def load_projector(projector: nn.Module, path: str):
    """Load projector weights saved by LLaVA (`mm_projector.bin`) or by transformers into `projector`."""
    if not os.path.isfile(path):
        raise ValueError(f"projector: expected a weights file, {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    target = projector.fetched if isinstance(projector, TAFProjector) else projector
    mapped = {}
    for key, tensor in state.items():
        for marker, name in _PROJECTOR_KEY_NAMES.items():
            if marker + "." in key:
                mapped[f"{name}.{key.rsplit('.', 1)[1]}"] = tensor
    expected = set(target.state_dict())
    if set(mapped) != expected:
        raise ValueError(f"projector: {path!r} holds {sorted(state)[:6]}, expected weights for "
                         f"{sorted(expected)} (mm_projector.0/2 or multi_modal_projector.linear_1/2)")
    target.load_state_dict(mapped)


def load_pretrained(path: str, *, torch_dtype=None) -> MLLM:
    """Load an `MLLM` from a folder written by `MLLM.save_pretrained` or a Qwen2-based LLaVA checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"path: expected a checkpoint folder with config.json, got {path!r}")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "llava":
        from .families import FAMILIES

        hint = ""
        if any(config.model_type in family.model_types for family in FAMILIES.values()):
            hint = ("; checkpoints of the other VLM families load with models.families.load_vlm and are "
                    "distilled with python -m compodistill.distill_vlm")
        raise ValueError(f"path: expected a LLaVA checkpoint (model_type 'llava'), got {config.model_type!r}{hint}")
    if config.text_config.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(f"path: expected a Qwen2-architecture language model, got "
                         f"{config.text_config.model_type!r}")
    model = _load_llava_weights(path, torch_dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _prepare_tokenizer(tokenizer)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise ValueError(f"path: the tokenizer's {IMAGE_TOKEN} id differs from config.image_token_id "
                         f"{config.image_token_id}")
    image_processor = _image_processor_for(path, config.vision_config.image_size)
    return MLLM(model.eval(), tokenizer, image_processor)


def _load_llava_weights(path: str, dtype):
    """`CompoDistillLlava.from_pretrained(path)` in either LLaVA checkpoint key layout
    (`parts.CHECKPOINT_KEY_MAPPING`), refusing any weight that is missing, unexpected or of the wrong
    shape: a weight transformers would otherwise initialise afresh (or drop) is a ValueError naming it.
    Weights tied to others (an LM head tied to the embeddings) are not missing."""
    # ignore_mismatched_sizes only turns transformers' own error into an entry of `info`, refused below
    # with the others.
    model, info = llava_class().from_pretrained(path, dtype=dtype, key_mapping=parts.CHECKPOINT_KEY_MAPPING,
                                                output_loading_info=True, ignore_mismatched_sizes=True)
    problems = {kind: sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get(kind, ()) or ())
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(keys[:10])}"
                           + (f" (and {len(keys) - 10} more)" if len(keys) > 10 else "")
                           for kind, keys in problems.items())
        if info.get("error_msgs"):
            detail += ("; " if detail else "") + "errors: " + "; ".join(map(str, info["error_msgs"]))[:500]
        raise ValueError(f"path: the checkpoint in {path!r} does not match the model its config describes "
                         f"({detail})")
    return model


def load_mllm(spec, *, torch_dtype=None, seed: int = 0) -> MLLM:
    """One entry point for configs: a preset name, a checkpoint folder, or a dict
    {"vision_tower": path, "language_model": path, "projector": optional path}."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"vision_tower", "language_model", "projector", "vision_feature_layer"}
        if unknown or not {"vision_tower", "language_model"} <= set(spec):
            raise ValueError(f"model: a dict needs keys vision_tower and language_model (optional projector, "
                             f"vision_feature_layer), got {sorted(spec)}")
        return build_from_checkpoints(**spec, torch_dtype=torch_dtype, seed=seed)
    if isinstance(spec, str) and spec in PRESETS:
        return build_preset(spec, seed=seed, torch_dtype=torch_dtype)
    if isinstance(spec, str) and os.path.isdir(spec):
        return load_pretrained(spec, torch_dtype=torch_dtype)
    raise ValueError(f"model: expected a preset name {sorted(PRESETS)}, a checkpoint folder, or a dict of "
                     f"checkpoint paths; got {spec!r}")


# ---------------------------------------------------------------------------------------------------
# TAF
# ---------------------------------------------------------------------------------------------------

def apply_taf(student: MLLM, teacher: MLLM, *, seed: int = 0) -> MLLM:
    """Give the student the teacher's projector (frozen) followed by a fresh trainable
    Linear(teacher hidden → student hidden), in place. Returns the student."""
    s_cfg, t_cfg = student.model.config, teacher.model.config
    if _vision_feature_size(s_cfg) != _vision_feature_size(t_cfg) or \
            s_cfg.vision_feature_layer != t_cfg.vision_feature_layer:
        raise ValueError("teacher: TAF needs the same vision features in teacher and student "
                         f"(sizes {_vision_feature_size(t_cfg)} vs {_vision_feature_size(s_cfg)}, layers "
                         f"{t_cfg.vision_feature_layer} vs {s_cfg.vision_feature_layer})")
    teacher_projector = parts.projector(teacher)
    if isinstance(teacher_projector, TAFProjector):
        raise ValueError("teacher: its projector is itself a TAF projector; use a teacher with a plain projector")
    teacher_hidden = t_cfg.text_config.hidden_size
    ref = next(student.model.parameters())
    with _seeded(seed):
        taf = TAFProjector(_vision_feature_size(s_cfg), teacher_hidden, s_cfg.text_config.hidden_size,
                           bias=s_cfg.multimodal_projector_bias)
    taf.fetched.load_state_dict(copy.deepcopy(teacher_projector.state_dict()))
    taf.fetched.requires_grad_(False)
    parts.set_projector(student, taf.to(device=ref.device, dtype=ref.dtype))
    s_cfg.taf_hidden_size = teacher_hidden
    return student


def enable_gradient_checkpointing(model):
    """Checkpoint every decoder layer, non-reentrant. The VAT losses leave the layers through the
    attention probe rather than through the layer outputs; reentrant checkpointing would run the first
    pass under no_grad and silently drop their gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# ---------------------------------------------------------------------------------------------------
# Visual-token positions
# ---------------------------------------------------------------------------------------------------

def visual_token_positions(input_ids: torch.Tensor, image_token_id: int, num_image_tokens: int | None = None):
    """Per-sample start of the image tokens: (visual_start (B,) long, visual_len int).

    Every sample must hold exactly one contiguous run of `image_token_id`, of the same length
    (`num_image_tokens` if given). Left padding and prompts of different lengths are fine: the start
    is found per sample.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected (B, L), got shape {tuple(input_ids.shape)}")
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    first = torch.where(is_image, positions, input_ids.shape[1]).amin(1)
    last = torch.where(is_image, positions, -1).amax(1)
    counts_l, first_l, last_l = counts.tolist(), first.tolist(), last.tolist()
    for b, (n, lo, hi) in enumerate(zip(counts_l, first_l, last_l)):
        if n == 0:
            raise ValueError(f"input_ids: sample {b} has no image token (id {image_token_id})")
        if hi - lo + 1 != n:
            raise ValueError(f"input_ids: sample {b} has {n} image tokens that are not contiguous "
                             f"(positions {lo}..{hi}); expected one image per sample")
    if len(set(counts_l)) != 1:
        raise ValueError(f"input_ids: samples have different image token counts {counts_l}")
    if num_image_tokens is not None and counts_l[0] != num_image_tokens:
        raise ValueError(f"input_ids: {counts_l[0]} image tokens per sample, the vision tower gives "
                         f"{num_image_tokens}")
    return first, counts_l[0]
