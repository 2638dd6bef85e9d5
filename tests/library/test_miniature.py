"""The miniature reproduction (`--pipeline ablations`): per-patch vision pre-training, the variant
configs, the results arithmetic, and the whole pipeline at smoke scale, resumed without redoing work."""
from __future__ import annotations

import json
import os

import pytest
import torch

from compodistill import miniature
from compodistill.config import load_config
from compodistill.data.scenes import make_scene
from compodistill.data.synth import generate
from compodistill.models import build_preset

pytestmark = pytest.mark.filterwarnings("ignore")


def test_patch_targets_name_each_cell_of_the_grid():
    scene = make_scene([("blue", "square", "large", 0, 3), ("red", "circle", "small", 2, 1)])
    target = miniature.patch_targets(scene, ["red", "green", "blue"], ["circle", "square"], 4)
    assert target.shape == (5, 16)
    assert target[:3, 3].tolist() == [3, 2, 2]    # blue (3rd colour), square (2nd shape), large
    assert target[:3, 9].tolist() == [1, 1, 1]    # row 2, col 1 → patch 9: red circle, small
    assert target[:3].sum(dim=0).nonzero().flatten().tolist() == [3, 9]
    assert target[3].tolist() == [r for r in range(4) for _ in range(4)]
    assert target[4].tolist() == list(range(4)) * 4
    with pytest.raises(ValueError, match="grid"):
        miniature.patch_targets(make_scene([("red", "circle", "small", 0, 0)], grid=2), ["red"], ["circle"], 4)


def test_vision_pretraining_learns_per_patch_attributes_at_unit_scale(tmp_path):
    generate(tmp_path / "data", seed=3, num_train=160, num_test=4, colors=list(miniature.COLORS),
             shapes=list(miniature.SHAPES))
    mllm = build_preset("tiny-teacher", seed=0)
    record = miniature.pretrain_vision_tower(mllm, str(tmp_path / "data"), steps=120, batch_size=32, progress=False)
    accuracy = record["accuracy"]
    assert accuracy["color"] > 0.95 and accuracy["shape"] > 0.9 and accuracy["row"] > 0.9, accuracy
    scene = json.loads(open(tmp_path / "data" / "scenes" / "train.jsonl").readline())
    from compodistill.data.images import load_image, pixel_values

    pixels = pixel_values(mllm.image_processor, [load_image(str(tmp_path / "data" / "images" / scene["image"]))])
    with torch.no_grad():
        features = mllm.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    assert 0.5 < features.pow(2).mean().item() < 2.0  # kept near unit mean square for the LM on top


@pytest.mark.parametrize("name", list(miniature.VARIANTS))
def test_every_variant_is_a_valid_stage_config(name, tmp_path):
    config_name, overrides = miniature.VARIANTS[name]
    config = load_config(config_name, [f"output_dir={tmp_path}", "model.path=tiny-student",
                                       f"model.teacher={tmp_path}/teacher"] + overrides)
    weights = config.losses
    assert weights.lm == 1.0
    assert (weights.kd > 0) == (name != "SFT")
    assert (weights.vat > 0) == ("VAT" in name)
    assert config.model.taf == ("TAF" in name)


def test_ordering_checks_compare_differences_with_the_seed_spread():
    def row(mean, std):
        return {"cr_average": (mean, std)}

    rows = {"SFT": row(0.60, 0.01), "KD only": row(0.61, 0.01), "TAF only": row(0.62, 0.01),
            "VAT only": row(0.63, 0.04), "CompoDistill (VAT+TAF)": row(0.66, 0.01),
            "VAT+TAF, simple matching": row(0.655, 0.01)}
    checks = {c["claim"]: c for c in miniature._ordering_checks({"cr_average": 0.70}, rows)}
    assert checks["teacher > CompoDistill (VAT+TAF)"]["holds"]
    assert checks["CompoDistill (VAT+TAF) > KD only"]["holds"]
    assert checks["CompoDistill (VAT+TAF) > VAT only"]["difference"] == pytest.approx(0.03)
    assert not checks["CompoDistill (VAT+TAF) > VAT only"]["holds"]          # 3 points, spread 4
    assert not checks["CompoDistill (VAT+TAF) > VAT+TAF, simple matching"]["holds"]
    assert miniature._mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213), rel=1e-5)


def test_ablation_pipeline_smoke_writes_the_table_figures_and_resumes(tmp_path, monkeypatch):
    # Three of the eight students keep CI fast; every variant's config is checked above.
    kept = ("SFT", "KD only", "CompoDistill (VAT+TAF)")
    monkeypatch.setattr(miniature, "VARIANTS", {k: v for k, v in miniature.VARIANTS.items() if k in kept})
    root, results = tmp_path / "run", tmp_path / "results" / "miniature.md"
    summary = miniature.run_ablations(str(root), scale="smoke", results=str(results), progress=False)
    text = results.read_text()
    for name in kept:
        assert f"| {name} |" in text
    assert "Teacher bar" in text and "| CompoDistill (VAT+TAF) > KD only |" in text
    stored = json.loads((tmp_path / "results" / "miniature.json").read_text())
    assert set(stored["rows"]) == set(kept)
    for name in miniature.ANALYSED:
        folder = tmp_path / "results" / "miniature" / f"{miniature._slug(name)}-seed0"
        for f in ("layer_similarity.csv", "answer_probability.png", "intervention.json", "heatmap.png"):
            assert (folder / f).is_file()
    assert (tmp_path / "results" / "miniature" / "layer_similarity_kd_vs_compodistill.png").is_file()
    for name in kept:   # every run evaluated on the same items
        counts = summary["rows"][name]["per_seed"]["0"]["cr_count"]
        assert counts == summary["teacher"]["cr_count"]

    # Resuming finds every model and evaluation on disk: nothing retrains, the numbers are the same.
    students_before = json.loads((root / "timings.json").read_text())["students"]
    again = miniature.run_ablations(str(root), scale="smoke", results=str(results), progress=False)
    assert json.loads((root / "timings.json").read_text())["students"] == students_before
    assert again["rows"]["CompoDistill (VAT+TAF)"]["cr_average"] == summary["rows"]["CompoDistill (VAT+TAF)"]["cr_average"]


def test_bad_scale_and_seeds_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        miniature.run_ablations(str(tmp_path), scale="huge")
    with pytest.raises(ValueError, match="seeds"):
        miniature.run_ablations(str(tmp_path), scale="smoke", seeds=[1, 1])
