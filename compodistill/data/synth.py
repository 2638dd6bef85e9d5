"""The procedural compositional-reasoning data: scene graphs rendered with Pillow, LLaVA-style training
data and test sets, all derived from the graphs, so the ground truth is correct by construction.

    python -m compodistill.data.synth --out DIR [--size tiny|small|default] [--seed S] [--compositional]
    python -m compodistill.data.synth --preset miniature --out DIR [--seed S] [--train N] [--test N] [--questions [K]]

Two presets:

- "benchmark" (`generate`, the default): short-answer QA conversations for training; SugarCrepe-style
  sentence pairs, VQA and relational-hallucination test sets; an optional compositional split.
- "miniature" (`generate_miniature`): the data on which the miniature reproduction's teacher learns
  from the image: one dense first-order caption per training scene, and CR pairs in the same phrase
  grammar with equal token counts, to be scored by caption likelihood.

Each preset's generator runs named steps: sample the splits, render the images, write the scene
graphs, derive the training sets, then the test sets, then the summary.

Layout written under DIR (image paths in JSON are relative to DIR/images):

    images/<scene_id>.png               every scene ("train-000012", "test-000003", "comp-000001")
    scenes/<split>.jsonl                scene graphs {"id", "split", "image", "width", "height", "grid",
                                        "objects": [{"color", "shape", "size", "x", "y", "r", "cell": [row, col]}]}
    llava_pretrain.json                 LLaVA-558K captions of the train scenes
    llava_instruct.json                 LLaVA-665K conversations on the train scenes (benchmark: multi-turn
                                        short-answer QA; miniature: the dense caption, plus --questions turns)
    cr/<subset>.json                    SugarCrepe items {"<id>": {"filename", "caption", "negative_caption"}}
    vqa/questions.jsonl, answers.jsonl  (benchmark) {"question_id", "image", "text", "category"} /
                                        {"question_id", "answers"}
    hallucination/questions.jsonl       (benchmark) {"question_id", "image", "text", "label": "yes"|"no", "category"}
    comp/cr/*.json, comp/vqa/*          (benchmark, --compositional) the same for scenes with held-out pairs
    summary.json                        seed, arguments, vocabulary, held-out pairs, counts per file and subset

Every run with the same arguments writes the same bytes: all randomness comes from `random.Random`
instances seeded by strings built from the seed, the split, the scene id and the purpose.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

from tqdm import tqdm

from .benchmarks import TWO_CHOICE_PROMPT, short_answer_prompt
from .negatives import CR_SUBSETS, HALLUCINATION_CATEGORIES, cr_pair, hallucination_pair, phrase_cr_pair
from .questions import (QUESTION_CATEGORIES, answers, conversation_turns, make_query, mentioned_combos,
                        parse_question, question_text, short_answer_turns)
from .render import render
from .scene_graph import DEFAULT_SHAPES, PALETTE, SHAPES, Vocabulary, held_out_combos, make_vocabulary, sample_scene
from .statements import (CAPTION_REQUESTS, caption_statements, caption_text, dense_caption, dense_caption_text,
                         evaluate, parse_caption, parse_dense_caption, parse_phrase, parse_statement, phrase_text,
                         statement_text)

GENERATOR_VERSION = 3
PRESETS = ("benchmark", "miniature")
SIZE_PRESETS = {"tiny": (64, 32), "small": (2000, 500), "default": (20000, 2000)}
# Files and folders this generator owns; --overwrite removes exactly these.
LAYOUT = ("images", "scenes", "cr", "vqa", "hallucination", "comp", "llava_pretrain.json",
          "llava_instruct.json", "summary.json")
MIN_CELL_PIXELS = 8

# The miniature preset: a 4x4 grid of 16 px cells on 64 px images, one vision patch per cell of the
# tiny models (image_size 64, patch 16). The colours are pairwise at least 156 apart in RGB and at
# least 124 from the grey background; the shapes stay distinct at 16 px; every word of the captions is
# one token of the tiny tokenizer.
MINIATURE_COLORS = ("red", "green", "blue", "yellow", "black", "white")
MINIATURE_SHAPES = DEFAULT_SHAPES
MINIATURE = dict(num_train=20000, num_test=1000, image_size=64, grid=4, max_objects=4, caption_relations=2)
DESCRIBE_REQUEST = "Describe the image."


# --------------------------------------------------------------------------------------------------
# Steps shared by the presets
# --------------------------------------------------------------------------------------------------

def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir!r} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"out_dir: {out_dir!r} is not empty; pass overwrite=True (--overwrite) to replace "
                             f"the generator's files there ({', '.join(LAYOUT)})")
        for name in LAYOUT:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


def sample_split(split: str, count: int, seed: int, vocab: Vocabulary, seen: set, *, combos, require, grid: int,
                 image_size: int, max_objects: int, stream: str = "compodistill-synth") -> list:
    """`count` scenes of `split` whose graphs are new (not in `seen`, which is updated), drawn from the
    random stream named by `stream`, the seed and the split."""
    rng = random.Random(f"{stream}:{seed}:{split}")
    scenes, failures = [], 0
    while len(scenes) < count:
        scene = sample_scene(rng, f"{split}-{len(scenes):06d}", split, vocab, grid=grid, image_size=image_size,
                             max_objects=max_objects, combos=combos, require=require)
        if scene.key() in seen:
            failures += 1
            if failures > 1000 + 10 * count:
                raise ValueError(f"num_train/num_test: cannot draw {count} distinct {split} scenes from this "
                                 f"vocabulary, grid and max_objects; ask for fewer scenes or a larger space")
            continue
        seen.add(scene.key())
        scenes.append(scene)
    return scenes


def write_images(out_dir: str, splits: dict) -> int:
    """Render every scene of every split to images/<id>.png; returns the number of images."""
    scenes = [s for split in splits.values() for s in split]
    os.makedirs(os.path.join(out_dir, "images"))
    for scene in tqdm(scenes, desc="rendering", unit="img", disable=None):
        render(scene).save(os.path.join(out_dir, "images", scene.image), format="PNG")
    return len(scenes)


def write_scene_graphs(out_dir: str, splits: dict) -> dict:
    """scenes/<split>.jsonl for every split; returns {file: number of scenes}."""
    for split, scenes in splits.items():
        _write_jsonl(os.path.join(out_dir, "scenes", f"{split}.jsonl"), [s.to_dict() for s in scenes])
    return {f"scenes/{split}.jsonl": len(scenes) for split, scenes in splits.items()}


def write_cr_sets(out_dir: str, prefix: str, sets: dict) -> dict:
    """<prefix>cr/<subset>.json for every subset; returns {file: number of items}."""
    for subset, items in sets.items():
        _write_json(os.path.join(out_dir, f"{prefix}cr", f"{subset}.json"), items)
    return {f"{prefix}cr/{subset}.json": len(items) for subset, items in sets.items()}


def write_llava_sets(out_dir: str, pretrain: list, instruct: list) -> None:
    """llava_pretrain.json (LLaVA-558K records) and llava_instruct.json (LLaVA-665K records)."""
    _write_json(os.path.join(out_dir, "llava_pretrain.json"), pretrain)
    _write_json(os.path.join(out_dir, "llava_instruct.json"), instruct)


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _text_rng(seed, scene, purpose):
    return random.Random(f"compodistill-synth:{seed}:{scene.id}:{purpose}")


def _conversation(scene, turns) -> dict:
    """A LLaVA record: (question, reply) turns, the image placeholder before the first question."""
    conversation = []
    for k, (question, reply) in enumerate(turns):
        conversation += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                         {"from": "gpt", "value": reply}]
    return {"id": scene.id, "image": scene.image, "conversations": conversation}


# --------------------------------------------------------------------------------------------------
# The benchmark preset
# --------------------------------------------------------------------------------------------------

def sample_splits(seed: int, vocab: Vocabulary, held: list, *, num_train: int, num_test: int, compositional: bool,
                  grid: int, image_size: int, max_objects: int) -> dict:
    """{"train", "test"[, "comp"]: scenes}: train and test avoid the held-out pairs, every comp scene has
    one; no graph repeats within or across splits."""
    seen: set = set()
    train_combos = [c for c in vocab.combos() if c not in held]
    common = dict(grid=grid, image_size=image_size, max_objects=max_objects)
    splits = {"train": sample_split("train", num_train, seed, vocab, seen, combos=train_combos, require=None, **common),
              "test": sample_split("test", num_test, seed, vocab, seen, combos=train_combos, require=None, **common)}
    if compositional:
        splits["comp"] = sample_split("comp", num_test, seed, vocab, seen, combos=None, require=held, **common)
    _check_splits(splits, held)
    return splits


def cr_sets(scenes, seed, vocab, focus_of) -> dict:
    """{subset: {item_id: {"filename", "caption", "negative_caption"}}}; texts re-checked after parsing."""
    sets = {subset: {} for subset in CR_SUBSETS}
    for scene in scenes:
        for subset in CR_SUBSETS:
            made = cr_pair(scene, subset, _text_rng(seed, scene, f"cr:{subset}"), vocab, focus_of(scene))
            if made is None:
                continue
            caption, negative = statement_text(made[0]), statement_text(made[1])
            if (evaluate(scene, parse_statement(caption)) is not True
                    or evaluate(scene, parse_statement(negative)) is not False):
                raise RuntimeError(f"{scene.id} {subset}: texts do not round-trip: {caption!r} / {negative!r}")
            sets[subset][f"{scene.id}-{subset}"] = {"filename": scene.image, "caption": caption,
                                                    "negative_caption": negative}
    return sets


def vqa_set(scenes, seed, vocab, focus_of) -> tuple[list, list]:
    """(questions, answers) rows: one question per scene and category, answers re-checked after parsing."""
    questions, answer_rows = [], []
    for scene in scenes:
        for category in QUESTION_CATEGORIES:
            query = make_query(scene, category, _text_rng(seed, scene, f"vqa:{category}"), vocab, focus_of(scene))
            if query is None:
                continue
            text, accepted = question_text(query), answers(scene, query)
            if answers(scene, parse_question(text)) != accepted:
                raise RuntimeError(f"{scene.id}: question does not round-trip: {text!r}")
            qid = f"{scene.id}-{category}"
            questions.append({"question_id": qid, "image": scene.image, "text": text, "category": category})
            answer_rows.append({"question_id": qid, "answers": accepted})
    return questions, answer_rows


def hallucination_set(scenes, seed, vocab) -> list:
    """Rows of yes/no questions, a yes and a no per scene and category, in random order."""
    rows = []
    for scene in scenes:
        for category in HALLUCINATION_CATEGORIES:
            rng = _text_rng(seed, scene, f"hallucination:{category}")
            pair = hallucination_pair(scene, category, rng, vocab)
            if pair is None:
                continue
            labelled = [("yes", pair[0]), ("no", pair[1])]
            rng.shuffle(labelled)
            for label, query in labelled:
                text = question_text(query)
                if answers(scene, parse_question(text))[0].lower() != label:
                    raise RuntimeError(f"{scene.id}: hallucination question does not round-trip: {text!r}")
                rows.append({"question_id": f"{scene.id}-{category}-{label}", "image": scene.image,
                             "text": text, "label": label, "category": category})
    return rows


def _two_choice_turn(scene, rng, vocab, avoid):
    """A multiple-choice turn in the CR evaluation's format (a true and a false caption of a train scene,
    in random order, answered with the letter), so that the letter protocol is a learned skill."""
    subset = rng.choice(CR_SUBSETS)
    made = cr_pair(scene, subset, rng, vocab)
    if made is None or (mentioned_combos(made[0]) | mentioned_combos(made[1])) & avoid:
        return None
    caption, negative = statement_text(made[0]), statement_text(made[1])
    if rng.random() < 0.5:
        return TWO_CHOICE_PROMPT.format(first=caption, second=negative), "A"
    return TWO_CHOICE_PROMPT.format(first=negative, second=caption), "B"


def llava_sets(scenes, seed, vocab, avoid) -> tuple[list, list, int]:
    """(pretrain records, instruct records, number of QA turns) for the train scenes: a caption each for
    pretraining, 3-5 short-answer turns and a multiple-choice turn each for instruction tuning."""
    pretrain, instruct, turns = [], [], 0
    for scene in scenes:
        rng = _text_rng(seed, scene, "caption")
        request, caption = rng.choice(CAPTION_REQUESTS), caption_text(caption_statements(scene, rng))
        if not all(evaluate(scene, s) for s in parse_caption(caption)):
            raise RuntimeError(f"{scene.id}: caption does not round-trip: {caption!r}")
        pretrain.append(_conversation(scene, [(request, caption)]))
        rng = _text_rng(seed, scene, "instruct")
        qa = conversation_turns(scene, rng, vocab, rng.randint(3, 5), avoid)
        choice = _two_choice_turn(scene, _text_rng(seed, scene, "two-choice"), vocab, avoid)
        if choice is not None:
            qa.insert(rng.randrange(len(qa) + 1), choice)
        # Short-answer questions carry LLaVA's instruction, as in LLaVA-665K and at VQA evaluation.
        qa = [(q if q.startswith("Which caption") else short_answer_prompt(q), a) for q, a in qa]
        if qa:
            instruct.append(_conversation(scene, qa))
            turns += len(qa)
    return pretrain, instruct, turns


def _by_category(rows):
    return {"total": len(rows), **{c: sum(r["category"] == c for r in rows) for c in QUESTION_CATEGORIES}}


def _check_benchmark_arguments(*, size, num_train, num_test, seed, grid, image_size, max_objects):
    if size not in SIZE_PRESETS:
        raise ValueError(f"size: expected one of {list(SIZE_PRESETS)}, got {size!r}")
    num_train = SIZE_PRESETS[size][0] if num_train is None else num_train
    num_test = SIZE_PRESETS[size][1] if num_test is None else num_test
    _check_int("seed", seed, 0)
    _check_int("num_train", num_train, 1)
    _check_int("num_test", num_test, 1)
    _check_int("grid", grid, 2)
    _check_int("image_size", image_size, 1)
    _check_int("max_objects", max_objects, 2)
    if image_size % grid:
        raise ValueError(f"image_size: expected a multiple of grid={grid}, got {image_size}")
    if image_size // grid < MIN_CELL_PIXELS:
        raise ValueError(f"image_size: cells of {image_size // grid} px are too small to draw shapes in; "
                         f"expected image_size >= {MIN_CELL_PIXELS} * grid = {MIN_CELL_PIXELS * grid}")
    if max_objects > min(grid * grid, 10):
        raise ValueError(f"max_objects: expected at most min(grid*grid, 10) = {min(grid * grid, 10)}, "
                         f"got {max_objects}")
    return num_train, num_test


def generate(out_dir: str, *, seed: int = 0, size: str = "default", num_train: int | None = None,
             num_test: int | None = None, image_size: int = 64, grid: int = 4, max_objects: int = 3,
             colors=None, shapes=None, compositional: bool = False, overwrite: bool = False) -> dict:
    """Generate the benchmark preset into `out_dir` and return its summary (also written to summary.json).

    Args:
        out_dir: output folder; must be empty or absent unless `overwrite`.
        seed: every random choice derives from it; the same arguments give byte-identical files.
        size: scene-count preset, "tiny" (64 train / 32 test), "small" (2,000 / 500) or "default"
            (20,000 / 2,000); `num_train` / `num_test` override it.
        image_size: image side in pixels, a multiple of `grid` with cells of at least 8 px.
        grid: the board is grid×grid cells, one object per cell at most (4: 16 px cells at 64 px,
            one vision-tower patch each for the tiny presets).
        max_objects: 2..min(grid², 10) objects per scene.
        colors, shapes: lists restricting the vocabulary (defaults: scene_graph.DEFAULT_COLORS / DEFAULT_SHAPES).
        compositional: hold out ~20% of the (colour, shape) pairs (chosen from the seed) from the train
            and test scenes and write a "comp" split (num_test scenes, each with at least one held-out
            pair) with its own comp/cr and comp/vqa sets. Training texts never name a held-out pair
            (not even in a question whose answer is "No").
        overwrite: remove the generator's own files in `out_dir` first (other files are left alone).

    Returns:
        The summary dict: seed, arguments, vocabulary, held-out pairs and counts per file and subset.
    """
    num_train, num_test = _check_benchmark_arguments(size=size, num_train=num_train, num_test=num_test, seed=seed,
                                                     grid=grid, image_size=image_size, max_objects=max_objects)
    vocab = make_vocabulary(colors, shapes)
    held = held_out_combos(vocab, seed) if compositional else []
    _prepare_out_dir(out_dir, overwrite)

    splits = sample_splits(seed, vocab, held, num_train=num_train, num_test=num_test, compositional=compositional,
                           grid=grid, image_size=image_size, max_objects=max_objects)
    counts = {"images": write_images(out_dir, splits)}
    counts.update(write_scene_graphs(out_dir, splits))

    pretrain, instruct, turns = llava_sets(splits["train"], seed, vocab, frozenset(held))
    write_llava_sets(out_dir, pretrain, instruct)
    counts["llava_pretrain.json"] = len(pretrain)
    counts["llava_instruct.json"] = {"conversations": len(instruct), "qa_turns": turns}

    held_set = set(held)
    no_focus = lambda scene: None  # noqa: E731
    held_focus = lambda scene: [i for i, o in enumerate(scene.objects) if (o.color, o.shape) in held_set]  # noqa: E731
    jobs = [("", splits["test"], no_focus)] + ([("comp/", splits["comp"], held_focus)] if compositional else [])
    for prefix, scenes, focus_of in jobs:
        counts.update(write_cr_sets(out_dir, prefix, cr_sets(scenes, seed, vocab, focus_of)))
        questions, answer_rows = vqa_set(scenes, seed, vocab, focus_of)
        _write_jsonl(os.path.join(out_dir, f"{prefix}vqa", "questions.jsonl"), questions)
        _write_jsonl(os.path.join(out_dir, f"{prefix}vqa", "answers.jsonl"), answer_rows)
        counts[f"{prefix}vqa/questions.jsonl"] = _by_category(questions)
        counts[f"{prefix}vqa/answers.jsonl"] = len(answer_rows)

    rows = hallucination_set(splits["test"], seed, vocab)
    _write_jsonl(os.path.join(out_dir, "hallucination", "questions.jsonl"), rows)
    counts["hallucination/questions.jsonl"] = {"total": len(rows), **{
        c: {label: sum(r["category"] == c and r["label"] == label for r in rows) for label in ("yes", "no")}
        for c in HALLUCINATION_CATEGORIES}}

    summary = {
        "generator": "compodistill.data.synth", "version": GENERATOR_VERSION, "seed": seed,
        "arguments": {"size": size, "num_train": num_train, "num_test": num_test,
                      "num_comp": num_test if compositional else 0, "image_size": image_size, "grid": grid,
                      "max_objects": max_objects, "compositional": compositional},
        "vocabulary": _vocabulary_dict(vocab),
        "held_out_combos": [list(c) for c in held],
        "counts": counts,
    }
    _write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def _vocabulary_dict(vocab: Vocabulary) -> dict:
    return {"colors": list(vocab.colors), "shapes": list(vocab.shapes), "sizes": list(vocab.sizes)}


def _check_splits(splits, held):
    """Splits share no scene id and no scene graph; train and test avoid the held-out pairs and every
    comp scene has one."""
    ids = [s.id for scenes in splits.values() for s in scenes]
    keys = [s.key() for scenes in splits.values() for s in scenes]
    if len(set(ids)) != len(ids) or len(set(keys)) != len(keys):
        raise RuntimeError("splits: scene ids or scene graphs repeat across splits")
    held = set(held)
    for split in ("train", "test"):
        if any((o.color, o.shape) in held for s in splits[split] for o in s.objects):
            raise RuntimeError(f"splits: a held-out colour-shape pair appears in {split}")
    if any(not any((o.color, o.shape) in held for o in s.objects) for s in splits.get("comp", [])):
        raise RuntimeError("splits: a comp scene has no held-out colour-shape pair")


# --------------------------------------------------------------------------------------------------
# The miniature preset
# --------------------------------------------------------------------------------------------------

def miniature_vocabulary() -> Vocabulary:
    """6 colours × 6 shapes × 2 sizes (`MINIATURE_COLORS`, `MINIATURE_SHAPES`)."""
    return make_vocabulary(MINIATURE_COLORS, MINIATURE_SHAPES)


def sample_miniature_splits(seed: int, vocab: Vocabulary, *, num_train: int, num_test: int) -> dict:
    """{"train", "test": scenes} of 2-4 objects in distinct cells of the 4×4 grid. The test scenes come
    first, from their own stream, so they do not depend on `num_train`; train scenes never repeat a
    test graph (nor each other)."""
    seen: set = set()
    common = dict(combos=None, require=None, grid=MINIATURE["grid"], image_size=MINIATURE["image_size"],
                  max_objects=MINIATURE["max_objects"], stream="compodistill-miniature")
    test = sample_split("test", num_test, seed, vocab, seen, **common)
    train = sample_split("train", num_train, seed, vocab, seen, **common)
    splits = {"train": train, "test": test}
    _check_splits(splits, [])
    return splits


def dense_caption_sets(scenes, seed: int, vocab: Vocabulary, questions: int) -> tuple[list, list, int]:
    """(pretrain records, instruct records, number of question turns) for the train scenes: the dense
    caption (`statements.dense_caption`) answering "Describe the image." in both files, and in the
    instruct file up to `questions` short-answer turns after it (`questions.short_answer_turns`)."""
    pretrain, instruct, turns = [], [], 0
    for scene in scenes:
        statements = dense_caption(scene, _text_rng(seed, scene, "dense-caption"),
                                   relations=MINIATURE["caption_relations"])
        caption = dense_caption_text(statements)
        if parse_dense_caption(caption) != statements or not all(evaluate(scene, s) is True for s in statements):
            raise RuntimeError(f"{scene.id}: dense caption does not round-trip: {caption!r}")
        pretrain.append(_conversation(scene, [(DESCRIBE_REQUEST, caption)]))
        qa = []
        if questions:
            qa = short_answer_turns(scene, _text_rng(seed, scene, "short-answers"), vocab, questions)
            qa = [(short_answer_prompt(q), a) for q, a in qa]
            turns += len(qa)
        instruct.append(_conversation(scene, [(DESCRIBE_REQUEST, caption)] + qa))
    return pretrain, instruct, turns


def phrase_cr_sets(scenes, seed: int, vocab: Vocabulary) -> dict:
    """{subset: {item_id: {"filename", "caption", "negative_caption"}}} in the phrase grammar, at most
    one item per scene and subset; each text re-parsed and re-checked, each pair of equal word count."""
    sets = {subset: {} for subset in CR_SUBSETS}
    for scene in scenes:
        for subset in CR_SUBSETS:
            made = phrase_cr_pair(scene, subset, _text_rng(seed, scene, f"phrase-cr:{subset}"), vocab)
            if made is None:
                continue
            caption, negative = phrase_text(made[0]), phrase_text(made[1])
            if (evaluate(scene, parse_phrase(caption)) is not True
                    or evaluate(scene, parse_phrase(negative)) is not False
                    or len(caption.split()) != len(negative.split())):
                raise RuntimeError(f"{scene.id} {subset}: unequal or wrong pair: {caption!r} / {negative!r}")
            sets[subset][f"{scene.id}-{subset}"] = {"filename": scene.image, "caption": caption,
                                                    "negative_caption": negative}
    return sets


def generate_miniature(out_dir: str, *, seed: int = 0, num_train: int | None = None, num_test: int | None = None,
                       questions: int = 0, overwrite: bool = False) -> dict:
    """Generate the miniature preset into `out_dir` and return its summary (also written to summary.json).

    Scenes: 64×64 px images of a 4×4 grid (one 16 px vision patch per cell), 2-4 objects in distinct
    cells, vocabulary `miniature_vocabulary()`. Training text: one dense caption per train scene
    ("large red square . small blue circle . red square left of blue circle ."), in llava_instruct.json
    and llava_pretrain.json. Test: cr/<subset>.json pairs in the same phrase grammar, of equal token
    count, for scoring by caption likelihood (see `negatives.phrase_cr_pair`).

    Args:
        out_dir: output folder; must be empty or absent unless `overwrite`.
        seed: every random choice derives from it; the same arguments give byte-identical files.
        num_train: train scenes (default 20,000).
        num_test: test scenes (default 1,000, which gives at least 600 items per CR subset); the test
            scenes depend only on `seed` and `num_test`.
        questions: up to this many short-answer turns with one-word answers (the colour of a shape,
            the shape of a colour, a count) after the caption in each instruct conversation (default 0).
        overwrite: remove the generator's own files in `out_dir` first (other files are left alone).
    """
    num_train = MINIATURE["num_train"] if num_train is None else num_train
    num_test = MINIATURE["num_test"] if num_test is None else num_test
    _check_int("seed", seed, 0)
    _check_int("num_train", num_train, 1)
    _check_int("num_test", num_test, 1)
    _check_int("questions", questions, 0)
    vocab = miniature_vocabulary()
    _prepare_out_dir(out_dir, overwrite)

    splits = sample_miniature_splits(seed, vocab, num_train=num_train, num_test=num_test)
    counts = {"images": write_images(out_dir, splits)}
    counts.update(write_scene_graphs(out_dir, splits))

    pretrain, instruct, turns = dense_caption_sets(splits["train"], seed, vocab, questions)
    write_llava_sets(out_dir, pretrain, instruct)
    counts["llava_pretrain.json"] = len(pretrain)
    counts["llava_instruct.json"] = {"conversations": len(instruct), "question_turns": turns}

    counts.update(write_cr_sets(out_dir, "", phrase_cr_sets(splits["test"], seed, vocab)))

    summary = {
        "generator": "compodistill.data.synth", "version": GENERATOR_VERSION, "preset": "miniature", "seed": seed,
        "arguments": {"num_train": num_train, "num_test": num_test, "questions": questions,
                      "image_size": MINIATURE["image_size"], "grid": MINIATURE["grid"], "min_objects": 2,
                      "max_objects": MINIATURE["max_objects"], "caption_relations": MINIATURE["caption_relations"]},
        "vocabulary": _vocabulary_dict(vocab),
        "counts": counts,
    }
    _write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def report(summary: dict, out_dir: str | None = None) -> str:
    """A short table of what was written: each file with its item count and per-subset counts."""
    args = summary["arguments"]
    preset = f"{summary['preset']} preset, " if "preset" in summary else ""
    head = (f"wrote {out_dir or 'benchmark'}: {preset}seed {summary['seed']}, {args['num_train']} train / "
            f"{args['num_test']} test" + (f" / {args['num_comp']} comp" if args.get("compositional") else "")
            + f" scenes, {args['image_size']}px images on a {args['grid']}x{args['grid']} grid")
    lines = [head, f"{'file':<34} items"]
    for name, value in summary["counts"].items():
        if isinstance(value, int):
            lines.append(f"{name:<34} {value}")
            continue
        total = value.get("total", value.get("conversations"))
        parts = [f"{k} {v['yes']} yes/{v['no']} no" if isinstance(v, dict) else f"{k} {v}"
                 for k, v in value.items() if k not in ("total", "conversations")]
        lines.append(f"{name:<34} {total}  ({', '.join(parts)})")
    if summary.get("held_out_combos"):
        lines.append("held out of training: " + ", ".join(f"{c} {s}" for c, s in summary["held_out_combos"]))
    lines.append(f"{'summary.json':<34} -")
    return "\n".join(lines)


def _comma_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


# Options of the benchmark preset only, with their defaults; None in the parsed arguments means "not given".
_BENCHMARK_OPTIONS = {"size": "default", "image_size": 64, "grid": 4, "max_objects": 3, "colors": None, "shapes": None,
                      "compositional": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compodistill.data.synth",
                                     description="Generate the procedural compositional-reasoning data.")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--preset", choices=PRESETS, default="benchmark",
                        help="benchmark (default): QA training data, CR/VQA/hallucination tests; miniature: dense "
                             "captions and CR scored by caption likelihood")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=None,
                        help="number of train scenes (overrides --size; miniature default "
                             f"{MINIATURE['num_train']})")
    parser.add_argument("--test", type=int, default=None,
                        help=f"number of test scenes (overrides --size; miniature default {MINIATURE['num_test']})")
    parser.add_argument("--overwrite", action="store_true", help="replace the generator's files in a non-empty --out")
    bench = parser.add_argument_group("benchmark preset only")
    bench.add_argument("--size", choices=list(SIZE_PRESETS), default=None,
                       help="scene counts: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in SIZE_PRESETS.items())
                       + " (default: default)")
    bench.add_argument("--image-size", type=int, default=None, help="image side in pixels, a multiple of --grid "
                       "(default 64)")
    bench.add_argument("--grid", type=int, default=None, help="objects snap to the cells of a grid x grid board "
                       "(default 4)")
    bench.add_argument("--max-objects", type=int, default=None, help="objects per scene: 2..max (default 3)")
    bench.add_argument("--colors", type=_comma_list, default=None,
                       help=f"comma list restricting the colours (from {','.join(PALETTE)})")
    bench.add_argument("--shapes", type=_comma_list, default=None,
                       help=f"comma list restricting the shapes (from {','.join(SHAPES)})")
    bench.add_argument("--compositional", action="store_true", default=None,
                       help="hold ~20%% of colour-shape pairs out of training and write a comp/ split")
    mini = parser.add_argument_group("miniature preset only")
    mini.add_argument("--questions", type=int, nargs="?", const=3, default=None, metavar="K",
                      help="add up to K (3 when no value is given) short-answer turns with one-word answers "
                           "after each caption (default: none)")
    return parser


_ARG_NAMES = {"num_train": "--train", "num_test": "--test", "image_size": "--image-size", "grid": "--grid",
              "max_objects": "--max-objects", "colors": "--colors", "shapes": "--shapes", "seed": "--seed",
              "out_dir": "--out", "num_train/num_test": "--train/--test", "questions": "--questions"}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in _BENCHMARK_OPTIONS if getattr(args, name) is not None}
    start = time.perf_counter()
    try:
        if args.preset == "miniature":
            if given:
                parser.error(f"{', '.join(map(_option, given))}: not an option of --preset miniature")
            summary = generate_miniature(args.out, seed=args.seed, num_train=args.train, num_test=args.test,
                                         questions=args.questions or 0, overwrite=args.overwrite)
        else:
            if args.questions is not None:
                parser.error("--questions: an option of --preset miniature only")
            options = {**_BENCHMARK_OPTIONS, **given}
            summary = generate(args.out, seed=args.seed, num_train=args.train, num_test=args.test,
                               overwrite=args.overwrite, **options)
    except ValueError as err:
        name, _, rest = str(err).partition(":")
        parser.error(f"{_ARG_NAMES.get(name, name)}:{rest}" if rest else str(err))
    print(report(summary, args.out))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
