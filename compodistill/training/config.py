"""A stage's configuration: one typed tree per stage, read from one YAML, with `key=value` overrides.

A stage is fully described by its `StageConfig`: which model trains and which parts of it, from which
teacher, on which data, with which losses and weights (`losses`, `kd`, `vat`), optimizer and schedule.
The packaged YAMLs in `compodistill/configs/` are the stages this library
ships; the `stage` key is the stage's name, nothing more: what a stage does is what its config says.

    config = load_config("dft", ["optim.lr=1e-4", "vat.preset=code"])   # a packaged name or a path
    config = evolve(config, output_dir="runs/x", model=replace(config.model, seed=3))

`load_config` reads the YAML, applies the overrides (values parsed as YAML), builds the dataclasses and
validates every key, type and range, so a typo or an impossible combination fails at once with a
ValueError naming the dotted key. `evolve` changes typed fields and validates again. The merged config
is printed at start and saved next to the run and with every checkpoint (`dump_config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field, replace
from importlib import resources

import yaml

from compodistill_kernels import BACKENDS

from ..distill import VAT_PRESETS, DistillConfig, KDConfig, LossWeights, VATConfig

TRAINABLE_PARTS = ("projector", "post_projector", "lm", "lora", "vision", "all")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class ModelConfig:
    """path: the model that trains (a preset, a checkpoint folder, or {vision_tower, language_model,
    projector} paths); teacher: a preset or folder, needed by kd/vat/taf; taf: give the student the
    teacher's projector plus a trainable post-projector (skipped if it already has one);
    vision_from_teacher: copy the teacher's vision tower into the student (they share one SigLIP);
    seed: the random weights of a preset or a fresh projector."""

    path: typing.Any = "tiny-student"
    teacher: typing.Any = None
    taf: bool = False
    vision_from_teacher: bool = False
    seed: int = 0


@dataclass
class LoraSettings:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    merge_on_save: bool = True   # false: also keep the unmerged adapter in final/adapter


@dataclass
class DataConfig:
    """LLaVA JSON (or JSONL) with images under image_folder.

    feature_cache: compute the frozen vision tower's features once per image, before training, and keep
    them in memory (compodistill.data.features); needs a frozen tower shared by teacher and student. It
    saves decoding, preprocessing and the tower's forward at every step; memory is images × tokens ×
    feature size (fine for the miniature, not for LLaVA-665K)."""

    json: str = ""
    image_folder: str = ""
    max_length: int = 1536
    on_bad_sample: str = "raise"
    padding_side: str = "right"
    num_workers: int = 0
    feature_cache: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    """epochs may be fractional (0.8 runs 80 % of an epoch's optimizer steps); max_steps, when set,
    wins. batch_size is per process and micro-batch; global_batch_size, when set, fixes the batch of
    one optimizer step on any number of processes (grad_accum = global / (batch_size · processes))."""

    epochs: float = 1.0
    max_steps: typing.Optional[int] = None
    batch_size: int = 8
    global_batch_size: typing.Optional[int] = None
    grad_accum: int = 1
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"
    log_every: int = 10


@dataclass
class CheckpointConfig:
    """every/keep: resumable checkpoints; snapshots: optimizer steps at which the student is also saved in
    the final model's format, to `<output_dir>/snapshots/step-NNNNNN` (for learning curves)."""

    every: int = 500
    keep: int = 2
    snapshots: list = field(default_factory=list)


@dataclass
class LogConfig:
    tensorboard: bool = True
    plot: bool = True


@dataclass
class StageConfig:
    stage: str = "dft"
    seed: int = 0
    output_dir: str = "runs/dft"
    model: ModelConfig = field(default_factory=ModelConfig)
    trainable: list = field(default_factory=lambda: ["lora", "post_projector"])
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossWeights = field(default_factory=LossWeights)
    kd: KDConfig = field(default_factory=KDConfig)
    vat: VATConfig = field(default_factory=VATConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def needs_teacher(self) -> bool:
        return self.losses.kd > 0 or self.losses.vat > 0 or self.model.taf or self.model.vision_from_teacher

    @property
    def final_dir(self) -> str:
        """Where the trained model is written (`python -m compodistill.evaluate --model` reads it)."""
        return os.path.join(self.output_dir, "final")

    def distill_config(self) -> DistillConfig:
        """The losses of this stage as the Distiller takes them (the same objects)."""
        return DistillConfig(weights=self.losses, kd=self.kd, vat=self.vat)


# ---------------------------------------------------------------------------------------------------
# Building from nested dicts, with errors that name the dotted key
# ---------------------------------------------------------------------------------------------------

def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return True
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _build(cls, values, prefix: str):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    if cls is VATConfig:
        try:
            return VATConfig.from_dict(values)
        except ValueError as err:
            raise ValueError(str(err) if str(err).startswith("vat") else f"vat: {err}") from None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if cls in (LossWeights, KDConfig):  # validated by their own constructors, with the key in the message
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{prefix}.{unknown[0]}: unknown key; expected one of {sorted(names)}")
        for name, value in values.items():
            if hints[name] is float and isinstance(value, int) and not isinstance(value, bool):
                values = {**values, name: float(value)}
            elif not _type_ok(value, hints[name]):
                raise ValueError(f"{prefix}.{name}: expected {hints[name].__name__}, got {value!r} "
                                 f"({type(value).__name__})")
        return cls(**values)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key; expected one of {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, key)
            continue
        if not _type_ok(value, annotation):
            expected = getattr(annotation, "__name__", str(annotation).replace("typing.", ""))
            raise ValueError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")
        kwargs[name] = float(value) if annotation is float else value
    return cls(**kwargs)


def _choice(key, value, allowed):
    if value not in allowed:
        raise ValueError(f"{key}: expected one of {list(allowed)}, got {value!r}")


def validate(config: StageConfig) -> StageConfig:
    """Checks that need more than one key, or the value ranges, with errors naming the key."""
    if not isinstance(config.stage, str) or not config.stage.strip():
        raise ValueError(f"stage: expected a non-empty name, got {config.stage!r}")
    if not config.trainable:
        raise ValueError("trainable: expected at least one of " + ", ".join(TRAINABLE_PARTS))
    for part in config.trainable:
        _choice("trainable", part, TRAINABLE_PARTS)
    if "lora" in config.trainable and ({"lm", "all"} & set(config.trainable)):
        raise ValueError("trainable: 'lora' and full fine-tuning ('lm'/'all') exclude each other")
    for key, value in (("seed", config.seed), ("model.seed", config.model.seed)):
        if value < 0:
            raise ValueError(f"{key}: expected an int >= 0, got {value}")
    if config.needs_teacher and config.model.teacher is None:
        raise ValueError(f"model.teacher: stage {config.stage!r} needs a teacher (kd {config.losses.kd:g}, "
                         f"vat {config.losses.vat:g}, taf {config.model.taf}, "
                         f"vision_from_teacher {config.model.vision_from_teacher})")
    if not config.data.json:
        raise ValueError("data.json: expected the path of a LLaVA JSON/JSONL file")
    if not config.data.image_folder:
        raise ValueError("data.image_folder: expected the folder the JSON's image paths are relative to")
    _choice("data.on_bad_sample", config.data.on_bad_sample, ("raise", "skip"))
    _choice("data.padding_side", config.data.padding_side, ("right", "left"))
    if config.data.feature_cache and ({"vision", "all"} & set(config.trainable)):
        raise ValueError(f"data.feature_cache: the vision tower trains in this stage (trainable {config.trainable}), "
                         "so its features change; set data.feature_cache=false")
    _choice("optim.scheduler", config.optim.scheduler, SCHEDULERS)
    _choice("train.mixed_precision", config.train.mixed_precision, MIXED_PRECISION)
    _choice("train.attention_backend", config.train.attention_backend, BACKENDS)
    positive = {"optim.lr": config.optim.lr, "train.epochs": config.train.epochs,
                "train.batch_size": config.train.batch_size, "train.grad_accum": config.train.grad_accum,
                "train.log_every": config.train.log_every, "checkpoint.every": config.checkpoint.every,
                "checkpoint.keep": config.checkpoint.keep, "data.max_length": config.data.max_length,
                "lora.r": config.lora.r}
    for key, value in positive.items():
        if not value > 0:
            raise ValueError(f"{key}: expected > 0, got {value}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in config.checkpoint.snapshots):
        raise ValueError(f"checkpoint.snapshots: expected a list of optimizer steps >= 1, got {config.checkpoint.snapshots}")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise ValueError(f"train.max_steps: expected >= 1 or null, got {config.train.max_steps}")
    global_batch = config.train.global_batch_size
    if global_batch is not None:
        if global_batch < 1 or global_batch % config.train.batch_size:
            raise ValueError(f"train.global_batch_size: expected a multiple of train.batch_size "
                             f"({config.train.batch_size}), got {global_batch}")
        if config.train.grad_accum != 1:
            raise ValueError("train.grad_accum: set either train.global_batch_size (accumulation follows "
                             "from it) or train.grad_accum, not both")
    if not 0 <= config.optim.warmup_ratio < 1:
        raise ValueError(f"optim.warmup_ratio: expected a fraction in [0, 1), got {config.optim.warmup_ratio}")
    if not 0 <= config.optim.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio: expected a fraction in [0, 1], got {config.optim.min_lr_ratio}")
    if len(config.optim.betas) != 2 or not all(0 <= b < 1 for b in config.optim.betas):
        raise ValueError(f"optim.betas: expected two numbers in [0, 1), got {config.optim.betas}")
    return config


def grad_accum_steps(config: StageConfig, num_processes: int) -> int:
    """Micro-batches per optimizer step on `num_processes` processes."""
    global_batch = config.train.global_batch_size
    if global_batch is None:
        return config.train.grad_accum
    per_step = config.train.batch_size * num_processes
    if global_batch % per_step:
        raise ValueError(f"train.global_batch_size: {global_batch} is not a multiple of train.batch_size × "
                         f"processes = {config.train.batch_size} × {num_processes}")
    return global_batch // per_step


def config_from_dict(values: dict) -> StageConfig:
    return validate(_build(StageConfig, values, ""))


def config_to_dict(config: StageConfig) -> dict:
    values = dataclasses.asdict(config)
    values["vat"] = vat_to_dict(config.vat)
    return values


def vat_to_dict(vat: VATConfig) -> dict:
    """The shortest mapping that `VATConfig.from_dict` turns back into `vat`: the closest preset and the
    fields that differ from it (so a saved config still reads as "the paper preset with ...")."""
    best = None
    for name, preset in VAT_PRESETS.items():
        changed = {f.name: getattr(vat, f.name) for f in dataclasses.fields(vat)
                   if getattr(vat, f.name) != getattr(preset, f.name)}
        if best is None or len(changed) < len(best) - 1:
            best = {"preset": name, **changed}
    return json.loads(json.dumps(best))  # plain lists and dicts, tuples included


def evolve(config: StageConfig, **changes) -> StageConfig:
    """A copy of `config` with typed changes (dataclasses.replace), validated again."""
    return validate(replace(config, **changes))


# ---------------------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------------------

def packaged_config_names() -> list[str]:
    """Configs shipped with the package (compodistill/configs/)."""
    folder = resources.files("compodistill.configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(path_or_name: str) -> str:
    """A YAML path, or the name of a packaged config ("dft" → compodistill/configs/dft.yaml)."""
    if os.path.isfile(path_or_name):
        return path_or_name
    name = os.path.basename(path_or_name)
    name = name[:-5] if name.endswith(".yaml") else name
    packaged = resources.files("compodistill.configs") / f"{name}.yaml"
    if packaged.is_file():
        return str(packaged)
    raise ValueError(f"--config: no file {path_or_name!r} and no packaged config of that name "
                     f"(packaged: {', '.join(packaged_config_names())})")


def apply_overrides(values: dict, overrides) -> dict:
    """`a.b=c` overrides on a nested dict; values are parsed as YAML ("1e-4", "[1, 2]", "null")."""
    values = yaml.safe_load(yaml.safe_dump(values))  # a deep copy
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty key")
        target = values
        for i, part in enumerate(parts[:-1]):
            node = target.get(part)
            if node is None:
                node = target[part] = {}
            if not isinstance(node, dict):
                raise ValueError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set {key}")
            target = node
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)
        target[parts[-1]] = value
    return values


def _looks_numeric(text: str) -> bool:
    # PyYAML reads "1e-4" (no dot) as a string; numbers in configs mean numbers.
    try:
        float(text)
    except ValueError:
        return False
    return any(ch.isdigit() for ch in text)


def load_config(path_or_name: str | None = None, overrides=None, *, base: dict | None = None) -> StageConfig:
    """Read a YAML config (or start from `base`), apply overrides and validate."""
    values = dict(base or {})
    if path_or_name is not None:
        path = resolve_config_path(path_or_name)
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config: {path} does not hold a mapping")
        values = _deep_merge(values, loaded)
    values = apply_overrides(values, overrides)
    for key in ("optim", "kd", "losses"):  # YAML ints where floats are meant are fine
        section = values.get(key)
        if isinstance(section, dict):
            for name, value in section.items():
                if isinstance(value, str) and _looks_numeric(value):
                    section[name] = float(value)
    return config_from_dict(values)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def dump_config(config: StageConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
