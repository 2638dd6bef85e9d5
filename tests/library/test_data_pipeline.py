"""The data pieces working together from a clean folder: the generator writes a benchmark,
the LLaVA loader and collator feed a distillation step from it, `python -m compodistill.evaluate`
scores a tiny model on it and `python -m compodistill.analyze` plots from it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from compodistill.data.llava import LlavaDataset, build_collator
from compodistill.distill import DistillConfig, Distiller, VATConfig

from .model_helpers import tiny_pair

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def bench(tiny_benchmark):
    return tiny_benchmark[0]


@pytest.mark.parametrize("name", ["llava_pretrain.json", "llava_instruct.json"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_generated_training_data_feeds_a_distillation_step(bench, tmp_path, name, padding):
    teacher, student = tiny_pair()
    data = LlavaDataset(str(bench / name), str(bench / "images"), student, max_length=256, cache_dir=str(tmp_path))
    assert data.report.kept == data.report.total == 64 and not data.report.skipped
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=build_collator(student, padding))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    distiller = Distiller(student, teacher, DistillConfig(vat=VATConfig(query_rows="answer")), backend="torch")
    losses = distiller({k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
    assert set(losses) == {"lm", "kd", "vat", "loss"} and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()


def _run(module, *args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_evaluate_cli_scores_a_tiny_model_on_the_generated_benchmark(bench, tmp_path):
    out = tmp_path / "eval"
    stdout = _run("compodistill.evaluate", "--model", "tiny-teacher", "--cr", bench / "cr", "--vqa",
                  bench / "vqa" / "questions.jsonl", "--hallucination", bench / "hallucination" / "questions.jsonl",
                  "--limit", "4", "--backend", "torch", "--out", out, cwd=tmp_path)
    results = json.loads((out / "eval.json").read_text())
    text = json.dumps(results)
    for subset in ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att"):
        assert subset in text and subset in stdout
    assert "f1" in text and "accuracy" in text
    assert (out / "eval.md").read_text().strip()


def test_analyze_cli_plots_from_the_generated_benchmark(bench, tmp_path):
    out = tmp_path / "analysis"
    _run("compodistill.analyze", "--teacher", "tiny-teacher", "--student", "tiny-student", "--cr", bench / "cr",
         "--subsets", "swap_att,replace_rel", "--limit", "2", "--backend", "torch", "--out", out, cwd=tmp_path)
    for name in ("layer_similarity.csv", "layer_similarity.png", "answer_probability.csv", "answer_probability.png",
                 "intervention.json", "heatmap.png"):
        assert (out / name).stat().st_size > 0, name
