"""Attention analysis on tiny models: layer-wise similarity, answer probability by similarity, the
paper's intervention and the heat map, written as CSV, JSON and PNG."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from compodistill.analyze import analyze, bin_by_similarity, intervention_accuracy, depth_matches, main
from compodistill.models import enable_compodistill_attention

from .model_helpers import tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass
class Item:
    id: str
    image_path: str
    caption: str
    negative: str


def _items(tmp_path, n=3):
    items = []
    for i in range(n):
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        image.paste((200, 20, 20), (4 + 10 * i, 8, 20 + 10 * i, 24))
        image.paste((20, 20, 200), (36, 36 - 5 * i, 60, 60 - 5 * i))
        path = tmp_path / f"scene{i}.png"
        image.save(path)
        items.append(Item(f"item{i}", str(path), "a red square above a blue square",
                          "a blue square above a red square"))
    return items


def _pair(same=False):
    teacher = tiny("tiny-teacher", 1)
    student = tiny("tiny-teacher", 1) if same else tiny("tiny-student", 2)
    for mllm in (teacher, student):
        enable_compodistill_attention(mllm.model.eval(), backend="torch")
    return teacher, student


def test_analysis_writes_csv_json_and_png(tmp_path):
    teacher, student = _pair()
    items = _items(tmp_path)
    result = analyze(teacher, student, items, tmp_path / "out", layers=[1, 2])
    out = tmp_path / "out"
    with open(out / "layer_similarity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["student_layer"]) for r in rows] == [0, 1, 2, 3]
    assert [int(r["teacher_layer"]) for r in rows] == [0, 2, 4, 6]  # depth-matched, 4 of 8
    for r in rows:
        for keys in ("visual_keys", "text_keys"):
            assert -1.0 <= float(r[keys]) <= 1.0 + 1e-6
    with open(out / "answer_probability.csv") as f:
        bins = list(csv.DictReader(f))
    assert sum(int(b["count"]) for b in bins) == 2 * len(items)
    assert all(0.0 <= float(b["mean_probability"]) <= 1.0 for b in bins if int(b["count"]))
    intervention = json.loads((out / "intervention.json").read_text())
    assert intervention["prompts"] == 2 * len(items) and intervention["layers"] == [1, 2]
    for key in ("baseline", "intervened"):
        assert 0.0 <= intervention[key] <= 1.0
    for name in ("layer_similarity.png", "answer_probability.png", "heatmap.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 300 and png.height > 200
    assert result["prompts"] == 2 * len(items)


def test_a_student_identical_to_its_teacher_has_similarity_one(tmp_path):
    teacher, student = _pair(same=True)
    result = analyze(teacher, student, _items(tmp_path, 2), tmp_path / "out", layers=[3])
    for keys, values in result["layer_similarity"].items():
        # depth matching maps layer l to l when both have 8 layers
        assert all(math.isclose(v, 1.0, abs_tol=1e-5) for v in values.values()), keys


def test_intervention_with_zero_teacher_weight_changes_nothing(tmp_path):
    teacher, student = _pair()
    items = _items(tmp_path, 2)
    with torch.inference_mode():
        result = intervention_accuracy(teacher, student, items, [1, 2], depth_matches(student, teacher), mix=0.0)
    assert result["baseline"] == result["intervened"]


def test_binning_counts_and_averages():
    bins = bin_by_similarity([(0.0, 0.2), (0.1, 0.4), (0.95, 0.9), (1.0, 1.0)], num_bins=2)
    assert [b["count"] for b in bins] == [2, 2]
    assert math.isclose(bins[0]["mean_probability"], 0.3) and math.isclose(bins[1]["mean_probability"], 0.95)
    empty = bin_by_similarity([(0.0, 0.5), (1.0, 0.7)], num_bins=3)
    assert empty[1]["count"] == 0 and math.isnan(empty[1]["mean_probability"])


def test_cli_on_a_sugarcrepe_folder(tmp_path):
    items = _items(tmp_path, 2)
    cr = tmp_path / "cr"
    cr.mkdir()
    (tmp_path / "images").mkdir()
    entries = {}
    for i, item in enumerate(items):
        target = tmp_path / "images" / f"scene{i}.png"
        target.write_bytes(open(item.image_path, "rb").read())
        entries[str(i)] = {"filename": f"scene{i}.png", "caption": item.caption, "negative_caption": item.negative}
    (cr / "swap_att.json").write_text(json.dumps(entries))
    result = main(["--teacher", "tiny-teacher", "--student", "tiny-student", "--cr", str(cr), "--out",
                   str(tmp_path / "cli"), "--backend", "torch", "--limit", "2"])
    assert (tmp_path / "cli" / "heatmap.png").is_file() and result["prompts"] == 4
