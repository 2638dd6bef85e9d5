"""Attention providers for the benchmarks: ours and the baselines, each as a zero-argument callable
for a mode (forward, backward, full). The eager baseline is the naive reference from the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compodistill_kernels import attention_with_alignment, attention_with_visual_slice, flash_attention
from compodistill_kernels.attention.naive import naive_alignment_loss, naive_attention_probs

from .shapes import PROMPT_TOKENS, VISUAL_TOKENS, layout

PROVIDERS = ("ours-align", "ours-flash", "ours-slice-export", "eager-align", "sdpa-flash",
             "sdpa-flash+slice")


def make_inputs(shape, batch, seq_len, dtype, device, seed=0, visual_tokens=VISUAL_TOKENS, prompt=PROMPT_TOKENS):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q = rand(batch, shape.heads, seq_len, shape.head_dim)
    k = rand(batch, shape.kv_heads, seq_len, shape.head_dim)
    v = rand(batch, shape.kv_heads, seq_len, shape.head_dim)
    vs, nv, qs, lq = layout(seq_len, visual_tokens, prompt)
    starts = (torch.full((batch,), vs, device=device), torch.full((batch,), qs, device=device))
    teacher = torch.rand(batch, lq, nv, generator=g).to(device)
    return q, k, v, starts, (nv, lq), teacher


def _sdpa(q, k, v):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)


def _flash_lse(q, k, v):
    """The log-sum-exp from PyTorch's own flash attention op (no gradient)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.detach().repeat_interleave(group, 1), v.detach().repeat_interleave(group, 1)
    with torch.no_grad():
        if q.is_cuda:
            return torch.ops.aten._scaled_dot_product_flash_attention(q.detach(), k, v, is_causal=True)[1]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.detach(), k, v, is_causal=True)[1]


def _slice_from_lse(q, k, lse, vs, nv, qs, lq, scale):
    """Unfused alternative: the head-mean visual slice recomputed in PyTorch from q, k and the lse."""
    group = q.shape[1] // k.shape[1]
    qr = q[:, :, qs:qs + lq].float()
    kv = k[:, :, vs:vs + nv].float().repeat_interleave(group, dim=1)
    p = torch.exp(torch.einsum("bhid,bhjd->bhij", qr, kv) * scale - lse[:, :, qs:qs + lq, None])
    return p.mean(dim=1)


def build(provider, q, k, v, starts, lens, teacher):
    """Returns f() -> (tensor to backprop or None, grad inputs) for the provider."""
    vs_t, qs_t = starts
    nv, lq = lens
    vs, qs = int(vs_t[0]), int(qs_t[0])
    scale = q.shape[-1] ** -0.5

    if provider == "ours-align":
        def f():
            out, loss = attention_with_alignment(q, k, v, teacher, vs_t, nv, qs_t, lq)
            return out.float().sum() * 1e-3 + loss
    elif provider == "ours-flash":
        def f():
            out, _ = flash_attention(q, k, v)
            return out.float().sum() * 1e-3
    elif provider == "ours-slice-export":
        def f():
            out, slc = attention_with_visual_slice(q, k, v, vs_t, nv, qs_t, lq)
            return out.float().sum() * 1e-3 + slc.sum()
    elif provider == "eager-align":
        def f():
            probs, _ = naive_attention_probs(q, k)
            group = q.shape[1] // v.shape[1]
            out = torch.matmul(probs, v.repeat_interleave(group, dim=1))
            slc = probs[:, :, qs:qs + lq, vs:vs + nv].float().mean(dim=1)
            return out.float().sum() * 1e-3 + naive_alignment_loss(slc, teacher)
    elif provider == "sdpa-flash":
        def f():
            return _sdpa(q, k, v).float().sum() * 1e-3
    elif provider == "sdpa-flash+slice":
        def f():
            # out from SDPA (flash); lse from the flash op, detached: the lse term of the gradient is
            # dropped, so this baseline does slightly less work than the exact fused loss
            out = _sdpa(q, k, v)
            lse = _flash_lse(q, k, v)
            slc = _slice_from_lse(q, k, lse, vs, nv, qs, lq, scale)
            return out.float().sum() * 1e-3 + naive_alignment_loss(slc, teacher)
    else:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    return f


def attention_flops(batch, heads, seq_len, head_dim, mode, causal=True):
    """DESIGN.md §3: forward 4·B·H·L²·D (halved when causal); backward 2.5× forward."""
    fwd = 4 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
    return {"forward": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}[mode]
