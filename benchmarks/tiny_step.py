"""The library's training step on the miniature's tiny models against a plain PyTorch loop.

Both run the same optimizer steps on the same batches from the same initial weights:

- library: the stage `Recipe` exactly as `python -m compodistill.train` runs it (accelerate, the Distiller
  with the compodistill attention, the loader over the cached vision features, clipping, the schedule,
  logging), `recipe.train()` timed end to end over `steps` optimizer steps;
- plain: a hand-written loop with no library code in the step: the same transformers modules with
  transformers' eager attention and `output_attentions=True`, the image tokens' embeddings replaced by the
  projected features, cross-entropy, forward KL on the label positions, and the per-row cosine between
  head-averaged visual attention rows cut from the returned (B, H, L, L) probabilities; AdamW, clipping
  and the same schedule.

The losses of the first step are compared (they must agree: only the implementation differs) and the
ratio library / plain of the time per step is reported.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from compodistill.data.synth import generate_miniature
from compodistill.experiments import miniature
from compodistill.models import build_preset, parts
from compodistill.training.config import CheckpointConfig, LogConfig, evolve
from compodistill.training.recipe import Recipe, lr_lambda

VARIANTS = ("SFT", "CompoDistill")


@dataclass
class TinySetup:
    recipe: Recipe
    batches: list          # the batches the recipe's loader yields, in order, for `steps` steps
    steps: int


def tiny_setup(root: str, variant: str = "CompoDistill", *, batch: int = 64, steps: int = 10) -> TinySetup:
    """A miniature CompoDistill (or SFT) student stage on `batch · steps` generated scenes, set up and ready
    to train; the teacher is the miniature teacher at its initialisation (its weights do not change the
    cost of a step)."""
    data = os.path.join(root, "data")
    if not os.path.isfile(os.path.join(data, "summary.json")):
        generate_miniature(data, seed=0, num_train=batch * steps, num_test=8, overwrite=True)
    teacher = os.path.join(root, "teacher")
    if not os.path.isdir(teacher):
        build_preset("miniature-teacher", seed=0).save_pretrained(teacher)
    scale = replace(miniature.SCALES["demo"], batch=batch, student_steps=steps, snapshots=(), warmup_steps=1)
    (chosen,) = miniature.variants_named([variant])
    config = miniature.student_config(chosen, 0, root, data, teacher, scale)
    config = evolve(config, checkpoint=CheckpointConfig(every=10**9, keep=1), log=LogConfig(tensorboard=False, plot=False))
    recipe = Recipe(config, progress=False).setup()
    torch.manual_seed(config.seed)
    loader_state = torch.random.get_rng_state()
    batches = [b for _, b in zip(range(steps), recipe.loader)]
    torch.random.set_rng_state(loader_state)
    return TinySetup(recipe, batches, steps)


def _eager_copy(model):
    model = copy.deepcopy(parts.unwrap_peft(model))
    model.set_attn_implementation("eager")
    return model


def _embeddings(model, input_ids, features):
    base = parts.base_model(model)
    embeds = base.get_input_embeddings()(input_ids)
    image = input_ids == base.config.image_token_id
    projected = parts.projector(base)(features.to(embeds.dtype))
    return embeds.masked_scatter(image[..., None], projected)


def _forward(model, batch, attentions: bool):
    out = parts.language_model(model)(inputs_embeds=_embeddings(model, batch["input_ids"], batch["vision_features"]),
                                      attention_mask=batch["attention_mask"], output_attentions=attentions)
    return parts.lm_head(model)(out.last_hidden_state), out.attentions


class PlainLoop:
    """The reference: the recipe's student and teacher copied before training, with eager attention."""

    def __init__(self, setup: TinySetup):
        recipe = setup.recipe
        cfg = recipe.config
        self.weights = cfg.losses
        self.vat = cfg.vat
        self.student = _eager_copy(recipe.model)
        uses_teacher = self.weights.kd > 0 or self.weights.vat > 0
        self.teacher = _eager_copy(recipe.teacher.model).eval() if uses_teacher else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
        self.matches = [(m.student_layer, list(m.teacher_layers)) for m in recipe.distiller.matches] \
            if self.weights.vat > 0 else []
        params = [p for p in self.student.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.params = params
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr)
        warmup = math.ceil(cfg.optim.warmup_ratio * setup.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim.scheduler, warmup, setup.steps, cfg.optim.min_lr_ratio))
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.num_image_tokens = recipe.student.num_image_tokens

    def losses(self, batch) -> dict:
        labels = batch["labels"]
        logits, attentions = _forward(self.student, batch, attentions=bool(self.matches))
        targets = labels[:, 1:]
        answer = targets != -100
        student_logits = logits[:, :-1][answer].float()
        out = {"lm": F.cross_entropy(student_logits, targets[answer])}
        if self.teacher is None:
            out["loss"] = self.weights.lm * out["lm"]
            return out
        with torch.no_grad():
            teacher_logits, teacher_attentions = _forward(self.teacher, batch, attentions=bool(self.matches))
        teacher_logits = teacher_logits[:, :-1][answer][:, :student_logits.shape[-1]].float()
        p_teacher = teacher_logits.log_softmax(-1)
        out["kd"] = (p_teacher.exp() * (p_teacher - student_logits.log_softmax(-1))).sum(-1).mean()
        total = self.weights.lm * out["lm"] + self.weights.kd * out["kd"]
        if self.matches:
            image = batch["input_ids"] == parts.base_model(self.student).config.image_token_id
            start = image.float().argmax(1)                                   # first image token per sample
            columns = start[:, None] + torch.arange(self.num_image_tokens)[None, :]
            positions = torch.arange(image.shape[1])[None, :]
            rows = batch["attention_mask"].bool() & (positions >= (start + self.num_image_tokens)[:, None])
            terms = []
            for student_layer, window in self.matches:
                a = _visual_columns(attentions[student_layer].mean(1), columns)
                t = torch.stack([_visual_columns(teacher_attentions[k].mean(1), columns) for k in window]).mean(0)
                cosine = F.cosine_similarity(a, t, dim=-1, eps=self.vat.eps)
                terms.append(((1 - cosine) * rows).sum() / rows.sum())
            out["vat"] = torch.stack(terms).mean()
            total = total + self.weights.vat * out["vat"]
        out["loss"] = total
        return out

    def step(self, batch) -> dict:
        losses = self.losses(batch)
        losses["loss"].backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def train(self, batches) -> float:
        started = time.perf_counter()
        for batch in batches:
            self.step(batch)
        return time.perf_counter() - started


def _visual_columns(attention: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(B, L, N) columns `columns` (B, N) of a (B, L, L) head-averaged attention."""
    return attention.gather(2, columns[:, None, :].expand(-1, attention.shape[1], -1))


def library_first_losses(setup: TinySetup) -> dict:
    """The recipe's losses on the first batch, before any step (the Distiller the recipe trains with)."""
    recipe = setup.recipe
    with torch.no_grad():
        losses = recipe._loss_step(setup.batches[0])
    return {k: float(v) for k, v in losses.items()}


def time_library(setup: TinySetup) -> float:
    started = time.perf_counter()
    result = setup.recipe.train()
    if result.status != "finished":
        raise RuntimeError(f"the library's stage ended {result.status} at step {result.step}")
    return time.perf_counter() - started
