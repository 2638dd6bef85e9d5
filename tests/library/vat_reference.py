"""Independent references for the two VAT presets, from transformers' eager attention maps.

Nothing here imports compodistill.distill: the layer choices are written out per depth below, the rows
are found per sample with plain Python, and each formula is written as the paper or the authors' code
states it.

- `authors_code_vat`: the authors' DistillTrainer. Per matched layer and sample, S is the student's
  head-mean visual→visual block (N×N, causal zeros included) and T the mean over the teacher window of
  the teacher's head-mean block; μ, σ (torch.std, Bessel) over all N² entries of each; an entry is kept
  where S ≤ μ_S + σ_S, T ≤ μ_T + σ_T and T ≠ 0; each key column is the mean of its kept entries (count
  clamped at 1); 1 − cos(s, t) with eps 1e-8, summed over layers, divided by the batch size.
- `paper_rows`: the paper's formula. Text query rows (real tokens after the image) against the visual
  keys, 1 − cos per row, averaged over the rows of the batch, then over the matched layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model_helpers import eager_copy

# The authors' table (0-based): student depth -> its 7 layers; teacher depth -> (window starts, n). Their
# student side has no 32; the library documents that a 32-layer student takes the teacher side's 11..17.
AUTHORS_STUDENT = {24: list(range(8, 15)), 28: list(range(9, 16)), 32: list(range(11, 18)), 40: list(range(13, 20))}
AUTHORS_TEACHER = {24: (list(range(8, 15)), 2), 28: (list(range(9, 16)), 3), 32: (list(range(11, 18)), 3),
                   40: (list(range(13, 20)), 5)}


def code_layers(student_depth: int, teacher_depth: int):
    """(student layers, teacher windows) of the `code` preset, written out independently of vat.py.

    Both depths in the authors' table: the table's layers and windows [i, i + n). Otherwise each side
    the library documents for depths outside the table scales the 24/40 choice by depth fraction
    (student round(8/24·d) .. round(14/24·d), teacher round(13/40·d) .. round(23/40·d); a side in the
    table keeps its range), and the teacher range is cut into k windows of n = m − k + 1 layers.
    """
    if student_depth in AUTHORS_STUDENT and teacher_depth in AUTHORS_TEACHER:
        starts, n = AUTHORS_TEACHER[teacher_depth]
        return AUTHORS_STUDENT[student_depth], [list(range(i, i + n)) for i in starts]
    if student_depth in AUTHORS_STUDENT:
        students = AUTHORS_STUDENT[student_depth]
    else:
        students = list(range(round(8 / 24 * student_depth), round(14 / 24 * student_depth) + 1))
    if teacher_depth in AUTHORS_TEACHER:
        starts, n = AUTHORS_TEACHER[teacher_depth]
        teachers = list(range(starts[0], starts[-1] + n))
    else:
        teachers = list(range(round(13 / 40 * teacher_depth), round(23 / 40 * teacher_depth) + 1))
    n = len(teachers) - len(students) + 1
    return students, [teachers[j:j + n] for j in range(len(students))]


def paper_layers(student_depth: int, teacher_depth: int):
    """(student layers, teacher windows) of the `paper` preset: the layers l with 0.3 <= l/d < 0.7 on each
    side, group windows of n = m − k + 1."""
    students = [layer_ for layer_ in range(student_depth) if 0.3 <= layer_ / student_depth < 0.7]
    teachers = [layer_ for layer_ in range(teacher_depth) if 0.3 <= layer_ / teacher_depth < 0.7]
    n = len(teachers) - len(students) + 1
    return students, [teachers[j:j + n] for j in range(len(students))]


def _visual_span(ids, image_id):
    positions = [i for i, token in enumerate(ids.tolist()) if token == image_id]
    return positions[0], len(positions)


def authors_code_vat(student_attentions, teacher_attentions, ids, image_id, students, windows):
    """The DistillTrainer's attention loss of one sample, summed over the matched layers.

    student_attentions / teacher_attentions: per layer (H, L, L) eager maps of the sample; ids (L,).
    """
    vs, n = _visual_span(ids, image_id)
    block = slice(vs, vs + n)
    s_attn = torch.stack([student_attentions[layer_].mean(0)[block, block] for layer_ in students])       # (k, N, N)
    t_attn = torch.stack([torch.stack([teacher_attentions[layer_].mean(0)[block, block] for layer_ in window]).mean(0)
                          for window in windows])                                              # (k, N, N)
    s_mu, s_sigma = s_attn.mean(dim=[1, 2]), s_attn.std(dim=[1, 2])
    t_mu, t_sigma = t_attn.mean(dim=[1, 2]), t_attn.std(dim=[1, 2])
    keep = (s_attn <= (s_mu + s_sigma)[:, None, None]) & (t_attn <= (t_mu + t_sigma)[:, None, None])
    s_kept, t_kept = s_attn * keep, t_attn * keep
    mask = (t_kept != 0).to(s_attn.dtype)
    count = mask.sum(dim=1).clamp(min=1)
    s_vec = (s_kept * mask).sum(dim=1) / count
    t_vec = (t_kept * mask).sum(dim=1) / count
    return (1 - F.cosine_similarity(s_vec, t_vec, dim=-1, eps=1e-8)).sum()


def paper_rows(student_attentions, teacher_attentions, ids, image_id, students, windows):
    """Per matched layer, (Σ_rows (1 − cos(student row, teacher-window row)), number of rows) of one
    sample: its text rows (every token after the image) against its visual keys."""
    vs, n = _visual_span(ids, image_id)
    sums = []
    for layer, window in zip(students, windows):
        total = 0.0
        for row in range(vs + n, ids.shape[0]):
            a = student_attentions[layer].mean(0)[row, vs:vs + n]
            t = torch.stack([teacher_attentions[layer_].mean(0)[row, vs:vs + n] for layer_ in window]).mean(0)
            total = total + (1 - F.cosine_similarity(a, t, dim=0, eps=1e-8))
        sums.append((total, ids.shape[0] - vs - n))
    return sums


def reference_step(student_model, teacher_model, batch, preset: str, students, windows):
    """lm, kd (forward KL, T = 1, next-token positions), vat of `preset` and their sum, from eager logits
    and attention maps in the models' dtype. Each sample runs alone with its padding removed (RoPE
    makes the result independent of the padding offset), so no padded row enters the reference.
    Returns (losses, the eager student copy for gradients)."""
    s_ref, t_ref = eager_copy(student_model), eager_copy(teacher_model)
    t_ref.eval()
    dtype = next(s_ref.parameters()).dtype
    image_id = student_model.config.image_token_id
    lm_sum = kd_sum = code_sum = 0.0
    supervised_count = 0
    paper_sums = [[0.0, 0] for _ in students]
    batch_size = batch["input_ids"].shape[0]
    for b in range(batch_size):
        real = batch["attention_mask"][b].bool()
        ids, labels = batch["input_ids"][b][real], batch["labels"][b][real]
        kw = dict(input_ids=ids[None], pixel_values=batch["pixel_values"][b:b + 1].to(dtype), output_attentions=True)
        with torch.no_grad():
            t_out = t_ref(**kw)
        s_out = s_ref(**kw)
        target = labels[1:]
        supervised = target != -100
        s_logits = s_out.logits[0, :-1][supervised]
        t_logits = t_out.logits[0, :-1][supervised][:, :s_logits.shape[-1]]
        log_ps, log_pt = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        lm_sum = lm_sum + F.cross_entropy(s_logits, target[supervised], reduction="sum")
        kd_sum = kd_sum + (log_pt.exp() * (log_pt - log_ps)).sum()
        supervised_count += int(supervised.sum())
        s_attn = [a[0] for a in s_out.attentions]
        t_attn = [a[0] for a in t_out.attentions]
        if preset == "code":
            code_sum = code_sum + authors_code_vat(s_attn, t_attn, ids, image_id, students, windows)
        else:
            for j, (total, rows) in enumerate(paper_rows(s_attn, t_attn, ids, image_id, students, windows)):
                paper_sums[j][0] = paper_sums[j][0] + total
                paper_sums[j][1] += rows
    out = {"lm": lm_sum / supervised_count, "kd": kd_sum / supervised_count}
    if preset == "code":
        out["vat"] = code_sum / batch_size            # summed over layers, averaged over the batch
    else:
        out["vat"] = sum(total / rows for total, rows in paper_sums) / len(students)   # mean over layers
    out["loss"] = out["lm"] + out["kd"] + out["vat"]
    return out, s_ref
