"""Readers for the evaluation benchmarks, in their official file formats.

- Compositional reasoning (CR): SugarCrepe, one JSON per subset, `{"<id>": {"filename", "caption",
  "negative_caption"}}`, with image files relative to an image folder (COCO val2017 for the official set).
- VQA: LLaVA's evaluation question files (jsonl of `{"question_id", "image", "text", "category"?}`) with
  answers from a jsonl (`{"question_id", "answers": [...]}` or `{"question_id", "answer": str}`) or from
  an official VQAv2 annotations JSON.
- Yes/no hallucination (POPE, R-Bench, Reefknot style): the same question jsonl with a `"label"` of
  "yes" or "no", on each line or in a separate answers jsonl.

The synthetic benchmark (`python -m compodistill.data.synth`) writes these same formats. Image paths
are checked when reading, so a missing file fails before any model runs; a bad sample raises
`BadSample` naming its id, a malformed file a ValueError naming the file.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from .chat import BadSample
from .images import resolve_image

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


# The authors' SugarCrepe prompt, verbatim (note the space before "(B)"), asked in both orders by
# compodistill.evaluate. The image comes first: encode_prompt writes "<image>" + "\n" + this text.
CR_PROMPT = ("Which caption best describes the image?\n(A) {first}\n (B) {second}\n"
             "Answer with the option's alphabet from the given choices directly.")
# A shorter two-choice question, on one line: the multiple-choice turns of the synthetic instruction
# data (LLaVA-665K carries multiple-choice questions too). Pass it as evaluate_cr(prompt=...) to score a
# model trained on that data in its own wording.
TWO_CHOICE_PROMPT = "Which caption best describes the image? (A) {first} (B) {second} Answer with the option's letter."
# LLaVA's short-answer instruction, on VQA-style questions in LLaVA-665K and at VQA evaluation.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


def short_answer_prompt(question: str) -> str:
    """The question with LLaVA's short-answer instruction appended (once)."""
    if SHORT_ANSWER_PROMPT.lower() in question.lower():
        return question
    return f"{question}\n{SHORT_ANSWER_PROMPT}"

@dataclass(frozen=True)
class CRItem:
    """One two-caption item: the image, its true caption and the hard negative."""

    subset: str
    id: str
    image_path: str
    caption: str
    negative: str


@dataclass(frozen=True)
class VQAItem:
    """One open-ended question with every acceptable answer (raw, not normalised)."""

    question_id: object
    image_path: str
    question: str
    answers: tuple
    category: str | None = None


@dataclass(frozen=True)
class YesNoItem:
    """One yes/no question with its label ("yes" or "no")."""

    question_id: object
    image_path: str
    question: str
    label: str
    category: str | None = None


def default_image_folder(path: str) -> str | None:
    """The image folder of the synthetic layout for a benchmark file or folder: the first existing of
    `images/` next to it, one level up, or two levels up (DIR/cr, DIR/vqa/questions.jsonl and
    DIR/comp/vqa/questions.jsonl all find DIR/images). None if there is none."""
    base = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    for candidate in (os.path.join(base, "images"), os.path.join(base, os.pardir, "images"),
                      os.path.join(base, os.pardir, os.pardir, "images")):
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    return None


def _load_json(path: str, arg: str):
    if not os.path.isfile(path):
        raise ValueError(f"{arg}: {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{arg}: {path!r} is not valid JSON ({err})") from None


def _read_jsonl(path: str, arg: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"{arg}: {path!r} is not a file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{arg}: {path!r} line {number} is not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{arg}: {path!r} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _text(record: dict, key: str, sample_id) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadSample(sample_id, f"missing {key}", f"expected a non-empty string, got {value!r:.80}")
    return value


# ---------------------------------------------------------------------------------------------------
# SugarCrepe
# ---------------------------------------------------------------------------------------------------

def read_sugarcrepe(cr_dir: str, image_folder: str | None = None, subsets=None) -> dict[str, list[CRItem]]:
    """Read SugarCrepe-format subsets: {subset name: [CRItem, ...]} in file order.

    Args:
        cr_dir: folder with one `<subset>.json` per subset (the official ones are add_att, add_obj,
            replace_att, replace_obj, replace_rel, swap_att, swap_obj; any *.json is read).
        image_folder: where the `filename` entries live (COCO val2017 for the official set). Default:
            the first existing of `<cr_dir>/images` and `<cr_dir>/../images` (and `<cr_dir>/../../images`).
        subsets: names to read (a list, or a comma-separated string); default every *.json in cr_dir.
    """
    if not isinstance(cr_dir, str) or not os.path.isdir(cr_dir):
        raise ValueError(f"cr_dir: expected a folder of SugarCrepe subset JSON files, got {cr_dir!r}")
    if subsets is None:
        files = sorted(glob.glob(os.path.join(cr_dir, "*.json")))
        if not files:
            raise ValueError(f"cr_dir: {cr_dir!r} holds no *.json subset files "
                             f"(SugarCrepe's are {', '.join(SUGARCREPE_SUBSETS)})")
    else:
        names = [s.strip() for s in subsets.split(",")] if isinstance(subsets, str) else list(subsets)
        if not names or not all(isinstance(s, str) and s for s in names):
            raise ValueError(f"subsets: expected subset names, got {subsets!r}")
        files = [os.path.join(cr_dir, f"{name}.json") for name in names]
        missing = [name for name, path in zip(names, files) if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"subsets: no file {', '.join(m + '.json' for m in missing)} in {cr_dir!r}")
    if image_folder is None:
        image_folder = default_image_folder(cr_dir)
        if image_folder is None:
            raise ValueError(f"image_folder: none given and neither {cr_dir}/images nor {cr_dir}/../images "
                             "exists; pass the image folder (for the official SugarCrepe: COCO val2017)")
    elif not os.path.isdir(image_folder):
        raise ValueError(f"image_folder: {image_folder!r} is not a folder")

    result = {}
    for path in files:
        subset = os.path.splitext(os.path.basename(path))[0]
        data = _load_json(path, "cr_dir")
        if not isinstance(data, dict):
            raise ValueError(f"cr_dir: {path!r}: expected a JSON object {{id: item}}, got {type(data).__name__}")
        items = []
        for item_id, record in data.items():
            sample_id = f"{subset}/{item_id}"
            if not isinstance(record, dict):
                raise BadSample(sample_id, "malformed item", f"expected an object, got {record!r:.80}")
            items.append(CRItem(subset, str(item_id),
                                resolve_image(image_folder, record.get("filename"), sample_id),
                                _text(record, "caption", sample_id), _text(record, "negative_caption", sample_id)))
        result[subset] = items
    return result


# ---------------------------------------------------------------------------------------------------
# Question files (VQA, yes/no)
# ---------------------------------------------------------------------------------------------------

def _read_questions(questions_jsonl: str, image_folder: str) -> list[dict]:
    """Question rows with `image_path` resolved; ids must be present and unique."""
    if not isinstance(image_folder, str) or not os.path.isdir(image_folder):
        raise ValueError(f"image_folder: expected a folder, got {image_folder!r}")
    rows, seen = [], set()
    for number, row in enumerate(_read_jsonl(questions_jsonl, "questions_jsonl"), 1):
        qid = row.get("question_id")
        if qid is None:
            raise BadSample(f"line {number}", "missing question_id", questions_jsonl)
        if str(qid) in seen:
            raise BadSample(qid, "duplicate question_id", questions_jsonl)
        seen.add(str(qid))
        rows.append({**row, "question_id": qid, "text": _text(row, "text", qid),
                     "image_path": resolve_image(image_folder, row.get("image"), qid)})
    if not rows:
        raise ValueError(f"questions_jsonl: {questions_jsonl!r} holds no questions")
    return rows


def _answer_table(answers: str) -> dict[str, list[str]]:
    """{str(question_id): [acceptable answers]} from an answers jsonl or a VQAv2 annotations JSON."""
    try:
        data = _load_json(answers, "answers")
    except ValueError:
        data = None  # not one JSON document: a jsonl
    if isinstance(data, dict) and "annotations" in data:
        table = {}
        for ann in data["annotations"]:
            qid = ann.get("question_id")
            raw = [a.get("answer") for a in ann.get("answers", []) if isinstance(a, dict)]
            raw.append(ann.get("multiple_choice_answer"))
            table[str(qid)] = list(dict.fromkeys(a for a in raw if isinstance(a, str) and a.strip()))
        return table
    if isinstance(data, (dict, list)):  # a one-line jsonl, or a JSON list of answer rows
        rows = [data] if isinstance(data, dict) else data
    else:
        rows = _read_jsonl(answers, "answers")
    table = {}
    for row in rows:
        qid = row.get("question_id") if isinstance(row, dict) else None
        if qid is None:
            raise ValueError(f"answers: {answers!r} has a line without question_id: {row!r:.80}")
        table[str(qid)] = _answers_of(row)
    return table


def _answers_of(row: dict) -> list[str]:
    """Acceptable answers on a row: "answers" (strings or VQAv2-style {"answer"} objects), "answer" or
    "label"."""
    raw = row.get("answers")
    if raw is None:
        raw = [row.get("answer", row.get("label"))]
    elif isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    raw = [a.get("answer") if isinstance(a, dict) else a for a in raw]
    return list(dict.fromkeys(a for a in raw if isinstance(a, str) and a.strip()))


def read_vqa(questions_jsonl: str, image_folder: str, answers: str | None = None) -> list[VQAItem]:
    """Read an open-ended VQA set in LLaVA's evaluation format.

    Args:
        questions_jsonl: one `{"question_id", "image", "text", "category"?}` per line.
        image_folder: the folder that `image` paths are relative to.
        answers: a jsonl of `{"question_id", "answers": [...]}` or `{"question_id", "answer": str}`, or
            an official VQAv2 annotations JSON (`{"annotations": [{"question_id", "answers":
            [{"answer"}...], "multiple_choice_answer"}]}`). Default: answers on the question lines.
    Every question needs at least one answer (else BadSample naming its id).
    """
    table = _answer_table(answers) if answers is not None else None
    items = []
    for row in _read_questions(questions_jsonl, image_folder):
        qid = row["question_id"]
        accepted = table.get(str(qid), []) if table is not None else _answers_of(row)
        if not accepted:
            raise BadSample(qid, "missing answer", answers or questions_jsonl)
        items.append(VQAItem(qid, row["image_path"], row["text"], tuple(accepted), row.get("category")))
    return items


def normalize_yes_no(value) -> str | None:
    """"yes" or "no" for labels like "Yes", " no.", True/False; None for anything else."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, str):
        return None
    word = value.strip().strip(".!,;:").strip().lower()
    return word if word in ("yes", "no") else None


def read_yes_no(questions_jsonl: str, image_folder: str, answers: str | None = None) -> list[YesNoItem]:
    """Read a yes/no question set (POPE-style): `{"question_id", "image", "text", "label", "category"?}`.

    Labels come from each line's "label", or from `answers` (a jsonl of `{"question_id", "label"}` or
    `{"question_id", "answer"}`) when given. They are normalised to "yes"/"no"; anything else, or a
    missing label, raises BadSample naming the question id.
    """
    table = _answer_table(answers) if answers is not None else None
    items = []
    for row in _read_questions(questions_jsonl, image_folder):
        qid = row["question_id"]
        if table is not None:
            raw = table.get(str(qid), [])
            raw = raw[0] if len(raw) == 1 else raw or None
        else:
            raw = row.get("label", row.get("answer"))
        if raw is None:
            raise BadSample(qid, "missing label", answers or questions_jsonl)
        label = normalize_yes_no(raw)
        if label is None:
            raise BadSample(qid, "bad label", f"expected 'yes' or 'no', got {raw!r:.80}")
        items.append(YesNoItem(qid, row["image_path"], row["text"], label, row.get("category")))
    return items
