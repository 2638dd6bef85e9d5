"""Up-front argument checks shared by both backends. Every rejection is a ValueError that names the
argument and what was expected."""

from __future__ import annotations

import contextlib
import contextvars
import enum
import importlib.util
import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional

import torch

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_ONLY_DTYPES = (torch.float64,)  # the torch path also takes float64, for gradcheck
MAX_TRITON_HEAD_DIM = 256
BACKENDS = ("auto", "triton", "torch")  # "auto": Triton for CUDA tensors, torch otherwise


class SliceMode(enum.IntEnum):
    """What the fused attention computes from the head-mean visual slice a (B, query_len, visual_len).

    The same names run from the public functions down to the Triton kernels, where the value is the
    compile-time `MODE` of the slice kernels. Plain attention (`flash_attention`) has no slice mode (None).

    ROWS:  the slice a itself (`attention_with_visual_slice(reduce="rows")`).
    MEAN:  its row_weight-weighted mean over the rows, (B, visual_len) (`reduce="mean"`).
    ALIGN: the cosine alignment loss of a against a teacher slice (`attention_with_alignment`).
    """

    ROWS = 0
    MEAN = 1
    ALIGN = 2


@dataclass
class SliceSpec:
    """Where the visual slice lives, as index tensors on the device of q.

    Row i of sample b is the query at position query_index[b, i], column j the key at visual_index[b, j];
    −1 marks padding (only ever at the end of a row of indices). Padded rows and columns are 0 in the
    slice, carry no weight, and are never read from the teacher slice.
    """

    visual_index: torch.Tensor  # (B, Nv) int32, ascending or not, no position twice, −1 = padding
    query_index: torch.Tensor  # (B, Nq) int32, same conventions
    row_weight: Optional[torch.Tensor]  # (B, Nq) float, 0 on padded rows; None: uniform (no padded row)

    @property
    def visual_len(self) -> int:
        return self.visual_index.shape[1]

    @property
    def query_len(self) -> int:
        return self.query_index.shape[1]


def _fail(name, expected, got):
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return repr(t)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_qkv(q, k, v, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            _fail(name, "a 4-D tensor (B, H, L, D)", _describe(t))
    on_torch = backend == "torch" or (backend == "auto" and not (q.is_cuda and triton_available()))
    allowed = ATTN_DTYPES + (TORCH_ONLY_DTYPES if on_torch else ())
    if q.dtype not in allowed:
        _fail("q", f"dtype in {[str(d) for d in allowed]} for backend={backend!r}", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(name, f"the dtype of q ({q.dtype})", t.dtype)
        if t.device != q.device:
            _fail(name, f"the device of q ({q.device})", t.device)
    B, Hq, L, D = q.shape
    if B < 1 or Hq < 1 or L < 1 or D < 1:
        _fail("q", "non-empty dimensions (B, Hq, L, D) >= 1", _describe(q))
    if k.shape[0] != B or k.shape[2] != L or k.shape[3] != D:
        _fail("k", f"shape (B={B}, Hkv, L={L}, D={D}) matching q", _describe(k))
    if v.shape != k.shape:
        _fail("v", f"the shape of k {tuple(k.shape)}", _describe(v))
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        _fail("k", f"a head count Hkv that divides Hq={Hq} (grouped-query attention)", Hkv)


def check_common(q, causal, softmax_scale, key_padding_mask):
    if not isinstance(causal, bool):
        _fail("causal", "a bool", repr(causal))
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) \
                or not math.isfinite(float(softmax_scale)) or float(softmax_scale) <= 0:
            _fail("softmax_scale", "None or a finite positive number", repr(softmax_scale))
    if key_padding_mask is not None:
        B, _, L, _ = q.shape
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            _fail("key_padding_mask", "a bool tensor (B, L), True = real token", _describe(key_padding_mask))
        if tuple(key_padding_mask.shape) != (B, L):
            _fail("key_padding_mask", f"shape (B, L) = {(B, L)}", _describe(key_padding_mask))
        if key_padding_mask.device != q.device:
            _fail("key_padding_mask", f"the device of q ({q.device})", key_padding_mask.device)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return scale


def resolve_backend(backend, q):
    if backend not in BACKENDS:
        _fail("backend", f"one of {BACKENDS}", repr(backend))
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton': the triton package is not installed; use backend='torch'")
        if not q.is_cuda and not interpreting():
            raise ValueError(
                f"backend='triton': expected CUDA tensors, got tensors on {q.device}; Triton runs CPU "
                "tensors only in its interpreter (set TRITON_INTERPRET=1 before importing "
                "compodistill_kernels), or use backend='torch'"
            )
    return backend


def check_triton_shapes(q):
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        _fail("q", f"head dim D <= {MAX_TRITON_HEAD_DIM} for backend='triton'", q.shape[-1])


def _as_length(name, value, L):
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, "an int", repr(value))
    value = int(value)
    if not 1 <= value <= L:
        _fail(name, f"an int in [1, L={L}]", value)
    return value


_DEVICE_VALUE_CHECKS = contextvars.ContextVar("compodistill_kernels_device_value_checks", default=True)


@contextlib.contextmanager
def device_value_checks(enabled: bool):
    """Turn the checks that read device memory on or off inside the block.

    Checking values that live on a GPU (offsets given as CUDA tensors, row_weight signs, teacher_slice
    finiteness) costs one host synchronization per call, which stalls the launch queue. Inside
    `device_value_checks(False)` those values are trusted; shapes, dtypes, devices and every value given
    on the host (Python ints, lists, CPU tensors) are still checked. The kernels mask positions outside
    [0, L), so offsets out of range give wrong slices, never out-of-bounds memory accesses. The checks are
    also skipped while a CUDA graph is being captured, where a synchronization is not allowed.
    """
    token = _DEVICE_VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _DEVICE_VALUE_CHECKS.reset(token)


def _device_checks_wanted(device) -> bool:
    if not _DEVICE_VALUE_CHECKS.get():
        return False
    return not (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing())


def _as_offsets(name, value, B, device):
    """(offsets as an int32 tensor on `device`, the host copy when the values were given on the host)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = torch.full((B,), int(value), dtype=torch.int64)
    elif isinstance(value, (list, tuple)):
        value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor):
        _fail(name, "a (B,) integer tensor", type(value).__name__)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        _fail(name, "an integer tensor", value.dtype)
    if tuple(value.shape) != (B,):
        _fail(name, f"shape (B,) = ({B},)", _describe(value))
    host = value if value.device.type == "cpu" else None
    # a host-to-device copy of a few pageable bytes is staged at once; non_blocking avoids a stream sync
    return value.to(device=device, dtype=torch.int32, non_blocking=True), host


def _check_range(name, offsets, length, L):
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) + length > L):
        what = "visual_len" if name == "visual_start" else "query_len"
        _fail(name, f"{name} + [0, {what}={length}) inside [0, L={L}] for every sample", offsets.tolist())


def _span_index(start, length):
    """The contiguous case as indices: start[b] + [0, length)."""
    return start[:, None] + torch.arange(length, device=start.device, dtype=torch.int32)[None, :]


def _as_index(name, value, B, device):
    """(indices as an int32 tensor on `device`, the host copy when given on the host)."""
    if isinstance(value, (list, tuple)):
        value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor):
        _fail(name, "a (B, N) int64 tensor of sequence positions, padded at the end with -1",
              type(value).__name__)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        _fail(name, "an integer (int64) tensor", value.dtype)
    if value.dim() != 2 or value.shape[0] != B or value.shape[1] < 1:
        _fail(name, f"shape (B={B}, N) with N >= 1", _describe(value))
    if value.device.type != "cpu" and value.device != device:
        _fail(name, f"the device of q ({device}) or the CPU", value.device)
    host = value if value.device.type == "cpu" else None
    return value.to(device=device, dtype=torch.int32, non_blocking=True), host


def _index_problems(index, L):
    """(count of entries outside [-1, L), count of -1 before a real entry, count of repeated positions)
    as 0-dim tensors, computed where the index lives."""
    idx = index.long()
    real = idx >= 0
    out_of_range = ((idx < -1) | (idx >= L)).sum()
    pad_before_real = (~real[:, :-1] & real[:, 1:]).sum()
    ordered = torch.where(real, idx, torch.full_like(idx, -1)).sort(dim=1).values
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum()
    return out_of_range, pad_before_real, repeated


def _raise_index_problems(name, counts, L, shown):
    out_of_range, pad_before_real, repeated = counts
    if out_of_range:
        _fail(name, f"positions in [0, L={L}) or -1 for padding", f"{int(out_of_range)} entries outside, "
              f"in {shown}")
    if pad_before_real:
        _fail(name, "padding (-1) only at the end of each sample's row", f"-1 before a real position in {shown}")
    if repeated:
        _fail(name, "each position at most once per sample", f"a repeated position in {shown}")


def _slice_axis(q, axis, start, length, index):
    """Indices (int32, device) of one axis ("visual" or "query") from either form, plus what still needs a
    device read: a list of (name, problem-count tensors) and, for start offsets on the device, the
    (name, length, offsets) to range-check."""
    B, _, L, _ = q.shape
    start_name, len_name, index_name = f"{axis}_start", f"{axis}_len", f"{axis}_index"
    if index is not None:
        if start is not None or length is not None:
            raise ValueError(f"{index_name}: given together with {start_name}/{len_name}; pass either "
                             f"{index_name} (B, N) or {start_name} and {len_name}")
        idx, host = _as_index(index_name, index, B, q.device)
        if host is not None:
            _raise_index_problems(index_name, [int(c) for c in _index_problems(host, L)], L, _short(host))
            return idx, [], []
        return idx, [(index_name, _index_problems(idx, L))], []
    if start is None and length is None:
        raise ValueError(f"{index_name}: expected a (B, N) int64 tensor of positions, or both {start_name} "
                         f"(B,) and {len_name}; got neither")
    if start is None:
        _fail(start_name, f"a (B,) integer tensor with {len_name} (or {index_name} instead)", None)
    if length is None:
        _fail(len_name, f"an int with {start_name} (or {index_name} instead)", None)
    length = _as_length(len_name, length, L)
    offsets, host = _as_offsets(start_name, start, B, q.device)
    if host is not None:
        _check_range(start_name, host, length, L)
        return _span_index(offsets, length), [], []
    return _span_index(offsets, length), [], [(start_name, length, offsets)]


def _short(t, limit=8):
    values = t.tolist()
    return f"{values[:limit]}{' ...' if len(values) > limit else ''}"


def check_slice(q, visual_start, visual_len, query_start, query_len, row_weight, teacher_slice=None, *,
                visual_index=None, query_index=None):
    """Validate the slice arguments; returns a SliceSpec with device tensors.

    Each axis comes either as indices (visual_index / query_index, (B, N), −1 padding at the end) or as a
    contiguous span (start (B,) and len). Values given on the host are checked there, without touching
    the device. Values that live on the device (CUDA indices or offsets, row_weight, teacher_slice) are
    checked together in one host synchronization, unless device_value_checks(False) is active or a CUDA
    graph is being captured.
    """
    B, _, L, _ = q.shape
    vi, v_counts, v_offsets = _slice_axis(q, "visual", visual_start, visual_len, visual_index)
    qi, q_counts, q_offsets = _slice_axis(q, "query", query_start, query_len, query_index)
    indexed = visual_index is not None or query_index is not None
    Nv, Nq = vi.shape[1], qi.shape[1]
    on_device = _device_checks_wanted(q.device)
    device_counts = (v_counts + q_counts) if on_device else []
    device_offsets = (v_offsets + q_offsets) if on_device else []
    checks = []
    for _, counts in device_counts:
        checks += list(counts)
    for _, length, t in device_offsets:
        checks += [t.min(), (t + length).max()]
    if row_weight is not None:
        if not isinstance(row_weight, torch.Tensor) or not row_weight.is_floating_point():
            _fail("row_weight", "a floating-point tensor (B, query_len)", _describe(row_weight))
        if tuple(row_weight.shape) != (B, Nq):
            _fail("row_weight", f"shape (B, query_len) = {(B, Nq)}", _describe(row_weight))
        if row_weight.device != q.device:
            _fail("row_weight", f"the device of q ({q.device})", row_weight.device)
        row_weight = row_weight.detach().to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        if row_weight.device.type == "cpu" or on_device:
            checks.append(torch.where(torch.isfinite(row_weight), row_weight, -1.0).min())
    if teacher_slice is not None:
        if not isinstance(teacher_slice, torch.Tensor) or not teacher_slice.is_floating_point():
            _fail("teacher_slice", "a floating-point tensor (B, query_len, visual_len)", _describe(teacher_slice))
        if tuple(teacher_slice.shape) != (B, Nq, Nv):
            _fail("teacher_slice", f"shape (B, query_len, visual_len) = {(B, Nq, Nv)}",
                  _describe(teacher_slice))
        if teacher_slice.device != q.device:
            _fail("teacher_slice", f"the device of q ({q.device})", teacher_slice.device)
        if teacher_slice.device.type == "cpu" or on_device:
            # padding entries (a row or a column marked -1) are ignored, whatever they hold
            real = (qi >= 0)[:, :, None] & (vi >= 0)[:, None, :]
            checks.append((torch.isfinite(teacher_slice) | ~real).all().to(torch.float64))
    if checks:
        # one host synchronization (none when every value is on the CPU) for all the value checks
        values = torch.stack([c.to(torch.float64) for c in checks]).tolist()
        for name, _ in device_counts:
            counts = [values.pop(0) for _ in range(3)]
            _raise_index_problems(name, counts, L, "one or more samples")
        for name, length, t in device_offsets:
            low, high = values.pop(0), values.pop(0)
            if low < 0 or high > L:
                what = "visual_len" if name == "visual_start" else "query_len"
                _fail(name, f"{name} + [0, {what}={length}) inside [0, L={L}] for every sample", t.tolist())
        if row_weight is not None and (row_weight.device.type == "cpu" or on_device):
            if values.pop(0) < 0:
                _fail("row_weight", "finite, non-negative weights", "a negative or non-finite weight")
        if teacher_slice is not None and (teacher_slice.device.type == "cpu" or on_device) and values.pop(0) < 1:
            _fail("teacher_slice", "finite values on the real (unpadded) entries", "NaN or inf")
    if indexed:
        # padded rows carry no weight; a padded column is 0 in the slice, so it adds nothing to a cosine
        real_rows = (qi >= 0).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        row_weight = real_rows if row_weight is None else row_weight * real_rows
    return SliceSpec(vi.contiguous(), qi.contiguous(), row_weight)


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(float(eps)) or eps <= 0:
        _fail("eps", "a finite positive number", repr(eps))
    return float(eps)


_REDUCE_MODES = {"rows": SliceMode.ROWS, "mean": SliceMode.MEAN}


def check_reduce(reduce) -> SliceMode:
    """The SliceMode of `attention_with_visual_slice(reduce=...)`."""
    if not isinstance(reduce, str) or reduce not in _REDUCE_MODES:
        _fail("reduce", "'rows' or 'mean'", repr(reduce))
    return _REDUCE_MODES[reduce]


def check_deterministic(deterministic) -> bool:
    if not isinstance(deterministic, bool):
        _fail("deterministic", "a bool (True: the two-kernel backward without atomics; False: the one-pass "
                               "backward with dQ accumulated by atomics)", repr(deterministic))
    return deterministic
