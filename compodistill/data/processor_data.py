"""LLaVA-format data for any supported VLM family, through the model's own processor and chat template.

`ProcessorDataset` reads a LLaVA JSON file (a JSON array or JSON Lines of {"id", "image": a path or a
list of paths relative to an image folder, "conversations": [{"from": "human" | "gpt" | "system",
"value": text}, ...]}). A turn's `<image>` placeholders mark where its images go, in order; a sample
with images and no placeholder gets them at the start of its first user turn, as LLaVA's code does.
`ProcessorCollator(processor)` renders each conversation with the processor's chat template (images as
{"type": "image"} items, which the processor expands into the family's image tokens: dynamic
resolution, tiles, row separators), processes the batch with its images in one call, supervises the
assistant turns, and returns the processor's tensors plus

    labels        (B, L) -100 except on the assistant turns' tokens (header of the turn excluded);
    visual_index  (B, Nv) int64 positions of each sample's visual tokens, padded with -1.

Samples may hold several images of any sizes. A sample that cannot be used (missing or corrupt image,
placeholders that do not match the images, a conversation longer than max_length) raises `BadSample`
naming its id, or with on_bad_sample="skip" is left out and counted in `dataset.report`.
"""
from __future__ import annotations

import json
import os
import re

import torch

from .chat import IGNORE_INDEX, BadSample, to_messages
from .images import load_image, resolve_image
from .llava import ON_BAD_SAMPLE, DataReport

IMAGE_PLACEHOLDER = "<image>"


def read_records(json_path: str) -> list:
    """The records of a LLaVA JSON array or JSON Lines file."""
    if not os.path.isfile(json_path):
        raise ValueError(f"json_path: {json_path!r} is not a file")
    with open(json_path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"json_path: line {number} of {json_path!r} is not JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"json_path: {json_path!r} holds a {type(records).__name__}, expected a list of samples")
    return records


def structured_messages(conversations, num_images: int, sample_id=None) -> list[dict]:
    """LLaVA turns → chat messages whose content is a list of {"type": "text"} / {"type": "image"} items,
    one image item per `<image>` placeholder (or all of them before the first user turn's text)."""
    messages = to_messages(conversations, sample_id)
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders not in (0, num_images):
        raise BadSample(sample_id, "placeholders do not match images",
                        f"{placeholders} <image> placeholders for {num_images} images")
    out, prepend = [], num_images if placeholders == 0 else 0
    for message in messages:
        pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)})", message["content"])
        content = []
        if prepend and message["role"] == "user":
            content += [{"type": "image"}] * prepend
            prepend = 0
        for piece in pieces:
            if piece == IMAGE_PLACEHOLDER:
                content.append({"type": "image"})
            elif piece.strip():
                content.append({"type": "text", "text": piece.strip("\n")})
        out.append({"role": message["role"], "content": content})
    if prepend:
        raise BadSample(sample_id, "no user turn for the images")
    return out


class ProcessorDataset(torch.utils.data.Dataset):
    """LLaVA samples as {"id", "messages", "images" (PIL, RGB)}; images are opened when a sample is read.

    on_bad_sample: "raise" (BadSample with the id) or "skip" (left out, counted in `report`); the file's
    structure and the images' existence are checked up front, decoding when a sample is read.
    """

    def __init__(self, json_path: str, image_folder: str, *, on_bad_sample: str = "raise"):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample: expected one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if not os.path.isdir(image_folder):
            raise ValueError(f"image_folder: {image_folder!r} is not a folder")
        self.image_folder, self.on_bad_sample = image_folder, on_bad_sample
        self.report = DataReport()
        self.samples = []
        for position, record in enumerate(read_records(json_path)):
            self.report.total += 1
            sample_id = record.get("id", f"#{position}") if isinstance(record, dict) else f"#{position}"
            try:
                self.samples.append(self._parse(record, sample_id))
                self.report.kept += 1
            except BadSample as bad:
                if on_bad_sample == "raise":
                    raise
                self.report.skip(bad.sample_id, bad.reason)
        if not self.samples:
            raise ValueError(f"json_path: no usable sample in {json_path!r} ({self.report})")

    def _parse(self, record, sample_id):
        if not isinstance(record, dict):
            raise BadSample(sample_id, "malformed record", f"expected an object, got {type(record).__name__}")
        images = record.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list):
            raise BadSample(sample_id, "malformed image field", f"{images!r:.80}")
        paths = [resolve_image(self.image_folder, relative, sample_id) for relative in images]
        messages = structured_messages(record.get("conversations"), len(paths), sample_id)
        return {"id": str(sample_id), "messages": messages, "paths": paths}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index) -> dict:
        sample = self.samples[index]
        return {"id": sample["id"], "messages": sample["messages"],
                "images": [load_image(path, sample["id"]) for path in sample["paths"]]}


def _user_images(messages) -> int:
    return sum(1 for m in messages for item in m["content"] if item["type"] == "image")


class ProcessorCollator:
    """Samples of `ProcessorDataset` → one processed batch with labels and visual_index.

    processor: the student's processor (teacher and student must share it; `models.pairing.check_pair`
    checks a batch). image_token_ids: the ids of the visual tokens (`Family.image_token_ids(config)`).
    padding_side: "right" or "left". max_length: a sample with more tokens raises BadSample (cutting it
    would cut image tokens off their features).
    """

    def __init__(self, processor, image_token_ids, *, padding_side: str = "right", max_length: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length: expected an int > 0 or None, got {max_length!r}")
        self.processor, self.padding_side, self.max_length = processor, padding_side, max_length
        self.image_token_ids = tuple(int(i) for i in image_token_ids)

    def _ids(self, messages, images, *, generation: bool) -> list:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=generation)
        count = _user_images(messages)
        out = self.processor(text=[text], images=[images[:count]] if count else None, return_tensors="pt")
        return out["input_ids"][0].tolist()

    def labels_of(self, sample, full: list | None = None) -> list:
        """Per-token labels of one sample: the tokens each assistant turn adds to the rendering of the
        turns before it (after its header) are supervised. full: the sample's token ids when they are
        already known (its real tokens in a processed batch); processed here otherwise."""
        messages, images = sample["messages"], sample["images"]
        if full is None:
            full = self._ids(messages, images, generation=False)
        labels = [IGNORE_INDEX] * len(full)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._ids(messages[:turn], images, generation=True))
            upto = self._ids(messages[:turn + 1], images, generation=False)
            if full[:len(upto)] != upto or len(upto) <= start:
                raise BadSample(sample["id"], "chat template not prefix-stable",
                                f"rendering turn {turn} does not tokenize as a prefix of the conversation")
            labels[start:len(upto)] = full[start:len(upto)]
        return labels

    def __call__(self, samples: list) -> dict:
        if not samples:
            raise ValueError("samples: an empty batch")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = self.padding_side
        texts = [self.processor.apply_chat_template(s["messages"]) for s in samples]
        images = [s["images"] for s in samples]
        has_images = [bool(im) for im in images]
        if any(has_images) and not all(has_images):
            raise BadSample(samples[has_images.index(False)]["id"], "text-only sample in an image batch")
        batch = dict(self.processor(text=texts, images=images if all(has_images) else None, return_tensors="pt",
                                    padding=True))
        input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for b, sample in enumerate(samples):
            real = mask[b].nonzero().flatten()
            sample_labels = self.labels_of(sample, input_ids[b, real].tolist())
            if self.max_length is not None and len(real) > self.max_length:
                raise BadSample(sample["id"], "too long", f"{len(real)} tokens > max_length {self.max_length}")
            labels[b, real] = torch.tensor(sample_labels, dtype=labels.dtype)
        batch["labels"] = labels
        from ..models.families import visual_index

        batch["visual_index"] = visual_index(input_ids, self.image_token_ids)
        batch["ids"] = [s["id"] for s in samples]
        return batch
