"""One lean recipe for every stage: setup → train → save.

The stage's config says what trains (`trainable`), which losses and weights, the data, the optimizer
and the schedule. `accelerate` runs it on one process or many (DDP, FSDP, DeepSpeed through
`accelerate launch`); the teacher is frozen, in eval mode, moved to each device and never passed to
`prepare`, so checkpoints do not carry it.

Checkpoints (`<output_dir>/checkpoints/step-NNNNNN`) are written to a temporary folder and renamed when
complete; `--resume` continues from the newest complete one, mid-epoch included (seedable sampling, so
the resumed loss curve equals an uninterrupted one). SIGINT/SIGTERM save a checkpoint before exiting.
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

import torch
from tqdm.auto import tqdm

from .config import Config, config_to_dict, dump_config
from .distill import DistillConfig, Distiller
from .models import MLLM, apply_taf, enable_gradient_checkpointing, load_mllm
from .models import parts
from .models.mllm import TAFProjector

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"


def lr_lambda(scheduler: str, warmup: int, total: int):
    """LR multiplier per optimizer step: linear warmup, then cosine / linear decay to 0, or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress
    return factor


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder. Temporary (partial) folders never match the name
    pattern, and a folder without its state file is ignored."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    found = []
    for name in os.listdir(root):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(match.group(1)), name))
    return os.path.join(root, max(found)[1]) if found else None


def _param_groups(model, trainable) -> dict:
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
    """Train one stage. `Recipe(config).run()` returns a summary dict."""

    def __init__(self, config: Config, *, resume: bool = False, progress: bool = True):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.stop_signal = None

    # ------------------------------------------------------------------------------------------
    def setup(self):
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
            gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=mixed, log_with=trackers or None,
            project_dir=cfg.output_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        )
        set_seed(cfg.seed)
        acc = self.accelerator

        self.student = load_mllm(cfg.model.path, seed=cfg.model.seed)
        self.teacher = load_mllm(cfg.model.teacher) if cfg.needs_teacher else None
        if self.teacher is not None:
            if cfg.model.vision_from_teacher:
                parts.vision_tower(self.student).load_state_dict(parts.vision_tower(self.teacher).state_dict())
            if cfg.model.taf and not isinstance(parts.projector(self.student), TAFProjector):
                apply_taf(self.student, self.teacher, seed=cfg.model.seed)
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
        self.groups = _param_groups(model, cfg.trainable)
        for params in self.groups.values():
            for p in params:
                p.requires_grad_(True)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"trainable: {cfg.trainable} selects no parameter in this model")
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(parts.unwrap_peft(model))
        model.train()

        distill = DistillConfig(weights={"lm": cfg.losses.lm, "kd": cfg.losses.kd, "vat": cfg.losses.vat},
                                kd_kind=cfg.kd.kind, temperature=cfg.kd.temperature,
                                chunk_size=cfg.kd.chunk_size, vat=cfg.vat)
        teacher_model = None
        if self.teacher is not None and distill.needs_teacher:
            teacher_model = self.teacher.model.to(acc.device)
            if mixed == "bf16":
                teacher_model.to(torch.bfloat16)
        self.distiller = Distiller(model, teacher_model, distill, backend=cfg.train.attention_backend)

        from .data.llava import LlavaDataset, build_collator

        with acc.main_process_first():
            self.dataset = LlavaDataset(cfg.data.json, cfg.data.image_folder, self.student,
                                        max_length=cfg.data.max_length, on_bad_sample=cfg.data.on_bad_sample)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
            collate_fn=build_collator(self.student, cfg.data.padding_side), drop_last=False)
        per_epoch = math.ceil(len(loader) / max(1, acc.num_processes) / cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or per_epoch * cfg.train.epochs
        self.epochs = math.ceil(self.total_steps / max(1, per_epoch))
        decay = [p for p in self.trainable if p.ndim >= 2]
        no_decay = [p for p in self.trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        warmup = int(cfg.optim.warmup_ratio * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim.scheduler, warmup, self.total_steps))
        self.distiller, self.optimizer, self.loader, self.scheduler = acc.prepare(
            self.distiller, optimizer, loader, scheduler)
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        if self.resume:
            self._load_latest()
        return self

    # ------------------------------------------------------------------------------------------
    def summary(self) -> str:
        cfg, acc = self.config, self.accelerator
        s_cfg = self.student.model.config
        n_train = sum(p.numel() for p in self.trainable)
        n_total = sum(p.numel() for p in self.distiller.parameters())
        lines = [
            f"stage {cfg.stage} → {cfg.output_dir}",
            f"student: {cfg.model.path} ({s_cfg.text_config.num_hidden_layers} layers × "
            f"{s_cfg.text_config.hidden_size}, {self.student.num_image_tokens} image tokens)",
            f"teacher: {cfg.model.teacher if self.teacher is not None else 'none'}",
            f"trainable: {', '.join(cfg.trainable)}: {n_train:,} of {n_total:,} parameters ({100 * n_train / max(1, n_total):.2f}%)",
            f"data: {cfg.data.json}: {self.dataset.report}",
            f"steps: {self.total_steps} × global batch {cfg.train.batch_size * acc.num_processes * cfg.train.grad_accum} "
            f"({acc.num_processes} process(es) × {cfg.train.batch_size} × accumulation {cfg.train.grad_accum}); "
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

    def train(self) -> dict:
        cfg, acc = self.config, self.accelerator
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
        if status == "interrupted":
            path = self.save_checkpoint()
            acc.print(f"interrupted by signal {self.stop_signal} at step {self.step}: checkpoint saved to {path}; "
                      f"run again with --resume to continue")
            acc.end_training()
            return {"status": status, "step": self.step, "checkpoint": path}
        final = self.save_final()
        if acc.is_main_process and cfg.log.plot:
            plot_losses(metrics_path, os.path.join(cfg.output_dir, "loss_curve.png"), title=cfg.stage)
        acc.end_training()
        return {"status": status, "step": self.step, "final": final, "metrics": metrics_path}

    def _loss_step(self, batch) -> dict:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
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
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write the accelerate state and the trainer state to a temporary folder, then rename it."""
        acc, cfg = self.accelerator, self.config
        root = os.path.join(cfg.output_dir, "checkpoints")
        final = os.path.join(root, f"step-{self.step:06d}")
        tmp = os.path.join(root, f".tmp-step-{self.step:06d}")
        if acc.is_main_process:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))
            state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                     "total_steps": self.total_steps, "num_processes": acc.num_processes}
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune(root)
        acc.wait_for_everyone()
        return final

    def _prune(self, root):
        complete = sorted(n for n in os.listdir(root) if CHECKPOINT_PATTERN.match(n))
        for name in complete[:-self.config.checkpoint.keep]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def _load_latest(self):
        path = latest_checkpoint(self.config.output_dir)
        if path is None:
            self.accelerator.print(f"--resume: no complete checkpoint in {self.config.output_dir}; starting fresh")
            self.resume = False
            return
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(f"--resume: {path} was written by {state['num_processes']} process(es), "
                             f"this run has {self.accelerator.num_processes}")
        self.accelerator.load_state(path)
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.accelerator.print(f"resumed from {path} (step {self.step}, epoch {self.epoch})")
        metrics = os.path.join(self.config.output_dir, "metrics.jsonl")
        if self.accelerator.is_main_process and os.path.exists(metrics):
            # Drop records logged after the checkpoint: the resumed run logs those steps again.
            with open(metrics) as f:
                kept = [line for line in f if json.loads(line)["step"] <= self.step]
            with open(metrics, "w") as f:
                f.writelines(kept)

    def save_final(self) -> str:
        """The trained student in Hugging Face format (LoRA merged), with tokenizer and processor."""
        acc, cfg = self.accelerator, self.config
        acc.wait_for_everyone()
        path = os.path.join(cfg.output_dir, "final")
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

    def run(self) -> dict:
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


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, png_path: str, title: str = ""):
    """Loss components against the optimizer step, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("loss", "lm", "kd", "vat"):
        if name in records[0]:
            ax.plot([r["step"] for r in records], [r[name] for r in records], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
