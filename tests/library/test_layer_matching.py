"""compodistill.distill.layers: target layer selection and student-teacher layer matching."""

import dataclasses
import itertools

import pytest
import torch

from compodistill.distill.layers import (LayerMatch, TARGET_BANDS, adaptive_match, describe_matching, match_layers,
                                         target_layers)


def raises(name):
    return pytest.raises(ValueError, match=rf"^{name}\b")


# From the definition lo <= l / n < hi:
#   24 layers: early l < 8; intermediate 7.2 <= l < 16.8; later l >= 16.
#   40 layers: early l < 13.33; intermediate 12 <= l < 28; later l >= 26.67.
BANDS = [
    (24, "early", list(range(0, 8))),
    (24, "intermediate", list(range(8, 17))),
    (24, "later", list(range(16, 24))),
    (24, "all", list(range(0, 24))),
    (40, "early", list(range(0, 14))),
    (40, "intermediate", list(range(12, 28))),
    (40, "later", list(range(27, 40))),
    (40, "all", list(range(0, 40))),
    (3, "early", [0]),
    (3, "later", [2]),
    (1, "all", [0]),
]


@pytest.mark.parametrize("num_layers,band,expected", BANDS)
def test_bands(num_layers, band, expected):
    assert target_layers(num_layers, band) == expected


def test_band_names():
    assert set(TARGET_BANDS) == {"early", "intermediate", "later", "all"}


def test_band_holding_no_layer_is_rejected():
    with raises("target"):
        target_layers(1, "intermediate")  # the only layer sits at depth 0 < 0.3


def test_explicit_targets():
    assert target_layers(24, [8, 9, 14]) == [8, 9, 14]
    assert target_layers(24, (0, 23)) == [0, 23]
    assert target_layers(24, {"start": 8, "end": 14}) == list(range(8, 15))
    assert target_layers(40, {"start": 13, "end": 13}) == [13]


@pytest.mark.parametrize("target", [
    [0, 24],                      # past the last layer
    [-1, 3],                      # negative
    [3, 2],                       # unsorted
    [2, 2],                       # duplicate
    [],                           # empty
    [1.0, 2.0],                   # not ints
    [True],                       # bool is not a layer
    "middle",                     # unknown band
    {"start": 5, "end": 24},      # range past the last layer
    {"start": 9, "end": 8},       # empty range
    {"start": 1},                 # missing end
    {"start": 1, "end": 3, "step": 2},
    5,                            # neither band, list nor range
    None,
])
def test_bad_targets(target):
    with raises("target"):
        target_layers(24, target)


@pytest.mark.parametrize("num_layers", [0, -3, 2.0, True])
def test_bad_num_layers(num_layers):
    with raises("num_layers"):
        target_layers(num_layers, "all")


def test_group_known_case():
    """Student 24 layers targeting 8..14, teacher 40 layers targeting 13..23: windows of n = 11 - 7 + 1 = 5."""
    student = target_layers(24, {"start": 8, "end": 14})
    teacher = target_layers(40, {"start": 13, "end": 23})
    matches = match_layers(student, teacher)  # "group" is the default
    assert matches == [LayerMatch(8 + j, tuple(range(13 + j, 18 + j))) for j in range(7)]
    assert matches[0].teacher_layers == (13, 14, 15, 16, 17)
    assert matches[-1].teacher_layers == (19, 20, 21, 22, 23)


def test_simple_five_of_ten():
    matches = match_layers(list(range(5)), list(range(10)), method="simple")
    assert [m.teacher_layers for m in matches] == [(0,), (2,), (4,), (6,), (8,)]
    assert [m.student_layer for m in matches] == list(range(5))


def test_simple_with_fewer_teacher_layers_repeats_them():
    matches = match_layers([0, 1, 2, 3], [10, 20], method="simple")
    assert [m.teacher_layers for m in matches] == [(10,), (10,), (20,), (20,)]


@pytest.mark.parametrize("k,m", [(1, 1), (1, 6), (3, 3), (4, 9), (7, 11), (8, 16)])
def test_group_windows_cover_the_teacher_range(k, m):
    student = list(range(2, 2 + k))
    teacher = list(range(5, 5 + 2 * m, 2))  # need not be contiguous in the model
    matches = match_layers(student, teacher, method="group")
    window = m - k + 1
    assert [match.student_layer for match in matches] == student
    for j, match in enumerate(matches):
        assert match.teacher_layers == tuple(teacher[j:j + window])
    used = sorted(set(itertools.chain.from_iterable(match.teacher_layers for match in matches)))
    assert used == teacher
    assert matches[0].teacher_layers[0] == teacher[0] and matches[-1].teacher_layers[-1] == teacher[-1]


def test_group_needs_as_many_teacher_layers():
    with pytest.raises(ValueError, match=r"^teacher_layers\b.*group"):
        match_layers([0, 1, 2], [4, 5], method="group")


def test_match_layers_rejects_bad_input():
    with pytest.raises(ValueError, match=r"^method\b.*adaptive_match"):
        match_layers([0, 1], [0, 1], method="adaptive")
    with raises("method"):
        match_layers([0, 1], [0, 1], method="nearest")
    with raises("student_layers"):
        match_layers([1, 0], [0, 1])
    with raises("teacher_layers"):
        match_layers([0, 1], [])
    with raises("teacher_layers"):
        match_layers([0, 1], [0, 1, 1])


def brute_force(similarity):
    """The lexicographically first non-decreasing assignment with the largest total."""
    k, m = similarity.shape
    best, best_total = None, None
    for assignment in itertools.combinations_with_replacement(range(m), k):  # lexicographic order
        total = sum(float(similarity[j, i]) for j, i in enumerate(assignment))
        if best_total is None or total > best_total:
            best, best_total = assignment, total
    return list(best)


def chosen(matches):
    return [match.teacher_layers[0] for match in matches]


def test_adaptive_recovers_a_planted_monotone_assignment():
    gen = torch.Generator().manual_seed(0)
    planted = [1, 1, 4, 7, 8]
    similarity = 0.1 * torch.rand(5, 10, generator=gen)
    similarity[torch.arange(5), torch.tensor(planted)] += 1.0
    student, teacher = [3, 4, 5, 6, 7], list(range(10, 20))
    matches = adaptive_match(similarity, student, teacher)
    assert all(len(match.teacher_layers) == 1 for match in matches)
    assert [match.student_layer for match in matches] == student
    assert chosen(matches) == [teacher[i] for i in planted]


def test_adaptive_stays_monotone_against_a_greedy_pick():
    # Student 1 alone prefers teacher 0, but that would go back in depth; the best monotone total is 0 + 1 + 5.
    similarity = torch.tensor([[0.0, 5.0, 0.0],
                               [4.0, 1.0, 0.0],
                               [0.0, 0.0, 5.0]])
    assert chosen(adaptive_match(similarity, [0, 1, 2], [0, 1, 2])) == [1, 1, 2]


@pytest.mark.parametrize("seed", range(12))
def test_adaptive_equals_brute_force_on_random_matrices(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 1 + seed % 4
    m = 1 + (seed * 7) % 6
    similarity = torch.randn(k, m, generator=gen, dtype=torch.float64)
    assert chosen(adaptive_match(similarity, list(range(k)), list(range(m)))) == brute_force(similarity)


@pytest.mark.parametrize("seed", range(12))
def test_adaptive_breaks_ties_toward_earlier_teacher_layers(seed):
    # Small integers make many exact ties; their sums are exact, so the tie-break is checked exactly.
    gen = torch.Generator().manual_seed(100 + seed)
    similarity = torch.randint(0, 3, (4, 5), generator=gen).float()
    assert chosen(adaptive_match(similarity, list(range(4)), list(range(5)))) == brute_force(similarity)
    assert chosen(adaptive_match(torch.zeros(3, 4), [0, 1, 2], [0, 1, 2, 3])) == [0, 0, 0]


def test_adaptive_rejects_bad_similarity():
    with raises("similarity"):
        adaptive_match(torch.zeros(3, 4), [0, 1], [0, 1, 2, 3])
    with raises("similarity"):
        adaptive_match(torch.zeros(4, 2), [0, 1], [0, 1, 2, 3])
    with raises("similarity"):
        adaptive_match(torch.zeros(2), [0, 1], [0, 1])
    with raises("similarity"):
        adaptive_match([[0.0, 1.0], [1.0, 0.0]], [0, 1], [0, 1])
    with raises("similarity"):
        adaptive_match(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), [0, 1], [0, 1])
    with raises("student_layers"):
        adaptive_match(torch.zeros(2, 2), [1, 1], [0, 1])


def test_describe_matching():
    text = describe_matching(match_layers([8, 9, 10], [13, 14, 15, 16, 17, 18, 19]))
    assert text.splitlines() == [
        "student  8 <- teacher 13-17 (mean of 5)",
        "student  9 <- teacher 14-18 (mean of 5)",
        "student 10 <- teacher 15-19 (mean of 5)",
    ]
    assert describe_matching([LayerMatch(3, (7,))]) == "student 3 <- teacher 7"
    assert describe_matching([LayerMatch(0, (1, 3, 5))]) == "student 0 <- teacher 1,3,5 (mean of 3)"
    with raises("matches"):
        describe_matching([])


def test_layer_match_is_frozen_and_validated():
    match = LayerMatch(2, (4, 5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        match.student_layer = 3
    with raises("teacher_layers"):
        LayerMatch(2, [4, 5])
    with raises("teacher_layers"):
        LayerMatch(2, ())
