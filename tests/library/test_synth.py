"""The procedural benchmark: scene-graph truth on hand-built scenes, the guarantees of every written
item (re-checked by parsing the texts back and evaluating them), the file layout, determinism, splits,
and the CLI."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

from compodistill.data.negatives import CR_SUBSETS, HALLUCINATION_CATEGORIES, cr_pair, hallucination_pair
from compodistill.data.questions import (QUESTION_CATEGORIES, HowMany, WhatAttr, WhatRelated, YesNo, answer, answers,
                                         conversation_turns, make_query, parse_question, question_text)
from compodistill.data.scene_graph import Scene, Vocabulary, make_scene
from compodistill.data.statements import (And, Count, Desc, Exists, HasAttr, Relation, caption_statements, caption_text,
                                          evaluate, holds, parse_caption, parse_statement, shortest_unique,
                                          statement_text)
from compodistill.data.synth import generate
from compodistill.models.tokenizer import _WORDS

from ..common import REPO

VOCAB = Vocabulary(colors=("red", "green", "blue", "yellow"), shapes=("circle", "square", "triangle", "star"))


# ---- hand-built scenes -----------------------------------------------------------------------------

@pytest.fixture
def board():
    """  col:   0               1   2              3
    row 0: large red circle      .   small blue square   .
    row 2: large green triangle  .   .                   .
    row 3: .                     .   .                   small red circle"""
    return make_scene([("red", "circle", "large", 0, 0), ("blue", "square", "small", 0, 2),
                       ("green", "triangle", "large", 2, 0), ("red", "circle", "small", 3, 3)])


def test_answers_on_a_hand_built_scene(board):
    assert answer(board, WhatAttr(Desc("square"), "color")) == "blue"
    assert answer(board, WhatAttr(Desc("triangle"), "size")) == "large"
    assert answer(board, WhatAttr(Desc(None, "green"), "shape")) == "triangle"
    assert answer(board, WhatAttr(Desc("circle", size="large"), "color")) == "red"
    assert answers(board, WhatAttr(Desc("circle"), "color")) is None  # two circles: ambiguous
    assert answers(board, HowMany(Desc("circle"))) == ["2", "two"]
    assert answer(board, HowMany(Desc(None, "red"))) == "2"
    assert answer(board, HowMany(Desc(None, None, "small"))) == "2"
    assert answers(board, HowMany(Desc("star"))) == ["0", "zero"]
    assert answer(board, YesNo(Exists(Desc("triangle", "green")))) == "Yes"
    assert answer(board, YesNo(Exists(Desc("circle", "green")))) == "No"
    assert answer(board, YesNo(Exists(Desc("square", "blue", "large")))) == "No"
    # "What is to the right of the square?": only the small red circle (col 3); no object shares col 2.
    assert answers(board, WhatRelated("right_of", Desc("square"))) == ["small circle", "small red circle"]
    assert answer(board, WhatRelated("below", Desc("triangle"))) == "small circle"
    assert answers(board, WhatRelated("left_of", Desc("square"))) is None  # two objects in col 0
    assert answers(board, WhatRelated("above", Desc("square"))) is None  # the big circle shares row 0: a tie
    big = Desc("circle", size="large")
    assert answer(board, YesNo(Relation(big, "left_of", Desc("square"), True))) == "Yes"
    assert answer(board, YesNo(Relation(Desc("square"), "left_of", big, True))) == "No"
    assert answer(board, YesNo(Relation(big, "above", Desc("triangle"), True))) == "Yes"
    assert answer(board, YesNo(HasAttr(Desc("square"), "color", "red"))) == "No"


def test_holds_and_near_ties(board):
    big, triangle = Desc("circle", size="large"), Desc("triangle")
    # Same column: neither left nor right is ever true or false, only ill-posed.
    for rel in ("left_of", "right_of"):
        assert evaluate(board, Relation(big, rel, triangle, True)) is None
        assert not holds(board, Relation(big, rel, triangle, True))
    assert holds(board, Relation(big, "above", triangle, True))
    assert evaluate(board, Relation(big, "below", triangle, True)) is False
    # Definite descriptions must name one object; indefinite ones quantify over the matches.
    assert evaluate(board, Relation(Desc("circle"), "left_of", Desc("square"), True)) is None
    assert holds(board, Relation(Desc("circle", "red"), "left_of", Desc("square")))
    assert holds(board, Relation(Desc("circle", "red"), "right_of", Desc("square")))
    assert evaluate(board, Relation(triangle, "right_of", Desc("square"))) is False
    assert evaluate(board, Relation(triangle, "left_of", big)) is None
    assert evaluate(board, Relation(Desc("star"), "left_of", Desc("square"))) is False
    assert holds(board, Count(Desc("circle", "red"), 2)) and not holds(board, Count(Desc("circle"), 1))
    assert holds(board, HasAttr(Desc("square"), "size", "small"))
    assert evaluate(board, HasAttr(Desc("circle"), "size", "small")) is None
    assert evaluate(board, And((Exists(Desc("square")), Exists(Desc("star"))))) is False
    assert holds(board, And((Exists(Desc("square")), Exists(triangle))))


def test_shortest_unique_description(board):
    assert shortest_unique(board, 0) == Desc("circle", size="large")
    assert shortest_unique(board, 1) == Desc("square")
    assert shortest_unique(board, 3, exclude=("size",)) is None  # "red circle" matches both circles
    assert shortest_unique(board, 2, exclude=("shape",), need_shape=False) == Desc(None, "green")


def test_texts_round_trip(board):
    statements = [Exists(Desc("circle", "red", "large")), Count(Desc("circle"), 2), Count(Desc(None, "green"), 0),
                  Count(Desc("square"), 1), HasAttr(Desc("square"), "color", "blue"),
                  HasAttr(Desc(None, "green"), "shape", "triangle"),
                  Relation(Desc("circle", size="large"), "left_of", Desc("square"), True),
                  And((Relation(Desc("square", "blue"), "right_of", Desc("triangle")), Exists(Desc("star", "yellow"))))]
    for st in statements:
        assert parse_statement(statement_text(st)) == st
    assert statement_text(statements[-1]) == "A blue square is to the right of a triangle and a yellow star."
    queries = [WhatAttr(Desc("square"), "color"), WhatAttr(Desc(None, "green"), "shape"),
               WhatRelated("above", Desc("circle", "red", "small")), HowMany(Desc("star", "red")),
               YesNo(Exists(Desc("circle", "orange"))), YesNo(Relation(Desc("square"), "below", Desc("triangle"), True)),
               YesNo(Relation(Desc("square"), "below", Desc("triangle"))), YesNo(HasAttr(Desc("square"), "size", "large")),
               YesNo(HasAttr(Desc(None, "blue"), "shape", "square"))]
    for q in queries:
        assert parse_question(question_text(q)) == q
    assert question_text(queries[0]) == "What color is the square?"
    assert question_text(queries[4]) == "Is there an orange circle?"
    assert question_text(queries[5]) == "Is the square below the triangle?"
    caption = caption_statements(board, random.Random(0))
    assert parse_caption(caption_text(caption)) == caption and all(holds(board, s) for s in caption)


def _all_texts(scene, seeds=40):
    """Every text the generators derive from `scene` under several seeds."""
    texts = []
    for seed in range(seeds):
        rng = random.Random(seed)
        texts += [q for q, _ in conversation_turns(scene, rng, VOCAB, 5)]
        texts.append(caption_text(caption_statements(scene, rng)))
        for subset in CR_SUBSETS:
            pair = cr_pair(scene, subset, rng, VOCAB)
            texts += [statement_text(s) for s in pair or ()]
        for category in HALLUCINATION_CATEGORIES:
            texts += [question_text(q) for q in hallucination_pair(scene, category, rng, VOCAB) or ()]
    return texts


def test_near_ties_are_never_asserted_or_denied():
    column = make_scene([("red", "circle", "large", 0, 1), ("blue", "square", "small", 1, 1),
                         ("green", "star", "large", 3, 1)])
    texts = _all_texts(column)
    assert any("above" in t or "below" in t for t in texts)
    assert not any("left" in t or "right" in t for t in texts)
    row = make_scene([("red", "circle", "large", 2, 0), ("yellow", "triangle", "small", 2, 3)])
    texts = _all_texts(row)
    assert any("left" in t for t in texts) and any("right" in t for t in texts)
    assert not any("above" in t or "below" in t for t in texts)


def test_generated_items_on_a_hand_built_scene(board):
    for seed in range(30):
        for category in QUESTION_CATEGORIES:
            query = make_query(board, category, random.Random(seed), VOCAB)
            if query is not None:
                assert answers(board, query) is not None
        for subset in CR_SUBSETS:
            pair = cr_pair(board, subset, random.Random(seed), VOCAB)
            if pair is not None:
                assert holds(board, pair[0]) and evaluate(board, pair[1]) is False
    # "Is the circle red?" would be ambiguous here; only well-posed forms may come out.
    assert make_query(make_scene([("red", "circle", "small", 0, 0), ("red", "circle", "small", 1, 1)]),
                      "attribute", random.Random(0), VOCAB) is None


# ---- a generated tiny benchmark --------------------------------------------------------------------

def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _scenes(out, split):
    return {s.image: s for s in map(Scene.from_dict, _read_jsonl(out / "scenes" / f"{split}.jsonl"))}


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def test_tiny_reports_counts(tiny_benchmark):
    out, summary = tiny_benchmark
    counts = summary["counts"]
    assert counts["scenes/train.jsonl"] == 64 and counts["scenes/test.jsonl"] == 32 and counts["scenes/comp.jsonl"] == 32
    assert counts["images"] == len(os.listdir(out / "images")) == 128
    assert json.loads((out / "summary.json").read_text()) == summary
    for prefix in ("", "comp/"):
        for subset in CR_SUBSETS:
            n = counts[f"{prefix}cr/{subset}.json"]
            assert n == len(json.loads((out / f"{prefix}cr/{subset}.json").read_text())) and n >= 16


def test_deterministic_per_seed(tiny_benchmark, tmp_path):
    out, _ = tiny_benchmark
    generate(str(tmp_path / "again"), seed=0, size="tiny", compositional=True)
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys() and first == second
    generate(str(tmp_path / "other"), seed=1, size="tiny", compositional=True)
    other = _files(tmp_path / "other")
    for name in ("scenes/train.jsonl", "cr/swap_att.json", "images/test-000000.png", "llava_instruct.json"):
        assert other[name] != first[name], name


def _definite_descs(query):
    if isinstance(query, WhatAttr):
        return [query.desc]
    if isinstance(query, WhatRelated):
        return [query.anchor]
    st = getattr(query, "statement", None)
    if isinstance(st, HasAttr):
        return [st.desc]
    if isinstance(st, Relation) and st.definite:
        return [st.subject, st.object]
    return []


def _descs(statement):
    if isinstance(statement, And):
        return [d for p in statement.parts for d in _descs(p)]
    if isinstance(statement, Relation):
        return [statement.subject, statement.object]
    return [statement.desc]


@pytest.mark.parametrize("split,prefix", [("test", ""), ("comp", "comp/")], ids=["test", "comp"])
def test_every_cr_item_is_checked_by_the_evaluator(tiny_benchmark, split, prefix):
    out, _ = tiny_benchmark
    scenes = _scenes(out, split)
    for subset in CR_SUBSETS:
        items = json.loads((out / f"{prefix}cr/{subset}.json").read_text())
        for item_id, item in items.items():
            assert set(item) == {"filename", "caption", "negative_caption"}
            assert (out / "images" / item["filename"]).is_file()
            scene = scenes[item["filename"]]
            positive, negative = parse_statement(item["caption"]), parse_statement(item["negative_caption"])
            assert item["caption"] != item["negative_caption"], item_id
            assert evaluate(scene, positive) is True, (item_id, item)
            assert evaluate(scene, negative) is False, (item_id, item)
            # Referring expressions of the positive name exactly one object.
            assert all(sum(d.matches(o) for o in scene.objects) == 1 for d in _descs(positive)), item
            if subset == "swap_att":
                assert sorted(map(repr, _descs(positive))) != sorted(map(repr, _descs(negative)))
            if subset == "swap_obj":
                assert (negative.subject, negative.object) == (positive.object, positive.subject)
            if subset in ("replace_obj", "replace_att", "replace_rel", "add_att"):
                assert type(negative) is type(positive)
            if subset == "add_obj":
                assert isinstance(negative, And) and len(_descs(negative)) == len(_descs(positive)) + 1


@pytest.mark.parametrize("split,prefix", [("test", ""), ("comp", "comp/")], ids=["test", "comp"])
def test_vqa_files(tiny_benchmark, split, prefix):
    out, _ = tiny_benchmark
    scenes = _scenes(out, split)
    questions = _read_jsonl(out / f"{prefix}vqa/questions.jsonl")
    answer_rows = _read_jsonl(out / f"{prefix}vqa/answers.jsonl")
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in answer_rows]
    assert len({q["question_id"] for q in questions}) == len(questions)
    assert {q["category"] for q in questions} == set(QUESTION_CATEGORIES)
    for q, a in zip(questions, answer_rows):
        assert set(q) == {"question_id", "image", "text", "category"} and set(a) == {"question_id", "answers"}
        assert (out / "images" / q["image"]).is_file()
        scene, query = scenes[q["image"]], parse_question(q["text"])
        assert answers(scene, query) == a["answers"] and a["answers"]
        assert all(sum(d.matches(o) for o in scene.objects) == 1 for d in _definite_descs(query)), q
        assert len(a["answers"][0].split()) <= 4


def test_hallucination_set_is_balanced_and_correct(tiny_benchmark):
    out, summary = tiny_benchmark
    scenes = _scenes(out, "test")
    rows = _read_jsonl(out / "hallucination/questions.jsonl")
    assert rows and len({r["question_id"] for r in rows}) == len(rows)
    for category in HALLUCINATION_CATEGORIES:
        labels = [r["label"] for r in rows if r["category"] == category]
        assert labels and labels.count("yes") == labels.count("no")
    for r in rows:
        assert set(r) == {"question_id", "image", "text", "label", "category"}
        assert r["label"] in ("yes", "no") and (out / "images" / r["image"]).is_file()
        assert answer(scenes[r["image"]], parse_question(r["text"])).lower() == r["label"], r
    assert summary["counts"]["hallucination/questions.jsonl"]["total"] == len(rows)


def test_llava_files(tiny_benchmark):
    out, _ = tiny_benchmark
    train = _scenes(out, "train")
    two_choice = 0
    for name in ("llava_pretrain.json", "llava_instruct.json"):
        records = json.loads((out / name).read_text())
        assert len(records) == len(train)
        for rec in records:
            assert set(rec) == {"id", "image", "conversations"} and rec["image"] in train
            turns = rec["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            scene = train[rec["image"]]
            if name == "llava_pretrain.json":
                assert all(holds(scene, s) for s in parse_caption(turns[1]["value"]))
            else:
                for human, gpt in zip(turns[::2], turns[1::2]):
                    question = human["value"].replace("<image>\n", "")
                    question = question.replace("\nAnswer the question using a single word or phrase.", "")
                    choice = re.fullmatch(r"Which caption best describes the image\? \(A\) (.*) \(B\) (.*) "
                                          r"Answer with the option's letter\.", question)
                    if choice:  # multiple-choice turn: the answer's letter names the true caption
                        truths = [evaluate(scene, parse_statement(c)) for c in choice.groups()]
                        assert truths == ([True, False] if gpt["value"] == "A" else [False, True]), question
                        two_choice += 1
                        continue
                    query = parse_question(question)
                    assert gpt["value"] == answer(scene, query) and len(gpt["value"].split()) <= 4
    assert two_choice >= len(train) // 2  # most training conversations carry a multiple-choice turn


def test_texts_use_the_tiny_tokenizer_words(tiny_benchmark):
    out, _ = tiny_benchmark
    known = set(_WORDS) | {"b", "s"}  # the option letter (B) and the possessive of "option's"
    text = " ".join([(out / "llava_pretrain.json").read_text(), (out / "llava_instruct.json").read_text(),
                     (out / "cr/add_obj.json").read_text(), (out / "vqa/questions.jsonl").read_text()])
    values = re.findall(r'"(?:value|caption|negative_caption|text)": "([^"]*)"', text)
    words = {w for v in values for w in re.findall(r"[a-z]+", v.replace("<image>", "").replace("\\n", " ").lower())}
    assert words and words <= known, sorted(words - known)


def test_splits_are_disjoint_and_compositional(tiny_benchmark):
    out, summary = tiny_benchmark
    splits = {s: _scenes(out, s) for s in ("train", "test", "comp")}
    for a, b in (("train", "test"), ("train", "comp"), ("test", "comp")):
        assert not {s.id for s in splits[a].values()} & {s.id for s in splits[b].values()}
        assert not {s.key() for s in splits[a].values()} & {s.key() for s in splits[b].values()}
    for scene in splits["train"].values():
        assert scene.id.startswith("train-") and 2 <= len(scene.objects) <= 3
    held = {tuple(c) for c in summary["held_out_combos"]}
    assert 0.1 * 48 <= len(held) <= 0.3 * 48
    for split in ("train", "test"):
        assert not any((o.color, o.shape) in held for s in splits[split].values() for o in s.objects)
    assert all(any((o.color, o.shape) in held for o in s.objects) for s in splits["comp"].values())
    # Every colour and shape is still seen in training, and training texts never name a held-out pair.
    seen_pairs = {(o.color, o.shape) for s in splits["train"].values() for o in s.objects}
    assert {c for c, _ in seen_pairs} == set(summary["vocabulary"]["colors"])
    training_text = ((out / "llava_pretrain.json").read_text() + (out / "llava_instruct.json").read_text()).lower()
    for color, shape in held:
        assert not re.search(rf"\b{color} {shape}", training_text), (color, shape)


def test_refuses_a_non_empty_out_dir(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*overwrite"):
        generate(str(out), size="tiny")
    (out / "images").mkdir()
    (out / "images" / "stale.png").write_bytes(b"old")
    generate(str(out), size="tiny", num_train=8, num_test=4, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "images" / "stale.png").exists() and len(os.listdir(out / "images")) == 12


@pytest.mark.parametrize("kwargs,name", [
    ({"image_size": 66}, "image_size"), ({"image_size": 16}, "image_size"), ({"grid": 1}, "grid"),
    ({"max_objects": 1}, "max_objects"), ({"max_objects": 17}, "max_objects"), ({"colors": ["red"]}, "colors"),
    ({"shapes": ["circle", "blob"]}, "shapes"), ({"size": "huge"}, "size"), ({"num_train": 0}, "num_train"),
    ({"seed": -1}, "seed"), ({"colors": ["red", "blue"], "shapes": ["circle", "square"], "grid": 2,
                              "image_size": 32, "max_objects": 2, "num_train": 5000}, "num_train"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(str(tmp_path / "bench"), **{"size": "tiny", **kwargs})


def test_cli(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "compodistill.data.synth", "--out", str(out), "--size", "tiny",
           "--colors", "red,green,blue", "--shapes", "circle,square,triangle"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("llava_instruct.json", "cr/swap_att.json", "vqa/questions.jsonl", "hallucination/questions.jsonl"):
        assert name in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vocabulary"]["colors"] == ["red", "green", "blue"] and summary["arguments"]["num_train"] == 64
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    bad = subprocess.run(cmd + ["--overwrite", "--image-size", "50"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "--image-size" in bad.stderr


def test_compatibility_module_reexports_the_split_modules():
    """compodistill.data.scenes keeps the names other modules import from it, as the same objects."""
    import compodistill.data.scenes as scenes
    from compodistill.data import negatives, questions, scene_graph, statements

    for name in scenes.__all__:
        owners = [m for m in (scene_graph, statements, questions, negatives) if hasattr(m, name)]
        assert owners and getattr(scenes, name) is getattr(owners[0], name), name
    assert {"CR_SUBSETS", "Scene", "make_scene"} <= set(scenes.__all__)
