"""compodistill.distill.kd: the chunked, checkpointed LM + KD losses against the dense float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compodistill.distill.kd import KD_KINDS, dense_lm_and_kd_losses, lm_and_kd_losses

B, L, HS, HT, VS, VT = 3, 9, 6, 5, 11, 13
NUM_SUPERVISED = 17  # prime, so chunk sizes 3 and 7 leave a ragged last chunk
CHUNK_SIZES = [1, 3, 7, 100]
TEMPERATURES = [0.5, 1.0, 2.5]


def linear(in_features, out_features, gen, dtype=torch.float64):
    head = nn.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(out_features, in_features, generator=gen, dtype=dtype))
        head.bias.copy_(torch.randn(out_features, generator=gen, dtype=dtype))
    return head


def make_case(seed=0, dtype=torch.float64, teacher_vocab=VT):
    """Hidden states, heads and labels with -100 on a prompt, a padded tail and a gap in the middle."""
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(B, L, HS, generator=gen, dtype=dtype)
    teacher_hidden = torch.randn(B, L, HT, generator=gen, dtype=dtype)
    labels = torch.randint(0, VS, (B, L), generator=gen)
    labels[0, :3] = -100
    labels[1, 4:6] = -100
    labels[2, 6:] = -100
    assert int((labels[:, 1:] != -100).sum()) == NUM_SUPERVISED
    return dict(student_hidden=student_hidden, teacher_hidden=teacher_hidden, labels=labels,
                student_head=linear(HS, VS, gen, dtype), teacher_head=linear(HT, teacher_vocab, gen, dtype))


def chunked(case, hidden, **kw):
    return lm_and_kd_losses(hidden, case["labels"], case["student_head"], teacher_hidden=case["teacher_hidden"],
                            teacher_head=case["teacher_head"], **kw)


def dense(case, hidden, **kw):
    with torch.no_grad():
        teacher_logits = case["teacher_head"](case["teacher_hidden"])
    return dense_lm_and_kd_losses(case["student_head"](hidden), teacher_logits, case["labels"], **kw)


def grads(losses, name, case, hidden):
    """d losses[name] / d (student_hidden, head weight, head bias)."""
    head = case["student_head"]
    return torch.autograd.grad(losses[name], (hidden, head.weight, head.bias), retain_graph=True)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_equals_dense_reference(kind, temperature, chunk_size):
    case = make_case()
    hidden = case["student_hidden"].clone().requires_grad_()
    got = chunked(case, hidden, kind=kind, temperature=temperature, chunk_size=chunk_size)
    ref = dense(case, hidden, kind=kind, temperature=temperature)
    assert set(got) == {"lm", "kd"}
    for name in ("lm", "kd"):
        assert got[name].dtype == torch.float64 and got[name].dim() == 0
        torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=1e-12)
        for g, r in zip(grads(got, name, case, hidden), grads(ref, name, case, hidden)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert got["kd"] > 0


def test_kinds_match_closed_forms():
    """The reference itself: forward/reverse KL and JSD from their definitions on one row pair."""
    s, t = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64), torch.tensor([[1.0, 0.5, -0.5]], dtype=torch.float64)
    p_s, p_t = s.softmax(-1)[0], t.softmax(-1)[0]
    m = (p_s + p_t) / 2
    expected = {
        "forward_kl": sum(p_t[v] * math.log(p_t[v] / p_s[v]) for v in range(3)),
        "reverse_kl": sum(p_s[v] * math.log(p_s[v] / p_t[v]) for v in range(3)),
        "jsd": sum(0.5 * p_t[v] * math.log(p_t[v] / m[v]) + 0.5 * p_s[v] * math.log(p_s[v] / m[v]) for v in range(3)),
    }
    labels = torch.tensor([[-100, 0]])
    for kind, value in expected.items():
        student_logits = torch.cat([s, torch.zeros_like(s)])[None]  # position 0 predicts labels[0, 1]
        teacher_logits = torch.cat([t, torch.zeros_like(t)])[None]
        ref = dense_lm_and_kd_losses(student_logits, teacher_logits, labels, kind=kind)
        torch.testing.assert_close(ref["kd"], torch.as_tensor(float(value), dtype=torch.float64))


def test_ignored_positions_change_nothing():
    case = make_case(seed=1)
    base = chunked(case, case["student_hidden"], kind="jsd", temperature=2.0, chunk_size=4)
    # Hidden positions whose next label is -100, and the last position, predict nothing.
    unused = torch.ones(B, L, dtype=torch.bool)
    unused[:, :-1] = case["labels"][:, 1:] == -100
    noise = torch.randn(B, L, HS, dtype=torch.float64) * 10
    noisy = dict(case, teacher_hidden=case["teacher_hidden"] + 10 * unused[..., None])
    labels = case["labels"].clone()
    labels[:, 0] = (labels[:, 0] + 1).clamp(max=VS - 1)  # never a target
    noisy["labels"] = labels
    got = chunked(noisy, case["student_hidden"] + noise * unused[..., None], kind="jsd", temperature=2.0,
                  chunk_size=4)
    for name in ("lm", "kd"):
        torch.testing.assert_close(got[name], base[name], rtol=0, atol=0)


def test_dense_reference_ignores_masked_logits():
    case = make_case(seed=2)
    with torch.no_grad():
        student_logits = case["student_head"](case["student_hidden"])
        teacher_logits = case["teacher_head"](case["teacher_hidden"])
    unused = torch.ones(B, L, 1, dtype=torch.bool)
    unused[:, :-1, 0] = case["labels"][:, 1:] == -100
    base = dense_lm_and_kd_losses(student_logits, teacher_logits, case["labels"], kind="reverse_kl")
    got = dense_lm_and_kd_losses(student_logits + 50 * unused, teacher_logits - 50 * unused, case["labels"],
                                 kind="reverse_kl")
    for name in ("lm", "kd"):
        torch.testing.assert_close(got[name], base[name], rtol=0, atol=0)


def test_teacher_vocabulary_is_cut_to_the_students():
    case = make_case(seed=3)
    other = dict(case, teacher_head=linear(HT, VT + 20, torch.Generator().manual_seed(99)))
    with torch.no_grad():  # same first VS rows, different extra rows
        other["teacher_head"].weight[:VS] = case["teacher_head"].weight[:VS]
        other["teacher_head"].bias[:VS] = case["teacher_head"].bias[:VS]
    cut = dict(case, teacher_head=nn.Linear(HT, VS, dtype=torch.float64))
    with torch.no_grad():
        cut["teacher_head"].weight.copy_(case["teacher_head"].weight[:VS])
        cut["teacher_head"].bias.copy_(case["teacher_head"].bias[:VS])
    results = [chunked(c, c["student_hidden"], kind="forward_kl", chunk_size=5) for c in (case, other, cut)]
    for got in results[1:]:
        torch.testing.assert_close(got["kd"], results[0]["kd"], rtol=1e-13, atol=0)


def test_teacher_vocabulary_smaller_than_students_is_rejected():
    case = make_case(teacher_vocab=VS - 1)
    with pytest.raises(ValueError, match=r"^teacher_head\b.*11 logits"):
        chunked(case, case["student_hidden"])


def test_lm_equals_cross_entropy_with_ignore_index():
    case = make_case(seed=4, dtype=torch.float32)
    got = lm_and_kd_losses(case["student_hidden"], case["labels"], case["student_head"], chunk_size=6)
    assert set(got) == {"lm"} and got["lm"].dtype == torch.float32
    logits = case["student_head"](case["student_hidden"])
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), case["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(got["lm"], expected, rtol=1e-6, atol=1e-6)


def test_lm_equals_hugging_face_causal_lm_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    case = make_case(seed=5, dtype=torch.float32)  # ForCausalLMLoss computes in float32
    got = lm_and_kd_losses(case["student_hidden"], case["labels"], case["student_head"], chunk_size=4)
    logits = case["student_head"](case["student_hidden"])
    expected = loss_utils.ForCausalLMLoss(logits, case["labels"], vocab_size=VS)
    torch.testing.assert_close(got["lm"], expected, rtol=1e-6, atol=1e-6)


def test_low_precision_inputs_give_float32_losses_close_to_float64():
    case = make_case(seed=6)
    ref = chunked(case, case["student_hidden"], kind="forward_kl", temperature=2.0)  # before .to(), in place on modules
    low = dict(case, student_hidden=case["student_hidden"].bfloat16(),
               teacher_hidden=case["teacher_hidden"].bfloat16(),
               student_head=case["student_head"].to(torch.bfloat16),
               teacher_head=case["teacher_head"].to(torch.bfloat16))
    got = chunked(low, low["student_hidden"], kind="forward_kl", temperature=2.0)
    for name in ("lm", "kd"):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), ref[name], rtol=5e-2, atol=5e-2)


def test_teacher_gets_no_gradient_and_no_grad_mode_agrees():
    case = make_case(seed=7)
    teacher_hidden = case["teacher_hidden"].clone().requires_grad_()
    hidden = case["student_hidden"].clone().requires_grad_()
    losses = chunked(dict(case, teacher_hidden=teacher_hidden), hidden, chunk_size=3)
    (losses["lm"] + losses["kd"]).backward()
    assert teacher_hidden.grad is None and case["teacher_head"].weight.grad is None
    assert hidden.grad is not None and case["student_head"].weight.grad is not None
    with torch.no_grad():
        again = chunked(case, case["student_hidden"], chunk_size=3)
    for name in ("lm", "kd"):
        torch.testing.assert_close(again[name], losses[name].detach(), rtol=1e-13, atol=0)


def test_logits_are_not_kept_for_backward():
    """Outside the checkpointed chunks autograd saves only row-sized tensors, never a (rows, V) logit block."""
    case = make_case(seed=8)
    hidden = case["student_hidden"].clone().requires_grad_()
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = chunked(case, hidden, chunk_size=4)
    assert saved_shapes, "expected the row gather to save something"
    assert not [s for s in saved_shapes if VS in s or VT in s], saved_shapes
    (losses["lm"] + losses["kd"]).backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("seq_len", [1, L])
def test_no_supervised_token_gives_connected_zeros(seq_len):
    case = make_case(seed=9)
    hidden = case["student_hidden"][:, :seq_len].clone().requires_grad_()
    labels = torch.full((B, seq_len), -100)
    labels[:, 0] = 3  # position 0 is never a target
    losses = lm_and_kd_losses(hidden, labels, case["student_head"], teacher_hidden=case["teacher_hidden"][:, :seq_len],
                              teacher_head=case["teacher_head"], kind="jsd")
    assert set(losses) == {"lm", "kd"}
    for value in losses.values():
        assert torch.isfinite(value) and value.item() == 0.0 and value.requires_grad
    (losses["lm"] + losses["kd"]).backward()
    head = case["student_head"]
    for grad in (hidden.grad, head.weight.grad, head.bias.grad):
        assert grad is not None and torch.count_nonzero(grad) == 0
    ref = dense_lm_and_kd_losses(head(hidden), None, labels)
    assert set(ref) == {"lm"} and ref["lm"].item() == 0.0


BAD_ARGUMENTS = [
    ("kind", dict(kind="kl")),
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature=-1.0)),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=float("inf"))),
    ("temperature", dict(temperature=True)),
    ("chunk_size", dict(chunk_size=0)),
    ("chunk_size", dict(chunk_size=2.0)),
    ("labels", dict(labels=torch.zeros(B, L - 1, dtype=torch.long))),
    ("labels", dict(labels=torch.zeros(B, L))),
    ("labels", dict(labels=torch.full((B, L), VS))),
    ("labels", dict(labels=torch.full((B, L), -1))),
    ("student_hidden", dict(student_hidden=torch.zeros(B * L, HS, dtype=torch.float64))),
    ("teacher_hidden", dict(teacher_hidden=torch.zeros(B, L + 1, HT, dtype=torch.float64))),
    ("teacher_head", dict(teacher_head=None)),
    ("teacher_hidden", dict(teacher_hidden=None)),
]


@pytest.mark.parametrize("name,override", BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_naming_them(name, override):
    case = make_case()
    kwargs = dict(teacher_hidden=case["teacher_hidden"], teacher_head=case["teacher_head"])
    kwargs.update({k: v for k, v in override.items() if k in ("teacher_hidden", "teacher_head")})
    positional = dict(student_hidden=case["student_hidden"], labels=case["labels"], student_head=case["student_head"])
    positional.update({k: v for k, v in override.items() if k in positional})
    options = {k: v for k, v in override.items() if k in ("kind", "temperature", "chunk_size")}
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        lm_and_kd_losses(positional["student_hidden"], positional["labels"], positional["student_head"],
                         **kwargs, **options)


def test_dense_reference_validates_too():
    case = make_case()
    logits = case["student_head"](case["student_hidden"])
    with pytest.raises(ValueError, match=r"^kind\b"):
        dense_lm_and_kd_losses(logits, None, case["labels"], kind="js")
    with pytest.raises(ValueError, match=r"^teacher_logits\b"):
        dense_lm_and_kd_losses(logits, logits[..., :-1], case["labels"])
