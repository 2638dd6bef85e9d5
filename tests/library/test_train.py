"""The trainer: every stage trains from YAML, only the intended parameters change, resumed runs continue
the same loss curve, partial checkpoints are never loaded, two processes match one, bad configs fail."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from compodistill.models import apply_taf, build_preset
from compodistill.training import Recipe, latest_checkpoint, load_config, read_metrics

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_benchmark):
    """Tiny benchmark data, a saved teacher and a saved TAF student (what DPT hands to DFT)."""
    root = tmp_path_factory.mktemp("train")
    os.symlink(tiny_benchmark[0], root / "data")
    teacher = build_preset("tiny-teacher", seed=1)
    teacher.save_pretrained(root / "teacher")
    student = build_preset("tiny-student", seed=2)
    apply_taf(student, teacher)
    student.save_pretrained(root / "taf-student")
    return root


def _overrides(world, out, *extra, data="llava_instruct"):
    return [f"output_dir={out}", f"data.json={world}/data/{data}.json", f"data.image_folder={world}/data/images",
            f"model.teacher={world}/teacher", "train.batch_size=8", "train.log_every=1", "optim.lr=3e-3",
            "optim.warmup_ratio=0", "optim.scheduler=constant", "data.max_length=256", "log.tensorboard=false",
            "log.plot=false", "lora.r=8", "lora.alpha=16", "lora.dropout=0", "train.global_batch_size=null", *extra]


STAGES = {
    "teacher-pretrain": ["model.path=tiny-teacher", "model.teacher=null"],
    "teacher-finetune": ["model.path=tiny-teacher", "model.teacher=null"],
    "dpt": ["model.path=tiny-student"],
    "dft": ["model.path={world}/taf-student", "vat.student_layers=[1,2]", "vat.teacher_layers=[2,3,4,5]"],
    "sft": ["model.path={world}/taf-student"],
    "baseline-sft": ["model.path=tiny-student"],
    "baseline-kd": ["model.path=tiny-student"],
}
# What may change in each stage (the YAML's `trainable`), as state-dict key fragments.
EXPECTED_CHANGES = {
    "teacher-pretrain": ("multi_modal_projector.",),
    "teacher-finetune": ("multi_modal_projector.", "language_model.", "lm_head."),
    "dpt": ("multi_modal_projector.post.",),
    "dft": ("lora_", "multi_modal_projector.post."),
    "sft": ("lora_", "multi_modal_projector.post."),
    "baseline-sft": ("multi_modal_projector.", "lora_"),
    "baseline-kd": ("multi_modal_projector.", "lora_"),
}


def _student_state(recipe):
    model = recipe.accelerator.unwrap_model(recipe.distiller).student
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_trains_only_its_parameters_and_its_loss_drops(world, tmp_path, stage):
    extra = [o.format(world=world) for o in STAGES[stage]]
    data = "llava_pretrain" if stage in ("teacher-pretrain", "dpt") else "llava_instruct"
    config = load_config(stage, _overrides(world, tmp_path / stage, "train.max_steps=12", *extra, data=data))
    recipe = Recipe(config, progress=False).setup()
    before = _student_state(recipe)
    result = recipe.train()
    after = _student_state(recipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    allowed = EXPECTED_CHANGES[stage]
    assert all(any(part in k for part in allowed) for k in changed), sorted(changed)[:5]
    assert not any("fetched" in k or "vision_tower" in k for k in changed)  # TAF's teacher part and SigLIP stay
    losses = [r["loss"] for r in read_metrics(result.metrics)]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, losses
    assert os.path.isfile(os.path.join(result.final, "config.json"))


def test_final_model_loads_with_lora_merged(world, tmp_path):
    from compodistill.models import load_pretrained

    config = load_config("sft", _overrides(world, tmp_path / "sft", "train.max_steps=3",
                                           f"model.path={world}/taf-student"))
    recipe = Recipe(config, progress=False).setup()
    result = recipe.train()
    loaded = load_pretrained(result.final)
    assert not any("lora" in k for k in loaded.model.state_dict())
    peft_model = recipe.accelerator.unwrap_model(recipe.distiller).student
    batch = next(iter(recipe.loader))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.allclose(peft_model(**inputs).logits, loaded.model(**inputs).logits, atol=1e-4)


def _curve(path):
    return [(r["step"], r["loss"]) for r in read_metrics(path)]


def test_interrupted_and_resumed_run_continues_the_same_curve(world, tmp_path, monkeypatch):
    args = ("train.max_steps=10", "checkpoint.every=4", "model.path=tiny-student", "train.batch_size=6")
    straight = Recipe(load_config("dpt", _overrides(world, tmp_path / "a", *args, data="llava_pretrain")),
                      progress=False).run()

    config = load_config("dpt", _overrides(world, tmp_path / "b", *args, data="llava_pretrain"))
    recipe = Recipe(config, progress=False).setup()
    original = recipe._loss_step

    def loss_step_then_sigterm(batch):
        if recipe.step == 6:  # a SIGTERM arriving during step 7
            os.kill(os.getpid(), signal.SIGTERM)
        return original(batch)

    monkeypatch.setattr(recipe, "_loss_step", loss_step_then_sigterm)
    interrupted = recipe.train()
    assert interrupted.status == "interrupted" and interrupted.step == 7
    assert latest_checkpoint(str(tmp_path / "b")).endswith("step-000007")

    # A partial checkpoint (temporary folder) and a newer folder without its state file are ignored.
    root = tmp_path / "b" / "checkpoints"
    (root / ".tmp-step-000008").mkdir()
    (root / "step-000009").mkdir()
    resumed = Recipe(load_config("dpt", _overrides(world, tmp_path / "b", *args, data="llava_pretrain")),
                     resume=True, progress=False).run()
    assert resumed.status == "finished"
    a, b = _curve(straight.metrics), _curve(resumed.metrics)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 11))
    assert torch.allclose(torch.tensor([x for _, x in a]), torch.tensor([x for _, x in b]), rtol=1e-5, atol=1e-6)


def _cli(*args, cwd, env_extra=None, launcher=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    command = (launcher or [sys.executable, "-m"]) + ["compodistill.train", *map(str, args)]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_until_checkpoint(args, folder, step, cwd):
    """Start the CLI, SIGKILL it once the checkpoint of `step` is complete (no handler runs: whatever was
    being written stays half-written)."""
    proc = _cli(*args, cwd=cwd)
    target = folder / "checkpoints" / f"step-{step:06d}"
    deadline = time.time() + 600
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    out, _ = proc.communicate()
    assert target.is_dir(), out[-3000:]


def _exact_curve(path):
    return [(r["step"], r["loss"], r.get("vat")) for r in read_metrics(path)]


@pytest.fixture(scope="module")
def dropout_runs(world, tmp_path_factory):
    """A DFT run with LoRA dropout 0.05, uninterrupted, and the same run killed (SIGKILL) after its step-8
    checkpoint: (uninterrupted run folder, killed run folder, its CLI arguments)."""
    root = tmp_path_factory.mktemp("dropout")

    def args(out):
        overrides = [o for o in _overrides(world, out, "train.max_steps=12", "checkpoint.every=4", "checkpoint.keep=3",
                                           "train.batch_size=4", f"model.path={world}/taf-student",
                                           "vat.student_layers=[1,2]", "vat.teacher_layers=[2,3,4,5]")
                     if o != "lora.dropout=0"]
        return ["--config", "dft", *overrides, "lora.dropout=0.05", "--no-progress"]  # options after overrides

    straight = _cli(*args(root / "straight"), cwd=root)
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out[-3000:]
    _run_until_checkpoint(args(root / "killed"), root / "killed", 8, cwd=root)
    return root / "straight", root / "killed", args(root / "killed")


def test_killed_run_with_dropout_resumes_to_the_identical_curve(dropout_runs, tmp_path):
    straight, killed, args = dropout_runs
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    args = [a.replace(str(killed), str(run)) for a in args]
    done = _cli(*args, "--resume", cwd=tmp_path)
    out, _ = done.communicate(timeout=900)
    assert done.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step-000008" in out
    # bit for bit: every logged loss of the resumed run equals the uninterrupted one (dropout included)
    assert _exact_curve(run / "metrics.jsonl") == _exact_curve(straight / "metrics.jsonl")
    assert [s for s, _, _ in _exact_curve(run / "metrics.jsonl")] == list(range(1, 13))


def test_a_damaged_newest_checkpoint_is_skipped_by_name(dropout_runs, tmp_path):
    straight, killed, args = dropout_runs
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    args = [a.replace(str(killed), str(run)) for a in args]
    weights = run / "checkpoints" / "step-000008" / "model.safetensors"
    with open(weights, "r+b") as f:  # as a full disk or a half-copied folder leaves it
        f.truncate(weights.stat().st_size // 3)
    done = _cli(*args, "--resume", cwd=tmp_path)
    out, _ = done.communicate(timeout=900)
    assert done.returncode == 0, out[-3000:]
    assert "skipping damaged checkpoint" in out and str(weights) in out and "step-000004" in out
    assert _exact_curve(run / "metrics.jsonl") == _exact_curve(straight / "metrics.jsonl")


def test_resume_fails_clearly_when_every_checkpoint_is_damaged(dropout_runs, tmp_path):
    _, killed, args = dropout_runs
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    args = [a.replace(str(killed), str(run)) for a in args]
    for manifest in (run / "checkpoints").glob("step-*/checkpoint.json"):
        manifest.unlink()
    done = _cli(*args, "--resume", cwd=tmp_path)
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 2, out[-3000:]
    assert "no usable checkpoint" in out and "checkpoint.json is missing" in out and "Traceback" not in out


def test_cli_takes_options_and_overrides_in_any_order():
    from compodistill.train import build_parser

    args = build_parser().parse_intermixed_args(["--config", "dft", "--no-progress", "optim.lr=1e-4", "--resume",
                                                  "train.max_steps=3"])
    assert args.config == "dft" and args.no_progress and args.resume
    assert args.overrides == ["optim.lr=1e-4", "train.max_steps=3"]


def test_cli_refuses_options_of_another_mode(tmp_path):
    proc = _cli("--config", "dft", "--quick", cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--quick applies to demo" in out


def test_global_batch_size_sets_the_accumulation(world, tmp_path):
    from compodistill.training.config import grad_accum_steps

    config = load_config("dft", ["train.batch_size=4", "train.global_batch_size=16"])
    assert grad_accum_steps(config, 1) == 4 and grad_accum_steps(config, 2) == 2 and grad_accum_steps(config, 4) == 1
    with pytest.raises(ValueError, match="train.global_batch_size"):
        grad_accum_steps(config, 3)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        load_config("dft", ["train.batch_size=4", "train.global_batch_size=10"])
    with pytest.raises(ValueError, match="train.grad_accum"):
        load_config("dft", ["train.batch_size=4", "train.global_batch_size=16", "train.grad_accum=2"])


@pytest.mark.parametrize("name", ["dpt", "dft", "sft"])
def test_packaged_stage_configs_carry_the_published_hyper_parameters(name):
    config = load_config(name)
    assert config.optim.lr == 2e-4 and config.optim.weight_decay == 0.0 and config.optim.warmup_ratio == 0.03
    assert config.optim.scheduler == "cosine" and config.train.epochs == 1 and config.data.max_length == 1536
    assert config.train.global_batch_size == {"dpt": 256, "dft": 128, "sft": 192}[name]
    if name != "dpt":
        assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (128, 256, 0.05)
    assert (config.losses.lm, config.losses.kd, config.losses.vat) == {
        "dpt": (1.0, 1.0, 0.0), "dft": (1.0, 1.0, 1.0), "sft": (1.0, 0.0, 0.0)}[name]


def test_two_processes_match_one_at_the_same_global_batch(world, tmp_path):
    common = ["--no-progress", "--config", "baseline-kd"]
    one = _cli(*common, *_overrides(world, tmp_path / "one", "train.max_steps=6", "model.path=tiny-student",
                                    "train.batch_size=8"), cwd=tmp_path)
    # accelerate's `--cpu` launcher starts one process; torchrun-style launching with ACCELERATE_USE_CPU
    # gives two CPU processes joined by gloo (accelerate's MULTI_CPU).
    two = _cli(*common, *_overrides(world, tmp_path / "two", "train.max_steps=6", "model.path=tiny-student",
                                    "train.batch_size=4"), cwd=tmp_path, env_extra={"ACCELERATE_USE_CPU": "true"},
               launcher=[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"])
    outputs = []
    for proc in (one, two):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        outputs.append(out)
    assert "global batch 8 (1 process(es) × 8" in outputs[0], outputs[0][-3000:]
    assert "global batch 8 (2 process(es) × 4" in outputs[1], outputs[1][-3000:]
    a, b = _curve(tmp_path / "one" / "metrics.jsonl"), _curve(tmp_path / "two" / "metrics.jsonl")
    assert [s for s, _ in a] == [s for s, _ in b]
    # Each process averages its own tokens, so the two-process mean of means differs slightly from the
    # one-process mean; the curves agree closely, step by step.
    assert torch.allclose(torch.tensor([x for _, x in a]), torch.tensor([x for _, x in b]), rtol=5e-3)


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], "optim.lrr: unknown key"),
    (["train.batch_size=eight"], "train.batch_size: expected int"),
    (["trainable=[lora,lm]"], "trainable"),
    (["model.teacher=null"], "model.teacher"),
    (["losses.kd=-1"], "losses.kd"),
    (["vat.matching=best"], "vat.matching"),
    (["kd.kind=kl"], "kd.kind"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio"),
    (["nonsense"], "key=value"),
])
def test_bad_configs_fail_at_once_naming_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("dft", overrides)


def test_impossible_layer_matching_fails_before_training(world, tmp_path):
    config = load_config("dft", _overrides(world, tmp_path / "x", f"model.path={world}/taf-student",
                                           "vat.student_layers=[9]"))
    with pytest.raises(ValueError, match="vat.student_layers"):
        Recipe(config, progress=False).setup()


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    proc = _cli("--config", "dft", "optim.lrr=1", cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "optim.lrr: unknown key" in out and "Traceback" not in out


def test_learning_rate_schedule_warms_up_then_decays():
    from compodistill.training import lr_lambda

    cosine = lr_lambda("cosine", warmup=4, total=20)
    values = [cosine(step) for step in range(20)]
    assert values[:4] == sorted(values[:4]) and values[3] < 1.0  # linear warmup
    assert values[4] == 1.0 and values[4:] == sorted(values[4:], reverse=True) and values[-1] < 0.05
    assert lr_lambda("constant", 0, 10)(7) == 1.0
    assert abs(lr_lambda("linear", 0, 10)(5) - 0.5) < 1e-9


def test_gradient_accumulation_matches_the_larger_batch(world, tmp_path):
    curves = []
    for name, extra in (("big", ["train.batch_size=8"]), ("accum", ["train.batch_size=4", "train.grad_accum=2"])):
        config = load_config("baseline-kd", _overrides(world, tmp_path / name, "train.max_steps=5",
                                                       "model.path=tiny-student", *extra))
        curves.append(_curve(Recipe(config, progress=False).run().metrics))
    (a, b) = curves
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5]
    # Each micro-batch averages its own tokens, so the accumulated loss is a mean of two means.
    assert torch.allclose(torch.tensor([x for _, x in a]), torch.tensor([x for _, x in b]), rtol=5e-3)


def test_pipeline_chains_stages_from_each_previous_final_model(world, tmp_path):
    from compodistill.models import build_preset as preset
    from compodistill.train import main

    root = tmp_path / "runs"
    preset("tiny-teacher", seed=1).save_pretrained(root / "teacher-finetune" / "final")
    overrides = [o for o in _overrides(world, root / "unused", "train.max_steps=2")
                 if not o.startswith(("output_dir=", "model.teacher="))]  # the pipeline sets these
    assert main(["--pipeline", "compodistill", "--root", str(root), "--no-progress", *overrides]) == 0
    import yaml

    for stage, source in (("dpt", "tiny-student"), ("dft", f"{root}/dpt/final"), ("sft", f"{root}/dft/final")):
        assert (root / stage / "final" / "config.json").is_file()
        saved = yaml.safe_load((root / stage / "config.yaml").read_text())
        assert saved["model"]["path"] == source and saved["output_dir"] == f"{root}/{stage}"
    # --resume skips finished stages
    assert main(["--pipeline", "compodistill", "--root", str(root), "--no-progress", "--resume", *overrides]) == 0


def test_logged_losses_are_means_over_the_logging_window(world, tmp_path):
    """With log_every > 1 (and accumulation), each logged loss is the mean of the window's micro-batch
    losses, not their sum: the same run logged every step and every 3 steps agree."""
    every = _overrides(world, tmp_path / "every", "model.path=tiny-teacher", "model.teacher=null",
                       "train.max_steps=6", "train.grad_accum=2", "train.batch_size=4")
    window = [o.replace("train.log_every=1", "train.log_every=3") for o in
              _overrides(world, tmp_path / "window", "model.path=tiny-teacher", "model.teacher=null",
                         "train.max_steps=6", "train.grad_accum=2", "train.batch_size=4")]
    Recipe(load_config("teacher-finetune", every), progress=False).run()
    Recipe(load_config("teacher-finetune", window), progress=False).run()
    per_step = [r["lm"] for r in read_metrics(tmp_path / "every" / "metrics.jsonl")]
    logged = [r["lm"] for r in read_metrics(tmp_path / "window" / "metrics.jsonl")]
    assert len(per_step) == 6 and len(logged) == 2
    for k, value in enumerate(logged):
        assert value == pytest.approx(sum(per_step[3 * k:3 * k + 3]) / 3, rel=1e-4)
