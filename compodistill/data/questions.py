"""Questions about a scene graph: structured queries, their answers computed from the graph, their
texts and parser, and the builders of VQA items and of short-answer conversation turns.

Queries:
- `WhatAttr(d, attr)` "What color is the square?": the attribute of the one object d names.
- `WhatRelated(rel, anchor)` "What is above the red circle?": the one object in that relation.
- `HowMany(d)` "How many circles are there?": the number of objects d matches.
- `YesNo(statement)` "Is there a red circle?", "Is the square red?": the statement's truth.
A query that is ill-posed for the scene (ambiguous or missing referent, a tie) has no answer (None),
and the builders never write one.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Optional, Union

from .scene_graph import OPPOSITE, SIZES, Obj, Scene, Vocabulary, relation_truth, true_relations, unique_in_order
from .statements import (ATTRIBUTES, COLOR_PATTERN, RELATION_OF_WORDS, RELATION_PATTERN, RELATION_WORDS,
                         SHAPE_PATTERN, And, Count, Desc, Exists, HasAttr, Relation, Statement, desc_text, evaluate,
                         match_desc, matching, noun_phrase, np_pattern, number_word, shortest_unique,
                         unique_descriptions, single_match)



@dataclass(frozen=True)
class WhatAttr:
    """"What color is the square?": the attribute of the one object `desc` names."""

    desc: Desc
    attr: str


@dataclass(frozen=True)
class WhatRelated:
    """"What is to the left of the blue square?": the one object in that relation to the anchor."""

    relation: str
    anchor: Desc


@dataclass(frozen=True)
class HowMany:
    desc: Desc


@dataclass(frozen=True)
class YesNo:
    statement: Statement


Query = Union[WhatAttr, WhatRelated, HowMany, YesNo]


def answers(scene: Scene, query) -> Optional[list[str]]:
    """Acceptable answers to a query, canonical first; None when the query is ill-posed for the scene
    (ambiguous or missing referent, tie, or no single object in the asked relation)."""
    if isinstance(query, WhatAttr):
        if query.attr not in ATTRIBUTES:
            raise ValueError(f"query.attr: expected one of {ATTRIBUTES}, got {query.attr!r}")
        i = single_match(scene, query.desc)
        return None if i is None else [getattr(scene.objects[i], query.attr)]
    if isinstance(query, WhatRelated):
        anchor = single_match(scene, query.anchor)
        if anchor is None:
            return None
        truths = {i: relation_truth(o, query.relation, scene.objects[anchor])
                  for i, o in enumerate(scene.objects) if i != anchor}
        related = [i for i, t in truths.items() if t]
        if None in truths.values() or len(related) != 1:
            return None
        return [desc_text(d) for d in unique_descriptions(scene, related[0])]
    if isinstance(query, HowMany):
        n = len(matching(scene, query.desc))
        return unique_in_order([str(n), number_word(n)])
    if isinstance(query, YesNo):
        truth = evaluate(scene, query.statement)
        return None if truth is None else (["Yes", "yes"] if truth else ["No", "no"])
    raise ValueError(f"query: expected WhatAttr, WhatRelated, HowMany or YesNo, got {type(query).__name__}")


def answer(scene: Scene, query) -> Optional[str]:
    """The canonical answer (first of `answers`), or None when the query is ill-posed."""
    found = answers(scene, query)
    return found[0] if found else None



def question_text(query) -> str:
    """The question for a query: "What color is the square?", "What is above the red circle?",
    "How many circles are there?", "Is there a green triangle?", "Is the red circle to the left of the
    blue square?", "Is the square red?"."""
    if isinstance(query, WhatAttr):
        return f"What {query.attr} is {noun_phrase(query.desc, 'the')}?"
    if isinstance(query, WhatRelated):
        return f"What is {RELATION_WORDS[query.relation]} {noun_phrase(query.anchor, 'the')}?"
    if isinstance(query, HowMany):
        return f"How many {desc_text(query.desc, plural_form=True)} are there?"
    if isinstance(query, YesNo):
        st = query.statement
        if isinstance(st, Exists):
            return f"Is there {noun_phrase(st.desc, 'a')}?"
        if isinstance(st, Relation):
            words = RELATION_WORDS[st.relation]
            if st.definite:
                return f"Is {noun_phrase(st.subject, 'the')} {words} {noun_phrase(st.object, 'the')}?"
            return f"Is there {noun_phrase(st.subject, 'a')} {words} {noun_phrase(st.object, 'a')}?"
        if isinstance(st, HasAttr):
            value = noun_phrase(Desc(st.value), "a") if st.attr == "shape" else st.value
            return f"Is {noun_phrase(st.desc, 'the')} {value}?"
        raise ValueError(f"query: no yes/no question form for {type(st).__name__}")
    raise ValueError(f"query: expected WhatAttr, WhatRelated, HowMany or YesNo, got {type(query).__name__}")


_QUESTIONS = [
    ("what_attr", re.compile(rf"what (?P<attr>color|shape|size) is the {np_pattern('a')}")),
    ("what_related", re.compile(rf"what is (?P<rel>{RELATION_PATTERN}) the {np_pattern('a')}")),
    ("how_many", re.compile(rf"how many {np_pattern('a')} are there")),
    ("relation", re.compile(rf"is (?:(?P<def>the)|there an?) {np_pattern('a')} (?P<rel>{RELATION_PATTERN}) "
                            rf"(?:an?|the) {np_pattern('b')}")),
    ("exists", re.compile(rf"is there an? {np_pattern('a')}")),
    ("hasattr", re.compile(rf"is the {np_pattern('a')} "
                           rf"(?:(?P<value>{COLOR_PATTERN}|small|large)|an? (?P<shape>{SHAPE_PATTERN}))")),
]


def parse_question(text: str):
    """Inverse of `question_text` (case and the question mark are ignored)."""
    body = text.strip().rstrip("?").lower()
    for kind, pattern in _QUESTIONS:
        m = pattern.fullmatch(body)
        if not m:
            continue
        if kind == "what_attr":
            return WhatAttr(match_desc(m, "a"), m.group("attr"))
        if kind == "what_related":
            return WhatRelated(RELATION_OF_WORDS[m.group("rel")], match_desc(m, "a"))
        if kind == "how_many":
            return HowMany(match_desc(m, "a"))
        if kind == "relation":
            return YesNo(Relation(match_desc(m, "a"), RELATION_OF_WORDS[m.group("rel")], match_desc(m, "b"),
                                  m.group("def") is not None))
        if kind == "exists":
            return YesNo(Exists(match_desc(m, "a")))
        if m.group("shape"):
            return YesNo(HasAttr(match_desc(m, "a"), "shape", m.group("shape")))
        value = m.group("value")
        return YesNo(HasAttr(match_desc(m, "a"), "size" if value in SIZES else "color", value))
    raise ValueError(f"text: not a question of the benchmark's grammar: {text!r}")


# --------------------------------------------------------------------------------------------------
# Building queries from a scene
# --------------------------------------------------------------------------------------------------

def _yes_no_balanced(rng, yes_item, no_item):
    """Pick the true or the false variant with probability 1/2, falling back to the one that exists."""
    options = [x for x in ((yes_item, no_item) if rng.random() < 0.5 else (no_item, yes_item)) if x is not None]
    return options[0] if options else None


def _attribute_query(scene, rng, focus, vocab):
    i = rng.choice(focus)
    obj = scene.objects[i]
    attr = rng.choice(["color", "color", "shape", "size"])
    desc = shortest_unique(scene, i, exclude=(attr,), need_shape=attr != "shape")
    if desc is None:
        return None
    if rng.random() < 0.3:  # a yes/no form: "Is the square red?"
        values = {"color": vocab.colors, "shape": vocab.shapes, "size": vocab.sizes}[attr]
        wrong = [v for v in values if v != getattr(obj, attr)]
        value = getattr(obj, attr) if rng.random() < 0.5 else rng.choice(wrong)
        return YesNo(HasAttr(desc, attr, value))
    return WhatAttr(desc, attr)


def _relation_query(scene, rng, focus):
    n = len(scene.objects)
    pairs = [(i, j) for i in focus for j in range(n) if i != j]
    rng.shuffle(pairs)
    if rng.random() < 0.5:  # "What is to the left of the blue square?"
        for i, anchor in pairs:
            rels = true_relations(scene, i, anchor)
            rng.shuffle(rels)
            anchor_desc = shortest_unique(scene, anchor)
            for rel in rels:
                query = WhatRelated(rel, anchor_desc) if anchor_desc else None
                if query and answers(scene, query):
                    return query
    for i, j in pairs:  # "Is the red circle to the left of the blue square?"
        di, dj = shortest_unique(scene, i), shortest_unique(scene, j)
        rels = true_relations(scene, i, j)
        if di and dj and rels:
            rel = rng.choice(rels)
            return _yes_no_balanced(rng, YesNo(Relation(di, rel, dj, True)),
                                    YesNo(Relation(di, OPPOSITE[rel], dj, True)))
    return None


def _counting_query(scene, rng, focus, vocab):
    obj = scene.objects[rng.choice(focus)]
    kind = rng.choice(["shape", "shape", "color", "both", "size"])
    if rng.random() < 0.1:  # an absent kind of object: the answer 0
        obj = Obj(rng.choice(vocab.colors), rng.choice(vocab.shapes), rng.choice(vocab.sizes), 0, 0)
    desc = {"shape": Desc(obj.shape), "color": Desc(None, obj.color), "both": Desc(obj.shape, obj.color),
            "size": Desc(None, None, obj.size)}[kind]
    return HowMany(desc)


def _existence_query(scene, rng, focus, vocab):
    obj = scene.objects[rng.choice(focus)]
    present = {(o.color, o.shape) for o in scene.objects}
    colors = unique_in_order([o.color for o in scene.objects])
    shapes = unique_in_order([o.shape for o in scene.objects])
    # A hard negative recombines a colour and a shape that are in the scene but not together.
    hard = [(c, s) for c in colors for s in shapes if (c, s) not in present]
    easy = [(c, s) for c, s in vocab.combos() if (c, s) not in present]
    absent = hard if hard and rng.random() < 0.6 else easy
    yes_item = YesNo(Exists(Desc(obj.shape, obj.color)))
    no_item = None
    if absent:
        color, shape = rng.choice(absent)
        no_item = YesNo(Exists(Desc(shape, color)))
    return _yes_no_balanced(rng, yes_item, no_item)


QUESTION_CATEGORIES = ("attribute", "relation", "counting", "existence")


def make_query(scene: Scene, category: str, rng: random.Random, vocab: Vocabulary, focus=None):
    """A well-posed query of `category` about the scene (None if none could be formed). `focus`
    restricts the object the question is about (indices), e.g. to held-out combinations."""
    focus = list(range(len(scene.objects))) if not focus else list(focus)
    if category == "attribute":
        query = _attribute_query(scene, rng, focus, vocab)
    elif category == "relation":
        query = _relation_query(scene, rng, focus)
    elif category == "counting":
        query = _counting_query(scene, rng, focus, vocab)
    elif category == "existence":
        query = _existence_query(scene, rng, focus, vocab)
    else:
        raise ValueError(f"category: expected one of {QUESTION_CATEGORIES}, got {category!r}")
    return query if query is not None and answers(scene, query) is not None else None


def mentioned_combos(item) -> set:
    """(colour, shape) pairs a statement or query puts together in words: descriptions with both, and
    attribute questions that attach a colour to a shape or a shape to a colour ("Is the circle red?")."""
    if isinstance(item, YesNo):
        return mentioned_combos(item.statement)
    if isinstance(item, And):
        return set().union(*(mentioned_combos(p) for p in item.parts))
    descs = {Exists: lambda x: [x.desc], Count: lambda x: [x.desc], HasAttr: lambda x: [x.desc],
             Relation: lambda x: [x.subject, x.object], WhatAttr: lambda x: [x.desc],
             WhatRelated: lambda x: [x.anchor], HowMany: lambda x: [x.desc]}[type(item)](item)
    pairs = {(d.color, d.shape) for d in descs if d.color and d.shape}
    if isinstance(item, HasAttr) and item.attr in ("color", "shape"):
        d = replace(item.desc, **{item.attr: item.value})
        if d.color and d.shape:
            pairs.add((d.color, d.shape))
    return pairs


def conversation_turns(scene: Scene, rng: random.Random, vocab: Vocabulary, turns: int,
                       avoid=frozenset()) -> list[tuple[str, str]]:
    """Up to `turns` distinct (question, short answer) pairs mixing all categories; questions that
    mention a (colour, shape) pair in `avoid` (held-out pairs, which must not even be asked about in
    training, where the answer would always be "No" or 0) are skipped."""
    out, seen = [], set()
    for _ in range(4 * turns):
        if len(out) == turns:
            break
        query = make_query(scene, rng.choice(QUESTION_CATEGORIES), rng, vocab)
        if query is None or mentioned_combos(query) & avoid:
            continue
        text = question_text(query)
        if text not in seen:
            seen.add(text)
            out.append((text, answer(scene, query)))
    return out




def short_answer_turns(scene: Scene, rng: random.Random, vocab: Vocabulary, turns: int) -> list[tuple[str, str]]:
    """Up to `turns` distinct (question, one-word answer) pairs: the colour of a shape that one object
    has ("What color is the square?" "red"), the shape of a colour that one object has ("What shape is
    the red object?" "square"), or a count of a vocabulary shape or colour ("How many circles are
    there?" "2", "0" when absent). Each turn draws its kind uniformly among the kinds the scene allows."""
    shapes, colors = [o.shape for o in scene.objects], [o.color for o in scene.objects]
    kinds = {
        "color": [WhatAttr(Desc(s), "color") for s in unique_in_order(shapes) if shapes.count(s) == 1],
        "shape": [WhatAttr(Desc(None, c), "shape") for c in unique_in_order(colors) if colors.count(c) == 1],
        "count": [HowMany(Desc(s)) for s in vocab.shapes] + [HowMany(Desc(None, c)) for c in vocab.colors],
    }
    out, seen = [], set()
    for _ in range(4 * turns):
        if len(out) == turns:
            break
        query = rng.choice(kinds[rng.choice([k for k, v in kinds.items() if v])])
        text = question_text(query)
        if text not in seen:
            seen.add(text)
            out.append((text, answer(scene, query)))
    return out
