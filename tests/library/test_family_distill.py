"""Distillation of a tiny teacher into a tiny student of each supported family, through the kernels,
against an independent eager computation: batches of mixed image sizes, several images per sample and
different numbers of visual tokens per sample (the indexed kernel form), on both backends."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from compodistill.distill import DistillConfig, Distiller, KDConfig, VATConfig
from compodistill.models.attention import AttentionProbe, enable_compodistill_attention
from compodistill.models.families import FAMILIES, visual_index
from compodistill.models.pairing import check_pair, fetch_teacher_projector
from compodistill.models.tiny_families import TINY_FAMILIES
from compodistill.distill.vat import indexed_query_rows

from ..common import TRITON_SKIP_REASON, triton_runnable
from .family_helpers import missing_marks, random_image
from .model_helpers import grads_of, worst_grad_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# One student layer per window of three teacher layers (group matching over 2 → 4 layers).
CONFIG = DistillConfig(vat=VATConfig(student_layers=[0, 1], teacher_layers=[0, 1, 2, 3]), kd=KDConfig(temperature=2.0))
# Families the distillation step is compared on for both backends; the rest on the torch backend.
TRITON_FAMILIES = ("qwen2_5_vl", "llava_onevision", "internvl", "idefics3", "llava")


def _params(with_backend: bool):
    for name in TINY_FAMILIES:
        if not with_backend:
            yield pytest.param(name, id=name, marks=missing_marks(name))
            continue
        for padding in ("right", "left"):
            yield pytest.param(name, "torch", padding, id=f"{name}-torch-{padding}", marks=missing_marks(name))
        if name in TRITON_FAMILIES:
            marks = missing_marks(name) + [pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)]
            yield pytest.param(name, "triton", "right", id=f"{name}-triton-right", marks=marks)


def _batch(processor, samples, padding_side="right"):
    """samples: [(question, answer, [(width, height), ...])] → processor tensors plus labels that
    supervise each answer."""
    processor.tokenizer.padding_side = padding_side
    prompts, texts, images = [], [], []
    for b, (question, answer, sizes) in enumerate(samples):
        user = [{"role": "user", "content": [{"type": "image"}] * len(sizes) + [{"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(user, add_generation_prompt=True)
        prompts.append(prompt)
        texts.append(prompt + answer)
        images.append([random_image(w, h, seed=10 * b + i) for i, (w, h) in enumerate(sizes)])
    batch = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
    def length(text, sample_images):
        return int(processor(text=[text], images=[sample_images], return_tensors="pt")["input_ids"].shape[1])

    labels = batch["input_ids"].clone()
    # Where each sample's answer starts: after its prompt, behind the padding when it is on the left.
    first_answer = [length(p, im) + (labels.shape[1] - length(t, im) if padding_side == "left" else 0)
                    for p, t, im in zip(prompts, texts, images)]
    positions = torch.arange(labels.shape[1])[None]
    supervised = (positions >= torch.tensor(first_answer)[:, None]) & batch["attention_mask"].bool()
    processor.tokenizer.padding_side = "right"
    batch["labels"] = labels.masked_fill(~supervised, -100)
    return batch


# A small square image, and two larger images of different aspect ratios in one sample.
MIXED = [("what color is the circle", " red", [(64, 64)]), ("how many stars are there", " three", [(128, 96), (96, 128)])]
# The second sample holds the first one's image twice: exactly twice its visual tokens.
DOUBLED = [("what is it", " a cube", [(64, 64)]), ("and these two", " two cubes", [(64, 64), (64, 64)])]
# LLaVA-OneVision tiles a sample's image only when it is the sample's only one (anyres), so there two
# untiled images are doubled by four.
DOUBLED_ONEVISION = [("what are they", " two cubes", [(64, 64)] * 2), ("and these", " four cubes", [(64, 64)] * 4)]


def _eager(model):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation({"text_config": "eager"})
    return reference


def _forward(model, family, batch, **kwargs):
    inputs = family.model_inputs(batch, dtype=model.dtype)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **inputs,
                 **kwargs)


def _text_rows(ids, mask, visual):
    # "text" rows, written per sample in plain Python: real, non-visual tokens after the first visual one.
    first = visual[0]
    return [i for i in range(len(ids)) if mask[i] and i > first and i not in set(visual)]


def _eager_losses(student, teacher, family, image_ids, batch, matches):
    """lm, kd and vat from eager logits and eager attention maps, sample by sample."""
    with torch.no_grad():
        t_out = _forward(teacher, family, batch, output_attentions=True)
    s_out = _forward(student, family, batch, output_attentions=True)
    labels = batch["labels"]
    logits, target = s_out.logits[:, :-1].float(), labels[:, 1:]
    sel = target != -100
    out = {"lm": F.cross_entropy(logits[sel], target[sel])}
    T = CONFIG.kd.temperature
    log_ps = F.log_softmax(logits[sel] / T, -1)
    log_pt = F.log_softmax(t_out.logits[:, :-1].float()[sel][:, :logits.shape[-1]] / T, -1)
    out["kd"] = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * T * T
    per_layer = []
    for match in matches:
        total, count = 0.0, 0
        for b in range(labels.shape[0]):
            ids, mask = batch["input_ids"][b].tolist(), batch["attention_mask"][b].tolist()
            visual = [i for i, token in enumerate(ids) if token in image_ids]
            rows = _text_rows(ids, mask, visual)
            a = s_out.attentions[match.student_layer][b].float().mean(0)[rows][:, visual]
            t = torch.stack([t_out.attentions[layer][b].float().mean(0)[rows][:, visual]
                             for layer in match.teacher_layers]).mean(0)
            total = total + (1 - F.cosine_similarity(a, t, dim=-1, eps=CONFIG.vat.eps)).sum()
            count += len(rows)
        per_layer.append(total / count)
    out["vat"] = torch.stack(per_layer).mean()
    out["loss"] = out["lm"] + out["kd"] + out["vat"]
    return out


@pytest.mark.parametrize("name,backend,padding", list(_params(with_backend=True)))
def test_distillation_step_equals_eager(name, backend, padding, pairs):
    """lm + kd + vat of one step on a batch of mixed image sizes (one sample with two images), padded on
    either side, equals the eager computation, and so do the student's gradients."""
    teacher_vlm, student_vlm, _ = pairs(name)
    family = student_vlm.family
    batch = _batch(student_vlm.processor, MIXED, padding_side=padding)
    image_ids = family.image_token_ids(student_vlm.model.config)
    counts = (visual_index(batch["input_ids"], image_ids) >= 0).sum(1).tolist()
    assert counts[0] != counts[1]  # the indexed form is exercised
    check_pair(student_vlm.model, teacher_vlm.model, batch)

    student, teacher = copy.deepcopy(student_vlm.model), copy.deepcopy(teacher_vlm.model)
    eager_student, eager_teacher = _eager(student).train(), _eager(teacher)
    distiller = Distiller(student, teacher, CONFIG, backend=backend).train()
    got = distiller(batch)
    want = _eager_losses(eager_student, eager_teacher, family, image_ids, batch, distiller.matches)
    for key in ("lm", "kd", "vat", "loss"):
        assert torch.isfinite(got[key]), key
        torch.testing.assert_close(got[key], want[key].float(), rtol=5e-5, atol=1e-6, msg=f"{key}")
    assert got["vat"] > 0

    got["loss"].backward()
    want["loss"].backward()
    grads, reference = grads_of(distiller.student), grads_of(eager_student)
    assert worst_grad_error(grads, reference) < 2e-4


@pytest.mark.parametrize("name", list(_params(with_backend=False)))
def test_exported_slices_match_output_attentions(name, pairs):
    """The visual slices the attention layers export, for a sample with twice the other's visual tokens,
    equal the eager attention maps at those rows and columns; padding entries are exactly 0."""
    teacher_vlm, _, _ = pairs(name)
    family = teacher_vlm.family
    batch = _batch(teacher_vlm.processor, DOUBLED_ONEVISION if name == "llava_onevision" else DOUBLED)
    image_ids = family.image_token_ids(teacher_vlm.model.config)
    index = visual_index(batch["input_ids"], image_ids)
    counts = (index >= 0).sum(1).tolist()
    assert counts[1] == 2 * counts[0]
    rows = indexed_query_rows("text", batch["attention_mask"], batch["labels"], index)

    with torch.no_grad():
        eager = _forward(_eager(teacher_vlm.model), family, batch, output_attentions=True).attentions
        model = enable_compodistill_attention(copy.deepcopy(teacher_vlm.model), backend="torch")
        layers = range(len(eager))
        probe = AttentionProbe(rows, export={layer: "rows" for layer in layers})
        family.backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                               compodistill_probe=probe, **family.model_inputs(batch, dtype=model.dtype))
    for layer in layers:
        got = probe.slices[layer]
        for b in range(2):
            ids, mask = batch["input_ids"][b].tolist(), batch["attention_mask"][b].tolist()
            visual = [i for i, token in enumerate(ids) if token in image_ids]
            text = _text_rows(ids, mask, visual)
            want = eager[layer][b].float().mean(0)[text][:, visual]
            torch.testing.assert_close(got[b, :len(text), :len(visual)], want, atol=1e-6, rtol=1e-5)
            assert not got[b, len(text):].any() and not got[b, :, len(visual):].any()


@pytest.mark.parametrize("name", list(_params(with_backend=False)))
def test_pair_checks(name, pairs):
    """A batch whose image tokens the teacher reads differently is refused with the sample and position;
    TAF is fetched where both projectors are two-layer MLPs and refused clearly otherwise."""
    teacher_vlm, student_vlm, _ = pairs(name)
    batch = _batch(student_vlm.processor, MIXED)
    other = copy.deepcopy(teacher_vlm.model)
    field = FAMILIES[name].image_token_fields[0]
    setattr(other.config, field, getattr(other.config, field) + 1)
    with pytest.raises(ValueError, match=r"differ at sample 0, position \d+"):
        check_pair(student_vlm.model, other, batch, run_forward=False)

    student = copy.deepcopy(student_vlm.model)
    if FAMILIES[name].projector_shape(student) is None:
        with pytest.raises(ValueError, match="TAF needs a two-layer MLP projector"):
            fetch_teacher_projector(student, teacher_vlm.model)
        return
    fetch_teacher_projector(student, teacher_vlm.model)
    projector = FAMILIES[name].projector(student)
    assert not any(p.requires_grad for p in projector.fetched.parameters())
    assert all(p.requires_grad for p in projector.post.parameters())
    with torch.no_grad():
        logits = _forward(student, FAMILIES[name], batch).logits
    assert torch.isfinite(logits[batch["attention_mask"].bool()]).all()
