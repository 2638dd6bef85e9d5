"""One distillation step (lm + kd + vat) through the kernels equals the same step computed from eager
logits and eager attention maps: losses and student gradients, on both backends."""
from __future__ import annotations

import pytest
import torch

from compodistill.distill import DistillConfig, Distiller, KDConfig, LossWeights, VATConfig
from compodistill.models import build_preset, enable_gradient_checkpointing

from ..common import TRITON_SKIP_REASON, triton_runnable
from .model_helpers import eager_losses, grads_of, make_batch, tiny_pair, worst_grad_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Three student layers against five teacher layers: group windows of n = 3, simple picks 2, 3, 5.
LAYERS = dict(student_layers=[1, 2, 3], teacher_layers={"start": 2, "end": 6})
VAT_CASES = {
    "paper-fused": VATConfig(**LAYERS),
    # The block sink filter on text rows (zero-weight rows inside the window) with column pooling; the
    # presets themselves are checked against independent references in test_vat_presets.py.
    "sink-mean-text": VATConfig(**LAYERS, sink_filter=True, reduce="mean", query_rows="text"),
    "simple-mse": VATConfig(**LAYERS, matching="simple", loss="mse"),
    "kl-mean": VATConfig(**LAYERS, loss="kl", reduce="mean", query_rows="all"),
    "sink-rows-answer": VATConfig(**LAYERS, sink_filter=True, query_rows="answer", layer_reduction="sum"),
    "visual-fused": VATConfig(**LAYERS, query_rows="visual"),
}
TRITON_CASES = ("paper-fused", "sink-mean-text", "kl-mean")


def _cases():
    for name in VAT_CASES:
        for padding in ("right", "left"):
            yield pytest.param("torch", name, padding, id=f"torch-{name}-{padding}")
            if name in TRITON_CASES:
                yield pytest.param("triton", name, padding, id=f"triton-{name}-{padding}")


@pytest.mark.parametrize("backend,case,padding", list(_cases()))
def test_distillation_step_equals_eager_computation(backend, case, padding):
    if backend == "triton" and not triton_runnable():
        pytest.skip(TRITON_SKIP_REASON)
    teacher, student = tiny_pair()
    config = DistillConfig(vat=VAT_CASES[case], kd=KDConfig(temperature=2.0))
    batch = make_batch(student, padding=padding, answer_gap=True)
    distiller = Distiller(student, teacher, config, backend=backend).train()
    want, reference = eager_losses(student.model, teacher.model, batch, config, distiller.matches)

    got = distiller(batch)
    assert set(got) == {"lm", "kd", "vat", "loss"}
    for name in got:
        assert torch.isfinite(got[name]), name
        assert torch.allclose(got[name], want[name].float(), rtol=2e-5, atol=1e-7), (name, got[name], want[name])
    assert got["vat"] > 0

    got["loss"].backward()
    want["loss"].backward()
    grads, ref_grads = grads_of(distiller.student), grads_of(reference)
    assert "model.multi_modal_projector.post.weight" in grads
    assert not any("fetched" in name for name in grads)  # TAF: the teacher's projector stays frozen
    assert worst_grad_error(grads, ref_grads) < 2e-4


def test_teacher_is_frozen_unregistered_and_in_eval_mode():
    teacher, student = tiny_pair()
    teacher.model.train()
    distiller = Distiller(student, teacher, DistillConfig(vat=VATConfig(**LAYERS)), backend="torch").train()
    assert not distiller.teacher.training
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    student_params = {id(p) for p in student.model.parameters()}
    assert {id(p) for p in distiller.parameters()} == student_params
    assert all(key.startswith("student.") for key in distiller.state_dict())
    distiller(make_batch(student))["loss"].backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())


@pytest.mark.parametrize("names", [{"lm", "kd"}, {"lm"}, {"lm", "kd", "vat"}], ids=["lm-kd", "lm", "lm-kd-vat"])
def test_loss_weights_pick_the_losses(names):
    teacher, student = tiny_pair()
    config = DistillConfig(weights=LossWeights(**{n: 1.0 for n in names}), vat=VATConfig(**LAYERS))
    distiller = Distiller(student, teacher if names != {"lm"} else None, config, backend="torch")
    out = distiller(make_batch(student))
    assert set(out) == names | {"loss"}
    assert torch.allclose(out["loss"], sum(out[n] for n in names))


def test_gradient_checkpointing_gives_the_same_step():
    results = []
    for checkpointing in (False, True):
        teacher, student = tiny_pair()
        if checkpointing:
            enable_gradient_checkpointing(student.model)
        distiller = Distiller(student, teacher, DistillConfig(vat=VATConfig(**LAYERS)), backend="torch").train()
        out = distiller(make_batch(student))
        out["loss"].backward()
        results.append(({k: v.detach() for k, v in out.items()}, grads_of(distiller.student)))
    (losses_a, grads_a), (losses_b, grads_b) = results
    for name in losses_a:
        assert torch.allclose(losses_a[name], losses_b[name]), name
    assert worst_grad_error(grads_b, grads_a) < 1e-5


def test_reentrant_checkpointing_is_refused_instead_of_dropping_vat_gradients():
    teacher, student = tiny_pair()
    if hasattr(student.model, "activation_checkpointing_enable"):
        student.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    distiller = Distiller(student, teacher, DistillConfig(vat=VATConfig(**LAYERS)), backend="torch").train()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        distiller(make_batch(student))


def test_adaptive_matching_is_chosen_on_the_first_batch_and_kept():
    teacher, student = tiny_pair()
    distiller = Distiller(student, teacher, DistillConfig(vat=VATConfig(**LAYERS, matching="adaptive")),
                          backend="torch")
    assert distiller.matches is None and "adaptive" in distiller.describe()
    distiller(make_batch(student))
    matches = distiller.matches
    assert [m.student_layer for m in matches] == [1, 2, 3]
    picked = [m.teacher_layers[0] for m in matches]
    assert picked == sorted(picked) and all(2 <= t <= 6 for t in picked)
    distiller(make_batch(student, seed=5))
    assert distiller.matches == matches


def test_describe_names_losses_and_layer_windows():
    teacher, student = tiny_pair()
    text = Distiller(student, teacher, DistillConfig(vat=VATConfig(**LAYERS)), backend="torch").describe()
    assert "lm×1, kd×1, vat×1" in text and "fused" in text
    assert "teacher 2-4" in text and "teacher 4-6" in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(vat=VATConfig(student_layers=[7])), "vat.student_layers"),
    (dict(vat=VATConfig(teacher_layers=[1, 2], student_layers=[1, 2, 3])), "group"),
    (dict(weights={"lm": 1.0, "vatt": 1.0}), "losses"),
    (dict(weights={"lm": -1.0}), "losses.lm"),
    (dict(kd={"kind": "kl"}), "kd.kind"),
    (dict(kd="forward_kl"), "kd"),
])
def test_bad_configurations_fail_clearly(kwargs, match):
    teacher, student = tiny_pair()
    with pytest.raises(ValueError, match=match):
        Distiller(student, teacher, DistillConfig(**kwargs), backend="torch")


def test_incompatible_teacher_and_missing_teacher_fail_clearly():
    teacher, student = tiny_pair(taf=False)
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student, None, DistillConfig(), backend="torch")
    other_tokens = build_preset("tiny-teacher")
    other_tokens.tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer"):
        Distiller(student, other_tokens, DistillConfig(), backend="torch")
    bigger_images = build_preset("tiny-teacher", vision_overrides={"image_size": 80})
    with pytest.raises(ValueError, match="image tokens"):
        Distiller(student, bigger_images, DistillConfig(), backend="torch")
    small_vocab = build_preset("tiny-teacher", text_overrides={"vocab_size": 830})
    with pytest.raises(ValueError, match="vocab size"):
        Distiller(student, small_vocab, DistillConfig(), backend="torch")


def test_batch_without_an_image_token_names_the_sample():
    teacher, student = tiny_pair()
    batch = make_batch(student)
    batch["input_ids"][1][batch["input_ids"][1] == student.image_token_id] = 5
    distiller = Distiller(student, teacher, DistillConfig(vat=VATConfig(**LAYERS)), backend="torch")
    with pytest.raises(ValueError, match="sample 1 has no image token"):
        distiller(batch)


def test_fp16_student_gives_finite_losses_close_to_fp32():
    """Mixed precision: an fp16 student and teacher (torch path on the CPU) stay finite and close."""
    values = {}
    for dtype in (torch.float32, torch.float16):
        teacher, student = tiny_pair()
        teacher.model.to(dtype), student.model.to(dtype)
        distiller = Distiller(student, teacher, DistillConfig(vat=VATConfig(**LAYERS)), backend="torch")
        with torch.no_grad():
            values[dtype] = distiller(make_batch(student))
    for name, value in values[torch.float16].items():
        assert torch.isfinite(value)
        assert torch.allclose(value.float(), values[torch.float32][name], rtol=2e-2, atol=1e-3), name
