"""The default `python -m compodistill.train`: the paper's comparison in miniature, on the CPU.

1. Generate the procedural benchmark (LLaVA-format training data, SugarCrepe-format CR, VQA).
2. Get the tiny teacher: train it from scratch (captions, then instructions).
3. Train the students from one tiny-student initialisation, each with the teacher's vision tower (one
   shared SigLIP, as in the paper): the SFT baseline, the logit-KD baseline, and CompoDistill
   (DPT → DFT → SFT with TAF and VAT).
4. Evaluate all four and print model × VQA × CR with the CR subsets, also as Markdown and JSON.

The numbers printed are whatever this run measured. If the teacher is not clearly above chance on
attribute binding and relations, the demo says so: the students cannot inherit what it lacks.
"""
from __future__ import annotations

import json
import os
import time

from .config import load_config
from .data.synth import generate

# Each stage's settings on top of its YAML. The tiny models start from random weights, so the teacher
# trains everything and the students fine-tune their whole LM (the YAMLs' LoRA is for pretrained LMs).
SCALES = {
    "quick": dict(size="tiny", teacher_steps=(25, 45), student_steps=20, batch=16, eval_limit=12, lr=1e-3),
    "full": dict(size="small", teacher_steps=(150, 350), student_steps=100, batch=16, eval_limit=60, lr=1e-3),
}
CR_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att")


def _stage(name, root, data, overrides, *, resume, progress):
    from .recipe import Recipe

    path = os.path.join(root, name)
    if resume and os.path.isfile(os.path.join(path, "final", "config.json")):
        print(f"[demo] {name}: already trained ({path}/final)")
        return os.path.join(path, "final")
    base = [f"output_dir={path}", f"data.json={data}/{'llava_pretrain' if name in ('teacher-pretrain', 'dpt') else 'llava_instruct'}.json",
            f"data.image_folder={data}/images", "data.max_length=512", "checkpoint.every=1000000", "log.tensorboard=false"]
    config = load_config(name, base + overrides)
    result = Recipe(config, resume=resume, progress=progress).run()
    if result["status"] != "finished":
        raise KeyboardInterrupt(f"{name} interrupted at step {result['step']}; run again with --resume")
    return result["final"]


def run_demo(root: str = "runs/demo", *, quick: bool = False, from_scratch: bool = False, resume: bool = False,
             progress: bool = True) -> int:
    from .evaluate import evaluate_cr, evaluate_vqa
    from .data.benchmarks import read_sugarcrepe, read_vqa
    from .models import enable_compodistill_attention, load_mllm

    scale = SCALES["quick" if quick else "full"]
    started = time.time()
    os.makedirs(root, exist_ok=True)
    data = os.path.join(root, "data")
    if not os.path.isfile(os.path.join(data, "summary.json")):
        generate(data, seed=0, size=scale["size"], overwrite=True)
    opts = dict(resume=resume or not from_scratch, progress=progress)
    steps, batch, lr = scale["student_steps"], scale["batch"], scale["lr"]
    common = [f"train.batch_size={batch}", f"optim.lr={lr}", "train.log_every=5"]

    print(f"[demo] teacher: tiny-teacher trained from scratch ({'--from-scratch' if from_scratch else 'default'})")
    t_pre = _stage("teacher-pretrain", root, data, common + ["trainable=[all]", f"train.max_steps={scale['teacher_steps'][0]}"],
                   **{**opts, "resume": opts["resume"] and not from_scratch})
    teacher = _stage("teacher-finetune", root, data, common + ["trainable=[all]", f"model.path={t_pre}",
                                                               f"train.max_steps={scale['teacher_steps'][1]}"],
                     **{**opts, "resume": opts["resume"] and not from_scratch})

    student = ["model.path=tiny-student", f"model.teacher={teacher}", f"train.max_steps={steps}"]
    rows = {"teacher": teacher}
    rows["SFT student"] = _stage("baseline-sft", root, data, common + student + ["trainable=[projector,lm]"], **opts)
    rows["KD student"] = _stage("baseline-kd", root, data, common + student + ["trainable=[projector,lm]"], **opts)
    dpt = _stage("dpt", root, data, common + student + ["trainable=[post_projector]"], **opts)
    dft = _stage("dft", root, data, common + [f"model.path={dpt}", f"model.teacher={teacher}", f"train.max_steps={steps}",
                                               "trainable=[lm,post_projector]"], **opts)
    rows["CompoDistill"] = _stage("sft", root, data, common + [f"model.path={dft}", f"train.max_steps={steps}",
                                                                "trainable=[lm,post_projector]"], **opts)

    cr = read_sugarcrepe(os.path.join(data, "cr"))
    cr_items = [item for subset in CR_SUBSETS for item in cr[subset][:scale["eval_limit"]]]
    vqa_items = read_vqa(os.path.join(data, "vqa", "questions.jsonl"), os.path.join(data, "images"),
                         os.path.join(data, "vqa", "answers.jsonl"))[: 4 * scale["eval_limit"]]
    results = {}
    for name, path in rows.items():
        mllm = load_mllm(path)
        enable_compodistill_attention(mllm.model.eval(), backend="auto")
        cr_result = evaluate_cr(mllm, cr_items, backend=None, progress=progress)
        vqa_result = evaluate_vqa(mllm, vqa_items, backend=None, progress=progress)
        results[name] = {"path": path, "vqa": vqa_result["accuracy"], "cr": cr_result["average"]["two_choice"],
                         "cr_subsets": {s: cr_result["subsets"][s]["two_choice"] for s in CR_SUBSETS}}
    table = _table(results)
    note = _honesty_note(results["teacher"])
    summary = {"scale": "quick" if quick else "full", "minutes": (time.time() - started) / 60, "results": results,
               "note": note, "eval_items": {"cr": len(cr_items), "vqa": len(vqa_items)}}
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    print("\n" + table + "\n\n" + note)
    print(f"\n[demo] done in {summary['minutes']:.1f} min; wrote {root}/results.md and results.json")
    return 0


def _table(results) -> str:
    head = "| model | VQA | CR avg | " + " | ".join(CR_SUBSETS) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(CR_SUBSETS)
    lines = [head, rule]
    for name, r in results.items():
        cells = [f"{100 * r['vqa']:.1f}", f"{100 * r['cr']:.1f}"] + [f"{100 * r['cr_subsets'][s]:.1f}" for s in CR_SUBSETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _honesty_note(teacher) -> str:
    binding, relation = teacher["cr_subsets"]["swap_att"], teacher["cr_subsets"]["replace_rel"]
    if binding >= 0.6 and relation >= 0.6:
        return (f"The teacher is above chance on binding (swap_att {100 * binding:.0f}%) and relations "
                f"(replace_rel {100 * relation:.0f}%), so the students' differences can reflect what they took from it.")
    return (f"Note: the teacher is near chance on attribute binding (swap_att {100 * binding:.0f}%) and/or spatial "
            f"relations (replace_rel {100 * relation:.0f}%); two-choice chance is 50%. Students cannot inherit a "
            f"skill the teacher lacks, so differences between the student rows here are not evidence for or "
            f"against CompoDistill. (Making the miniature show the paper's effect is separate work.)")
