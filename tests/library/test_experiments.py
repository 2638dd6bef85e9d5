"""The miniature experiment (compodistill.experiments): vision pre-training targets and accuracy, the
typed stage configs of every variant, the claims arithmetic, and the whole pipeline at smoke scale,
resumed without redoing work."""
from __future__ import annotations

import json

import pytest
import torch

from compodistill.data.synth import generate_miniature
from compodistill.experiments import miniature, report
from compodistill.experiments.vision import patch_targets, pretrain_vision_tower, read_scenes
from compodistill.models import build_preset, parts
from compodistill.models.vision import vision_features

pytestmark = pytest.mark.filterwarnings("ignore")
VOCABULARY = {"colors": ["red", "green", "blue"], "shapes": ["circle", "square"], "sizes": ["small", "large"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments") / "data"
    summary = generate_miniature(str(out), seed=3, num_train=160, num_test=30)
    return out, summary


def test_patch_targets_name_each_cell_of_the_grid():
    scene = {"id": "s", "grid": 4, "objects": [
        {"color": "blue", "shape": "square", "size": "large", "cell": [0, 3]},
        {"color": "red", "shape": "circle", "size": "small", "cell": [2, 1]}]}
    target = patch_targets(scene, VOCABULARY, 4)
    assert target.shape == (3, 16)
    assert target[:, 3].tolist() == [3, 2, 2]    # blue (3rd colour), square (2nd shape), large
    assert target[:, 9].tolist() == [1, 1, 1]    # row 2, col 1 → patch 9: red circle, small
    assert target.sum(dim=0).nonzero().flatten().tolist() == [3, 9]
    with pytest.raises(ValueError, match="grid"):
        patch_targets({**scene, "grid": 2}, VOCABULARY, 4)


def test_vision_pretraining_learns_per_patch_attributes_at_unit_scale(data):
    out, summary = data
    mllm = build_preset("miniature-teacher", seed=0)
    record = pretrain_vision_tower(mllm, str(out), summary["vocabulary"], steps=150, batch_size=32, progress=False)
    assert all(value > 0.9 for value in record["accuracy"].values()), record
    assert not any(p.requires_grad for p in parts.vision_tower(mllm).parameters())  # frozen afterwards
    scene = read_scenes(str(out), "test")[0]
    from compodistill.data.images import load_image, pixel_values

    pixels = pixel_values(mllm.image_processor, [load_image(str(out / "images" / scene["image"]))])
    with torch.no_grad():
        features = vision_features(mllm, pixels)
    assert features.shape == (1, 16, 64)
    assert 0.5 < features.pow(2).mean().item() < 2.0  # kept near unit mean square for the LM on top


@pytest.mark.parametrize("variant", miniature.VARIANTS, ids=lambda v: v.slug)
def test_every_variant_is_a_valid_stage_config(variant, tmp_path):
    scale = miniature.SCALES["smoke"]
    config = miniature.student_config(variant, 1, str(tmp_path), str(tmp_path / "data"), str(tmp_path / "t"), scale)
    assert (config.losses.lm, config.losses.kd > 0, config.losses.vat > 0) == (1.0, variant.kd, variant.vat)
    assert config.model.taf == variant.taf and config.model.vision_from_teacher and config.model.seed == 1
    assert config.seed == 1 and config.data.feature_cache and config.train.max_steps == scale.student_steps
    assert ("post_projector" in config.trainable) == variant.taf
    for key, value in variant.vat_changes.items():
        assert getattr(config.vat, key) == value
    # the same batches for every variant of a seed: only losses, projector and VAT settings differ
    other = miniature.student_config(miniature.VARIANTS[0], 1, str(tmp_path), str(tmp_path / "data"),
                                     str(tmp_path / "t"), scale)
    assert (other.seed, other.data, other.optim, other.train) == (config.seed, config.data, config.optim, config.train)


def test_claims_compare_differences_with_the_pooled_seed_spread():
    def row(mean, std):
        return {"cr_mean": mean, "cr_std": std}

    models = {"teacher": row(0.95, 0.0), "SFT": row(0.60, 0.02), "KD": row(0.61, 0.02), "KD + TAF": row(0.70, 0.05),
              "KD + VAT": row(0.885, 0.01), "CompoDistill": row(0.90, 0.01)}
    claims = {c["claim"]: c for c in miniature.check_claims(models)}
    assert claims["CompoDistill beats KD"]["holds"]
    assert claims["CompoDistill beats KD"]["pooled_std"] == pytest.approx(report.pooled_std(0.01, 0.02))
    assert claims["KD not below SFT"]["holds"]
    assert not claims["CompoDistill beats KD + VAT"]["holds"]          # 1.5 points, twice the spread is 2
    assert claims["teacher above the best student (CompoDistill)"]["holds"]
    assert report.mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213), rel=1e-5)
    assert report.binomial_se(0.5, 100) == pytest.approx(0.05)


def test_demo_smoke_writes_the_summary_and_resumes(tmp_path):
    from compodistill.experiments.demo import run_demo
    from compodistill.train import main

    root = tmp_path / "demo"
    assert main(["--quick", "--no-progress", "--root", str(root)]) == 0   # the main job, CI-sized
    summary = json.loads((root / "summary.json").read_text())
    assert summary["protocol"] == "likelihood" and summary["subsets"] == list(miniature.CR_SUBSETS)
    assert set(summary["models"]) == {"teacher", "SFT", "KD", "CompoDistill"}
    for row in summary["models"].values():
        assert set(row["cr"]) == set(summary["subsets"]) and all(0 <= v <= 1 for v in row["cr"].values())
        assert 0 <= row["cr_mean"] <= 1 and row["cr_std"] >= 0
        for path in row["paths"]:
            assert (root / path.split(str(root) + "/")[-1] / "config.json").is_file()
    assert (root / "results.md").read_text().count("| CompoDistill |") >= 1
    assert (root / "figures" / "cr_by_student_steps.png").is_file()
    assert (root / "figures" / "layer_similarity.png").is_file()
    # snapshots of the students at the scale's steps, scored for the learning curve
    assert (root / "seed0" / "compodistill" / "snapshots" / "step-000002" / "eval.json").is_file()

    students = json.loads((root / "timings.json").read_text())["students"]
    assert run_demo(str(root), quick=True, progress=False) == 0        # everything found on disk
    assert json.loads((root / "timings.json").read_text())["students"] == students
    again = json.loads((root / "summary.json").read_text())
    assert again["models"] == summary["models"]


def test_bad_scale_seeds_and_variants_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        miniature.run_ablations(str(tmp_path), scale="huge")
    with pytest.raises(ValueError, match="seeds"):
        miniature.run_miniature(str(tmp_path), scale=miniature.SCALES["smoke"], seeds=[1, 1])
    with pytest.raises(ValueError, match="variants"):
        miniature.variants_named(["KD", "Magic"])
