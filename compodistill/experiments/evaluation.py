"""Scoring saved models for the experiments: CR per protocol, cached next to each model, and the
attention analyses on caption prompts (the miniature's answers are captions, not letters).

`evaluate_saved(path, items, out_json)` loads a model folder, scores it with `compodistill.evaluate`
and writes the record once; a record found on disk is returned without loading the model, so
experiments resume without redoing finished evaluations.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch

from ..data.chat import tokenize_conversation
from ..data.images import load_image, pixel_values
from ..evaluate import evaluate_cr
from ..models import AttentionProbe, SliceRows, enable_compodistill_attention, load_mllm, parts, visual_token_positions
from ..models.tokenizer import IMAGE_TOKEN
from .report import write_json

DESCRIBE_PROMPT = "Describe the image."


def load_for_inference(path: str):
    mllm = load_mllm(path)
    enable_compodistill_attention(mllm.model.eval(), backend="auto")
    return mllm


def evaluate_saved(path: str, items, out_json: str, *, protocols=("likelihood", "letter_logits"),
                   batch_size: int = 64, progress: bool = True) -> dict:
    """{"model", "protocols", "cr": {protocol: {subset: accuracy}}, "count": {subset: items},
    "generate_unparsed", "seconds"} for the model saved at `path`, cached in `out_json`."""
    if os.path.isfile(out_json):
        with open(out_json) as f:
            record = json.load(f)
        if record.get("protocols") == list(protocols) and sum(record["count"].values()) == len(items):
            return record
    started = time.time()
    mllm = load_for_inference(path)
    result = evaluate_cr(mllm, items, protocols=protocols, batch_size=batch_size, backend=None, progress=progress)
    record = {"model": path, "protocols": list(protocols),
              "cr": {p: {s: m[p] for s, m in result["subsets"].items()} for p in protocols},
              "count": {s: m["count"] for s, m in result["subsets"].items()},
              "generate_unparsed": result.get("generate_unparsed"), "seconds": time.time() - started}
    write_json(out_json, record)
    return record


# ---------------------------------------------------------------------------------------------------
# Attention analyses on caption prompts
# ---------------------------------------------------------------------------------------------------

class CaptionPrompt:
    """One caption as the assistant's answer to "Describe the image.": ids (1, L), the image, the text
    rows (every token after the image) and the caption's own tokens (for its log-probability)."""

    def __init__(self, mllm, item, caption: str):
        conversation = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{DESCRIBE_PROMPT}"}, {"from": "gpt", "value": caption}]
        ids, labels = tokenize_conversation(conversation, mllm.tokenizer, mllm.num_image_tokens, sample_id=item.id)
        self.input_ids = torch.tensor([ids])
        self.answer = torch.tensor([label != -100 for label in labels])
        self.pixels = pixel_values(mllm.image_processor, [load_image(item.image_path, item.id)])
        start, length = visual_token_positions(self.input_ids, mllm.image_token_id, mllm.num_image_tokens)
        first_text = int(start[0]) + length
        self.rows = SliceRows(start, length, torch.tensor([first_text]), self.input_ids.shape[1] - first_text,
                              torch.ones(1, self.input_ids.shape[1] - first_text))


def _run(mllm, prompt: CaptionPrompt, probe=None):
    """(log-probability of the answer tokens, probe) for one prompt."""
    model = mllm.model
    device = next(model.parameters()).device
    rows = prompt.rows
    if probe is not None:
        probe.rows = SliceRows(rows.visual_start.to(device), rows.visual_len, rows.query_start.to(device),
                               rows.query_len, rows.row_weight.to(device))
    logits = model(input_ids=prompt.input_ids.to(device), pixel_values=prompt.pixels.to(device),
                   compodistill_probe=probe).logits[0, :-1].detach().float()
    targets = prompt.input_ids[0, 1:].to(device)
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    return float(token_log_probs[prompt.answer[1:].to(device)].sum()), probe


def _row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).mean())


@torch.inference_mode()
def caption_analysis(teacher, student, items, matches: dict, intervene_layers, *, mix: float = 0.5) -> dict:
    """The paper's three analyses on CR items, with captions as answers.

    - layer similarity: per student layer, the mean over items of the mean row cosine between the
      student's and its matched teacher layer's head-averaged attention over the visual keys (text
      query rows of the true caption's prompt);
    - answer probability by similarity: per item, the student's probability that the true caption wins,
      σ(log p(true) − log p(negative)), against its visual-attention similarity (mean over layers);
    - intervention: the student's caption-likelihood accuracy with its visual attention in
      `intervene_layers` replaced by (1 − mix)·student + mix·teacher (matched layer), and without.

    matches: {student layer: teacher layer}."""
    per_layer = {layer: 0.0 for layer in matches}
    per_item, correct = [], {"baseline": 0, "intervened": 0}
    for item in items:
        prompts = [CaptionPrompt(student, item, caption) for caption in (item.caption, item.negative)]
        _, t_probe = _run(teacher, prompts[0], AttentionProbe(prompts[0].rows, export={t: "rows" for t in set(matches.values())}))
        s_logp, s_probe = _run(student, prompts[0], AttentionProbe(prompts[0].rows, export={s: "rows" for s in matches}))
        sims = {s: _row_cosine(s_probe.slices[s][0], t_probe.slices[t][0]) for s, t in matches.items()}
        for layer, value in sims.items():
            per_layer[layer] += value
        n_logp, _ = _run(student, prompts[1])
        margin = s_logp - n_logp
        per_item.append((sum(sims.values()) / len(sims), 1.0 / (1.0 + math.exp(-max(min(margin, 50.0), -50.0)))))
        correct["baseline"] += int(margin > 0)
        intervened = []
        for prompt in prompts:
            _, t_rows = _run(teacher, prompt, AttentionProbe(prompt.rows, export={matches[s]: "rows" for s in intervene_layers}))
            targets = {s: t_rows.slices[matches[s]] for s in intervene_layers}
            logp, _ = _run(student, prompt, AttentionProbe(prompt.rows, intervene=targets, mix=mix))
            intervened.append(logp)
        correct["intervened"] += int(intervened[0] > intervened[1])
    n = len(items)
    return {"layer_similarity": {layer: total / n for layer, total in per_layer.items()}, "per_item": per_item,
            "intervention": {"layers": list(intervene_layers), "mix": mix, "items": n,
                             "baseline": correct["baseline"] / n, "intervened": correct["intervened"] / n}}


@torch.inference_mode()
def visual_attention_entropy(mllm, items) -> dict:
    """{layer: mean entropy (nats)} of the model's head-averaged attention over the visual keys,
    renormalised to sum to 1 per text row of the true caption's prompt; ln(visual tokens) is uniform.
    Where it is well below uniform the layer looks at particular image tokens, and aligning a student
    to it can teach where to look."""
    layers = range(parts.text_config(mllm).num_hidden_layers)
    totals = dict.fromkeys(layers, 0.0)
    for item in items:
        prompt = CaptionPrompt(mllm, item, item.caption)
        _, probe = _run(mllm, prompt, AttentionProbe(prompt.rows, export=dict.fromkeys(layers, "rows")))
        for layer in layers:
            rows = probe.slices[layer][0].double()
            p = rows / rows.sum(-1, keepdim=True).clamp_min(1e-300)
            totals[layer] += float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())
    return {layer: total / max(len(items), 1) for layer, total in totals.items()}


def bin_by_similarity(per_item, num_bins: int = 5) -> list[dict]:
    """Equal-width bins of attention similarity: count and mean probability of the true caption winning."""
    if not per_item:
        return []
    sims = [s for s, _ in per_item]
    lo, hi = min(sims), max(sims)
    width = (hi - lo) / num_bins or 1.0
    bins = [{"low": lo + i * width, "high": lo + (i + 1) * width, "count": 0, "sum": 0.0} for i in range(num_bins)]
    for sim, prob in per_item:
        b = bins[min(int((sim - lo) / width), num_bins - 1)]
        b["count"] += 1
        b["sum"] += prob
    return [{"low": b["low"], "high": b["high"], "count": b["count"],
             "mean_probability": b["sum"] / b["count"] if b["count"] else float("nan")} for b in bins]
