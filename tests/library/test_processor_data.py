"""LLaVA JSON through a family's own processor and chat template (several images per sample, mixed
sizes), and the distill_vlm command end to end on tiny pairs."""
from __future__ import annotations

import json
import os

import pytest
import torch

from compodistill import distill_vlm
from compodistill.data.chat import BadSample
from compodistill.data.processor_data import ProcessorCollator, ProcessorDataset, structured_messages
from compodistill.models.families import FAMILIES, load_processor, load_vlm
from compodistill.models.tiny_families import build_tiny_processor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILY_NAMES = [name for name in ("qwen2_5_vl", "llava_onevision", "llava", "internvl", "idefics3", "qwen3_vl")
                if not FAMILIES[name].missing_requirements()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return distill_vlm.write_tiny_data(str(tmp_path_factory.mktemp("data")), samples=6)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_collator_labels_and_visual_index(name, data, tmp_path):
    processor = build_tiny_processor(name)
    processor.save_pretrained(tmp_path)
    processor = load_processor(tmp_path)
    image_ids = (processor.image_token_id,)  # the id the tiny configs take as their image token
    dataset = ProcessorDataset(*data)
    samples = [dataset[i] for i in range(4)]  # one and two images, mixed sizes
    assert [len(s["images"]) for s in samples] == [1, 2, 1, 2]
    batch = ProcessorCollator(processor, image_ids)(samples)
    records = json.load(open(data[0]))
    for b in range(len(samples)):
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        supervised = processor.tokenizer.decode(ids[labels != -100])
        answer = records[b]["conversations"][1]["value"]
        assert supervised.strip().startswith(answer), (supervised, answer)
        # Nothing of the prompt, the images or the padding is supervised.
        assert not torch.isin(ids[labels != -100], torch.tensor(image_ids)).any()
        want = [i for i, token in enumerate(ids.tolist()) if token in image_ids]
        got = batch["visual_index"][b]
        assert got[:len(want)].tolist() == want and (got[len(want):] == -1).all()
    counts = (batch["visual_index"] >= 0).sum(1).tolist()
    assert counts[1] > counts[0] or name == "llava_onevision"  # OneVision tiles single images only


def test_bad_samples_are_named(tmp_path, data):
    _, images = data
    records = [
        {"id": "good", "image": ["000_0.png"], "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                 {"from": "gpt", "value": "a"}]},
        {"id": "two-placeholders", "image": "000_0.png", "conversations": [
            {"from": "human", "value": "<image><image> q"}, {"from": "gpt", "value": "a"}]},
        {"id": "no-file", "image": "nope.png", "conversations": [{"from": "human", "value": "q"},
                                                                {"from": "gpt", "value": "a"}]},
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BadSample, match="two-placeholders.*2 <image> placeholders for 1 images"):
        ProcessorDataset(str(path), images)
    dataset = ProcessorDataset(str(path), images, on_bad_sample="skip")
    assert len(dataset) == 1 and dataset.report.kept == 1 and dataset.report.total == 3
    assert dataset.report.examples["missing image"] == ["no-file"]
    # An image without placeholder goes before the first user turn's text.
    messages = structured_messages([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], 2)
    assert [item["type"] for item in messages[0]["content"]] == ["image", "image", "text"]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava_onevision", "internvl", "idefics3", "llava"])
def test_distill_vlm_tiny_learns_and_saves(name, tmp_path, capsys):
    """The command distils a tiny pair on generated data of mixed sizes: the loss goes down, the run is
    reproducible, and the saved student loads back strictly with the trained weights."""
    if FAMILIES[name].missing_requirements():
        pytest.skip(f"{name}'s processor needs {FAMILIES[name].missing_requirements()}")
    argv = ["--tiny", name, "--steps", "12", "--lr", "3e-3", "--student-layers", "0,1", "--teacher-layers", "0,1,2,3",
            "--backend", "torch"]
    first = distill_vlm.run(distill_vlm.build_parser().parse_args(argv + ["--output", str(tmp_path / "a")]))
    losses = [step["loss"] for step in first["history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    assert all(step["vat"] > 0 for step in first["history"])
    again = distill_vlm.run(distill_vlm.build_parser().parse_args(argv + ["--output", str(tmp_path / "b")]))
    assert again["history"] == first["history"]
    loaded = load_vlm(first["final"])
    assert loaded.family is FAMILIES[name]
    assert not os.path.exists(first["final"] + ".tmp")


def test_distill_vlm_errors(tmp_path, capsys):
    assert distill_vlm.main(["--output", str(tmp_path)]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert distill_vlm.main(["--tiny", "llava", "--output", str(tmp_path), "--losses", "lm=1,foo=2"]) == 2
    assert "--losses" in capsys.readouterr().err
