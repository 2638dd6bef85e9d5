"""Negatives: SugarCrepe-style compositional-reasoning pairs (a true caption and a minimally edited
false one) and relational-hallucination yes/no pairs, built from a scene graph and checked by the
evaluator of `compodistill.data.statements`.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import replace

from .questions import YesNo
from .scene_graph import OPPOSITE, RELATIONS, Scene, Vocabulary, true_relations, unique_in_order
from .statements import And, Count, Desc, Exists, HasAttr, Relation, evaluate, matching, shortest_unique, statement_text


CR_SUBSETS = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att")


def _cr_desc(scene, i, rng):
    """Colour + shape (plus the size, always when needed to be unique, else sometimes)."""
    o = scene.objects[i]
    short, full = Desc(o.shape, o.color), Desc(o.shape, o.color, o.size)
    for desc in ((short, full) if rng.random() < 0.7 else (full,)):
        if matching(scene, desc) == [i]:
            return desc
    return None


def _valid(scene, positive, negative) -> bool:
    return (statement_text(positive) != statement_text(negative) and evaluate(scene, positive) is True
            and evaluate(scene, negative) is False)


def _descs_of(statement) -> list:
    if isinstance(statement, (Exists, HasAttr, Count)):
        return [statement.desc]
    if isinstance(statement, Relation):
        return [statement.subject, statement.object]
    return [d for p in statement.parts for d in _descs_of(p)]


def _with_descs(statement, descs):
    """The statement with its descriptions replaced in order (inverse of `_descs_of`)."""
    if isinstance(statement, (Exists, HasAttr, Count)):
        return replace(statement, desc=descs[0])
    if isinstance(statement, Relation):
        return replace(statement, subject=descs[0], object=descs[1])
    parts, k = [], 0
    for p in statement.parts:
        n = len(_descs_of(p))
        parts.append(_with_descs(p, descs[k:k + n]))
        k += n
    return And(tuple(parts))


def _relation_caption(scene, i, j, di, dj, rng):
    rels = true_relations(scene, i, j)
    return Relation(di, rng.choice(rels), dj) if rels else None


def _swap_obj(scene, i, j, di, dj, rng, vocab):
    positive = _relation_caption(scene, i, j, di, dj, rng)
    return positive, Relation(dj, positive.relation, di)


def _swap_att(scene, i, j, di, dj, rng, vocab):
    attrs = [a for a in ("color", "size") if getattr(di, a) and getattr(dj, a) and getattr(di, a) != getattr(dj, a)]
    if not attrs or di.shape == dj.shape:
        return None  # swapping would give back the same pair of objects
    attr = rng.choice(attrs)
    si, sj = replace(di, **{attr: getattr(dj, attr)}), replace(dj, **{attr: getattr(di, attr)})
    if {si, sj} == {di, dj}:
        return None
    if rng.random() < 0.5:
        return And((Exists(di), Exists(dj))), And((Exists(si), Exists(sj)))
    positive = _relation_caption(scene, i, j, di, dj, rng)
    return positive, Relation(si, positive.relation, sj)


def _replace_word(scene, positive, attr, rng, vocab):
    """Replace one `attr` word of one description; the first replacement that makes it false wins."""
    descs = _descs_of(positive)
    slots = [(k, v) for k, d in enumerate(descs) for v in getattr(vocab, attr + "s") if getattr(d, attr)
             and v != getattr(d, attr)]
    rng.shuffle(slots)
    for k, value in slots:
        negative = _with_descs(positive, descs[:k] + [replace(descs[k], **{attr: value})] + descs[k + 1:])
        if _valid(scene, positive, negative):
            return positive, negative
    return None


def _replace_obj(scene, i, j, di, dj, rng, vocab):
    positive = _relation_caption(scene, i, j, di, dj, rng) if rng.random() < 0.7 else Exists(di)
    return _replace_word(scene, positive, "shape", rng, vocab)


def _replace_att(scene, i, j, di, dj, rng, vocab):
    positive = _relation_caption(scene, i, j, di, dj, rng) if rng.random() < 0.7 else Exists(di)
    has_size = any(d.size for d in _descs_of(positive))
    return _replace_word(scene, positive, "size" if has_size and rng.random() < 0.3 else "color", rng, vocab)


def _replace_rel(scene, i, j, di, dj, rng, vocab):
    positive = _relation_caption(scene, i, j, di, dj, rng)
    others = [r for r in RELATIONS if r != positive.relation]
    rng.shuffle(others)
    for rel in others:
        negative = replace(positive, relation=rel)
        if _valid(scene, positive, negative):
            return positive, negative
    return None


def _add_obj(scene, i, j, di, dj, rng, vocab):
    positive = _relation_caption(scene, i, j, di, dj, rng) if rng.random() < 0.6 else Exists(di)
    present = {(o.color, o.shape) for o in scene.objects}
    mentioned_colors = unique_in_order([o.color for o in scene.objects])
    mentioned_shapes = unique_in_order([o.shape for o in scene.objects])
    hard = [(c, s) for c in mentioned_colors for s in mentioned_shapes if (c, s) not in present]
    absent = hard if hard and rng.random() < 0.6 else [cs for cs in vocab.combos() if cs not in present]
    if not absent:
        return None
    color, shape = rng.choice(absent)
    return positive, And((positive, Exists(Desc(shape, color))))


def _add_att(scene, i, j, di, dj, rng, vocab):
    o = scene.objects[i]
    bare = shortest_unique(scene, i, exclude=("color",))  # "a circle" / "a small circle"
    if bare is not None and rng.random() < 0.7:
        attr, values, reduced = "color", [c for c in vocab.colors if c != o.color], bare
    else:
        attr, values, reduced = "size", [s for s in vocab.sizes if s != o.size], replace(di, size=None)
        if matching(scene, reduced) != [i]:
            return None
    positive = _relation_caption(scene, i, j, reduced, dj, rng) if rng.random() < 0.6 else Exists(reduced)
    rng.shuffle(values)
    for value in values:
        added = replace(reduced, **{attr: value})
        negative = replace(positive, subject=added) if isinstance(positive, Relation) else Exists(added)
        if _valid(scene, positive, negative):
            return positive, negative
    return None


_CR_BUILDERS = {"swap_obj": _swap_obj, "swap_att": _swap_att, "replace_obj": _replace_obj,
                "replace_att": _replace_att, "replace_rel": _replace_rel, "add_obj": _add_obj, "add_att": _add_att}


def cr_pair(scene: Scene, subset: str, rng: random.Random, vocab: Vocabulary, focus=None):
    """One (positive, negative) statement pair of a SugarCrepe subset, or None if the scene has none.

    - swap_obj: a relation caption "a red circle is to the left of a blue square" with its two object
      phrases exchanged: "a blue square is to the left of a red circle".
    - swap_att: two objects of a conjunction or relation exchange an attribute (colour, or size when
      both phrases carry one): "a red circle and a blue square" → "a blue circle and a red square"; the
      shapes must differ, so the negative names a different pair of objects.
    - replace_obj: one shape noun replaced by another vocabulary shape.
    - replace_att: one colour (or size) word replaced by another value.
    - replace_rel: the relation replaced by another one (the opposite, or the other axis's).
    - add_obj: the caption joined with an object that is absent ("... and a green star").
    - add_att: a description without colour (or without size) gets one that makes it false
      ("a circle is above a red star" → "a blue circle is above a red star").

    Guards: the positive is true and the negative false by `evaluate` (so never a tie), their texts
    differ, descriptions in the positive name exactly one object. Pairs of objects are tried in random
    order; with `focus` (object indices) pairs whose first object is in focus come first.
    """
    if subset not in _CR_BUILDERS:
        raise ValueError(f"subset: expected one of {CR_SUBSETS}, got {subset!r}")
    n = len(scene.objects)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    rng.shuffle(pairs)
    if focus:
        pairs.sort(key=lambda p: p[0] not in focus)
    for i, j in pairs:
        di, dj = _cr_desc(scene, i, rng), _cr_desc(scene, j, rng)
        if di is None or dj is None or not true_relations(scene, i, j):
            continue
        made = _CR_BUILDERS[subset](scene, i, j, di, dj, rng, vocab)
        if made is not None and _valid(scene, *made):
            return made
    return None


# ---- relational hallucination -------------------------------------------------------------------

HALLUCINATION_CATEGORIES = ("relation", "attribute", "object")


def hallucination_pair(scene: Scene, category: str, rng: random.Random, vocab: Vocabulary):
    """A (yes, no) pair of relational yes/no questions as YesNo queries, or None.

    - relation: "Is the red circle to the left of the blue square?" with the true relation (yes) and
      its opposite (no).
    - attribute: "Is there a red circle above a blue square?" true (yes), and with one colour (or size)
      replaced so that it is false (no); colours of other scene objects are tried first.
    - object: the same with one object's shape replaced (no), shapes in the scene tried first.
    """
    if category not in HALLUCINATION_CATEGORIES:
        raise ValueError(f"category: expected one of {HALLUCINATION_CATEGORIES}, got {category!r}")
    n = len(scene.objects)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    rng.shuffle(pairs)
    for i, j in pairs:
        rels = true_relations(scene, i, j)
        if not rels:
            continue
        rel = rng.choice(rels)
        if category == "relation":
            di, dj = shortest_unique(scene, i), shortest_unique(scene, j)
            if di and dj:
                return YesNo(Relation(di, rel, dj, True)), YesNo(Relation(di, OPPOSITE[rel], dj, True))
            continue
        di, dj = _cr_desc(scene, i, rng), _cr_desc(scene, j, rng)
        if di is None or dj is None:
            continue
        positive = Relation(di, rel, dj)
        attr = "shape" if category == "object" else ("size" if di.size and rng.random() < 0.3 else "color")
        in_scene = unique_in_order([getattr(o, attr) for o in scene.objects])
        rest = [v for v in getattr(vocab, attr + "s") if v not in in_scene]
        rng.shuffle(in_scene)
        rng.shuffle(rest)
        for k, value in itertools.product(rng.sample([0, 1], 2), in_scene + rest):
            descs = [di, dj]
            if not getattr(descs[k], attr) or value == getattr(descs[k], attr):
                continue
            descs[k] = replace(descs[k], **{attr: value})
            negative = Relation(descs[0], rel, descs[1])
            if _valid(scene, positive, negative):
                return YesNo(positive), YesNo(negative)
    return None


# ---- CR items scored by caption likelihood (the miniature preset) --------------------------------

def _named_objects(scene: Scene) -> list[int]:
    """Indices of the objects that are the only one of their colour and shape in the scene."""
    combos = [(o.color, o.shape) for o in scene.objects]
    return [i for i, c in enumerate(combos) if combos.count(c) == 1]


def _pair_relation(scene, i, j, rng, *, size=False):
    """`Relation` "a.colour a.shape REL b.colour b.shape" (with a's size in front when `size`) with a
    relation that holds from i to j."""
    a, b = scene.objects[i], scene.objects[j]
    return Relation(Desc(a.shape, a.color, a.size if size else None), rng.choice(true_relations(scene, i, j)),
                    Desc(b.shape, b.color))


def _phrase_swap(scene, rng, vocab, exchange):
    present = {(o.color, o.shape) for o in scene.objects}
    named = _named_objects(scene)
    pairs = [(i, j) for i in named for j in named if i != j]
    rng.shuffle(pairs)
    for i, j in pairs:
        a, b = scene.objects[i], scene.objects[j]
        # Both exchanged combinations must be absent, so the negative names no object at all.
        if a.color == b.color or a.shape == b.shape or (a.color, b.shape) in present or (b.color, a.shape) in present:
            continue
        positive = _pair_relation(scene, i, j, rng)
        s, o = positive.subject, positive.object
        if exchange == "color":
            return positive, replace(positive, subject=replace(s, color=o.color), object=replace(o, color=s.color))
        return positive, replace(positive, subject=replace(s, shape=o.shape), object=replace(o, shape=s.shape))
    return None


def _phrase_swap_att(scene, rng, vocab):
    return _phrase_swap(scene, rng, vocab, "color")


def _phrase_swap_obj(scene, rng, vocab):
    return _phrase_swap(scene, rng, vocab, "shape")


def _named_pair(scene, rng):
    named = _named_objects(scene)
    return tuple(rng.sample(named, 2)) if len(named) >= 2 else None


def _phrase_replace_rel(scene, rng, vocab):
    pair = _named_pair(scene, rng)
    if pair is None:
        return None
    positive = _pair_relation(scene, *pair, rng)
    return positive, replace(positive, relation=OPPOSITE[positive.relation])


def _phrase_add_att(scene, rng, vocab):
    pair = _named_pair(scene, rng)
    if pair is None:
        return None
    positive = _pair_relation(scene, *pair, rng, size=True)
    other = rng.choice([s for s in vocab.sizes if s != positive.subject.size])
    return positive, replace(positive, subject=replace(positive.subject, size=other))


def _phrase_replace_att(scene, rng, vocab):
    o = rng.choice(scene.objects)
    # A colour that no object of this shape has: the edited phrase then names no object.
    colors = [c for c in vocab.colors if not any(p.shape == o.shape and p.color == c for p in scene.objects)]
    if not colors:
        return None
    positive = Exists(Desc(o.shape, o.color, o.size))
    return positive, Exists(replace(positive.desc, color=rng.choice(colors)))


def _phrase_replace_obj(scene, rng, vocab):
    o = rng.choice(scene.objects)
    shapes = [s for s in vocab.shapes if not any(p.shape == s for p in scene.objects)]
    if not shapes:
        return None
    positive = Exists(Desc(o.shape, o.color, o.size))
    return positive, Exists(replace(positive.desc, shape=rng.choice(shapes)))


def _phrase_add_obj(scene, rng, vocab):
    present = unique_in_order((o.color, o.shape) for o in scene.objects)
    absent = [c for c in vocab.combos() if c not in present]
    if len(present) < 2 or not absent:
        return None
    shown = rng.sample(present, 2)
    positive = And(tuple(Exists(Desc(shape, color)) for color, shape in shown))
    color, shape = rng.choice(absent)
    k = rng.randrange(2)
    parts = list(positive.parts)
    parts[k] = Exists(Desc(shape, color))
    return positive, And(tuple(parts))


_PHRASE_CR_BUILDERS = {"swap_obj": _phrase_swap_obj, "swap_att": _phrase_swap_att, "replace_obj": _phrase_replace_obj,
                       "replace_att": _phrase_replace_att, "replace_rel": _phrase_replace_rel,
                       "add_obj": _phrase_add_obj, "add_att": _phrase_add_att}


def phrase_cr_pair(scene: Scene, subset: str, rng: random.Random, vocab: Vocabulary):
    """One (positive, negative) statement pair of a CR subset in the phrase grammar
    (`statements.phrase_text`), for scoring by caption likelihood; None if the scene has none.

    With a, b objects that are each the only one of their colour and shape, and REL a relation that
    holds from a to b:

    - swap_att: "a.colour a.shape REL b.colour b.shape ." vs the colours exchanged; a and b differ in
      colour and in shape and neither exchanged colour-shape combination is in the scene.
    - swap_obj: the same with the shapes exchanged.
    - replace_rel: REL vs its opposite (left of / right of, above / below).
    - add_att: "SIZE a.colour a.shape REL b.colour b.shape ." with a's size vs the other size.
    - replace_att: "size colour shape ." of any object vs a colour that no object of that shape has.
    - replace_obj: the same phrase vs a shape that no object has.
    - add_obj: "colour shape and colour shape ." naming two present colour-shape combinations vs one
      of them (either, at random) replaced by a combination absent from the scene.

    Each edit substitutes words or permutes them, so both phrases have the same word count (and
    token count when every vocabulary word is one token). Guards: the positive is true and the
    negative false by `evaluate`.
    """
    if subset not in _PHRASE_CR_BUILDERS:
        raise ValueError(f"subset: expected one of {CR_SUBSETS}, got {subset!r}")
    made = _PHRASE_CR_BUILDERS[subset](scene, rng, vocab)
    if made is None:
        return None
    if not _valid(scene, *made):
        raise RuntimeError(f"{scene.id} {subset}: built an invalid pair {made!r}")
    return made
