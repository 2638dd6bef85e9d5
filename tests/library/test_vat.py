"""compodistill.distill.vat: VAT config, layer resolution, query rows and the exported-slice losses.

Pure torch on the CPU; every reference here is written independently of vat.py (Python loops over
samples and rows, hand-written formulas, statistics.stdev for the sink threshold).
"""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from compodistill.distill.layers import LayerMatch, match_layers, target_layers
from compodistill.distill.vat import (VAT_PRESETS, VATConfig, combine_layers, group_targets, query_rows,
                                      resolve_layers, sink_keep, slice_loss)
from compodistill.models.attention import SliceRows


def make_gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, gen, low=0.01, high=1.0):
    return low + (high - low) * torch.rand(*shape, generator=gen)


# ---------------------------------------------------------------------------------------------------------
# 1. VATConfig
# ---------------------------------------------------------------------------------------------------------

ENUM_FIELDS = [
    ("matching", "nearest"),
    ("query_rows", "image"),
    ("reduce", "sum"),
    ("loss", "l1"),
    ("layer_reduction", "max"),
]


@pytest.mark.parametrize("name,bad", ENUM_FIELDS)
def test_config_enum_field_rejects_bad_value(name, bad):
    with pytest.raises(ValueError, match=rf"vat\.{name}\b"):
        VATConfig(**{name: bad})
    with pytest.raises(ValueError, match=rf"vat\.{name}\b"):
        VATConfig.from_dict({name: bad})


@pytest.mark.parametrize("name,allowed", [
    ("matching", ("simple", "group", "adaptive")),
    ("query_rows", ("visual", "text", "answer", "all")),
    ("reduce", ("rows", "mean")),
    ("loss", ("cosine", "mse", "kl")),
    ("layer_reduction", ("mean", "sum")),
])
def test_config_enum_field_accepts_every_documented_value(name, allowed):
    for value in allowed:
        assert getattr(VATConfig(**{name: value}), name) == value


@pytest.mark.parametrize("bad", [1, 0, "true", None])
def test_config_sink_filter_must_be_bool(bad):
    with pytest.raises(ValueError, match=r"vat\.sink_filter\b"):
        VATConfig(sink_filter=bad)


@pytest.mark.parametrize("bad", [0.0, -1e-8, -1.0])
def test_config_eps_must_be_positive(bad):
    with pytest.raises(ValueError, match=r"vat\.eps\b"):
        VATConfig(eps=bad)


def test_config_defaults_are_the_paper_preset():
    cfg = VATConfig()
    assert cfg == VAT_PRESETS["paper"]
    assert (cfg.student_layers, cfg.teacher_layers) == ("intermediate", "intermediate")
    assert (cfg.matching, cfg.query_rows, cfg.reduce, cfg.loss, cfg.sink_filter, cfg.layer_reduction) == \
        ("group", "text", "rows", "cosine", False, "mean")
    assert VATConfig.from_dict({}) == cfg
    assert VATConfig.from_dict({"preset": "paper"}) == cfg


def test_config_code_preset_values():
    cfg = VAT_PRESETS["code"]
    assert (cfg.matching, cfg.query_rows, cfg.reduce, cfg.loss, cfg.sink_filter, cfg.layer_reduction) == \
        ("group", "visual", "mean", "cosine", True, "sum")
    assert cfg.student_layers == cfg.teacher_layers == "code"
    assert cfg.export_reduce == "rows" and not cfg.fused  # the filter needs the whole N×N block
    assert VATConfig(reduce="mean").export_reduce == "mean" and VATConfig().export_reduce == "rows"


def test_config_from_dict_preset_then_overrides():
    values = {"preset": "code", "loss": "mse"}
    cfg = VATConfig.from_dict(values)
    assert values == {"preset": "code", "loss": "mse"}  # the caller's mapping is not consumed
    code = VAT_PRESETS["code"]
    assert cfg.loss == "mse"
    # Everything else comes from the "code" preset, not from the defaults.
    assert cfg.query_rows == "visual" and cfg.reduce == "mean" and cfg.sink_filter is True
    assert cfg.layer_reduction == "sum"
    assert cfg.student_layers == code.student_layers and cfg.teacher_layers == code.teacher_layers
    assert cfg.to_dict() == {**code.to_dict(), "loss": "mse"}


def test_config_to_dict_round_trip():
    for cfg in (VATConfig(), VAT_PRESETS["code"], VATConfig(loss="kl", reduce="mean", eps=1e-6)):
        assert VATConfig.from_dict(cfg.to_dict()) == cfg


def test_config_from_dict_unknown_keys_named():
    with pytest.raises(ValueError, match=r"^vat\b.*bogus_key"):
        VATConfig.from_dict({"bogus_key": 1})
    with pytest.raises(ValueError, match=r"lossy"):
        VATConfig.from_dict({"preset": "code", "lossy": "mse"})


def test_config_from_dict_unknown_preset_named():
    with pytest.raises(ValueError, match=r"vat\.preset\b.*nonexistent"):
        VATConfig.from_dict({"preset": "nonexistent"})


def test_config_fused_only_for_cosine_rows_without_sink():
    assert VATConfig().fused
    assert VATConfig(loss="cosine", reduce="rows", sink_filter=False, query_rows="visual").fused
    assert not VATConfig(loss="mse").fused
    assert not VATConfig(loss="kl").fused
    assert not VATConfig(reduce="mean").fused
    assert not VATConfig(sink_filter=True).fused
    assert not VAT_PRESETS["code"].fused
    assert VATConfig.from_dict({"preset": "code", "reduce": "rows", "sink_filter": False}).fused


# ---------------------------------------------------------------------------------------------------------
# 2. Layer resolution with the presets
# ---------------------------------------------------------------------------------------------------------

def _code_layers(depth, side):
    return resolve_layers(depth, VAT_PRESETS["code"].student_layers if side == "student"
                          else VAT_PRESETS["code"].teacher_layers, argument=f"vat.{side}_layers", side=side)


def test_code_preset_layers_24_student_40_teacher():
    students, teachers = _code_layers(24, "student"), _code_layers(40, "teacher")
    assert students == list(range(8, 15))
    assert teachers == list(range(13, 24))
    matches = match_layers(students, teachers, "group")
    assert matches == [LayerMatch(s, tuple(range(13 + j, 18 + j))) for j, s in enumerate(range(8, 15))]
    assert matches[0] == LayerMatch(8, (13, 14, 15, 16, 17))
    assert matches[-1] == LayerMatch(14, (19, 20, 21, 22, 23))


# The authors' DistillTrainer table, as written there: student depth -> layers; teacher depth -> window
# starts and window size n (the windows are [i, i + n)). Their student side has no 32; the library gives
# a 32-layer student the seven layers the teacher side lists for 32.
AUTHORS_STUDENTS = {24: [8, 9, 10, 11, 12, 13, 14], 28: [9, 10, 11, 12, 13, 14, 15], 40: [13, 14, 15, 16, 17, 18, 19],
                    32: [11, 12, 13, 14, 15, 16, 17]}
AUTHORS_TEACHERS = {24: ([8, 9, 10, 11, 12, 13, 14], 2), 28: ([9, 10, 11, 12, 13, 14, 15], 3),
                    32: ([11, 12, 13, 14, 15, 16, 17], 3), 40: ([13, 14, 15, 16, 17, 18, 19], 5)}


@pytest.mark.parametrize("student_depth", sorted(AUTHORS_STUDENTS))
@pytest.mark.parametrize("teacher_depth", sorted(AUTHORS_TEACHERS))
def test_code_preset_reproduces_the_authors_table(student_depth, teacher_depth):
    students = _code_layers(student_depth, "student")
    assert students == AUTHORS_STUDENTS[student_depth]
    matches = match_layers(students, _code_layers(teacher_depth, "teacher"), "group")
    starts, n = AUTHORS_TEACHERS[teacher_depth]
    assert [m.teacher_layers for m in matches] == [tuple(range(i, i + n)) for i in starts]


@pytest.mark.parametrize("depth,side,expected", [
    (6, "student", [2, 3, 4]),          # round(2.0) .. round(3.5) = 4 (round half to even)
    (10, "teacher", [3, 4, 5, 6]),      # round(3.25) .. round(5.75)
    (12, "student", [4, 5, 6, 7]),
    (36, "student", list(range(12, 22))),   # round(12.0) .. round(21.0)
    (16, "teacher", list(range(5, 10))),    # round(5.2) .. round(9.2)
])
def test_code_preset_scales_by_depth_fraction_outside_the_table(depth, side, expected):
    assert _code_layers(depth, side) == expected


def test_code_layer_spec_needs_a_side():
    with pytest.raises(ValueError, match=r"^side\b"):
        resolve_layers(24, "code", argument="vat.student_layers")


def test_paper_preset_layers_are_the_intermediate_band():
    cfg = VAT_PRESETS["paper"]
    students = resolve_layers(24, cfg.student_layers, argument="vat.student_layers")
    teachers = resolve_layers(40, cfg.teacher_layers, argument="vat.teacher_layers")
    assert students == target_layers(24, "intermediate") == list(range(8, 17))
    assert teachers == target_layers(40, "intermediate") == list(range(12, 28))


def test_resolve_layers_other_specs_pass_through():
    assert resolve_layers(24, [1, 5, 9], argument="a") == [1, 5, 9]
    assert resolve_layers(24, {"start": 3, "end": 6}, argument="a") == [3, 4, 5, 6]
    assert resolve_layers(24, "all", argument="a") == list(range(24))
    # A fraction up to 1 ends at the last layer.
    assert resolve_layers(24, {"fraction": [0.0, 1.0]}, argument="a") == list(range(24))
    assert resolve_layers(10, {"fraction": [0.5, 1.0]}, argument="a") == list(range(5, 10))


@pytest.mark.parametrize("argument", ["vat.student_layers", "vat.teacher_layers"])
@pytest.mark.parametrize("spec", [
    {"fraction": [0.6, 0.2]},          # lo > hi
    {"fraction": [-0.1, 0.5]},         # lo < 0
    {"fraction": [0.2, 1.5]},          # hi > 1
    {"fraction": [0.2]},               # not a pair
    {"fraction": [0.1, 0.2, 0.3]},     # not a pair
    {"fraction": [0.1, 0.2], "start": 1},  # extra key
    [0, 24],                           # out of range for 24 layers
    [-1, 3],
    {"start": 20, "end": 30},
    {"start": 5, "end": 2},
    "middle",
])
def test_resolve_layers_errors_name_the_argument(spec, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        resolve_layers(24, spec, argument=argument)


# ---------------------------------------------------------------------------------------------------------
# 3. query_rows
# ---------------------------------------------------------------------------------------------------------

L = 20
V = 4


def _batch(rows):
    """rows: per sample (real_positions, visual_start, answer_positions) → mask, labels, visual_start.

    Labels on padding are set to a real token id (not -100) so that "answer" must use the mask too.
    """
    B = len(rows)
    mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b, (real, _, answer) in enumerate(rows):
        for p in range(L):
            if p not in real:
                labels[b, p] = 7
        for p in real:
            mask[b, p] = 1
        for p in answer:
            assert p in real
            labels[b, p] = 11 + p
    visual_start = torch.tensor([vs for _, vs, _ in rows], dtype=torch.long)
    return mask, labels, visual_start


def _expected_rows(which, mask, labels, visual_start, visual_len):
    """Independent per-sample reference: the set of row positions each sample selects."""
    out = []
    for b in range(mask.shape[0]):
        vs = int(visual_start[b])
        picked = set()
        for p in range(mask.shape[1]):
            real = bool(mask[b, p])
            if which == "visual":
                ok = vs <= p < vs + visual_len
            elif which == "text":
                ok = real and p >= vs + visual_len
            elif which == "answer":
                ok = real and p >= vs + visual_len and int(labels[b, p]) != -100
            else:  # all
                ok = real and p >= vs
            if ok:
                picked.add(p)
        out.append(picked)
    return out


def _check_rows(rows: SliceRows, expected, visual_start, seq_len=L):
    B = visual_start.shape[0]
    assert isinstance(rows, SliceRows)
    assert torch.equal(rows.visual_start, visual_start)
    assert rows.visual_len == V
    assert isinstance(rows.query_len, int) and rows.query_len >= 1
    assert rows.query_start.shape == (B,)
    assert rows.row_weight.shape == (B, rows.query_len)
    assert rows.row_weight.is_floating_point()
    assert bool(((rows.row_weight == 0) | (rows.row_weight == 1)).all())
    for b in range(B):
        start = int(rows.query_start[b])
        assert 0 <= start and start + rows.query_len <= seq_len
        got = {start + i for i in range(rows.query_len) if float(rows.row_weight[b, i]) == 1.0}
        assert got == expected[b], f"sample {b}: got rows {sorted(got)}, expected {sorted(expected[b])}"
    # The window is no longer than the longest sample's range.
    spans = [max(e) - min(e) + 1 for e in expected if e]
    assert rows.query_len == (max(spans) if spans else 1)


# Right padding; image tokens at different offsets; label holes (-100) inside the answers.
RIGHT = [
    (range(0, 18), 2, [12, 13, 14, 15, 17]),      # image 2..5, text 6..17, answer hole at 16
    (range(0, 14), 0, [8, 9, 11, 12, 13]),        # image 0..3, text 4..13, hole at 10
    (range(0, 20), 5, [15, 16, 17, 18, 19]),      # image 5..8, text 9..19
]
# Left padding.
LEFT = [
    (range(6, 20), 8, [16, 17, 19]),              # pad 0..5, image 8..11, text 12..19, hole at 18
    (range(2, 20), 3, [10, 11, 12, 13, 14]),      # pad 0..1, image 3..6, text 7..19
    (range(0, 20), 1, [18, 19]),                  # no pad, image 1..4, text 5..19
]


@pytest.mark.parametrize("which", ["visual", "text", "answer", "all"])
@pytest.mark.parametrize("layout", ["right", "left"])
def test_query_rows_match_per_sample_reference(which, layout):
    mask, labels, visual_start = _batch(RIGHT if layout == "right" else LEFT)
    rows = query_rows(which, mask, labels, visual_start, V)
    expected = _expected_rows(which, mask, labels, visual_start, V)
    assert all(expected)  # every sample selects something in these layouts
    _check_rows(rows, expected, visual_start)


def test_query_rows_hand_listed_right_padding():
    mask, labels, visual_start = _batch(RIGHT)
    text = query_rows("text", mask, labels, visual_start, V)
    answer = query_rows("answer", mask, labels, visual_start, V)
    all_rows = query_rows("all", mask, labels, visual_start, V)
    visual = query_rows("visual", mask, labels, visual_start, V)
    _check_rows(text, [set(range(6, 18)), set(range(4, 14)), set(range(9, 20))], visual_start)
    _check_rows(answer, [{12, 13, 14, 15, 17}, {8, 9, 11, 12, 13}, {15, 16, 17, 18, 19}], visual_start)
    _check_rows(all_rows, [set(range(2, 18)), set(range(0, 14)), set(range(5, 20))], visual_start)
    _check_rows(visual, [set(range(2, 6)), set(range(0, 4)), set(range(5, 9))], visual_start)
    assert text.query_len == 12 and answer.query_len == 6 and all_rows.query_len == 16
    assert torch.equal(visual.query_start, visual_start) and visual.query_len == V
    assert torch.equal(visual.row_weight, torch.ones(3, V))


def test_query_rows_visual_needs_no_mask_or_labels():
    visual_start = torch.tensor([3, 0, 7])
    rows = query_rows("visual", None, None, visual_start, V)
    assert torch.equal(rows.query_start, visual_start)
    assert rows.query_len == V
    assert torch.equal(rows.row_weight, torch.ones(3, V))


def test_query_rows_sample_without_text_rows():
    # Sample 1's real tokens end with its image: no text (and no answer) rows.
    layout = [
        (range(0, 16), 1, [10, 11, 12]),
        (range(0, 10), 6, []),                    # image 6..9, padding from 10
        (range(0, 20), 2, [19]),
    ]
    mask, labels, visual_start = _batch(layout)
    for which in ("text", "answer"):
        rows = query_rows(which, mask, labels, visual_start, V)
        expected = _expected_rows(which, mask, labels, visual_start, V)
        assert expected[1] == set()
        _check_rows(rows, expected, visual_start)
        assert float(rows.row_weight[1].abs().sum()) == 0.0
    # "all" still selects its image rows.
    rows = query_rows("all", mask, labels, visual_start, V)
    _check_rows(rows, _expected_rows("all", mask, labels, visual_start, V), visual_start)


def test_query_rows_batch_with_no_rows_at_all():
    layout = [(range(0, 8), 4, []), (range(0, 6), 2, [])]
    mask, labels, visual_start = _batch(layout)
    rows = query_rows("text", mask, labels, visual_start, V)
    assert rows.query_len == 1
    assert float(rows.row_weight.abs().sum()) == 0.0
    assert bool((rows.query_start + rows.query_len <= L).all())


def test_query_rows_late_start_moved_left():
    # Sample 0's text spans 6..19 (14 rows); sample 1's text rows are only 18..19, so a window starting at
    # 18 would run past L: its start moves left and only 18, 19 keep weight 1.
    layout = [
        (range(0, 20), 2, [15, 16]),
        (range(0, 20), 14, [19]),                 # image 14..17, text 18..19
        (range(0, 12), 0, [9]),                   # right padded, text 4..11
    ]
    mask, labels, visual_start = _batch(layout)
    rows = query_rows("text", mask, labels, visual_start, V)
    expected = _expected_rows("text", mask, labels, visual_start, V)
    assert expected[1] == {18, 19}
    _check_rows(rows, expected, visual_start)
    assert rows.query_len == 14
    assert int(rows.query_start[1]) == L - 14 < 18
    assert int(rows.query_start[0]) == 6 and int(rows.query_start[2]) == 4
    # Rows of the moved window before 18 are image / other rows of sample 1: weight 0.
    assert rows.row_weight[1].tolist() == [0.0] * 12 + [1.0, 1.0]


def test_query_rows_random_layouts_match_reference():
    gen = make_gen(1234)
    for _trial in range(40):
        B = 3
        layout = []
        for _ in range(B):
            n_real = int(torch.randint(V + 1, L + 1, (1,), generator=gen))
            left = bool(torch.randint(0, 2, (1,), generator=gen))
            first = L - n_real if left else 0
            real = range(first, first + n_real)
            vs = first + int(torch.randint(0, n_real - V + 1, (1,), generator=gen))
            answer = [p for p in real if p >= vs + V and bool(torch.rand(1, generator=gen) < 0.5)]
            layout.append((real, vs, answer))
        mask, labels, visual_start = _batch(layout)
        for which in ("visual", "text", "answer", "all"):
            rows = query_rows(which, mask, labels, visual_start, V)
            _check_rows(rows, _expected_rows(which, mask, labels, visual_start, V), visual_start)


def test_query_rows_bad_arguments():
    mask, labels, visual_start = _batch(RIGHT)
    with pytest.raises(ValueError, match=r"^query_rows\b"):
        query_rows("prompt", mask, labels, visual_start, V)
    for which in ("text", "answer", "all"):
        with pytest.raises(ValueError, match=r"^attention_mask\b"):
            query_rows(which, None, labels, visual_start, V)
    with pytest.raises(ValueError, match=r"^labels\b"):
        query_rows("answer", mask, None, visual_start, V)
    # text and all do not need labels.
    query_rows("text", mask, None, visual_start, V)
    query_rows("all", mask, None, visual_start, V)


# ---------------------------------------------------------------------------------------------------------
# 4. slice_loss
# ---------------------------------------------------------------------------------------------------------

def _weights(B, R, gen):
    w = (torch.rand(B, R, generator=gen) < 0.6).float()
    w[0, 0] = 1.0
    return w


def _weighted_mean(per_row, w):
    return float((per_row * w).sum() / w.sum())


def test_cosine_matches_reference():
    gen = make_gen(1)
    s, t = rand(2, 5, 7, gen=gen), rand(2, 5, 7, gen=gen)
    w = _weights(2, 5, gen)
    ref = _weighted_mean(1 - F.cosine_similarity(s, t, dim=-1), w)
    got = slice_loss(s, t, w, loss="cosine")
    assert got.dtype == torch.float32 and got.ndim == 0
    assert math.isclose(float(got), ref, rel_tol=1e-5, abs_tol=1e-7)
    # Independent of F: a Python loop over rows.
    num = den = 0.0
    for b in range(2):
        for r in range(5):
            a, c = s[b, r].tolist(), t[b, r].tolist()
            dot = sum(x * y for x, y in zip(a, c))
            cos = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in c)))
            num += float(w[b, r]) * (1 - cos)
            den += float(w[b, r])
    assert math.isclose(float(got), num / den, rel_tol=1e-5, abs_tol=1e-7)


def test_uniform_weights_when_none():
    gen = make_gen(2)
    s, t = rand(3, 4, 6, gen=gen), rand(3, 4, 6, gen=gen)
    ref = float((1 - F.cosine_similarity(s, t, dim=-1)).mean())
    assert math.isclose(float(slice_loss(s, t, None, loss="cosine")), ref, rel_tol=1e-5)
    assert math.isclose(float(slice_loss(s, t, torch.ones(3, 4), loss="cosine")), ref, rel_tol=1e-5)


def test_fractional_weights():
    gen = make_gen(3)
    s, t = rand(2, 3, 5, gen=gen), rand(2, 3, 5, gen=gen)
    w = torch.tensor([[0.5, 2.0, 0.0], [1.0, 0.25, 3.0]])
    ref = _weighted_mean((s - t).pow(2).mean(-1), w)
    assert math.isclose(float(slice_loss(s, t, w, loss="mse")), ref, rel_tol=1e-5)


@pytest.mark.parametrize("loss", ["cosine", "mse", "kl"])
@pytest.mark.parametrize("sink_filter", [False, True])
def test_zero_weight_rows_are_ignored(loss, sink_filter):
    gen = make_gen(4)
    s, t = rand(2, 6, 8, gen=gen), rand(2, 6, 8, gen=gen)
    w = _weights(2, 6, gen)
    w[1, 2] = 0.0
    base = slice_loss(s, t, w, loss=loss, sink_filter=sink_filter)
    s2, t2 = s.clone(), t.clone()
    dead = w == 0
    s2[dead] = rand(int(dead.sum()), 8, gen=gen, high=5.0)
    t2[dead] = 0.0
    other = slice_loss(s2, t2, w, loss=loss, sink_filter=sink_filter)
    assert torch.allclose(base, other, rtol=1e-6, atol=1e-7)
    assert float(base) > 0


@pytest.mark.parametrize("loss", ["cosine", "mse", "kl"])
@pytest.mark.parametrize("sink_filter", [False, True])
def test_all_zero_weights_give_zero_and_finite_grad(loss, sink_filter):
    gen = make_gen(5)
    s = rand(2, 3, 5, gen=gen).requires_grad_()
    t = rand(2, 3, 5, gen=gen)
    got = slice_loss(s, t, torch.zeros(2, 3), loss=loss, sink_filter=sink_filter)
    assert float(got.detach()) == 0.0
    got.backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())
    # Also with zero (padding-like) slices on both sides.
    z = torch.zeros(2, 3, 5, requires_grad=True)
    got = slice_loss(z, torch.zeros(2, 3, 5), torch.zeros(2, 3), loss=loss, sink_filter=sink_filter)
    assert float(got.detach()) == 0.0
    got.backward()
    assert bool(torch.isfinite(z.grad).all())


def test_mse_matches_reference():
    gen = make_gen(6)
    s, t = rand(2, 4, 6, gen=gen), rand(2, 4, 6, gen=gen)
    w = _weights(2, 4, gen)
    num = den = 0.0
    for b in range(2):
        for r in range(4):
            err = sum((x - y) ** 2 for x, y in zip(s[b, r].tolist(), t[b, r].tolist())) / 6
            num += float(w[b, r]) * err
            den += float(w[b, r])
    assert math.isclose(float(slice_loss(s, t, w, loss="mse")), num / den, rel_tol=1e-5)


def _kl_ref(s_row, t_row):
    ps = [x / sum(s_row) for x in s_row]
    pt = [x / sum(t_row) for x in t_row]
    return sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))


def test_kl_matches_reference_teacher_to_student():
    gen = make_gen(7)
    s, t = rand(2, 4, 6, gen=gen, low=0.05), rand(2, 4, 6, gen=gen, low=0.05)
    w = _weights(2, 4, gen)
    num = den = rev = 0.0
    for b in range(2):
        for r in range(4):
            num += float(w[b, r]) * _kl_ref(s[b, r].tolist(), t[b, r].tolist())
            rev += float(w[b, r]) * _kl_ref(t[b, r].tolist(), s[b, r].tolist())
            den += float(w[b, r])
    got = float(slice_loss(s, t, w, loss="kl"))
    assert math.isclose(got, num / den, rel_tol=1e-4, abs_tol=1e-6)
    assert not math.isclose(got, rev / den, rel_tol=1e-3)  # the direction is KL(teacher || student)
    # Rows are normalised: scaling a row changes nothing.
    scale_s = rand(2, 4, 1, gen=gen, low=0.2, high=5.0)
    scale_t = rand(2, 4, 1, gen=gen, low=0.2, high=5.0)
    scaled = float(slice_loss(s * scale_s, t * scale_t, w, loss="kl"))
    assert math.isclose(scaled, got, rel_tol=1e-4, abs_tol=1e-6)
    assert float(slice_loss(t.clone(), t, w, loss="kl")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", ["cosine", "mse", "kl"])
def test_pooled_inputs_with_per_sample_weights(loss):
    gen = make_gen(8)
    s, t = rand(3, 9, gen=gen), rand(3, 9, gen=gen)
    w = torch.tensor([1.0, 0.0, 1.0])
    got = slice_loss(s, t, w, loss=loss)
    # Same as the (B, 1, N) row form with (B, 1) weights, and as the loss over the weighted samples only.
    assert torch.allclose(got, slice_loss(s[:, None], t[:, None], w[:, None], loss=loss), rtol=1e-6)
    keep = torch.tensor([0, 2])
    assert torch.allclose(got, slice_loss(s[keep], t[keep], None, loss=loss), rtol=1e-6)
    if loss == "cosine":
        ref = float((1 - F.cosine_similarity(s[keep], t[keep], dim=-1)).mean())
        assert math.isclose(float(got), ref, rel_tol=1e-5)


def _block_filter(s_rows, t_rows):
    """The authors' filter on one block (lists of rows): keep where s <= mean + stdev (Bessel, over
    every entry of the block) and t <= mean + stdev and t != 0. Returns the keep mask as lists."""
    s_flat, t_flat = [x for row in s_rows for x in row], [x for row in t_rows for x in row]
    s_limit = statistics.fmean(s_flat) + statistics.stdev(s_flat)
    t_limit = statistics.fmean(t_flat) + statistics.stdev(t_flat)
    return [[x <= s_limit and y <= t_limit and y != 0 for x, y in zip(s_row, t_row)]
            for s_row, t_row in zip(s_rows, t_rows)]


def _column_means(rows, keep):
    columns = range(len(rows[0]))
    return [sum(rows[r][c] for r in range(len(rows)) if keep[r][c]) / max(1, sum(keep[r][c] for r in range(len(rows))))
            for c in columns]


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_sink_filter_hand_made_block():
    # Student sink at key 0 (rows 1, 2), teacher sink at key 2 (row 2), a causal zero at (0, 1), (0, 2), (1, 2).
    s = [[0.50, 0.00, 0.00], [0.90, 0.10, 0.00], [0.80, 0.10, 0.10]]
    t = [[0.40, 0.00, 0.00], [0.30, 0.30, 0.00], [0.10, 0.10, 0.70]]
    keep = _block_filter(s, t)
    # s: mean 0.2778, stdev 0.3456 -> limit 0.6234 drops 0.9, 0.8; t: mean 0.2111, stdev 0.2315 -> 0.4426
    # drops 0.7; t == 0 drops the causal zeros.
    assert keep == [[True, False, False], [False, True, False], [False, True, False]]
    s_vec, t_vec = _column_means(s, keep), _column_means(t, keep)
    assert s_vec == pytest.approx([0.5, 0.1, 0.0]) and t_vec == pytest.approx([0.4, 0.2, 0.0])
    S, T = torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64)
    got = slice_loss(S, T, None, loss="cosine", reduce="mean", sink_filter=True)
    assert math.isclose(float(got), 1 - _cos(s_vec, t_vec), rel_tol=1e-12)
    assert torch.equal(sink_keep(S, T, None)[0], torch.tensor(keep))
    # Per-row variant: the dropped entries are zero in both rows.
    per_row = [1 - _cos([x * k for x, k in zip(sr, kr)], [y * k for y, k in zip(tr, kr)])
               for sr, tr, kr in zip(s, t, keep)]
    got = slice_loss(S, T, None, loss="cosine", reduce="rows", sink_filter=True)
    assert math.isclose(float(got), statistics.fmean(per_row), rel_tol=1e-12)
    # The filtered entries carry no gradient to the student.
    Sg = S.clone().requires_grad_()
    slice_loss(Sg, T, None, loss="cosine", reduce="mean", sink_filter=True).backward()
    assert bool((Sg.grad[0][~torch.tensor(keep)] == 0).all()) and bool((Sg.grad[0][torch.tensor(keep)] != 0).all())


def test_sink_filter_uses_bessels_correction():
    # One block where an entry lies between mean + population std and mean + sample std: kept only with
    # Bessel's correction (torch.std's default, the authors' choice).
    s = [[0.0, 0.0], [1.0, 1.05]]
    t = [[0.45, 0.3], [0.4, 0.35]]
    flat = [0.0, 0.0, 1.0, 1.05]
    assert statistics.fmean(flat) + statistics.pstdev(flat) < 1.05 <= statistics.fmean(flat) + statistics.stdev(flat)
    keep = sink_keep(torch.tensor([s]), torch.tensor([t]), None)[0]
    assert bool(keep[1, 1]) and keep.tolist() == _block_filter(s, t)


def test_sink_filter_statistics_cover_only_the_samples_rows():
    gen = make_gen(9)
    s, t = rand(2, 5, 6, gen=gen), rand(2, 5, 6, gen=gen)
    s[0, 1, 4] = 6.0   # a student sink
    t[1, 2, 3] = 6.0   # a teacher sink
    w = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    keep = sink_keep(s, t, w)
    for b in range(2):
        rows = [r for r in range(5) if w[b, r] > 0]
        expected = _block_filter([s[b, r].tolist() for r in rows], [t[b, r].tolist() for r in rows])
        assert keep[b, rows].tolist() == expected
        assert not bool(keep[b, [r for r in range(5) if w[b, r] == 0]].any())
    for reduce in ("rows", "mean"):
        num = den = 0.0
        for b in range(2):
            rows = [r for r in range(5) if w[b, r] > 0]
            s_rows, t_rows = [s[b, r].tolist() for r in rows], [t[b, r].tolist() for r in rows]
            k = _block_filter(s_rows, t_rows)
            if reduce == "mean":
                num += 1 - _cos(_column_means(s_rows, k), _column_means(t_rows, k))
                den += 1
            else:
                for sr, tr, kr in zip(s_rows, t_rows, k):
                    num += 1 - _cos([x * c for x, c in zip(sr, kr)], [y * c for y, c in zip(tr, kr)])
                    den += 1
        got = slice_loss(s, t, w, loss="cosine", reduce=reduce, sink_filter=True)
        assert math.isclose(float(got), num / den, rel_tol=1e-5), reduce


def test_mean_reduce_without_filter_is_the_row_weighted_mean():
    gen = make_gen(16)
    s, t = rand(2, 4, 7, gen=gen), rand(2, 4, 7, gen=gen)
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    got = slice_loss(s, t, w, loss="mse", reduce="mean")
    pooled_s = (s[0, [0, 2, 3]]).mean(0)
    pooled_t = (t[0, [0, 2, 3]]).mean(0)
    assert math.isclose(float(got), float((pooled_s - pooled_t).pow(2).mean()), rel_tol=1e-6)
    # The same as the kernel's pooled vectors with one weight per sample.
    assert torch.allclose(got, slice_loss(torch.stack([pooled_s, s[1, 0]]), torch.stack([pooled_t, t[1, 0]]),
                                          torch.tensor([1.0, 0.0]), loss="mse"))


def test_float64_slices_give_a_float64_loss():
    gen = make_gen(17)
    s, t = rand(2, 3, 5, gen=gen).double(), rand(2, 3, 5, gen=gen).double()
    for reduce in ("rows", "mean"):
        got = slice_loss(s, t, None, loss="cosine", reduce=reduce, sink_filter=True)
        assert got.dtype == torch.float64


@pytest.mark.parametrize("loss", ["cosine", "mse", "kl"])
@pytest.mark.parametrize("sink_filter", [False, True])
def test_gradient_flows_to_student_only(loss, sink_filter):
    gen = make_gen(10)
    s = rand(2, 3, 6, gen=gen).requires_grad_()
    t = rand(2, 3, 6, gen=gen).requires_grad_()
    got = slice_loss(s, t, _weights(2, 3, gen), loss=loss, sink_filter=sink_filter)
    assert got.requires_grad
    got.backward()
    assert t.grad is None
    assert s.grad is not None and bool(torch.isfinite(s.grad).all()) and float(s.grad.abs().sum()) > 0
    # A teacher-only graph gives a loss without a graph.
    assert not slice_loss(s.detach(), t, None, loss=loss, sink_filter=sink_filter).requires_grad


def test_half_precision_inputs_give_float32():
    gen = make_gen(11)
    s, t = rand(2, 3, 6, gen=gen), rand(2, 3, 6, gen=gen)
    got = slice_loss(s.bfloat16(), t.bfloat16(), None, loss="cosine")
    assert got.dtype == torch.float32
    ref = slice_loss(s.bfloat16().float(), t.bfloat16().float(), None, loss="cosine")
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_slice_loss_bad_arguments():
    gen = make_gen(12)
    s = rand(2, 3, 6, gen=gen)
    with pytest.raises(ValueError, match=r"^teacher\b"):
        slice_loss(s, rand(2, 3, 5, gen=gen), None, loss="cosine")
    with pytest.raises(ValueError, match=r"^teacher\b"):
        slice_loss(s, rand(2, 18, gen=gen), None, loss="cosine")
    with pytest.raises(ValueError, match=r"^loss\b"):
        slice_loss(s, s.clone(), None, loss="l1")
    with pytest.raises(ValueError, match=r"^reduce\b"):
        slice_loss(s, s.clone(), None, loss="cosine", reduce="sum")
    with pytest.raises(ValueError, match=r"^student\b.*sink filter"):
        slice_loss(s[:, 0], s[:, 0].clone(), None, loss="cosine", sink_filter=True)


# ---------------------------------------------------------------------------------------------------------
# 5. group_targets, combine_layers
# ---------------------------------------------------------------------------------------------------------

def test_group_targets_average_windows():
    gen = make_gen(13)
    teacher_slices = {layer: rand(2, 3, 5, gen=gen) for layer in range(13, 24)}
    matches = match_layers(list(range(8, 15)), list(range(13, 24)), "group")
    targets = group_targets(teacher_slices, matches)
    assert sorted(targets) == list(range(8, 15))
    for j, student in enumerate(range(8, 15)):
        window = range(13 + j, 18 + j)
        ref = sum(teacher_slices[layer] for layer in window) / 5
        assert targets[student].shape == (2, 3, 5)
        assert torch.allclose(targets[student], ref, rtol=1e-6, atol=1e-7)
    # A hand-made two-layer window.
    slices = {0: torch.tensor([[1.0, 2.0]]), 1: torch.tensor([[3.0, 6.0]]), 2: torch.tensor([[5.0, 0.0]])}
    out = group_targets(slices, [LayerMatch(4, (0, 1)), LayerMatch(5, (0, 1, 2))])
    assert torch.equal(out[4], torch.tensor([[2.0, 4.0]]))
    assert torch.equal(out[5], torch.tensor([[3.0, 8.0 / 3]]))


def test_group_targets_single_layer_window_passes_through():
    gen = make_gen(14)
    teacher_slices = {layer: rand(2, 7, gen=gen) for layer in (3, 6, 9)}
    matches = match_layers([1, 2, 3], [3, 6, 9], "simple")
    targets = group_targets(teacher_slices, matches)
    for match in matches:
        (teacher,) = match.teacher_layers
        assert torch.equal(targets[match.student_layer], teacher_slices[teacher])
    # Group matching with m == k also gives one-layer windows.
    targets = group_targets(teacher_slices, match_layers([1, 2, 3], [3, 6, 9], "group"))
    assert [torch.equal(targets[s], teacher_slices[t]) for s, t in ((1, 3), (2, 6), (3, 9))] == [True] * 3


def test_combine_layers_sum_and_mean():
    per_layer = {14: torch.tensor(0.5), 8: torch.tensor(0.25), 10: torch.tensor(2.0)}
    assert float(combine_layers(per_layer, "sum")) == pytest.approx(2.75)
    assert float(combine_layers(per_layer, "mean")) == pytest.approx(2.75 / 3)
    assert float(combine_layers({3: torch.tensor(1.5)}, "mean")) == pytest.approx(1.5)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    combine_layers({0: x[0] * 2, 1: x[1] ** 2}, "mean").backward()
    assert torch.allclose(x.grad, torch.tensor([1.0, 2.0]))


def test_end_to_end_code_preset_pipeline():
    """The code preset's pieces together on 24/40 layers: 7 student layers, N×N visual blocks, teacher
    windows of 5, the block filter, column pooling, summed over layers, averaged over the batch."""
    gen = make_gen(15)
    cfg = VAT_PRESETS["code"]
    students, teachers = _code_layers(24, "student"), _code_layers(40, "teacher")
    matches = match_layers(students, teachers, cfg.matching)
    n = 6
    causal = torch.ones(n, n).tril()
    teacher_slices = {layer: rand(2, n, n, gen=gen) * causal for layer in teachers}
    student_slices = {layer: rand(2, n, n, gen=gen) * causal for layer in students}
    targets = group_targets(teacher_slices, matches)
    per_layer = {layer: slice_loss(student_slices[layer], targets[layer], torch.ones(2, n), loss=cfg.loss,
                                   reduce=cfg.reduce, sink_filter=cfg.sink_filter) for layer in students}
    total = combine_layers(per_layer, cfg.layer_reduction)
    ref = 0.0
    for j, layer in enumerate(students):
        for b in range(2):
            s_rows = student_slices[layer][b].tolist()
            t_rows = [[sum(teacher_slices[t][b, r, c].item() for t in range(13 + j, 18 + j)) / 5 for c in range(n)]
                      for r in range(n)]
            keep = _block_filter(s_rows, t_rows)
            ref += (1 - _cos(_column_means(s_rows, keep), _column_means(t_rows, keep))) / 2
    assert math.isclose(float(total), ref, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("fraction", [0.5, None, "ab", [0.2], [0.1, 0.2, 0.3], [True, 0.5]])
def test_resolve_layers_rejects_malformed_fractions_with_a_value_error(fraction):
    with pytest.raises(ValueError, match=r"^vat\.student_layers"):
        resolve_layers(24, {"fraction": fraction}, argument="vat.student_layers")


def test_resolve_layers_fraction_near_the_top_gives_the_last_layer():
    assert resolve_layers(24, {"fraction": [0.99, 1.0]}, argument="vat.student_layers") == [23]


def test_config_checks_band_names_and_accepts_integer_eps():
    with pytest.raises(ValueError, match=r"vat\.student_layers"):
        VATConfig(student_layers="bogus")
    assert VATConfig(eps=1).eps == 1.0


def test_combine_layers_rejects_unknown_reduction_and_empty_input():
    with pytest.raises(ValueError, match="layer_reduction"):
        combine_layers({0: torch.tensor(1.0)}, "max")
    with pytest.raises(ValueError, match="per_layer"):
        combine_layers({}, "mean")
