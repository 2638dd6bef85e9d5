"""LLaVA-format training data: a dataset of tokenized conversations with lazily loaded images, and
the collator that pads them into model batches.

The JSON files are LLaVA's: the 558K caption file and the 665K instruction file are both a list of
{"id", "image" (path relative to an image folder; absent for text-only samples), "conversations":
[{"from": "human" | "gpt" | "system", "value": text}, ...]}. A JSON array and JSON Lines both load.

Samples that cannot be used are never dropped silently. With on_bad_sample="raise" the first one
raises `BadSample` naming it; with "skip" it is left out and counted by reason in `dataset.report`.
"""
from __future__ import annotations

import inspect
import json
import logging
import operator
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .chat import IGNORE_INDEX, BadSample, tokenize_conversation
from .images import load_image, pixel_values, resolve_image

logger = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("raise", "skip")
TEXT_ONLY = ("skip", "keep")
TEXT_ONLY_REASON = "text-only"
MAX_EXAMPLE_IDS = 3


@dataclass
class DataReport:
    """What happened to the samples of a data file: `total` read, `kept`, and the `skipped` ones
    counted by reason, with up to `MAX_EXAMPLE_IDS` example ids per reason.

    `total == kept + sum(skipped.values())` always holds; a corrupt image found while training moves
    its sample from `kept` to `skipped`.
    """

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, sample_id: str, reason: str):
        self.skipped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < MAX_EXAMPLE_IDS:
            ids.append(sample_id)

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped),
                "examples": {reason: list(ids) for reason, ids in self.examples.items()}}

    def __str__(self) -> str:
        text = f"{self.total} samples: {self.kept} kept, {sum(self.skipped.values())} skipped"
        if self.skipped:
            text += " (" + "; ".join(
                f"{reason}: {count}, e.g. " + ", ".join(repr(i) for i in self.examples.get(reason, []))
                for reason, count in self.skipped.most_common()) + ")"
        return text


def _records(path: str, size: int, mtime_ns: int, code_identity: str):
    """The records of a LLaVA JSON array or JSON Lines file, one fixed-schema row each:
    {"sample_id", "image", "conversations" (as JSON text), "reason", "detail"}.

    The file is parsed here rather than by `datasets`' JSON loader, whose Arrow schema inference
    stores a column of mixed types (LLaVA-665K mixes int and str ids) as JSON text and then reads
    string ids such as "000000033471" back as numbers. Malformed records become rows with a reason.
    `size`, `mtime_ns` and `code_identity` are unused: they key `datasets`' cache of this generator.
    """
    with open(path, encoding="utf-8-sig") as file:
        is_array = file.read(4096).lstrip()[:1] == "["
        file.seek(0)
        if is_array:
            try:
                records = json.load(file)
            except json.JSONDecodeError as err:
                raise ValueError(f"json_path: {path!r} is not a valid JSON array ({err})") from None
            for index, record in enumerate(records):
                yield _record_row(record, index)
            return
        lines = (line for line in enumerate(file, 1) if line[1].strip())
        for index, (line_number, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield _bad_row(index, "malformed record", f"line {line_number}: {err}")
            else:
                yield _record_row(record, index)


def _bad_row(index: int, reason: str, detail: str, sample_id: str | None = None) -> dict:
    return {"sample_id": sample_id or f"#{index}", "image": None, "conversations": None, "reason": reason,
            "detail": detail}


def _record_row(record, index: int) -> dict:
    """A record whose id is missing is named by its position, "#<index>"."""
    if not isinstance(record, dict):
        return _bad_row(index, "malformed record", f"expected an object, got {record!r:.80}")
    sample_id = str(record["id"]) if record.get("id") is not None else f"#{index}"
    image, conversations = record.get("image"), record.get("conversations")
    if image is not None and not isinstance(image, str):
        return _bad_row(index, "malformed image field", f"expected a relative path, got {image!r:.80}", sample_id)
    return {"sample_id": sample_id, "image": image, "reason": None, "detail": "",
            "conversations": None if conversations is None else json.dumps(conversations, ensure_ascii=False)}


def _tokenize_row(row, *, tokenizer, num_image_tokens, max_length, text_only, code_identity):
    """input_ids and labels of one record, or the reason it is unusable (`code_identity`: see
    `_code_identity`)."""
    out = {"input_ids": [], "labels": []}
    if row["reason"] is not None:
        return out
    if row["image"] is None and text_only == "skip":
        return {**out, "reason": TEXT_ONLY_REASON}
    conversations = None if row["conversations"] is None else json.loads(row["conversations"])
    try:
        input_ids, labels = tokenize_conversation(conversations, tokenizer, num_image_tokens, max_length=max_length,
                                                  sample_id=row["sample_id"], image=row["image"] is not None)
    except BadSample as err:
        return {**out, "reason": err.reason, "detail": err.detail}
    return {"input_ids": input_ids, "labels": labels}


def _code_identity() -> str:
    """The source of the reading and tokenization code ('' where no source is installed).

    `datasets` caches the generator and the map by hashing their arguments, but module-level functions
    by name only; passing this source makes an edit to that code miss the stale cache.
    """
    from . import chat

    try:
        return inspect.getsource(chat) + inspect.getsource(_record_row) + inspect.getsource(_tokenize_row)
    except (OSError, TypeError):
        return ""


def _load_records(json_path: str, cache_dir: str | None, code_identity: str):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    stat = os.stat(json_path)
    try:
        records = datasets.Dataset.from_generator(
            _records, features=_record_features(), cache_dir=cache_dir,
            gen_kwargs=dict(path=os.path.abspath(json_path), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                            code_identity=code_identity))
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise
    if len(records) and records.data.column("conversations").null_count == len(records):
        raise ValueError(f"json_path: no record of {json_path!r} has a 'conversations' field; expected "
                         "LLaVA records {'id', 'image', 'conversations'}")
    return records


def _record_features():
    from datasets import Features, Value

    return Features({name: Value("string") for name in ("sample_id", "image", "conversations", "reason", "detail")})


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA conversations with their images, ready for `MultimodalCollator`.

    At construction the file is read into an Arrow table (`datasets.Dataset.from_generator`) and every
    conversation is tokenized once with the tokenizer's chat template (`Dataset.map`); `datasets`
    caches both in its cache folder, keyed by the file's path, size and mtime, the tokenizer and the
    arguments, so a second construction reads the cache. Only the assistant turns are supervised and
    the `<image>` placeholder becomes `num_image_tokens` image tokens. Each image file is checked to
    exist; images are decoded only in `__getitem__`.

    Args:
        json_path: LLaVA JSON array (.json) or JSON Lines (.jsonl) file.
        image_folder: folder the "image" paths are relative to.
        mllm: a `compodistill.models.MLLM`; gives tokenizer, image_processor and num_image_tokens.
        tokenizer, image_processor, num_image_tokens: the same, given explicitly instead of `mllm`.
        max_length: samples longer than this many tokens are bad ("too long"); None for no limit.
        on_bad_sample: "raise" (the first bad sample raises `BadSample`) or "skip" (bad samples are
            left out and counted by reason in `report`). Bad: a record that is not a JSON object, a
            missing, malformed or corrupt image, no or several `<image>` placeholders, an empty
            conversation, empty or malformed turns, no assistant turn, too long. A record without an
            id is named "#<position in the file>".
        text_only: samples without an "image" field are left out and counted as "text-only" ("skip",
            the default: the distillation losses need an image in every sample) or kept ("keep",
            tokenized without image tokens, pixel_values None).
        num_proc: worker processes for the tokenizing map.
        check_images: check at construction that every image file exists (one stat per sample).
        cache_dir: `datasets` cache folder (default: its own, ~/.cache/huggingface/datasets).

    A corrupt image is only found when `__getitem__` decodes it. Under "raise" that call raises; under
    "skip" the sample is counted in `report` (and logged) and `__getitem__` returns the next good
    sample instead, so the length stays fixed and a sampler's epoch still has `len(dataset)` items
    (one of them twice). In DataLoader workers that count lands in the worker's copy of `report`;
    the warning in the log is what reaches the main process.

    Items: {"id": str, "input_ids": LongTensor (n,), "labels": LongTensor (n,),
    "pixel_values": FloatTensor (3, H, W) or None for text-only samples; with a feature cache attached
    (`use_feature_cache`) "vision_features": FloatTensor (N, D) in place of the pixels}.
    """

    def __init__(self, json_path: str, image_folder: str, mllm=None, *, tokenizer=None, image_processor=None,
                 num_image_tokens: int | None = None, max_length: int | None = 2048,
                 on_bad_sample: str = "raise", text_only: str = "skip", num_proc: int | None = None,
                 check_images: bool = True, cache_dir: str | None = None):
        if mllm is not None:
            if not all(hasattr(mllm, name) for name in ("tokenizer", "image_processor", "num_image_tokens")):
                raise ValueError(f"mllm: expected a compodistill.models.MLLM, got {type(mllm).__name__}")
            given = [name for name, value in (("tokenizer", tokenizer), ("image_processor", image_processor),
                                              ("num_image_tokens", num_image_tokens)) if value is not None]
            if given:
                raise ValueError(f"mllm: pass either mllm or tokenizer/image_processor/num_image_tokens, "
                                 f"not both (also got {', '.join(given)})")
            tokenizer, image_processor = mllm.tokenizer, mllm.image_processor
            num_image_tokens = mllm.num_image_tokens
        elif tokenizer is None or image_processor is None:
            raise ValueError("tokenizer: without mllm, tokenizer, image_processor and num_image_tokens are "
                             "all required")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens: expected a positive int, got {num_image_tokens!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample: expected one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if text_only not in TEXT_ONLY:
            raise ValueError(f"text_only: expected one of {TEXT_ONLY}, got {text_only!r}")
        if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
            raise ValueError(f"num_proc: expected a positive int or None, got {num_proc!r}")
        if not isinstance(json_path, (str, os.PathLike)) or not os.path.isfile(json_path):
            raise ValueError(f"json_path: expected an existing LLaVA .json or .jsonl file, got {json_path!r}")
        if not isinstance(image_folder, (str, os.PathLike)) or not os.path.isdir(image_folder):
            raise ValueError(f"image_folder: expected an existing folder, got {image_folder!r}")

        self.json_path, self.image_folder = os.fspath(json_path), os.fspath(image_folder)
        self.image_processor, self.num_image_tokens = image_processor, num_image_tokens
        self.on_bad_sample, self.text_only, self.max_length = on_bad_sample, text_only, max_length

        code_identity = _code_identity()
        records = _load_records(self.json_path, cache_dir, code_identity)
        self._samples = records.map(
            _tokenize_row, remove_columns=["conversations"], num_proc=num_proc,
            fn_kwargs=dict(tokenizer=tokenizer, num_image_tokens=num_image_tokens, max_length=max_length,
                           text_only=text_only, code_identity=code_identity),
            features=_sample_features(), desc=f"Tokenizing {os.path.basename(self.json_path)}",
        )
        self.report = DataReport(total=len(self._samples))
        self._rows = self._select(check_images)
        self.report.kept = len(self._rows)
        self._corrupt: set[int] = set()
        self._columns()
        self.feature_cache = None
        if not self._rows:
            raise ValueError(f"json_path: no usable sample in {self.json_path!r}: {self.report}")
        log = logger.warning if self.report.skipped else logger.info
        log("%s: %s", self.json_path, self.report)

    def _select(self, check_images: bool) -> list[int]:
        """Rows to keep; the others are counted in the report (or raise, under "raise")."""
        columns = {name: self._samples.data.column(name).to_pylist()
                   for name in ("sample_id", "image", "reason", "detail")}
        rows = []
        for row, (sample_id, image, reason, detail) in enumerate(tqdm(
                zip(*columns.values()), total=len(self._samples), disable=None,
                desc="Checking image files" if check_images else "Selecting samples")):
            if reason is None and image is not None and check_images:
                try:
                    resolve_image(self.image_folder, image, sample_id)
                except BadSample as err:
                    reason, detail = err.reason, err.detail
            if reason is None:
                rows.append(row)
                continue
            if self.on_bad_sample == "raise" and reason != TEXT_ONLY_REASON:
                raise BadSample(sample_id, reason, detail)
            self.report.skip(sample_id, reason)
        return rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index) -> dict:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        last_error = None
        for step in range(len(self)):
            position = (index + step) % len(self)
            if position in self._corrupt:
                continue
            try:
                return self._load(position)
            except BadSample as err:
                if self.on_bad_sample == "raise":
                    raise
                self._corrupt.add(position)
                self.report.kept -= 1
                self.report.skip(err.sample_id, err.reason)
                logger.warning("skipping %s; %s", err, self.report)
                last_error = err
        raise ValueError(f"json_path: every sample of {self.json_path!r} has an unreadable image "
                         f"({self.report})") from last_error

    def _columns(self):
        """Token ids, labels, ids and image paths as flat arrays: reading a sample is then two slices, not
        an Arrow row lookup (the data loader's cost per sample, at every step)."""
        table = self._samples.data
        for name in ("input_ids", "labels"):
            column = table.column(name).combine_chunks()
            setattr(self, f"_{name}_values", column.values.to_numpy(zero_copy_only=False))
            setattr(self, f"_{name}_offsets", column.offsets.to_numpy())
        self._sample_ids = table.column("sample_id").to_pylist()
        self._images = table.column("image").to_pylist()

    def _tokens(self, name: str, row: int) -> torch.Tensor:
        offsets = getattr(self, f"_{name}_offsets")
        values = getattr(self, f"_{name}_values")[offsets[row]:offsets[row + 1]]
        return torch.from_numpy(values.astype("int64"))

    def image_path(self, position: int) -> str | None:
        """The resolved image file of sample `position` (None for a text-only sample)."""
        row = self._rows[position]
        image = self._images[row]
        return None if image is None else resolve_image(self.image_folder, image, self._sample_ids[row])

    def use_feature_cache(self, cache, mllm, *, device=None, batch_size: int = 64, progress: bool = True):
        """Compute (once) the vision features of every image this dataset uses with `mllm`'s frozen tower
        and yield them as "vision_features" instead of "pixel_values" from now on. Images that cannot be
        read raise `BadSample` (on_bad_sample="raise") or are skipped and counted."""
        positions = [p for p in range(len(self)) if p not in self._corrupt and self._images[self._rows[p]] is not None]
        paths = {self._sample_ids[self._rows[p]]: self.image_path(p) for p in positions}
        bad = set(cache.fill(mllm, list(paths.items()), device=device, batch_size=batch_size, progress=progress,
                             on_bad_sample=self.on_bad_sample))
        for position in positions:
            sample_id = self._sample_ids[self._rows[position]]
            if sample_id in bad:
                self._corrupt.add(position)
                self.report.kept -= 1
                self.report.skip(sample_id, "corrupt image")
        self.feature_cache = cache
        return self

    def _load(self, position: int) -> dict:
        row = self._rows[position]
        sample_id, image = self._sample_ids[row], self._images[row]
        item = {"id": sample_id, "input_ids": self._tokens("input_ids", row), "labels": self._tokens("labels", row),
                "pixel_values": None}
        if image is not None:
            path = resolve_image(self.image_folder, image, sample_id)
            if self.feature_cache is not None and path in self.feature_cache:
                item["vision_features"] = self.feature_cache[path]
            else:
                item["pixel_values"] = pixel_values(self.image_processor, [load_image(path, sample_id)])[0]
        return item

    def describe(self) -> str:
        """One line for logs: the file, the counts, and why samples were skipped."""
        return f"{os.path.basename(self.json_path)}: {self.report}"

    def __repr__(self) -> str:
        return (f"LlavaDataset({self.json_path!r}, {len(self)} samples, {self.num_image_tokens} image tokens, "
                f"max_length={self.max_length}, report: {self.report})")


def _sample_features():
    from datasets import List, Value

    features = _record_features()
    del features["conversations"]
    features.update(input_ids=List(Value("int32")), labels=List(Value("int32")))
    return features


class MultimodalCollator:
    """Pads `LlavaDataset` items into a batch.

    Returns {"input_ids" (B, L) long, "attention_mask" (B, L) long 0/1, "labels" (B, L) long (-100 on
    padding), "pixel_values" (B, 3, H, W) float — or "vision_features" (B, N, D) when the dataset yields
    cached tower features —, "visual_start" (B,) long, "ids" [str]}. visual_start is
    the position of each sample's first image token in the padded batch: its position in the sample
    plus the sample's left-padding. Every sample must hold exactly one contiguous run of
    `num_image_tokens` image tokens. A batch is all-image or all-text; a text-only batch has
    pixel_values and visual_start None.

    Args:
        pad_token_id: id written into input_ids on padding.
        image_token_id, num_image_tokens: the image placeholder and how many of them one image becomes.
        padding_side: "right" (training) or "left" (generation).
        max_length: cut longer samples to this many tokens, from the end; a cut through or before the
            image tokens raises instead.
    """

    def __init__(self, pad_token_id: int, *, image_token_id: int, num_image_tokens: int,
                 padding_side: str = "right", max_length: int | None = None):
        for name, value in (("pad_token_id", pad_token_id), ("image_token_id", image_token_id)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int token id, got {value!r}")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens: expected a positive int, got {num_image_tokens!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < num_image_tokens):
            raise ValueError(f"max_length: expected None or an int >= num_image_tokens ({num_image_tokens}), "
                             f"got {max_length!r}")
        self.pad_token_id, self.image_token_id, self.num_image_tokens = pad_token_id, image_token_id, num_image_tokens
        self.padding_side, self.max_length = padding_side, max_length

    def _image_start(self, sample_id, input_ids: torch.Tensor, has_image: bool):
        """Offset of the sample's image-token run (None for a text-only sample), checked."""
        positions = (input_ids == self.image_token_id).nonzero().flatten().tolist()
        if not has_image:
            if positions:
                raise ValueError(f"samples: text-only sample {sample_id!r} holds {len(positions)} image tokens")
            return None
        if len(positions) != self.num_image_tokens or positions[-1] - positions[0] + 1 != len(positions):
            detail = f"at {positions[0]}..{positions[-1]}" if positions else "none"
            raise ValueError(f"samples: sample {sample_id!r} must hold one contiguous run of "
                             f"{self.num_image_tokens} image tokens, found {len(positions)} ({detail})")
        return positions[0]

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("samples: expected a non-empty list of dataset items")
        ids = [str(s.get("id", f"#{b}")) for b, s in enumerate(samples)]
        with_image = [s["pixel_values"] is not None or s.get("vision_features") is not None for s in samples]
        if any(with_image) and not all(with_image):
            text = [i for i, img in zip(ids, with_image) if not img]
            raise ValueError(f"samples: a batch must be all image or all text-only samples; text-only "
                             f"{text} sit beside image samples (batch text_only='keep' data separately)")
        input_ids, labels, starts = [], [], []
        for sample_id, sample, has_image in zip(ids, samples, with_image):
            tokens, targets = sample["input_ids"], sample["labels"]
            if tokens.ndim != 1 or tokens.shape != targets.shape:
                raise ValueError(f"samples: sample {sample_id!r} needs 1-D input_ids and labels of one length, "
                                 f"got {tuple(tokens.shape)} and {tuple(targets.shape)}")
            start = self._image_start(sample_id, tokens, has_image)
            if self.max_length is not None and len(tokens) > self.max_length:
                if start is not None and start + self.num_image_tokens > self.max_length:
                    raise ValueError(f"samples: max_length {self.max_length} would cut the image tokens of "
                                     f"sample {sample_id!r} (at {start}..{start + self.num_image_tokens - 1})")
                tokens, targets = tokens[: self.max_length], targets[: self.max_length]
            input_ids.append(tokens)
            labels.append(targets)
            starts.append(start)

        width = max(len(t) for t in input_ids)
        batch_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        shifts = []
        for b, (tokens, targets) in enumerate(zip(input_ids, labels)):
            shift = width - len(tokens) if self.padding_side == "left" else 0
            batch_ids[b, shift: shift + len(tokens)] = tokens
            batch_labels[b, shift: shift + len(tokens)] = targets
            mask[b, shift: shift + len(tokens)] = 1
            shifts.append(shift)
        batch = {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels, "ids": ids,
                 "pixel_values": None, "visual_start": None}
        if all(with_image):
            # images come as pixels, or (with a feature cache) as their frozen tower's features
            key = "vision_features" if samples[0].get("vision_features") is not None else "pixel_values"
            if any(s.get(key) is None for s in samples):
                raise ValueError("samples: a batch mixes cached vision features and pixel values")
            shapes = {tuple(s[key].shape) for s in samples}
            if len(shapes) != 1:
                raise ValueError(f"samples: {key} of different shapes {sorted(shapes)} in one batch")
            batch[key] = torch.stack([s[key] for s in samples])
            batch["visual_start"] = torch.tensor([s + shift for s, shift in zip(starts, shifts)], dtype=torch.long)
        return batch


def build_collator(mllm, padding_side: str = "right", max_length: int | None = None) -> MultimodalCollator:
    """The collator for `mllm`'s data: its tokenizer's pad token, image token and image-token count."""
    pad_token_id = mllm.tokenizer.pad_token_id
    if pad_token_id is None:
        raise ValueError("mllm: its tokenizer has no pad token; set tokenizer.pad_token first")
    return MultimodalCollator(pad_token_id, image_token_id=mllm.image_token_id,
                              num_image_tokens=mllm.num_image_tokens, padding_side=padding_side,
                              max_length=max_length)
