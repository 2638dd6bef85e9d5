"""PyTorch backend: the same semantics as the Triton kernels, for CPUs and as a readable second opinion.

Memory: the attention is computed in blocks of query rows under activation checkpointing, so at most
one block's (B, Hq, C, L) scores exist at a time, in the forward and in the backward alike; nothing
L×L is kept for the backward, which recomputes each block from q, k, v. As in the kernels, the visual
slice is recomputed from q, the visual keys and the log-sum-exp: P = exp(q·kᵀ·scale − lse).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .validate import SliceMode

# Elements of one block of scores (B·Hq·C·L); 2^24 fp32 is 64 MiB.
SCORE_BLOCK_ELEMENTS = 1 << 24


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_block(batch_heads, cols):
    return max(1, min(4096, SCORE_BLOCK_ELEMENTS // max(1, batch_heads * cols)))


def _safe_lse(scores):
    """logsumexp over the last dim that is −inf (with zero gradient) for a row of all −inf."""
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    total = torch.exp(scores - m).sum(dim=-1)
    lse = m.squeeze(-1) + torch.log(total.clamp_min(torch.finfo(total.dtype).tiny))
    return torch.where(total > 0, lse, torch.full_like(lse, float("-inf")))


def _probs(scores, lse):
    """exp(scores − lse), 0 where lse = −inf (no allowed key) or the score is masked."""
    finite = torch.isfinite(lse)
    return torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse))[..., None]) * finite[..., None]


def _attention_block(q_blk, k, v, row0, scale, causal, key_padding_mask):
    """q_blk (B, Hkv, G, C, D), k/v (B, Hkv, L, D) -> out (B, Hkv, G, C, D), lse (B, Hkv, G, C)."""
    C = q_blk.shape[3]
    ncols = min(k.shape[2], row0 + C) if causal else k.shape[2]
    k, v = k[:, :, :ncols], v[:, :, :ncols]
    scores = torch.einsum("bhgcd,bhjd->bhgcj", q_blk, k) * scale
    allowed = torch.ones(C, ncols, dtype=torch.bool, device=q_blk.device)
    if causal:
        rows = torch.arange(row0, row0 + C, device=q_blk.device)
        allowed = torch.arange(ncols, device=q_blk.device)[None, :] <= rows[:, None]
    allowed = allowed.expand(q_blk.shape[0], 1, 1, C, ncols)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, None, :ncols]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = _safe_lse(scores)
    out = torch.einsum("bhgcj,bhjd->bhgcd", _probs(scores, lse), v)
    return out, lse


def flash_forward(q, k, v, scale, causal, key_padding_mask):
    """out (B, Hq, L, D) in q's dtype, lse (B, Hq, L) float32 (float64 for float64 inputs)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    cd = _compute_dtype(q.dtype)
    qg = q.to(cd).view(B, Hkv, Hq // Hkv, L, D)
    kc, vc = k.to(cd), v.to(cd)
    step = _rows_per_block(B * Hq, L)
    outs, lses = [], []
    for row0 in range(0, L, step):
        args = (qg[:, :, :, row0:row0 + step], kc, vc, row0, scale, causal, key_padding_mask)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = checkpoint(_attention_block, *args, use_reentrant=False)
        else:
            out, lse = _attention_block(*args)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, L, D).to(q.dtype)
    lse = torch.cat(lses, dim=3).reshape(B, Hq, L)
    return out, lse


def _gather_rows(x, index):
    """x (B, H, L, ...) -> x[b, :, index[b]] stacked, (B, H, N, ...); padding (−1) reads position 0."""
    idx = index.long().clamp_min(0)
    n = idx.shape[1]
    shape = (x.shape[0], x.shape[1], n) + x.shape[3:]
    idx = idx.view(idx.shape[0], 1, n, *([1] * (x.dim() - 3))).expand(shape)
    return torch.gather(x, 2, idx)


def _slice_block(q_rows, k_vis, lse_rows, row_pos, col_pos, row_ok, col_ok, scale, causal):
    """Head-mean visual probabilities for a block of slice rows.

    q_rows (B, Hkv, G, C, D), k_vis (B, Hkv, Nv, D), lse_rows (B, Hkv, G, C), row_pos (B, C) and
    col_pos (B, Nv) absolute positions, row_ok (B, C) real row, col_ok (B, Nv) real and unpadded key
    -> (B, C, Nv), exactly 0 outside row_ok × col_ok.
    """
    scores = torch.einsum("bhgcd,bhjd->bhgcj", q_rows, k_vis) * scale
    allowed = row_ok[:, :, None] & col_ok[:, None, :]
    if causal:
        allowed = allowed & (col_pos[:, None, :] <= row_pos[:, :, None])
    probs = _probs(scores, lse_rows) * allowed[:, None, None]
    return probs.mean(dim=(1, 2))


def _slice_loss_block(q_rows, k_vis, lse_rows, row_pos, col_pos, row_ok, col_ok, scale, causal, teacher, weight,
                      eps):
    """Σ_rows w·(1 − cos(student row, teacher row)) for one block of slice rows."""
    a = _slice_block(q_rows, k_vis, lse_rows, row_pos, col_pos, row_ok, col_ok, scale, causal)
    cos = F.cosine_similarity(a, teacher, dim=-1, eps=eps)
    return (weight * (1.0 - cos)).sum()


def visual_slice_forward(q, k, v, scale, causal, key_padding_mask, spec, mode, teacher=None, eps=1e-8):
    """By SliceMode: ROWS -> (out, slc (B, Nq, Nv)); MEAN -> (out, slc (B, Nv)); ALIGN -> (out, loss)."""
    out, lse = flash_forward(q, k, v, scale, causal, key_padding_mask)
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    cd = _compute_dtype(q.dtype)
    device = q.device
    Lq = spec.query_len
    row_pos_all, col_pos = spec.query_index.long(), spec.visual_index.long()
    row_ok_all = (row_pos_all >= 0) & (row_pos_all < L)
    col_ok = (col_pos >= 0) & (col_pos < L)
    q_rows = _gather_rows(q.to(cd), row_pos_all).view(B, Hkv, Hq // Hkv, Lq, D)
    lse_rows = _gather_rows(lse, row_pos_all).view(B, Hkv, Hq // Hkv, Lq)
    k_vis = _gather_rows(k.to(cd), col_pos)
    if key_padding_mask is not None:
        col_ok = col_ok & torch.gather(key_padding_mask, 1, col_pos.clamp(0, L - 1))
    weight = spec.row_weight.to(cd) if spec.row_weight is not None else torch.ones(B, Lq, dtype=cd, device=device)
    if teacher is not None:
        # the teacher's padding entries are ignored whatever they hold (NaN included)
        real = (spec.query_index >= 0)[:, :, None] & (spec.visual_index >= 0)[:, None, :]
        teacher = torch.where(real, teacher.to(cd), torch.zeros((), dtype=cd, device=device))
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    run = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if needs_grad else (lambda f, *a: f(*a))

    step = _rows_per_block(B * Hq, spec.visual_len)
    pieces = []
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        common = (q_rows[:, :, :, r0:r1], k_vis, lse_rows[:, :, :, r0:r1], row_pos_all[:, r0:r1], col_pos,
                  row_ok_all[:, r0:r1], col_ok, scale, causal)
        if mode == SliceMode.ALIGN:
            pieces.append(run(_slice_loss_block, *common, teacher[:, r0:r1], weight[:, r0:r1], eps))
        else:
            a = run(_slice_block, *common)
            pieces.append(a if mode == SliceMode.ROWS else torch.einsum("bi,bij->bj", weight[:, r0:r1], a))
    if mode == SliceMode.ROWS:
        return out, torch.cat(pieces, dim=1)
    if mode == SliceMode.MEAN:
        total = weight.sum(dim=1, keepdim=True)
        return out, sum(pieces) / torch.where(total > 0, total, torch.ones_like(total))
    total = weight.sum()
    return out, sum(pieces) / torch.where(total > 0, total, torch.ones_like(total))
