"""Loading LLaVA checkpoints written by plain transformers: both key layouts, tied and untied heads, no
weight ever lost or invented silently, and the image-token count of each feature-selection strategy."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from compodistill.data.chat import encode_prompt
from compodistill.models import IMAGE_TOKEN, build_tiny_tokenizer, load_mllm
from compodistill.models.mllm import _tiny_image_processor, image_token_count

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _plain_llava(*, tied: bool, strategy: str = "full", feature_layer=-1, seed: int = 0):
    """A plain transformers LlavaForConditionalGeneration (Qwen2 text, SigLIP vision) and its tokenizer."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    tokenizer = build_tiny_tokenizer()
    text = Qwen2Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    config = LlavaConfig(text_config=text, vision_config=vision,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that no weight can go missing unnoticed
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model, tokenizer


def _legacy_key(key: str) -> str:
    # model.language_model.* -> language_model.model.*, lm_head.* -> language_model.lm_head.*, model.x -> x
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    return key[len("model."):]


def _write(folder, model, tokenizer, layout: str):
    """layout: "save_pretrained" (whatever this transformers writes), "legacy" or "current" (the state
    dict written by hand with safetensors in that key layout)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _tiny_image_processor(model.config.vision_config.image_size).save_pretrained(folder)
    if layout != "save_pretrained":
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        if layout == "legacy":
            state = {_legacy_key(k): v for k, v in state.items()}
        for name in os.listdir(folder):
            if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
                os.remove(os.path.join(folder, name))
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def _inputs(mllm, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [encode_prompt("which caption fits the image", mllm.tokenizer, mllm.num_image_tokens)] * 2
    input_ids = torch.tensor(ids)
    return dict(input_ids=input_ids, pixel_values=torch.randn(2, 3, 32, 32, generator=g))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", ["save_pretrained", "legacy", "current"])
def test_plain_transformers_checkpoints_load_without_losing_a_weight(tmp_path, layout, tied):
    from transformers import LlavaForConditionalGeneration

    model, tokenizer = _plain_llava(tied=tied)
    folder = _write(str(tmp_path / "ckpt"), model, tokenizer, layout)
    keys = set(load_file(os.path.join(folder, "model.safetensors")))
    if layout == "legacy" or (layout == "save_pretrained" and "language_model.model.embed_tokens.weight" in keys):
        assert not any(k.startswith("model.") for k in keys)
    if not tied:
        assert {"lm_head.weight", "language_model.lm_head.weight"} & keys

    mllm = load_mllm(folder)
    original = model.state_dict()
    loaded = mllm.model.state_dict()
    assert set(loaded) == set(original)
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    assert (mllm.model.lm_head.weight is mllm.model.model.language_model.embed_tokens.weight) == tied
    inputs = _inputs(mllm)
    plain = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    assert torch.equal(_logits(mllm.model, inputs), _logits(plain, inputs))
    assert torch.equal(_logits(mllm.model, inputs), _logits(model, inputs))


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_missing_or_unexpected_weights_are_refused_by_name(tmp_path, layout):
    model, tokenizer = _plain_llava(tied=False)
    folder = _write(str(tmp_path / "ckpt"), model, tokenizer, layout)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    head = "language_model.lm_head.weight" if layout == "legacy" else "lm_head.weight"
    norm = next(k for k in state if k.endswith("layers.1.post_attention_layernorm.weight"))

    save_file({k: v for k, v in state.items() if k != head}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: lm_head\.weight"):
        load_mllm(folder)
    save_file({k: v for k, v in state.items() if k != norm}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys: .*layers\.1\.post_attention_layernorm\.weight"):
        load_mllm(folder)
    save_file({**state, "language_model.extra.weight": torch.zeros(3)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys: .*extra\.weight"):
        load_mllm(folder)
    save_file({**state, norm: torch.ones(5)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"post_attention_layernorm"):
        load_mllm(folder)


@pytest.mark.parametrize("strategy,feature_layer,tokens", [
    ("full", -1, 16), ("default", -1, 15), ("full", [-2, -1], 16), ("default", [-2, -1], 15),
])
def test_image_token_count_follows_the_feature_selection(tmp_path, strategy, feature_layer, tokens):
    """"default" drops the first vision position (LLaVA's CLS slot), a list of feature layers widens the
    features without adding tokens; loaded models prompt with exactly as many image tokens as the
    vision tower gives, so their logits equal plain transformers'."""
    from transformers import LlavaForConditionalGeneration

    model, tokenizer = _plain_llava(tied=False, strategy=strategy, feature_layer=feature_layer)
    assert image_token_count(model.config) == tokens
    folder = _write(str(tmp_path / "ckpt"), model, tokenizer, "save_pretrained")
    mllm = load_mllm(folder)
    assert mllm.num_image_tokens == tokens
    inputs = _inputs(mllm)
    assert int((inputs["input_ids"][0] == mllm.image_token_id).sum()) == tokens
    plain = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    assert torch.equal(_logits(mllm.model, inputs), _logits(plain, inputs))


def test_unknown_feature_selection_strategy_is_refused():
    from types import SimpleNamespace

    vision = SimpleNamespace(image_size=32, patch_size=8)
    assert image_token_count(SimpleNamespace(vision_config=vision, vision_feature_select_strategy="full")) == 16
    with pytest.raises(ValueError, match="vision_feature_select_strategy.*cls_only"):
        image_token_count(SimpleNamespace(vision_config=vision, vision_feature_select_strategy="cls_only"))
