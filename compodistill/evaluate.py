"""`python -m compodistill.evaluate`: the paper's evaluation protocols on a model.

- Compositional reasoning (SugarCrepe format), three protocols (`evaluate_cr`):
  "generate", the paper's and the headline: the authors' prompt "Which caption best describes the
  image?\n(A) …\n (B) …\nAnswer with the option's alphabet from the given choices directly." asked with
  the true caption as (A) and again as (B), greedy generation of up to 32 tokens, the first standalone
  A or B of the output is the answer (none: wrong), a subset's score is the mean of the two orders and
  the headline the unweighted mean over subsets; "letter_logits": the same prompts, the letter with
  the larger next-token logit; "likelihood": the true caption is more probable than the negative as
  the answer to "Describe the image.".
- VQA (LLaVA question files): greedy short answers, exact match after the standard VQA answer
  normalisation against any acceptable answer.
- Yes/no hallucination: greedy answers parsed to yes/no; precision, recall and F1 with "yes" positive.

The functions `evaluate_cr`, `evaluate_vqa` and `evaluate_yes_no` take an `MLLM` and reader items
(compodistill.data.benchmarks), run the model in eval mode under `torch.inference_mode()` and restore
its training mode afterwards, so a trainer can call them between steps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from compodistill_kernels import BACKENDS

from .data.benchmarks import (CR_PROMPT, SHORT_ANSWER_PROMPT, default_image_folder, read_sugarcrepe, read_vqa,
                              read_yes_no, short_answer_prompt)
from .data.chat import encode_prompt, tokenize_conversation
from .data.images import load_image, pixel_values
from .models import IMAGE_TOKEN, enable_compodistill_attention, load_mllm

DESCRIBE_PROMPT = "Describe the image."


# ---------------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------------

@contextmanager
def _inference(model):
    # Each module's own mode comes back afterwards (a trainer may keep frozen parts in eval mode).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _prepare(mllm, items, backend, batch_size):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not items:
        raise ValueError("items: expected at least one item")
    if backend is not None:
        enable_compodistill_attention(mllm.model, backend)


def _chunks(sequence, size):
    for start in range(0, len(sequence), size):
        yield sequence[start:start + size]


def _pixels(mllm, items, ids):
    """Pixel values of the items' images, on the model's device and in its dtype."""
    images = [load_image(item.image_path, sample_id) for item, sample_id in zip(items, ids)]
    param = next(mllm.model.parameters())
    return pixel_values(mllm.image_processor, images).to(param.device, param.dtype)


def _left_pad(sequences, pad_id, device):
    """(input_ids, attention_mask) with every sequence ending at the last column."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence):] = 1
    return input_ids.to(device), mask.to(device)


def _forward_logits(mllm, sequences, pixels, keep: int):
    """Logits (B, keep, V) float32 of the last `keep` positions of the left-padded sequences."""
    input_ids, mask = _left_pad(sequences, mllm.tokenizer.pad_token_id, pixels.device)
    # Positions count real tokens only, as generate() does with left padding.
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = mllm.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels,
                     logits_to_keep=keep)
    return out.logits[:, -keep:].float()


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos, and ChatML's `<|im_end|>` when the vocabulary has it
    (a base Qwen tokenizer's eos is `<|endoftext|>`, while its chat turns end with `<|im_end|>`)."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return list(dict.fromkeys(i for i in ids if i is not None))


@contextmanager
def _greedy_generation(mllm, max_new_tokens: int):
    """Plain greedy decoding with a KV cache, stopping at an end-of-turn token: yields the
    GenerationConfig to pass to generate(). transformers fills every field a passed config leaves unset
    from model.generation_config, so that is replaced by a default one for the call: a checkpoint's
    generation_config.json (sampling, repetition penalty, ...) cannot change the protocol."""
    from transformers import GenerationConfig

    model = mllm.model
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               pad_token_id=mllm.tokenizer.pad_token_id,
                               eos_token_id=stop_token_ids(mllm.tokenizer))
    finally:
        model.generation_config = saved


def _generate(mllm, prompts, pixels, max_new_tokens: int) -> list[str]:
    """Greedy answers to left-padded prompts, decoded without special tokens and stripped."""
    input_ids, mask = _left_pad(prompts, mllm.tokenizer.pad_token_id, pixels.device)
    with _greedy_generation(mllm, max_new_tokens) as config:
        out = mllm.model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                                  generation_config=config)
    new_tokens = out[:, input_ids.shape[1]:]
    return [text.strip() for text in mllm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _progress(total, desc, progress):
    return tqdm(total=total, desc=desc, unit="item", disable=None if progress else True)


# ---------------------------------------------------------------------------------------------------
# Compositional reasoning
# ---------------------------------------------------------------------------------------------------

CR_PROTOCOLS = ("generate", "letter_logits", "likelihood")
CR_MAX_NEW_TOKENS = 32
_CHOICE = re.compile(r"\b([AB])\b")


def parse_choice(text: str) -> str | None:
    """The option an answer picks: its first standalone "A" or "B", None if there is none.

    As the authors' SugarCrepe script reads answers: the text is stripped and upper-cased first, so a
    lower-case "a" counts as A ("a red circle" → "A"); "(B)", "B.", "The answer is B" → "B"; "AB",
    "Apple", "" → None.
    """
    match = _CHOICE.search(text.strip().upper())
    return match.group(1) if match else None


def choice_settled(text: str) -> bool:
    """True when no continuation of `text` can change parse_choice(text): its first standalone letter
    is followed by a character that ends the word. A trailing U+FFFD (a multi-byte character whose
    first bytes alone were decoded) is not yet a character, so it settles nothing."""
    text = text.lstrip().upper().rstrip("\ufffd")
    match = _CHOICE.search(text)
    return match is not None and match.end() < len(text)


def letter_token_ids(tokenizer) -> tuple[int, int]:
    """The first tokens of the answers "A" and "B" (the assistant's first token when it answers)."""
    a = tokenizer("A", add_special_tokens=False)["input_ids"]
    b = tokenizer("B", add_special_tokens=False)["input_ids"]
    if not a or not b or a[0] == b[0]:
        raise ValueError("tokenizer: the answers 'A' and 'B' do not start with two distinct tokens")
    return a[0], b[0]


class _ChoiceSettled:
    """Stopping criterion for generate(): a row is done once its answer's choice is settled."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([choice_settled(text) for text in texts], dtype=torch.bool, device=input_ids.device)


def _generate_choices(mllm, prompts, pixels, max_new_tokens: int):
    """Greedy answers to the two-choice prompts: (answers, first-step logits (B, V) float32).

    One batched, KV-cached generate() call; a row stops at an end-of-turn token or as soon as its choice
    is settled (`choice_settled`), and the call ends when every row has stopped, so the parsed choice is
    the one a full `max_new_tokens` generation would give.
    """
    from transformers import StoppingCriteriaList

    input_ids, mask = _left_pad(prompts, mllm.tokenizer.pad_token_id, pixels.device)
    settled = StoppingCriteriaList([_ChoiceSettled(mllm.tokenizer, input_ids.shape[1])])
    with _greedy_generation(mllm, max_new_tokens) as config:
        out = mllm.model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                                  generation_config=config, stopping_criteria=settled, output_logits=True,
                                  return_dict_in_generate=True)
    answers = mllm.tokenizer.batch_decode(out.sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
    return [answer.strip() for answer in answers], out.logits[0].float()


def _caption_answer(mllm, caption, sample_id):
    """(ids of prompt + answer, answer length): the caption as the assistant's answer to DESCRIBE_PROMPT.

    The answer is the caption's tokens and the end-of-turn token (the caption is the whole answer);
    what the template writes after the end of turn is dropped.
    """
    conversation = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{DESCRIBE_PROMPT}"}, {"from": "gpt", "value": caption}]
    ids, labels = tokenize_conversation(conversation, mllm.tokenizer, mllm.num_image_tokens, sample_id=sample_id)
    start = next(i for i, label in enumerate(labels) if label != -100)
    stops = set(stop_token_ids(mllm.tokenizer))
    end = next((i + 1 for i in range(start, len(ids)) if ids[i] in stops), len(ids))
    return ids[:end], end - start


def _answer_log_probs(mllm, sequences, answer_lengths, pixels):
    """Summed log-probability of each sequence's last `answer_length` tokens given what precedes them."""
    longest = max(answer_lengths)
    # With left padding every answer ends at the last column: position p's token is predicted at p − 1.
    logits = _forward_logits(mllm, sequences, pixels, keep=longest + 1)[:, :-1]
    targets = torch.zeros(len(sequences), longest, dtype=torch.long)
    counted = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for row, (sequence, n) in enumerate(zip(sequences, answer_lengths)):
        targets[row, longest - n:] = torch.tensor(sequence[-n:])
        counted[row, longest - n:] = True
    targets, counted = targets.to(logits.device), counted.to(logits.device)
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return token_log_probs.masked_fill(~counted, 0.0).sum(-1)


def _cr_metrics(records, protocols) -> dict:
    """Accuracy per protocol (two-choice ones: the mean of the two orders), per-order accuracies, the
    generate protocol's unparsed answers and the item count."""
    n = len(records)
    metrics, orders = {}, {}
    for protocol in protocols:
        if protocol == "likelihood":
            metrics[protocol] = sum(r["correct"]["likelihood"] for r in records) / n
            continue
        as_a = sum(r["correct"][protocol][0] for r in records) / n
        as_b = sum(r["correct"][protocol][1] for r in records) / n
        metrics[protocol] = (as_a + as_b) / 2
        orders[protocol] = {"positive_as_a": as_a, "positive_as_b": as_b}
    if "generate" in protocols:
        metrics["generate_unparsed"] = sum((r["choice_positive_as_a"] is None) + (r["choice_positive_as_b"] is None)
                                           for r in records)
    return {**metrics, "orders": orders, "count": n}


def _check_protocols(protocols) -> tuple:
    if isinstance(protocols, str) or not isinstance(protocols, (list, tuple)) or not protocols:
        raise ValueError(f"protocols: expected a non-empty list of {CR_PROTOCOLS}, got {protocols!r}")
    unknown = [p for p in protocols if p not in CR_PROTOCOLS]
    if unknown or len(set(protocols)) != len(protocols):
        raise ValueError(f"protocols: expected distinct names from {CR_PROTOCOLS}, got {list(protocols)!r}")
    return tuple(protocols)


def evaluate_cr(mllm, items, *, protocols=CR_PROTOCOLS, prompt: str = CR_PROMPT,
                max_new_tokens: int = CR_MAX_NEW_TOKENS, batch_size: int = 8, backend: str | None = "auto",
                progress: bool = True, details: bool = False) -> dict:
    """Compositional-reasoning accuracy on two-caption items, by up to three protocols.

    - "generate" (the paper's, the headline by default): `prompt` (the authors' SugarCrepe prompt,
      `CR_PROMPT`) after the image, through the model's chat template; greedy generation of at most
      `max_new_tokens` (32) tokens; the answer is `parse_choice` of the output (its first standalone A
      or B, case-insensitive as in the authors' script) and an unparsed answer is wrong. Asked with the
      true caption as (A) and again as (B); an item's score is the mean of the two orders.
    - "letter_logits": the same prompts in both orders; an order is right when the next-token logit of
      the letter of the true caption exceeds the other letter's (a tie is wrong in both orders), read
      from the first step of the same generation.
    - "likelihood": the summed log-probability of each caption (and the end-of-turn token) as the
      assistant's answer to "Describe the image."; right when the true caption's is the higher.

    Args:
        mllm: an `MLLM` (model, tokenizer, image processor).
        items: CRItems (a list, or read_sugarcrepe's {subset: [items]}).
        protocols: a non-empty list of names from CR_PROTOCOLS; the first is the headline.
        prompt: the two-choice question with {first} and {second} placeholders.
        max_new_tokens: the generation limit of the generate protocol (32).
        batch_size: sequences per forward pass (each item needs two: both orders, or both captions).
        backend: compodistill attention backend to enable on the model first ("auto", "torch",
            "triton"), or None to leave the model's attention as it is.
        progress: show a tqdm bar.
        details: also return every item's record under "items".

    Returns {"subsets": {name: metrics}, "average": the unweighted mean over subsets of each protocol's
    accuracy (the paper's headline), "overall": metrics over all items, "headline": {"protocol",
    "value"}, "generate_unparsed": unparsed generated answers over both orders (if generate ran),
    "protocols": what each protocol asked}. metrics = {<protocol>: accuracy for each protocol,
    "generate_unparsed", "orders": {<two-choice protocol>: {"positive_as_a", "positive_as_b"}},
    "count"}. A model that always answers "A" scores positive_as_a = 1, positive_as_b = 0, 0.5.
    """
    if isinstance(items, dict):
        items = [item for group in items.values() for item in group]
    protocols = _check_protocols(protocols)
    if not isinstance(prompt, str) or "{first}" not in prompt or "{second}" not in prompt:
        raise ValueError(f"prompt: expected a string with {{first}} and {{second}} placeholders, got {prompt!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    _prepare(mllm, items, backend, batch_size)
    token_a, token_b = letter_token_ids(mllm.tokenizer)
    tokenizer, n_image = mllm.tokenizer, mllm.num_image_tokens
    two_choice = "generate" in protocols or "letter_logits" in protocols
    records = []
    with _inference(mllm.model), _progress(len(items), "CR", progress) as bar:
        for chunk in _chunks(items, max(1, batch_size // 2)):
            ids = [f"{item.subset}/{item.id}" for item in chunk]
            pixels = _pixels(mllm, chunk, ids).repeat_interleave(2, 0)
            chunk_records = [{"subset": item.subset, "id": item.id, "correct": {}} for item in chunk]
            if two_choice:
                prompts = [encode_prompt(prompt.format(first=first, second=second), tokenizer, n_image)
                           for item in chunk
                           for first, second in ((item.caption, item.negative), (item.negative, item.caption))]
                if "generate" in protocols:
                    answers, first_logits = _generate_choices(mllm, prompts, pixels, max_new_tokens)
                else:
                    answers, first_logits = None, _forward_logits(mllm, prompts, pixels, keep=1)[:, -1]
                margins = (first_logits[:, token_a] - first_logits[:, token_b]).view(-1, 2).tolist()
                for row, record in enumerate(chunk_records):
                    m_a, m_b = margins[row]
                    record.update(margin_positive_as_a=m_a, margin_positive_as_b=m_b)
                    if "letter_logits" in protocols:
                        record["correct"]["letter_logits"] = (m_a > 0, m_b < 0)
                    if answers is not None:
                        choice_a, choice_b = parse_choice(answers[2 * row]), parse_choice(answers[2 * row + 1])
                        record.update(answer_positive_as_a=answers[2 * row], answer_positive_as_b=answers[2 * row + 1],
                                      choice_positive_as_a=choice_a, choice_positive_as_b=choice_b)
                        record["correct"]["generate"] = (choice_a == "A", choice_b == "B")
            if "likelihood" in protocols:
                sequences, lengths = [], []
                for item, sample_id in zip(chunk, ids):
                    for caption in (item.caption, item.negative):
                        sequence, n = _caption_answer(mllm, caption, sample_id)
                        sequences.append(sequence)
                        lengths.append(n)
                log_probs = _answer_log_probs(mllm, sequences, lengths, pixels).view(-1, 2).tolist()
                for record, (lp_pos, lp_neg) in zip(chunk_records, log_probs):
                    record.update(log_prob_positive=lp_pos, log_prob_negative=lp_neg)
                    record["correct"]["likelihood"] = lp_pos > lp_neg
            records += chunk_records
            bar.update(len(chunk))

    by_subset = defaultdict(list)
    for record in records:
        by_subset[record["subset"]].append(record)
    subsets = {name: _cr_metrics(group, protocols) for name, group in sorted(by_subset.items())}
    average = {p: sum(s[p] for s in subsets.values()) / len(subsets) for p in protocols}
    described = {
        "generate": {"prompt": prompt, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                     "answer": "first standalone A or B of the upper-cased output; none is wrong"},
        "letter_logits": {"prompt": prompt, "answer": "larger next-token logit of the letters A and B"},
        "likelihood": {"prompt": DESCRIBE_PROMPT,
                       "answer": "larger summed log-probability of the caption as the answer"},
    }
    result = {
        "subsets": subsets,
        "average": {**average, "subsets": len(subsets)},
        "overall": _cr_metrics(records, protocols),
        "headline": {"protocol": protocols[0], "value": average[protocols[0]]},
        "protocols": {p: described[p] for p in protocols},
    }
    if "generate" in protocols:
        result["generate_unparsed"] = result["overall"]["generate_unparsed"]
    if details:
        result["items"] = records
    return result


# ---------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------

# The official VQA evaluation's normalisation (VQA eval script, processPunctuation/processDigitArticle).
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe are put back ("dont" → "don't"); words that are also
# ordinary words without the apostrophe (well, were, shed, hell, its, ...) are left out.
_CONTRACTIONS = {c.replace("'", ""): c for c in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've "
    "shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've twas wasn't we'd've we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who're who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've").split()}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # a period not followed by a digit


def normalize_answer(text: str) -> str:
    """The standard VQA answer normalisation: lower-case; punctuation removed (a period is kept only as a
    decimal point: "3.5" stays); articles a/an/the dropped; number words zero..ten (and "none") to
    digits; apostrophe-less contractions fixed ("dont" → "don't"). "Two" → "2", "the red circle." →
    "red circle", "Yes!" → "yes"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # As in the official script: a mark next to a space (or in text with a 1,000-style number) is
    # deleted, one inside a word becomes a space ("black-and-white" → "black and white").
    spaced_out = bool(_COMMA_IN_NUMBER.search(text))
    for mark in _PUNCTUATION:
        if spaced_out or mark + " " in text or " " + mark in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _answer_all(mllm, items, *, batch_size, max_new_tokens, backend, progress, desc) -> list[str]:
    _prepare(mllm, items, backend, batch_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    predictions = []
    with _inference(mllm.model), _progress(len(items), desc, progress) as bar:
        for chunk in _chunks(items, batch_size):
            prompts = [encode_prompt(short_answer_prompt(item.question), mllm.tokenizer, mllm.num_image_tokens)
                       for item in chunk]
            pixels = _pixels(mllm, chunk, [item.question_id for item in chunk])
            predictions += _generate(mllm, prompts, pixels, max_new_tokens)
            bar.update(len(chunk))
    return predictions


def evaluate_vqa(mllm, items, *, batch_size: int = 8, max_new_tokens: int = 10, backend: str | None = "auto",
                 progress: bool = True, details: bool = False) -> dict:
    """Open-ended VQA accuracy by exact match after `normalize_answer`, against any acceptable answer.

    Greedy generation (no sampling) of at most `max_new_tokens` tokens answering each question with
    LLaVA's short-answer instruction appended. Returns {"accuracy", "count", "categories": {category:
    {"accuracy", "count"}}} (categories only for items that have one), plus "items" (question_id,
    prediction, correct) if `details`. backend: as in `evaluate_cr`.
    """
    predictions = _answer_all(mllm, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              backend=backend, progress=progress, desc="VQA")
    records = []
    for item, prediction in zip(items, predictions):
        accepted = {normalize_answer(a) for a in item.answers}
        records.append({"question_id": item.question_id, "category": item.category, "prediction": prediction,
                        "correct": normalize_answer(prediction) in accepted})

    def metrics(group):
        return {"accuracy": sum(r["correct"] for r in group) / len(group), "count": len(group)}

    by_category = defaultdict(list)
    for record in records:
        if record["category"] is not None:
            by_category[str(record["category"])].append(record)
    result = {**metrics(records), "categories": {c: metrics(g) for c, g in sorted(by_category.items())},
              "protocol": {"suffix": SHORT_ANSWER_PROMPT, "max_new_tokens": max_new_tokens}}
    if details:
        result["items"] = records
    return result


# ---------------------------------------------------------------------------------------------------
# Yes/no hallucination
# ---------------------------------------------------------------------------------------------------

def parse_yes_no(text: str) -> str | None:
    """"yes" or "no" from an answer's first word ("Yes, there is." → "yes"); None if it is neither."""
    match = re.search(r"[a-z]+", text.lower())
    word = match.group(0) if match else None
    return word if word in ("yes", "no") else None


def _yes_no_metrics(records) -> dict:
    n = len(records)
    said_yes = [r["parsed"] == "yes" for r in records]
    is_yes = [r["label"] == "yes" for r in records]
    true_pos = sum(s and y for s, y in zip(said_yes, is_yes))
    precision = true_pos / sum(said_yes) if any(said_yes) else 0.0
    recall = true_pos / sum(is_yes) if any(is_yes) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": sum(r["parsed"] == r["label"] for r in records) / n,
            "yes_ratio": sum(said_yes) / n, "unparsed": sum(r["parsed"] is None for r in records), "count": n}


def evaluate_yes_no(mllm, items, *, batch_size: int = 8, max_new_tokens: int = 10, backend: str | None = "auto",
                    progress: bool = True, details: bool = False) -> dict:
    """Yes/no hallucination metrics with "yes" as the positive class.

    Greedy answers (with LLaVA's short-answer instruction) are parsed by their first word; an answer
    that is neither yes nor no counts as a wrong "not yes" and is counted under "unparsed". Returns
    {"precision", "recall", "f1", "accuracy", "yes_ratio", "unparsed", "count", "categories":
    {category: the same}} (precision or recall with an empty denominator is 0), plus "items" if
    `details`. backend: as in `evaluate_cr`.
    """
    predictions = _answer_all(mllm, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              backend=backend, progress=progress, desc="yes/no")
    records = [{"question_id": item.question_id, "category": item.category, "label": item.label,
                "prediction": prediction, "parsed": parse_yes_no(prediction)}
               for item, prediction in zip(items, predictions)]
    by_category = defaultdict(list)
    for record in records:
        if record["category"] is not None:
            by_category[str(record["category"])].append(record)
    result = {**_yes_no_metrics(records),
              "categories": {c: _yes_no_metrics(g) for c, g in sorted(by_category.items())},
              "protocol": {"suffix": SHORT_ANSWER_PROMPT, "max_new_tokens": max_new_tokens}}
    if details:
        result["items"] = records
    return result


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def _pct(x) -> str:
    return f"{100 * x:.1f}"


_PROTOCOL_TITLES = {"generate": "generate", "letter_logits": "letter logits", "likelihood": "likelihood"}


def _cr_markdown(cr: dict) -> list[str]:
    protocols = [p for p in CR_PROTOCOLS if p in cr["average"]]
    headline = cr["headline"]["protocol"]
    titles = [_PROTOCOL_TITLES[p] + (" (headline)" if p == headline else "") for p in protocols]
    unparsed = "generate" in protocols
    lines = ["## Compositional reasoning", "",
             f"Headline: **{_pct(cr['headline']['value'])} %**, the {_PROTOCOL_TITLES[headline]} protocol "
             "averaged over subsets (unweighted). Accuracies in percent; each column is one protocol:", ""]
    legend = {
        "generate": "greedy answer (up to {max_new_tokens} tokens) to the two-choice prompt, asked with the "
                    "true caption as (A) and as (B); the first standalone A or B (either case) is the answer, "
                    "none is wrong; mean of the two orders",
        "letter_logits": "the same prompts; the letter with the larger next-token logit; mean of the two orders",
        "likelihood": "the true caption has the larger summed log-probability as the answer to "
                      "\"Describe the image.\"",
    }
    for p in protocols:
        lines.append(f"- {_PROTOCOL_TITLES[p]}: " + legend[p].format(**cr["protocols"][p]))
    lines += ["", "| subset | " + " | ".join(titles) + (" | unparsed (generate) |" if unparsed else " |") + " n |",
              "|---|" + "---:|" * (len(protocols) + unparsed + 1)]
    total = sum(s["count"] for s in cr["subsets"].values())
    rows = list(cr["subsets"].items()) + [("**average** (over subsets)", {**cr["average"], "count": total}),
                                          ("overall (all items)", cr["overall"])]
    for name, m in rows:
        cells = [_pct(m[p]) for p in protocols]
        if unparsed:
            cells.append(str(m.get("generate_unparsed", cr["overall"]["generate_unparsed"])))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['count']} |")
    lines.append("")
    return lines


def markdown_report(results: dict, model: str) -> str:
    """Markdown tables of `results` ({"cr"?, "vqa"?, "hallucination"?}), accuracies in percent."""
    lines = [f"# Evaluation of `{model}`", ""]
    if "cr" in results:
        lines += _cr_markdown(results["cr"])
    if "vqa" in results:
        vqa = results["vqa"]
        lines += ["## VQA", "", "| category | accuracy | n |", "|---|---:|---:|",
                  f"| **all** | {_pct(vqa['accuracy'])} | {vqa['count']} |"]
        lines += [f"| {c} | {_pct(m['accuracy'])} | {m['count']} |" for c, m in vqa["categories"].items()]
        lines.append("")
    if "hallucination" in results:
        yn = results["hallucination"]
        lines += ["## Yes/no hallucination", "",
                  "| category | precision | recall | F1 | accuracy | yes ratio | unparsed | n |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in [("**all**", yn)] + list(yn["categories"].items()):
            lines.append(f"| {name} | {_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['f1'])} | "
                         f"{_pct(m['accuracy'])} | {_pct(m['yes_ratio'])} | {m['unparsed']} | {m['count']} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m compodistill.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="preset name (tiny-teacher, tiny-student) or checkpoint folder")
    p.add_argument("--cr", help="folder of SugarCrepe-format subset JSON files")
    p.add_argument("--cr-images", help="image folder of --cr (default: DIR/images or DIR/../images)")
    p.add_argument("--subsets", help="comma-separated CR subsets (default: every *.json in --cr)")
    p.add_argument("--vqa", help="LLaVA-format VQA question jsonl")
    p.add_argument("--vqa-answers", help="answers jsonl or VQAv2 annotations JSON (default: answers.jsonl "
                                         "next to --vqa if it exists)")
    p.add_argument("--vqa-images", help="image folder of --vqa (default: the synthetic layout's images/)")
    p.add_argument("--hallucination", help="yes/no question jsonl with labels")
    p.add_argument("--hallucination-answers", help="jsonl of {question_id, label} if labels are separate")
    p.add_argument("--hallucination-images", help="image folder of --hallucination (default: the synthetic "
                                                  "layout's images/)")
    p.add_argument("--out", default="eval_results", help="output folder (default ./eval_results)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=10, help="answer length limit for VQA and yes/no")
    p.add_argument("--cr-protocols", default=",".join(CR_PROTOCOLS),
                   help="comma-separated CR protocols, the first is the headline (default: "
                        f"{','.join(CR_PROTOCOLS)})")
    p.add_argument("--cr-max-new-tokens", type=int, default=CR_MAX_NEW_TOKENS,
                   help=f"answer length limit of the CR generate protocol (default {CR_MAX_NEW_TOKENS})")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each subset / file")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="attention kernels backend (default auto: triton on CUDA, torch otherwise)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed for preset weights and torch (default 0)")
    args = p.parse_args(argv)
    if not (args.cr or args.vqa or args.hallucination):
        p.error("nothing to evaluate: give at least one of --cr DIR, --vqa FILE, --hallucination FILE")
    protocols = [p.strip() for p in args.cr_protocols.split(",") if p.strip()]
    if not protocols or any(name not in CR_PROTOCOLS for name in protocols) or len(set(protocols)) != len(protocols):
        p.error(f"--cr-protocols: expected distinct names from {','.join(CR_PROTOCOLS)}, got {args.cr_protocols!r}")
    args.cr_protocols = protocols
    for name in ("batch_size", "max_new_tokens", "cr_max_new_tokens", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    return args


def _image_folder(given, questions, flag):
    folder = given or default_image_folder(questions)
    if folder is None:
        raise ValueError(f"{flag}: not given, and no images/ folder found next to {questions!r} "
                         "or one or two levels up")
    return folder


def _versions() -> dict:
    import platform

    import transformers

    from . import __version__

    return {"compodistill": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        benchmarks, mllm = _load(args)
    except ValueError as err:  # bad files, samples or model spec: a message, not a traceback
        raise SystemExit(f"python -m compodistill.evaluate: error: {err}") from None
    enable_compodistill_attention(mllm.model, args.backend)
    common = dict(batch_size=args.batch_size, backend=None)
    results = {}
    if "cr" in benchmarks:
        results["cr"] = evaluate_cr(mllm, benchmarks["cr"], protocols=args.cr_protocols,
                                    max_new_tokens=args.cr_max_new_tokens, **common)
    if "vqa" in benchmarks:
        results["vqa"] = evaluate_vqa(mllm, benchmarks["vqa"], max_new_tokens=args.max_new_tokens, **common)
    if "hallucination" in benchmarks:
        results["hallucination"] = evaluate_yes_no(mllm, benchmarks["hallucination"],
                                                   max_new_tokens=args.max_new_tokens, **common)

    report = markdown_report(results, args.model)
    os.makedirs(args.out, exist_ok=True)
    record = {"model": args.model, "arguments": vars(args), "date": datetime.now(timezone.utc).isoformat(),
              "versions": _versions(), "results": results}
    with open(os.path.join(args.out, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "eval.md"), "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    print(f"wrote {os.path.join(args.out, 'eval.json')} and eval.md", file=sys.stderr)
    return 0


def _load(args):
    """The benchmarks (read first, so a bad file fails before the model loads) and the model.
    The defaults found are written back into args, so eval.json records the files actually used."""
    benchmarks = {}
    if args.cr:
        args.cr_images = args.cr_images or default_image_folder(args.cr)
        subsets = read_sugarcrepe(args.cr, args.cr_images, args.subsets)
        benchmarks["cr"] = [item for group in subsets.values() for item in group[:args.limit]]
    if args.vqa:
        next_to = os.path.join(os.path.dirname(args.vqa), "answers.jsonl")
        if args.vqa_answers is None and os.path.isfile(next_to):
            args.vqa_answers = next_to
        args.vqa_images = _image_folder(args.vqa_images, args.vqa, "--vqa-images")
        benchmarks["vqa"] = read_vqa(args.vqa, args.vqa_images, args.vqa_answers)[:args.limit]
    if args.hallucination:
        args.hallucination_images = _image_folder(args.hallucination_images, args.hallucination,
                                                  "--hallucination-images")
        benchmarks["hallucination"] = read_yes_no(args.hallucination, args.hallucination_images,
                                                  args.hallucination_answers)[:args.limit]

    mllm = load_mllm(args.model, torch_dtype=getattr(torch, args.dtype), seed=args.seed)
    mllm.model.to(args.device)
    return benchmarks, mllm


if __name__ == "__main__":
    sys.exit(main())
