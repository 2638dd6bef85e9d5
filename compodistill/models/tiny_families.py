"""Tiny random checkpoints of every supported VLM family, built offline.

`build_tiny_pair(family, folder)` writes a teacher and a student checkpoint folder (model weights,
config and processor, as `save_pretrained` writes them) that `families.load_vlm` loads back through
`AutoModelForImageTextToText` / `AutoProcessor`, exactly like a downloaded checkpoint. Tests, the
documentation examples and users who want a smoke test of a family use them, since no weights can be
downloaded here.

What the pair mirrors of a real teacher/student setup:

- the two share the vision encoder configuration and the processor (tokenizer, image processor, chat
  template), so a batch processed once has the same input_ids and image tokens for both;
- their language models differ in depth and width (teacher 4 layers × 64, student 2 layers × 32), both
  with grouped-query attention, and so do the projectors that map vision features into them;
- each family keeps its own image processing: dynamic resolution for the Qwen families, anyres grids for
  LLaVA-OneVision, tiling for InternVL and Idefics3/SmolVLM, a fixed square crop for LLaVA-1.5. Images
  of different sizes therefore give different numbers of visual tokens where the real family does.

Everything is tiny (one or two vision layers of width 32, 8–16 pixel patches, 32–64 pixel tiles), so a
forward of a batch takes milliseconds on a CPU. The image processors are the PIL variants and the
processors are built for images only (`families.image_only_processor_class`), so none needs torchvision.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .families import FAMILIES, image_only_processor_class
from .tokenizer import build_tiny_tokenizer

# Teacher and student language models: (layers, hidden, attention heads, key/value heads, MLP width).
# head_dim is 16 for the teacher and 8 for the student; both use GQA (2 query heads per key/value head).
TEACHER_LM = (4, 64, 4, 2, 128)
STUDENT_LM = (2, 32, 4, 2, 64)

# The vision encoder both share: width 32, 2 heads (head_dim 16), MLP width 64.
_VISION_WIDTH, _VISION_HEADS, _VISION_MLP = 32, 2, 64

# Square tile / crop side and patch side of the fixed-tile families (LLaVA, OneVision, InternVL,
# Idefics3, SmolVLM): 32 / 8 gives 16 patches per tile.
_TILE, _PATCH = 32, 8

# Tokenizer vocabulary before the family's special tokens are added; the LM vocabulary is rounded up.
_BASE_VOCAB = 512

QWEN_TOKENS = {
    "vision_start_token": "<|vision_start|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_end_token": "<|vision_end|>",
}
INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "context_image_token": "<IMG_CONTEXT>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}
IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", "<video>"] + [
    f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)
]


def _chat_template(turn: str, end: str, image: str, generation: str, roles: dict | None = None) -> str:
    """A Jinja chat template for messages whose content is a string or a list of {"type": "text" |
    "image"} items, the form processors' apply_chat_template takes.

    turn: what opens a turn, with `ROLE` where the role's name goes; end: what closes a turn;
    image: what one image item becomes (the family's placeholder, which the processor then expands);
    generation: the opening of the assistant turn for add_generation_prompt;
    roles: how roles are written ({"user": "USER"}); a role not listed is written as it is.
    """
    before, after = turn.split("ROLE")
    literal = json.dumps  # a JSON string or object is also a Jinja literal
    return (
        "{% set names = " + literal(roles or {}) + " %}"
        "{% for message in messages %}"
        "{{ " + literal(before) + " + names.get(message['role'], message['role']) + " + literal(after) + " }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ " + literal(image) + " }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ " + literal(end) + " }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + literal(generation) + " }}{% endif %}"
    )


# ChatML (Qwen, LLaVA-OneVision, InternVL), LLaVA-1.5's "USER: ... ASSISTANT:" and Idefics3's turns.
def _chatml(image: str) -> str:
    return _chat_template("<|im_start|>ROLE\n", "<|im_end|>\n", image, "<|im_start|>assistant\n")


LLAVA_TEMPLATE = _chat_template("ROLE: ", "\n", "<image>\n", "ASSISTANT:", {"user": "USER", "assistant": "ASSISTANT"})
IDEFICS_TEMPLATE = _chat_template("ROLE:", "<end_of_utterance>\n", "<image>", "Assistant:",
                                  {"user": "User", "assistant": "Assistant"})


def build_family_tokenizer(named: dict | None = None, extra: list | None = None):
    """The tiny byte-level BPE tokenizer of `tokenizer.build_tiny_tokenizer` plus a family's special tokens.

    named: {attribute: token}: special tokens that the family's processor reads as tokenizer attributes
        (InternVL's `start_image_token`, Qwen's `image_token`, ...); `tokenizer.<attribute>_id` then
        gives their ids, and both survive save_pretrained / from_pretrained.
    extra: further special tokens, looked up by their text only (Idefics3's row/column tags).
    """
    from transformers import PreTrainedTokenizerFast

    base = build_tiny_tokenizer(_BASE_VOCAB)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token=base.pad_token,
                                        eos_token=base.eos_token, extra_special_tokens=dict(named or {}))
    # Named tokens replace the unnamed list given at construction; the base ones are added back after.
    unnamed = [tok for tok in list(base.extra_special_tokens) + list(extra or []) if tok not in tokenizer.all_special_tokens]
    tokenizer.add_special_tokens({"extra_special_tokens": unnamed}, replace_extra_special_tokens=False)
    return tokenizer


def _vocab_size(tokenizer) -> int:
    # Rounded up so that teacher and student agree whatever tokens a family adds.
    return -(-len(tokenizer) // 64) * 64


@dataclass(frozen=True)
class _LM:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def text_config(self, tokenizer, **extra) -> dict:
        """Keyword arguments of a Qwen2/Llama-style text config of this size."""
        return dict(
            vocab_size=_vocab_size(tokenizer), hidden_size=self.hidden, intermediate_size=self.mlp,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None, **extra,
        )

    def mrope(self, theta: float = 10000.0, **extra) -> dict:
        """rope_parameters with a multimodal-RoPE section split of this head_dim (temporal, height, width)."""
        half = self.head_dim // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        return {"rope_type": "default", "rope_theta": theta, "mrope_section": section, **extra}


def _vision_common() -> dict:
    return dict(hidden_size=_VISION_WIDTH, intermediate_size=_VISION_MLP, num_hidden_layers=1,
                num_attention_heads=_VISION_HEADS)


def _qwen_image_processor(patch: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch * 2  # one LM token per 2×2 patches
    # min 2×2 tokens, max 5×5: a 64×64 image gives 4 tokens, a 128×96 one 12 to 15 (dynamic resolution).
    return Qwen2VLImageProcessorPil(size={"shortest_edge": (2 * factor) ** 2, "longest_edge": (5 * factor) ** 2},
                                    patch_size=patch, temporal_patch_size=2, merge_size=2)


def _image_only(processor_name: str):
    import transformers

    return image_only_processor_class(getattr(transformers, processor_name))


def _qwen_processor(processor_name: str, patch: int):
    tokenizer = build_family_tokenizer(QWEN_TOKENS)
    image = QWEN_TOKENS["vision_start_token"] + QWEN_TOKENS["image_token"] + QWEN_TOKENS["vision_end_token"]
    return _image_only(processor_name)(image_processor=_qwen_image_processor(patch), tokenizer=tokenizer,
                                       chat_template=_chatml(image))


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids(QWEN_TOKENS["image_token"]), video_token_id=ids(QWEN_TOKENS["video_token"]),
                vision_start_token_id=ids(QWEN_TOKENS["vision_start_token"]),
                vision_end_token_id=ids(QWEN_TOKENS["vision_end_token"]))


def _qwen2_vl(lm: _LM, processor):
    from transformers import Qwen2VLConfig

    tok = processor.tokenizer
    return Qwen2VLConfig(
        text_config=lm.text_config(tok, rope_parameters=lm.mrope()),
        vision_config=dict(depth=1, embed_dim=_VISION_WIDTH, hidden_size=lm.hidden, num_heads=_VISION_HEADS,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_qwen_ids(tok),
    )


def _qwen2_5_vl(lm: _LM, processor):
    from transformers import Qwen2_5_VLConfig

    tok = processor.tokenizer
    # Two vision blocks: the first attends within 56-pixel windows, the second to the whole image.
    return Qwen2_5_VLConfig(
        text_config=lm.text_config(tok, rope_parameters=lm.mrope()),
        vision_config=dict(depth=2, hidden_size=_VISION_WIDTH, intermediate_size=_VISION_MLP, num_heads=_VISION_HEADS,
                           out_hidden_size=lm.hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=56, fullatt_block_indexes=[1]),
        **_qwen_ids(tok),
    )


def _qwen3_vl(lm: _LM, processor):
    from transformers import Qwen3VLConfig

    tok = processor.tokenizer
    # Two vision blocks; the first one's features also enter the LM ("deepstack").
    return Qwen3VLConfig(
        text_config=lm.text_config(tok, head_dim=lm.head_dim, rope_parameters=lm.mrope(mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=_VISION_WIDTH, intermediate_size=_VISION_MLP, num_heads=_VISION_HEADS,
                           out_hidden_size=lm.hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **_qwen_ids(tok),
    )


# LLaVA-OneVision's anyres grids, in pixels: the image is tiled by the best-fitting one, plus a base tile.
_ONEVISION_PINPOINTS = [[_TILE, _TILE], [_TILE, 2 * _TILE], [2 * _TILE, _TILE], [2 * _TILE, 2 * _TILE]]


def _onevision_processor():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = build_family_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    images = LlavaOnevisionImageProcessorPil(size={"height": _TILE, "width": _TILE},
                                             image_grid_pinpoints=_ONEVISION_PINPOINTS)
    return _image_only("LlavaOnevisionProcessor")(image_processor=images, tokenizer=tokenizer,
                                   num_image_tokens=(_TILE // _PATCH) ** 2,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                   chat_template=_chatml("<image>\n"))


def _llava_onevision(lm: _LM, processor):
    from transformers import LlavaOnevisionConfig

    tok = processor.tokenizer
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **lm.text_config(tok)),
        vision_config=dict(model_type="siglip_vision_model", image_size=_TILE, patch_size=_PATCH, **_vision_common()),
        image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )


def _llava_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_family_tokenizer({"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"shortest_edge": _TILE}, crop_size={"height": _TILE, "width": _TILE})
    # CLIP puts a class token before the patches; the "default" strategy drops it again.
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=_PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)


def _llava(lm: _LM, processor):
    from transformers import LlavaConfig

    tok = processor.tokenizer
    # Two CLIP layers, so that vision_feature_layer=-2 (LLaVA-1.5's) is the output of a real layer.
    vision = dict(model_type="clip_vision_model", image_size=_TILE, patch_size=_PATCH, **_vision_common())
    vision["num_hidden_layers"] = 2
    return LlavaConfig(
        text_config=dict(model_type="llama", **lm.text_config(tok)),
        vision_config=vision, image_token_index=tok.image_token_id, image_seq_length=(_TILE // _PATCH) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )


def _internvl_processor():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = build_family_tokenizer(INTERNVL_TOKENS)
    # Tiles of 32 pixels, up to 6 per image plus a thumbnail: the tile count follows the aspect ratio.
    images = GotOcr2ImageProcessorPil(size={"height": _TILE, "width": _TILE}, crop_to_patches=True, min_patches=1,
                                      max_patches=6)
    # 16 patches per tile, pixel-shuffled by 0.5 on each side: 4 LM tokens per tile.
    return _image_only("InternVLProcessor")(image_processor=images, tokenizer=tokenizer,
                                            image_seq_length=(_TILE // _PATCH) ** 2 // 4,
                                            chat_template=_chatml("<IMG_CONTEXT>\n"))


def _internvl(lm: _LM, processor):
    from transformers import InternVLConfig

    tok = processor.tokenizer
    return InternVLConfig(
        text_config=dict(model_type="qwen2", **lm.text_config(tok)),
        vision_config=dict(image_size=[_TILE, _TILE], patch_size=[_PATCH, _PATCH], **_vision_common()),
        image_token_id=tok.context_image_token_id, image_seq_length=(_TILE // _PATCH) ** 2 // 4, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )


def _idefics_image_kwargs() -> dict:
    # Images are resized to at most 64 pixels, split into 32-pixel tiles, plus a global 32-pixel view.
    return dict(do_image_splitting=True, size={"longest_edge": 2 * _TILE}, max_image_size={"longest_edge": _TILE})


def _idefics3_processor():
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_family_tokenizer(extra=IDEFICS_TOKENS)
    return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**_idefics_image_kwargs()), tokenizer=tokenizer,
                             image_seq_len=(_TILE // _PATCH) ** 2 // 4, chat_template=IDEFICS_TEMPLATE)


def _smolvlm_processor():
    from transformers import SmolVLMProcessor, SmolVLMVideoProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tokenizer = build_family_tokenizer(extra=IDEFICS_TOKENS)
    # SmolVLM's processor requires a video processor, which needs torchvision, even for images only.
    videos = SmolVLMVideoProcessor(size={"longest_edge": 2 * _TILE}, max_image_size={"longest_edge": _TILE})
    return SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil(**_idefics_image_kwargs()), tokenizer=tokenizer,
                            video_processor=videos, image_seq_len=(_TILE // _PATCH) ** 2 // 4,
                            chat_template=IDEFICS_TEMPLATE)


def _idefics_config(config_name: str):
    def build(lm: _LM, processor):
        import transformers

        tok = processor.tokenizer
        # scale_factor 2: pixel shuffle merges 2×2 patches, so a 32-pixel tile gives 4 LM tokens.
        return getattr(transformers, config_name)(
            text_config=dict(model_type="llama", **lm.text_config(tok)),
            vision_config=dict(image_size=_TILE, patch_size=_PATCH, **_vision_common()),
            image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
        )
    return build


# family name → (processor builder(), config builder(lm, processor)).
_BUILDERS = {
    "qwen2_vl": (lambda: _qwen_processor("Qwen2VLProcessor", 14), _qwen2_vl),
    "qwen2_5_vl": (lambda: _qwen_processor("Qwen2_5_VLProcessor", 14), _qwen2_5_vl),
    "qwen3_vl": (lambda: _qwen_processor("Qwen3VLProcessor", 16), _qwen3_vl),
    "llava_onevision": (_onevision_processor, _llava_onevision),
    "llava": (_llava_processor, _llava),
    "internvl": (_internvl_processor, _internvl),
    "idefics3": (_idefics3_processor, _idefics_config("Idefics3Config")),
    "smolvlm": (_smolvlm_processor, _idefics_config("SmolVLMConfig")),
}

TINY_FAMILIES = tuple(_BUILDERS)


def build_tiny_processor(family_name: str):
    """The tiny processor (tokenizer, image processor, chat template) of a family, not saved."""
    builders = _builders(family_name)
    missing = FAMILIES[family_name].missing_requirements()
    if missing:
        raise ImportError(f"{family_name}: its processor needs {', '.join(missing)} (pip install {' '.join(missing)})")
    return builders[0]()


def build_tiny_model(family_name: str, processor, *, student: bool = False, seed: int = 0):
    """A randomly initialised tiny model of a family for `processor` (teacher size unless `student`)."""
    from transformers import AutoModelForImageTextToText

    config = _builders(family_name)[1](_LM(*(STUDENT_LM if student else TEACHER_LM)), processor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    return model.eval()


def build_tiny_pair(family_name: str, folder, *, seed: int = 0) -> tuple[str, str]:
    """Write a tiny teacher and student checkpoint of a family under `folder`; returns their paths.

    `folder`/teacher and `folder`/student each hold a model (`save_pretrained`, safetensors) and the
    same processor. The teacher's weights come from `seed`, the student's from `seed + 1`, so the two
    are different random models that see identical inputs.
    """
    processor = build_tiny_processor(family_name)
    paths = []
    for role, student in (("teacher", False), ("student", True)):
        path = os.path.join(os.fspath(folder), role)
        model = build_tiny_model(family_name, processor, student=student, seed=seed + int(student))
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def _builders(family_name: str):
    if family_name not in _BUILDERS:
        raise ValueError(f"family_name: no tiny builder for {family_name!r}; expected one of {TINY_FAMILIES}")
    return _BUILDERS[family_name]
