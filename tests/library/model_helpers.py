"""Tiny teacher/student LLaVAs and batches for the model, attention-integration and distillation tests,
plus an independent eager reference of the three losses.

The reference takes the full attention maps from transformers' eager attention (`output_attentions`)
and finds each sample's rows with plain Python loops, so it shares no code with the fused path.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from compodistill.models import apply_taf, build_preset, parts

BACKENDS = ("torch", "triton")  # the two concrete backends ("auto" picks one)


@functools.lru_cache(maxsize=None)
def _cached(name: str, seed: int):
    mllm = build_preset(name, seed=seed)
    # Freshly initialised scores are ~0, so every attention row is nearly uniform and teacher and student
    # agree to 1e-5: a VAT test would then compare rounding noise. Sharper queries and keys give peaked,
    # model-specific attention maps.
    with torch.no_grad():
        for name_, param in parts.language_model(mllm).named_parameters():
            if "q_proj.weight" in name_ or "k_proj.weight" in name_:
                param.mul_(6.0)
    return mllm


def tiny(name: str, seed: int = 0):
    """A fresh copy of a tiny preset (building once per session; copies keep tests independent)."""
    return copy.deepcopy(_cached(name, seed))


def tiny_pair(taf: bool = True):
    teacher, student = tiny("tiny-teacher", 1), tiny("tiny-student", 2)
    if taf:
        apply_taf(student, teacher)
    return teacher, student


def make_batch(mllm, *, padding="right", B=3, L=44, seed=0, answer_gap=False):
    """A batch with one image per sample at different offsets, prompts and answers of different
    lengths, padded left or right. Labels supervise the answer span (with a hole if `answer_gap`)."""
    g = torch.Generator().manual_seed(seed)
    nv, image_id, pad_id = mllm.num_image_tokens, mllm.image_token_id, mllm.tokenizer.pad_token_id
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b in range(B):
        n = L - 2 * b - 3  # real length differs per sample
        prompt = 2 + 3 * b
        sample = torch.randint(0, 800, (n,), generator=g)
        sample[prompt:prompt + nv] = image_id
        start = 0 if padding == "right" else L - n
        ids[b, start:start + n] = sample
        mask[b, start:start + n] = 1
        answer_from = start + prompt + nv + 4
        labels[b, answer_from:start + n] = ids[b, answer_from:start + n]
        if answer_gap:
            labels[b, answer_from + 2:answer_from + 4] = -100
    pixels = torch.randn(B, 3, 64, 64, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)


def eager_copy(model):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation({"text_config": "eager"})
    return ref


def _rows_of_sample(which, ids, mask, labels, image_id):
    positions = [i for i, t in enumerate(ids.tolist()) if t == image_id]
    vs, nv = positions[0], len(positions)
    real = [i for i, m in enumerate(mask.tolist()) if m]
    if which == "visual":
        rows = list(range(vs, vs + nv))
    elif which == "text":
        rows = [i for i in real if i >= vs + nv]
    elif which == "answer":
        rows = [i for i in real if i >= vs + nv and labels[i] != -100]
    else:
        rows = [i for i in real if i >= vs]
    return vs, nv, rows


def _block_keep(a, t):
    """The authors' sink filter on one sample's block (rows × visual keys): each side below its own
    mean + Bessel-corrected std over the whole block, and a non-zero teacher entry."""
    return (a.detach() <= a.detach().mean() + a.detach().std()) & (t <= t.mean() + t.std()) & (t != 0)


def _row_losses(a, t, loss, eps):
    if loss == "cosine":
        return 1 - F.cosine_similarity(a, t, dim=-1, eps=eps)
    if loss == "mse":
        return ((a - t) ** 2).mean(-1)
    pt = t.clamp_min(0) / t.sum(-1, keepdim=True).clamp_min(eps)
    ps = a.clamp_min(0) / a.sum(-1, keepdim=True).clamp_min(eps)
    return (pt * ((pt + eps).log() - (ps + eps).log())).sum(-1)


def eager_losses(student_model, teacher_model, batch, config, matches):
    """lm, kd and vat of `config` computed from eager logits and eager attention maps."""
    s_ref, t_ref = eager_copy(student_model), eager_copy(teacher_model)
    t_ref.eval()
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], output_attentions=True)
    with torch.no_grad():
        t_out = t_ref(**kw)
    s_out = s_ref(**kw)
    labels = batch["labels"]
    logits = s_out.logits[:, :-1].float()
    target = labels[:, 1:]
    sel = target != -100
    out = {"lm": F.cross_entropy(logits[sel], target[sel])}
    w = config.weights.as_dict()
    if w["kd"] > 0:
        T = config.kd.temperature
        vs = logits.shape[-1]
        log_ps = F.log_softmax(logits[sel] / T, -1)
        log_pt = F.log_softmax(t_out.logits[:, :-1].float()[sel][:, :vs] / T, -1)
        out["kd"] = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * T * T
    if w["vat"] > 0:
        vat = config.vat
        per_layer = []
        for match in matches:
            num, den = 0.0, 0.0
            for b in range(labels.shape[0]):
                vs, nv, rows = _rows_of_sample(vat.query_rows, batch["input_ids"][b], batch["attention_mask"][b],
                                               labels[b], student_model.config.image_token_id)
                if not rows:
                    continue
                a = s_out.attentions[match.student_layer][b].float().mean(0)[rows][:, vs:vs + nv]
                t = torch.stack([t_out.attentions[layer][b].float().mean(0)[rows][:, vs:vs + nv]
                                 for layer in match.teacher_layers]).mean(0)
                keep = _block_keep(a, t).to(a.dtype) if vat.sink_filter else torch.ones_like(a)
                if vat.reduce == "mean":
                    count = keep.sum(0, keepdim=True).clamp_min(1)
                    a, t = (a * keep).sum(0, keepdim=True) / count, (t * keep).sum(0, keepdim=True) / count
                else:
                    a, t = a * keep, t * keep
                r = _row_losses(a, t, vat.loss, vat.eps)
                num, den = num + r.sum(), den + r.numel()
            per_layer.append(num / den)
        stacked = torch.stack(per_layer)
        out["vat"] = stacked.sum() if vat.layer_reduction == "sum" else stacked.mean()
    out["loss"] = sum(w[k] * v for k, v in out.items())
    return out, s_ref


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def worst_grad_error(got: dict, want: dict) -> float:
    """max over parameters of ‖g − r‖ / max(‖r‖, 1e-3 · largest ‖r‖). The floor keeps gradients that are
    zero in exact arithmetic (a key bias shifts every score of a row alike) from dividing noise by noise."""
    assert got.keys() == want.keys()
    floor = 1e-3 * max(r.norm().item() for r in want.values())
    return max(((got[n].double() - want[n].double()).norm() / max(want[n].norm().item(), floor)).item()
               for n in want)
