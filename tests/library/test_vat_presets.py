"""The two VAT presets equal independent references computed from transformers' eager attention maps.

`code` must equal the authors' DistillTrainer (tests/library/vat_reference.py: authors_code_vat) and
`paper` the paper's formula (paper_rows), in loss and in every student gradient, on depths and shapes the
other tests do not use: a 6-layer student against a 10-layer teacher (outside the authors' depth table,
so the documented fraction scaling) and a 24-layer student against a 40-layer teacher at tiny widths
(the authors' own pairing), with left and right padding and prompts of different lengths.

The torch backend runs in float64. Its tolerances, 1e-6 on the losses and 1e-5 on the gradients (tighter
than the 1e-4 / 1e-3 asked of the presets), sit about ten times above the measured worst cases (1.2e-7,
8.5e-7): the reference cannot do better than that, as transformers' eager attention takes its softmax
in float32 even for a float64 model. Triton has no float64, so the triton backend runs in float32
under the interpreter against the float64 reference of the same weights, at 1e-4 (losses) and 1e-3
(gradients); measured worst cases 2.6e-6 and 4.5e-6 (docs/fidelity.md has the table).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from compodistill.distill import DistillConfig, Distiller, VATConfig
from compodistill.models import apply_taf, build_preset, parts

from ..common import TRITON_SKIP_REASON, rel_err, triton_runnable
from .model_helpers import grads_of, make_batch, worst_grad_error
from .vat_reference import code_layers, paper_layers, reference_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Tiny widths, real depths. The teacher is GQA (4 query heads, 2 key/value heads), the student MHA, as
# Qwen1.5-4B (20 heads) and Qwen1.5-1.8B (16 heads) differ in head count.
PAIRS = {
    "6x10": (dict(num_hidden_layers=6), dict(num_hidden_layers=10)),
    "24x40": (dict(num_hidden_layers=24, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=2),
              dict(num_hidden_layers=40, hidden_size=48, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2)),
}
TOLERANCES = {torch.float64: (1e-6, 1e-5), torch.float32: (1e-4, 1e-3)}


@functools.lru_cache(maxsize=None)
def _pair(name):
    student_text, teacher_text = PAIRS[name]
    teacher = build_preset("tiny-teacher", seed=11, text_overrides=teacher_text)
    student = build_preset("tiny-student", seed=12, text_overrides=student_text)
    with torch.no_grad():  # sharper queries and keys: peaked, model-specific attention maps
        for mllm in (teacher, student):
            for name_, param in parts.language_model(mllm).named_parameters():
                if "q_proj.weight" in name_ or "k_proj.weight" in name_:
                    param.mul_(6.0)
    apply_taf(student, teacher)
    return teacher, student


def _run(pair, preset, backend, padding, dtype):
    teacher, student = (copy.deepcopy(m) for m in _pair(pair))
    teacher.model.to(dtype), student.model.to(dtype)
    depths = (student.model.config.text_config.num_hidden_layers, teacher.model.config.text_config.num_hidden_layers)
    students, windows = (code_layers if preset == "code" else paper_layers)(*depths)
    config = DistillConfig(vat=VATConfig.from_dict({"preset": preset}))
    distiller = Distiller(student, teacher, config, backend=backend).train()
    assert [m.student_layer for m in distiller.matches] == students
    assert [list(m.teacher_layers) for m in distiller.matches] == windows

    batch = make_batch(student, padding=padding, B=3 if pair == "6x10" else 2, L=40, seed=7)
    got = distiller(batch)
    reference_teacher, reference_student = copy.deepcopy(teacher.model), copy.deepcopy(student.model)
    reference_teacher.double(), reference_student.double()
    want, reference = reference_step(reference_student, reference_teacher, batch, preset, students, windows)
    # Gradients of the alignment term alone (lm and kd would otherwise dominate them), then of the total.
    grads = {}
    for name in ("vat", "loss"):
        distiller.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
        got[name].backward(retain_graph=True)
        want[name].backward(retain_graph=True)
        student_grads, reference_grads = grads_of(distiller.student), grads_of(reference)
        # A parameter the term does not depend on (the last matched layer's value projection for vat) may
        # hold no gradient on one side and zeros on the other.
        for key in set(student_grads) ^ set(reference_grads):
            present = student_grads.get(key, reference_grads.get(key))
            assert not present.any(), key
            student_grads.setdefault(key, torch.zeros_like(present))
            reference_grads.setdefault(key, torch.zeros_like(present))
        grads[name] = (student_grads, reference_grads)
    return got, want, grads


def _cases():
    # Every pair, preset and padding on the torch backend in float64, except the 24x40 paper preset with
    # one padding; the interpreted Triton kernels (slow on a CPU) on 6x10 for both presets and on
    # 24x40 for the code preset, the authors' own pairing.
    for pair in PAIRS:
        for preset in ("code", "paper"):
            for padding in ("right", "left"):
                if pair == "24x40" and preset == "paper" and padding == "right":
                    continue
                yield pytest.param(pair, preset, "torch", padding, torch.float64,
                                   id=f"{pair}-{preset}-torch-fp64-{padding}")
            if pair == "6x10" or preset == "code":
                padding = "left" if pair == "6x10" else "right"
                yield pytest.param(pair, preset, "triton", padding, torch.float32,
                                   id=f"{pair}-{preset}-triton-fp32-{padding}")


@pytest.mark.parametrize("pair,preset,backend,padding,dtype", list(_cases()))
def test_preset_equals_its_reference(pair, preset, backend, padding, dtype):
    if backend == "triton" and not triton_runnable():
        pytest.skip(TRITON_SKIP_REASON)
    got, want, grads = _run(pair, preset, backend, padding, dtype)
    loss_tol, grad_tol = TOLERANCES[dtype]
    for name in ("lm", "kd", "vat", "loss"):
        assert torch.isfinite(got[name]), name
        assert rel_err(got[name], want[name]) < loss_tol, (name, got[name].item(), want[name].item())
    assert want["vat"] > 1e-3  # a loss far from zero: the comparison is not of rounding noise
    for name, (student_grads, reference_grads) in grads.items():
        assert "model.multi_modal_projector.post.weight" in student_grads
        assert not any("fetched" in key for key in student_grads)  # TAF: the teacher's projector is frozen
        assert worst_grad_error(student_grads, reference_grads) < grad_tol, name
    print(f"MEASURED {pair} {preset} {backend} {padding}: " + ", ".join(
        f"{name} {rel_err(got[name], want[name]):.2e}" for name in ("lm", "kd", "vat", "loss"))
        + ", grads " + ", ".join(f"{name} {worst_grad_error(*g):.2e}" for name, g in grads.items()))
