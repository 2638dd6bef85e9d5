"""Building the teacher and student: tiny presets, the offline tokenizer, local Hugging Face checkpoints
(the real path), save/load round trips, TAF, and visual-token positions."""
from __future__ import annotations

import torch
import pytest

from compodistill.models import (IMAGE_TOKEN, MLLM, TAFProjector, apply_taf, build_from_checkpoints,
                                 build_preset, build_tiny_tokenizer, load_mllm, load_pretrained,
                                 visual_token_positions)
from compodistill.models.mllm import load_projector

from .model_helpers import make_batch, tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _logits(mllm, batch):
    with torch.no_grad():
        return mllm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          pixel_values=batch["pixel_values"]).logits


# ------------------------------------------------------------------------------------------------
# Presets and tokenizer
# ------------------------------------------------------------------------------------------------
def test_presets_build_offline_and_are_seeded():
    a, b, c = build_preset("tiny-student", seed=3), build_preset("tiny-student", seed=3), build_preset("tiny-student", seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    teacher = build_preset("tiny-teacher")
    t_text, s_text = teacher.model.config.text_config, a.model.config.text_config
    assert t_text.model_type == s_text.model_type == "qwen2"
    assert t_text.num_hidden_layers == 2 * s_text.num_hidden_layers
    assert t_text.num_key_value_heads < t_text.num_attention_heads  # GQA teacher
    assert a.model.config.vision_config.model_type == "siglip_vision_model"
    assert a.model.config.vision_feature_select_strategy == "full"
    assert a.num_image_tokens == 16 and a.image_token_id == a.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def test_preset_overrides_and_unknown_preset():
    mllm = build_preset("tiny-student", text_overrides={"num_hidden_layers": 6}, vision_overrides={"image_size": 32})
    assert mllm.model.config.text_config.num_hidden_layers == 6 and mllm.num_image_tokens == 4
    with pytest.raises(ValueError, match="preset"):
        build_preset("tiny-giant")


def test_tiny_tokenizer_is_deterministic_byte_level_with_a_chat_template():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "Which caption best describes the image? (A) a red circle left of a blue square ünïcode ✓"
    ids = a(text)["input_ids"]
    assert a.decode(ids) == text  # byte-level: any text round-trips, nothing is unknown
    assert len(a("a red circle is left of a blue square")["input_ids"]) <= 10  # domain words merge
    chat = a.apply_chat_template([{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat colour?"},
                                  {"role": "assistant", "content": "red"}], tokenize=False)
    assert chat == "<|im_start|>user\n<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    image_id = a.convert_tokens_to_ids(IMAGE_TOKEN)
    assert a(chat)["input_ids"].count(image_id) == 1
    assert a.pad_token == "<|endoftext|>" and a.eos_token == "<|im_end|>"
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(100)


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    mllm = tiny("tiny-teacher")
    batch = make_batch(mllm, padding="left")
    mllm.save_pretrained(tmp_path / "teacher")
    loaded = load_pretrained(str(tmp_path / "teacher"))
    assert torch.equal(_logits(mllm, batch), _logits(loaded, batch))
    assert loaded.tokenizer.get_vocab() == mllm.tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == mllm.tokenizer.chat_template
    assert load_mllm(str(tmp_path / "teacher")).image_token_id == mllm.image_token_id


def test_taf_student_round_trips_with_its_projector(tmp_path):
    teacher, student = tiny("tiny-teacher"), tiny("tiny-student")
    apply_taf(student, teacher)
    batch = make_batch(student)
    student.save_pretrained(tmp_path / "student")
    loaded = load_pretrained(str(tmp_path / "student"))
    assert isinstance(loaded.model.model.multi_modal_projector, TAFProjector)
    assert torch.equal(_logits(student, batch), _logits(loaded, batch))


def _write_parts(tmp_path):
    """A SigLIP checkpoint (full model: text and vision towers, with a preprocessor) and a Qwen2 causal-LM
    checkpoint with a tokenizer that has no <image> token, as on the hub."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8)))
    siglip.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tok.save_pretrained(tmp_path / "qwen")
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    lm.save_pretrained(tmp_path / "qwen")
    return siglip, lm, AutoTokenizer.from_pretrained(tmp_path / "qwen")


def test_build_from_local_checkpoints_uses_their_weights_and_round_trips(tmp_path):
    siglip, lm, _ = _write_parts(tmp_path)
    mllm = build_from_checkpoints(str(tmp_path / "siglip"), str(tmp_path / "qwen"))
    model = mllm.model
    assert IMAGE_TOKEN in mllm.tokenizer.get_vocab() and mllm.tokenizer.pad_token is not None
    assert mllm.tokenizer.chat_template  # ChatML default when the checkpoint has none
    assert mllm.num_image_tokens == 16 and model.config.vision_feature_layer == -2
    vision = dict(model.model.vision_tower.named_parameters())
    for name, param in siglip.vision_model.named_parameters():
        assert torch.equal(vision[name], param), name
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tie kept
    ids = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model.lm_head(model.model.language_model(input_ids=ids).last_hidden_state),
                              lm(input_ids=ids).logits)
    assert not any(p.is_meta for p in model.parameters())

    # The real path end to end: an image through the checkpoint's own preprocessor.
    from PIL import Image
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    pixels = mllm.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    prompt = mllm.tokenizer.apply_chat_template(
        [{"role": "user", "content": IMAGE_TOKEN * mllm.num_image_tokens + "\nhello"}],
        tokenize=False, add_generation_prompt=True)
    ids = mllm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()

    mllm.save_pretrained(tmp_path / "joined")
    again = load_pretrained(str(tmp_path / "joined"))
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids, pixel_values=pixels).logits, logits)


@pytest.mark.parametrize("naming", ["llava", "transformers"])
def test_projector_weights_load_in_either_naming(tmp_path, naming):
    _write_parts(tmp_path)
    source = build_from_checkpoints(str(tmp_path / "siglip"), str(tmp_path / "qwen"), seed=7)
    proj = source.model.model.multi_modal_projector
    if naming == "llava":
        state = {"model.mm_projector.0.weight": proj.linear_1.weight, "model.mm_projector.0.bias": proj.linear_1.bias,
                 "model.mm_projector.2.weight": proj.linear_2.weight, "model.mm_projector.2.bias": proj.linear_2.bias}
        path = tmp_path / "mm_projector.bin"
        torch.save({k: v.detach().clone() for k, v in state.items()}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "projector.safetensors"
        save_file({f"model.multi_modal_projector.{k}": v.detach().clone() for k, v in proj.state_dict().items()}, path)
    built = build_from_checkpoints(str(tmp_path / "siglip"), str(tmp_path / "qwen"), projector=str(path), seed=0)
    for k, v in built.model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, source.model.model.multi_modal_projector.state_dict()[k]), k

    torch.save({"something.else": torch.zeros(3)}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="projector"):
        load_projector(built.model.model.multi_modal_projector, str(tmp_path / "bad.bin"))


def test_bad_checkpoints_fail_clearly(tmp_path):
    _write_parts(tmp_path)
    with pytest.raises(ValueError, match="language_model"):
        build_from_checkpoints(str(tmp_path / "siglip"), str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="language_model: expected a Qwen2"):
        build_from_checkpoints(str(tmp_path / "siglip"), str(tmp_path / "siglip"))
    with pytest.raises(ValueError, match="vision_tower: expected a SigLIP"):
        build_from_checkpoints(str(tmp_path / "qwen"), str(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="projector"):
        build_from_checkpoints(str(tmp_path / "siglip"), str(tmp_path / "qwen"), projector=str(tmp_path / "none.bin"))
    with pytest.raises(ValueError, match="LLaVA"):
        load_pretrained(str(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="model: expected a preset"):
        load_mllm("tiny-nothing")
    with pytest.raises(ValueError, match="vision_tower and language_model"):
        load_mllm({"vision_tower": str(tmp_path / "siglip")})


# ------------------------------------------------------------------------------------------------
# TAF
# ------------------------------------------------------------------------------------------------
def test_taf_fetches_the_teacher_projector_frozen_and_trains_only_the_post_projector():
    teacher, student = tiny("tiny-teacher"), tiny("tiny-student")
    apply_taf(student, teacher)
    taf = student.model.model.multi_modal_projector
    t_proj = teacher.model.model.multi_modal_projector
    assert isinstance(taf, TAFProjector)
    assert taf.post.in_features == teacher.model.config.text_config.hidden_size
    assert taf.post.out_features == student.model.config.text_config.hidden_size
    for k, v in t_proj.state_dict().items():
        assert torch.equal(taf.fetched.state_dict()[k], v) and taf.fetched.state_dict()[k].data_ptr() != v.data_ptr()
    assert not any(p.requires_grad for p in taf.fetched.parameters())
    assert all(p.requires_grad for p in taf.post.parameters())

    # DPT: only the post-projector trains; one optimizer step changes it and nothing else.
    student.model.requires_grad_(False)
    taf.post.requires_grad_(True)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in student.model.parameters() if p.requires_grad], lr=0.1)
    batch = make_batch(student)
    student.model.train()
    loss = student.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                         labels=batch["labels"]).loss
    loss.backward()
    optimizer.step()
    changed = {k for k, v in student.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.multi_modal_projector.post.weight", "model.multi_modal_projector.post.bias"}
    assert all(torch.equal(v, t_proj.state_dict()[k]) for k, v in taf.fetched.state_dict().items())


def test_taf_refuses_mismatched_vision_features():
    teacher = build_preset("tiny-teacher", vision_overrides={"hidden_size": 96, "intermediate_size": 96})
    with pytest.raises(ValueError, match="teacher: TAF"):
        apply_taf(tiny("tiny-student"), teacher)


# ------------------------------------------------------------------------------------------------
# Visual-token positions
# ------------------------------------------------------------------------------------------------
def test_visual_positions_follow_each_sample():
    mllm = tiny("tiny-student")
    batch = make_batch(mllm, padding="left")
    start, length = visual_token_positions(batch["input_ids"], mllm.image_token_id, mllm.num_image_tokens)
    assert length == 16
    for b in range(3):
        row = batch["input_ids"][b].tolist()
        assert int(start[b]) == row.index(mllm.image_token_id)


@pytest.mark.parametrize("edit,match", [
    (lambda ids, t: ids[1].masked_fill_(ids[1] == t, 3), "sample 1 has no image token"),
    (lambda ids, t: ids[2].__setitem__(slice(0, 1), t), "sample 2 has 17 image tokens that are not contiguous"),
    (lambda ids, t: ids[0].__setitem__((ids[0] == t).nonzero()[0], 3), "different image token counts"),
])
def test_visual_positions_reject_malformed_samples(edit, match):
    mllm = tiny("tiny-student")
    ids = make_batch(mllm)["input_ids"]
    edit(ids, mllm.image_token_id)
    with pytest.raises(ValueError, match=match):
        visual_token_positions(ids, mllm.image_token_id)


def test_visual_positions_check_the_vision_tower_count():
    mllm = tiny("tiny-student")
    assert isinstance(mllm, MLLM)
    with pytest.raises(ValueError, match="vision tower gives 15"):
        visual_token_positions(make_batch(mllm)["input_ids"], mllm.image_token_id, 15)
