"""Benchmark readers, answer normalisation, the evaluation protocols on rigged models, and the CLI.

The data are small hand-written files in each official layout (SugarCrepe subset JSON, LLaVA question
jsonl with an answers jsonl, VQAv2 annotations, POPE-style yes/no jsonl). The protocols are checked on
a tiny model whose logits are rigged by a forward hook, so the expected metrics are known exactly.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from compodistill.data.benchmarks import CRItem, read_sugarcrepe, read_vqa, read_yes_no
from compodistill.data.chat import BadSample
from compodistill.data.benchmarks import CR_PROMPT
from compodistill.models import IMAGE_TOKEN
from compodistill.evaluate import (CR_PROTOCOLS, _caption_answer, choice_settled, evaluate_cr, evaluate_vqa,
                                   evaluate_yes_no, letter_token_ids, main, normalize_answer, parse_choice,
                                   parse_yes_no, stop_token_ids)
from ..common import REPO
from .model_helpers import tiny


CR_DATA = {
    "swap_att": {
        "0": {"filename": "s0.png", "caption": "a red circle and a blue square",
              "negative_caption": "a blue circle and a red square"},
        "1": {"filename": "s1.png", "caption": "a green star above a yellow ring",
              "negative_caption": "a yellow star above a green ring"},
    },
    "replace_att": {
        "7": {"filename": "s2.png", "caption": "red circle", "negative_caption": "blue circle"},
        "8": {"filename": "s3.png", "caption": "red square left of a star",
              "negative_caption": "green square left of a star"},
        "9": {"filename": "s0.png", "caption": "two red hearts", "negative_caption": "two pink hearts"},
    },
}
VQA_QUESTIONS = [
    {"question_id": 1, "image": "s0.png", "text": "How many circles are there?", "category": "counting"},
    {"question_id": 2, "image": "s1.png", "text": "How many stars?", "category": "counting"},
    {"question_id": 3, "image": "s2.png", "text": "What color is the circle?", "category": "attribute"},
    {"question_id": 4, "image": "s3.png",
     "text": "How many squares?\nAnswer the question using a single word or phrase.", "category": "counting"},
]
VQA_ANSWERS = [{"question_id": 1, "answers": ["2", "two"]}, {"question_id": 2, "answer": "Two."},
               {"question_id": 3, "answers": ["red"]}, {"question_id": 4, "answers": ["3"]}]
YES_NO = [
    {"question_id": "a", "image": "s0.png", "text": "Is there a red circle?", "label": "yes", "category": "object"},
    {"question_id": "b", "image": "s1.png", "text": "Is there a blue ring?", "label": "no", "category": "object"},
    {"question_id": "c", "image": "s2.png", "text": "Is the star above the ring?", "label": "Yes",
     "category": "relation"},
    {"question_id": "d", "image": "s3.png", "text": "Is the square left of the star?", "label": "NO.",
     "category": "relation"},
    {"question_id": "e", "image": "s0.png", "text": "Is there a green heart?", "label": "no", "category": "object"},
]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def _vqa_items(bench, answers=None):
    return read_vqa(str(bench / "vqa" / "questions.jsonl"), str(bench / "images"),
                    answers or str(bench / "vqa" / "answers.jsonl"))


@pytest.fixture
def bench(tmp_path):
    """The synthetic layout: DIR/images, DIR/cr/<subset>.json, DIR/vqa/{questions,answers}.jsonl,
    DIR/hallucination/questions.jsonl."""
    root = tmp_path / "bench"
    for sub in ("images", "cr", "vqa", "hallucination"):
        (root / sub).mkdir(parents=True)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, color in enumerate(colors):
        Image.new("RGB", (64, 64), color).save(root / "images" / f"s{i}.png")
    for subset, data in CR_DATA.items():
        _write_json(root / "cr" / f"{subset}.json", data)
    _write_jsonl(root / "vqa" / "questions.jsonl", VQA_QUESTIONS)
    _write_jsonl(root / "vqa" / "answers.jsonl", VQA_ANSWERS)
    _write_jsonl(root / "hallucination" / "questions.jsonl", YES_NO)
    return root


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------

def test_read_sugarcrepe_finds_subsets_and_the_image_folder(bench):
    subsets = read_sugarcrepe(str(bench / "cr"))
    assert list(subsets) == ["replace_att", "swap_att"]
    first = subsets["swap_att"][0]
    assert first == CRItem("swap_att", "0", str(bench / "images" / "s0.png"), "a red circle and a blue square",
                           "a blue circle and a red square")
    assert [item.id for item in subsets["replace_att"]] == ["7", "8", "9"]
    only = read_sugarcrepe(str(bench / "cr"), str(bench / "images"), "replace_att")
    assert list(only) == ["replace_att"]
    with pytest.raises(ValueError, match="subsets: no file swap_obj.json"):
        read_sugarcrepe(str(bench / "cr"), subsets=["swap_obj"])


def test_read_sugarcrepe_bad_inputs(bench, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    _write_json(lone / "add_obj.json", CR_DATA["replace_att"])
    with pytest.raises(ValueError, match="image_folder.*COCO val2017"):
        read_sugarcrepe(str(lone))

    _write_json(bench / "cr" / "add_obj.json", {"5": {"filename": "gone.png", "caption": "x", "negative_caption": "y"}})
    with pytest.raises(BadSample) as err:
        read_sugarcrepe(str(bench / "cr"), subsets=["add_obj"])
    assert err.value.sample_id == "add_obj/5" and err.value.reason == "missing image"

    _write_json(bench / "cr" / "add_obj.json", {"6": {"filename": "s0.png", "caption": "x"}})
    with pytest.raises(BadSample) as err:
        read_sugarcrepe(str(bench / "cr"), subsets=["add_obj"])
    assert err.value.sample_id == "add_obj/6" and err.value.reason == "missing negative_caption"

    (bench / "cr" / "add_obj.json").write_text('{"1": {"filename": ')
    with pytest.raises(ValueError, match="add_obj.json.*not valid JSON"):
        read_sugarcrepe(str(bench / "cr"))


def test_read_vqa_from_answers_jsonl_and_vqav2_annotations(bench, tmp_path):
    items = _vqa_items(bench)
    assert [i.question_id for i in items] == [1, 2, 3, 4]
    assert items[0].answers == ("2", "two") and items[1].answers == ("Two.",)
    assert items[2].category == "attribute" and items[2].image_path == str(bench / "images" / "s2.png")

    annotations = {"annotations": [
        {"question_id": q["question_id"], "multiple_choice_answer": "2",
         "answers": [{"answer": "2", "answer_id": 1}, {"answer": "two", "answer_id": 2},
                     {"answer": "2", "answer_id": 3}]}
        for q in VQA_QUESTIONS]}
    _write_json(tmp_path / "v2_annotations.json", annotations)
    items = _vqa_items(bench, str(tmp_path / "v2_annotations.json"))
    assert all(item.answers == ("2", "two") for item in items)

    _write_jsonl(tmp_path / "partial.jsonl", VQA_ANSWERS[:2] + VQA_ANSWERS[3:])
    with pytest.raises(BadSample) as err:
        read_vqa(str(bench / "vqa" / "questions.jsonl"), str(bench / "images"), str(tmp_path / "partial.jsonl"))
    assert err.value.sample_id == 3 and err.value.reason == "missing answer"


def test_read_vqa_bad_questions(bench, tmp_path):
    _write_jsonl(tmp_path / "q.jsonl", VQA_QUESTIONS[:1] + [{"question_id": 9, "image": "nope.png", "text": "?"}])
    with pytest.raises(BadSample) as err:
        read_vqa(str(tmp_path / "q.jsonl"), str(bench / "images"), str(bench / "vqa" / "answers.jsonl"))
    assert err.value.sample_id == 9 and err.value.reason == "missing image"
    _write_jsonl(tmp_path / "q.jsonl", VQA_QUESTIONS[:1] * 2)
    with pytest.raises(BadSample, match="duplicate"):
        read_vqa(str(tmp_path / "q.jsonl"), str(bench / "images"), str(bench / "vqa" / "answers.jsonl"))
    (tmp_path / "q.jsonl").write_text(json.dumps(VQA_QUESTIONS[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_vqa(str(tmp_path / "q.jsonl"), str(bench / "images"), str(bench / "vqa" / "answers.jsonl"))


def test_read_yes_no_labels(bench, tmp_path):
    items = read_yes_no(str(bench / "hallucination" / "questions.jsonl"), str(bench / "images"))
    assert [i.label for i in items] == ["yes", "no", "yes", "no", "no"]
    assert items[2].category == "relation"

    unlabelled = [{k: v for k, v in row.items() if k != "label"} for row in YES_NO]
    _write_jsonl(tmp_path / "q.jsonl", unlabelled)
    _write_jsonl(tmp_path / "labels.jsonl", [{"question_id": r["question_id"], "label": r["label"]} for r in YES_NO])
    items = read_yes_no(str(tmp_path / "q.jsonl"), str(bench / "images"), str(tmp_path / "labels.jsonl"))
    assert [i.label for i in items] == ["yes", "no", "yes", "no", "no"]
    with pytest.raises(BadSample) as err:
        read_yes_no(str(tmp_path / "q.jsonl"), str(bench / "images"))
    assert err.value.sample_id == "a" and err.value.reason == "missing label"

    _write_jsonl(tmp_path / "bad.jsonl", YES_NO[:1] + [{**YES_NO[1], "label": "maybe"}])
    with pytest.raises(BadSample) as err:
        read_yes_no(str(tmp_path / "bad.jsonl"), str(bench / "images"))
    assert err.value.sample_id == "b" and err.value.reason == "bad label"


# ---------------------------------------------------------------------------------------------------
# Answer normalisation and parsing
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the red circle.", "red circle"), ("Yes!", "yes"), ("3.5", "3.5"), ("  TEN  ", "10"),
    ("An apple", "apple"), ("black-and-white", "black and white"), ("dont know", "don't know"),
    ("1,000", "1000"), ("red, blue", "red blue"), ("zero", "0"), ("a cat's toy", "cat's toy"),
    ("Left\nside", "left side"), ("", ""),
], ids=lambda x: repr(x))
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no.", "no"), ("Yes, there is.", "yes"), ("  NO", "no"), ("yesterday", None), ("", None),
    ("There is", None), ("2", None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is B.", "B"), ("  A) red circle", "A"),
    ("B) a red circle", "B"), ("a red circle", "A"),   # upper-cased first, as the authors' script does
    ("AB", None), ("Apple", None), ("BA B", "B"), ("", None), ("red", None), ("Option:A", "A"),
], ids=lambda x: repr(x))
def test_parse_choice_takes_the_first_standalone_letter(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize("text, settled", [
    ("A", False), ("A.", True), ("A ", True), (" A", False), ("A red", True), ("B)", True), ("Ap", False), ("Apple", False),
    ("Apple B", False), ("Apple B,", True), ("A\ufffd", False), ("", False), ("red", False),
], ids=lambda x: repr(x))
def test_choice_is_settled_only_when_no_continuation_can_change_it(text, settled):
    assert choice_settled(text) == settled
    if settled:  # whatever follows, the parsed choice stays
        for tail in ("", "x", "AB", " B", "é", "\ufffd"):
            assert parse_choice(text + tail) == parse_choice(text)


# ---------------------------------------------------------------------------------------------------
# Protocols on rigged models
# ---------------------------------------------------------------------------------------------------

BIG = 1000.0


def _rig_constant(mllm, token_id, amount=BIG):
    """Every next-token logit of `token_id` raised by `amount`."""
    def hook(module, args, output):
        output.logits[..., token_id] += amount
        return output
    return mllm.model.register_forward_hook(hook)


def _rig_word_then_stop(mllm, word):
    """The model answers `word` (one token) and then ends its turn."""
    (word_id,) = mllm.tokenizer(word, add_special_tokens=False)["input_ids"]
    stop = stop_token_ids(mllm.tokenizer)[0]

    def hook(module, args, kwargs, output):
        logits = output.logits
        previous = kwargs["input_ids"][:, -logits.shape[1]:]
        logits[..., word_id] += torch.where(previous != word_id, BIG, 0.0)
        logits[..., stop] += torch.where(previous == word_id, BIG, 0.0)
        return output
    return mllm.model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def student():
    return tiny("tiny-student")


def _cr_items(bench):
    return read_sugarcrepe(str(bench / "cr"))


def test_cr_prompt_is_the_authors_through_the_chat_template(student):
    from compodistill.data.chat import encode_prompt

    ids = encode_prompt(CR_PROMPT.format(first="red circle", second="blue circle"), student.tokenizer,
                        student.num_image_tokens)
    text = student.tokenizer.decode(ids)
    assert text == ("<|im_start|>user\n" + IMAGE_TOKEN * student.num_image_tokens
                    + "\nWhich caption best describes the image?\n(A) red circle\n (B) blue circle\n"
                    "Answer with the option's alphabet from the given choices directly.<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.mark.parametrize("letter", ["A", "B"])
def test_letter_logits_bias_scores_half_on_every_item(student, bench, letter):
    token = letter_token_ids(student.tokenizer)["AB".index(letter)]
    handle = _rig_constant(student, token)
    try:
        result = evaluate_cr(student, _cr_items(bench), protocols=("letter_logits",), batch_size=3, backend="torch",
                             progress=False, details=True)
    finally:
        handle.remove()
    as_a, as_b = (1.0, 0.0) if letter == "A" else (0.0, 1.0)
    for metrics in list(result["subsets"].values()) + [result["overall"]]:
        assert metrics["letter_logits"] == 0.5
        assert metrics["orders"]["letter_logits"] == {"positive_as_a": as_a, "positive_as_b": as_b}
    assert result["average"]["letter_logits"] == 0.5
    assert result["headline"] == {"protocol": "letter_logits", "value": 0.5}
    assert set(result["subsets"]["swap_att"]) == {"letter_logits", "orders", "count"}  # only what was asked
    assert {k: m["count"] for k, m in result["subsets"].items()} == {"replace_att": 3, "swap_att": 2}
    for record in result["items"]:
        assert (record["margin_positive_as_a"] > 0) == (letter == "A")
        assert (record["margin_positive_as_b"] > 0) == (letter == "A")
        assert sum(record["correct"]["letter_logits"]) == 1  # 0.5 on every item


@pytest.mark.parametrize("word,choice", [("A", "A"), ("B", "B"), ("red", None)])
def test_generate_protocol_parses_the_greedy_answer(student, bench, word, choice):
    handle = _rig_word_then_stop(student, word)
    try:
        result = evaluate_cr(student, _cr_items(bench), batch_size=4, backend="torch", progress=False, details=True)
    finally:
        handle.remove()
    n = 5
    expected = {"A": (1.0, 0.0), "B": (0.0, 1.0), None: (0.0, 0.0)}[choice]
    for metrics in list(result["subsets"].values()) + [result["overall"]]:
        assert metrics["orders"]["generate"] == dict(zip(("positive_as_a", "positive_as_b"), expected))
        assert metrics["generate"] == sum(expected) / 2
        assert metrics["generate_unparsed"] == (2 * metrics["count"] if choice is None else 0)
    assert result["generate_unparsed"] == (2 * n if choice is None else 0)
    assert result["headline"]["protocol"] == "generate" and list(result["protocols"]) == list(CR_PROTOCOLS)
    for record in result["items"]:
        assert record["answer_positive_as_a"] == record["answer_positive_as_b"] == word
        assert record["choice_positive_as_a"] == record["choice_positive_as_b"] == choice


def _rig_scripts(mllm, scripts):
    """Row b answers the tokens of scripts[b] in turn, then repeats its last token; returns the hook
    handle and a list that counts the forward calls."""
    tokens = [mllm.tokenizer(text, add_special_tokens=False)["input_ids"] for text in scripts]
    calls = []

    def hook(module, args, kwargs, output):
        step = len(calls)
        calls.append(kwargs["input_ids"].shape)
        for row in range(output.logits.shape[0]):
            script = tokens[row % len(tokens)]
            output.logits[row, -1, script[min(step, len(script) - 1)]] += BIG
        return output
    return mllm.model.register_forward_hook(hook, with_kwargs=True), calls


def test_generation_stops_once_every_choice_is_settled(student, bench):
    item = _cr_items(bench)["replace_att"][0]
    # Both orders answer "A", then "." (now settled), then never end their turn.
    handle, calls = _rig_scripts(student, ["A. red red"])
    try:
        result = evaluate_cr(student, [item], protocols=("generate",), backend="torch", progress=False,
                             details=True)
    finally:
        handle.remove()
    assert len(calls) == 2  # the prompt, then one decoding step: "A" alone could still become "AB"
    record = result["items"][0]
    assert (record["answer_positive_as_a"], record["choice_positive_as_a"]) == ("A.", "A")
    assert result["overall"]["generate"] == 0.5

    # One order settles at once, the other never answers: every step of the budget runs, and the settled
    # row keeps its answer.
    handle, calls = _rig_scripts(student, ["B, red", " red red"])
    try:
        result = evaluate_cr(student, [item], protocols=("generate",), max_new_tokens=7, backend="torch",
                             progress=False, details=True)
    finally:
        handle.remove()
    assert len(calls) == 7
    record = result["items"][0]
    assert (record["answer_positive_as_a"], record["choice_positive_as_a"]) == ("B,", "B")
    assert record["answer_positive_as_b"] == "red" + " red" * 6 and record["choice_positive_as_b"] is None
    assert result["overall"]["generate_unparsed"] == 1 and result["overall"]["generate"] == 0.0


def test_generate_protocol_equals_one_prompt_at_a_time_full_generation(student, bench):
    """Batched, left-padded, KV-cached generation with early stopping parses to the same choice as a
    full 32-token greedy generation of each prompt alone; its answer is a prefix of that generation."""
    from compodistill.data.chat import encode_prompt
    from compodistill.data.images import load_image, pixel_values

    items = [item for group in _cr_items(bench).values() for item in group]
    result = evaluate_cr(student, items, batch_size=4, backend="torch", progress=False, details=True)
    token_a, token_b = letter_token_ids(student.tokenizer)
    for item, record in zip(items, result["items"]):
        pixels = pixel_values(student.image_processor, [load_image(item.image_path)])
        for first, second, order in ((item.caption, item.negative, "positive_as_a"),
                                     (item.negative, item.caption, "positive_as_b")):
            ids = torch.tensor([encode_prompt(CR_PROMPT.format(first=first, second=second), student.tokenizer,
                                              student.num_image_tokens)])
            with torch.no_grad():
                logits = student.model(input_ids=ids, pixel_values=pixels).logits[0, -1]
                full = student.model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32, do_sample=False,
                                              eos_token_id=stop_token_ids(student.tokenizer),
                                              pad_token_id=student.tokenizer.pad_token_id)
            text = student.tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True).strip()
            assert record[f"choice_{order}"] == parse_choice(text)
            assert text.startswith(record[f"answer_{order}"])
            assert record[f"margin_{order}"] == pytest.approx((logits[token_a] - logits[token_b]).item(), abs=1e-4)


def test_a_checkpoints_generation_config_does_not_change_the_protocol(student, bench):
    items = _cr_items(bench)["replace_att"][:2]
    plain = evaluate_cr(student, items, protocols=("generate",), backend="torch", progress=False, details=True)
    saved = student.model.generation_config
    student.model.generation_config = copy.deepcopy(saved)
    student.model.generation_config.update(do_sample=True, temperature=3.0, repetition_penalty=5.0, max_new_tokens=2)
    try:
        changed = evaluate_cr(student, items, protocols=("generate",), backend="torch", progress=False, details=True)
    finally:
        student.model.generation_config = saved
    assert [r["answer_positive_as_a"] for r in changed["items"]] == [r["answer_positive_as_a"] for r in plain["items"]]
    assert [r["answer_positive_as_b"] for r in changed["items"]] == [r["answer_positive_as_b"] for r in plain["items"]]


def test_protocols_are_checked(student, bench):
    items = _cr_items(bench)["swap_att"]
    for bad in ((), ("generate", "generate"), ("two_choice",), "generate"):
        with pytest.raises(ValueError, match="protocols"):
            evaluate_cr(student, items, protocols=bad, backend="torch", progress=False)
    with pytest.raises(ValueError, match="prompt"):
        evaluate_cr(student, items, prompt="Which caption? {first}", backend="torch", progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate_cr(student, items, max_new_tokens=0, backend="torch", progress=False)


@pytest.mark.parametrize("prefer", ["positive", "negative"])
def test_likelihood_ranking_follows_a_rigged_caption_preference(student, bench, prefer):
    """Raising the logit of a token that only one caption of each item contains makes that caption's
    summed log-probability the larger one."""
    items = _cr_items(bench)["replace_att"]
    results = []
    for item in items:
        pos, _ = _caption_answer(student, item.caption, item.id)
        neg, _ = _caption_answer(student, item.negative, item.id)
        favoured = sorted(set(pos) - set(neg)) if prefer == "positive" else sorted(set(neg) - set(pos))
        handle = _rig_constant(student, favoured[0], amount=50.0)
        try:
            results.append(evaluate_cr(student, [item], protocols=("likelihood",), backend="torch",
                                       progress=False, details=True))
        finally:
            handle.remove()
    expected = 1.0 if prefer == "positive" else 0.0
    for result in results:
        assert result["overall"]["likelihood"] == expected and result["subsets"]["replace_att"]["likelihood"] == expected
        record = result["items"][0]
        assert (record["log_prob_positive"] > record["log_prob_negative"]) == (prefer == "positive")


def test_likelihood_scores_are_summed_answer_log_probs(student, bench):
    item = _cr_items(bench)["replace_att"][0]
    result = evaluate_cr(student, [item], protocols=("likelihood",), backend="torch", progress=False, details=True)
    from compodistill.data.images import load_image, pixel_values

    pixels = pixel_values(student.image_processor, [load_image(item.image_path)])
    for caption, key in ((item.caption, "log_prob_positive"), (item.negative, "log_prob_negative")):
        ids, n = _caption_answer(student, caption, item.id)
        with torch.no_grad():
            logits = student.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        log_probs = torch.log_softmax(logits, -1)
        expected = sum(log_probs[p - 1, ids[p]].item() for p in range(len(ids) - n, len(ids)))
        assert result["items"][0][key] == pytest.approx(expected, abs=1e-3)
        assert ids[-1] == student.tokenizer.eos_token_id  # the end of turn is part of the answer


def test_yes_rig_gives_known_precision_recall_f1(student, bench):
    items = read_yes_no(str(bench / "hallucination" / "questions.jsonl"), str(bench / "images"))
    handle = _rig_word_then_stop(student, "yes")
    try:
        result = evaluate_yes_no(student, items, batch_size=2, backend="torch", progress=False, details=True)
    finally:
        handle.remove()
    assert [r["prediction"] for r in result["items"]] == ["yes"] * 5
    precision = 2 / 5  # two of the five labels are yes
    assert result["precision"] == precision and result["recall"] == 1.0
    assert result["f1"] == 2 * precision / (1 + precision)
    assert result["accuracy"] == precision and result["yes_ratio"] == 1.0 and result["unparsed"] == 0
    assert result["categories"]["object"]["precision"] == 1 / 3
    assert result["categories"]["relation"]["precision"] == 1 / 2


def test_unparseable_answers_count_as_wrong_without_nan(student, bench):
    items = read_yes_no(str(bench / "hallucination" / "questions.jsonl"), str(bench / "images"))
    handle = _rig_word_then_stop(student, "red")
    try:
        result = evaluate_yes_no(student, items, backend="torch", progress=False)
    finally:
        handle.remove()
    assert result["unparsed"] == 5 and result["accuracy"] == 0.0
    assert (result["precision"], result["recall"], result["f1"], result["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)


def test_vqa_rig_answering_a_fixed_word(student, bench):
    items = _vqa_items(bench)
    handle = _rig_word_then_stop(student, "two")
    try:
        result = evaluate_vqa(student, items, batch_size=3, backend="torch", progress=False, details=True)
    finally:
        handle.remove()
    assert [r["prediction"] for r in result["items"]] == ["two"] * 4
    # "two" → "2" matches question 1 ("2") and question 2 ("Two."), not 3 ("red") or 4 ("3").
    assert [r["correct"] for r in result["items"]] == [True, True, False, False]
    assert result["accuracy"] == 0.5 and result["count"] == 4
    assert result["categories"] == {"attribute": {"accuracy": 0.0, "count": 1},
                                    "counting": {"accuracy": 2 / 3, "count": 3}}


def test_evaluation_restores_training_mode_and_checks_arguments(student, bench):
    items = _cr_items(bench)["swap_att"]
    student.model.train()
    student.model.model.vision_tower.eval()  # a frozen part that a trainer keeps in eval mode
    try:
        evaluate_cr(student, items, backend="torch", progress=False)
        assert student.model.training and student.model.model.language_model.training
        assert not student.model.model.vision_tower.training
    finally:
        student.model.eval()
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_cr(student, items, batch_size=0, backend="torch")
    with pytest.raises(ValueError, match="items"):
        evaluate_vqa(student, [], backend="torch")


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def test_cli_needs_a_benchmark(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--model", "tiny-student"])
    assert err.value.code == 2
    assert "at least one of --cr" in capsys.readouterr().err


def test_cli_checks_the_cr_protocols(bench, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--model", "tiny-student", "--cr", str(bench / "cr"), "--cr-protocols", "likelihood,two_choice"])
    assert err.value.code == 2 and "--cr-protocols" in capsys.readouterr().err


def test_cli_bad_files_give_a_message_not_a_traceback(bench, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    _write_json(lone / "add_obj.json", CR_DATA["replace_att"])
    with pytest.raises(SystemExit, match="image_folder.*COCO val2017"):
        main(["--model", "tiny-student", "--cr", str(lone)])
    _write_jsonl(tmp_path / "q.jsonl", VQA_QUESTIONS)
    with pytest.raises(SystemExit, match="--vqa-images: not given"):
        main(["--model", "tiny-student", "--vqa", str(tmp_path / "q.jsonl")])
    with pytest.raises(SystemExit, match="sample 1: missing answer"):
        main(["--model", "tiny-student", "--vqa", str(bench / "vqa" / "questions.jsonl"),
              "--vqa-answers", str(tmp_path / "q.jsonl")])


def test_cli_end_to_end(bench, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "compodistill.evaluate", "--model", "tiny-student", "--backend", "torch",
               "--cr", str(bench / "cr"), "--vqa", str(bench / "vqa" / "questions.jsonl"),
               "--hallucination", str(bench / "hallucination" / "questions.jsonl"), "--out", str(out),
               "--batch-size", "4", "--limit", "2", "--max-new-tokens", "3"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "eval.json").read_text())
    assert record["model"] == "tiny-student" and record["arguments"]["limit"] == 2
    assert {"compodistill", "torch", "transformers"} <= set(record["versions"]) and record["date"]
    cr = record["results"]["cr"]
    assert {k: m["count"] for k, m in cr["subsets"].items()} == {"replace_att": 2, "swap_att": 2}
    for m in cr["subsets"].values():
        for protocol in ("generate", "letter_logits"):
            orders = m["orders"][protocol]
            assert m[protocol] == pytest.approx((orders["positive_as_a"] + orders["positive_as_b"]) / 2)
        assert 0.0 <= m["likelihood"] <= 1.0 and 0 <= m["generate_unparsed"] <= 4
    for protocol in CR_PROTOCOLS:
        assert cr["average"][protocol] == pytest.approx(sum(m[protocol] for m in cr["subsets"].values()) / 2)
    assert cr["headline"] == {"protocol": "generate", "value": cr["average"]["generate"]}
    assert cr["generate_unparsed"] == sum(m["generate_unparsed"] for m in cr["subsets"].values())
    assert cr["protocols"]["generate"]["max_new_tokens"] == 32 and cr["protocols"]["generate"]["prompt"] == CR_PROMPT
    assert record["results"]["vqa"]["count"] == 2  # answers.jsonl next to the questions was found
    assert record["results"]["hallucination"]["count"] == 2
    markdown = (out / "eval.md").read_text()
    for needle in ("| swap_att |", "| replace_att |", "**average**", "## VQA", "## Yes/no hallucination", "F1",
                   "generate (headline)", "letter logits", "likelihood", "unparsed (generate)", "- generate: greedy"):
        assert needle in markdown
    assert "| replace_att |" in proc.stdout
