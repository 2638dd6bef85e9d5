"""Checks that a teacher and a student of any supported family can be distilled one into the other,
and the teacher-adapter fetch (TAF) for them.

`check_pair(student, teacher, batch)` runs on a real batch before training:

- image tokens: both models must mark the same positions of every sample as visual (the same image
  token ids, so one processed batch serves both); otherwise a ValueError names the first sample and
  position where they differ;
- vocabulary: logit KD compares the student's vocabulary with the first entries of the teacher's, so
  the teacher's must be at least as large (a declared cut: extra teacher entries are dropped);
- each model's visual features must fill its image tokens (the forward of each model on the batch
  raises otherwise, and is run here, under no_grad, so the error comes before training).

`fetch_teacher_projector(student, teacher)` gives the student the teacher's projector, frozen, followed
by a trainable Linear(teacher LM width → student LM width); refused with a ValueError where either model
has no two-layer MLP projector or the two projectors take different vision features.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .families import family_of


def _family_and_ids(model):
    family = family_of(model)
    return family, family.image_token_ids(model.config)


def check_pair(student, teacher, batch: dict, *, run_forward: bool = True) -> None:
    """Raise a ValueError when `teacher` and `student` (transformers VLMs of supported families)
    cannot be distilled on `batch` (a processor output with input_ids and attention_mask)."""
    input_ids = batch.get("input_ids")
    if not torch.is_tensor(input_ids) or input_ids.ndim != 2:
        raise ValueError("batch: expected input_ids (B, L) from the processor")
    s_family, s_ids = _family_and_ids(student)
    t_family, t_ids = _family_and_ids(teacher)
    s_visual = torch.isin(input_ids, torch.as_tensor(s_ids, device=input_ids.device))
    t_visual = torch.isin(input_ids, torch.as_tensor(t_ids, device=input_ids.device))
    if not torch.equal(s_visual, t_visual):
        b, position = (s_visual != t_visual).nonzero()[0].tolist()
        raise ValueError(f"teacher: its image tokens (ids {t_ids}, {t_family.name}) and the student's (ids {s_ids}, "
                         f"{s_family.name}) differ at sample {b}, position {position}: token "
                         f"{int(input_ids[b, position])} is visual for the "
                         f"{'student' if bool(s_visual[b, position]) else 'teacher'} only")
    if not bool(s_visual.any(1).all()):
        b = int((~s_visual.any(1)).nonzero()[0])
        raise ValueError(f"batch: sample {b} holds no image token; attention distillation needs an image per sample")
    s_vocab = s_family.text_config(student).vocab_size
    t_vocab = t_family.text_config(teacher).vocab_size
    if t_vocab < s_vocab:
        raise ValueError(f"teacher: vocabulary of {t_vocab} is smaller than the student's {s_vocab}; logit KD "
                         "needs the student's vocabulary to be the first entries of the teacher's")
    if run_forward:
        for role, model, family in (("student", student, s_family), ("teacher", teacher, t_family)):
            inputs = family.model_inputs(batch, dtype=next(model.parameters()).dtype)
            try:
                with torch.no_grad():
                    family.backbone(model)(input_ids=input_ids, attention_mask=batch.get("attention_mask"),
                                           use_cache=False, **inputs)
            except (ValueError, RuntimeError, IndexError) as error:
                raise ValueError(f"{role}: its forward fails on this batch ({error}); are both processors "
                                 "the same and do the image tokens match the visual features?") from error


class FetchedProjector(nn.Module):
    """TAF for any family: the teacher's projector (frozen) then Linear(teacher width → student width)."""

    def __init__(self, fetched: nn.Module, teacher_width: int, student_width: int):
        super().__init__()
        self.fetched = fetched
        self.post = nn.Linear(teacher_width, student_width)

    def forward(self, *args, **kwargs):
        return self.post(self.fetched(*args, **kwargs))


def fetch_teacher_projector(student, teacher, *, seed: int = 0):
    """Replace the student's projector by the teacher's (a frozen copy) followed by a fresh trainable
    Linear from the teacher's LM width to the student's. Returns the student."""
    s_family, t_family = family_of(student), family_of(teacher)
    s_shape, t_shape = s_family.projector_shape(student), t_family.projector_shape(teacher)
    if s_shape is None or t_shape is None:
        side = "student" if s_shape is None else "teacher"
        raise ValueError(f"{side}: TAF needs a two-layer MLP projector in both models; the "
                         f"{(s_family if side == 'student' else t_family).name} {side} has none")
    if s_shape[0] != t_shape[0]:
        raise ValueError(f"teacher: TAF needs the same vision features in both models; the teacher's projector "
                         f"takes {t_shape[0]}, the student's {s_shape[0]}")
    fetched = copy.deepcopy(t_family.projector(teacher)).requires_grad_(False)
    reference = next(student.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = FetchedProjector(fetched, t_shape[1], s_shape[1])
    s_family.set_projector(student, module.to(device=reference.device, dtype=reference.dtype))
    return student
