"""Attention providers for the kernel benchmarks: ours and the baselines, per op, and the steps that time
them in each mode (forward, backward, full).

Ops and what every provider of an op computes:

- alignment (student side of VAT): the attention output and the cosine alignment loss of the head-mean
  visual slice against a teacher slice;
- slice_export (teacher side): the attention output and the head-mean visual slice (B, rows, visual);
- flash: the attention output alone.

Providers:

- ours: `attention_with_alignment`, `attention_with_visual_slice` or `flash_attention` (Triton on CUDA,
  the chunked PyTorch path on the CPU), with the default deterministic two-kernel backward;
- ours-onepass: the same with `deterministic=False`, the one-pass backward (dQ by atomics); its forward is
  ours', so it runs in the backward and full modes only;
- eager: materialized probabilities (the naive reference), then the slice and the loss from them: what
  Hugging Face's eager attention with `output_attentions=True` costs;
- sdpa+slice: PyTorch's flash kernel (the one SDPA dispatches to) for the output and its log-sum-exp, and
  the slice recomputed in PyTorch from q, k and that lse: the fair unfused alternative;
- xformers+slice, flex+slice: the same with xformers' memory_efficient_attention or FlexAttention for the
  output and lse (where installed);
- sdpa-flash (alignment and slice_export ops): SDPA's flash backend with no slice at all, the speed
  reference for the fused kernels; in the flash op it is the plain baseline, as are xformers and flex.

The lse of the unfused baselines enters the slice as a constant (SDPA's flash op gives no gradient for it),
so their backward leaves out the lse term of the slice gradient and does slightly less work than ours.
Baselines that need equal head counts (SDPA's flash op, xformers) get GQA keys and values repeated to the
query heads, a copy of B·Hq·L·D elements inside the timed region.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compodistill_kernels import attention_with_alignment, attention_with_visual_slice, flash_attention
from compodistill_kernels.attention.naive import (naive_alignment_loss, naive_attention_probs,
                                                  naive_flash_attention)

OPS = ("alignment", "slice_export", "flash")
MODES = ("forward", "backward", "full")
# Baselines first and ours last: a run records ours' ratios against every baseline measured before it.
PROVIDERS = {
    "alignment": ("eager", "sdpa+slice", "xformers+slice", "flex+slice", "sdpa-flash", "ours", "ours-onepass"),
    "slice_export": ("eager", "sdpa+slice", "xformers+slice", "flex+slice", "sdpa-flash", "ours", "ours-onepass"),
    "flash": ("eager", "sdpa-flash", "xformers", "flex", "ours", "ours-onepass"),
}
OURS = "ours"
OURS_ONE_PASS = "ours-onepass"
OUR_PROVIDERS = (OURS, OURS_ONE_PASS)

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None

try:
    from torch.nn.attention import flex_attention as _flex_module
    HAS_FLEX = True
except ImportError:  # torch < 2.5
    _flex_module, HAS_FLEX = None, False

try:
    from xformers.ops import fmha as _xformers_fmha
    HAS_XFORMERS = True
except ImportError:
    _xformers_fmha, HAS_XFORMERS = None, False


def skip_reason(provider, device, mode):
    """Why `provider` cannot run in `mode` on `device` here, or None when it can."""
    if provider == OURS_ONE_PASS and mode == "forward":
        return "the forward is ours' (the one-pass provider differs in the backward only)"
    if provider.startswith("sdpa") and sdpa_kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel (needs torch >= 2.3)"
    if provider.startswith("xformers"):
        if not HAS_XFORMERS:
            return "xformers is not installed (pip install -e '.[bench]')"
        if device != "cuda":
            return "xformers memory_efficient_attention needs a CUDA GPU"
    if provider.startswith("flex"):
        if not HAS_FLEX:
            return f"FlexAttention is not in torch {torch.__version__} (needs torch >= 2.5)"
        if device != "cuda" and mode != "forward":
            return f"FlexAttention has no backward on the CPU (torch {torch.__version__})"
    return None


@dataclass
class Inputs:
    """q (B, Hq, L, D); k, v (B, Hkv, L, D); one slice layout shared by every sample of the batch."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visual_start: torch.Tensor   # (B,) long
    visual_len: int
    query_start: torch.Tensor    # (B,) long
    query_len: int
    teacher_slice: torch.Tensor  # (B, query_len, visual_len) float32
    scale: float
    starts: tuple                # (visual start, query start) as ints: the baselines slice with them, no host sync


def make_inputs(case, *, requires_grad, seed=0):
    g = torch.Generator(device=case.device).manual_seed(seed)
    shape, B, L = case.shape, case.batch, case.seq_len

    def rand(heads):
        x = torch.randn(B, heads, L, shape.head_dim, generator=g, device=case.device, dtype=case.dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = rand(shape.heads), rand(shape.kv_heads), rand(shape.kv_heads)
    vs, nv, qs, lq = case.layout()
    visual_start = torch.full((B,), vs, dtype=torch.long, device=case.device)
    query_start = torch.full((B,), qs, dtype=torch.long, device=case.device)
    # A teacher slice is a row of probabilities over the visual keys that sums to less than 1.
    scores = torch.randn(B, lq, nv + 1, generator=g, device=case.device)
    teacher = torch.softmax(scores, -1)[..., :nv].contiguous()
    return Inputs(q, k, v, visual_start, nv, query_start, lq, teacher, shape.head_dim ** -0.5, (vs, qs))


def _repeat_kv(q, k, v):
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


def _sdpa_flash(x: Inputs):
    k, v = _repeat_kv(x.q, x.k, x.v)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(x.q, k, v, is_causal=True, scale=x.scale)


def _sdpa_flash_with_lse(x: Inputs):
    """Output (differentiable) and lse (B, Hq, L) float32 from one call of PyTorch's flash kernel."""
    k, v = _repeat_kv(x.q, x.k, x.v)
    if x.q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(x.q, k, v, 0.0, True, False,
                                                                      scale=x.scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(x.q, k, v, 0.0, True,
                                                                              scale=x.scale)
    return out, lse


if HAS_XFORMERS:
    class _XformersWithLse(torch.autograd.Function):
        """xformers' forward that also hands out the lse, with its own backward; inputs (B, L, H, D)."""

        @staticmethod
        def forward(ctx, q, k, v, scale):
            bias = _xformers_fmha.attn_bias.LowerTriangularMask()
            out, lse = _xformers_fmha.memory_efficient_attention_forward_requires_grad(q, k, v, attn_bias=bias,
                                                                                       scale=scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.scale = scale
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            bias = _xformers_fmha.attn_bias.LowerTriangularMask()
            dq, dk, dv = _xformers_fmha.memory_efficient_attention_backward(
                dout.contiguous(), out, lse, q, k, v, attn_bias=bias, scale=ctx.scale)
            return dq, dk, dv, None


def _xformers_with_lse(x: Inputs):
    k, v = _repeat_kv(x.q, x.k, x.v)
    out, lse = _XformersWithLse.apply(x.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), x.scale)
    return out.transpose(1, 2), lse[..., :x.q.shape[2]]  # some xformers versions pad the lse's L


def _xformers(x: Inputs):
    k, v = _repeat_kv(x.q, x.k, x.v)
    bias = _xformers_fmha.attn_bias.LowerTriangularMask()
    out = _xformers_fmha.memory_efficient_attention(x.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                    attn_bias=bias, scale=x.scale)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _causal_block_mask(seq_len, device):
    return _flex_module.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                          seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    # FlexAttention is only fused when compiled; uncompiled it materializes the scores.
    return torch.compile(_flex_module.flex_attention, dynamic=False)


def _flex(x: Inputs, with_lse):
    fn = _compiled_flex() if x.q.is_cuda else _flex_module.flex_attention
    kwargs = dict(block_mask=_causal_block_mask(x.q.shape[2], str(x.q.device)), scale=x.scale,
                  enable_gqa=x.q.shape[1] != x.k.shape[1])
    if with_lse:
        aux_request = getattr(_flex_module, "AuxRequest", None)
        if aux_request is not None:
            kwargs["return_aux"] = aux_request(lse=True)
        else:  # torch < 2.9
            kwargs["return_lse"] = True
    with warnings.catch_warnings():
        # On the CPU the uncompiled (unfused) path is the only one with an lse; it warns that it is unfused.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        result = fn(x.q, x.k, x.v, **kwargs)
    if not with_lse:
        return result
    out, aux = result
    return out, getattr(aux, "lse", aux)


def slice_from_lse(x: Inputs, lse):
    """a[b,i,j] = (1/Hq) Σ_h exp(q_i·k_j·scale − lse_h[i]) over the query rows and visual keys, in fp32."""
    vs, qs = x.starts
    group = x.q.shape[1] // x.k.shape[1]
    rows = x.q[:, :, qs:qs + x.query_len].float()
    keys = x.k[:, :, vs:vs + x.visual_len].float().repeat_interleave(group, 1)
    scores = torch.einsum("bhid,bhjd->bhij", rows, keys) * x.scale
    return torch.exp(scores - lse[:, :, qs:qs + x.query_len, None].detach()).mean(1)


def _eager(x: Inputs, op):
    """Materialized probabilities (B, Hq, L, L), as eager attention with output_attentions keeps them."""
    if op == "flash":
        return naive_flash_attention(x.q, x.k, x.v)[0]
    probs, _ = naive_attention_probs(x.q, x.k)
    _, v = _repeat_kv(x.q, x.k, x.v)
    out = torch.matmul(probs, v)
    vs, qs = x.starts
    slc = probs[:, :, qs:qs + x.query_len, vs:vs + x.visual_len].float().mean(1)
    return out, slc


def build(op, provider, x: Inputs):
    """fn() -> tuple of outputs: (out, loss) for alignment, (out, slice) for slice_export, (out,) for
    flash; the sdpa-flash reference of the slice ops returns (out,) only."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if provider not in PROVIDERS[op]:
        raise ValueError(f"provider: expected one of {PROVIDERS[op]} for op {op!r}, got {provider!r}")
    span = (x.visual_start, x.visual_len, x.query_start, x.query_len)

    def finish(out, slc):
        if op == "alignment":
            return out, naive_alignment_loss(slc, x.teacher_slice)
        return out, slc

    if provider in OUR_PROVIDERS:
        det = provider == OURS
        if op == "alignment":
            return lambda: attention_with_alignment(x.q, x.k, x.v, x.teacher_slice, *span, deterministic=det)
        if op == "slice_export":
            return lambda: attention_with_visual_slice(x.q, x.k, x.v, *span, deterministic=det)
        return lambda: flash_attention(x.q, x.k, x.v, deterministic=det)[:1]
    if provider == "eager":
        if op == "flash":
            return lambda: (_eager(x, op),)
        return lambda: finish(*_eager(x, op))
    if provider == "sdpa-flash":
        return lambda: (_sdpa_flash(x),)
    if provider == "xformers":
        return lambda: (_xformers(x),)
    if provider == "flex":
        return lambda: (_flex(x, with_lse=False),)
    with_lse = {"sdpa+slice": _sdpa_flash_with_lse, "xformers+slice": _xformers_with_lse,
                "flex+slice": lambda x: _flex(x, with_lse=True)}[provider]

    def unfused():
        out, lse = with_lse(x)
        return finish(out, slice_from_lse(x, lse))
    return unfused


@dataclass
class Step:
    """What a benchmark times: target(*setup()) (setup untimed, None = no arguments)."""

    target: object
    setup: object = None

    def run_once(self):
        args = self.setup()[0] if self.setup is not None else ()
        return self.target(*args)


def make_step(op, provider, case, mode, seed=0):
    """The timed step of `provider` for `op` in `mode`; every step ends with a device synchronize.

    forward: the op under no_grad (inputs need no grad, as for the teacher).
    full: forward, then dq, dk, dv for a fixed random gradient of the output (and 1 for the loss, a fixed
        random gradient for the slice).
    backward: only that gradient computation; the forward runs in the untimed setup of every round.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    x = make_inputs(case, requires_grad=mode != "forward", seed=seed)
    fn = build(op, provider, x)
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)
    if mode == "forward":
        def forward():
            with torch.no_grad():
                outputs = fn()
            sync()
            return outputs
        return Step(forward), x

    g = torch.Generator(device=case.device).manual_seed(seed + 1)
    dout = torch.randn(x.q.shape, generator=g, device=case.device, dtype=case.dtype)
    second = torch.ones((), device=case.device) if op == "alignment" else \
        torch.randn(x.teacher_slice.shape, generator=g, device=case.device)

    def grads_of(outputs):
        return torch.autograd.grad(outputs, (x.q, x.k, x.v), (dout, second)[:len(outputs)])

    if mode == "full":
        def full():
            grads = grads_of(fn())
            sync()
            return grads
        return Step(full), x

    def forward_untimed():
        outputs = fn()
        sync()
        return (outputs,), {}

    def backward(outputs):
        grads = grads_of(outputs)
        sync()
        return grads
    return Step(backward, forward_untimed), x


def attention_flops(batch, heads, seq_len, head_dim, mode, causal=True):
    """docs/kernels.md: forward 4·B·H·L²·D (halved when causal); backward 2.5× forward."""
    fwd = 4 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
    return {"forward": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}[mode]
