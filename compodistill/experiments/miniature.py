"""The miniature: the paper's comparison on a task small enough for a CPU, built on the stage runner.

    run_miniature(root, scale=SCALES["full"], variants=VARIANTS, seeds=(0, 1, 2))

1. Data (`compodistill.data.synth --preset miniature`): 4×4-grid scenes, 6 colours × 6 shapes × 2
   sizes; one dense caption per training scene ("large red square . small blue circle . red square left
   of blue circle ."), next-token loss on the caption; CR items whose two captions differ in one
   compositional detail, scored by caption likelihood.
2. Vision: the teacher's tiny SigLIP (one patch per cell) pre-trained to tell each patch's colour, shape
   and size (`vision.pretrain_vision_tower`), then frozen everywhere; its features are computed once
   per image (`data.feature_cache`).
3. Teacher: `miniature-teacher` (LM width 128, 4 layers) trains projector and LM on the captions.
4. Students: `miniature-student` (LM width 64, 3 layers) with the teacher's tower, one stage each, per
   seed the same LM initialisation and the same batches; they differ only in losses and projector
   (SFT, KD, KD + TAF, KD + VAT, CompoDistill = KD + VAT + TAF, and the ablations).
5. Every model is scored by caption likelihood (the headline) and by the letter-logit two-choice
   protocol; students also at intermediate steps (snapshots) for the learning curves.
6. A report: mean ± std over seeds, binomial standard errors, the ordering claims checked against the
   seed spread, layer-wise attention similarity, answer probability by similarity, the intervention.

Every step resumes: a finished model or evaluation on disk is not redone.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

from ..data.benchmarks import read_sugarcrepe
from ..data.negatives import CR_SUBSETS
from ..data.synth import generate_miniature
from ..models import build_preset, parts
from ..training import StageConfig, evolve, load_config, run_stage
from ..distill import LossWeights, VATConfig
from ..training.config import CheckpointConfig, DataConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig
from . import report
from .evaluation import bin_by_similarity, caption_analysis, evaluate_saved, load_for_inference, visual_attention_entropy
from .vision import pretrain_vision_tower

HEADLINE = "likelihood"
PROTOCOLS = ("likelihood", "letter_logits")


@dataclass(frozen=True)
class Scale:
    """How much of everything one run does."""

    name: str
    num_train: int           # training scenes (captions)
    num_test: int            # test scenes (CR items come from them)
    cr_items: int | None     # CR items per subset scored for every final model (None: all)
    curve_items: int         # CR items per subset scored at each snapshot
    vision_steps: int
    teacher_steps: int
    student_steps: int
    snapshots: tuple         # student steps scored for the learning curves
    seeds: tuple
    analysis_items: int
    batch: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100


SCALES = {
    # The committed results/miniature.md.
    "full": Scale("full", num_train=20000, num_test=1000, cr_items=400, curve_items=100, vision_steps=400,
                  teacher_steps=400, student_steps=150, snapshots=(50, 100), seeds=(0, 1, 2),
                  analysis_items=100),
    # The main job's default: teacher, then SFT, KD and CompoDistill with 2 seeds, in minutes.
    "demo": Scale("demo", num_train=20000, num_test=1000, cr_items=None, curve_items=150, vision_steps=400,
                  teacher_steps=300, student_steps=150, snapshots=(50, 100), seeds=(0, 1), analysis_items=60),
    # CI's smoke test: every stage and file, in seconds; the numbers mean nothing.
    "smoke": Scale("smoke", num_train=96, num_test=40, cr_items=6, curve_items=3, vision_steps=4, teacher_steps=4,
                   student_steps=4, snapshots=(2,), seeds=(0,), analysis_items=2, batch=8, warmup_steps=1),
}


@dataclass(frozen=True)
class Variant:
    """A student: which losses, whether TAF, and changes to the VAT settings."""

    name: str
    kd: bool
    vat: bool
    taf: bool
    vat_changes: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-").replace("--", "-")


# VAT in the miniature: text query rows, per-row cosine, student layers 0-1 of 3 against teacher layers
# 0-1 of 4 (group matching: windows of one layer), weight 1. The teacher's layers are chosen where its
# visual attention is focused, not by relative depth: measured on its caption rows (head-averaged,
# renormalised over the 16 visual keys), the entropy per layer is 2.53, 2.32, 2.72, 2.69 nats (uniform:
# ln 16 = 2.77), so layers 2-3 attend almost uniformly and aligning to them teaches nothing (the report's
# "teacher attention entropy" rows and the "teacher layers 1-2" ablation measure it again).
VAT = VATConfig(student_layers=[0, 1], teacher_layers=[0, 1], matching="group", query_rows="text")
VARIANTS = (
    Variant("SFT", kd=False, vat=False, taf=False),
    Variant("KD", kd=True, vat=False, taf=False),
    Variant("KD + TAF", kd=True, vat=False, taf=True),
    Variant("KD + VAT", kd=True, vat=True, taf=False),
    Variant("CompoDistill", kd=True, vat=True, taf=True),
    Variant("CompoDistill, simple matching", kd=True, vat=True, taf=True,
            vat_changes={"student_layers": [0, 1, 2], "teacher_layers": [0, 1, 2, 3], "matching": "simple"}),
    Variant("CompoDistill, MSE", kd=True, vat=True, taf=True, vat_changes={"loss": "mse"}),
    Variant("CompoDistill, KL", kd=True, vat=True, taf=True, vat_changes={"loss": "kl"}),
    Variant("CompoDistill, all layers", kd=True, vat=True, taf=True,
            vat_changes={"student_layers": [0, 1, 2], "teacher_layers": [0, 1, 2, 3]}),
    Variant("CompoDistill, last layer", kd=True, vat=True, taf=True,
            vat_changes={"student_layers": [2], "teacher_layers": [3]}),
    Variant("CompoDistill, teacher layers 1-2", kd=True, vat=True, taf=True, vat_changes={"teacher_layers": [1, 2]}),
)
DEMO_VARIANTS = ("SFT", "KD", "CompoDistill")
# The paper's claims, checked against the seed spread: (a, b, relation).
CLAIMS = (("CompoDistill", "KD", "beats"), ("KD", "SFT", "not below"), ("CompoDistill", "KD + TAF", "beats"),
          ("CompoDistill", "KD + VAT", "beats"))


def variants_named(names) -> tuple:
    by_name = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; expected some of {list(by_name)}")
    return tuple(by_name[n] for n in names)


# ---------------------------------------------------------------------------------------------------
# Stage configs (typed)
# ---------------------------------------------------------------------------------------------------

def _common(data: str, scale: Scale, steps: int) -> dict:
    return dict(
        data=DataConfig(json=os.path.join(data, "llava_instruct.json"), image_folder=os.path.join(data, "images"),
                        max_length=256, feature_cache=True),
        optim=OptimConfig(lr=scale.lr, weight_decay=0.01, scheduler="cosine",
                          warmup_ratio=min(0.5, scale.warmup_steps / steps), min_lr_ratio=0.1, max_grad_norm=1.0),
        train=TrainConfig(max_steps=steps, batch_size=scale.batch, mixed_precision="no", log_every=25),
        checkpoint=CheckpointConfig(every=100, keep=1),
        log=LogConfig(tensorboard=False, plot=True),
    )


def teacher_config(root: str, data: str, scale: Scale) -> StageConfig:
    base = load_config("teacher-finetune")
    return evolve(base, stage="teacher", output_dir=os.path.join(root, "teacher"),
                  model=ModelConfig(path=os.path.join(root, "vision", "final")), trainable=["projector", "lm"],
                  losses=LossWeights(lm=1.0), **_common(data, scale, scale.teacher_steps))


def student_config(variant: Variant, seed: int, root: str, data: str, teacher: str, scale: Scale) -> StageConfig:
    base = load_config("dft")
    common = _common(data, scale, scale.student_steps)
    common["checkpoint"] = replace(common["checkpoint"], snapshots=list(scale.snapshots))
    return evolve(base, stage=variant.name, seed=seed, output_dir=os.path.join(root, f"seed{seed}", variant.slug),
                  model=ModelConfig(path="miniature-student", teacher=teacher, taf=variant.taf,
                                    vision_from_teacher=True, seed=seed),
                  trainable=["lm", "post_projector" if variant.taf else "projector"],
                  losses=LossWeights(lm=1.0, kd=1.0 if variant.kd else 0.0, vat=1.0 if variant.vat else 0.0),
                  vat=replace(VAT, **variant.vat_changes), **common)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------

class Clock:
    """Seconds of real work per part, summed across resumed runs (kept in <root>/timings.json)."""

    def __init__(self, root: str):
        import json

        self.path = os.path.join(root, "timings.json")
        self.seconds = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.seconds = json.load(f)

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        report.write_json(self.path, self.seconds)


def _prepare_data(root: str, scale: Scale, clock: Clock, progress: bool) -> str:
    data = os.path.join(root, "data")
    if not os.path.isfile(os.path.join(data, "summary.json")):
        started = time.time()
        generate_miniature(data, seed=0, num_train=scale.num_train, num_test=scale.num_test, overwrite=True)
        clock.add("data", time.time() - started)
    return data


def _prepare_vision(root: str, data: str, scale: Scale, clock: Clock, progress: bool) -> dict:
    import json

    final = os.path.join(root, "vision", "final")
    record_path = os.path.join(final, "vision_pretrain.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)
    started = time.time()
    with open(os.path.join(data, "summary.json")) as f:
        vocabulary = json.load(f)["vocabulary"]
    mllm = build_preset("miniature-teacher", seed=0)
    record = pretrain_vision_tower(mllm, data, vocabulary, steps=scale.vision_steps, batch_size=64, progress=progress)
    tmp = final + ".tmp"
    mllm.save_pretrained(tmp)
    report.write_json(os.path.join(tmp, "vision_pretrain.json"), record)
    os.replace(tmp, final)
    clock.add("vision", time.time() - started)
    return record


def _train(config: StageConfig, clock: Clock, key: str, progress: bool) -> str:
    result = run_stage(config, resume=True, progress=progress)
    if result.status == "interrupted":
        raise KeyboardInterrupt(f"{config.stage} interrupted at step {result.step}; run the same command again "
                                f"to continue from {result.checkpoint}")
    if result.status == "finished":
        clock.add(key, result.seconds)
    return result.final


def _items(cr: dict, limit: int | None) -> list:
    return [item for subset in CR_SUBSETS for item in cr[subset][:limit]]


def _per_seed_record(evaluation: dict, protocol: str) -> dict:
    return {"cr": evaluation["cr"][protocol], "count": evaluation["count"]}


def run_miniature(root: str, *, scale: Scale, variants=VARIANTS, seeds=None, progress: bool = True,
                  analyse=("KD", "CompoDistill")) -> dict:
    """Run (or resume) the miniature under `root`; returns the summary (also `<root>/summary.json`)."""
    started = time.time()
    seeds = tuple(scale.seeds if seeds is None else seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds: expected distinct non-negative seeds, got {list(seeds)}")
    os.makedirs(root, exist_ok=True)
    clock = Clock(root)
    data = _prepare_data(root, scale, clock, progress)
    vision = _prepare_vision(root, data, scale, clock, progress)
    teacher = _train(teacher_config(root, data, scale), clock, "teacher", progress)

    cr = read_sugarcrepe(os.path.join(data, "cr"))
    items, curve_items = _items(cr, scale.cr_items), _items(cr, scale.curve_items)

    def evaluate(path, out_json, chosen=items, protocols=PROTOCOLS):
        began = time.time()
        record = evaluate_saved(path, chosen, out_json, protocols=protocols, progress=progress)
        if record["seconds"] and time.time() - began > 1:  # loaded from disk: nothing to add
            clock.add("evaluation", time.time() - began)
        return record

    teacher_eval = evaluate(teacher, os.path.join(root, "teacher", "eval.json"))
    runs = {v.name: {} for v in variants}
    curves = {v.name: {} for v in variants}
    for seed in seeds:
        for variant in variants:
            config = student_config(variant, seed, root, data, teacher, scale)
            final = _train(config, clock, "students", progress)
            runs[variant.name][seed] = evaluate(final, os.path.join(config.output_dir, "eval.json"))
            for step in scale.snapshots:
                snapshot = os.path.join(config.output_dir, "snapshots", f"step-{step:06d}")
                curves[variant.name].setdefault(step, {})[seed] = evaluate(
                    snapshot, os.path.join(snapshot, "eval.json"), chosen=curve_items, protocols=(HEADLINE,))

    analysis = {}
    names = [n for n in analyse if n in runs]
    began = time.time()
    if names:
        analysis = _analysis(root, teacher, {n: runs[n][seeds[0]]["model"] for n in names}, cr, scale.analysis_items)
    teacher_model = load_for_inference(teacher)
    entropy = {"layers": visual_attention_entropy(teacher_model, _round_robin(cr, scale.analysis_items)),
               "uniform": math.log(teacher_model.num_image_tokens)}
    clock.add("analysis", time.time() - began)
    summary = _summary(scale, seeds, teacher, teacher_eval, runs, curves, vision, analysis, clock,
                       time.time() - started)
    summary["teacher_attention_entropy"] = entropy
    report.write_json(os.path.join(root, "summary.json"), summary)
    return summary


# ---------------------------------------------------------------------------------------------------
# Analysis and summary
# ---------------------------------------------------------------------------------------------------

def _round_robin(cr: dict, limit: int) -> list:
    """`limit` CR items taken in turn from each subset."""
    return [cr[s][k] for k in range(limit) for s in CR_SUBSETS if k < len(cr[s])][:limit]


def _analysis(root: str, teacher_path: str, students: dict, cr: dict, limit: int) -> dict:
    """Caption-prompt analyses (layer similarity, answer probability by similarity, intervention) of the
    named students of the first seed, on `limit` items taken round-robin over the subsets."""
    teacher = load_for_inference(teacher_path)
    items = _round_robin(cr, limit)
    n_teacher = parts.text_config(teacher).num_hidden_layers
    out = {}
    for name, path in students.items():
        student = load_for_inference(path)
        n_student = parts.text_config(student).num_hidden_layers
        # every student layer against the teacher layer at the same relative depth
        matches = {s: min(n_teacher - 1, round((s + 0.5) * n_teacher / n_student - 0.5)) for s in range(n_student)}
        result = caption_analysis(teacher, student, items, matches, intervene_layers=VAT.student_layers)
        out[name] = {"matches": matches, "layer_similarity": result["layer_similarity"],
                     "entropy": visual_attention_entropy(student, items),
                     "bins": bin_by_similarity(result["per_item"]), "intervention": result["intervention"],
                     "items": len(items)}
    return out


def _summary(scale, seeds, teacher_path, teacher_eval, runs, curves, vision, analysis, clock, seconds) -> dict:
    subsets = list(CR_SUBSETS)
    models = {"teacher": {"paths": [teacher_path], **report.aggregate([_per_seed_record(teacher_eval, HEADLINE)], subsets),
                          "letter_logits": teacher_eval["cr"]["letter_logits"]}}
    for name, by_seed in runs.items():
        row = report.aggregate([_per_seed_record(by_seed[s], HEADLINE) for s in seeds], subsets)
        letters = report.aggregate([_per_seed_record(by_seed[s], "letter_logits") for s in seeds], subsets)
        models[name] = {"paths": [by_seed[s]["model"] for s in seeds], **row,
                        "letter_logits": letters["cr"], "letter_logits_mean": letters["cr_mean"]}
    curve_points = {}
    for name, steps in curves.items():
        points = {step: report.mean_std(sum(r["cr"][HEADLINE][s] for s in subsets) / len(subsets)
                                        for r in by_seed.values()) for step, by_seed in steps.items()}
        final = models[name]
        points[scale.student_steps] = (final["cr_mean"], final["cr_std"])
        curve_points[name] = points
    return {"protocol": HEADLINE, "subsets": subsets, "seconds": seconds, "scale": scale.name, "seeds": list(seeds),
            "models": models, "curves": {n: {str(k): v for k, v in p.items()} for n, p in curve_points.items()},
            "claims": check_claims(models), "vision": vision, "analysis": analysis, "timings": clock.seconds,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in scale.__dict__.items()},
            "versions": report.versions()}


def check_claims(models: dict) -> list[dict]:
    """Each claim of the paper between two rows: the difference of mean CR, the pooled seed std, and
    whether the difference exceeds twice the pooled std ("beats") or is no lower than minus the pooled
    std ("not below"); and the teacher above every student."""
    claims = []
    for a, b, relation in CLAIMS:
        if a not in models or b not in models:
            continue
        diff = models[a]["cr_mean"] - models[b]["cr_mean"]
        pooled = report.pooled_std(models[a]["cr_std"], models[b]["cr_std"])
        holds = diff > 2 * pooled if relation == "beats" else diff >= -pooled
        claims.append({"claim": f"{a} {relation} {b}", "difference": diff, "pooled_std": pooled, "holds": holds})
    best = max((name for name in models if name != "teacher"), key=lambda n: models[n]["cr_mean"], default=None)
    if best is not None:
        diff = models["teacher"]["cr_mean"] - models[best]["cr_mean"]
        claims.append({"claim": f"teacher above the best student ({best})", "difference": diff,
                       "pooled_std": models[best]["cr_std"], "holds": diff > 0})
    return claims


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------

def figures(summary: dict, folder: str) -> dict:
    """The PNGs of a summary: CR against student steps, layer-wise similarity, answer probability."""
    os.makedirs(folder, exist_ok=True)
    out = {}
    curves = {name: {int(step): tuple(v) for step, v in points.items()} for name, points in summary["curves"].items()}
    out["curves"] = report.plot_curves(os.path.join(folder, "cr_by_student_steps.png"), curves,
                                       xlabel="student optimizer steps", ylabel=f"mean CR ({summary['protocol']})",
                                       title="How fast each student learns to bind", chance=0.5)
    analysis = summary.get("analysis") or {}
    if analysis:
        similarity = {name: {int(layer): (value, 0.0) for layer, value in a["layer_similarity"].items()}
                      for name, a in analysis.items()}
        out["similarity"] = report.plot_curves(os.path.join(folder, "layer_similarity.png"), similarity,
                                               xlabel="student layer", ylabel="cosine to the teacher (visual keys)",
                                               title="Visual attention similarity to the teacher")
        out["bins"] = report.plot_bins(os.path.join(folder, "answer_probability.png"),
                                       {name: a["bins"] for name, a in analysis.items()},
                                       title="True caption preferred, by attention similarity")
    return out


def text_report(summary: dict) -> str:
    """The tables a run prints: CR per model (mean ± std over seeds), binomial SEs, the claims checked,
    the layer-wise attention similarity and the intervention."""
    subsets, models = summary["subsets"], summary["models"]
    lines = [f"Caption-likelihood CR (%), mean ± std over seeds {summary['seeds']} (teacher: one model):", "",
             report.cr_table(models, subsets), "",
             "Binomial standard error of one run's accuracy (points):", "", report.se_table(models, subsets), "",
             "Letter-logit two-choice protocol (mean CR %, both orders): "
             + ", ".join(f"{name} {100 * (m.get('letter_logits_mean') or sum(m['letter_logits'].values()) / len(subsets)):.1f}"
                         for name, m in models.items()), ""]
    lines += ["| claim | difference (points) | pooled seed std | holds |", "|---|---:|---:|---|"]
    for c in summary["claims"]:
        lines.append(f"| {c['claim']} | {100 * c['difference']:+.1f} | {100 * c['pooled_std']:.1f} | "
                     f"{'yes' if c['holds'] else 'no'} |")
    entropy = summary.get("teacher_attention_entropy")
    if entropy:
        per_layer = entropy["layers"]
        lines += ["", "Teacher's visual attention entropy per layer (nats; caption rows, head-averaged, renormalised "
                  f"over the visual keys; uniform = {entropy['uniform']:.2f}); VAT aligns student layers "
                  f"{VAT.student_layers} to teacher layers {VAT.teacher_layers}:", "",
                  "| " + " | ".join(f"layer {k}" for k in per_layer) + " |", "|" + "---:|" * len(per_layer),
                  "| " + " | ".join(f"{v:.2f}" for v in per_layer.values()) + " |"]
    analysis = summary.get("analysis") or {}
    if analysis:
        layers = sorted({int(layer) for a in analysis.values() for layer in a["layer_similarity"]})
        lines += ["", "Visual attention similarity to the teacher per student layer (seed "
                  f"{summary['seeds'][0]}, cosine over text rows):", "",
                  "| model | " + " | ".join(f"layer {k}" for k in layers) + " | intervention (CR before → after) |",
                  "|---|" + "---:|" * len(layers) + "---|"]
        for name, a in analysis.items():
            sims = {int(k): v for k, v in a["layer_similarity"].items()}
            iv = a["intervention"]
            lines.append(f"| {name} | " + " | ".join(f"{sims[k]:.3f}" for k in layers)
                         + f" | {100 * iv['baseline']:.1f} → {100 * iv['intervened']:.1f} |")
    return "\n".join(lines)


def run_ablations(root: str = "runs/miniature", *, scale: str = "full", results: str = "results/miniature.md",
                  seeds=None, progress: bool = True, command: str | None = None) -> dict:
    """Every variant with `scale`'s seeds; writes `results` (Markdown), its .json and figures beside it."""
    if scale not in SCALES:
        raise ValueError(f"--scale: expected one of {sorted(SCALES)}, got {scale!r}")
    summary = run_miniature(root, scale=SCALES[scale], variants=VARIANTS, seeds=seeds, progress=progress)
    folder = os.path.splitext(results)[0]
    pictures = figures(summary, folder)
    base = os.path.dirname(results) or "."
    v, s = summary["versions"], summary["settings"]
    timings = ", ".join(f"{k} {t / 60:.1f}" for k, t in summary["timings"].items())
    lines = [
        "# The miniature: CompoDistill's comparison and ablations on a CPU-sized task", "",
        f"Produced by `{command or 'python -m compodistill.train --pipeline ablations'}` (scale `{summary['scale']}`, "
        f"seeds {summary['seeds']}) in {summary['seconds'] / 60:.1f} min of this run (work across resumed runs, "
        f"min: {timings}), on {v['cores']} CPU cores ({v['cpu']}, torch threads {v['threads']}); Python {v['python']}, "
        f"torch {v['torch']}, transformers {v['transformers']}.", "",
        f"Teacher `miniature-teacher` ({s['teacher_steps']} steps), students `miniature-student` "
        f"({s['student_steps']} steps, batch {s['batch']}, lr {s['lr']}), one distillation stage each, the same "
        f"initialisation and batches per seed. {s['num_train']} training scenes; CR items from {s['num_test']} "
        "held-out scenes. CR = caption likelihood (the true caption's summed log-probability beats the "
        "negative's; SugarCrepe's protocol for matching models; chance 50 %).", "",
        text_report(summary), "",
        "The letter-logit protocol asks the paper's two-choice question; these models were trained on captions "
        "only, never on a question with lettered options, so they answer it at chance: it measures nothing here.", "",
    ]
    lines += [f"![{name}]({os.path.relpath(path, base)})" for name, path in pictures.items()] + [""]
    report.write_text(results, "\n".join(lines))
    report.write_json(os.path.splitext(results)[0] + ".json", summary)
    print("\n" + text_report(summary))
    print(f"\n[ablations] wrote {results}, {os.path.splitext(results)[0]}.json and {folder}/")
    return summary
