"""Every supported VLM family, end to end on tiny random checkpoints built offline: strict loading back
through AutoModelForImageTextToText / AutoProcessor, the visual-token index of real processor outputs,
identical inputs for teacher and student, and the compodistill attention on the LM (same logits as
eager attention, probe keyword arguments reaching the attention layers)."""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from compodistill.models.attention import AttentionProbe, SliceRows, enable_compodistill_attention
from compodistill.models.families import FAMILIES, family_of, load_vlm, visual_index
from compodistill.models.tiny_families import STUDENT_LM, TEACHER_LM, TINY_FAMILIES

from .family_helpers import missing_marks, random_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Families whose number of visual tokens depends on the image size (all but LLaVA-1.5's fixed crop).
DYNAMIC = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl", "idefics3", "smolvlm"}

# (in, out) of each family's projector for the teacher (LM width 64); None where it is no 2-layer MLP.
_TEACHER_WIDTH = TEACHER_LM[1]
PROJECTOR_SHAPES = {
    "qwen2_vl": (32 * 4, _TEACHER_WIDTH), "qwen2_5_vl": (32 * 4, _TEACHER_WIDTH), "qwen3_vl": (32 * 4, _TEACHER_WIDTH),
    "llava_onevision": (32, _TEACHER_WIDTH), "llava": (32, _TEACHER_WIDTH), "internvl": (32 * 4, _TEACHER_WIDTH),
    "idefics3": None, "smolvlm": None,
}


def _family_param(name):
    return pytest.param(name, id=name, marks=missing_marks(name))


FAMILY_PARAMS = [_family_param(name) for name in TINY_FAMILIES]


def _prompt(processor, n_images, text):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _batch(processor, samples):
    """samples: [(text, [(width, height), ...])] → the processor's tensors for the batch."""
    texts = [_prompt(processor, len(sizes), text) for text, sizes in samples]
    images = [[random_image(w, h, seed=10 * b + i) for i, (w, h) in enumerate(sizes)] for b, (_, sizes) in enumerate(samples)]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


# One sample with a small square image, one with two larger images of different aspect ratios.
SAMPLES = [("what color is the circle", [(64, 64)]), ("how many stars are there", [(128, 96), (96, 128)])]


def _forward(model, family, batch):
    inputs = family.model_inputs(batch, dtype=model.dtype)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **inputs)


def _loop_index(input_ids, image_ids):
    # Independent reference: plain Python over each row.
    return [[pos for pos, tok in enumerate(row.tolist()) if tok in image_ids] for row in input_ids]


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_family_round_trip_and_forward(name, pairs):
    """Both checkpoints load back as the right family, with LMs of different size, and a real batch runs
    through teacher and student with finite logits; the two processors give identical inputs."""
    teacher, student, _ = pairs(name)
    for vlm, (layers, hidden, *_) in ((teacher, TEACHER_LM), (student, STUDENT_LM)):
        assert vlm.family is FAMILIES[name] is family_of(vlm.model) is family_of(vlm.model.config)
        text = vlm.family.text_config(vlm.model)
        assert (text.num_hidden_layers, text.hidden_size) == (layers, hidden)
        assert len(vlm.family.language_model(vlm.model).layers) == layers
        assert vlm.family.lm_head(vlm.model).in_features == hidden
        assert vlm.family.backbone(vlm.model) is vlm.model.model
    assert teacher.family.projector_shape(teacher.model) == PROJECTOR_SHAPES[name]
    if PROJECTOR_SHAPES[name] is not None:
        assert student.family.projector_shape(student.model) == (PROJECTOR_SHAPES[name][0], STUDENT_LM[1])
    # The vision encoders are configured alike: the projectors' inputs (the vision features) agree.
    assert type(teacher.family.vision_tower(teacher.model)) is type(student.family.vision_tower(student.model))

    batch = _batch(teacher.processor, SAMPLES)
    student_batch = _batch(student.processor, SAMPLES)
    assert set(batch) == set(student_batch)
    for key in batch:
        if torch.is_tensor(batch[key]):
            assert torch.equal(batch[key], student_batch[key]), key
    for vlm in (teacher, student):
        logits = _forward(vlm.model, vlm.family, batch).logits
        assert logits.shape[:2] == batch["input_ids"].shape
        assert torch.isfinite(logits[batch["attention_mask"].bool()]).all()


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_visual_index_matches_processor(name, pairs):
    """visual_index finds exactly the image tokens the processor wrote, in order, -1 padded; image size
    changes the count where the family has dynamic resolution."""
    teacher, _, _ = pairs(name)
    image_ids = teacher.family.image_token_ids(teacher.model.config)
    assert len(image_ids) == 1
    assert image_ids[0] == teacher.processor.image_token_id

    batch = _batch(teacher.processor, SAMPLES)
    index = visual_index(batch["input_ids"], image_ids)
    expected = _loop_index(batch["input_ids"], image_ids)
    counts = [len(row) for row in expected]
    assert index.dtype == torch.int64 and index.shape == (2, max(counts))
    for row, want in zip(index.tolist(), expected):
        assert row == want + [-1] * (index.shape[1] - len(want))
    # Not necessarily more for two images: LLaVA-OneVision tiles (anyres) only samples with a single image.
    assert min(counts) > 0 and counts[0] != counts[1]

    # One image per sample, of three sizes and aspect ratios: the count follows the image where the
    # family has dynamic resolution (not always growing with it: tiles follow the aspect ratio).
    sized = _batch(teacher.processor, [("what is it", [size]) for size in ((64, 64), (128, 96), (128, 32))])
    distinct = set((visual_index(sized["input_ids"], image_ids) >= 0).sum(1).tolist())
    assert len(distinct) > 1 if name in DYNAMIC else len(distinct) == 1


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_missing_weight_is_an_error(name, pairs, tmp_path):
    """A checkpoint with one weight removed does not load (no silent re-initialisation)."""
    from safetensors.torch import load_file, save_file

    _, _, teacher_path = pairs(name)
    broken = tmp_path / "broken"
    shutil.copytree(teacher_path, broken)
    weights_file = broken / "model.safetensors"
    weights = load_file(weights_file)
    removed = next(key for key in sorted(weights) if "layers.1." in key and key.endswith("weight"))
    del weights[removed]
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*" + removed.rpartition("layers.1.")[2].replace(".", r"\.")):
        load_vlm(broken)

    weights[removed] = torch.zeros(1)  # now present, with the wrong shape
    weights["model.extra_head.weight"] = torch.zeros(2, 2)
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected.*extra_head.*wrong shape"):
        load_vlm(broken)


def test_tied_weights_are_not_missing():
    """A missing key whose parameter is the same tensor as a loaded one (a tied LM head) is fine; one
    whose whole group is missing is not."""
    from compodistill.models.families import _check_loading

    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 3), "head": torch.nn.Linear(3, 5, bias=False)})
    model["head"].weight = model["embed"].weight
    _check_loading("ckpt", model, {"missing_keys": {"head.weight"}})
    with pytest.raises(ValueError, match="missing"):
        _check_loading("ckpt", model, {"missing_keys": {"head.weight", "embed.weight"}})
    with pytest.raises(ValueError, match="wrong shape"):
        _check_loading("ckpt", model, {"mismatched_keys": {("embed.weight", (4, 3), (5, 3))}})


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_compodistill_attention_matches_eager_and_takes_probe(name, pairs):
    """With compodistill attention on the LM only, logits equal eager attention's; a probe passed as a
    keyword argument to the backbone reaches the LM attention of layer 0 and exports its visual slice."""
    teacher, _, _ = pairs(name)
    batch = _batch(teacher.processor, SAMPLES)
    real = batch["attention_mask"].bool()
    reference = copy.deepcopy(teacher.model)
    reference.set_attn_implementation({"text_config": "eager"})
    model = enable_compodistill_attention(copy.deepcopy(teacher.model), backend="torch")
    assert model.config.text_config._attn_implementation == "compodistill"
    assert model.config.vision_config._attn_implementation in ("sdpa", "eager")

    want = _forward(reference, teacher.family, batch).logits
    got = _forward(model, teacher.family, batch).logits
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)

    index = visual_index(batch["input_ids"], teacher.family.image_token_ids(model.config))
    visual_len = int((index >= 0).sum(1).min())
    start = index[:, 0]
    rows = SliceRows(visual_start=start, visual_len=visual_len, query_start=start + visual_len, query_len=2)
    probe = AttentionProbe(rows, export={0: "rows"})
    backbone = teacher.family.backbone(model)
    inputs = teacher.family.model_inputs(batch, dtype=model.dtype)
    with torch.no_grad():
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **inputs,
                       compodistill_probe=probe)
    assert out.last_hidden_state.shape[:2] == batch["input_ids"].shape
    assert set(probe.slices) == {0}
    assert probe.slices[0].shape == (2, 2, visual_len)
    assert torch.isfinite(probe.slices[0]).all()


def test_model_inputs_picks_and_casts():
    family = FAMILIES["qwen2_vl"]
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "pixel_values": torch.ones(4, 6),
             "image_grid_thw": torch.tensor([[1, 2, 2]]), "unrelated": 1}
    picked = family.model_inputs(batch, dtype=torch.bfloat16)
    assert set(picked) == {"pixel_values", "image_grid_thw"}
    assert picked["pixel_values"].dtype == torch.bfloat16 and picked["image_grid_thw"].dtype == torch.long


def test_visual_index_edge_cases():
    ids = torch.tensor([[5, 9, 9, 1, 9], [9, 2, 3, 4, 0], [1, 2, 3, 4, 0]])
    assert visual_index(ids, (9,)).tolist() == [[1, 2, 4], [0, -1, -1], [-1, -1, -1]]
    assert visual_index(ids[2:], (9,)).tolist() == [[-1]]  # no visual token: one column of padding
    assert visual_index(ids, (9, 5)).tolist() == [[0, 1, 2, 4], [0, -1, -1, -1], [-1, -1, -1, -1]]
    with pytest.raises(ValueError, match="input_ids"):
        visual_index(ids[0], (9,))
    with pytest.raises(ValueError, match="input_ids"):
        visual_index(ids.float(), (9,))


def test_unsupported_family_and_bad_path(tmp_path):
    from transformers import Qwen2Config

    with pytest.raises(ValueError, match="'qwen2'.*supported"):
        family_of(Qwen2Config())
    with pytest.raises(ValueError, match="does-not-exist"):
        load_vlm(os.path.join(tmp_path, "does-not-exist"))
    with pytest.raises(ValueError, match="config.json"):
        load_vlm(tmp_path)
