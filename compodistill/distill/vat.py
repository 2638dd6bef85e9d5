"""VAT: visual attention alignment between matched teacher and student layers.

For a layer l, A^l is the head-averaged causal attention; a slice keeps some query rows of it against the
visual keys only. With matched pairs j = 1..k (each student layer against the mean of a window of teacher
layers, Ā_t^j = mean_{l in window j} A_t^l):

    reduce="rows":  L_j = Σ_rows w · ℓ( A_s[row], Ā_t[row] ) / Σ_rows w        (rows of all samples pooled)
    reduce="mean":  L_j = mean over samples of ℓ( pool(A_s), pool(Ā_t) )        (one vector per sample)
    L_VAT = mean_j L_j  or  Σ_j L_j                                               (layer_reduction)

with ℓ = 1 − cos (default), the mean squared error, or KL(teacher ‖ student) of the vectors normalised
over the visual keys. pool(·)[key] is the mean of the key's column over the sample's rows.

The attention-sink filter (sink_filter=True) acts on each sample's whole block (its rows × the visual
keys), as the authors' DistillTrainer does: with μ and σ the mean and the Bessel-corrected standard
deviation over every entry of the block (causal zeros included), computed separately for the student
block S and the teacher block T, an entry is kept where

    S ≤ μ_S + σ_S  and  T ≤ μ_T + σ_T  and  T ≠ 0.

With reduce="mean" each key column then becomes the mean of its kept entries (divided by the number of
kept entries in the column, at least 1), for S and for T; with reduce="rows" the dropped entries are set
to 0 in both rows before ℓ. The filter is a 0/1 mask: no gradient flows through μ or σ.

Two presets (`VAT_PRESETS`):

- "paper": the paper's formula. Text query rows, per-row cosine, intermediate layers (30–70 % of depth)
  with group matching, mean over layers. Runs inside the fused attention kernel
  (compodistill_kernels.attention_with_alignment): no slice is ever materialised for the student.
- "code": the authors' public DistillTrainer, exactly. Visual query rows (the N×N visual→visual block),
  the block sink filter, column pooling, cosine with eps 1e-8, summed over layers and averaged over the
  batch; layers from the authors' depth table (`CODE_STUDENT_LAYERS`, `CODE_TEACHER_LAYERS`), scaled by
  depth fraction for depths the table does not list. The student exports its N×N slices with
  compodistill_kernels.attention_with_visual_slice(reduce="rows") (differentiable), and the filter and
  pooling run in PyTorch, because the filter needs the whole block before pooling.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F

from ..models.attention import SliceRows
from .layers import TARGET_BANDS, target_layers

QUERY_ROWS = ("visual", "text", "answer", "all")
REDUCES = ("rows", "mean")
LOSSES = ("cosine", "mse", "kl")
MATCHINGS = ("simple", "group", "adaptive")
LAYER_REDUCTIONS = ("mean", "sum")

# The authors' DistillTrainer picks its layers from a table keyed by depth (0-based indices): seven
# consecutive layers from a first layer per depth; a teacher takes the windows [i, i + n) starting at
# each of them, n per depth. Its student side lists depths 24, 28 and 40, its teacher side 24, 28, 32
# and 40, with the same seven layers wherever a depth is on both sides; this library also gives a
# 32-layer student the seven layers its teacher side lists (11..17). "group" matching of 7 student
# layers against the teacher layers first .. first + 6 + n − 1 gives exactly the authors' windows
# (n = m − k + 1).
CODE_FIRST_LAYER = {24: 8, 28: 9, 32: 11, 40: 13}
CODE_TEACHER_WINDOW = {24: 2, 28: 3, 32: 3, 40: 5}
CODE_STUDENT_LAYERS = {depth: (first, first + 6) for depth, first in CODE_FIRST_LAYER.items()}   # inclusive
CODE_TEACHER_LAYERS = {depth: (first, first + 6 + CODE_TEACHER_WINDOW[depth] - 1)
                       for depth, first in CODE_FIRST_LAYER.items()}
# Depths outside the table: the 24-layer student's and 40-layer teacher's ranges as fractions of depth.
CODE_FALLBACK_FRACTIONS = {"student": (8 / 24, 14 / 24), "teacher": (13 / 40, 23 / 40)}
CODE_LAYERS = "code"  # the layer spec that selects the table above


@dataclass(frozen=True)
class VATConfig:
    """How VAT picks, matches and compares attention.

    student_layers / teacher_layers: a band ("early", "intermediate", "later", "all"), an explicit list
        of 0-based layer indices, {"start": a, "end": b} (inclusive), {"fraction": [lo, hi]}: layers
        round(lo·N) … round(hi·N), or "code": the authors' depth table (student 24 → 8..14, 28 → 9..15,
        32 → 11..17, 40 → 13..19; teacher 24 → 8..15, 28 → 9..17, 32 → 11..19, 40 → 13..23, which group
        matching cuts into windows of 2, 3, 3 and 5 layers), and for a depth the table lacks the
        fraction [8/24, 14/24] (student) or [13/40, 23/40] (teacher) of it.
    matching: "group" (sliding window of n = m − k + 1 teacher layers, averaged), "simple" (one teacher
        layer per student layer by depth ratio) or "adaptive" (most similar teacher layer, monotone in
        depth, picked on the first batch).
    query_rows: "text" (real tokens after the image), "visual" (the image tokens), "answer" (tokens
        with a label) or "all" (every real row from the image on; earlier rows see no visual key).
    reduce: "rows" (per-row loss) or "mean" (rows pooled per key column, one vector per sample).
    loss: "cosine" (fused kernel when reduce="rows" and no sink filter), "mse" or "kl".
    sink_filter: the authors' block filter (see the module docstring).
    layer_reduction: "mean" (the paper's 1/k) or "sum" (the public code) over matched layers.
    """

    student_layers: object = "intermediate"
    teacher_layers: object = "intermediate"
    matching: str = "group"
    query_rows: str = "text"
    reduce: str = "rows"
    loss: str = "cosine"
    sink_filter: bool = False
    layer_reduction: str = "mean"
    eps: float = 1e-8

    def __post_init__(self):
        for name, allowed in (("matching", MATCHINGS), ("query_rows", QUERY_ROWS), ("reduce", REDUCES),
                              ("loss", LOSSES), ("layer_reduction", LAYER_REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"vat.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.sink_filter, bool):
            raise ValueError(f"vat.sink_filter: expected true or false, got {self.sink_filter!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"vat.eps: expected a positive number, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        for name in ("student_layers", "teacher_layers"):
            spec = getattr(self, name)
            if isinstance(spec, str) and spec not in TARGET_BANDS and spec != CODE_LAYERS:
                raise ValueError(f"vat.{name}: expected a band {sorted(TARGET_BANDS)}, {CODE_LAYERS!r}, a list "
                                 f"of layers, {{'start', 'end'}} or {{'fraction'}}; got {spec!r}")

    @property
    def fused(self) -> bool:
        """True when the student's loss runs inside the attention kernel (no student slice exists)."""
        return self.loss == "cosine" and self.reduce == "rows" and not self.sink_filter

    @property
    def export_reduce(self) -> str:
        """What the attention kernel exports per layer when the loss is not fused: pooled vectors
        ("mean") when nothing needs the rows, else the rows ("rows"; the sink filter needs the block)."""
        return "mean" if self.reduce == "mean" and not self.sink_filter else "rows"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "VATConfig":
        """Build from a config mapping; `preset` picks the base values, other keys override them."""
        values = dict(values)
        preset = values.pop("preset", "paper")
        if preset not in VAT_PRESETS:
            raise ValueError(f"vat.preset: expected one of {sorted(VAT_PRESETS)}, got {preset!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"vat: unknown keys {sorted(unknown)}; expected some of {sorted(known | {'preset'})}")
        return replace(VAT_PRESETS[preset], **values)


VAT_PRESETS = {
    # The paper's formula: text query rows, per-row cosine, intermediate layers, group matching, 1/k.
    "paper": VATConfig(),
    # The authors' DistillTrainer: the depth table (student 8..14 of 24 against teacher windows [i, i + 5),
    # i = 13..19 of 40), the visual→visual block, the block sink filter, column pooling, summed over layers.
    "code": VATConfig(student_layers=CODE_LAYERS, teacher_layers=CODE_LAYERS, matching="group",
                      query_rows="visual", reduce="mean", loss="cosine", sink_filter=True,
                      layer_reduction="sum"),
}


def resolve_layers(num_layers: int, spec, *, argument: str, side: str | None = None) -> list[int]:
    """0-based layer indices for a VATConfig layer spec (see `VATConfig`).

    side: "student" or "teacher"; needed only by the "code" spec, whose table differs per side.
    """
    if spec == CODE_LAYERS:
        if side not in ("student", "teacher"):
            raise ValueError(f"side: the {CODE_LAYERS!r} layer spec needs side='student' or 'teacher', got {side!r}")
        table = CODE_STUDENT_LAYERS if side == "student" else CODE_TEACHER_LAYERS
        if num_layers in table:
            start, end = table[num_layers]
            spec = {"start": start, "end": end}
        else:
            spec = {"fraction": list(CODE_FALLBACK_FRACTIONS[side])}
    if isinstance(spec, dict) and "fraction" in spec:
        lo_hi = spec["fraction"]
        valid = (set(spec) == {"fraction"} and isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2
                 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lo_hi)
                 and 0 <= lo_hi[0] <= lo_hi[1] <= 1)
        if not valid:
            raise ValueError(f"{argument}: expected {{'fraction': [lo, hi]}} with 0 <= lo <= hi <= 1, got {spec!r}")
        end = min(round(lo_hi[1] * num_layers), num_layers - 1)
        start = min(round(lo_hi[0] * num_layers), end)
        spec = {"start": start, "end": end}
    try:
        return target_layers(num_layers, spec)
    except ValueError as err:
        raise ValueError(f"{argument}: {err}") from None


def query_rows(which: str, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
               visual_start: torch.Tensor, visual_len: int) -> SliceRows:
    """The query rows of each sample as one (query_start, query_len, row_weight) window.

    Samples select different row ranges (prompts and answers differ in length, padding sits left or
    right). The window has the longest range's length; each sample's start is moved left where the
    window would run past L, and row_weight is 1 exactly on the sample's own rows.
    """
    if which not in QUERY_ROWS:
        raise ValueError(f"query_rows: expected one of {QUERY_ROWS}, got {which!r}")
    B = visual_start.shape[0]
    device = visual_start.device
    if which == "visual":
        ones = torch.ones(B, visual_len, device=device)
        return SliceRows(visual_start, visual_len, visual_start.clone(), visual_len, ones)
    if attention_mask is None:
        raise ValueError(f"attention_mask: query_rows={which!r} needs the attention mask to find real tokens")
    L = attention_mask.shape[1]
    positions = torch.arange(L, device=device)[None, :]
    selected = attention_mask.bool()
    if which == "answer":
        if labels is None:
            raise ValueError("labels: query_rows='answer' needs labels (-100 marks rows that are not answers)")
        selected = selected & (labels != -100)
    first = visual_start[:, None] if which == "all" else (visual_start + visual_len)[:, None]
    selected = selected & (positions >= first)
    any_row = selected.any(1)
    lo = torch.where(selected, positions, L).amin(1)
    hi = torch.where(selected, positions, -1).amax(1) + 1
    lo = torch.where(any_row, lo, torch.zeros_like(lo))
    hi = torch.where(any_row, hi, torch.ones_like(hi))
    query_len = max(int((hi - lo).max()), 1)
    query_start = torch.minimum(lo, torch.full_like(lo, L - query_len))
    rows = query_start[:, None] + torch.arange(query_len, device=device)[None, :]
    row_weight = selected.gather(1, rows).float()
    return SliceRows(visual_start, visual_len, query_start, query_len, row_weight)


def indexed_query_rows(which: str, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                       visual_index: torch.Tensor) -> SliceRows:
    """The query rows of each sample as positions, for visual tokens given as positions.

    visual_index: (B, Nv) int64 positions of each sample's visual tokens, ascending, padded with -1 (any
    number of images and runs). Rows, per sample, in ascending order and padded with -1:
      visual  the visual tokens themselves;
      text    real tokens after the sample's first visual token that are not visual;
      answer  those of them that are supervised (labels != -100);
      all     real tokens from the first visual token on, visual ones included.
    With one contiguous run of visual tokens these are the rows of `query_rows`. row_weight is 1 on a
    sample's real rows and 0 on padding; a sample with no such row has only padding.
    """
    if which not in QUERY_ROWS:
        raise ValueError(f"query_rows: expected one of {QUERY_ROWS}, got {which!r}")
    if visual_index.ndim != 2 or visual_index.dtype != torch.int64:
        raise ValueError(f"visual_index: expected a (B, Nv) int64 tensor, got {tuple(visual_index.shape)} "
                         f"{visual_index.dtype}")
    if which == "visual":
        return SliceRows(visual_index=visual_index, query_index=visual_index.clone(),
                         row_weight=(visual_index >= 0).float())
    if attention_mask is None:
        raise ValueError(f"attention_mask: query_rows={which!r} needs the attention mask to find real tokens")
    B, L = attention_mask.shape
    device = visual_index.device
    positions = torch.arange(L, device=device)[None, :].expand(B, L)
    is_visual = torch.zeros(B, L, dtype=torch.bool, device=device)
    is_visual.scatter_(1, visual_index.clamp_min(0), visual_index >= 0)
    has_image = (visual_index >= 0).any(1, keepdim=True)
    first = torch.where(visual_index >= 0, visual_index, L).amin(1, keepdim=True)
    selected = attention_mask.bool() & (positions >= first) & has_image
    if which != "all":
        selected = selected & ~is_visual
    if which == "answer":
        if labels is None:
            raise ValueError("labels: query_rows='answer' needs labels (-100 marks rows that are not answers)")
        selected = selected & (labels != -100)
    count = max(int(selected.sum(1).max()), 1)
    # Selected positions first, in order: unselected ones are pushed past L before sorting.
    order = torch.where(selected, positions, positions + L).sort(dim=1).values[:, :count]
    query_index = torch.where(order < L, order, torch.full_like(order, -1))
    return SliceRows(visual_index=visual_index, query_index=query_index, row_weight=(query_index >= 0).float())


def group_targets(teacher_slices: dict, matches) -> dict:
    """Ā_t^j: the mean of the teacher slices in each student layer's window, keyed by student layer."""
    targets = {}
    for match in matches:
        window = [teacher_slices[layer] for layer in match.teacher_layers]
        targets[match.student_layer] = window[0] if len(window) == 1 else torch.stack(window).mean(0)
    return targets


def _below_mean_plus_std(x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """x ≤ μ + σ per sample, μ and σ (Bessel-corrected) over the entries of the selected rows (and real
    columns). x (B, R, N), rows (B, R) bool, columns (B, N) bool or None. A block of one entry has σ = 0."""
    selected = rows[:, :, None].expand_as(x)
    if columns is not None:
        selected = selected & columns[:, None, :]
    count = selected.sum((1, 2))
    mean = torch.where(selected, x, 0).sum((1, 2)) / count.clamp_min(1)
    squares = torch.where(selected, (x - mean[:, None, None]) ** 2, 0).sum((1, 2))
    std = (squares / (count - 1).clamp_min(1)).sqrt()
    return x <= (mean + std)[:, None, None]


def sink_keep(student: torch.Tensor, teacher: torch.Tensor, row_weight: torch.Tensor | None,
              column_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention-sink filter of the authors' DistillTrainer, per sample over its whole block.

    student, teacher: (B, R, N) slices (rows × visual keys); row_weight: (B, R), rows with weight 0
    belong to no sample and are neither counted nor kept (None: every row). Returns (B, R, N) bool:
    S ≤ μ_S + σ_S and T ≤ μ_T + σ_T and T ≠ 0, each side with its own mean and Bessel-corrected
    standard deviation over the sample's selected entries. column_mask: (B, N) bool, False on the padding
    columns of indexed visual tokens, which are neither counted nor kept (None: every column is real).
    """
    s, t = student.detach(), teacher.detach()
    rows = (torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if row_weight is None
            else row_weight.to(s.device) > 0)
    columns = None if column_mask is None else column_mask.to(s.device).bool()
    keep = _below_mean_plus_std(s, rows, columns) & _below_mean_plus_std(t, rows, columns) & (t != 0) & rows[:, :, None]
    return keep if columns is None else keep & columns[:, None, :]


def _loss_dtype(*tensors) -> torch.dtype:
    # float32 at least; float64 stays float64 so that tests can compare at double precision.
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def slice_loss(student: torch.Tensor, teacher: torch.Tensor, row_weight: torch.Tensor | None, *,
               loss: str, reduce: str = "rows", sink_filter: bool = False, eps: float = 1e-8,
               column_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The VAT loss of one matched layer from exported slices (see the module docstring).

    student, teacher: (B, R, N) rows over the visual keys, or (B, N) vectors already pooled by the kernel
        (one row per sample; reduce and sink_filter do not apply to them).
    row_weight: (B, R) for rows, (B,) for pooled vectors; None for uniform.
    reduce: "rows" (Σ w·ℓ(row) / Σ w over every row of the batch) or "mean" (rows pooled per key column,
        then the mean of ℓ over the samples that have a row).
    sink_filter: the authors' block filter (`sink_keep`), before pooling or per-row loss.
    column_mask: (B, N) bool, True on real visual columns, for slices of indexed visual tokens whose
        padding columns are 0; the losses then run over real columns only (None: all are real).
    Returns a scalar in float32 (float64 for float64 inputs), 0 when no row has weight; the teacher
    gets no gradient.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if reduce not in REDUCES:
        raise ValueError(f"reduce: expected one of {REDUCES}, got {reduce!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"teacher: slice shape {tuple(teacher.shape)} differs from the student's "
                         f"{tuple(student.shape)}")
    if student.ndim == 2 and sink_filter:
        raise ValueError("student: the sink filter needs (B, R, N) rows, got pooled (B, N) vectors")
    dtype = _loss_dtype(student, teacher)
    student, teacher = student.to(dtype), teacher.detach().to(dtype)
    if student.ndim == 3:
        weight = (torch.ones(student.shape[:2], dtype=dtype, device=student.device) if row_weight is None
                  else row_weight.to(device=student.device, dtype=dtype))
        keep = sink_keep(student, teacher, weight, column_mask) if sink_filter else None
        if reduce == "mean":
            # Column means over the kept entries; without the filter, the row-weighted mean of the rows.
            if keep is None:
                share = weight / weight.sum(1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
                student, teacher = (share[:, :, None] * student).sum(1), (share[:, :, None] * teacher).sum(1)
            else:
                keep = keep.to(dtype)
                count = keep.sum(1).clamp_min(1)
                student, teacher = (student * keep).sum(1) / count, (teacher * keep).sum(1) / count
            row_weight = (weight.sum(1) > 0).to(dtype)
        else:
            if keep is not None:
                student, teacher = student * keep, teacher * keep
            row_weight = weight
    if loss == "cosine":
        per_row = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=eps)
    elif loss == "mse":
        if column_mask is None:
            per_row = (student - teacher).pow(2).mean(-1)
        else:
            columns = column_mask.to(device=student.device, dtype=student.dtype)
            columns = columns if student.ndim == 2 else columns[:, None, :]
            per_row = ((student - teacher).pow(2) * columns).sum(-1) / columns.sum(-1).clamp_min(1)
    else:
        p_t = teacher.clamp_min(0) / teacher.sum(-1, keepdim=True).clamp_min(eps)
        p_s = student.clamp_min(0) / student.sum(-1, keepdim=True).clamp_min(eps)
        per_row = (p_t * ((p_t + eps).log() - (p_s + eps).log())).sum(-1)
    w = torch.ones_like(per_row) if row_weight is None else row_weight.to(per_row)
    total = w.sum()
    return (w * per_row).sum() / torch.where(total > 0, total, torch.ones_like(total))


def combine_layers(per_layer: dict, layer_reduction: str) -> torch.Tensor:
    """Sum or mean of the per-layer losses (in student-layer order)."""
    if layer_reduction not in LAYER_REDUCTIONS:
        raise ValueError(f"layer_reduction: expected one of {LAYER_REDUCTIONS}, got {layer_reduction!r}")
    if not per_layer:
        raise ValueError("per_layer: no layer losses to combine")
    values = torch.stack([per_layer[layer] for layer in sorted(per_layer)])
    return values.sum() if layer_reduction == "sum" else values.mean()
