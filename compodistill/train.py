"""DEMO of the compodistill_kernels attention-alignment kernels, runnable as `python -m compodistill.train`.

The three-stage CompoDistill trainer (models, data, stages) is not implemented yet. Until it is, this
entry point runs a small, self-contained demo of the fused kernels:

1. A random "teacher" attention layer (4 heads) over a toy sequence: an 8-token prompt, 24 visual
   tokens, then text. Sample 1 is left-padded (key_padding_mask), so the per-sample offsets differ.
2. The teacher's head-mean attention of the text rows over the visual tokens is exported with
   `attention_with_visual_slice` under `torch.no_grad()`.
3. A "student" layer (learnable q/k projections, 2 query heads sharing 1 key/value head, GQA) is
   trained with Adam on the fused cosine loss of `attention_with_alignment`. No L×L attention matrix
   is kept for the backward.

The run fails (non-zero exit) if the loss is not finite or does not drop by a clear margin.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm import tqdm

from compodistill_kernels import attention_with_alignment, attention_with_visual_slice

BANNER = (
    "=" * 78 + "\n"
    "CompoDistill: KERNELS DEMO. The three-stage distillation trainer is not implemented yet;\n"
    "this trains a toy student attention layer to match a toy teacher's visual attention with\n"
    "compodistill_kernels.attention_with_alignment. No models or data are loaded.\n"
    + "=" * 78
)

# Toy sequence layout: [left padding][prompt][visual tokens][text rows (query rows)][rest].
BATCH = 2
SEQ_LEN = 96
PROMPT_LEN = 8
VISUAL_LEN = 24
QUERY_LEN = 48
LEFT_PAD = (0, 10)  # per sample; sample 1 is left-padded
HIDDEN = 64
HEAD_DIM = 32
TEACHER_HEADS = 4
STUDENT_Q_HEADS, STUDENT_KV_HEADS = 2, 1

# The loss must end below this fraction of its starting value.
MAX_FINAL_FRACTION = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m compodistill.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="Adam steps on the alignment loss (default 150)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="kernel backend (default auto: triton on CUDA, torch otherwise)")
    p.add_argument("--lr", type=float, default=3e-2, help="Adam learning rate (default 3e-2)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def make_batch(gen, device):
    """Hidden states (B, L, HIDDEN), key_padding_mask (B, L) and the per-sample slice offsets."""
    x = torch.randn(BATCH, SEQ_LEN, HIDDEN, generator=gen).to(device)
    mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.bool)
    for b, pad in enumerate(LEFT_PAD):
        mask[b, :pad] = False
    pad = torch.tensor(LEFT_PAD, dtype=torch.int64)
    visual_start = pad + PROMPT_LEN
    query_start = visual_start + VISUAL_LEN
    assert int((query_start + QUERY_LEN).max()) <= SEQ_LEN
    return x, mask.to(device), visual_start.to(device), query_start.to(device)


def heads(x, w, n_heads):
    """(B, L, HIDDEN) @ (HIDDEN, n_heads·D) -> (B, n_heads, L, D)."""
    B, L, _ = x.shape
    return (x @ w).view(B, L, n_heads, HEAD_DIM).transpose(1, 2)


def bytes_kept_per_layer(dtype_bytes=4):
    """Arithmetic from the demo shapes (not a measurement) for one student attention layer.

    Eager attention with output_attentions keeps B·H·L² probabilities; the fused Triton path keeps the
    log-sum-exp (B·H·L float32), the teacher slice (B·rows·Nv float32) and four floats per slice row.
    q, k, v and out are kept by both and left out.
    """
    eager = BATCH * STUDENT_Q_HEADS * SEQ_LEN * SEQ_LEN * dtype_bytes
    fused = 4 * (BATCH * STUDENT_Q_HEADS * SEQ_LEN + BATCH * QUERY_LEN * VISUAL_LEN + 4 * BATCH * QUERY_LEN)
    return eager, fused


def main(argv=None):
    """Run the demo; returns {"initial_loss", "final_loss", "losses"}. Raises SystemExit on failure."""
    args = parse_args(argv)
    print(BANNER)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x, mask, visual_start, query_start = make_batch(gen, device)
    slice_args = (visual_start, VISUAL_LEN, query_start, QUERY_LEN)
    kw = dict(key_padding_mask=mask, backend=args.backend)

    # Teacher: fixed random projections; a larger scale gives peakier attention to imitate.
    t_scale = 2.0 / math.sqrt(HIDDEN)
    wq_t, wk_t, wv_t = (torch.randn(HIDDEN, TEACHER_HEADS * HEAD_DIM, generator=gen).to(device) * t_scale
                        for _ in range(3))
    with torch.no_grad():
        _, teacher_slice = attention_with_visual_slice(
            heads(x, wq_t, TEACHER_HEADS), heads(x, wk_t, TEACHER_HEADS), heads(x, wv_t, TEACHER_HEADS),
            *slice_args, reduce="rows", **kw)

    # Student: learnable q/k projections with a different head layout (GQA); v is fixed.
    s_scale = 0.5 / math.sqrt(HIDDEN)
    wq = (torch.randn(HIDDEN, STUDENT_Q_HEADS * HEAD_DIM, generator=gen) * s_scale).to(device).requires_grad_()
    wk = (torch.randn(HIDDEN, STUDENT_KV_HEADS * HEAD_DIM, generator=gen) * s_scale).to(device).requires_grad_()
    wv = (torch.randn(HIDDEN, STUDENT_KV_HEADS * HEAD_DIM, generator=gen) * s_scale).to(device)
    v = heads(x, wv, STUDENT_KV_HEADS)
    opt = torch.optim.Adam([wq, wk], lr=args.lr)

    eager, fused = bytes_kept_per_layer()
    print(f"device={device} backend={args.backend} seed={args.seed} steps={args.steps}")
    print(f"shapes: B={BATCH} L={SEQ_LEN} D={HEAD_DIM}; teacher H={TEACHER_HEADS}; student Hq={STUDENT_Q_HEADS} "
          f"Hkv={STUDENT_KV_HEADS}; slice rows={QUERY_LEN} x visual={VISUAL_LEN}; left pad={LEFT_PAD}")
    print(f"attention memory kept per layer for this shape (arithmetic from shapes, not a measurement):\n"
          f"  eager (B*H*L^2 fp32 probabilities): {eager:,} bytes\n"
          f"  fused (lse + teacher slice + 4 floats/row): {fused:,} bytes")

    losses = []
    bar = tqdm(range(args.steps), desc="align", file=sys.stdout)
    for step in bar:
        q, k = heads(x, wq, STUDENT_Q_HEADS), heads(x, wk, STUDENT_KV_HEADS)
        _, loss = attention_with_alignment(q, k, v, teacher_slice, *slice_args, **kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{losses[-1].item():.4f}")
    bar.close()

    with torch.no_grad():
        q, k = heads(x, wq, STUDENT_Q_HEADS), heads(x, wk, STUDENT_KV_HEADS)
        _, final = attention_with_alignment(q, k, v, teacher_slice, *slice_args, **kw)
    initial_loss, final_loss = losses[0].item(), final.item()
    print(f"alignment loss (1 - cos): start {initial_loss:.4f} -> final {final_loss:.4f}")

    if not (math.isfinite(initial_loss) and math.isfinite(final_loss)):
        raise SystemExit(f"FAILED: non-finite alignment loss (start {initial_loss}, final {final_loss})")
    if not final_loss < MAX_FINAL_FRACTION * initial_loss:
        raise SystemExit(f"FAILED: loss did not drop below {MAX_FINAL_FRACTION:.0%} of its start "
                         f"({initial_loss:.4f} -> {final_loss:.4f})")
    print("OK: the student's visual attention moved toward the teacher's.")
    return {"initial_loss": initial_loss, "final_loss": final_loss, "losses": [t.item() for t in losses]}


if __name__ == "__main__":
    main()
