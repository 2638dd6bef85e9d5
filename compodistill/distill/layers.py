"""Which decoder layers take part in attention distillation, and which teacher layers each student layer learns from.

Layer indices are 0-based everywhere. A student layer's target is the mean of the visual-attention slices
of its teacher layers. The CompoDistill paper compares three matchings: "simple" (one teacher layer per
student layer at the same relative depth), "group" (a sliding window of consecutive teacher layers,
averaged; the paper's best) and "adaptive" (the most similar teacher layer, monotone in depth).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

# Bands as fractions of depth: layer l belongs to [lo, hi) when lo <= l / num_layers < hi. Since
# l <= num_layers - 1, every layer satisfies l / num_layers < 1.0, so a band ending at 1.0 contains the last
# layer. (Boundaries are compared in float; l / n and the band edge are each correctly rounded, so a
# layer exactly on an edge, e.g. 8 / 24 and 1/3, compares equal as it should.)
TARGET_BANDS: Dict[str, Tuple[float, float]] = {
    "early": (0.0, 1 / 3),
    "intermediate": (0.3, 0.7),
    "later": (2 / 3, 1.0),
    "all": (0.0, 1.0),
}
MATCH_METHODS = ("simple", "group")


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def target_layers(num_layers: int, target) -> List[int]:
    """The layers a model contributes to the alignment loss.

    Args:
        num_layers: int >= 1, the model's number of decoder layers.
        target: one of
            - a band name from TARGET_BANDS ("early", "intermediate", "later", "all"): the layers l with
              lo <= l / num_layers < hi;
            - a non-empty list or tuple of ints, strictly increasing, each in [0, num_layers);
            - a dict {"start": a, "end": b}: layers a..b inclusive, 0 <= a <= b < num_layers.

    Returns:
        The layer indices, a strictly increasing non-empty list of ints.

    Raises:
        ValueError: naming num_layers or target, for anything else, including a band that holds no layer
            of a model this shallow.
    """
    if not _is_int(num_layers) or num_layers < 1:
        _fail("num_layers", "an int >= 1", repr(num_layers))
    if isinstance(target, str):
        if target not in TARGET_BANDS:
            _fail("target", f"a band in {tuple(TARGET_BANDS)}, a list of layers or {{'start': a, 'end': b}}",
                  repr(target))
        lo, hi = TARGET_BANDS[target]
        layers = [layer for layer in range(num_layers) if lo <= layer / num_layers < hi]
        if not layers:
            _fail("target", f"a band holding at least one of {num_layers} layers", f"{target!r} = [{lo:.3g}, {hi:.3g})")
        return layers
    if isinstance(target, dict):
        if set(target) != {"start", "end"} or not all(_is_int(target[k]) for k in ("start", "end")):
            _fail("target", "a dict {'start': int, 'end': int}", repr(target))
        start, end = int(target["start"]), int(target["end"])
        if not 0 <= start <= end < num_layers:
            _fail("target", f"0 <= start <= end < num_layers = {num_layers}", repr(target))
        return list(range(start, end + 1))
    if isinstance(target, (list, tuple)):
        return _check_layer_list("target", target, num_layers)
    _fail("target", "a band name, a list of layer indices or {'start': a, 'end': b}", repr(target))


def _check_layer_list(name: str, layers, num_layers=None) -> List[int]:
    if not isinstance(layers, (list, tuple)) or not layers:
        _fail(name, "a non-empty list of layer indices", repr(layers))
    if not all(_is_int(layer) for layer in layers):
        _fail(name, "layer indices that are ints", repr(layers))
    upper = f"< {num_layers} (the model's layer count)" if num_layers is not None else ""
    for layer in layers:
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            _fail(name, f"layer indices >= 0 {upper}".rstrip(), f"{layer} in {list(layers)}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        _fail(name, "strictly increasing layer indices (sorted, no duplicates)", repr(list(layers)))
    return [int(layer) for layer in layers]


@dataclass(frozen=True)
class LayerMatch:
    """One student layer and the teacher layers whose visual-attention slices, averaged, are its target."""

    student_layer: int
    teacher_layers: Tuple[int, ...]

    def __post_init__(self):
        if not _is_int(self.student_layer) or self.student_layer < 0:
            _fail("student_layer", "an int >= 0", repr(self.student_layer))
        if not isinstance(self.teacher_layers, tuple) or not self.teacher_layers \
                or not all(_is_int(t) and t >= 0 for t in self.teacher_layers):
            _fail("teacher_layers", "a non-empty tuple of ints >= 0", repr(self.teacher_layers))


def match_layers(student_layers: Sequence[int], teacher_layers: Sequence[int],
                 method: str = "group") -> List[LayerMatch]:
    """Pair each student layer with teacher layers, by relative position within the two lists.

    With k student and m teacher layers, student position j (0-based) gets
      - "simple": teacher_layers[floor(j * m / k)], one layer at the same relative depth (5 of 10 layers:
        0, 2, 4, 6, 8);
      - "group" (default): the window teacher_layers[j : j + n], n = m - k + 1, averaged. Consecutive
        windows shift by one, so together they cover every teacher layer of the list. Needs m >= k.

    Args:
        student_layers: non-empty, strictly increasing list of student layer indices (from target_layers).
        teacher_layers: the same for the teacher.
        method: "group" (default) or "simple". "adaptive" needs a similarity matrix: use adaptive_match.

    Returns:
        k LayerMatch, in the order of student_layers.

    Raises:
        ValueError: naming the argument, for a bad layer list, an unknown method, or "group" with fewer
            teacher than student layers.
    """
    students = _check_layer_list("student_layers", student_layers)
    teachers = _check_layer_list("teacher_layers", teacher_layers)
    k, m = len(students), len(teachers)
    if method == "adaptive":
        _fail("method", "'simple' or 'group'; 'adaptive' picks layers from a similarity matrix, "
              "call adaptive_match(similarity, student_layers, teacher_layers)", repr(method))
    if method not in MATCH_METHODS:
        _fail("method", f"one of {MATCH_METHODS}", repr(method))
    if method == "simple":
        return [LayerMatch(s, (teachers[j * m // k],)) for j, s in enumerate(students)]
    if m < k:
        _fail("teacher_layers", f"at least as many layers as student_layers ({k}) for method='group'",
              f"{m} layers")
    window = m - k + 1
    return [LayerMatch(s, tuple(teachers[j:j + window])) for j, s in enumerate(students)]


def adaptive_match(similarity: torch.Tensor, student_layers: Sequence[int],
                   teacher_layers: Sequence[int]) -> List[LayerMatch]:
    """One teacher layer per student layer, non-decreasing in depth, maximizing the summed similarity.

    Over all index sequences 0 <= i_0 <= i_1 <= ... <= i_{k-1} < m, maximizes sum_j similarity[j, i_j]
    exactly, by dynamic programming from the last student layer back:
        best[j][i] = similarity[j, i] + max_{i' >= i} best[j + 1][i'],
    the best total of positions j.. when position j takes teacher i. The sequence is then read forward,
    each step taking the smallest index that attains the maximum, so among equally good assignments the
    lexicographically smallest one (earlier teacher layers) wins. O(k * m) time.

    Args:
        similarity: (k, m) real tensor, k = len(student_layers), m = len(teacher_layers), higher = more
            similar (e.g. the mean cosine between attention slices on a calibration batch). Any device and
            floating dtype; read as float64 on the CPU.
        student_layers: non-empty, strictly increasing list of student layer indices.
        teacher_layers: the same for the teacher.

    Returns:
        k LayerMatch, each with a single teacher layer.

    Raises:
        ValueError: naming the argument, for a bad layer list, or a similarity that is not a (k, m) tensor
            of finite values.
    """
    students = _check_layer_list("student_layers", student_layers)
    teachers = _check_layer_list("teacher_layers", teacher_layers)
    k, m = len(students), len(teachers)
    if not isinstance(similarity, torch.Tensor) or tuple(similarity.shape) != (k, m):
        got = f"shape {tuple(similarity.shape)}" if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        _fail("similarity", f"a tensor of shape (len(student_layers), len(teacher_layers)) = ({k}, {m})", got)
    if similarity.dtype == torch.bool or similarity.is_complex():
        _fail("similarity", "a real-valued tensor", similarity.dtype)
    sim = similarity.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(sim).all()):
        _fail("similarity", "finite values", "NaN or inf")
    sim = sim.tolist()

    best = [[0.0] * m for _ in range(k)]
    best[k - 1] = list(sim[k - 1])
    for j in range(k - 2, -1, -1):
        tail_max = float("-inf")  # max over i' >= i of best[j + 1][i'], built from the right
        for i in range(m - 1, -1, -1):
            tail_max = max(tail_max, best[j + 1][i])
            best[j][i] = sim[j][i] + tail_max

    chosen, lowest = [], 0
    for j in range(k):
        row = best[j]
        top = max(row[lowest:])
        lowest = next(i for i in range(lowest, m) if row[i] == top)
        chosen.append(lowest)
    return [LayerMatch(s, (teachers[i],)) for s, i in zip(students, chosen)]


def _format_layers(layers: Tuple[int, ...]) -> str:
    if len(layers) == 1:
        return str(layers[0])
    contiguous = list(layers) == list(range(layers[0], layers[0] + len(layers)))
    text = f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))
    return f"{text} (mean of {len(layers)})"


def describe_matching(matches: Sequence[LayerMatch]) -> str:
    """A line per pair for a training summary, e.g. "student 8 <- teacher 13-17 (mean of 5)".

    Args:
        matches: non-empty list of LayerMatch (from match_layers or adaptive_match).

    Returns:
        The lines joined by newlines, student numbers right-aligned; layer indices are 0-based as everywhere
        in this module. Non-contiguous teacher groups are listed with commas ("teacher 1,3,5 (mean of 3)").

    Raises:
        ValueError: naming matches, when it is empty or holds something other than LayerMatch.
    """
    if not isinstance(matches, (list, tuple)) or not matches \
            or not all(isinstance(match, LayerMatch) for match in matches):
        _fail("matches", "a non-empty list of LayerMatch", repr(matches))
    width = max(len(str(match.student_layer)) for match in matches)
    return "\n".join(f"student {match.student_layer:>{width}} <- teacher {_format_layers(match.teacher_layers)}"
                     for match in matches)
