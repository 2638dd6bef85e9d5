"""LLaVA-format data: tokenization through `datasets`, assistant-only labels, bad samples (raise or
count), lazy image loading, text-only samples, and the collator's padding and visual_start."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from PIL import Image

import compodistill.data.llava as llava
from compodistill.data.chat import IGNORE_INDEX, BadSample
from compodistill.data.images import pixel_values
from compodistill.data.llava import LlavaDataset, MultimodalCollator, build_collator
from compodistill.models import build_preset, visual_token_positions

IMAGE_SIZE = (40, 28)  # not the processor's 64x64, so resizing is exercised

# LLaVA-558K layout: one caption request with the placeholder before or after it, images in subfolders.
PRETRAIN_JSON = """[
  {
    "id": "GCC_train_000000001",
    "image": "00000/GCC_train_000000001.png",
    "conversations": [
      {"from": "human", "value": "Render a clear and concise summary of the photo.\\n<image>"},
      {"from": "gpt", "value": "a red circle above a blue square"}
    ]
  },
  {
    "id": "GCC_train_000000002",
    "image": "00000/GCC_train_000000002.png",
    "conversations": [
      {"from": "human", "value": "<image>\\nGive a brief description of the image."},
      {"from": "gpt", "value": "two green stars"}
    ]
  }
]
"""

# LLaVA-665K layout: multi-turn, a system turn, an integer id, and a text-only (ShareGPT-like) sample.
INSTRUCT_JSON = """[
  {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.png",
    "conversations": [
      {"from": "system", "value": "Answer with a single word."},
      {"from": "human", "value": "<image>\\nWhat color is the circle?"},
      {"from": "gpt", "value": "red"},
      {"from": "human", "value": "How many stars are there?"},
      {"from": "gpt", "value": "two"},
      {"from": "human", "value": "Is the square below the circle?"},
      {"from": "gpt", "value": "yes"}
    ]
  },
  {
    "id": 52847,
    "image": "coco/train2017/000000052847.png",
    "conversations": [
      {"from": "human", "value": "What shape is on the left?\\n<image>"},
      {"from": "gpt", "value": "a triangle"}
    ]
  },
  {
    "id": "i6IyJda_0",
    "conversations": [
      {"from": "human", "value": "Name a color."},
      {"from": "gpt", "value": "blue"}
    ]
  }
]
"""

PRETRAIN_JSONL = (
    '{"id": "GCC_train_000000001", "image": "00000/GCC_train_000000001.png", "conversations": '
    '[{"from": "human", "value": "<image>\\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]}\n'
    '{"id": "GCC_train_000000002", "image": "00000/GCC_train_000000002.png", "conversations": '
    '[{"from": "human", "value": "<image>\\nWhat is shown?"}, {"from": "gpt", "value": "two green stars"}]}\n'
)

IMAGE_FILES = ("00000/GCC_train_000000001.png", "00000/GCC_train_000000002.png",
               "coco/train2017/000000033471.png", "coco/train2017/000000052847.png", "good.png", "corrupt.png")


@pytest.fixture(scope="module")
def mllm():
    return build_preset("tiny-student")


@pytest.fixture
def folder(tmp_path):
    """An image folder with every image the files above name, plus a truncated PNG."""
    images = tmp_path / "images"
    for i, name in enumerate(IMAGE_FILES):
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", IMAGE_SIZE, (40 * i, 255 - 40 * i, 90)).save(path)
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # header intact, pixel data cut short
    return images


def write(tmp_path, name, text_or_records):
    path = tmp_path / name
    if isinstance(text_or_records, str):
        path.write_text(text_or_records)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in text_or_records))
    else:
        path.write_text(json.dumps(text_or_records))
    return str(path)


def dataset(tmp_path, name, content, folder, mllm, **kwargs):
    return LlavaDataset(write(tmp_path, name, content), str(folder), mllm,
                        cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def sample(sample_id, conversations, image="good.png"):
    record = {"id": sample_id, "conversations": conversations}
    if image is not None:
        record["image"] = image
    return record


def qa(question="<image>\nWhat is shown?", answer="a red circle"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ---------------------------------------------------------------------------------------------------
# Tokenization and labels
# ---------------------------------------------------------------------------------------------------

def expected_texts(conversations, num_image_tokens):
    """ChatML written out by hand: (unsupervised text, supervised text) of a conversation."""
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    prompt, answers = "", ""
    for turn in conversations:
        value = turn["value"].replace("<image>", "<image>" * num_image_tokens)
        if turn["from"] == "gpt":
            prompt += "<|im_start|>assistant\n"
            answers += value + "<|im_end|>\n"
        else:
            prompt += f"<|im_start|>{roles[turn['from']]}\n{value}<|im_end|>\n"
    return prompt, answers


@pytest.mark.parametrize("name, content", [("llava_pretrain.json", PRETRAIN_JSON),
                                           ("llava_instruct.json", INSTRUCT_JSON),
                                           ("llava_pretrain.jsonl", PRETRAIN_JSONL)],
                         ids=["558k-json", "665k-json", "558k-jsonl"])
def test_labels_supervise_exactly_the_assistant_turns(tmp_path, folder, mllm, name, content):
    ds = dataset(tmp_path, name, content, folder, mllm)
    records = [r for r in (json.loads(line) for line in content.splitlines() if line.strip())] \
        if name.endswith(".jsonl") else json.loads(content)
    with_image = [r for r in records if "image" in r]
    assert len(ds) == len(with_image)
    tokenizer, n = mllm.tokenizer, mllm.num_image_tokens
    processor_shape = pixel_values(mllm.image_processor, [Image.new("RGB", IMAGE_SIZE)]).shape[1:]
    for i, record in enumerate(with_image):
        item = ds[i]
        assert item["id"] == str(record["id"])
        ids, labels = item["input_ids"], item["labels"]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
        supervised = labels != IGNORE_INDEX
        assert torch.equal(labels[supervised], ids[supervised])
        prompt, answers = expected_texts(record["conversations"], n)
        assert tokenizer.decode(ids[supervised]) == answers
        assert tokenizer.decode(ids[~supervised]) == prompt
        # One supervised run per assistant turn (headers and user turns between them are -100).
        runs = int(supervised[0]) + int((supervised[1:] & ~supervised[:-1]).sum())
        assert runs == sum(turn["from"] == "gpt" for turn in record["conversations"])
        # The placeholder became one contiguous run of n image tokens, none supervised.
        image_positions = (ids == mllm.image_token_id).nonzero().flatten()
        assert len(image_positions) == n and int(image_positions[-1] - image_positions[0]) == n - 1
        assert not supervised[image_positions].any()
        assert item["pixel_values"].dtype == torch.float32
        assert item["pixel_values"].shape == processor_shape == (3, 64, 64)
    assert ds.report.total == len(records) and ds.report.kept == len(ds)


def test_pixel_values_come_from_the_image_processor(tmp_path, folder, mllm):
    ds = dataset(tmp_path, "p.json", PRETRAIN_JSON, folder, mllm)
    with Image.open(folder / IMAGE_FILES[1]) as image:
        want = pixel_values(mllm.image_processor, [image.convert("RGB")])[0]
    torch.testing.assert_close(ds[1]["pixel_values"], want, rtol=0, atol=0)


def test_explicit_components_match_mllm(tmp_path, folder, mllm):
    path = write(tmp_path, "p.json", PRETRAIN_JSON)
    a = LlavaDataset(path, str(folder), mllm, cache_dir=str(tmp_path / "c"))
    b = LlavaDataset(path, str(folder), tokenizer=mllm.tokenizer, image_processor=mllm.image_processor,
                     num_image_tokens=mllm.num_image_tokens, cache_dir=str(tmp_path / "c"))
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])


def test_tokenization_is_cached_by_datasets(tmp_path, folder, mllm):
    path = write(tmp_path, "p.json", PRETRAIN_JSON)

    def build(**kwargs):
        return LlavaDataset(path, str(folder), mllm, cache_dir=str(tmp_path / "c"), **kwargs)

    files = [build(max_length=m)._samples.cache_files for m in (2048, 2048, 1024)]
    assert files[0] and files[0] == files[1]  # same file, tokenizer and arguments: the cached map is reused
    assert files[2] != files[0]  # a different max_length tokenizes anew
    # An edited file is read again, not served from the cache.
    write(tmp_path, "p.json", PRETRAIN_JSON.replace("two green stars", "three red hearts and a ring"))
    edited = build()
    assert edited._samples.cache_files != files[0]
    answer = edited[1]["input_ids"][edited[1]["labels"] != IGNORE_INDEX]
    assert mllm.tokenizer.decode(answer) == "three red hearts and a ring<|im_end|>\n"


def test_ids_are_kept_exactly(tmp_path, folder, mllm):
    # LLaVA-665K mixes int and str ids; datasets' JSON loader would store such a column as JSON text
    # and read "000000033471" back as 33471.
    ids = ["000000033471", 52847, "null", "1e3", "i6IyJda_0"]
    ds = dataset(tmp_path, "ids.json", [sample(i, qa()) for i in ids], folder, mllm)
    assert [ds[k]["id"] for k in range(len(ds))] == ["000000033471", "52847", "null", "1e3", "i6IyJda_0"]


def test_parallel_tokenization_matches(tmp_path, folder, mllm):
    one = dataset(tmp_path, "i.json", INSTRUCT_JSON, folder, mllm, text_only="keep")
    two = dataset(tmp_path, "i.json", INSTRUCT_JSON, folder, mllm, text_only="keep", num_proc=2)
    for k in range(len(one)):
        assert torch.equal(one[k]["input_ids"], two[k]["input_ids"])
        assert torch.equal(one[k]["labels"], two[k]["labels"])


def test_dataloader_batches_feed_the_model(tmp_path, folder, mllm):
    ds = dataset(tmp_path, "i.json", INSTRUCT_JSON, folder, mllm)
    ds = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=build_collator(mllm, padding_side="left"))
    batch = next(iter(loader))
    with torch.no_grad():
        logits = mllm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"]).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------
# Bad samples
# ---------------------------------------------------------------------------------------------------

BAD = {
    "missing image": sample("bad", qa(), image="nowhere/missing.png"),
    "malformed image field": sample("bad", qa(), image=["good.png", "good.png"]),
    "no <image> token": sample("bad", qa(question="What is shown?")),
    "several <image> tokens": sample("bad", qa(question="<image>\nWhat is shown?\n<image>")),
    "empty turn": sample("bad", qa(answer="   ")),
    "empty conversation": sample("bad", []),
    "malformed turn": sample("bad", [{"from": "robot", "value": "<image>\nhi"}, {"from": "gpt", "value": "a"}]),
    "no assistant turn": sample("bad", [{"from": "human", "value": "<image>\nWhat is shown?"}]),
    "too long": sample("bad", qa(answer="red circle " * 60)),
}
MALFORMED_TURNS = {  # shapes that also break Arrow's schema inference
    "value missing": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt"}],
    "value a number": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": 3}],
    "turn a list": [["human", "<image>\nhi"], ["gpt", "a"]],
}


def with_bad(bad):
    return [sample("good-1", qa()), {**bad, "id": "bad-one"}, sample("good-2", qa(answer="two stars"))]


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_sample_raises_naming_the_id(tmp_path, folder, mllm, reason):
    with pytest.raises(BadSample, match="bad-one") as err:
        dataset(tmp_path, "bad.json", with_bad(BAD[reason]), folder, mllm, max_length=100)
    assert err.value.sample_id == "bad-one" and err.value.reason == reason


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_sample_is_skipped_and_counted(tmp_path, folder, mllm, reason):
    ds = dataset(tmp_path, "bad.jsonl", with_bad(BAD[reason]), folder, mllm, max_length=100,
                 on_bad_sample="skip")
    assert [ds[i]["id"] for i in range(len(ds))] == ["good-1", "good-2"]
    assert ds.report.to_dict() == {"total": 3, "kept": 2, "skipped": {reason: 1}, "examples": {reason: ["bad-one"]}}


@pytest.mark.parametrize("turns", MALFORMED_TURNS.values(), ids=list(MALFORMED_TURNS))
def test_malformed_turn_shapes_load_and_are_reported(tmp_path, folder, mllm, turns):
    records = with_bad(sample("bad", turns))
    with pytest.raises(BadSample, match="bad-one.*malformed turn"):
        dataset(tmp_path, "bad.json", records, folder, mllm)
    ds = dataset(tmp_path, "bad.json", records, folder, mllm, on_bad_sample="skip")
    assert len(ds) == 2 and ds.report.skipped == {"malformed turn": 1}


def test_report_counts_every_reason_exactly(tmp_path, folder, mllm):
    records = [sample("good-1", qa())]
    for k, (reason, bad) in enumerate(sorted(BAD.items())):
        records += [{**bad, "id": f"{reason}-{copy}"} for copy in range(1 + k % 3)]
    records += [sample("text-1", qa(question="Name a color."), image=None), sample("good-2", qa())]
    ds = dataset(tmp_path, "all.json", records, folder, mllm, max_length=100, on_bad_sample="skip")
    want = {reason: 1 + k % 3 for k, reason in enumerate(sorted(BAD))}
    want["text-only"] = 1
    report = ds.report
    assert report.total == len(records) and report.kept == len(ds) == 2
    assert dict(report.skipped) == want
    assert report.examples["text-only"] == ["text-1"]
    assert report.examples["too long"] == [f"too long-{c}" for c in range(want["too long"])]
    assert "2 kept" in str(report) and "missing image: " in str(report) and "2 kept" in ds.describe()
    assert f"{len(ds)} samples" in repr(ds)


def test_malformed_records(tmp_path, folder, mllm):
    array = [sample("good-1", qa()), ["not", "an", "object"], sample("good-2", qa())]
    with pytest.raises(BadSample, match="'#1'.*malformed record"):
        dataset(tmp_path, "r.json", array, folder, mllm)
    lines = json.dumps(sample("good-1", qa())) + "\n\n{broken json\n" + json.dumps(sample("good-2", qa())) + "\n"
    ds = dataset(tmp_path, "r.jsonl", lines, folder, mllm, on_bad_sample="skip")
    assert [ds[k]["id"] for k in range(len(ds))] == ["good-1", "good-2"]
    assert ds.report.skipped == {"malformed record": 1} and ds.report.examples == {"malformed record": ["#1"]}


def test_missing_id_falls_back_to_the_row_number(tmp_path, folder, mllm):
    records = [sample("good", qa()), {"image": "nowhere.png", "conversations": qa()}]
    with pytest.raises(BadSample, match="#1"):
        dataset(tmp_path, "noid.json", records, folder, mllm)


def test_corrupt_image_raises_lazily_naming_the_id(tmp_path, folder, mllm):
    records = [sample("good-1", qa()), sample("broken", qa(), image="corrupt.png")]
    ds = dataset(tmp_path, "c.json", records, folder, mllm)  # the file exists: construction passes
    assert len(ds) == 2
    with pytest.raises(BadSample, match="broken") as err:
        ds[1]
    assert err.value.reason == "corrupt image"


def test_corrupt_image_under_skip_returns_the_next_sample_and_counts_it(tmp_path, folder, mllm):
    records = [sample("good-1", qa()), sample("broken", qa(), image="corrupt.png"), sample("good-2", qa())]
    ds = dataset(tmp_path, "c.json", records, folder, mllm, on_bad_sample="skip")
    assert ds.report.kept == 3 and not ds.report.skipped
    assert ds[1]["id"] == "good-2"
    assert ds[1]["id"] == "good-2"  # found once, counted once
    assert ds.report.to_dict() == {"total": 3, "kept": 2, "skipped": {"corrupt image": 1},
                                   "examples": {"corrupt image": ["broken"]}}
    assert len(ds) == 3 and ds[-1]["id"] == "good-2" and ds[0]["id"] == "good-1"


def test_corrupt_last_sample_wraps_around(tmp_path, folder, mllm):
    records = [sample("good-1", qa()), sample("broken", qa(), image="corrupt.png")]
    ds = dataset(tmp_path, "c.json", records, folder, mllm, on_bad_sample="skip")
    assert ds[1]["id"] == "good-1"
    with pytest.raises(IndexError):
        ds[2]


def test_images_are_loaded_lazily(tmp_path, folder, mllm, monkeypatch):
    calls = []

    def spy(path, sample_id=None):
        calls.append(sample_id)
        return real(path, sample_id)

    real = llava.load_image
    monkeypatch.setattr(llava, "load_image", spy)
    ds = dataset(tmp_path, "i.json", INSTRUCT_JSON, folder, mllm)
    assert calls == []
    ds[1]
    assert calls == ["52847"]
    ds[0], ds[1]
    assert calls == ["52847", "000000033471", "52847"]


def test_check_images_false_defers_missing_images(tmp_path, folder, mllm):
    records = [sample("good-1", qa()), sample("gone", qa(), image="nowhere.png")]
    ds = dataset(tmp_path, "m.json", records, folder, mllm, check_images=False)
    assert len(ds) == 2
    with pytest.raises(BadSample, match="gone.*missing image"):
        ds[1]


# ---------------------------------------------------------------------------------------------------
# Text-only samples
# ---------------------------------------------------------------------------------------------------

def test_text_only_skipped_by_default_even_under_raise(tmp_path, folder, mllm):
    ds = dataset(tmp_path, "i.json", INSTRUCT_JSON, folder, mllm)
    assert [ds[i]["id"] for i in range(len(ds))] == ["000000033471", "52847"]
    assert ds.report.to_dict() == {"total": 3, "kept": 2, "skipped": {"text-only": 1},
                                   "examples": {"text-only": ["i6IyJda_0"]}}


def test_text_only_kept(tmp_path, folder, mllm):
    ds = dataset(tmp_path, "i.json", INSTRUCT_JSON, folder, mllm, text_only="keep")
    assert len(ds) == 3 and not ds.report.skipped
    item = ds[2]
    assert item["id"] == "i6IyJda_0" and item["pixel_values"] is None
    assert not (item["input_ids"] == mllm.image_token_id).any()
    supervised = item["labels"] != IGNORE_INDEX
    assert mllm.tokenizer.decode(item["input_ids"][supervised]) == "blue<|im_end|>\n"

    collate = build_collator(mllm)
    text_batch = collate([item, item])
    assert text_batch["pixel_values"] is None and text_batch["visual_start"] is None
    assert text_batch["input_ids"].shape == (2, len(item["input_ids"]))
    with pytest.raises(ValueError, match="all image or all text-only.*i6IyJda_0"):
        collate([ds[0], item])


def test_text_only_with_placeholder_is_bad(tmp_path, folder, mllm):
    records = [sample("good", qa()), sample("text-bad", qa(), image=None)]
    with pytest.raises(BadSample, match="text-bad.*without an image"):
        dataset(tmp_path, "t.json", records, folder, mllm, text_only="keep")


# ---------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def items(tmp_path, folder, mllm):
    """Three samples of different lengths with their image tokens at different offsets."""
    ds = dataset(tmp_path, "i.json", INSTRUCT_JSON, folder, mllm)
    pre = dataset(tmp_path, "p.json", PRETRAIN_JSON, folder, mllm)
    return [ds[0], ds[1], pre[0]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_finds_the_image_tokens(items, mllm, side):
    batch = build_collator(mllm, padding_side=side)(items)
    lengths = [len(item["input_ids"]) for item in items]
    starts_in_sample = [int((item["input_ids"] == mllm.image_token_id).nonzero()[0]) for item in items]
    assert len(set(lengths)) == 3 and len(set(starts_in_sample)) > 1  # the case is not trivial
    B, L = batch["input_ids"].shape
    assert (B, L) == (3, max(lengths)) and batch["ids"] == [item["id"] for item in items]
    for b, (item, n) in enumerate(zip(items, lengths)):
        real = slice(0, n) if side == "right" else slice(L - n, L)
        pad = slice(n, L) if side == "right" else slice(0, L - n)
        assert torch.equal(batch["input_ids"][b, real], item["input_ids"])
        assert torch.equal(batch["labels"][b, real], item["labels"])
        assert (batch["input_ids"][b, pad] == mllm.tokenizer.pad_token_id).all()
        assert (batch["labels"][b, pad] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b, real].eq(1).all() and batch["attention_mask"][b, pad].eq(0).all()
        true_start = next(i for i in range(L) if batch["input_ids"][b, i] == mllm.image_token_id)
        assert int(batch["visual_start"][b]) == true_start
    assert batch["attention_mask"].dtype == batch["visual_start"].dtype == torch.long
    assert torch.equal(batch["visual_start"], visual_token_positions(batch["input_ids"], mllm.image_token_id)[0])
    assert torch.equal(batch["pixel_values"], torch.stack([item["pixel_values"] for item in items]))


@pytest.mark.parametrize("break_run", ["gap", "short", "two runs"])
def test_collator_rejects_a_broken_image_run(items, mllm, break_run):
    ids = items[1]["input_ids"].clone()
    positions = (ids == mllm.image_token_id).nonzero().flatten()
    if break_run == "gap":
        ids[positions[5]] = mllm.tokenizer.pad_token_id
    elif break_run == "short":
        ids = torch.cat([ids[: positions[0]], ids[positions[0] + 1:]])
    else:
        ids[-2] = mllm.image_token_id
    broken = {**items[1], "input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}
    with pytest.raises(ValueError, match="'52847'.*contiguous run of 16"):
        build_collator(mllm)([items[0], broken])


def test_collator_truncation_never_cuts_the_image(items, mllm):
    start = int((items[1]["input_ids"] == mllm.image_token_id).nonzero()[0])
    end = start + mllm.num_image_tokens
    batch = build_collator(mllm, max_length=end)([items[1]])
    assert batch["input_ids"].shape == (1, end) and int(batch["visual_start"][0]) == start
    with pytest.raises(ValueError, match="cut the image tokens of sample '52847'"):
        build_collator(mllm, max_length=end - 1)([items[1]])


def test_collator_arguments_are_checked(mllm):
    with pytest.raises(ValueError, match="padding_side"):
        MultimodalCollator(0, image_token_id=1, num_image_tokens=4, padding_side="middle")
    with pytest.raises(ValueError, match="num_image_tokens"):
        MultimodalCollator(0, image_token_id=1, num_image_tokens=0)
    with pytest.raises(ValueError, match="max_length"):
        MultimodalCollator(0, image_token_id=1, num_image_tokens=4, max_length=2)
    with pytest.raises(ValueError, match="samples"):
        build_collator(mllm)([])


def test_dataset_arguments_are_checked(tmp_path, folder, mllm):
    path = write(tmp_path, "p.json", PRETRAIN_JSON)
    cases = [
        (dict(json_path=str(tmp_path / "none.json")), "json_path"),
        (dict(image_folder=str(tmp_path / "nowhere")), "image_folder"),
        (dict(on_bad_sample="ignore"), "on_bad_sample"),
        (dict(text_only="drop"), "text_only"),
        (dict(max_length=0), "max_length"),
        (dict(num_proc=0), "num_proc"),
        (dict(tokenizer=mllm.tokenizer), "not both"),
        (dict(mllm=None), "tokenizer"),
        (dict(mllm=None, tokenizer=mllm.tokenizer, image_processor=mllm.image_processor,
              num_image_tokens=-1), "num_image_tokens"),
    ]
    for overrides, message in cases:
        kwargs = {"json_path": path, "image_folder": str(folder), "mllm": mllm, **overrides}
        with pytest.raises(ValueError, match=message):
            LlavaDataset(kwargs.pop("json_path"), kwargs.pop("image_folder"), kwargs.pop("mllm"), **kwargs)
    with pytest.raises(ValueError, match="json_path.*conversations"):
        dataset(tmp_path, "x.json", [{"id": "a", "image": "good.png"}], folder, mllm)
    with pytest.raises(ValueError, match="json_path.*not a valid JSON array"):
        dataset(tmp_path, "z.json", "[{\"id\": 1,", folder, mllm)
    with pytest.raises(ValueError, match="no usable sample"):
        dataset(tmp_path, "y.json", [sample("t", qa("hi"), image=None)], folder, mllm)
