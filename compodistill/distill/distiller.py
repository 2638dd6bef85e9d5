"""The Distiller: one module whose forward turns a batch into the named losses of a stage.

    lm   cross-entropy of the student on the supervised tokens
    kd   logit KD from the teacher on the same tokens (teacher vocab cut to the student's)
    vat  visual attention alignment over the matched layers
    loss Σ weight · value over the enabled terms

It is an nn.Module that owns the student (so `accelerate.prepare` can wrap it for DDP/FSDP and the
student's own layers run inside the wrapped forward) and merely refers to the teacher, which stays
frozen, in eval mode, under no_grad, and out of the module's parameters and state dict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.attention import (ATTENTION_NAME, AttentionProbe, enable_compodistill_attention,
                                num_language_model_layers)
from ..models import parts
from ..models.families import family_of, visual_index
from ..models.mllm import MLLM, image_token_count, llava_class, visual_token_positions
from ..models.vision import multimodal_embeddings
from .kd import KD_KINDS, lm_and_kd_losses
from .layers import adaptive_match, describe_matching, match_layers
from .vat import (VATConfig, combine_layers, group_targets, indexed_query_rows, query_rows, resolve_layers,
                  slice_loss)

@dataclass(frozen=True)
class LossWeights:
    """The weight of each loss term; 0 switches it off. lm: the student's next-token cross-entropy on
    the supervised tokens; kd: logit distillation from the teacher; vat: visual attention alignment."""

    lm: float = 1.0
    kd: float = 0.0
    vat: float = 0.0

    def __post_init__(self):
        for name in ("lm", "kd", "vat"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"losses.{name}: expected a weight >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.lm + self.kd + self.vat <= 0:
            raise ValueError("losses: every weight is 0; nothing would train")

    def as_dict(self) -> dict:
        return {"lm": self.lm, "kd": self.kd, "vat": self.vat}


@dataclass(frozen=True)
class KDConfig:
    """Logit KD: `kind` (forward_kl, reverse_kl, jsd), `temperature` > 0, and `chunk_size`, the rows of
    logits formed at a time (see kd.lm_and_kd_losses)."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    chunk_size: int = 1024

    def __post_init__(self):
        if self.kind not in KD_KINDS:
            raise ValueError(f"kd.kind: expected one of {list(KD_KINDS)}, got {self.kind!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"kd.temperature: expected > 0, got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"kd.chunk_size: expected an int > 0, got {self.chunk_size!r}")


@dataclass
class DistillConfig:
    """What the Distiller computes: loss weights, logit-KD settings and the VAT configuration. The same
    classes are the `losses`, `kd` and `vat` sections of a training stage's config. Dicts are accepted
    for each (a `vat` dict may name a preset)."""

    weights: LossWeights = field(default_factory=lambda: LossWeights(lm=1.0, kd=1.0, vat=1.0))
    kd: KDConfig = field(default_factory=KDConfig)
    vat: VATConfig = field(default_factory=VATConfig)

    def __post_init__(self):
        if isinstance(self.weights, dict):
            unknown = set(self.weights) - {"lm", "kd", "vat"}
            if unknown:
                raise ValueError(f"losses: unknown loss names {sorted(unknown)}; expected lm, kd, vat")
            self.weights = LossWeights(**{"lm": 0.0, "kd": 0.0, "vat": 0.0, **self.weights})
        if isinstance(self.kd, dict):
            self.kd = KDConfig(**self.kd)
        if isinstance(self.vat, dict):
            self.vat = VATConfig.from_dict(self.vat)
        for name, cls in (("weights", LossWeights), ("kd", KDConfig), ("vat", VATConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name}: expected a {cls.__name__} or a dict, got {getattr(self, name)!r}")

    @property
    def needs_teacher(self) -> bool:
        return self.weights.kd > 0 or self.weights.vat > 0


def _unwrap(model):
    if isinstance(model, MLLM):
        return model.model
    return model


def _family(model):
    """The family adapter of a transformers VLM (models.families), None for this library's own LLaVA
    (`CompoDistillLlava`, whose parts `models.parts` knows and whose image-token count is fixed)."""
    base = parts.base_model(model)
    if isinstance(base, llava_class()):
        return None
    return family_of(base.config)


def _parts(model):
    """(backbone, lm_head, config) of a LLaVA or of any supported family, also through a peft wrapper.
    The backbone runs vision tower, projector and decoder stack and returns last_hidden_state."""
    family = _family(model)
    if family is None:
        return parts.backbone(model), parts.lm_head(model), parts.base_model(model).config
    return family.backbone(model), family.lm_head(model), parts.base_model(model).config


def check_compatible(student: MLLM, teacher: MLLM):
    """Raise a ValueError when teacher and student cannot be distilled one into the other: token
    positions and vocabularies must line up, and both must see the same number of image tokens."""
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ValueError("teacher: its tokenizer differs from the student's; distillation needs one tokenizer "
                         "so that token positions and vocabulary line up")
    s_cfg, t_cfg = student.model.config, teacher.model.config
    if s_cfg.image_token_id != t_cfg.image_token_id:
        raise ValueError(f"teacher: image token id {t_cfg.image_token_id} differs from the student's "
                         f"{s_cfg.image_token_id}")
    if student.num_image_tokens != teacher.num_image_tokens:
        raise ValueError(f"teacher: {teacher.num_image_tokens} image tokens per image, the student has "
                         f"{student.num_image_tokens}")
    if t_cfg.text_config.vocab_size < s_cfg.text_config.vocab_size:
        raise ValueError(f"teacher: vocab size {t_cfg.text_config.vocab_size} is smaller than the student's "
                         f"{s_cfg.text_config.vocab_size}")


class Distiller(nn.Module):
    """forward(batch) → {"lm", "kd", "vat", "loss"} (terms with weight 0 are left out).

    Args:
        student: the student LLaVA (or an `MLLM`), possibly wrapped by peft.
        teacher: the teacher LLaVA (or an `MLLM`); needed when kd or vat has a weight.
        config: a `DistillConfig`.
        backend: attention backend for both models ("auto", "torch", "triton").

    batch: input_ids (B, L), attention_mask (B, L), pixel_values (B, 3, H, W) — or vision_features
    (B, N, D), the frozen vision tower's output (models.vision.vision_features) —, labels (B, L) with
    -100 on unsupervised tokens. For a LLaVA every sample holds one image as a contiguous run of image
    tokens. For the other families (models.families) the batch is the model's processor output plus
    labels (pixel_values, image_grid_thw, image_sizes, ... as the family takes them): samples may hold
    several images and different numbers of visual tokens, which the kernels then take as positions
    (visual_index / query_index). One equal-length contiguous run per sample uses the contiguous form.
    """

    def __init__(self, student, teacher=None, config: DistillConfig | None = None, *, backend: str = "auto"):
        super().__init__()
        if isinstance(student, MLLM) and isinstance(teacher, MLLM):
            check_compatible(student, teacher)
        self.config = config or DistillConfig()
        self.student = _unwrap(student)
        enable_compodistill_attention(self.student, backend=backend)
        self._teacher = None
        if self.config.needs_teacher:
            if teacher is None:
                raise ValueError("teacher: the kd and vat losses need a teacher model")
            teacher = _unwrap(teacher)
            teacher.requires_grad_(False)
            teacher.eval()
            enable_compodistill_attention(teacher, backend=backend)
            self._teacher = (teacher,)  # a tuple keeps it out of parameters(), state_dict() and prepare()
        _, _, s_cfg = _parts(self.student)
        self.family = _family(self.student)
        if self.family is None:
            self.image_token_ids = (int(s_cfg.image_token_id),)
            self.num_image_tokens = image_token_count(s_cfg)
        else:
            self.image_token_ids = self.family.image_token_ids(s_cfg)
            self.num_image_tokens = None
            teacher_family = None if self._teacher is None else _family(teacher)
            if teacher_family is not None:
                teacher_ids = teacher_family.image_token_ids(teacher.config)
                if set(teacher_ids) != set(self.image_token_ids):
                    raise ValueError(f"teacher: image token ids {teacher_ids} differ from the student's "
                                     f"{self.image_token_ids}; one processed batch must mark the same visual "
                                     "tokens for both (models.pairing.check_pair checks a batch)")
        self.matches = None
        if self.config.weights.vat > 0:
            vat = self.config.vat
            self.student_layers = resolve_layers(num_language_model_layers(self.student), vat.student_layers,
                                                 argument="vat.student_layers", side="student")
            self.teacher_layers = resolve_layers(num_language_model_layers(teacher), vat.teacher_layers,
                                                 argument="vat.teacher_layers", side="teacher")
            if vat.matching != "adaptive":
                self.matches = match_layers(self.student_layers, self.teacher_layers, vat.matching)

    @property
    def image_token_id(self) -> int:
        """The (first) id of the visual tokens; `image_token_ids` holds all of a family's."""
        return self.image_token_ids[0]

    @property
    def teacher(self):
        return None if self._teacher is None else self._teacher[0]

    def describe(self) -> str:
        """A few lines on the losses and the layer matching, for the training summary."""
        w = self.config.weights.as_dict()
        lines = ["losses: " + ", ".join(f"{k}×{v:g}" for k, v in w.items() if v > 0)]
        if w["kd"] > 0:
            lines.append(f"kd: {self.config.kd.kind}, temperature {self.config.kd.temperature:g}")
        if w["vat"] > 0:
            vat = self.config.vat
            lines.append(f"vat: {vat.loss} over {vat.query_rows} rows, reduce {vat.reduce}, "
                         f"{vat.layer_reduction} over layers, sink filter {'on' if vat.sink_filter else 'off'}, "
                         f"{'fused in the attention kernel' if vat.fused else 'on exported slices'}")
            if self.matches is None:
                lines.append(f"matching: adaptive over student {self.student_layers} and teacher "
                             f"{self.teacher_layers}, chosen on the first batch")
            else:
                lines.append(f"matching ({vat.matching}):\n" + describe_matching(self.matches))
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------
    def _backbone_forward(self, model, batch, probe):
        backbone, _, config = _parts(model)
        if config.text_config._attn_implementation != ATTENTION_NAME and probe is not None:
            raise ValueError("model: compodistill attention is not enabled; call enable_compodistill_attention")
        common = dict(attention_mask=batch.get("attention_mask"), use_cache=False, compodistill_probe=probe)
        if batch.get("vision_features") is not None:
            # the frozen tower's features, computed once per image: projector and LM run as usual
            embeds = multimodal_embeddings(model, batch["input_ids"], batch["vision_features"])
            out = backbone(inputs_embeds=embeds, **common)
        elif _family(model) is None:
            pixel_values = batch["pixel_values"].to(next(backbone.parameters()).dtype)
            out = backbone(input_ids=batch["input_ids"], pixel_values=pixel_values, **common)
        else:
            inputs = _family(model).model_inputs(batch, dtype=next(backbone.parameters()).dtype)
            out = backbone(input_ids=batch["input_ids"], **inputs, **common)
        if probe is not None:
            missing = probe.layers - set(probe.slices) - set(probe.losses)
            if missing:
                raise RuntimeError(f"layers {sorted(missing)} returned no attention result; is compodistill "
                                   "attention enabled on every language-model layer?")
        return out.last_hidden_state

    def _rows(self, batch):
        """The slice rows of a batch. One contiguous run of visual tokens of the same length per sample
        gives the contiguous form (no index gathers in the kernels); anything else (several images,
        different token counts, tiles with separators) the indexed form."""
        which, mask, labels = self.config.vat.query_rows, batch.get("attention_mask"), batch.get("labels")
        index = batch.get("visual_index")
        if index is None:
            index = visual_index(batch["input_ids"], self.image_token_ids)
        elif not torch.is_tensor(index) or index.dtype != torch.int64 or index.ndim != 2 \
                or index.shape[0] != batch["input_ids"].shape[0]:
            raise ValueError(f"visual_index: expected a (B, Nv) int64 tensor for batch {batch['input_ids'].shape[0]}, "
                             f"got {getattr(index, 'shape', index)}")
        real = index >= 0
        if not bool(real.any(1).all()):
            b = int((~real.any(1)).nonzero()[0])
            raise ValueError(f"input_ids: sample {b} has no image token (ids {self.image_token_ids})")
        counts = real.sum(1)
        span = index.gather(1, (counts - 1)[:, None])[:, 0] - index[:, 0] + 1
        if bool(real.all()) and bool((span == counts).all()):
            if self.num_image_tokens is not None and int(counts[0]) != self.num_image_tokens:
                # A LLaVA with one image per sample: visual_token_positions explains the mismatch.
                visual_token_positions(batch["input_ids"], self.image_token_ids[0], self.num_image_tokens)
            return query_rows(which, mask, labels, index[:, 0].clone(), int(counts[0]))
        return indexed_query_rows(which, mask, labels, index)

    def _teacher_slices(self, batch, rows, layers):
        reduce = self.config.vat.export_reduce
        probe = AttentionProbe(rows, export={layer: reduce for layer in layers})
        with torch.no_grad():
            hidden = self._backbone_forward(self.teacher, batch, probe)
        return hidden, probe.slices

    @torch.no_grad()
    def calibrate(self, batch):
        """Adaptive matching: pair each student layer with its most similar teacher layer (monotone in
        depth) by the mean cosine of their visual slices on `batch`; averaged over processes."""
        vat = self.config.vat
        rows = self._rows(batch)
        _, teacher = self._teacher_slices(batch, rows, self.teacher_layers)
        probe = AttentionProbe(rows, export={layer: vat.export_reduce for layer in self.student_layers})
        was_training = self.student.training
        self.student.eval()
        self._backbone_forward(self.student, batch, probe)
        self.student.train(was_training)
        similarity = torch.stack([
            torch.stack([1.0 - self._slice_loss(probe.slices[s], teacher[t], rows, loss="cosine")
                         for t in self.teacher_layers])
            for s in self.student_layers])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(similarity)
            similarity /= torch.distributed.get_world_size()
        self.matches = adaptive_match(similarity.cpu(), self.student_layers, self.teacher_layers)
        return similarity

    def forward(self, batch: dict) -> dict:
        cfg, w = self.config, self.config.weights.as_dict()
        need_vat = w["vat"] > 0
        if need_vat and self.matches is None:
            self.calibrate(batch)
        rows = self._rows(batch) if need_vat else None

        teacher_hidden, student_probe = None, None
        if cfg.needs_teacher:
            self.teacher.eval()
            layers = sorted({t for m in self.matches for t in m.teacher_layers}) if need_vat else []
            if need_vat:
                teacher_hidden, slices = self._teacher_slices(batch, rows, layers)
                targets = group_targets(slices, self.matches)
                del slices
                if cfg.vat.fused:
                    student_probe = AttentionProbe(rows, align=targets, eps=cfg.vat.eps)
                else:
                    student_probe = AttentionProbe(rows, export={s: cfg.vat.export_reduce for s in targets})
            else:
                with torch.no_grad():
                    teacher_hidden = self._backbone_forward(self.teacher, batch, None)

        student_hidden = self._backbone_forward(self.student, batch, student_probe)
        _, student_head, _ = _parts(self.student)
        teacher_head = _parts(self.teacher)[1] if w["kd"] > 0 else None
        losses = lm_and_kd_losses(
            student_hidden, batch["labels"], student_head,
            teacher_hidden=teacher_hidden if w["kd"] > 0 else None, teacher_head=teacher_head,
            kind=cfg.kd.kind, temperature=cfg.kd.temperature, chunk_size=cfg.kd.chunk_size,
        )
        if need_vat:
            losses["vat"] = self._vat_loss(student_probe, targets, rows)
        out = {name: losses[name] for name in ("lm", "kd", "vat") if w[name] > 0}
        out["loss"] = sum(w[name] * value for name, value in out.items())
        return out

    def _slice_loss(self, student, teacher, rows, *, loss):
        vat = self.config.vat
        columns = rows.column_mask()
        if student.ndim == 2:  # pooled by the kernel: one vector per sample, weighted if it has rows
            return slice_loss(student, teacher, (rows.row_weight.sum(1) > 0).float(), loss=loss, eps=vat.eps,
                              column_mask=columns)
        return slice_loss(student, teacher, rows.row_weight, loss=loss, reduce=vat.reduce,
                          sink_filter=vat.sink_filter, eps=vat.eps, column_mask=columns)

    def _vat_loss(self, probe, targets, rows):
        vat = self.config.vat
        if vat.fused:
            per_layer = probe.losses
        else:
            per_layer = {layer: self._slice_loss(probe.slices[layer], targets[layer], rows, loss=vat.loss)
                         for layer in targets}
        loss = combine_layers(per_layer, vat.layer_reduction)
        if self.training and torch.is_grad_enabled() and not loss.requires_grad and \
                any(p.requires_grad for p in self.student.parameters()):
            raise RuntimeError("vat: the alignment loss has no gradient. Gradient checkpointing with "
                               "use_reentrant=True runs layers under no_grad; enable it with "
                               "gradient_checkpointing_kwargs={'use_reentrant': False}")
        return loss
