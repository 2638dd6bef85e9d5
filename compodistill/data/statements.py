"""Structured statements about a scene graph, their truth, and their texts: sentences ("A red circle
is to the left of a blue square."), captions made of such sentences, and the parsers that read them back.

Texts are never written by hand: each is rendered from a structured statement whose truth the
evaluator computes from the scene, and `parse_statement` reads the text back, so any written item can
be re-checked.

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
from dataclasses import dataclass, field
from typing import Optional, Union

from .scene_graph import PALETTE, SHAPES, SIZES, Obj, Scene, relation_truth, true_relations

RELATION_WORDS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
ATTRIBUTES = ("color", "shape", "size")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


# --------------------------------------------------------------------------------------------------
# Statements and the evaluator
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

def matching(scene: Scene, desc: Desc) -> list[int]:
    """Indices of the objects that `desc` matches."""
    return [i for i, o in enumerate(scene.objects) if desc.matches(o)]


def single_match(scene: Scene, desc: Desc) -> Optional[int]:
    """The index of the one object `desc` matches, or None when it matches none or several."""
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
        i = single_match(scene, statement.desc)
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


COLOR_PATTERN = "|".join(PALETTE)
SHAPE_PATTERN = "|".join(SHAPES + ("object",))
_NP = (rf"(?:(?P<{{p}}size>small|large) )?(?:(?P<{{p}}color>{COLOR_PATTERN}) )?"
       rf"(?P<{{p}}noun>(?:{SHAPE_PATTERN})(?:e?s)?)")
RELATION_PATTERN = "|".join(sorted(RELATION_WORDS.values(), key=len, reverse=True))


def np_pattern(prefix: str) -> str:
    """Regex of a noun phrase "[size] [colour] noun[s]" whose groups are named `<prefix>size`,
    `<prefix>color` and `<prefix>noun` (read them back with `match_desc`)."""
    return _NP.replace("{p}", prefix)


def match_desc(match, prefix: str) -> Desc:
    """The description matched by `np_pattern(prefix)` (plural nouns read as their singular)."""
    noun = match.group(prefix + "noun")
    singular = next((s for s in SHAPES + ("object",) if noun in (s, plural(s))), None)
    if singular is None:
        raise ValueError(f"text: unknown noun {noun!r}")
    return Desc(None if singular == "object" else singular, match.group(prefix + "color"), match.group(prefix + "size"))


RELATION_OF_WORDS = {words: name for name, words in RELATION_WORDS.items()}
_CLAUSES = [
    ("relation", re.compile(rf"(?P<art>an?|the) {np_pattern('a')} is (?P<rel>{RELATION_PATTERN}) "
                            rf"(?:an?|the) {np_pattern('b')}")),
    ("hasattr", re.compile(rf"the {np_pattern('a')} is "
                           rf"(?:(?P<value>{COLOR_PATTERN}|small|large)|an? (?P<shape>{SHAPE_PATTERN}))")),
    ("count", re.compile(rf"there (?:is|are) (?P<n>no|\d+|{'|'.join(NUMBER_WORDS)}) {np_pattern('a')}")),
    ("exists", re.compile(rf"an? {np_pattern('a')}")),
]


def _parse_clause(text: str):
    for kind, pattern in _CLAUSES:
        m = pattern.fullmatch(text)
        if not m:
            continue
        if kind == "relation":
            return Relation(match_desc(m, "a"), RELATION_OF_WORDS[m.group("rel")], match_desc(m, "b"),
                            m.group("art") == "the")
        if kind == "hasattr":
            if m.group("shape"):
                return HasAttr(match_desc(m, "a"), "shape", m.group("shape"))
            value = m.group("value")
            return HasAttr(match_desc(m, "a"), "size" if value in SIZES else "color", value)
        if kind == "count":
            n = m.group("n")
            n = 0 if n == "no" else int(n) if n.isdigit() else NUMBER_WORDS.index(n)
            return Count(match_desc(m, "a"), n)
        return Exists(match_desc(m, "a"))
    raise ValueError(f"text: not a statement of the benchmark's grammar: {text!r}")


def parse_statement(text: str):
    """Inverse of `statement_text` (case and the final period are ignored)."""
    body = text.strip().rstrip(".").lower()
    parts = [_parse_clause(clause) for clause in body.split(" and ")]
    return parts[0] if len(parts) == 1 else And(tuple(parts))


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

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



# --------------------------------------------------------------------------------------------------
# Phrases: the terse grammar of the miniature preset's dense captions and CR items
# --------------------------------------------------------------------------------------------------

# Every word of a phrase is one token of the tiny tokenizer, and a pair of phrases that differ by one
# substituted word (or by a permutation of words) has equal token counts: summed log-probabilities of
# the two compare fairly.
PHRASE_RELATION_WORDS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
_PHRASE_RELATION_OF_WORDS = {words: name for name, words in PHRASE_RELATION_WORDS.items()}
_PHRASE_RELATION = re.compile(rf"{np_pattern('a')} (?P<rel>{'|'.join(PHRASE_RELATION_WORDS.values())}) "
                              rf"{np_pattern('b')}")
_PHRASE_OBJECT = re.compile(np_pattern("a"))


def phrase_text(statement) -> str:
    """A statement as one phrase ending in " .":

    - `Exists(d)` → "large red square ." (the description's words: size, colour, noun)
    - `Relation(a, rel, b)`, indefinite → "red square left of blue circle ." ("left of", "right of",
      "above", "below")
    - `And` of `Exists` parts → "red square and blue circle ."
    """
    if isinstance(statement, Exists):
        return f"{desc_text(statement.desc)} ."
    if isinstance(statement, Relation) and not statement.definite:
        return (f"{desc_text(statement.subject)} {PHRASE_RELATION_WORDS[statement.relation]} "
                f"{desc_text(statement.object)} .")
    if isinstance(statement, And) and len(statement.parts) >= 2 and all(isinstance(p, Exists) for p in statement.parts):
        return " and ".join(desc_text(p.desc) for p in statement.parts) + " ."
    raise ValueError("statement: a phrase is an Exists, an indefinite Relation or an And of at least two Exists, "
                     f"got {statement!r}")


def parse_phrase(text: str):
    """Inverse of `phrase_text`."""
    if not text.endswith(" ."):
        raise ValueError(f"text: a phrase ends in ' .', got {text!r}")
    body = text[:-2]
    m = _PHRASE_RELATION.fullmatch(body)
    if m:
        return Relation(match_desc(m, "a"), _PHRASE_RELATION_OF_WORDS[m.group("rel")], match_desc(m, "b"))
    parts = []
    for part in body.split(" and "):
        m = _PHRASE_OBJECT.fullmatch(part)
        if not m:
            raise ValueError(f"text: not a phrase of the miniature grammar: {text!r}")
        parts.append(Exists(match_desc(m, "a")))
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def dense_caption(scene: Scene, rng: random.Random, *, relations: int = 2) -> list:
    """A dense first-order caption as statements: every object as `Exists(size colour shape)` and up to
    `relations` relation statements "colour shape REL colour shape" that hold, all in one random order.

    Relations are shuffled in with the objects, not appended: a byte-level tokenizer writes the first
    word of a reply without its leading space (another token), and CR captions may start with a colour
    word, so captions must start with one in training too.

    Relations only join objects that are each the only one of their colour and shape (so the
    indefinite phrase names them), never a tie. The candidates are the (pair of objects, axis) facts
    whose cells differ on that axis; `relations` distinct facts are drawn, each written in a random
    direction ("a left of b" or "b right of a"), so two phrases never state the same fact.
    """
    objects = scene.objects
    phrases = [Exists(Desc(o.shape, o.color, o.size)) for o in objects]
    combos = [(o.color, o.shape) for o in objects]
    named = [i for i, c in enumerate(combos) if combos.count(c) == 1]
    facts = [(i, j, axis) for i, j in itertools.combinations(named, 2) for axis in ("horizontal", "vertical")
             if (objects[i].col != objects[j].col if axis == "horizontal" else objects[i].row != objects[j].row)]
    for i, j, axis in rng.sample(facts, min(relations, len(facts))):
        if rng.random() < 0.5:
            i, j = j, i
        rel = next(r for r in true_relations(scene, i, j) if (r in ("left_of", "right_of")) == (axis == "horizontal"))
        a, b = objects[i], objects[j]
        phrases.append(Relation(Desc(a.shape, a.color), rel, Desc(b.shape, b.color)))
    rng.shuffle(phrases)
    return phrases


def dense_caption_text(statements) -> str:
    """Phrases joined by spaces: "large red square . small blue circle . red square left of blue circle ."."""
    return " ".join(phrase_text(s) for s in statements)


def parse_dense_caption(text: str) -> list:
    """Inverse of `dense_caption_text`."""
    if not text.endswith(" ."):
        raise ValueError(f"text: a dense caption ends in ' .', got {text!r}")
    return [parse_phrase(p + " .") for p in text[:-2].split(" . ")]
