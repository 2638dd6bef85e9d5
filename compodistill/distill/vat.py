"""VAT: visual attention alignment between matched teacher and student layers.

For a layer l, Ã^l is the head-averaged causal attention of some query rows over the visual keys.
With matched pairs j = 1..k (each student layer against the mean of a window of teacher layers):

    L_VAT = reduce_j  Σ_rows w · ℓ( Ã_s^{l_s(j)}[row], Ā_t^{j}[row] ) / Σ_rows w,   reduce_j ∈ {mean, sum}

with ℓ = 1 − cos (default; computed inside the fused attention kernel), the mean squared error, or
KL(teacher ‖ student) of the rows normalised over the visual keys. `reduce="mean"` first pools the rows
of each sample into one vector (the public code's choice), then applies ℓ once per sample.
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


@dataclass(frozen=True)
class VATConfig:
    """How VAT picks, matches and compares attention.

    student_layers / teacher_layers: a band ("early", "intermediate", "later", "all"), an explicit list
        of 0-based layer indices, {"start": a, "end": b} (inclusive), or {"fraction": [lo, hi]}: layers
        round(lo·N) … round(hi·N), which scales the public code's choice to any depth.
    matching: "group" (sliding window of n = m − k + 1 teacher layers, averaged), "simple" (one teacher
        layer per student layer by depth ratio) or "adaptive" (most similar teacher layer, monotone in
        depth, picked on the first batch).
    query_rows: "text" (real tokens after the image), "visual" (the image tokens), "answer" (tokens
        with a label) or "all" (every real row from the image on; earlier rows see no visual key).
    reduce: "rows" (per-row loss) or "mean" (rows pooled per sample first).
    loss: "cosine" (fused kernel when reduce="rows" and no sink filter), "mse" or "kl".
    sink_filter: zero the visual keys whose attention exceeds mean + std (population) of its vector, in
        both vectors, wherever either side exceeds its own threshold (the public code's sink filter).
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
            if isinstance(spec, str) and spec not in TARGET_BANDS:
                raise ValueError(f"vat.{name}: expected a band {sorted(TARGET_BANDS)}, a list of layers, "
                                 f"{{'start', 'end'}} or {{'fraction'}}; got {spec!r}")

    @property
    def fused(self) -> bool:
        """True when the student's loss runs inside the attention kernel (no student slice exists)."""
        return self.loss == "cosine" and self.reduce == "rows" and not self.sink_filter

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
    # The public code: student layers 8–14 of 24 against teacher windows starting at 13–19 of 40 (n = 5),
    # visual query rows, sink filter, rows pooled per sample, summed over layers.
    "code": VATConfig(student_layers={"fraction": [8 / 24, 14 / 24]},
                      teacher_layers={"fraction": [13 / 40, 23 / 40]},
                      matching="group", query_rows="visual", reduce="mean", loss="cosine",
                      sink_filter=True, layer_reduction="sum"),
}


def resolve_layers(num_layers: int, spec, *, argument: str) -> list[int]:
    """0-based layer indices for a VATConfig layer spec (see `VATConfig`)."""
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


def group_targets(teacher_slices: dict, matches) -> dict:
    """Ā_t^j: the mean of the teacher slices in each student layer's window, keyed by student layer."""
    targets = {}
    for match in matches:
        window = [teacher_slices[layer] for layer in match.teacher_layers]
        targets[match.student_layer] = window[0] if len(window) == 1 else torch.stack(window).mean(0)
    return targets


def _sink_keep(x: torch.Tensor) -> torch.Tensor:
    threshold = x.mean(-1, keepdim=True) + x.std(-1, unbiased=False, keepdim=True)
    return x <= threshold


def slice_loss(student: torch.Tensor, teacher: torch.Tensor, row_weight: torch.Tensor | None, *,
               loss: str, sink_filter: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """Σ w·ℓ(student_row, teacher_row) / Σ w for exported slices.

    student, teacher: (B, R, N) rows over the visual keys, or (B, N) pooled vectors (one row each);
    row_weight: (B, R) or (B,), None for uniform. Returns a float32 scalar, 0 when Σ w = 0.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"teacher: slice shape {tuple(teacher.shape)} differs from the student's "
                         f"{tuple(student.shape)}")
    student, teacher = student.float(), teacher.detach().float()
    if sink_filter:
        keep = (_sink_keep(student.detach()) & _sink_keep(teacher)).float()
        student, teacher = student * keep, teacher * keep
    if loss == "cosine":
        per_row = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=eps)
    elif loss == "mse":
        per_row = (student - teacher).pow(2).mean(-1)
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
