"""`python -m compodistill.analyze`: where do teacher and student look, and does it matter?

The paper's analysis tools, on a compositional-reasoning set (SugarCrepe format) and a teacher/student
pair, with attention slices from the fused kernels (no L×L matrix):

- layer_similarity.csv / .png: per student layer, the cosine similarity between the student's and the
  depth-matched teacher layer's head-averaged attention rows (text query rows), over the visual keys
  and over the text keys;
- answer_probability.csv / .png: the student's probability of the correct option letter, binned by
  how similar its visual attention is to the teacher's (mean over layers);
- intervention.json: two-choice CR accuracy with and without the paper's intervention, which replaces
  the student's visual attention in chosen layers by the mean of teacher and student at inference;
- heatmap.png: teacher and student attention over the image patches for one sample, over the image.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from compodistill_kernels import BACKENDS

from .data.chat import encode_prompt
from .data.images import load_image, pixel_values
from .distill.layers import match_layers, target_layers
from .data.benchmarks import TWO_CHOICE_PROMPT
from .evaluate import letter_token_ids
from .models import AttentionProbe, SliceRows, enable_compodistill_attention, load_mllm, visual_token_positions


@dataclass
class Prompt:
    """One tokenised two-choice question: the image, its ids and the index of the correct letter."""

    input_ids: torch.Tensor      # (1, L)
    pixel_values: torch.Tensor   # (1, 3, H, W)
    correct: int | None          # 0 for "A", 1 for "B"; None for a question without options


def two_choice_prompts(mllm, item) -> list[Prompt]:
    """The item asked in both orders (positive as A, then as B)."""
    image = pixel_values(mllm.image_processor, [load_image(item.image_path, item.id)])
    prompts = []
    for correct, (a, b) in enumerate(((item.caption, item.negative), (item.negative, item.caption))):
        ids = encode_prompt(TWO_CHOICE_PROMPT.format(first=a, second=b), mllm.tokenizer, mllm.num_image_tokens)
        prompts.append(Prompt(torch.tensor([ids]), image, correct))
    return prompts


def _rows(prompt: Prompt, mllm, keys: str) -> SliceRows | None:
    """Text query rows (every token after the image) against the visual keys or the text keys."""
    visual_start, visual_len = visual_token_positions(prompt.input_ids, mllm.image_token_id, mllm.num_image_tokens)
    first_text = int(visual_start[0]) + visual_len
    text_len = prompt.input_ids.shape[1] - first_text
    if text_len <= 0:
        return None
    key_start, key_len = (visual_start, visual_len) if keys == "visual" else (visual_start.new_tensor([first_text]), text_len)
    return SliceRows(key_start, key_len, visual_start.new_tensor([first_text]), text_len, torch.ones(1, text_len))


def _forward(mllm, prompt: Prompt, probe=None):
    model = mllm.model
    return model(input_ids=prompt.input_ids.to(model.device), pixel_values=prompt.pixel_values.to(model.device, model.dtype),
                 compodistill_probe=probe).logits[0, -1].float()


def _slices(mllm, prompt, layers, keys):
    rows = _rows(prompt, mllm, keys)
    if rows is None:
        return None, None
    probe = AttentionProbe(_to(rows, mllm.model.device), export={layer: "rows" for layer in layers})
    logits = _forward(mllm, prompt, probe)
    return {layer: slc[0] for layer, slc in probe.slices.items()}, logits


def _to(rows: SliceRows, device) -> SliceRows:
    return SliceRows(rows.visual_start.to(device), rows.visual_len, rows.query_start.to(device), rows.query_len,
                     rows.row_weight.to(device))


def _row_cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12).mean().item()


def depth_matches(student, teacher):
    """Every student layer with its depth-matched teacher layer (the 'simple' matching over all layers)."""
    s_layers = list(range(student.model.config.text_config.num_hidden_layers))
    t_layers = list(range(teacher.model.config.text_config.num_hidden_layers))
    return {m.student_layer: m.teacher_layers[0] for m in match_layers(s_layers, t_layers, "simple")}


def layer_similarity(teacher, student, prompts, matches) -> dict:
    """Per student layer: mean over prompts of the mean row cosine, over visual and over text keys.
    Also returns each prompt's mean visual similarity over layers and the student's probability of
    the correct letter (for the binned answer-probability analysis)."""
    letters = letter_token_ids(student.tokenizer)
    sums = {keys: {layer: 0.0 for layer in matches} for keys in ("visual", "text")}
    per_prompt, counted = [], 0
    for prompt in tqdm(prompts, desc="layer similarity", disable=None):
        sims = {}
        for keys in ("visual", "text"):
            s_slices, s_logits = _slices(student, prompt, list(matches), keys)
            if s_slices is None:
                break
            t_slices, _ = _slices(teacher, prompt, sorted(set(matches.values())), keys)
            sims[keys] = {s: _row_cosine(s_slices[s], t_slices[t]) for s, t in matches.items()}
            if keys == "visual":  # prompts without options (correct=None) have no answer probability
                prob = float("nan") if prompt.correct is None else torch.softmax(s_logits, -1)[letters[prompt.correct]].item()
        if len(sims) < 2:
            continue
        counted += 1
        for keys in sims:
            for layer, value in sims[keys].items():
                sums[keys][layer] += value
        per_prompt.append((sum(sims["visual"].values()) / len(matches), prob))
    if counted == 0:
        raise ValueError("items: no prompt has text after the image; nothing to compare")
    means = {keys: {layer: total / counted for layer, total in values.items()} for keys, values in sums.items()}
    return {"per_layer": means, "per_prompt": per_prompt, "count": counted}


def bin_by_similarity(per_prompt, num_bins: int = 5) -> list[dict]:
    """Equal-width bins of attention similarity, with the count and mean correct-answer probability."""
    if not per_prompt:
        return []
    sims = [s for s, _ in per_prompt]
    lo, hi = min(sims), max(sims)
    width = (hi - lo) / num_bins or 1.0
    bins = [{"low": lo + i * width, "high": lo + (i + 1) * width, "count": 0, "prob_sum": 0.0} for i in range(num_bins)]
    for sim, prob in per_prompt:
        index = min(int((sim - lo) / width), num_bins - 1)
        bins[index]["count"] += 1
        bins[index]["prob_sum"] += prob
    return [{"low": b["low"], "high": b["high"], "count": b["count"],
             "mean_probability": b["prob_sum"] / b["count"] if b["count"] else float("nan")} for b in bins]


def intervention_accuracy(teacher, student, items, layers, matches, *, mix: float = 0.5) -> dict:
    """Two-choice CR accuracy (both orders averaged) of the student, plain and with its visual attention
    in `layers` replaced by (1 − mix)·student + mix·teacher (depth-matched teacher layer)."""
    letters = letter_token_ids(student.tokenizer)
    correct = {"baseline": 0.0, "intervened": 0.0}
    total = 0
    for item in tqdm(items, desc="intervention", disable=None):
        for prompt in two_choice_prompts(student, item):
            rows = _rows(prompt, student, "visual")
            t_slices, _ = _slices(teacher, prompt, sorted({matches[s] for s in layers}), "visual")
            targets = {s: t_slices[matches[s]][None] for s in layers}
            for name, probe in (("baseline", None),
                                ("intervened", AttentionProbe(_to(rows, student.model.device), intervene=targets, mix=mix))):
                logits = _forward(student, prompt, probe)
                picked = int(logits[letters[1]] > logits[letters[0]])
                correct[name] += float(picked == prompt.correct)
            total += 1
    return {name: value / total for name, value in correct.items()} | {"prompts": total, "layers": list(layers), "mix": mix}


def _plot_layers(path, per_layer):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for keys, values in per_layer.items():
        layers = sorted(values)
        ax.plot(layers, [values[layer] for layer in layers], marker="o", label=f"over {keys} keys")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("student layer")
    ax.set_ylabel("cosine similarity to teacher")
    ax.set_title("Teacher–student attention similarity (depth-matched layers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_bins(path, bins):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    heights = [0.0 if math.isnan(b["mean_probability"]) else b["mean_probability"] for b in bins]
    ax.bar(centres, heights, width=(bins[0]["high"] - bins[0]["low"]) * 0.9)
    for x, h, b in zip(centres, heights, bins):
        ax.annotate(f"n={b['count']}", (x, h), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("visual attention similarity to teacher (mean over layers)")
    ax.set_ylabel("P(correct option)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def heatmap(path, teacher, student, item, student_layer, teacher_layer):
    """Image, teacher and student attention (text rows pooled) over the image patches, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompt = two_choice_prompts(student, item)[0]
    maps = []
    for mllm, layer in ((teacher, teacher_layer), (student, student_layer)):
        slices, _ = _slices(mllm, prompt, [layer], "visual")
        pooled = slices[layer].mean(0).float().cpu()
        side = int(round(math.sqrt(pooled.numel())))
        maps.append(pooled.reshape(side, side).numpy())
    image = load_image(item.image_path, item.id)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(image)
    axes[0].set_title("image")
    extent = (0, image.width, image.height, 0)
    for ax, grid, title in ((axes[1], maps[0], f"teacher layer {teacher_layer}"),
                            (axes[2], maps[1], f"student layer {student_layer}")):
        ax.imshow(image)
        shown = ax.imshow(grid, cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(item.caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return maps


def analyze(teacher, student, items, out_dir, *, layers=None, mix: float = 0.5, num_bins: int = 5) -> dict:
    """Run every analysis on `items` (CRItem-like: id, image_path, caption, negative) and write the files."""
    if not items:
        raise ValueError("items: expected at least one compositional-reasoning item")
    os.makedirs(out_dir, exist_ok=True)
    matches = depth_matches(student, teacher)
    n_student = student.model.config.text_config.num_hidden_layers
    layers = target_layers(n_student, layers if layers is not None else "intermediate")
    prompts = [p for item in items for p in two_choice_prompts(student, item)]
    with torch.inference_mode():
        sim = layer_similarity(teacher, student, prompts, matches)
        bins = bin_by_similarity(sim["per_prompt"], num_bins)
        intervention = intervention_accuracy(teacher, student, items, layers, matches, mix=mix)
        middle = layers[len(layers) // 2]
        heatmap(os.path.join(out_dir, "heatmap.png"), teacher, student, items[0], middle, matches[middle])

    with open(os.path.join(out_dir, "layer_similarity.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student_layer", "teacher_layer", "visual_keys", "text_keys"])
        for layer in sorted(matches):
            writer.writerow([layer, matches[layer], f"{sim['per_layer']['visual'][layer]:.6f}",
                             f"{sim['per_layer']['text'][layer]:.6f}"])
    _plot_layers(os.path.join(out_dir, "layer_similarity.png"), sim["per_layer"])
    with open(os.path.join(out_dir, "answer_probability.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["similarity_low", "similarity_high", "count", "mean_probability"])
        for b in bins:
            writer.writerow([f"{b['low']:.6f}", f"{b['high']:.6f}", b["count"], f"{b['mean_probability']:.6f}"])
    _plot_bins(os.path.join(out_dir, "answer_probability.png"), bins)
    with open(os.path.join(out_dir, "intervention.json"), "w") as f:
        json.dump(intervention, f, indent=2)
    return {"layer_similarity": sim["per_layer"], "bins": bins, "intervention": intervention, "prompts": sim["count"]}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m compodistill.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher: preset name or checkpoint folder")
    parser.add_argument("--student", required=True, help="student: preset name or checkpoint folder")
    parser.add_argument("--cr", required=True, help="folder of SugarCrepe-format subset JSONs")
    parser.add_argument("--cr-images", default=None, help="image folder (default: <cr>/images or <cr>/../images)")
    parser.add_argument("--subsets", default=None, help="comma-separated subsets (default: all in --cr)")
    parser.add_argument("--limit", type=int, default=50, help="items per subset (default 50)")
    parser.add_argument("--layers", default=None, help="student layers for the intervention, e.g. 8,9,10 "
                                                      "(default: the intermediate band)")
    parser.add_argument("--mix", type=float, default=0.5, help="teacher weight in the intervention (default 0.5)")
    parser.add_argument("--out", default="analysis", help="output folder (default ./analysis)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit: expected a positive number of items per subset")
    from .data.benchmarks import read_sugarcrepe

    subsets = args.subsets.split(",") if args.subsets else None
    items = [item for group in read_sugarcrepe(args.cr, args.cr_images, subsets).values() for item in group[:args.limit]]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    teacher, student = load_mllm(args.teacher), load_mllm(args.student)
    for mllm in (teacher, student):
        mllm.model.to(args.device).eval()
        enable_compodistill_attention(mllm.model, backend=args.backend)
    result = analyze(teacher, student, items, args.out, layers=layers, mix=args.mix)
    print(f"analysed {len(items)} items ({result['prompts']} prompts); wrote {args.out}/layer_similarity.csv/.png, "
          f"answer_probability.csv/.png, intervention.json, heatmap.png")
    iv = result["intervention"]
    print(f"two-choice accuracy: {iv['baseline']:.3f} without, {iv['intervened']:.3f} with the intervention "
          f"(layers {iv['layers']}, mix {iv['mix']})")
    return result


if __name__ == "__main__":
    main()
