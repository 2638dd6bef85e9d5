"""Scene graphs for the procedural compositional-reasoning benchmark, a truth evaluator over structured
statements, and every text (captions, questions, answers, negatives) derived from them.

A scene is a G×G grid with at most one object per cell; each object has a colour, a shape and a size.
Positions are cells, so spatial relations are decided by cell indices and are never near ties:

    left_of(a, b)  ⇔ a.col < b.col        right_of(a, b) ⇔ a.col > b.col
    above(a, b)    ⇔ a.row < b.row        below(a, b)    ⇔ a.row > b.row     (row 0 is the top)

A horizontal relation between two objects of the same column (or a vertical one within a row) is
neither true nor false here: `evaluate` returns None for it and no generator ever asserts or denies it.

Texts are never written by hand: each is rendered from a structured statement or query
(`statement_text`, `question_text`) whose truth or answer the evaluator computes from the scene, and
`parse_statement` / `parse_question` read the texts back, so any written item can be re-checked.

Semantics:
- `Desc(shape, color, size)` describes objects; None fields match anything ("object" as the noun).
- `Exists(d)` "a red circle": some object matches d.
- `Count(d, n)` "there are two circles": exactly n objects match d.
- `HasAttr(d, attr, value)` "the square is red": d names exactly one object (else None) and it has value.
- `Relation(a, rel, b, definite)`: definite "the red circle is to the left of the blue square" needs
  a and b to name exactly one object each (else None); indefinite "a red circle is to the left of a blue
  square" is true when some pair of distinct matching objects is related, None when no pair is but
  some pair is a tie (same column/row), false otherwise (including when nothing matches).
- `And(parts)`: Kleene conjunction (false if a part is false, else None if a part is None).
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Union

# Colour names come from the tiny tokenizer's word list. "gray" is left out: it is the background.
PALETTE = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 25),
    "purple": (135, 45, 185),
    "orange": (245, 135, 25),
    "pink": (250, 150, 200),
    "brown": (125, 75, 30),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
    "cyan": (30, 210, 215),
    "magenta": (225, 30, 205),
}
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring", "heart")
SIZES = ("small", "large")
# Defaults are the colours and shapes that stay distinct at 64 px with 16 px cells (a small object is
# ~7 px across: hexagon vs circle or heart vs triangle would be guesswork there).
DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
DEFAULT_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")

RELATIONS = ("left_of", "right_of", "above", "below")
OPPOSITE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
RELATION_WORDS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
ATTRIBUTES = ("color", "shape", "size")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


# --------------------------------------------------------------------------------------------------
# Scene graphs
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Obj:
    """One object: attribute words and its grid cell (row 0 is the top, col 0 the left)."""

    color: str
    shape: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    """A scene graph: objects on a `grid`×`grid` board rendered at `image_size` pixels."""

    id: str
    split: str
    objects: tuple
    grid: int = 4
    image_size: int = 64

    @property
    def cell_size(self) -> float:
        return self.image_size / self.grid

    def geometry(self, obj: Obj) -> tuple[float, float, float]:
        """(x, y, r): the object's centre in pixels (centre of its cell) and its radius."""
        cell = self.cell_size
        radius = cell * (0.22 if obj.size == "small" else 0.42)
        return (obj.col + 0.5) * cell, (obj.row + 0.5) * cell, radius

    @property
    def image(self) -> str:
        return f"{self.id}.png"

    def key(self) -> tuple:
        """Identity of the graph regardless of id and object order (for split disjointness)."""
        return (self.grid, tuple(sorted((o.row, o.col, o.color, o.shape, o.size) for o in self.objects)))

    def to_dict(self) -> dict:
        """The JSON line written to scenes/<split>.jsonl."""
        objects = []
        for o in self.objects:
            x, y, r = self.geometry(o)
            objects.append({"color": o.color, "shape": o.shape, "size": o.size, "x": round(x, 3),
                            "y": round(y, 3), "r": round(r, 3), "cell": [o.row, o.col]})
        return {"id": self.id, "split": self.split, "image": self.image, "width": self.image_size,
                "height": self.image_size, "grid": self.grid, "objects": objects}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        """Inverse of `to_dict`."""
        objects = tuple(Obj(o["color"], o["shape"], o["size"], int(o["cell"][0]), int(o["cell"][1]))
                        for o in data["objects"])
        return cls(data["id"], data["split"], objects, int(data["grid"]), int(data["width"]))


def make_scene(objects, *, grid: int = 4, image_size: int = 64, id: str = "scene", split: str = "test") -> Scene:
    """Build a scene by hand from (color, shape, size, row, col) tuples or `Obj`s, validating cells."""
    objs = tuple(o if isinstance(o, Obj) else Obj(*o) for o in objects)
    cells = [(o.row, o.col) for o in objs]
    if len(set(cells)) != len(cells):
        raise ValueError(f"objects: at most one object per cell, got cells {cells}")
    for o in objs:
        if not (0 <= o.row < grid and 0 <= o.col < grid):
            raise ValueError(f"objects: cell ({o.row}, {o.col}) outside the {grid}x{grid} grid")
        if o.size not in SIZES:
            raise ValueError(f"objects: size must be one of {SIZES}, got {o.size!r}")
    return Scene(id, split, objs, grid, image_size)


@dataclass(frozen=True)
class Vocabulary:
    """The colours, shapes and sizes scenes are drawn from."""

    colors: tuple = DEFAULT_COLORS
    shapes: tuple = DEFAULT_SHAPES
    sizes: tuple = SIZES

    def combos(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colors for s in self.shapes]


def make_vocabulary(colors=None, shapes=None) -> Vocabulary:
    """A validated vocabulary: colours from PALETTE, shapes from SHAPES, at least two of each (the
    replace_* negatives need an alternative word), given order kept, duplicates dropped."""
    def pick(name, given, default, allowed):
        values = default if given is None else tuple(dict.fromkeys(v.strip() for v in given if v.strip()))
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise ValueError(f"{name}: unknown {unknown}; expected names from {list(allowed)}")
        if len(values) < 2:
            raise ValueError(f"{name}: expected at least two distinct values, got {list(values)}")
        return tuple(values)

    return Vocabulary(pick("colors", colors, DEFAULT_COLORS, PALETTE), pick("shapes", shapes, DEFAULT_SHAPES, SHAPES))


def held_out_combos(vocab: Vocabulary, seed: int, fraction: float = 0.2) -> list[tuple[str, str]]:
    """(colour, shape) pairs kept out of training: about `fraction` of all pairs, chosen from the seed,
    such that every colour and every shape still occurs in some training pair (held-out pairs are new
    combinations of seen words). Sorted by vocabulary order."""
    combos = vocab.combos()
    want = max(1, round(fraction * len(combos)))
    order = combos[:]
    random.Random(f"compodistill-heldout:{seed}").shuffle(order)
    held, per_color, per_shape = [], dict.fromkeys(vocab.colors, 0), dict.fromkeys(vocab.shapes, 0)
    for color, shape in order:
        if len(held) == want:
            break
        if per_color[color] + 1 < len(vocab.shapes) and per_shape[shape] + 1 < len(vocab.colors):
            held.append((color, shape))
            per_color[color] += 1
            per_shape[shape] += 1
    return sorted(held, key=combos.index)


def sample_scene(rng: random.Random, scene_id: str, split: str, vocab: Vocabulary, *, grid: int,
                 image_size: int, max_objects: int, combos=None, require=None) -> Scene:
    """Draw a scene: 2..max_objects objects in distinct cells, (colour, shape) uniform over `combos`
    (default: all), size uniform. With `require` (a list of combos), one object takes a combo from it."""
    combos = vocab.combos() if combos is None else list(combos)
    count = rng.randint(2, max_objects)
    cells = rng.sample(range(grid * grid), count)
    pairs = [rng.choice(combos) for _ in range(count)]
    if require:
        pairs[rng.randrange(count)] = rng.choice(list(require))
    objects = tuple(Obj(c, s, rng.choice(vocab.sizes), cell // grid, cell % grid)
                    for (c, s), cell in zip(pairs, cells))
    return Scene(scene_id, split, objects, grid, image_size)


# --------------------------------------------------------------------------------------------------
# Statements, queries and the evaluator
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Desc:
    """An object description; None fields are unconstrained (noun "object" when shape is None)."""

    shape: Optional[str] = None
    color: Optional[str] = None
    size: Optional[str] = None

    def matches(self, obj: Obj) -> bool:
        return all(v is None or v == getattr(obj, a) for a, v in (("shape", self.shape), ("color", self.color),
                                                                    ("size", self.size)))

    def specified(self) -> int:
        return sum(v is not None for v in (self.shape, self.color, self.size))


@dataclass(frozen=True)
class Exists:
    desc: Desc


@dataclass(frozen=True)
class Count:
    desc: Desc
    n: int


@dataclass(frozen=True)
class HasAttr:
    desc: Desc
    attr: str
    value: str


@dataclass(frozen=True)
class Relation:
    subject: Desc
    relation: str
    object: Desc
    definite: bool = False


@dataclass(frozen=True)
class And:
    parts: tuple = field(default_factory=tuple)


Statement = Union[Exists, Count, HasAttr, Relation, And]


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


def matching(scene: Scene, desc: Desc) -> list[int]:
    """Indices of the objects that `desc` matches."""
    return [i for i, o in enumerate(scene.objects) if desc.matches(o)]


def relation_truth(a: Obj, relation: str, b: Obj) -> Optional[bool]:
    """Truth of `a relation b` from cells; None for a tie (same column for left/right, same row for
    above/below), which is never asserted nor denied."""
    if relation in ("left_of", "right_of"):
        if a.col == b.col:
            return None
        return (a.col < b.col) == (relation == "left_of")
    if relation in ("above", "below"):
        if a.row == b.row:
            return None
        return (a.row < b.row) == (relation == "above")
    raise ValueError(f"relation: expected one of {RELATIONS}, got {relation!r}")


def _unique(scene: Scene, desc: Desc) -> Optional[int]:
    found = matching(scene, desc)
    return found[0] if len(found) == 1 else None


def evaluate(scene: Scene, statement) -> Optional[bool]:
    """Truth of a statement in the scene: True, False, or None when it is ill-posed (a definite
    description that does not name exactly one object, or a relation only decided by a tie)."""
    if isinstance(statement, Exists):
        return bool(matching(scene, statement.desc))
    if isinstance(statement, Count):
        return len(matching(scene, statement.desc)) == statement.n
    if isinstance(statement, HasAttr):
        if statement.attr not in ATTRIBUTES:
            raise ValueError(f"statement.attr: expected one of {ATTRIBUTES}, got {statement.attr!r}")
        i = _unique(scene, statement.desc)
        return None if i is None else getattr(scene.objects[i], statement.attr) == statement.value
    if isinstance(statement, Relation):
        subjects, objects = matching(scene, statement.subject), matching(scene, statement.object)
        if statement.definite and (len(subjects) != 1 or len(objects) != 1 or subjects == objects):
            return None
        truths = [relation_truth(scene.objects[i], statement.relation, scene.objects[j])
                  for i in subjects for j in objects if i != j]
        if True in truths:
            return True
        return None if None in truths else False
    if isinstance(statement, And):
        truths = [evaluate(scene, part) for part in statement.parts]
        if False in truths:
            return False
        return None if None in truths else True
    raise ValueError(f"statement: expected Exists, Count, HasAttr, Relation or And, got {type(statement).__name__}")


def holds(scene: Scene, statement) -> bool:
    """True only when the statement is true in the scene (false and ill-posed both give False)."""
    return evaluate(scene, statement) is True


def unique_descriptions(scene: Scene, index: int, *, exclude=(), need_shape: bool = True) -> list[Desc]:
    """Descriptions that match object `index` and no other, shortest first (shape, colour+shape,
    size+shape, size+colour+shape; without shape when `need_shape` is False), never using the
    attributes in `exclude`."""
    obj = scene.objects[index]
    options = []
    for use_size, use_color, use_shape in itertools.product((False, True), (False, True), (True, False)):
        if (need_shape and not use_shape) or not (use_size or use_color or use_shape):
            continue
        if ("shape" in exclude and use_shape) or ("color" in exclude and use_color) or ("size" in exclude and use_size):
            continue
        options.append(Desc(obj.shape if use_shape else None, obj.color if use_color else None,
                            obj.size if use_size else None))
    options.sort(key=Desc.specified)  # stable: ties keep the order shape, colour, size
    return [d for d in options if matching(scene, d) == [index]]


def shortest_unique(scene: Scene, index: int, *, exclude=(), need_shape: bool = True) -> Optional[Desc]:
    """The shortest description that names object `index` alone, or None if there is none."""
    found = unique_descriptions(scene, index, exclude=exclude, need_shape=need_shape)
    return found[0] if found else None


def answers(scene: Scene, query) -> Optional[list[str]]:
    """Acceptable answers to a query, canonical first; None when the query is ill-posed for the scene
    (ambiguous or missing referent, tie, or no single object in the asked relation)."""
    if isinstance(query, WhatAttr):
        if query.attr not in ATTRIBUTES:
            raise ValueError(f"query.attr: expected one of {ATTRIBUTES}, got {query.attr!r}")
        i = _unique(scene, query.desc)
        return None if i is None else [getattr(scene.objects[i], query.attr)]
    if isinstance(query, WhatRelated):
        anchor = _unique(scene, query.anchor)
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
        return _dedupe([str(n), number_word(n)])
    if isinstance(query, YesNo):
        truth = evaluate(scene, query.statement)
        return None if truth is None else (["Yes", "yes"] if truth else ["No", "no"])
    raise ValueError(f"query: expected WhatAttr, WhatRelated, HowMany or YesNo, got {type(query).__name__}")


def answer(scene: Scene, query) -> Optional[str]:
    """The canonical answer (first of `answers`), or None when the query is ill-posed."""
    found = answers(scene, query)
    return found[0] if found else None


def _dedupe(items):
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------------------------------
# Text rendering and parsing
# --------------------------------------------------------------------------------------------------

def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def desc_text(desc: Desc, *, plural_form: bool = False) -> str:
    """"large red circle" (size, colour, noun); "red object" when the shape is open."""
    noun = desc.shape or "object"
    words = [w for w in (desc.size, desc.color) if w] + [plural(noun) if plural_form else noun]
    return " ".join(words)


def noun_phrase(desc: Desc, article: str) -> str:
    """`desc` with "a"/"an" (article="a") or "the"."""
    text = desc_text(desc)
    if article == "a":
        return ("an " if text[0] in "aeiou" else "a ") + text
    return "the " + text


def _clause(statement) -> str:
    if isinstance(statement, Exists):
        return noun_phrase(statement.desc, "a")
    if isinstance(statement, Count):
        if statement.n == 1:
            return f"there is one {desc_text(statement.desc)}"
        amount = "no" if statement.n == 0 else number_word(statement.n)
        return f"there are {amount} {desc_text(statement.desc, plural_form=True)}"
    if isinstance(statement, HasAttr):
        value = noun_phrase(Desc(statement.value), "a") if statement.attr == "shape" else statement.value
        return f"{noun_phrase(statement.desc, 'the')} is {value}"
    if isinstance(statement, Relation):
        article = "the" if statement.definite else "a"
        return (f"{noun_phrase(statement.subject, article)} is {RELATION_WORDS[statement.relation]} "
                f"{noun_phrase(statement.object, article)}")
    if isinstance(statement, And):
        if any(isinstance(p, And) for p in statement.parts) or len(statement.parts) < 2:
            raise ValueError("statement: And needs at least two parts, none of them an And")
        return " and ".join(_clause(p) for p in statement.parts)
    raise ValueError(f"statement: expected Exists, Count, HasAttr, Relation or And, got {type(statement).__name__}")


def _sentence(text: str, end: str) -> str:
    return text[0].upper() + text[1:] + end


def statement_text(statement) -> str:
    """One sentence: "A red circle is to the left of a blue square." / "A red circle and a blue square."
    / "There are two circles." / "The square is red." """
    return _sentence(_clause(statement), ".")


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


_COLOR_RE = "|".join(PALETTE)
_SHAPE_RE = "|".join(SHAPES + ("object",))
_NP = (rf"(?:(?P<{{p}}size>small|large) )?(?:(?P<{{p}}color>{_COLOR_RE}) )?"
       rf"(?P<{{p}}noun>(?:{_SHAPE_RE})(?:e?s)?)")
_REL = "|".join(sorted(RELATION_WORDS.values(), key=len, reverse=True))


def _np(prefix: str) -> str:
    return _NP.replace("{p}", prefix)


def _desc(match, prefix: str) -> Desc:
    noun = match.group(prefix + "noun")
    singular = next((s for s in SHAPES + ("object",) if noun in (s, plural(s))), None)
    if singular is None:
        raise ValueError(f"text: unknown noun {noun!r}")
    return Desc(None if singular == "object" else singular, match.group(prefix + "color"), match.group(prefix + "size"))


_REL_OF = {words: name for name, words in RELATION_WORDS.items()}
_CLAUSES = [
    ("relation", re.compile(rf"(?P<art>an?|the) {_np('a')} is (?P<rel>{_REL}) (?:an?|the) {_np('b')}")),
    ("hasattr", re.compile(rf"the {_np('a')} is (?:(?P<value>{_COLOR_RE}|small|large)|an? (?P<shape>{_SHAPE_RE}))")),
    ("count", re.compile(rf"there (?:is|are) (?P<n>no|\d+|{'|'.join(NUMBER_WORDS)}) {_np('a')}")),
    ("exists", re.compile(rf"an? {_np('a')}")),
]


def _parse_clause(text: str):
    for kind, pattern in _CLAUSES:
        m = pattern.fullmatch(text)
        if not m:
            continue
        if kind == "relation":
            return Relation(_desc(m, "a"), _REL_OF[m.group("rel")], _desc(m, "b"), m.group("art") == "the")
        if kind == "hasattr":
            if m.group("shape"):
                return HasAttr(_desc(m, "a"), "shape", m.group("shape"))
            value = m.group("value")
            return HasAttr(_desc(m, "a"), "size" if value in SIZES else "color", value)
        if kind == "count":
            n = m.group("n")
            n = 0 if n == "no" else int(n) if n.isdigit() else NUMBER_WORDS.index(n)
            return Count(_desc(m, "a"), n)
        return Exists(_desc(m, "a"))
    raise ValueError(f"text: not a statement of the benchmark's grammar: {text!r}")


def parse_statement(text: str):
    """Inverse of `statement_text` (case and the final period are ignored)."""
    body = text.strip().rstrip(".").lower()
    parts = [_parse_clause(clause) for clause in body.split(" and ")]
    return parts[0] if len(parts) == 1 else And(tuple(parts))


_QUESTIONS = [
    ("what_attr", re.compile(rf"what (?P<attr>color|shape|size) is the {_np('a')}")),
    ("what_related", re.compile(rf"what is (?P<rel>{_REL}) the {_np('a')}")),
    ("how_many", re.compile(rf"how many {_np('a')} are there")),
    ("relation", re.compile(rf"is (?:(?P<def>the)|there an?) {_np('a')} (?P<rel>{_REL}) (?:an?|the) {_np('b')}")),
    ("exists", re.compile(rf"is there an? {_np('a')}")),
    ("hasattr", re.compile(rf"is the {_np('a')} (?:(?P<value>{_COLOR_RE}|small|large)|an? (?P<shape>{_SHAPE_RE}))")),
]


def parse_question(text: str):
    """Inverse of `question_text` (case and the question mark are ignored)."""
    body = text.strip().rstrip("?").lower()
    for kind, pattern in _QUESTIONS:
        m = pattern.fullmatch(body)
        if not m:
            continue
        if kind == "what_attr":
            return WhatAttr(_desc(m, "a"), m.group("attr"))
        if kind == "what_related":
            return WhatRelated(_REL_OF[m.group("rel")], _desc(m, "a"))
        if kind == "how_many":
            return HowMany(_desc(m, "a"))
        if kind == "relation":
            return YesNo(Relation(_desc(m, "a"), _REL_OF[m.group("rel")], _desc(m, "b"), m.group("def") is not None))
        if kind == "exists":
            return YesNo(Exists(_desc(m, "a")))
        if m.group("shape"):
            return YesNo(HasAttr(_desc(m, "a"), "shape", m.group("shape")))
        value = m.group("value")
        return YesNo(HasAttr(_desc(m, "a"), "size" if value in SIZES else "color", value))
    raise ValueError(f"text: not a question of the benchmark's grammar: {text!r}")


# --------------------------------------------------------------------------------------------------
# Deriving items from a scene
# --------------------------------------------------------------------------------------------------

def true_relations(scene: Scene, i: int, j: int) -> list[str]:
    """Relations that decisively hold from object i to object j (cells differ on that axis)."""
    return [r for r in RELATIONS if relation_truth(scene.objects[i], r, scene.objects[j])]


CAPTION_REQUESTS = (
    "Describe the image.",
    "Describe this picture.",
    "What is shown in the image?",
    "Caption this image.",
    "Describe the objects in this scene.",
)


def caption_statements(scene: Scene, rng: random.Random) -> list:
    """A true caption as a list of sentences: the number of objects, then a chain of relations that
    mentions every object with its full description (objects in reading order, each related to the
    previous one)."""
    order = sorted(range(len(scene.objects)), key=lambda i: (scene.objects[i].row, scene.objects[i].col))
    full = [Desc(o.shape, o.color, o.size) for o in scene.objects]
    sentences = [Count(Desc(), len(order))]
    for prev, cur in zip(order, order[1:]):
        sentences.append(Relation(full[cur], rng.choice(true_relations(scene, cur, prev)), full[prev]))
    assert all(holds(scene, s) for s in sentences), "caption: a derived sentence is not true"
    return sentences


def caption_text(statements) -> str:
    """Sentences joined by spaces."""
    return " ".join(statement_text(s) for s in statements)


def parse_caption(text: str) -> list:
    """Inverse of `caption_text`."""
    return [parse_statement(s) for s in text.strip().rstrip(".").split(". ")]


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
            return _yes_no_balanced(rng, YesNo(Relation(di, rel, dj, True)), YesNo(Relation(di, OPPOSITE[rel], dj, True)))
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
    colors = _dedupe([o.color for o in scene.objects])
    shapes = _dedupe([o.shape for o in scene.objects])
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


# ---- SugarCrepe-style compositional-reasoning items ----------------------------------------------

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
    mentioned_colors = _dedupe([o.color for o in scene.objects])
    mentioned_shapes = _dedupe([o.shape for o in scene.objects])
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
        in_scene = _dedupe([getattr(o, attr) for o in scene.objects])
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
