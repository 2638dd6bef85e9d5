"""Language-model loss and logit knowledge distillation over the supervised tokens, in row chunks.

A (B, L, V) logit tensor for a 150k vocabulary is the largest activation of a small LM's step (B=8,
L=4096 in float32: about 19 GiB, twice that with a teacher). `lm_and_kd_losses` never forms it: it keeps
only the rows that predict a supervised label, and turns chunk_size of them at a time into logits under
activation checkpointing, so backward keeps the (N, H) hidden rows and recomputes each (chunk, V) block.

`dense_lm_and_kd_losses` is the same math on full logits, written independently: the reference for tests.

Which positions are compared. Here teacher and student distributions are compared where the next-token
loss is taken: hidden position i, whose logits predict token i + 1, is used when labels[:, i + 1] is
supervised. The authors' DistillTrainer instead compares the logits at the positions whose *unshifted*
label is supervised (label i ≠ −100 selects the logits at i, which predict token i + 1): one token off,
so it distils the prediction of the token after each answer token, including the one after the final
end-of-turn, and skips the prediction of the first answer token. This library uses the next-token
positions on purpose (docs/fidelity.md lists the differences). The authors' term is also written as the
cross-entropy −Σ p_t log p_s, which differs from KL(p_t ‖ p_s) by the teacher's entropy, a constant
with no gradient.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100  # Hugging Face's label for "no loss at this position"


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    return repr(x)


def _check_kind_and_temperature(kind, temperature) -> None:
    if kind not in KD_KINDS:
        _fail("kind", f"one of {KD_KINDS}", repr(kind))
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature <= 0):
        _fail("temperature", "a finite number > 0", repr(temperature))


def _check_labels(labels, batch_shape, hidden_name: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        _fail("labels", "a 2-D (B, L) integer tensor", _describe(labels))
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        _fail("labels", "an integer dtype (torch.long)", labels.dtype)
    if tuple(labels.shape) != tuple(batch_shape):
        _fail("labels", f"shape (B, L) = {tuple(batch_shape)} as in {hidden_name}", tuple(labels.shape))


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Supervised labels must be token ids; anything else would fail inside cross_entropy (on CUDA as a
    device-side assert that kills the process)."""
    if targets.numel() and bool(((targets < 0) | (targets >= vocab_size)).any()):
        bad = targets[(targets < 0) | (targets >= vocab_size)][0].item()
        _fail("labels", f"{IGNORE_INDEX} or a token id in [0, {vocab_size}) (the student's vocabulary)", bad)


def _kd_per_row(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Divergence per row, (N, V) log-probabilities -> (N,).

    kl_div(input=log q, target=log p, log_target=True) sums p (log p - log q) = KL(p || q).
    The JSD mixture is taken in log space: log m = logaddexp(log p_t, log p_s) - log 2, so no probability
    underflows to zero before its log is taken.
    """

    def kl(log_p, log_q):  # KL(p || q) per row
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)

    if kind == "forward_kl":
        return kl(log_p_teacher, log_p_student)
    if kind == "reverse_kl":
        return kl(log_p_student, log_p_teacher)
    log_m = torch.logaddexp(log_p_teacher, log_p_student) - math.log(2.0)
    return 0.5 * kl(log_p_teacher, log_m) + 0.5 * kl(log_p_student, log_m)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # Losses in float32 at least (bf16 log-softmax over 150k entries loses the small probabilities);
    # float64 stays float64 so the tests can compare at double precision.
    return torch.promote_types(dtype, torch.float32)


def _chunk_sums(student_rows: torch.Tensor, targets: torch.Tensor, student_head: Callable,
                teacher_rows: Optional[torch.Tensor], teacher_head: Optional[Callable], kind: str,
                temperature: float) -> torch.Tensor:
    """(lm_sum, kd_sum) over one chunk of rows, as a (2,) tensor (kd_sum = 0 without a teacher).

    Teacher logits are made here, not passed in, so that checkpointing keeps only the teacher's hidden
    rows; they are recomputed under no_grad in backward like the student's.
    """
    student_logits = student_head(student_rows)
    student_logits = student_logits.to(_loss_dtype(student_logits.dtype))
    lm_sum = F.cross_entropy(student_logits, targets, reduction="sum")
    if teacher_rows is None:
        return torch.stack([lm_sum, torch.zeros_like(lm_sum)])
    vocab = student_logits.shape[-1]
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_rows)
        teacher_logits = teacher_logits[:, :vocab].to(device=student_logits.device, dtype=student_logits.dtype)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    kd_sum = _kd_per_row(log_p_student, log_p_teacher, kind).sum()
    return torch.stack([lm_sum, kd_sum])


def lm_and_kd_losses(student_hidden: torch.Tensor, labels: torch.Tensor, student_head: Callable, *,
                     teacher_hidden: Optional[torch.Tensor] = None, teacher_head: Optional[Callable] = None,
                     kind: str = "forward_kl", temperature: float = 1.0,
                     chunk_size: int = 1024) -> Dict[str, torch.Tensor]:
    """Next-token cross-entropy of the student and, with a teacher, logit distillation, without (B, L, V) logits.

    Position i of the hidden states predicts labels[:, i + 1] (the Hugging Face causal shift); only the N
    rows (b, i) with labels[b, i + 1] != -100 are used. They are gathered to (N, H), and logits are made
    chunk_size rows at a time, each chunk under non-reentrant activation checkpointing: peak memory holds
    one (chunk_size, V) block (two with a teacher) rather than N of them, at the price of running the
    heads again in backward.

    Args:
        student_hidden: (B, L, Hs) floating tensor, the student LM's final hidden states (after its last
            norm), normally requiring grad.
        labels: (B, L) integer tensor (torch.long), token ids, with -100 where no loss is taken (prompt,
            image, padding). labels[:, 0] is never a target.
        student_head: module or callable mapping (N, Hs) -> (N, Vs) logits, the student's lm_head (an
            nn.Linear, possibly wrapped by peft). Its parameters receive gradients.
        teacher_hidden: (B, L, Ht) floating tensor, the teacher's final hidden states for the same
            sequences, or None (default) for the language-model loss alone. Never receives gradients.
        teacher_head: module mapping (N, Ht) -> (N, Vt) with Vt >= Vs; required with teacher_hidden. Only
            the first Vs teacher logits are used (the extra ids are padding or tokens the student lacks).
        kind: "forward_kl" (default) KL(p_t || p_s) = sum_v p_t (log p_t - log p_s); "reverse_kl"
            KL(p_s || p_t); "jsd" 0.5 KL(p_t || m) + 0.5 KL(p_s || m) with m = (p_t + p_s) / 2, where
            p = softmax(logits / temperature).
        temperature: finite float > 0, default 1.0. The kd loss is scaled by temperature**2 so its
            gradient magnitude does not shrink as the temperature grows (Hinton et al., 2015).
        chunk_size: int >= 1, default 1024, rows per logit block.

    Returns:
        {"lm": scalar, "kd": scalar} with a teacher, {"lm": scalar} without, each the sum over the N rows
        divided by N, in float32 (float64 when the logits are float64). lm equals
        F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100). With
        N == 0 every entry is a zero that is still connected to student_hidden and student_head, so
        backward (and DDP's gradient hooks) run and see zero gradients instead of NaN.

    Raises:
        ValueError: naming the argument, for a bad shape or dtype, a label that is neither -100 nor a
            student token id, teacher_hidden without teacher_head (or the reverse), a teacher vocabulary
            smaller than the student's, an unknown kind, a non-positive temperature or a bad chunk_size.
    """
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() != 3 \
            or not student_hidden.dtype.is_floating_point:
        _fail("student_hidden", "a 3-D (B, L, Hs) floating tensor", _describe(student_hidden))
    _check_labels(labels, student_hidden.shape[:2], "student_hidden")
    if labels.device != student_hidden.device:
        _fail("labels", f"device {student_hidden.device} as student_hidden", labels.device)
    if not callable(student_head):
        _fail("student_head", "a module mapping (N, Hs) -> (N, Vs)", type(student_head).__name__)
    if teacher_hidden is not None and teacher_head is None:
        _fail("teacher_head", "a module mapping (N, Ht) -> (N, Vt) when teacher_hidden is given", None)
    if teacher_hidden is None and teacher_head is not None:
        _fail("teacher_hidden", "a (B, L, Ht) tensor when teacher_head is given", None)
    if teacher_hidden is not None:
        if not isinstance(teacher_hidden, torch.Tensor) or teacher_hidden.dim() != 3 \
                or not teacher_hidden.dtype.is_floating_point:
            _fail("teacher_hidden", "a 3-D (B, L, Ht) floating tensor", _describe(teacher_hidden))
        if teacher_hidden.shape[:2] != student_hidden.shape[:2]:
            _fail("teacher_hidden", f"(B, L) = {tuple(student_hidden.shape[:2])} as in student_hidden",
                  tuple(teacher_hidden.shape[:2]))
        if not callable(teacher_head):
            _fail("teacher_head", "a module mapping (N, Ht) -> (N, Vt)", type(teacher_head).__name__)
    _check_kind_and_temperature(kind, temperature)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        _fail("chunk_size", "an int >= 1", repr(chunk_size))

    # Hidden position i predicts token i + 1; the last position predicts nothing.
    supervised = labels[:, 1:] != IGNORE_INDEX  # (B, L - 1)
    student_rows = student_hidden[:, :-1][supervised]  # (N, Hs)
    targets = labels[:, 1:][supervised]  # (N,)
    num_rows = targets.numel()
    with_teacher = teacher_hidden is not None
    if num_rows == 0:
        # Running the head on zero rows ties the zero to its parameters as well as to student_hidden.
        zero = student_head(student_rows).sum().to(_loss_dtype(student_hidden.dtype)) * 0.0
        return {"lm": zero, "kd": zero.clone()} if with_teacher else {"lm": zero}

    with torch.no_grad():  # one row each: vocabulary sizes before any real work
        student_vocab = student_head(student_rows[:1]).shape[-1]
        if with_teacher:
            teacher_rows = teacher_hidden[:, :-1][supervised.to(teacher_hidden.device)].detach()
            teacher_vocab = teacher_head(teacher_rows[:1]).shape[-1]
            if teacher_vocab < student_vocab:
                _fail("teacher_head", f"a vocabulary at least the student's ({student_vocab} logits)",
                      f"{teacher_vocab} logits")
    _check_targets(targets, student_vocab)

    use_checkpoint = torch.is_grad_enabled()
    totals = None
    for start in range(0, num_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        args = (student_rows[rows], targets[rows], student_head,
                teacher_rows[rows] if with_teacher else None, teacher_head, kind, float(temperature))
        sums = checkpoint(_chunk_sums, *args, use_reentrant=False) if use_checkpoint else _chunk_sums(*args)
        totals = sums if totals is None else totals + sums

    losses = {"lm": totals[0] / num_rows}
    if with_teacher:
        losses["kd"] = totals[1] * (temperature ** 2) / num_rows
    return losses


def dense_lm_and_kd_losses(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                           labels: torch.Tensor, *, kind: str = "forward_kl",
                           temperature: float = 1.0) -> Dict[str, torch.Tensor]:
    """Reference for `lm_and_kd_losses` on full logits: plain torch, no chunking, any float dtype.

    Args:
        student_logits: (B, L, Vs) floating tensor.
        teacher_logits: (B, L, Vt) floating tensor with Vt >= Vs (cut to the first Vs), or None.
        labels: (B, L) integer tensor, -100 = ignored; position i's logits predict labels[:, i + 1].
        kind: one of KD_KINDS, default "forward_kl".
        temperature: finite float > 0, default 1.0.

    Returns:
        {"lm", "kd"} (only "lm" without teacher_logits), scalars of the logits' dtype promoted to at least
        float32: means over the supervised positions, kd scaled by temperature**2. Zeros (connected to
        student_logits) when no position is supervised. teacher_logits is detached: as in the chunked
        version, the teacher gets no gradient.
    """
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() != 3:
        _fail("student_logits", "a 3-D (B, L, Vs) tensor", _describe(student_logits))
    _check_labels(labels, student_logits.shape[:2], "student_logits")
    _check_kind_and_temperature(kind, temperature)
    dtype = _loss_dtype(student_logits.dtype)
    vocab = student_logits.shape[-1]
    logits = student_logits[:, :-1].to(dtype)  # (B, L-1, Vs)
    target = labels[:, 1:]
    mask = (target != IGNORE_INDEX).to(dtype)
    count = mask.sum()

    log_p_s = torch.log_softmax(logits.flatten(0, 1), dim=-1)
    safe_target = target.flatten().clamp(min=0).unsqueeze(-1)
    nll = -log_p_s.gather(-1, safe_target).squeeze(-1)  # (B*(L-1),)
    losses = {"lm": (nll * mask.flatten()).sum() / count.clamp(min=1)}
    if teacher_logits is None:
        return losses

    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 3 \
            or teacher_logits.shape[:2] != student_logits.shape[:2]:
        _fail("teacher_logits", f"a (B, L, Vt) tensor with (B, L) = {tuple(student_logits.shape[:2])}",
              _describe(teacher_logits))
    if teacher_logits.shape[-1] < vocab:
        _fail("teacher_logits", f"a vocabulary of at least {vocab}", teacher_logits.shape[-1])
    t = teacher_logits[:, :-1, :vocab].detach().to(dtype).flatten(0, 1) / temperature
    s = logits.flatten(0, 1) / temperature
    p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1)
    log_p_t, log_p_s = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    if kind == "forward_kl":
        per_row = (p_t * (log_p_t - log_p_s)).sum(-1)
    elif kind == "reverse_kl":
        per_row = (p_s * (log_p_s - log_p_t)).sum(-1)
    else:
        m = 0.5 * (p_t + p_s)
        per_row = 0.5 * (p_t * (log_p_t - m.log())).sum(-1) + 0.5 * (p_s * (log_p_s - m.log())).sum(-1)
    losses["kd"] = temperature ** 2 * (per_row * mask.flatten()).sum() / count.clamp(min=1)
    return losses
