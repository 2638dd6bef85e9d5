"""The miniature preset of the procedural data: dense captions for training, CR pairs for scoring by
caption likelihood. Every written item is re-read from disk and re-checked against its scene graph:
captions name each object once and state true relations, CR positives hold and negatives do not,
pairs have equal token counts under the tiny tokenizer; plus determinism, splits, counts and the CLI."""
import collections
import json
import os
import random
import re
import subprocess
import sys

import pytest
from PIL import Image

from compodistill.data.benchmarks import SHORT_ANSWER_PROMPT, read_sugarcrepe
from compodistill.data.negatives import CR_SUBSETS, phrase_cr_pair
from compodistill.data.questions import answers, parse_question
from compodistill.data.scene_graph import OPPOSITE, Scene, make_scene
from compodistill.data.statements import (And, Desc, Exists, Relation, dense_caption, dense_caption_text, evaluate,
                                          matching, parse_dense_caption, parse_phrase, phrase_text)
from compodistill.data.synth import MINIATURE_COLORS, MINIATURE_SHAPES, generate_miniature, main, miniature_vocabulary

from ..common import REPO

NUM_TRAIN, NUM_TEST, QUESTIONS = 60, 80, 3


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    out = tmp_path_factory.mktemp("miniature") / "data"
    summary = generate_miniature(str(out), seed=0, num_train=NUM_TRAIN, num_test=NUM_TEST, questions=QUESTIONS)
    return out, summary


@pytest.fixture(scope="module")
def tokenizer():
    from compodistill.models.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


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


def _named(scene, desc):
    """True when `desc` names one object that is the only one of its colour and shape."""
    found = matching(scene, Desc(desc.shape, desc.color))
    return len(found) == 1


# ---- the vocabulary and the tokenizer ----------------------------------------------------------------

def test_vocabulary_words_are_single_tokens(tokenizer):
    vocab = miniature_vocabulary()
    assert len(vocab.colors) == 6 and len(vocab.shapes) == 6 and vocab.sizes == ("small", "large")
    assert vocab.colors == MINIATURE_COLORS and vocab.shapes == MINIATURE_SHAPES
    words = [*vocab.colors, *vocab.shapes, *vocab.sizes, "left", "right", "of", "above", "below", "and"]
    for word in words:
        # Inside a caption a word follows a space; at its start it does not.
        assert len(tokenizer.tokenize(" " + word)) == 1, word
        assert len(tokenizer.tokenize(word)) == 1, word


# ---- a generated miniature set -----------------------------------------------------------------------

def test_counts_and_layout(miniature):
    out, summary = miniature
    counts = summary["counts"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["preset"] == "miniature" and summary["seed"] == 0
    assert summary["vocabulary"] == {"colors": list(MINIATURE_COLORS), "shapes": list(MINIATURE_SHAPES),
                                     "sizes": ["small", "large"]}
    assert counts["images"] == len(os.listdir(out / "images")) == NUM_TRAIN + NUM_TEST
    assert counts["scenes/train.jsonl"] == NUM_TRAIN and counts["scenes/test.jsonl"] == NUM_TEST
    assert counts["llava_pretrain.json"] == NUM_TRAIN
    assert counts["llava_instruct.json"]["conversations"] == NUM_TRAIN
    for subset in CR_SUBSETS:
        items = json.loads((out / "cr" / f"{subset}.json").read_text())
        assert counts[f"cr/{subset}.json"] == len(items) >= NUM_TEST // 2, subset
    assert not (out / "vqa").exists() and not (out / "hallucination").exists()
    for split in ("train", "test"):
        for scene in _scenes(out, split).values():
            assert scene.grid == 4 and scene.image_size == 64 and 2 <= len(scene.objects) <= 4
            assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
    with Image.open(out / "images" / "test-000000.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_deterministic_per_seed(miniature, tmp_path):
    out, _ = miniature
    generate_miniature(str(tmp_path / "again"), seed=0, num_train=NUM_TRAIN, num_test=NUM_TEST, questions=QUESTIONS)
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys() and first == second
    generate_miniature(str(tmp_path / "other"), seed=1, num_train=NUM_TRAIN, num_test=NUM_TEST, questions=QUESTIONS)
    other = _files(tmp_path / "other")
    for name in ("scenes/train.jsonl", "scenes/test.jsonl", "cr/swap_att.json", "images/test-000000.png",
                 "llava_instruct.json"):
        assert other[name] != first[name], name


def test_splits_are_disjoint_and_test_independent_of_train_size(miniature, tmp_path):
    out, _ = miniature
    train, test = _scenes(out, "train"), _scenes(out, "test")
    assert all(s.id.startswith("train-") for s in train.values())
    assert all(s.id.startswith("test-") for s in test.values())
    train_keys, test_keys = {s.key() for s in train.values()}, {s.key() for s in test.values()}
    assert len(train_keys) == NUM_TRAIN and len(test_keys) == NUM_TEST and not train_keys & test_keys
    # The test scenes come from their own stream: a different number of train scenes leaves them alone.
    generate_miniature(str(tmp_path / "more"), seed=0, num_train=NUM_TRAIN + 25, num_test=NUM_TEST)
    for name in ["scenes/test.jsonl", "images/test-000007.png"] + [f"cr/{subset}.json" for subset in CR_SUBSETS]:
        assert (tmp_path / "more" / name).read_bytes() == (out / name).read_bytes(), name


def test_captions_name_every_object_once_and_state_true_relations(miniature):
    out, _ = miniature
    train = _scenes(out, "train")
    pretrain = json.loads((out / "llava_pretrain.json").read_text())
    instruct = json.loads((out / "llava_instruct.json").read_text())
    assert [r["id"] for r in pretrain] == [r["id"] for r in instruct] == sorted(s.id for s in train.values())
    relation_counts, first_is_relation = collections.Counter(), 0
    for rec, conv in zip(pretrain, instruct):
        assert set(rec) == {"id", "image", "conversations"} and rec["image"] in train
        assert rec["conversations"][0] == {"from": "human", "value": "<image>\nDescribe the image."}
        assert conv["conversations"][:2] == rec["conversations"] and len(rec["conversations"]) == 2
        caption = rec["conversations"][1]["value"]
        assert re.fullmatch(r"[a-z]+( [a-z]+)* \.( [a-z]+( [a-z]+)* \.)*", caption), caption
        scene = train[rec["image"]]
        phrases = parse_dense_caption(caption)
        objects = [p for p in phrases if isinstance(p, Exists)]
        relations = [p for p in phrases if isinstance(p, Relation)]
        assert len(objects) + len(relations) == len(phrases)
        first_is_relation += isinstance(phrases[0], Relation)
        # Every object once, with its size, colour and shape.
        assert sorted((d.desc.size, d.desc.color, d.desc.shape) for d in objects) == \
            sorted((o.size, o.color, o.shape) for o in scene.objects)
        assert len(relations) <= 2
        facts = set()
        for rel in relations:
            assert evaluate(scene, rel) is True, (caption, rel)
            assert rel.subject.size is None and rel.object.size is None
            assert _named(scene, rel.subject) and _named(scene, rel.object), caption
            axis = "h" if rel.relation in ("left_of", "right_of") else "v"
            facts.add((frozenset([(rel.subject.color, rel.subject.shape), (rel.object.color, rel.object.shape)]), axis))
        assert len(facts) == len(relations), caption  # no fact stated twice
        relation_counts[len(relations)] += 1
    assert relation_counts[2] > NUM_TRAIN // 2
    # relations are shuffled in with the objects, so captions also start with a colour word
    assert NUM_TRAIN // 10 < first_is_relation < NUM_TRAIN // 2


def test_dense_caption_relations_are_never_ties_and_need_named_objects():
    # Same row: only left/right; two red circles: never in a relation.
    row = make_scene([("red", "square", "large", 1, 0), ("blue", "circle", "small", 1, 3)])
    twins = make_scene([("red", "circle", "small", 0, 0), ("red", "circle", "large", 3, 3),
                        ("blue", "star", "small", 2, 1)])
    for seed in range(20):
        text = dense_caption_text(dense_caption(row, random.Random(seed)))
        assert ("left of" in text or "right of" in text) and "above" not in text and "below" not in text
        assert len(parse_dense_caption(text)) == 3
        for phrase in parse_dense_caption(dense_caption_text(dense_caption(twins, random.Random(seed)))):
            if isinstance(phrase, Relation):
                assert "circle" not in (phrase.subject.shape, phrase.object.shape)
    phrases = set(parse_dense_caption(dense_caption_text(dense_caption(row, random.Random(0)))))
    assert {Exists(Desc("square", "red", "large")), Exists(Desc("circle", "blue", "small"))} < phrases


def test_short_answer_turns(miniature):
    out, summary = miniature
    train = _scenes(out, "train")
    instruct = json.loads((out / "llava_instruct.json").read_text())
    turns = 0
    for rec in instruct:
        extra = rec["conversations"][2:]
        assert 2 <= len(extra) <= 2 * QUESTIONS and len(extra) % 2 == 0
        for human, gpt in zip(extra[::2], extra[1::2]):
            assert human["from"] == "human" and gpt["from"] == "gpt" and "<image>" not in human["value"]
            question = human["value"].replace("\n" + SHORT_ANSWER_PROMPT, "")
            assert question.startswith(("What color is the ", "What shape is the ", "How many ")), question
            assert len(gpt["value"].split()) == 1
            assert gpt["value"] == answers(train[rec["image"]], parse_question(question))[0]
            turns += 1
    assert summary["counts"]["llava_instruct.json"]["question_turns"] == turns


def test_every_cr_item_is_checked_and_of_equal_token_length(miniature, tokenizer):
    out, _ = miniature
    scenes = _scenes(out, "test")
    read = read_sugarcrepe(str(out / "cr"))
    assert set(read) == set(CR_SUBSETS)
    for subset in CR_SUBSETS:
        items = json.loads((out / "cr" / f"{subset}.json").read_text())
        assert len(read[subset]) == len(items)
        for item_id, item in items.items():
            assert set(item) == {"filename", "caption", "negative_caption"} and item_id.endswith(subset)
            assert (out / "images" / item["filename"]).is_file()
            scene = scenes[item["filename"]]
            positive, negative = parse_phrase(item["caption"]), parse_phrase(item["negative_caption"])
            assert phrase_text(positive) == item["caption"] and phrase_text(negative) == item["negative_caption"]
            assert evaluate(scene, positive) is True, (subset, item)
            assert evaluate(scene, negative) is False, (subset, item)
            # Equal with and without a leading space (at the assistant turn's start or as a continuation).
            for lead in ("", " "):
                ids = [tokenizer(lead + item[k], add_special_tokens=False)["input_ids"]
                       for k in ("caption", "negative_caption")]
                assert len(ids[0]) == len(ids[1]), (subset, item)
            _check_edit(subset, scene, positive, negative)


def _check_edit(subset, scene, positive, negative):
    """The negative is the documented edit of the positive."""
    present = {(o.color, o.shape) for o in scene.objects}
    if subset in ("swap_att", "swap_obj", "replace_rel", "add_att"):
        assert isinstance(positive, Relation) and isinstance(negative, Relation)
        assert _named(scene, positive.subject) and _named(scene, positive.object)
        s, o, ns, no = positive.subject, positive.object, negative.subject, negative.object
        assert o.size is None and (s.size is None) == (subset != "add_att")
        if subset == "swap_att":
            assert (ns.color, no.color, ns.shape, no.shape) == (o.color, s.color, s.shape, o.shape)
            assert s.color != o.color and s.shape != o.shape
            assert (ns.color, ns.shape) not in present and (no.color, no.shape) not in present
        elif subset == "swap_obj":
            assert (ns.shape, no.shape, ns.color, no.color) == (o.shape, s.shape, s.color, o.color)
            assert s.color != o.color and s.shape != o.shape
            assert (ns.color, ns.shape) not in present and (no.color, no.shape) not in present
        elif subset == "replace_rel":
            assert negative == Relation(s, OPPOSITE[positive.relation], o)
        else:
            assert ns.size != s.size and negative == Relation(Desc(s.shape, s.color, ns.size), positive.relation, o)
        if subset != "replace_rel":
            assert negative.relation == positive.relation
    elif subset in ("replace_att", "replace_obj"):
        assert isinstance(positive, Exists) and isinstance(negative, Exists)
        p, n = positive.desc, negative.desc
        assert p.size and p.color and p.shape and n.size == p.size
        if subset == "replace_att":
            assert n.shape == p.shape and n.color != p.color
            assert not any(x.shape == n.shape and x.color == n.color for x in scene.objects)
        else:
            assert n.color == p.color and n.shape != p.shape and not any(x.shape == n.shape for x in scene.objects)
    else:
        assert isinstance(positive, And) and isinstance(negative, And) and len(positive.parts) == 2
        pairs = [(p.desc.color, p.desc.shape) for p in positive.parts]
        new = [(p.desc.color, p.desc.shape) for p in negative.parts]
        assert all(p.desc.size is None for p in positive.parts + negative.parts)
        assert pairs[0] != pairs[1] and all(c in present for c in pairs)
        changed = [k for k in range(2) if pairs[k] != new[k]]
        assert len(changed) == 1 and new[changed[0]] not in present


def test_phrase_cr_pair_on_a_hand_built_scene():
    """  row 0: large red square (col 0), small blue circle (col 2); row 3: small red circle (col 0)."""
    vocab = miniature_vocabulary()
    scene = make_scene([("red", "square", "large", 0, 0), ("blue", "circle", "small", 0, 2),
                        ("red", "circle", "small", 3, 0)])
    seen = collections.defaultdict(set)
    for seed in range(40):
        for subset in CR_SUBSETS:
            made = phrase_cr_pair(scene, subset, random.Random(seed), vocab)
            if made is not None:
                _check_edit(subset, scene, *made)
                seen[subset].add((phrase_text(made[0]), phrase_text(made[1])))
    # Red square and blue circle: swapping gives "blue square" and "red circle", which exists -> no item
    # from that pair; the red circle and the blue circle share the shape -> none; the red square and the
    # red circle share the colour -> none. So no swap item at all in this scene.
    assert not seen["swap_att"] and not seen["swap_obj"]
    assert ("red square left of blue circle .", "red square right of blue circle .") in seen["replace_rel"]
    assert ("red circle below red square .", "red circle above red square .") in seen["replace_rel"]
    assert all(n.split()[2] not in ("square", "circle") for _, n in seen["replace_obj"])
    assert ("large red square .", "large blue square .") in seen["replace_att"]
    assert not any(n.startswith(("small red circle", "small blue circle")) for _, n in seen["replace_att"])
    with pytest.raises(ValueError, match="subset"):
        phrase_cr_pair(scene, "replace_color", random.Random(0), vocab)


def test_phrase_texts_round_trip_and_reject_other_forms():
    statements = [Exists(Desc("square", "red", "large")), Exists(Desc("circle", "blue")),
                  Relation(Desc("square", "red"), "left_of", Desc("circle", "blue")),
                  Relation(Desc("star", "white", "small"), "below", Desc("cross", "black")),
                  And((Exists(Desc("square", "red")), Exists(Desc("diamond", "green"))))]
    for st in statements:
        assert parse_phrase(phrase_text(st)) == st
    assert phrase_text(statements[2]) == "red square left of blue circle ."
    assert phrase_text(statements[4]) == "red square and green diamond ."
    with pytest.raises(ValueError, match="statement"):
        phrase_text(Relation(Desc("square"), "above", Desc("circle"), definite=True))
    with pytest.raises(ValueError, match="text"):
        parse_phrase("red square is left of blue circle .")
    with pytest.raises(ValueError, match="text"):
        parse_phrase("red square")


def test_default_test_scenes_give_600_items_per_subset(tmp_path):
    summary = generate_miniature(str(tmp_path / "data"), seed=0, num_train=1)
    assert summary["arguments"]["num_test"] == 1000
    for subset in CR_SUBSETS:
        assert summary["counts"][f"cr/{subset}.json"] >= 600, subset


@pytest.mark.parametrize("kwargs,name", [({"num_train": 0}, "num_train"), ({"num_test": 0}, "num_test"),
                                         ({"seed": -1}, "seed"), ({"questions": -1}, "questions"),
                                         ({"questions": 1.5}, "questions")])
def test_invalid_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_miniature(str(tmp_path / "data"), **{"num_train": 2, "num_test": 2, **kwargs})


def test_cli(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["--preset", "miniature", "--out", str(out), "--seed", "3", "--train", "12", "--test", "20", "--questions"]
    done = subprocess.run([sys.executable, "-m", "compodistill.data.synth", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "miniature preset" in done.stdout and "cr/add_obj.json" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["arguments"]["questions"] == 3
    assert summary["arguments"]["num_train"] == 12 and summary["arguments"]["num_test"] == 20
    # Usage errors, in process (the same parser): exit status 2 and the option named.
    for argv, words in [(args, ("--overwrite",)), (args + ["--overwrite", "--size", "tiny"], ("--size", "miniature")),
                        (["--out", str(tmp_path / "b"), "--size", "tiny", "--questions", "2"], ("--questions",)),
                        (args + ["--overwrite", "--train", "0"], ("--train",))]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and all(w in stderr for w in words), (argv, stderr)
