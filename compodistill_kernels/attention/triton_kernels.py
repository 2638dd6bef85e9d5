"""Triton kernels: flash attention forward/backward with the visual-slice terms folded in.

Notation (docs/kernels.md): P_h = exp(S_h − lse_h), S_h = q kᵀ · scale; the head-mean visual slice is
a[b, i, j] = (1/H) Σ_h P_h[qs_b + i, vs_b + j]; G = ∂L/∂a. Scores are kept in base 2: qk_scale =
scale · log2(e) and lse2 = lse · log2(e), so P = exp2(q·k · qk_scale − lse2), one FMA and one exp2.

Causal split: the loops over key tiles (forward, dQ) and query tiles (dK/dV) run in two stages. Inner
tiles lie entirely on the visible side of the diagonal and inside [0, L), so they skip the per-element
causal and bounds masks; only the edge tiles (those crossing the diagonal, and the ragged last tile)
pay for them. The padding mask, when given, applies to both stages.

Rows past L are loaded with lse = +inf, so their P = exp2(−inf) = 0 without a mask; the lse of a row
that has no allowed key is −inf, and every key of such a row is masked out by the causal or padding
mask, so a select (never a multiply) zeroes its P.

The slice kernels take the slice mode (validate.SliceMode) as the compile-time MODE and compare it with
MODE_ROWS, MODE_MEAN and MODE_ALIGN below.

Every kernel takes contiguous (B, H, L, D) tensors. The slice's rows and columns are given by index
tensors QI (B, Lq) and VI (B, Nv) of sequence positions, −1 for padding: the slice kernels gather query
rows and key tiles by index. The backward kernels, which walk the sequence in order, look positions up
in the inverse maps ROW_OF_POS / COL_OF_POS (B, L) (slice row / column of a position, or −1) and skip
tiles outside each sample's position ranges QRANGE / VRANGE (B, 2) = [lo, hi) without reading the maps.
"""

import triton
import triton.language as tl

from .validate import SliceMode

LOG2E = 1.4426950408889634  # host side: qk_scale = scale * LOG2E
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
MODE_ROWS = tl.constexpr(SliceMode.ROWS.value)
MODE_MEAN = tl.constexpr(SliceMode.MEAN.value)
MODE_ALIGN = tl.constexpr(SliceMode.ALIGN.value)


@triton.jit
def _fwd_key_tiles(acc, l_i, m_i, q, K, V, KPM, kv_base, mask_base, offs_m, offs_d, d_ok, L, D, qk_scale, lo, hi,
                   EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, l, m) over the key tiles [lo, hi). EDGE tiles may hold keys past L or,
    under CAUSAL, keys after some query row of the tile; all other tiles are fully visible."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if EDGE:
            n_ok = offs_n < L
            kt = tl.load(K + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
        else:
            kt = tl.load(K + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        if EDGE:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            if HAS_MASK:
                valid = valid & (tl.load(KPM + mask_base + offs_n, mask=n_ok, other=0) != 0)[None, :]
            qk = tl.where(valid, qk, float("-inf"))
        elif HAS_MASK:
            qk = tl.where((tl.load(KPM + mask_base + offs_n) != 0)[None, :], qk, float("-inf"))
        # qk_scale > 0: max(qk)·scale = max(qk·scale), and qk·scale − m is one FMA per score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_shift = m_new
        if HAS_MASK:
            # a row that has seen no allowed key yet keeps m = −inf; shift by 0 so exp2 gives 0, not NaN.
            # Without a padding mask every row has an allowed key in the first tile it visits.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * qk_scale - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, OUT, LSE, KPM,
                     stride_qb, stride_qh, stride_kb, stride_kh, stride_mb,
                     H, GROUP, L, D, qk_scale,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = b * stride_qb + h * stride_qh
    kv_base = b * stride_kb + (h // GROUP) * stride_kh
    mask_base = b * stride_mb
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < L) & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        # keys < row0 <= every row of the tile: whole key tiles below row0 are visible
        inner_hi = (row0 // BLOCK_N) * BLOCK_N
        edge_hi = tl.minimum(L, row0 + BLOCK_M)
    else:
        inner_hi = (L // BLOCK_N) * BLOCK_N
        edge_hi = L
    acc, l_i, m_i = _fwd_key_tiles(acc=acc, l_i=l_i, m_i=m_i, q=q, K=K, V=V, KPM=KPM, kv_base=kv_base,
                                   mask_base=mask_base, offs_m=offs_m, offs_d=offs_d, d_ok=d_ok, L=L, D=D,
                                   qk_scale=qk_scale, lo=0, hi=inner_hi, EDGE=False, CAUSAL=CAUSAL,
                                   HAS_MASK=HAS_MASK, PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    acc, l_i, m_i = _fwd_key_tiles(acc=acc, l_i=l_i, m_i=m_i, q=q, K=K, V=V, KPM=KPM, kv_base=kv_base,
                                   mask_base=mask_base, offs_m=offs_m, offs_d=offs_d, d_ok=d_ok, L=L, D=D,
                                   qk_scale=qk_scale, lo=inner_hi, hi=edge_hi, EDGE=True, CAUSAL=CAUSAL,
                                   HAS_MASK=HAS_MASK, PRECISION=PRECISION, BLOCK_N=BLOCK_N)

    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    # natural-log lse = ln2 · (m + log2 l); −inf for a row with no allowed key
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    m_ok = offs_m < L
    tl.store(OUT + q_base + offs_m[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * L + offs_m, lse, mask=m_ok)


@triton.jit
def _slice_tile(VI, QI, KPM, stride_mb, L, Lq, Nv, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (slice-row tile, visual-column tile) of sample b, from the (rows, cols, batch) grid:
    slice indices, absolute positions gathered from the index tensors, which rows and columns are real
    (inside the slice, not padding, inside [0, L)), which pairs may attend (real, causal, key not padded),
    and `live`: False when no pair of the tile can attend (the causal mask hides every column after every
    row, or the tile is all padding), so the per-head work can be skipped. Positions outside [0, L) are
    masked, so unchecked indices can never read outside the tensors."""
    b = tl.program_id(2).to(tl.int64)
    r0 = tl.program_id(0) * BLOCK_M
    c0 = tl.program_id(1) * BLOCK_N
    offs_r = r0 + tl.arange(0, BLOCK_M)
    offs_c = c0 + tl.arange(0, BLOCK_N)
    pos_m = tl.load(QI + b * Lq + offs_r, mask=offs_r < Lq, other=-1)
    pos_n = tl.load(VI + b * Nv + offs_c, mask=offs_c < Nv, other=-1)
    row_ok = (pos_m >= 0) & (pos_m < L)
    col_ok = (pos_n >= 0) & (pos_n < L)
    valid = row_ok[:, None] & col_ok[None, :]
    first_col = tl.min(tl.where(col_ok, pos_n, L), 0)
    last_row = tl.max(tl.where(row_ok, pos_m, -1), 0)
    if CAUSAL:
        valid = valid & (pos_n[None, :] <= pos_m[:, None])
        # the tile's earliest visual column against its latest slice row
        live = first_col <= last_row
    else:
        live = (first_col < L) & (last_row >= 0)
    if HAS_MASK:
        key_real = tl.load(KPM + b * stride_mb + pos_n, mask=col_ok, other=0)
        valid = valid & (key_real[None, :] != 0)
    return b, offs_r, offs_c, row_ok, col_ok, pos_m, pos_n, valid, live


@triton.jit
def _head_probs(Q, K, LSE, b, head, pos_m, pos_n, row_ok, col_ok, valid, offs_d, d_ok, GROUP, D, L, qk_scale,
                stride_qb, stride_qh, stride_kb, stride_kh, H, PRECISION: tl.constexpr):
    """P_h[rows, visual cols] of one head (BLOCK_M, BLOCK_N), 0 outside `valid`."""
    q = tl.load(Q + b * stride_qb + head * stride_qh + pos_m[:, None] * D + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kt = tl.load(K + b * stride_kb + (head // GROUP) * stride_kh + pos_n[None, :] * D + offs_d[:, None],
                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + (b * H + head) * L + pos_m, mask=row_ok, other=float("inf")) * _LOG2E
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse2[:, None]
    return tl.where(valid, tl.exp2(s), 0.0)


@triton.jit
def _head_mean_slice(Q, K, LSE, b, pos_m, pos_n, row_ok, col_ok, valid, live, offs_d, d_ok, H, GROUP, D, L,
                     qk_scale, inv_h, stride_qb, stride_qh, stride_kb, stride_kh, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """a = (1/H) Σ_h P_h[rows, visual cols] for one tile; 0 without any head's work when not `live`."""
    a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for head in range(0, tl.where(live, H, 0)):
        a += _head_probs(Q=Q, K=K, LSE=LSE, b=b, head=head, pos_m=pos_m, pos_n=pos_n, row_ok=row_ok, col_ok=col_ok,
                         valid=valid, offs_d=offs_d, d_ok=d_ok, GROUP=GROUP, D=D, L=L, qk_scale=qk_scale,
                         stride_qb=stride_qb, stride_qh=stride_qh, stride_kb=stride_kb, stride_kh=stride_kh, H=H,
                         PRECISION=PRECISION)
    return a * inv_h


@triton.jit
def _slice_fwd_kernel(Q, K, LSE, KPM, VI, QI, ROW_WEIGHT, TEACHER, SLC, ROW_TILE_SUMS, ROW_STATS,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_mb,
                      H, GROUP, L, D, Lq, Nv, qk_scale, inv_h,
                      CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
                      PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head-mean visual slice a for one (slice-row tile, visual-column tile), over all heads.

    MODE_ROWS: write a into SLC (B, Lq, Nv).
    MODE_MEAN: write Σ_rows w·a into ROW_TILE_SUMS (B, n_row_tiles, Nv).
    MODE_ALIGN: write a into SLC (the backward reads it back instead of recomputing every head's P) and
    this column tile's share of a·t, |a|², |t|² into ROW_STATS (B, n_col_tiles, Lq, 3).
    Padding rows and columns (index −1) give a = 0; the teacher is read on real entries only.
    """
    b, offs_r, offs_c, row_ok, col_ok, pos_m, pos_n, valid, live = _slice_tile(
        VI=VI, QI=QI, KPM=KPM, stride_mb=stride_mb, L=L, Lq=Lq, Nv=Nv, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    a = _head_mean_slice(Q=Q, K=K, LSE=LSE, b=b, pos_m=pos_m, pos_n=pos_n, row_ok=row_ok, col_ok=col_ok,
                         valid=valid, live=live, offs_d=offs_d, d_ok=d_ok, H=H, GROUP=GROUP, D=D, L=L,
                         qk_scale=qk_scale, inv_h=inv_h, stride_qb=stride_qb, stride_qh=stride_qh,
                         stride_kb=stride_kb, stride_kh=stride_kh, PRECISION=PRECISION, BLOCK_M=BLOCK_M,
                         BLOCK_N=BLOCK_N)
    in_r = offs_r < Lq
    in_c = offs_c < Nv
    tile = b * Lq * Nv + offs_r[:, None] * Nv + offs_c[None, :]
    tile_ok = in_r[:, None] & in_c[None, :]
    if MODE == MODE_ROWS:
        tl.store(SLC + tile, a, mask=tile_ok)
    if MODE == MODE_MEAN:
        w = tl.load(ROW_WEIGHT + b * Lq + offs_r, mask=in_r, other=0.0)
        tl.store(ROW_TILE_SUMS + (b * tl.num_programs(0) + tl.program_id(0)) * Nv + offs_c,
                 tl.sum(a * w[:, None], 0), mask=in_c)
    if MODE == MODE_ALIGN:
        tl.store(SLC + tile, a, mask=tile_ok)
        # the teacher's padding entries are never read, so they may hold anything
        t = tl.load(TEACHER + tile, mask=tile_ok & (pos_m >= 0)[:, None] & (pos_n >= 0)[None, :],
                    other=0.0).to(tl.float32)
        stats = ROW_STATS + ((b * tl.num_programs(1) + tl.program_id(1)) * Lq + offs_r) * 3
        tl.store(stats, tl.sum(a * t, 1), mask=in_r)
        tl.store(stats + 1, tl.sum(a * a, 1), mask=in_r)
        tl.store(stats + 2, tl.sum(t * t, 1), mask=in_r)


@triton.jit
def _bwd_preprocess_kernel(OUT, DO, DLSE, DELTA, L, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Δ = rowsum(dO ∘ O) − dlse: the lse output's gradient enters dS = P·(dP − Δ) through Δ."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    mask = m_ok[:, None] & (offs_d[None, :] < D)
    ptr = bh * L * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(OUT + ptr, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1) - tl.load(DLSE + bh * L + offs_m, mask=m_ok, other=0.0)
    tl.store(DELTA + bh * L + offs_m, delta, mask=m_ok)


@triton.jit
def _slice_bwd_kernel(Q, K, LSE, KPM, VI, QI, DSLICE, ROW_SHARE, DMEAN, TEACHER_COEF, STUDENT_COEF, TEACHER, SLC,
                      G, DELTA_PART,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_mb,
                      H, GROUP, L, D, Lq, Nv, qk_scale, inv_h,
                      CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MODE: tl.constexpr,
                      PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """For one (slice-row tile, visual-column tile): writes G/H = (∂L/∂a)/H into G (B, Lq, Nv) and, per
    head, this tile's share of (1/H) Σ_j P_h[i, j] G[i, j] into DELTA_PART (B, H, n_col_tiles, Lq); the
    launcher adds its sum over column tiles to Δ. The inputs are the fields of triton_impl.SliceGrad:

    MODE_ROWS:  G = DSLICE (the slice's upstream gradient).
    MODE_MEAN:  G[i, j] = ROW_SHARE[i] · DMEAN[j].
    MODE_ALIGN: G[i, j] = TEACHER_COEF[i] · t[i, j] + STUDENT_COEF[i] · a[i, j], a read from SLC (written
    by the forward), so each head's P is computed once per tile.
    A tile hidden by the causal mask has P = 0 for every head: its shares are 0 without computing P.
    """
    b, offs_r, offs_c, row_ok, col_ok, pos_m, pos_n, valid, live = _slice_tile(
        VI=VI, QI=QI, KPM=KPM, stride_mb=stride_mb, L=L, Lq=Lq, Nv=Nv, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    in_r = offs_r < Lq
    in_c = offs_c < Nv
    tile = b * Lq * Nv + offs_r[:, None] * Nv + offs_c[None, :]
    tile_ok = in_r[:, None] & in_c[None, :]
    if MODE == MODE_ROWS:
        g = tl.load(DSLICE + tile, mask=tile_ok, other=0.0).to(tl.float32)
    if MODE == MODE_MEAN:
        share = tl.load(ROW_SHARE + b * Lq + offs_r, mask=in_r, other=0.0)
        g = share[:, None] * tl.load(DMEAN + b * Nv + offs_c, mask=in_c, other=0.0)[None, :]
    if MODE == MODE_ALIGN:
        c_t = tl.load(TEACHER_COEF + b * Lq + offs_r, mask=in_r, other=0.0)
        c_a = tl.load(STUDENT_COEF + b * Lq + offs_r, mask=in_r, other=0.0)
        a = tl.load(SLC + tile, mask=tile_ok, other=0.0)
        t = tl.load(TEACHER + tile, mask=tile_ok & (pos_m >= 0)[:, None] & (pos_n >= 0)[None, :],
                    other=0.0).to(tl.float32)
        g = c_t[:, None] * t + c_a[:, None] * a
    g = g * inv_h
    tl.store(G + tile, g, mask=tile_ok)
    n_live = tl.where(live, H, 0)
    part = DELTA_PART + (b * H * tl.num_programs(1) + tl.program_id(1)) * Lq + offs_r
    part_stride = tl.num_programs(1) * Lq
    for head in range(0, n_live):
        p = _head_probs(Q=Q, K=K, LSE=LSE, b=b, head=head, pos_m=pos_m, pos_n=pos_n, row_ok=row_ok, col_ok=col_ok,
                        valid=valid, offs_d=offs_d, d_ok=d_ok, GROUP=GROUP, D=D, L=L, qk_scale=qk_scale,
                        stride_qb=stride_qb, stride_qh=stride_qh, stride_kb=stride_kb, stride_kh=stride_kh, H=H,
                        PRECISION=PRECISION)
        tl.store(part + head * part_stride, tl.sum(p * g, 1), mask=in_r)
    for head in range(n_live, H):
        tl.store(part + head * part_stride, tl.zeros([BLOCK_M], tl.float32), mask=in_r)


@triton.jit
def _dkdv_query_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, G, DQ_ACC, ROW_OF_POS, q_base, row_base, g_base, map_base,
                      offs_n, offs_d, d_ok, key_ok, col, col_ok, tile_visual, q_lo, q_hi, L, D, Nv, qk_scale, lo, hi,
                      EDGE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK (unscaled) and dV of one key tile over the query tiles [lo, hi) of one head; with
    ATOMIC_DQ also add each query tile's dS·K (unscaled) into the fp32 accumulator DQ_ACC.

    Tiles are transposed: rows are keys, columns are queries. EDGE tiles cross the causal diagonal.
    Key rows past L (the ragged last key tile) only feed dK/dV rows that are never stored, and have k = 0,
    so they add nothing to dQ.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)
        do = tl.load(DO + q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                     other=0.0)
        lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
        if EDGE:
            pt = tl.where(key_ok[:, None] & (offs_n[:, None] <= offs_m[None, :]), pt, 0.0)
        elif HAS_MASK:
            pt = tl.where(key_ok[:, None], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if HAS_G:
            if tile_visual & (start_m < q_hi) & (start_m + BLOCK_M > q_lo):
                row = tl.load(ROW_OF_POS + map_base + offs_m, mask=m_ok, other=-1)
                g_ok = col_ok[:, None] & (row >= 0)[None, :]
                dpt += tl.load(G + g_base + row[None, :] * Nv + col[:, None], mask=g_ok, other=0.0)
        # dS = P · (dP + G/H − Δ)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            # dQ_i += Σ_j dS[i, j] K_j, summed over the key tiles by atomics (fp32)
            dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION)
            tl.atomic_add(DQ_ACC + q_base + offs_m[:, None] * D + offs_d[None, :], dq,
                          mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KPM, ROW_OF_POS, COL_OF_POS, QRANGE, VRANGE, G, DK, DV, DQ_ACC,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_mb,
                          H, HKV, GROUP, L, D, Lq, Nv, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV for one key tile of one kv head, summed over its GROUP query heads (no atomics).

    dV = Σ Pᵀ dO;  dS = P · (dO·Vᵀ + G/H − Δ);  dK = scale · Σ dSᵀ Q.
    ATOMIC_DQ (the one-pass backward): also dQ += dS K into DQ_ACC, fp32 (B, H, L, D) zeroed by the launcher,
    unscaled; five matmuls per tile instead of the two-kernel backward's seven, in an order that varies
    from run to run.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // HKV
    hk = bh % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < D
    kv_base = b * stride_kb + hk * stride_kh
    k = tl.load(K + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + kv_base + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    key_ok = n_ok
    if HAS_MASK:
        key_ok = key_ok & (tl.load(KPM + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
    q_lo = 0
    q_hi = 0
    col = offs_n
    col_ok = n_ok
    tile_visual = False
    map_base = b * L
    if HAS_G:
        q_lo = tl.load(QRANGE + b * 2)
        q_hi = tl.load(QRANGE + b * 2 + 1)
        v_lo = tl.load(VRANGE + b * 2)
        v_hi = tl.load(VRANGE + b * 2 + 1)
        col = tl.load(COL_OF_POS + map_base + offs_n, mask=n_ok, other=-1)
        col_ok = col >= 0
        tile_visual = (n0 < v_hi) & (n0 + BLOCK_N > v_lo)
    g_base = b * Lq * Nv
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        # query tiles from the one holding row n0; those starting at or after the tile's last key see
        # every key of the tile
        lo = (n0 // BLOCK_M) * BLOCK_M
        inner_lo = lo + tl.cdiv(n0 + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        inner_lo = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = b * stride_qb + h * stride_qh
        row_base = (b * H + h) * L
        if CAUSAL:
            dk, dv = _dkdv_query_tiles(
                dk=dk, dv=dv, k=k, v=v, Q=Q, DO=DO, LSE=LSE, DELTA=DELTA, G=G, DQ_ACC=DQ_ACC, ROW_OF_POS=ROW_OF_POS,
                q_base=q_base, row_base=row_base, g_base=g_base, map_base=map_base, offs_n=offs_n, offs_d=offs_d,
                d_ok=d_ok, key_ok=key_ok, col=col, col_ok=col_ok, tile_visual=tile_visual, q_lo=q_lo, q_hi=q_hi,
                L=L, D=D, Nv=Nv, qk_scale=qk_scale, lo=lo,
                hi=tl.minimum(inner_lo, L), EDGE=True, HAS_MASK=HAS_MASK, HAS_G=HAS_G, ATOMIC_DQ=ATOMIC_DQ,
                PRECISION=PRECISION, BLOCK_M=BLOCK_M)
        dk, dv = _dkdv_query_tiles(
            dk=dk, dv=dv, k=k, v=v, Q=Q, DO=DO, LSE=LSE, DELTA=DELTA, G=G, DQ_ACC=DQ_ACC, ROW_OF_POS=ROW_OF_POS,
            q_base=q_base, row_base=row_base, g_base=g_base, map_base=map_base, offs_n=offs_n, offs_d=offs_d,
            d_ok=d_ok, key_ok=key_ok, col=col, col_ok=col_ok, tile_visual=tile_visual, q_lo=q_lo, q_hi=q_hi,
            L=L, D=D, Nv=Nv, qk_scale=qk_scale, lo=inner_lo,
            hi=L, EDGE=False, HAS_MASK=HAS_MASK, HAS_G=HAS_G, ATOMIC_DQ=ATOMIC_DQ, PRECISION=PRECISION,
            BLOCK_M=BLOCK_M)
    out_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + kv_base + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=out_mask)
    tl.store(DV + kv_base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_key_tiles(dq, q, do, lse2, delta, K, V, KPM, G, COL_OF_POS, kv_base, mask_base, map_base, g_base, offs_m,
                  offs_d, d_ok, row, row_in, rows_slice, v_lo, v_hi, L, D, Nv, qk_scale, lo, hi,
                  EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ (unscaled) of one query tile over the key tiles [lo, hi); EDGE as in _fwd_key_tiles."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if EDGE:
            n_ok = offs_n < L
            kt = tl.load(K + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            vt = tl.load(V + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
        else:
            kt = tl.load(K + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            vt = tl.load(V + kv_base + offs_n[None, :] * D + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse2[:, None])
        if EDGE:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            if HAS_MASK:
                valid = valid & (tl.load(KPM + mask_base + offs_n, mask=n_ok, other=0) != 0)[None, :]
            p = tl.where(valid, p, 0.0)
        elif HAS_MASK:
            p = tl.where((tl.load(KPM + mask_base + offs_n) != 0)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if HAS_G:
            if rows_slice & (start_n < v_hi) & (start_n + BLOCK_N > v_lo):
                col = tl.load(COL_OF_POS + map_base + offs_n, mask=offs_n < L, other=-1)
                g_ok = row_in[:, None] & (col >= 0)[None, :]
                dp += tl.load(G + g_base + row[:, None] * Nv + col[None, :], mask=g_ok, other=0.0)
        # dS = P · (dP + G/H − Δ)
        ds = p * (dp - delta[:, None])
        # kᵀ is loaded as (D, N); dQ needs K (N, D)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, KPM, ROW_OF_POS, COL_OF_POS, QRANGE, VRANGE, G, DQ,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_mb,
                        H, GROUP, L, D, Lq, Nv, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G: tl.constexpr,
                        PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ = scale · Σ_j dS K for one query tile of one head; dS = P · (dO·Vᵀ + G/H − Δ)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    q_base = b * stride_qb + h * stride_qh
    kv_base = b * stride_kb + (h // GROUP) * stride_kh
    mask_base = b * stride_mb
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(LSE + bh * L + offs_m, mask=m_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + bh * L + offs_m, mask=m_ok, other=0.0)
    v_lo = 0
    v_hi = 0
    row = offs_m
    row_in = m_ok
    rows_slice = False
    if HAS_G:
        v_lo = tl.load(VRANGE + b * 2)
        v_hi = tl.load(VRANGE + b * 2 + 1)
        q_lo = tl.load(QRANGE + b * 2)
        q_hi = tl.load(QRANGE + b * 2 + 1)
        rows_slice = (row0 < q_hi) & (row0 + BLOCK_M > q_lo)
        row = tl.load(ROW_OF_POS + b * L + offs_m, mask=m_ok, other=-1)
        row_in = row >= 0
    g_base = b * Lq * Nv
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        inner_hi = (row0 // BLOCK_N) * BLOCK_N
        edge_hi = tl.minimum(L, row0 + BLOCK_M)
    else:
        inner_hi = (L // BLOCK_N) * BLOCK_N
        edge_hi = L
    dq = _dq_key_tiles(dq=dq, q=q, do=do, lse2=lse2, delta=delta, K=K, V=V, KPM=KPM, G=G, COL_OF_POS=COL_OF_POS,
                       kv_base=kv_base, mask_base=mask_base, map_base=b * L, g_base=g_base, offs_m=offs_m, offs_d=offs_d,
                       d_ok=d_ok, row=row, row_in=row_in, rows_slice=rows_slice, v_lo=v_lo, v_hi=v_hi, L=L, D=D, Nv=Nv,
                       qk_scale=qk_scale, lo=0,
                       hi=inner_hi, EDGE=False, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, HAS_G=HAS_G,
                       PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    dq = _dq_key_tiles(dq=dq, q=q, do=do, lse2=lse2, delta=delta, K=K, V=V, KPM=KPM, G=G, COL_OF_POS=COL_OF_POS,
                       kv_base=kv_base, mask_base=mask_base, map_base=b * L, g_base=g_base, offs_m=offs_m, offs_d=offs_d,
                       d_ok=d_ok, row=row, row_in=row_in, rows_slice=rows_slice, v_lo=v_lo, v_hi=v_hi, L=L, D=D, Nv=Nv,
                       qk_scale=qk_scale, lo=inner_hi,
                       hi=edge_hi, EDGE=True, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, HAS_G=HAS_G,
                       PRECISION=PRECISION, BLOCK_N=BLOCK_N)
    tl.store(DQ + q_base + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
