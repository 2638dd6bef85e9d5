"""Argument validation: every rejection is a ValueError whose message starts with the argument's name.
These run on the CPU with the torch backend unless a case is about the Triton backend."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import compodistill_kernels as ck
from .helpers import DEVICE, HAS_CUDA, TRITON_SKIP_REASON, triton_runnable

B, Hq, Hkv, L, D = 2, 4, 2, 12, 8
VL, QL = 4, 3


def qkv(dtype=torch.float32, device="cpu", d=D, hkv=Hkv):
    q = torch.randn(B, Hq, L, d, dtype=dtype, device=device)
    k = torch.randn(B, hkv, L, d, dtype=dtype, device=device)
    v = torch.randn(B, hkv, L, d, dtype=dtype, device=device)
    return q, k, v


def slice_args(**overrides):
    args = dict(visual_start=torch.tensor([1, 3]), visual_len=VL, query_start=torch.tensor([6, 8]), query_len=QL)
    args.update(overrides)
    return args


def teacher(device="cpu"):
    return torch.linspace(0.1, 1.0, B * QL * VL, device=device).reshape(B, QL, VL)


def raises(name):
    """pytest.raises for a ValueError whose message names `name` first ("name: expected ...")."""
    return pytest.raises(ValueError, match=rf"^{name}\b")


# The three functions, called with the slice arguments they take.
def call_flash(q, k, v, **kw):
    kw = {n: kw.pop(n) for n in list(kw) if n in ("causal", "softmax_scale", "key_padding_mask", "backend")}
    return ck.flash_attention(q, k, v, **kw)


def call_slice(q, k, v, **kw):
    s = {n: kw.pop(n) for n in ("visual_start", "visual_len", "query_start", "query_len")}
    return ck.attention_with_visual_slice(q, k, v, s["visual_start"], s["visual_len"], s["query_start"],
                                          s["query_len"], **kw)


def call_align(q, k, v, teacher_slice=None, **kw):
    s = {n: kw.pop(n) for n in ("visual_start", "visual_len", "query_start", "query_len")}
    teacher_slice = teacher(q.device) if teacher_slice is None else teacher_slice
    return ck.attention_with_alignment(q, k, v, teacher_slice, s["visual_start"], s["visual_len"],
                                       s["query_start"], s["query_len"], **kw)


FUNCS = [pytest.param(call_flash, id="flash_attention"), pytest.param(call_slice, id="visual_slice"),
         pytest.param(call_align, id="alignment")]
SLICE_FUNCS = FUNCS[1:]


# --------------------------------------------------------------------------------------------------
# Positive controls: the argument forms the contract accepts.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", FUNCS)
def test_valid_arguments_are_accepted(func):
    q, k, v = qkv()
    out, second = func(q, k, v, **slice_args(), backend="torch")
    assert out.shape == q.shape


@pytest.mark.parametrize("func", SLICE_FUNCS)
def test_offsets_and_lengths_accept_python_ints_lists_and_0d_tensors(func):
    q, k, v = qkv()
    ref = func(q, k, v, **slice_args(), backend="torch")[1]
    for args in (slice_args(visual_start=[1, 3], query_start=(6, 8)),
                 slice_args(visual_start=torch.tensor([1, 3], dtype=torch.int32), visual_len=torch.tensor(VL),
                            query_len=torch.tensor(QL, dtype=torch.int16))):
        torch.testing.assert_close(func(q, k, v, **args, backend="torch")[1], ref)
    # one int offset applies to every sample
    same = func(q, k, v, **slice_args(visual_start=2, query_start=7), backend="torch")[1]
    expect = func(q, k, v, **slice_args(visual_start=torch.tensor([2, 2]), query_start=torch.tensor([7, 7])),
                  backend="torch")[1]
    torch.testing.assert_close(same, expect)


def test_float64_is_accepted_by_the_torch_backend():
    q, k, v = qkv(torch.float64)
    out, lse = ck.flash_attention(q, k, v, backend="torch")
    assert out.dtype == torch.float64


def test_auto_backend_on_cpu_tensors_runs_torch():
    q, k, v = qkv()
    out, _ = ck.flash_attention(q, k, v, backend="auto")
    torch.testing.assert_close(out, ck.flash_attention(q, k, v, backend="torch")[0])


# --------------------------------------------------------------------------------------------------
# q, k, v
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_ndim(func, which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which][0]  # 3-D
    with raises(which):
        func(t["q"], t["k"], t["v"], **slice_args(), backend="torch")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_a_tensor(which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which].tolist()
    with raises(which):
        ck.flash_attention(t["q"], t["k"], t["v"], backend="torch")


@pytest.mark.parametrize("which", ["k", "v"])
def test_dtype_mismatch_between_q_k_v(which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which].half()
    with raises(which):
        ck.flash_attention(t["q"], t["k"], t["v"], backend="torch")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64],
                         ids=["int32", "int64", "bool", "complex64"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_unsupported_dtype(dtype, backend):
    q = torch.ones(B, Hq, L, D, dtype=dtype)
    k = v = torch.ones(B, Hkv, L, D, dtype=dtype)
    with raises("q"):
        ck.flash_attention(q, k, v, backend=backend)


@pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)
def test_float64_on_triton():
    q, k, v = qkv(torch.float64, device=DEVICE)
    with raises("q"):
        ck.flash_attention(q, k, v, backend="triton")


@pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("func", FUNCS)
def test_head_dim_above_256_on_triton(func):
    q, k, v = qkv(device=DEVICE, d=264)
    with raises("q"):
        func(q, k, v, **slice_args(), backend="triton")


def test_head_dim_above_256_is_fine_on_torch():
    q, k, v = qkv(d=264)
    assert ck.flash_attention(q, k, v, backend="torch")[0].shape == q.shape


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: a device mismatch needs two devices")
@pytest.mark.parametrize("which", ["k", "v"])
def test_device_mismatch_qkv(which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which].cuda()
    with raises(which):
        ck.flash_attention(t["q"], t["k"], t["v"], backend="torch")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: a device mismatch needs two devices")
@pytest.mark.parametrize("name", ["key_padding_mask", "row_weight", "teacher_slice"])
def test_device_mismatch_optional_inputs(name):
    q, k, v = qkv(device="cuda")
    kw = dict(key_padding_mask=torch.ones(B, L, dtype=torch.bool, device="cuda"),
              row_weight=torch.ones(B, QL, device="cuda"), teacher_slice=teacher().cuda())
    kw[name] = kw[name].cpu()
    with raises(name):
        call_align(q, k, v, **kw, **slice_args(), backend="torch")


def test_hq_not_divisible_by_hkv():
    q = torch.randn(B, 3, L, D)
    k = v = torch.randn(B, 2, L, D)
    with raises("k"):
        ck.flash_attention(q, k, v, backend="torch")


@pytest.mark.parametrize("shape", [(B, Hkv, L + 1, D), (B, Hkv, L, D + 1), (B + 1, Hkv, L, D)],
                         ids=["L", "D", "B"])
def test_k_shape_does_not_match_q(shape):
    q, _, _ = qkv()
    k = v = torch.randn(*shape)
    with raises("k"):
        ck.flash_attention(q, k, v, backend="torch")


@pytest.mark.parametrize("shape", [(B, Hkv, L - 1, D), (B, Hkv, L, D - 1), (B, 1, L, D)], ids=["L", "D", "H"])
def test_v_shape_does_not_match_k(shape):
    q, k, _ = qkv()
    with raises("v"):
        ck.flash_attention(q, k, torch.randn(*shape), backend="torch")


def test_empty_dimension():
    q = torch.randn(B, Hq, 0, D)
    k = v = torch.randn(B, Hkv, 0, D)
    with raises("q"):
        ck.flash_attention(q, k, v, backend="torch")


# --------------------------------------------------------------------------------------------------
# causal, softmax_scale, key_padding_mask, backend
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("value", [1, "yes", None], ids=repr)
def test_causal_must_be_bool(func, value):
    q, k, v = qkv()
    with raises("causal"):
        func(q, k, v, **slice_args(), causal=value, backend="torch")


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("value", [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1", torch.tensor([0.1, 0.2])],
                         ids=["0", "0.0", "negative", "nan", "inf", "True", "str", "tensor"])
def test_softmax_scale_invalid(func, value):
    q, k, v = qkv()
    with raises("softmax_scale"):
        func(q, k, v, **slice_args(), softmax_scale=value, backend="torch")


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("mask", [torch.ones(B, L, dtype=torch.uint8), torch.ones(B, L), torch.ones(B, L + 1).bool(),
                                  torch.ones(L).bool(), torch.ones(B, 1, L).bool(), [[True] * L] * B],
                         ids=["uint8", "float", "B,L+1", "L", "B,1,L", "list"])
def test_key_padding_mask_invalid(func, mask):
    q, k, v = qkv()
    with raises("key_padding_mask"):
        func(q, k, v, **slice_args(), key_padding_mask=mask, backend="torch")


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("value", ["cuda", "Triton", None, ""], ids=repr)
def test_backend_invalid(func, value):
    q, k, v = qkv()
    with raises("backend"):
        func(q, k, v, **slice_args(), backend=value)


def test_triton_on_cpu_tensors_without_the_interpreter():
    # TRITON_INTERPRET is process-wide (read at kernel decoration), so this runs in a fresh process.
    code = textwrap.dedent("""
        import torch, compodistill_kernels as ck
        q = torch.randn(1, 2, 8, 16)
        try:
            ck.flash_attention(q, q, q, backend="triton")
        except ValueError as e:
            print("VALUEERROR:", e)
        else:
            print("NO ERROR")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    msg = res.stdout.strip()
    assert msg.startswith("VALUEERROR: backend='triton'"), msg
    assert "TRITON_INTERPRET" in msg and "backend='torch'" in msg, msg


# --------------------------------------------------------------------------------------------------
# Slice arguments
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", SLICE_FUNCS)
@pytest.mark.parametrize("name, start", [
    ("visual_start", torch.tensor([-1, 0])),
    ("visual_start", torch.tensor([0, L - VL + 1])),  # start + len > L
    ("visual_start", torch.tensor([L, 0])),
    ("query_start", torch.tensor([0, -2])),
    ("query_start", torch.tensor([L - QL + 1, 0])),
    ("query_start", -1),
], ids=["vis-negative", "vis-past-end", "vis-at-L", "query-negative", "query-past-end", "query-int-negative"])
def test_offsets_out_of_range(func, name, start):
    q, k, v = qkv()
    with raises(name):
        func(q, k, v, **slice_args(**{name: start}), backend="torch")


@pytest.mark.parametrize("func", SLICE_FUNCS)
@pytest.mark.parametrize("name", ["visual_start", "query_start"])
@pytest.mark.parametrize("value", [torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]), torch.tensor(1),
                                   torch.tensor([[1, 2]]), torch.tensor([True, False]), 1.0, "1", None],
                         ids=["float", "B+1", "0-d", "1,B", "bool", "py-float", "str", "None"])
def test_offsets_wrong_shape_or_dtype(func, name, value):
    q, k, v = qkv()
    with raises(name):
        func(q, k, v, **slice_args(**{name: value}), backend="torch")


@pytest.mark.parametrize("func", SLICE_FUNCS)
@pytest.mark.parametrize("name", ["visual_len", "query_len"])
@pytest.mark.parametrize("value", [0, -1, L + 1, 2.0, 2.5, True, "3", None, torch.tensor(2.0), torch.tensor([2, 3])],
                         ids=["0", "-1", "L+1", "2.0", "2.5", "True", "str", "None", "float-tensor", "1-d-tensor"])
def test_lengths_invalid(func, name, value):
    q, k, v = qkv()
    args = slice_args(visual_start=torch.tensor([0, 0]), query_start=torch.tensor([0, 0]))
    args[name] = value
    with raises(name):
        func(q, k, v, **args, backend="torch")


@pytest.mark.parametrize("func", SLICE_FUNCS)
@pytest.mark.parametrize("weight", [
    torch.ones(B, QL + 1), torch.ones(QL), torch.ones(B, QL, 1),
    torch.tensor([[1.0, -0.5, 1.0], [1.0, 1.0, 1.0]]),
    torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]]),
    torch.tensor([[1.0, 1.0, 1.0], [float("inf"), 1.0, 1.0]]),
    torch.ones(B, QL, dtype=torch.int64), [[1.0] * QL] * B,
], ids=["B,QL+1", "QL", "B,QL,1", "negative", "nan", "inf", "int", "list"])
def test_row_weight_invalid(func, weight):
    q, k, v = qkv()
    kw = {"reduce": "mean"} if func is call_slice else {}
    with raises("row_weight"):
        func(q, k, v, **slice_args(), row_weight=weight, **kw, backend="torch")


@pytest.mark.parametrize("value", [
    torch.rand(B, QL, VL + 1), torch.rand(B, QL + 1, VL), torch.rand(QL, VL), torch.rand(B + 1, QL, VL),
    torch.tensor(float("nan")).expand(B, QL, VL).clone(), torch.ones(B, QL, VL, dtype=torch.int64),
    [[[0.5] * VL] * QL] * B,
], ids=["B,QL,VL+1", "B,QL+1,VL", "QL,VL", "B+1,QL,VL", "all-nan", "int", "list"])
def test_teacher_slice_invalid(value):
    q, k, v = qkv()
    with raises("teacher_slice"):
        call_align(q, k, v, teacher_slice=value, **slice_args(), backend="torch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_teacher_slice_one_non_finite_entry(bad):
    q, k, v = qkv()
    t = teacher()
    t[1, 2, 3] = bad
    with raises("teacher_slice"):
        call_align(q, k, v, teacher_slice=t, **slice_args(), backend="torch")


@pytest.mark.parametrize("eps", [0, 0.0, -1e-8, float("nan"), float("inf"), True, "1e-8", None],
                         ids=["0", "0.0", "negative", "nan", "inf", "True", "str", "None"])
def test_eps_invalid(eps):
    q, k, v = qkv()
    with raises("eps"):
        call_align(q, k, v, **slice_args(), eps=eps, backend="torch")


@pytest.mark.parametrize("reduce", ["sum", "Rows", None, ""], ids=repr)
def test_reduce_invalid(reduce):
    q, k, v = qkv()
    with raises("reduce"):
        call_slice(q, k, v, **slice_args(), reduce=reduce, backend="torch")


@pytest.mark.skipif(not triton_runnable(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("func", SLICE_FUNCS)
def test_slice_checks_also_guard_the_triton_backend(func):
    q, k, v = qkv(device=DEVICE)
    args = slice_args(visual_start=torch.tensor([0, L - VL + 1], device=DEVICE),
                      query_start=torch.tensor([0, 0], device=DEVICE))
    with raises("visual_start"):
        func(q, k, v, **args, backend="triton")


# --------------------------------------------------------------------------------------------------
# Checks that read device memory can be turned off; values given on the host are always checked
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", SLICE_FUNCS)
def test_host_values_are_checked_even_without_device_checks(func):
    from compodistill_kernels.attention.validate import device_value_checks
    q, k, v = qkv()
    with device_value_checks(False):
        out, _ = func(q, k, v, **slice_args(), backend="torch")  # valid arguments still run
        assert out.shape == q.shape
        with raises("visual_start"):
            func(q, k, v, **slice_args(visual_start=[0, L - VL + 1]), backend="torch")
        with raises("query_start"):
            func(q, k, v, **slice_args(query_start=torch.tensor([-1, 0])), backend="torch")


def test_cpu_teacher_is_checked_even_without_device_checks():
    from compodistill_kernels.attention.validate import device_value_checks
    q, k, v = qkv()
    t = teacher()
    t[0, 0, 0] = float("nan")
    with device_value_checks(False), raises("teacher_slice"):
        call_align(q, k, v, teacher_slice=t, **slice_args(), backend="torch")
