"""Scene graphs of the procedural compositional-reasoning data: objects, scenes, the vocabulary they
are drawn from, random sampling and held-out colour-shape pairs.

A scene is a G×G grid with at most one object per cell; each object has a colour, a shape and a size.
Positions are cells, so spatial relations are decided by cell indices and are never near ties:

    left_of(a, b)  ⇔ a.col < b.col        right_of(a, b) ⇔ a.col > b.col
    above(a, b)    ⇔ a.row < b.row        below(a, b)    ⇔ a.row > b.row     (row 0 is the top)

A horizontal relation between two objects of the same column (or a vertical one within a row) is
neither true nor false here: `relation_truth` returns None for it and no generator ever asserts or
denies it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

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
# Relations between objects
# --------------------------------------------------------------------------------------------------

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


def true_relations(scene: Scene, i: int, j: int) -> list[str]:
    """Relations that decisively hold from object i to object j (cells differ on that axis)."""
    return [r for r in RELATIONS if relation_truth(scene.objects[i], r, scene.objects[j])]


def unique_in_order(items) -> list:
    """`items` without repeats, first occurrences kept in order."""
    return list(dict.fromkeys(items))
