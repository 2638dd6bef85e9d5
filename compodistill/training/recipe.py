"""One lean recipe for every stage: setup → train → save.

The stage's config says what trains (`trainable`), which losses and weights, the data, the optimizer
and the schedule. `accelerate` runs it on one process or many (DDP, FSDP, DeepSpeed through
`accelerate launch`); the teacher is frozen, in eval mode, moved to each device and never passed to
`prepare`, so checkpoints do not carry it.

Checkpoints (`<output_dir>/checkpoints/step-NNNNNN`, see `checkpoints`) are written to a temporary
folder and renamed when complete; `resume=True` continues from the newest good one, mid-epoch
included: the model, optimizer, schedule, data order (seedable sampling) and every random state are
restored, so the resumed loss curve equals an uninterrupted one bit for bit on the CPU. SIGINT/SIGTERM
save a checkpoint before the run returns.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..distill import Distiller
from ..models import MLLM, apply_taf, enable_gradient_checkpointing, load_mllm, parts
from ..models.mllm import TAFProjector
from . import checkpoints
from .config import StageConfig, config_to_dict, dump_config, grad_accum_steps
from .metrics import append_metrics, plot_losses, truncate_metrics


@dataclass
class StageResult:
    """What a stage run ended with. status: "finished" (final model written), "skipped" (found
    finished on disk by a plan run) or "interrupted" (a signal; `checkpoint` holds the state)."""

    name: str
    status: str
    output_dir: str
    step: int = 0
    final: str | None = None
    checkpoint: str | None = None
    metrics: str | None = None
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in ("finished", "skipped")


def lr_lambda(scheduler: str, warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier per optimizer step: linear warmup, then cosine / linear decay to `min_ratio`, or
    constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape
    return factor


def param_groups(model, trainable) -> dict:
    """Parameters of each named part of a (possibly peft-wrapped) LLaVA."""
    base = parts.base_model(model)
    projector = parts.projector(base)
    groups = {
        "projector": list(projector.parameters()),
        "post_projector": list(projector.post.parameters()) if isinstance(projector, TAFProjector) else [],
        "lm": list(parts.language_model(base).parameters()) + list(parts.lm_head(base).parameters()),
        "vision": list(parts.vision_tower(base).parameters()),
        "lora": [p for n, p in base.named_parameters() if "lora_" in n],
        "all": list(base.parameters()),
    }
    return {name: groups[name] for name in trainable}


class Recipe:
    """Train one stage. `Recipe(config).run()` returns a `StageResult`."""

    def __init__(self, config: StageConfig, *, resume: bool = False, progress: bool = True):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.stop_signal = None
        self._rng_to_restore = None

    # ------------------------------------------------------------------------------------------
    def setup(self) -> "Recipe":
        self._setup_accelerator()
        self._setup_models()
        self._setup_trainable()
        self._setup_distiller()
        self._setup_data()
        self._setup_optimizer()
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        if self.resume:
            self._resume()
        return self

    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        cfg = self.config
        mixed = cfg.train.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        trackers = []
        if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is not None:
            trackers.append("tensorboard")
        self.accelerator = Accelerator(
            mixed_precision=mixed, log_with=trackers or None, project_dir=cfg.output_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        )
        # the number of processes is known once the accelerator has joined them
        self.grad_accum = grad_accum_steps(cfg, self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = self.grad_accum
        set_seed(cfg.seed)

    def _setup_models(self):
        cfg = self.config
        self.student = load_mllm(cfg.model.path, seed=cfg.model.seed)
        self.teacher = load_mllm(cfg.model.teacher) if cfg.needs_teacher else None
        if self.teacher is None:
            return
        if cfg.model.vision_from_teacher:
            parts.vision_tower(self.student).load_state_dict(parts.vision_tower(self.teacher).state_dict())
        if cfg.model.taf and not isinstance(parts.projector(self.student), TAFProjector):
            apply_taf(self.student, self.teacher, seed=cfg.model.seed)

    def _setup_trainable(self):
        cfg = self.config
        model = self.student.model
        model.requires_grad_(False)
        if "lora" in cfg.trainable:
            from peft import LoraConfig, get_peft_model

            targets = "|".join(re.escape(t) for t in cfg.lora.target_modules)
            model = get_peft_model(model, LoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=rf".*language_model.*\.({targets})$"))
        if "post_projector" in cfg.trainable and not isinstance(parts.projector(self.student), TAFProjector):
            raise ValueError("trainable: 'post_projector' needs a TAF projector (model.taf: true with a teacher, "
                             "or a checkpoint trained with TAF); use 'projector' otherwise")
        for params in param_groups(model, cfg.trainable).values():
            for p in params:
                p.requires_grad_(True)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"trainable: {cfg.trainable} selects no parameter in this model")
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(parts.unwrap_peft(model))
        model.train()
        self.model = model

    def _setup_distiller(self):
        cfg, acc = self.config, self.accelerator
        distill = cfg.distill_config()
        teacher_model = None
        if self.teacher is not None and distill.needs_teacher:
            teacher_model = self.teacher.model.to(acc.device)
            if acc.mixed_precision == "bf16":
                teacher_model.to(torch.bfloat16)
        self.distiller = Distiller(self.model, teacher_model, distill, backend=cfg.train.attention_backend)

    def _setup_data(self):
        from ..data.llava import LlavaDataset, build_collator

        cfg, acc = self.config, self.accelerator
        with acc.main_process_first():
            self.dataset = LlavaDataset(cfg.data.json, cfg.data.image_folder, self.student,
                                        max_length=cfg.data.max_length, on_bad_sample=cfg.data.on_bad_sample)
        if cfg.data.feature_cache:
            from ..data.features import VisionFeatureCache

            cache = VisionFeatureCache(self.student)
            if self.teacher is not None and cfg.distill_config().needs_teacher:
                cache.check(self.teacher, "model.teacher")  # one cache feeds both models: one tower
            self.dataset.use_feature_cache(cache, self.student, device=acc.device, batch_size=cfg.train.batch_size,
                                           progress=self.progress and acc.is_main_process)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
            collate_fn=build_collator(self.student, cfg.data.padding_side), drop_last=False)

    def _setup_optimizer(self):
        cfg, acc = self.config, self.accelerator
        per_epoch = math.ceil(len(self.loader) / max(1, acc.num_processes) / self.grad_accum)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(per_epoch * cfg.train.epochs))
        self.epochs = math.ceil(self.total_steps / max(1, per_epoch))
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        warmup = int(cfg.optim.warmup_ratio * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.optim.scheduler, warmup, self.total_steps, cfg.optim.min_lr_ratio))
        self.distiller, self.optimizer, self.loader, self.scheduler = acc.prepare(
            self.distiller, optimizer, self.loader, scheduler)

    # ------------------------------------------------------------------------------------------
    def summary(self) -> str:
        cfg, acc = self.config, self.accelerator
        text = parts.text_config(self.student)
        n_train = sum(p.numel() for p in self.trainable)
        n_total = sum(p.numel() for p in self.distiller.parameters())
        lines = [
            f"stage {cfg.stage} → {cfg.output_dir}",
            f"student: {cfg.model.path} ({text.num_hidden_layers} layers × {text.hidden_size}, "
            f"{self.student.num_image_tokens} image tokens)",
            f"teacher: {cfg.model.teacher if self.teacher is not None else 'none'}",
            f"trainable: {', '.join(cfg.trainable)}: {n_train:,} of {n_total:,} parameters "
            f"({100 * n_train / max(1, n_total):.2f}%)",
            f"data: {cfg.data.json}: {self.dataset.report}",
            f"steps: {self.total_steps} × global batch {cfg.train.batch_size * acc.num_processes * self.grad_accum} "
            f"({acc.num_processes} process(es) × {cfg.train.batch_size} × accumulation {self.grad_accum}); "
            f"lr {cfg.optim.lr:g} {cfg.optim.scheduler}, warmup {cfg.optim.warmup_ratio:g}; "
            f"mixed precision {acc.mixed_precision}; device {acc.device}",
            self.accelerator.unwrap_model(self.distiller).describe(),
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------
    @contextmanager
    def _signals(self):
        def handler(signum, frame):
            self.stop_signal = signum
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def train(self) -> StageResult:
        cfg, acc = self.config, self.accelerator
        started_run = time.time()
        os.makedirs(cfg.output_dir, exist_ok=True)
        if acc.is_main_process:
            with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))
        if acc.log_with:
            acc.init_trackers("compodistill", config=_flat(config_to_dict(cfg)))
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        if acc.is_main_process and not self.resume and os.path.exists(metrics_path):
            os.remove(metrics_path)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process))
        sums, tokens, micro_batches, started = {}, 0, 0, time.time()
        status = "finished"
        with self._signals():
            while self.step < self.total_steps and status == "finished":
                self.loader.set_epoch(self.epoch)
                batches = acc.skip_first_batches(self.loader, self.batches_in_epoch) if self.batches_in_epoch \
                    else self.loader
                for batch in batches:
                    if self._rng_to_restore is not None:
                        # Creating the batch iterator draws from the global generator (its base seed), which
                        # the uninterrupted run did before the checkpoint: restore the saved state after it.
                        checkpoints.restore_rng_state(self._rng_to_restore)
                        self._rng_to_restore = None
                    with acc.accumulate(self.distiller):
                        losses = self._loss_step(batch)
                        acc.backward(losses["loss"])
                        if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.trainable, cfg.optim.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    self.batches_in_epoch += 1
                    for name, value in losses.items():
                        sums[name] = sums.get(name, 0.0) + value.detach()
                    micro_batches += 1
                    tokens = tokens + batch["attention_mask"].sum()  # a tensor: no host sync per step
                    del losses
                    if not acc.sync_gradients:
                        continue
                    self.step += 1
                    bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                        record = self._log(sums, micro_batches, tokens, started, metrics_path)
                        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", "lm", "kd", "vat")}
                                        | {"tok/s": f"{record['tokens_per_s']:.0f}"})
                        sums, tokens, micro_batches, started = {}, 0, 0, time.time()
                    if self.step in cfg.checkpoint.snapshots and self.step < self.total_steps:
                        self.save_final(checkpoints.snapshot_dir(cfg.output_dir, self.step))
                    if self.step % cfg.checkpoint.every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if self.stop_signal is not None:
                        status = "interrupted"
                        break
                    if self.step >= self.total_steps:
                        break
                else:
                    self.epoch += 1
                    self.batches_in_epoch = 0
        bar.close()
        result = StageResult(cfg.stage, status, cfg.output_dir, step=self.step, metrics=metrics_path)
        if status == "interrupted":
            result.checkpoint = self.save_checkpoint()
            acc.print(f"interrupted by signal {self.stop_signal} at step {self.step}: checkpoint saved to "
                      f"{result.checkpoint}; run again with --resume to continue")
        else:
            result.final = self.save_final()
            if acc.is_main_process and cfg.log.plot:
                plot_losses(metrics_path, os.path.join(cfg.output_dir, "loss_curve.png"), title=cfg.stage)
        acc.end_training()
        result.seconds = time.time() - started_run
        return result

    def _loss_step(self, batch) -> dict:
        image = "vision_features" if batch.get("vision_features") is not None else "pixel_values"
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", image, "labels")}
        return self.distiller(inputs)

    def _log(self, sums, micro_batches, tokens, started, metrics_path) -> dict:
        """Append the mean of each loss over the micro-batches since the last log (all processes)."""
        acc = self.accelerator
        names = sorted(sums)
        values = acc.reduce(torch.stack([sums[n] / max(1, micro_batches) for n in names]).float(), reduction="mean")
        token_count = acc.reduce(torch.as_tensor(tokens, device=acc.device).float(), reduction="sum")
        elapsed = max(time.time() - started, 1e-9)
        record = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0]}
        record |= {n: v for n, v in zip(names, values.tolist())}
        record["tokens_per_s"] = token_count.item() / elapsed
        if not all(math.isfinite(record[n]) for n in names):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {record}")
        if acc.is_main_process:
            append_metrics(metrics_path, record)
        acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write the accelerate state, every random state and the trainer state into a temporary folder,
        the manifest last, then rename the folder."""
        acc, cfg = self.accelerator, self.config
        final = checkpoints.checkpoint_dir(cfg.output_dir, self.step)
        root = os.path.dirname(final)
        tmp = os.path.join(root, f".tmp-{os.path.basename(final)}")
        if acc.is_main_process:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        checkpoints.save_rng_state(tmp, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))
            state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                     "total_steps": self.total_steps, "num_processes": acc.num_processes}
            with open(os.path.join(tmp, checkpoints.STATE_FILE), "w") as f:
                json.dump(state, f)
            checkpoints.write_manifest(tmp, state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self):
        for folder in checkpoints.checkpoint_folders(self.config.output_dir)[self.config.checkpoint.keep:]:
            shutil.rmtree(folder, ignore_errors=True)

    def _resume(self):
        acc = self.accelerator
        path = checkpoints.latest_checkpoint(self.config.output_dir)
        if path is None:
            acc.print(f"--resume: no checkpoint in {self.config.output_dir}; starting fresh")
            self.resume = False
            return
        state = checkpoints.read_state(path)
        if state["num_processes"] != acc.num_processes:
            raise ValueError(f"--resume: {path} was written by {state['num_processes']} process(es), "
                             f"this run has {acc.num_processes}")
        acc.load_state(path)
        self._rng_to_restore = checkpoints.load_rng_state(path, acc.process_index)
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        acc.print(f"resumed from {path} (step {self.step}, epoch {self.epoch})")
        if acc.is_main_process:
            # records logged after the checkpoint are logged again by the resumed run
            truncate_metrics(os.path.join(self.config.output_dir, "metrics.jsonl"), self.step)

    def save_final(self, path: str | None = None) -> str:
        """The trained student in Hugging Face format (LoRA merged), with tokenizer and processor, to
        `path` (default `<output_dir>/final`); written to a temporary folder, then renamed."""
        acc, cfg = self.accelerator, self.config
        acc.wait_for_everyone()
        path = path or cfg.final_dir
        model = acc.unwrap_model(self.distiller).student
        if acc.is_main_process:
            if hasattr(model, "merge_and_unload"):
                adapter = model
                # Merge a copy: the training model keeps its adapters (and a later save still works).
                model = copy.deepcopy(model).merge_and_unload()
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            MLLM(model, self.student.tokenizer, self.student.image_processor).save_pretrained(tmp)
            if model is not acc.unwrap_model(self.distiller).student and not cfg.lora.merge_on_save:
                adapter.save_pretrained(os.path.join(tmp, "adapter"))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        acc.wait_for_everyone()
        return path

    def run(self) -> StageResult:
        self.setup()
        self.accelerator.print(self.summary())
        return self.train()


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, name + ".")
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
