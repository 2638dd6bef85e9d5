"""The miniature reproduction: `python -m compodistill.train --pipeline ablations`.

The paper's claim in small: a teacher that binds attributes to objects and reads spatial relations;
students distilled from it with SFT, logit KD, TAF, VAT and VAT+TAF (CompoDistill), plus the matching
(simple vs group) and alignment-loss (cosine vs MSE vs KL) ablations, each over several seeds; every
model evaluated on the held-out compositional-reasoning (CR) subsets; the analysis figures beside.

1. Data: the procedural benchmark with a small vocabulary (4 colours × 4 shapes), objects snapped to
   the vision tower's 16 px patch cells, and at least 1,000 held-out test items per CR subset.
2. Vision tower: pre-trained on per-patch attributes (colour, shape, size, row, column of the object
   in each patch's cell), as real LLaVA starts from a pre-trained SigLIP. Its features are kept at
   unit mean square, so that the language model trained on top of them stays stable at lr 1e-3.
3. Teacher: tiny-teacher (8 layers) on top of that tower, instruction-tuned (projector + LM).
4. Students (tiny-student, 4 layers, the teacher's vision tower), one distillation stage each on the
   same data, steps and initialisation per seed, differing only in their losses and projector.
5. Evaluation (two-choice CR in both orders, VQA exact match) and `compodistill.analyze` figures.
6. `results/miniature.md` (and .json): mean ± standard deviation over seeds, the binomial standard
   error per subset, the commands and the time taken.

Every step is resumable: a finished model or evaluation is found on disk and not redone.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import load_config
from .data.scenes import CR_SUBSETS
from .models import parts

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
# The teacher must show the skills the students are meant to inherit (issue: ≥ 0.75 on both).
TEACHER_BAR = {"swap_att": 0.75, "replace_rel": 0.75}

SCALES = {
    # The committed results: ≥ 1,000 test items per CR subset, three seeds.
    "full": dict(num_train=4000, num_test=1500, vision_steps=400, vision_batch=64, teacher_steps=1500,
                 student_steps=400, batch=16, lr=1e-3, seeds=(0, 1, 2), cr_limit=None, vqa_limit=1000,
                 analysis_items=40),
    # CI's smoke test of the whole pipeline: every stage and file, in seconds; numbers are meaningless.
    "smoke": dict(num_train=48, num_test=24, vision_steps=4, vision_batch=8, teacher_steps=3, student_steps=2,
                  batch=4, lr=1e-3, seeds=(0,), cr_limit=3, vqa_limit=6, analysis_items=2),
}

# Each student: a stage config and overrides. All share lm + logit KD except the SFT baseline, as in the
# paper's ablation (its "none" row is LLaVA-KD); CompoDistill = VAT + TAF with group matching and cosine.
VARIANTS = {
    "SFT": ("baseline-sft", ["trainable=[projector,lm]"]),
    "KD only": ("baseline-kd", ["trainable=[projector,lm]"]),
    "TAF only": ("dft", ["trainable=[lm,post_projector]", "losses.vat=0"]),
    "VAT only": ("dft", ["trainable=[projector,lm]", "model.taf=false"]),
    "CompoDistill (VAT+TAF)": ("dft", ["trainable=[lm,post_projector]"]),
    "VAT+TAF, simple matching": ("dft", ["trainable=[lm,post_projector]", "vat.matching=simple"]),
    "VAT+TAF, MSE": ("dft", ["trainable=[lm,post_projector]", "vat.loss=mse"]),
    "VAT+TAF, KL": ("dft", ["trainable=[lm,post_projector]", "vat.loss=kl"]),
}
ANALYSED = ("KD only", "CompoDistill (VAT+TAF)")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# ---------------------------------------------------------------------------------------------------
# Vision-tower pre-training on per-patch attributes
# ---------------------------------------------------------------------------------------------------

def patch_targets(scene, colors, shapes, patches_per_side: int) -> torch.Tensor:
    """(5, P) class indices per patch: colour, shape, size (0 = empty cell), row, column."""
    if scene.grid != patches_per_side:
        raise ValueError(f"scene {scene.id}: grid {scene.grid} must equal the vision tower's patches per side "
                         f"({patches_per_side}) so that each object fills one patch")
    n = patches_per_side * patches_per_side
    target = torch.zeros(5, n, dtype=torch.long)
    target[3] = torch.arange(n) // patches_per_side
    target[4] = torch.arange(n) % patches_per_side
    for obj in scene.objects:
        cell = obj.row * patches_per_side + obj.col
        target[0, cell] = 1 + colors.index(obj.color)
        target[1, cell] = 1 + shapes.index(obj.shape)
        target[2, cell] = 1 + ("small", "large").index(obj.size)
    return target


def pretrain_vision_tower(mllm, data_dir: str, *, steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                          progress: bool = True) -> dict:
    """Train `mllm`'s vision tower in place to predict each patch's object attributes and position.

    Linear heads read the features LLaVA feeds its projector (the vision feature layer); they are
    dropped afterwards. A penalty (mean(h²) − 1)² keeps the features at unit mean square. Returns the
    final loss and per-head accuracy on the last batch.
    """
    from .data.images import load_image, pixel_values
    from .data.scenes import Scene

    with open(os.path.join(data_dir, "summary.json")) as f:
        vocab = json.load(f)["vocabulary"]
    colors, shapes = vocab["colors"], vocab["shapes"]
    with open(os.path.join(data_dir, "scenes", "train.jsonl")) as f:
        scenes = [Scene.from_dict(json.loads(line)) for line in f if line.strip()]
    vision_config = mllm.model.config.vision_config
    side = vision_config.image_size // vision_config.patch_size
    targets = torch.stack([patch_targets(s, colors, shapes, side) for s in scenes])
    images = pixel_values(mllm.image_processor,
                          [load_image(os.path.join(data_dir, "images", s.image), s.id) for s in scenes])
    tower = parts.vision_tower(mllm)
    layer = mllm.model.config.vision_feature_layer
    hidden = vision_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = torch.nn.ModuleList(torch.nn.Linear(hidden, k) for k in
                                    (1 + len(colors), 1 + len(shapes), 3, side, side))
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    tower.train()
    record = {}
    for step in tqdm(range(steps), desc="vision pre-training", disable=not progress):
        idx = torch.randint(0, len(scenes), (batch_size,), generator=generator)
        features = tower(images[idx], output_hidden_states=True).hidden_states[layer]
        logits = [head(features) for head in heads]
        classification = sum(F.cross_entropy(lg.flatten(0, 1), targets[idx, k].flatten()) for k, lg in enumerate(logits))
        loss = classification + 0.1 * (features.pow(2).mean() - 1.0).pow(2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == steps - 1:
            names = ("color", "shape", "size", "row", "col")
            record = {"loss": loss.item(), "steps": steps,
                      "accuracy": {n: (lg.argmax(-1) == targets[idx, k]).float().mean().item()
                                   for k, (n, lg) in enumerate(zip(names, logits))}}
    tower.eval()
    if not all(torch.isfinite(p).all() for p in tower.parameters()):
        raise FloatingPointError("vision pre-training produced non-finite weights")
    return record


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------

def _vision_stage(out: str, data: str, cfg: dict, progress: bool) -> None:
    from .models import build_preset

    mllm = build_preset("tiny-teacher", seed=0)
    record = pretrain_vision_tower(mllm, data, steps=cfg["vision_steps"], batch_size=cfg["vision_batch"],
                                   progress=progress)
    tmp = os.path.join(out, "final.tmp")
    mllm.save_pretrained(tmp)
    with open(os.path.join(tmp, "vision_pretrain.json"), "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(out, "final"))
    print(f"[ablations] vision tower: per-patch accuracy {record['accuracy']}")


def _done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "final", "config.json"))


class _Clock:
    """Seconds of real work per step of the pipeline, kept in <root>/timings.json across resumed runs
    (a step found finished on disk adds nothing)."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "timings.json")
        self.seconds = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.seconds = json.load(f)

    def add(self, key: str, seconds: float, *, replace: bool = False) -> None:
        self.seconds[key] = seconds if replace else self.seconds.get(key, 0.0) + seconds
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.seconds, f, indent=1)
        os.replace(self.path + ".tmp", self.path)

    def timed(self, key: str, done: bool, work):
        """Run work(); its time counts under `key` unless the result was already on disk (`done`)."""
        started = time.time()
        result = work()
        if not done:
            self.add(key, time.time() - started)
        return result


def _train(config_name: str, out: str, overrides: list[str], *, progress: bool) -> str:
    from .recipe import Recipe

    if _done(out):
        print(f"[ablations] {os.path.basename(out)}: already trained ({out}/final)")
        return os.path.join(out, "final")
    config = load_config(config_name, [f"output_dir={out}"] + overrides)
    result = Recipe(config, resume=True, progress=progress).run()
    if result["status"] != "finished":
        raise KeyboardInterrupt(f"{out} interrupted at step {result['step']}; run the same command again to resume")
    return result["final"]


def _evaluate(model_path: str, cr_items, vqa_items, out_json: str, *, progress: bool) -> dict:
    from .evaluate import evaluate_cr, evaluate_vqa
    from .models import enable_compodistill_attention, load_mllm

    if os.path.isfile(out_json):
        with open(out_json) as f:
            return json.load(f)
    mllm = load_mllm(model_path)
    enable_compodistill_attention(mllm.model.eval(), backend="auto")
    cr = evaluate_cr(mllm, cr_items, backend=None, progress=progress, batch_size=32)
    vqa = evaluate_vqa(mllm, vqa_items, backend=None, progress=progress, batch_size=32)
    result = {"model": model_path, "vqa": vqa["accuracy"], "vqa_count": vqa["count"],
              "cr": {s: cr["subsets"][s]["two_choice"] for s in CR_SUBSETS},
              "cr_count": {s: cr["subsets"][s]["count"] for s in CR_SUBSETS},
              "cr_average": cr["average"]["two_choice"]}
    tmp = out_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out_json)
    return result


def run_ablations(root: str = "runs/miniature", *, scale: str = "full", results: str = "results/miniature.md",
                  seeds=None, progress: bool = True, command: str | None = None) -> dict:
    """Run (or resume) the whole miniature reproduction and write `results` (+ .json and figures)."""
    from .data.benchmarks import read_sugarcrepe, read_vqa
    from .data.synth import generate

    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {sorted(SCALES)}, got {scale!r}")
    cfg = SCALES[scale]
    seeds = tuple(cfg["seeds"] if seeds is None else seeds)
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {list(seeds)}")
    os.makedirs(root, exist_ok=True)
    clock = _Clock(root)
    data = os.path.join(root, "data")
    if not os.path.isfile(os.path.join(data, "summary.json")):
        clock.timed("data", False, lambda: generate(data, seed=0, num_train=cfg["num_train"], num_test=cfg["num_test"],
                                                    colors=list(COLORS), shapes=list(SHAPES), overwrite=True))
    vision = os.path.join(root, "vision-pretrain")
    if not _done(vision):
        clock.timed("vision", False, lambda: _vision_stage(vision, data, cfg, progress))

    common = [f"train.batch_size={cfg['batch']}", f"optim.lr={cfg['lr']}", "train.log_every=25",
              "data.max_length=512", "checkpoint.every=200", "checkpoint.keep=1", "log.tensorboard=false",
              f"data.image_folder={data}/images", f"data.json={data}/llava_instruct.json"]
    out = os.path.join(root, "teacher")
    teacher = clock.timed("teacher", _done(out), lambda: _train(
        "teacher-finetune", out, common + [f"model.path={vision}/final", "trainable=[projector,lm]",
                                           f"train.max_steps={cfg['teacher_steps']}"], progress=progress))

    cr = read_sugarcrepe(os.path.join(data, "cr"))
    cr_items = [item for subset in CR_SUBSETS for item in cr[subset][:cfg["cr_limit"]]]
    vqa_items = read_vqa(os.path.join(data, "vqa", "questions.jsonl"), os.path.join(data, "images"),
                         os.path.join(data, "vqa", "answers.jsonl"))[:cfg["vqa_limit"]]

    def evaluate(path, out_json):
        return clock.timed("evaluation", os.path.isfile(out_json),
                           lambda: _evaluate(path, cr_items, vqa_items, out_json, progress=progress))

    teacher_eval = evaluate(teacher, os.path.join(root, "teacher", "eval.json"))
    print(f"[ablations] teacher: swap_att {teacher_eval['cr']['swap_att']:.3f}, "
          f"replace_rel {teacher_eval['cr']['replace_rel']:.3f}")

    runs = {name: {} for name in VARIANTS}
    for seed in seeds:
        for name, (config_name, overrides) in VARIANTS.items():
            out = os.path.join(root, f"seed{seed}", _slug(name))
            path = clock.timed("students", _done(out), lambda: _train(config_name, out, common + overrides + [
                "model.path=tiny-student", f"model.seed={seed}", f"seed={seed}", f"model.teacher={teacher}",
                "model.vision_from_teacher=true", f"train.max_steps={cfg['student_steps']}"], progress=progress))
            runs[name][seed] = evaluate(path, os.path.join(out, "eval.json"))

    started = time.time()  # the analysis is redone on every run: its time replaces the previous one
    figures = _analysis(root, teacher, runs, seeds[0], cr, vqa_items, cfg["analysis_items"], results)
    clock.add("analysis", time.time() - started, replace=True)
    timings = dict(clock.seconds, total=sum(clock.seconds.values()))
    summary = _summary(teacher_eval, runs, seeds, scale, cfg, timings, figures,
                       command or "python -m compodistill.train --pipeline ablations")
    _write_results(results, summary)
    print(f"[ablations] done ({timings['total'] / 60:.1f} min of work in all runs of this root); wrote {results} and {os.path.splitext(results)[0]}.json")
    return summary


# ---------------------------------------------------------------------------------------------------
# Analysis figures
# ---------------------------------------------------------------------------------------------------

def _vqa_prompts(mllm, items):
    """VQA-type prompts (question with the short-answer instruction) for the layer-similarity analysis;
    they have no option letter, so their answer probability is not computed."""
    from .analyze import Prompt
    from .data.benchmarks import short_answer_prompt
    from .data.chat import encode_prompt
    from .data.images import load_image, pixel_values

    prompts = []
    for item in items:
        image = pixel_values(mllm.image_processor, [load_image(item.image_path, item.question_id)])
        ids = encode_prompt(short_answer_prompt(item.question), mllm.tokenizer, mllm.num_image_tokens)
        prompts.append(Prompt(torch.tensor([ids]), image, None))
    return prompts


def _analysis(root, teacher_path, runs, seed, cr, vqa_items, limit, results_md) -> dict:
    """compodistill.analyze on the KD and CompoDistill students of `seed` (CR-type items), plus the
    layer-wise similarity on VQA-type items, and one figure comparing the four curves."""
    from .analyze import analyze, depth_matches, layer_similarity
    from .models import enable_compodistill_attention, load_mllm

    out_root = os.path.splitext(results_md)[0]
    os.makedirs(out_root, exist_ok=True)
    teacher = load_mllm(teacher_path)
    enable_compodistill_attention(teacher.model.eval(), backend="auto")
    # `limit` items taken round-robin over the subsets (the first of each, then the second, ...)
    cr_items = [cr[s][k] for k in range(limit) for s in CR_SUBSETS if k < len(cr[s])][:limit]
    curves, files = {}, {}
    for name in ANALYSED:
        student = load_mllm(runs[name][seed]["model"])
        enable_compodistill_attention(student.model.eval(), backend="auto")
        folder = os.path.join(out_root, f"{_slug(name)}-seed{seed}")
        result = analyze(teacher, student, cr_items, folder)
        matches = depth_matches(student, teacher)
        with torch.inference_mode():
            vqa = layer_similarity(teacher, student, _vqa_prompts(student, vqa_items[:limit]), matches)
        curves[f"{name}, CR items"] = result["layer_similarity"]["visual"]
        curves[f"{name}, VQA items"] = vqa["per_layer"]["visual"]
        files[name] = {"folder": os.path.relpath(folder, os.path.dirname(results_md) or "."),
                       "intervention": result["intervention"], "bins": result["bins"]}
    figure = os.path.join(out_root, "layer_similarity_kd_vs_compodistill.png")
    _plot_curves(figure, curves)
    return {"figure": os.path.relpath(figure, os.path.dirname(results_md) or "."), "models": files,
            "curves": {k: {str(layer): v for layer, v in c.items()} for k, c in curves.items()},
            "items": {"cr": len(cr_items), "vqa": len(vqa_items[:limit])}}


def _plot_curves(path, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per_layer in curves.items():
        layers = sorted(per_layer)
        ax.plot(layers, [per_layer[k] for k in layers], marker="o", linestyle="-" if "CR" in label else "--",
                label=label)
    ax.set_xlabel("student layer")
    ax.set_ylabel("teacher–student cosine (visual keys)")
    ax.set_title("Visual attention similarity to the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------

def _mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _binomial_se(p, n):
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def _summary(teacher, runs, seeds, scale, cfg, timings, figures, command) -> dict:
    rows = {}
    for name, by_seed in runs.items():
        evals = [by_seed[s] for s in seeds]
        rows[name] = {
            "cr_average": _mean_std([e["cr_average"] for e in evals]),
            "vqa": _mean_std([e["vqa"] for e in evals]),
            "cr": {s: _mean_std([e["cr"][s] for e in evals]) for s in CR_SUBSETS},
            # Sampling error of one run's subset accuracy over its n items (mean over seeds).
            "se": {s: sum(_binomial_se(e["cr"][s], e["cr_count"][s]) for e in evals) / len(evals) for s in CR_SUBSETS},
            "per_seed": {str(s): by_seed[s] for s in seeds},
        }
    bar = {s: teacher["cr"][s] >= v for s, v in TEACHER_BAR.items()}
    sft = rows["SFT"]["cr"]
    above_sft = {s: teacher["cr"][s] - sft[s][0] for s in TEACHER_BAR}
    checks = _ordering_checks(teacher, rows)
    return {"scale": scale, "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "seeds": list(seeds), "teacher": teacher, "rows": rows,
            "teacher_bar": {"thresholds": TEACHER_BAR, "met": bar, "above_sft": above_sft,
                            "met_all": all(bar.values()) and all(v >= 0.10 for v in above_sft.values())},
            "checks": checks, "timings_s": timings, "analysis": figures, "command": command,
            "versions": _versions()}


def _ordering_checks(teacher, rows) -> list[dict]:
    """The issue's goal, pair by pair: is the difference of CR averages positive, and larger than the
    spread across seeds (the larger of the two standard deviations)?"""
    def row(name):
        return rows[name]["cr_average"]

    pairs = [("CompoDistill (VAT+TAF)", "KD only", ">"), ("KD only", "SFT", ">="),
             ("CompoDistill (VAT+TAF)", "TAF only", ">"), ("CompoDistill (VAT+TAF)", "VAT only", ">"),
             ("CompoDistill (VAT+TAF)", "VAT+TAF, simple matching", ">")]
    checks = []
    if "CompoDistill (VAT+TAF)" in rows:
        c_mean, c_std = row("CompoDistill (VAT+TAF)")
        checks.append({"claim": "teacher > CompoDistill (VAT+TAF)", "difference": teacher["cr_average"] - c_mean,
                       "spread": c_std, "holds": teacher["cr_average"] - c_mean > c_std})
    for a, b, op in pairs:
        if a not in rows or b not in rows:  # a run restricted to some variants
            continue
        (ma, sa), (mb, sb) = row(a), row(b)
        diff, spread = ma - mb, max(sa, sb)
        holds = diff > spread if op == ">" else diff >= -spread
        checks.append({"claim": f"{a} {op} {b}", "difference": diff, "spread": spread, "holds": holds})
    return checks


def _versions() -> dict:
    import platform

    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu_threads": torch.get_num_threads()}


def _pct(mean_std) -> str:
    mean, std = mean_std
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _write_results(path: str, summary: dict) -> None:
    s = summary
    lines = [
        "# Miniature reproduction: CompoDistill's ablations on the procedural benchmark",
        "",
        f"Produced by `{s['command']}` (scale `{s['scale']}`), seeds {s['seeds']}, in "
        f"{s['timings_s']['total'] / 60:.1f} min on {s['versions']['device']} ({s['versions']['cpu_threads']} threads); "
        f"Python {s['versions']['python']}, torch {s['versions']['torch']}, transformers {s['versions']['transformers']}.",
        "Stage times (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in s["timings_s"].items() if k != "total") + ".",
        "",
        "Models: teacher tiny-teacher (LM 8×128, GQA 4/2) on a vision tower pre-trained on per-patch attributes; "
        "students tiny-student (LM 4×64) with the teacher's vision tower, one distillation stage each "
        f"({s['settings']['student_steps']} steps, batch {s['settings']['batch']}, lr {s['settings']['lr']}), same data "
        "and initialisation per seed. CR = two-choice accuracy averaged over both option orders (chance 50%), "
        "on held-out test scenes; VQA = exact match.",
        "",
        "## Teacher",
        "",
        "| model | VQA | CR avg | " + " | ".join(CR_SUBSETS) + " |",
        "|---|---:|---:|" + "---:|" * len(CR_SUBSETS),
        f"| teacher | {100 * s['teacher']['vqa']:.1f} | {100 * s['teacher']['cr_average']:.1f} | "
        + " | ".join(f"{100 * s['teacher']['cr'][x]:.1f}" for x in CR_SUBSETS) + " |",
        "",
    ]
    bar = s["teacher_bar"]
    lines.append(
        f"Teacher bar (swap_att and replace_rel ≥ 75%, and ≥ 10 points above the SFT student): "
        f"{'met' if bar['met_all'] else 'NOT met'} — swap_att {100 * s['teacher']['cr']['swap_att']:.1f}% "
        f"({100 * bar['above_sft']['swap_att']:+.1f} vs SFT), replace_rel {100 * s['teacher']['cr']['replace_rel']:.1f}% "
        f"({100 * bar['above_sft']['replace_rel']:+.1f} vs SFT).")
    lines += ["", f"## Students: mean ± standard deviation over {len(s['seeds'])} seeds (%)", "",
              "| model | VQA | CR avg | " + " | ".join(CR_SUBSETS) + " |",
              "|---|---:|---:|" + "---:|" * len(CR_SUBSETS)]
    for name, r in s["rows"].items():
        lines.append(f"| {name} | {_pct(r['vqa'])} | {_pct(r['cr_average'])} | "
                     + " | ".join(_pct(r["cr"][x]) for x in CR_SUBSETS) + " |")
    counts = s["teacher"]["cr_count"]
    lines += ["", "Items per subset: " + ", ".join(f"{x} {counts[x]}" for x in CR_SUBSETS)
              + f"; VQA {s['teacher']['vqa_count']} questions.", "",
              "Standard error of one run's subset accuracy (binomial, √(p(1−p)/n), mean over seeds, points):", "",
              "| model | " + " | ".join(CR_SUBSETS) + " |", "|---|" + "---:|" * len(CR_SUBSETS)]
    for name, r in s["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['se'][x]:.1f}" for x in CR_SUBSETS) + " |")
    lines += ["", "## The paper's ordering, checked (CR average; spread = the larger standard deviation)", "",
              "| claim | difference (points) | spread (points) | holds beyond the spread |", "|---|---:|---:|---|"]
    for c in s["checks"]:
        lines.append(f"| {c['claim']} | {100 * c['difference']:+.1f} | {100 * c['spread']:.1f} | "
                     f"{'yes' if c['holds'] else 'no'} |")
    a = s["analysis"]
    lines += ["", "## Analysis (seed %d)" % s["seeds"][0], "",
              f"![layer-wise similarity]({a['figure']})", "",
              f"Layer-wise cosine similarity of student and teacher visual attention (text query rows), KD vs "
              f"CompoDistill, on {a['items']['cr']} CR-type and {a['items']['vqa']} VQA-type items. Per model, "
              "`compodistill.analyze` wrote layer_similarity, answer_probability (probability of the correct option "
              "against similarity), intervention.json and heatmap.png:", ""]
    for name, info in a["models"].items():
        iv = info["intervention"]
        lines.append(f"- {name}: [{info['folder']}]({info['folder']}) — intervention (teacher/student attention mixed "
                     f"in layers {iv['layers']}): two-choice {100 * iv['baseline']:.1f}% → {100 * iv['intervened']:.1f}%")
    lines += ["", "Raw numbers per seed: the JSON file beside this one.", ""]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    with open(os.path.splitext(path)[0] + ".json.tmp", "w") as f:
        json.dump(summary, f, indent=1, default=list)
    os.replace(os.path.splitext(path)[0] + ".json.tmp", os.path.splitext(path)[0] + ".json")


def command_line(argv) -> str:
    return "python -m compodistill.train " + " ".join(shlex.quote(a) for a in argv)
