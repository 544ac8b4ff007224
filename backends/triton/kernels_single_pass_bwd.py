"""Backward in the single-pass forward's style.

One program per (batch·head, direction, segment) — V in one block (V <= 64), K in one block
(K <= 64) — and the same intra-chunk decay factors as ``kernels_single_pass.py``. A sequence
that fits one segment is one program per direction; a longer one gets its boundary states
(F, R, dF, dR) first (``kernels_boundary_states.py``) and each segment starts from them. A direction's gradients
need the states ``S`` entering each chunk (one way along the sequence) and the state gradients
``dS`` leaving it (the other way), so each (direction, segment) takes two walks:

* pass A, against the direction: ``dS`` chunk by chunk (``dS <- Γ ⊙ dS + scale'·(q ⊙ Qf)ᵀ dO``),
  parking the value that leaves each chunk in float32 scratch;
* pass B, along the direction: ``S`` in registers, and each chunk's dq, dk, dv and gate
  gradient from its tiles, ``S`` and the parked ``dS`` (formulas: ``kernels.py``'s docstring,
  "Backward"; the gate gradient's carry term ``Σ_v S_out ⊙ dS_out`` included).

``PASSES`` picks the walks a launch makes: by default the launcher runs pass A in a launch of
its own (``PASSES=1``, few registers, many programs per SM) and then pass B (``PASSES=2``,
255 registers, 2 programs per SM); ``PASSES=3`` makes both in one program, where pass A
runs at pass B's occupancy (H100: forward+backward 7-10 % slower at 224 px, NOTES.md session 9).

The two directions' parts of dq, dk and dv meet in pass B as the forward's output parts do:
by default once, in the middle of the walks (``kernels_single_pass._meet``; the first half
parked, the second half adding the other's parked parts, a give-up's half summed by the last
to finish in ``_tail_bwd``); with ``MEET`` off chunk by chunk (a program parks its float32
parts, counts the chunk, and the second to arrive adds and writes). H100, bf16,
forward+backward at vigT_224: 294.8 µs chunk by chunk, 268.6 meeting (NOTES.md session 26).
Each direction writes its own gate gradient (``dg`` or ``dg_reverse``) directly. Pass B prefetches
the next chunk's tiles, as the forward does.

Both passes take the forward's ratio chunk math (``kernels_single_pass``' docstring) where every
gate of the walk allows it: the scores and their dq, dk parts in one dot each instead of one
per level (H100, bf16, forward+backward with both: vigT_224 415.3 -> 321.2 µs, vigT_1024
640.7 -> 521.6; NOTES.md session 18).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (_chunk_allows_ratio, _dot, _dot_acc, _level_mask, _level_scores_and_grads, _load_state,
                      _ratio_factors, _sequence_rows)
from .kernels_single_pass import (_count, _gates_allow_ratio, _look, _meet, _next_level, _rows_ptrs, _tail_chunks,
                                  _total_of_pair)


@triton.jit
def _chunk_tiles(q, k, v, g, do, row_qk, row_v, c, T, stride_qk, stride_v, cols_k, cols_v, K, V,
                 C: tl.constexpr):
    """Chunk ``c``'s q, k, v, g and dO tiles as stored (zero rows past ``T``; none past the end)."""
    t0 = c * C
    rows = t0 + tl.arange(0, C)
    ok = (rows >= 0) & (rows < T)  # c = -1 (past the end) gives negative rows; vector tests only:
    # Triton 3.9's interpreter rejects a mask built with a scalar bool
    rows = tl.where(ok, rows, 0)
    m_k = ok[:, None] & (cols_k < K)[None, :]
    m_v = ok[:, None] & (cols_v < V)[None, :]
    offs_k = row_qk + rows[:, None].to(tl.int64) * stride_qk + cols_k[None, :]
    offs_v = row_v + rows[:, None].to(tl.int64) * stride_v + cols_v[None, :]
    qt = tl.load(q + offs_k, mask=m_k, other=0.0)
    kt = tl.load(k + offs_k, mask=m_k, other=0.0)
    gt = tl.load(g + offs_k, mask=m_k, other=0.0)
    vt = tl.load(v + offs_v, mask=m_v, other=0.0)
    dot_ = tl.load(do + offs_v, mask=m_v, other=0.0)
    return qt, kt, vt, gt, dot_


@triton.jit
def _level_factors(gt, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr):
    """The chunk-wide query- and key-side decay factors (the top level of the hierarchy) and
    the chunk's total decay."""
    Qf = tl.exp(gt.to(tl.float32))
    Kf = tl.full([C, BK], 1.0, tl.float32)
    pair = Qf  # (unused at level 0)
    for LVL in tl.static_range(LOG2C):
        Qf, Kf, pair = _next_level(Qf, Kf, pair, LVL, C, BK, REV)
    return Qf, Kf, _total_of_pair(pair, BK)


@triton.jit
def _chunk_factors(gt, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr,
                   DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, RATIO: tl.constexpr):
    """Pass A's query-side factors and the chunk's total decay, by the chunk math ``RATIO``
    picks (as ``_chunk_grads``)."""
    if RATIO == 2:
        by_ratio = _chunk_allows_ratio(gt, C)
    else:  # (a compile-time choice: one chunk math in the loop)
        by_ratio = RATIO == 1
    if by_ratio:
        Qf, _, total = _ratio_factors(gt, C, REV, DOT_BF16, PRECISION)
    else:
        Qf, _, total = _level_factors(gt, C, LOG2C, BK, REV)
    return Qf, total


@triton.jit
def _level_pairs(q, k, kt, gt, dA, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr,
                 DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """The chunk's pairs (without the own token) by the hierarchy: their scores ``A``, their
    (unscaled) parts of dq and dk, and the chunk's factors and total decay."""
    Qf = tl.exp(gt.to(tl.float32))
    Kf = tl.full([C, BK], 1.0, tl.float32)
    A = tl.zeros([C, C], dtype=tl.float32)
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    pair = Qf  # (unused at level 0)
    for LVL in tl.static_range(LOG2C):
        # level 0: Kf = 1, and the key tile goes in as loaded (exact in bfloat16: one dot fewer)
        A, dq, dk = _level_scores_and_grads(q, kt if LVL == 0 else k, Qf, Kf, _level_mask(C, LVL, REV), dA, A,
                                            dq, dk, DOT_BF16, PRECISION, LVL == 0)
        Qf, Kf, pair = _next_level(Qf, Kf, pair, LVL, C, BK, REV)
    return A, dq, dk, Qf, Kf, _total_of_pair(pair, BK)


@triton.jit
def _chunk_grads(qt, kt, vt, gt, dot_, S_in, dS_out, scale, C: tl.constexpr, LOG2C: tl.constexpr,
                 BK: tl.constexpr, REV: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr,
                 RATIO: tl.constexpr):
    """One direction's dq, dk, dv and gate gradient for one chunk, and the state leaving it.
    ``RATIO`` (``_direction_bwd``): 0, the hierarchy's pairs; 1, the decay ratio's (the
    caller checked the gates); 2, either, by this chunk's gates."""
    rows = tl.arange(0, C)
    eye = rows[:, None] == rows[None, :]
    q = qt.to(tl.float32)
    k = kt.to(tl.float32)
    dA = _dot(dot_, tl.trans(vt), DOT_BF16, PRECISION)  # dO vᵀ, unscaled
    if RATIO == 2:
        by_ratio = _chunk_allows_ratio(gt, C)
    else:  # (a compile-time choice: one chunk math in the loop)
        by_ratio = RATIO == 1
    if by_ratio:
        # the pairs by the decay ratio (``_ratio_factors``, as ``kernels._ratio_pairs``), kh =
        # k ⊙ exp(-G): one dot each for the scores and their dq, dk parts. k ⊙ Kf is kh with
        # its columns scaled by the chunk's total, so the total scales the state (and dS)
        # instead, kh's operand parts serve the scores, the state's update and dv alike, and
        # the state terms go in as the dots' accumulators (AOT sm_90, ViG-T's pass B step:
        # 1,217 -> 1,102 SASS instructions with the split of kernels._split_bf16_ptx)
        pairs = (rows[:, None] < rows[None, :]) if REV else (rows[:, None] > rows[None, :])
        Qf, inv, total = _ratio_factors(gt, C, REV, DOT_BF16, PRECISION)
        qh = q * Qf
        kh = k * inv
        A = tl.where(pairs, _dot(qh, tl.trans(kh), DOT_BF16, PRECISION), 0.0)
        dA_s = scale * tl.where(pairs, dA, 0.0)
        dS_total = total[:, None] * dS_out
        dq = Qf * _dot_acc(dA_s, kh, scale * _dot(dot_, tl.trans(S_in), DOT_BF16, PRECISION), DOT_BF16, PRECISION)
        dk = inv * _dot_acc(tl.trans(dA_s), qh, _dot(vt, tl.trans(dS_total), DOT_BF16, PRECISION), DOT_BF16,
                            PRECISION)
        S_out = total[:, None] * _dot_acc(tl.trans(kh), vt, S_in, DOT_BF16, PRECISION)
        dv_states = _dot(kh, dS_total, DOT_BF16, PRECISION)
    else:
        A, dq, dk, Qf, Kf, total = _level_pairs(q, k, kt, gt, dA, C, LOG2C, BK, REV, DOT_BF16, PRECISION)
        dq = scale * (dq + Qf * _dot(dot_, tl.trans(S_in), DOT_BF16, PRECISION))
        dk = scale * dk + Kf * _dot(vt, tl.trans(dS_out), DOT_BF16, PRECISION)
        S_out = total[:, None] * S_in + _dot(tl.trans(k * Kf), vt, DOT_BF16, PRECISION)
        dv_states = _dot(k * Kf, dS_out, DOT_BF16, PRECISION)
    # gate gradient: in-chunk cumulative sum, plus everything beyond the chunk in one term.
    # The sum (suffix sum; reverse: prefix) is a dot with a 0/1 triangle, not tl.cumsum's
    # scan across lanes (AOT sm_90, ViG-T's pass B step: 1,102 -> 1,042 SASS instructions);
    # its terms enter split (~2^-17 each) or as IEEE float32, whatever the other dots' mode
    # (a rounded bfloat16 or tf32 term would cost the sum 2^-9 or 2^-11), and a dot adds in
    # a fixed order
    carry = tl.sum(S_out * dS_out, axis=1)
    tri = (rows[None, :] <= rows[:, None]) if REV else (rows[None, :] >= rows[:, None])
    dg = _dot_acc(tri.to(tl.bfloat16 if DOT_BF16 else tl.float32), q * dq - k * dk,
                  tl.zeros([C, BK], dtype=tl.float32) + carry[None, :], DOT_BF16, "bf16x3" if DOT_BF16 else "ieee")
    # the own token (decay 1); its gate terms cancel, so it is added after the gate gradient
    dA_diag = tl.sum(tl.where(eye, dA, 0.0), axis=1)
    dq += scale * dA_diag[:, None] * k
    dk += scale * dA_diag[:, None] * q
    A += tl.where(eye, tl.sum(q * k, axis=1)[:, None], 0.0)
    dv = _dot_acc(tl.trans(scale * A), dot_, dv_states, DOT_BF16, PRECISION)
    return dq, dk, dv, dg, S_out


@triton.jit
def _hand_over(x, out, row_out, stride_out, part, other_part, row_part, t0, n0, cols, width,
               C: tl.constexpr, HANDOFF: tl.constexpr, ARRIVED):
    """Write ``x`` (this direction's part) or, handing over, park it / add the other's."""
    o_ptrs, o_mask = _rows_ptrs(out, row_out, t0, n0, stride_out, cols, width, C)
    if HANDOFF:
        if ARRIVED == 1:
            p_ptrs, p_mask = _rows_ptrs(other_part, row_part, t0, n0, width, cols, width, C)
            x += tl.load(p_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg")
            tl.store(o_ptrs, x.to(out.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs, x.to(out.dtype.element_ty), mask=o_mask)


@triton.jit
def _add_parked(part, other_part, out, row_part, row_out, stride_out, t0, n0, cols, width, C: tl.constexpr):
    """``out`` rows ``t0 ..`` from both directions' parked parts (the same float32 addition as
    ``_hand_over``'s, which commutes)."""
    p_ptrs, p_mask = _rows_ptrs(part, row_part, t0, n0, width, cols, width, C)
    q_ptrs, _ = _rows_ptrs(other_part, row_part, t0, n0, width, cols, width, C)
    x = (tl.load(p_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg")
         + tl.load(q_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg"))
    o_ptrs, o_mask = _rows_ptrs(out, row_out, t0, n0, stride_out, cols, width, C)
    tl.store(o_ptrs, x.to(out.dtype.element_ty), mask=o_mask)


@triton.jit
def _park_parts(dq_c, dk_c, dv_c, parts_q, parts_k, parts_v, row_part_k, row_part_v, t0, n0, cols_k, cols_v, K, V,
                C: tl.constexpr):
    """This direction's dq, dk and dv parts of rows ``t0 ..``, parked for the other direction."""
    pq, pq_mask = _rows_ptrs(parts_q, row_part_k, t0, n0, K, cols_k, K, C)
    pk, pk_mask = _rows_ptrs(parts_k, row_part_k, t0, n0, K, cols_k, K, C)
    pv, pv_mask = _rows_ptrs(parts_v, row_part_v, t0, n0, V, cols_v, V, C)
    tl.store(pq, dq_c, mask=pq_mask)
    tl.store(pk, dk_c, mask=pk_mask)
    tl.store(pv, dv_c, mask=pv_mask)


@triton.jit
def _tail_bwd(dq, dk, dv, parts_q, parts_k, parts_v, other_q, other_k, other_v, end, bh, row_qk, row_v, T, K, V,
              stride_qk, stride_v, cols_k, cols_v, c_lo, n_walk, C: tl.constexpr):
    """dq, dk and dv of the chunks ``kernels_single_pass._tail_chunks`` gives this program (after
    a direction gave up at the meeting), from both directions' parked parts."""
    n_chunks = tl.cdiv(T, C)
    row_part_k = bh.to(tl.int64) * n_chunks * C * K
    row_part_v = bh.to(tl.int64) * n_chunks * C * V
    first, count = _tail_chunks(end, c_lo, n_walk)
    for j in range(0, count):
        t0 = (first + j) * C
        n0 = tl.minimum(C, T - t0)
        _add_parked(parts_q, other_q, dq, row_part_k, row_qk, stride_qk, t0, n0, cols_k, K, C)
        _add_parked(parts_k, other_k, dk, row_part_k, row_qk, stride_qk, t0, n0, cols_k, K, C)
        _add_parked(parts_v, other_v, dv, row_part_v, row_v, stride_v, t0, n0, cols_v, V, C)


@triton.jit
def _pass_a(q, k, v, g, do, scr, row_qk, row_v, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v, dS, c_lo,
            c_hi, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr,
            DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, RATIO: tl.constexpr, PREFETCH: tl.constexpr = True):
    """Pass A, against the direction: the state gradient leaving every chunk, parked in
    ``scr``; returns the one entering the first chunk. ``PREFETCH``: the next chunk's tiles
    load while this chunk's math runs, as in pass B and the forward (otherwise each step waits
    on its own loads: long-scoreboard stalls were half of pass A's cycles, ncu, session 27).
    Pass A reads q, g and dO only (k and v go unused, and their loads with them)."""
    scr_offs = cols_k[:, None] * BV + cols_v[None, :]
    n_walk = c_hi - c_lo
    if PREFETCH:
        first = c_lo if REV else c_hi - 1
        nq, _, _, ng, ndo = _chunk_tiles(q, k, v, g, do, row_qk, row_v, first, T, stride_qk, stride_v, cols_k,
                                         cols_v, K, V, C)
    for i in range(0, n_walk):
        c = c_lo + i if REV else c_hi - 1 - i
        if PREFETCH:
            qt, gt, dot_ = nq, ng, ndo
            c_next = tl.where(i + 1 < n_walk, c + 1 if REV else c - 1, -1)
            nq, _, _, ng, ndo = _chunk_tiles(q, k, v, g, do, row_qk, row_v, c_next, T, stride_qk, stride_v, cols_k,
                                             cols_v, K, V, C)
        else:
            qt, _, _, gt, dot_ = _chunk_tiles(q, k, v, g, do, row_qk, row_v, c, T, stride_qk, stride_v, cols_k,
                                              cols_v, K, V, C)
        tl.store(scr + c * BK * BV + scr_offs, dS)
        Qf, total = _chunk_factors(gt, C, LOG2C, BK, REV, DOT_BF16, PRECISION, RATIO)
        # (the decayed state as the dot's accumulator, the scale on the smaller operand)
        dS = _dot_acc(tl.trans(qt.to(tl.float32) * (scale * Qf)), dot_, total[:, None] * dS, DOT_BF16, PRECISION)
    return dS


@triton.jit
def _pass_b(q, k, v, g, do, dq, dk, dv, dg, scr, parts_q, parts_k, parts_v, other_q, other_k, other_v, flags,
            bh, row_qk, row_v, row_flags, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v, S, c_lo, c_hi,
            C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr,
            HANDOFF: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, RATIO: tl.constexpr,
            MEET: tl.constexpr = False, SPIN: tl.constexpr = 0):
    """Pass B, along the direction: the states in registers, every chunk's gradients, from
    the state gradients pass A parked in ``scr``. Bidirectional (``HANDOFF``), the two
    directions' dq, dk and dv parts meet chunk by chunk or (``MEET``) once in the middle of
    the walks, as the forward's do (``kernels_single_pass._meet``); returns the direction that
    gave up at the meeting, or -1."""
    n_chunks = tl.cdiv(T, C)
    n_walk = c_hi - c_lo
    scr_offs = cols_k[:, None] * BV + cols_v[None, :]
    first = c_hi - 1 if REV else c_lo
    nq, nk, nv, ng, ndo = _chunk_tiles(q, k, v, g, do, row_qk, row_v, first, T, stride_qk, stride_v, cols_k, cols_v,
                                       K, V, C)
    ndS = tl.load(scr + first * BK * BV + scr_offs)
    row_part_k = bh.to(tl.int64) * n_chunks * C * K
    row_part_v = bh.to(tl.int64) * n_chunks * C * V
    paired = tl.full([], 0, tl.int32)  # (MEET) 1 past the meeting if the other's parts are parked
    quitter = tl.full([], -1, tl.int32)
    for i in range(0, n_walk):
        c = c_hi - 1 - i if REV else c_lo + i
        t0 = c * C
        n0 = tl.minimum(C, T - t0)
        qt, kt, vt, gt, dot_, dS_out = nq, nk, nv, ng, ndo, ndS
        c_next = tl.where(i + 1 < n_walk, c - 1 if REV else c + 1, -1)
        nq, nk, nv, ng, ndo = _chunk_tiles(q, k, v, g, do, row_qk, row_v, c_next, T, stride_qk, stride_v, cols_k,
                                           cols_v, K, V, C)
        ndS = tl.load(scr + tl.maximum(c_next, 0) * BK * BV + scr_offs)
        dq_c, dk_c, dv_c, dg_c, S = _chunk_grads(qt, kt, vt, gt, dot_, S, dS_out, scale, C, LOG2C, BK, REV,
                                                 DOT_BF16, PRECISION, RATIO)
        g_ptrs, g_mask = _rows_ptrs(dg, row_qk, t0, n0, stride_qk, cols_k, K, C)
        tl.store(g_ptrs, dg_c.to(dg.dtype.element_ty), mask=g_mask)
        arrived = 0
        if HANDOFF and MEET:
            if (2 * i <= n_walk - 1) | (paired == 0):  # first half, middle, or the other never came
                _park_parts(dq_c, dk_c, dv_c, parts_q, parts_k, parts_v, row_part_k, row_part_v, t0, n0, cols_k,
                            cols_v, K, V, C)
            if i == n_walk // 2:
                paired, quitter = _meet(flags + row_flags + c_lo, REV, SPIN)
            arrived = tl.where((paired != 0) & (2 * i >= n_walk - 1), 1, 0)
        elif HANDOFF:
            arrived = _look(flags + row_flags + c, i, n_walk)
            if arrived == 0:  # park this direction's parts, then count (as the forward does)
                _park_parts(dq_c, dk_c, dv_c, parts_q, parts_k, parts_v, row_part_k, row_part_v, t0, n0, cols_k,
                            cols_v, K, V, C)
                arrived = _count(flags + row_flags + c)
        _hand_over(dq_c, dq, row_qk, stride_qk, parts_q, other_q, row_part_k, t0, n0, cols_k, K, C, HANDOFF, arrived)
        _hand_over(dk_c, dk, row_qk, stride_qk, parts_k, other_k, row_part_k, t0, n0, cols_k, K, C, HANDOFF, arrived)
        _hand_over(dv_c, dv, row_v, stride_v, parts_v, other_v, row_part_v, t0, n0, cols_v, V, C, HANDOFF, arrived)
    return quitter


@triton.jit
def _direction_bwd(q, k, v, g, do, dq, dk, dv, dg, dh0, scr, parts_q, parts_k, parts_v, other_q, other_k,
                   other_v, flags, bh, row_qk, row_v, row_flags, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v,
                   S, dS, c_lo, c_hi,
                   C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REV: tl.constexpr,
                   HANDOFF: tl.constexpr, STORE_DH0: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr,
                   PASSES: tl.constexpr, RATIO: tl.constexpr, MEET: tl.constexpr = False,
                   SPIN: tl.constexpr = 0, PREFETCH_A: tl.constexpr = True):
    """One direction over chunks ``c_lo .. c_hi - 1``, given the state entering them in this
    direction (``S``) and the state gradient leaving them (``dS``): pass A if ``PASSES & 1``,
    pass B if ``PASSES & 2`` (from the scratch of an earlier launch when pass A is not here).
    ``RATIO`` as the forward's ``_walk``: 1, both passes take the ratio chunk math where every
    gate of the walk allows it (each pass compiled twice, one chunk math per loop); 2, a
    test per chunk; 0, the hierarchy only."""
    if RATIO == 1:  # (one test for both passes when they share a launch)
        allow = _gates_allow_ratio(g, row_qk, T, stride_qk, cols_k, K, c_lo, c_hi, C, BK)
    if PASSES & 1:
        if RATIO == 1:
            if allow:
                dS = _pass_a(q, k, v, g, do, scr, row_qk, row_v, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v,
                             dS, c_lo, c_hi, C, LOG2C, BK, BV, REV, DOT_BF16, PRECISION, 1, PREFETCH_A)
            else:
                dS = _pass_a(q, k, v, g, do, scr, row_qk, row_v, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v,
                             dS, c_lo, c_hi, C, LOG2C, BK, BV, REV, DOT_BF16, PRECISION, 0, PREFETCH_A)
        else:
            dS = _pass_a(q, k, v, g, do, scr, row_qk, row_v, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v,
                         dS, c_lo, c_hi, C, LOG2C, BK, BV, REV, DOT_BF16, PRECISION, RATIO, PREFETCH_A)
        if STORE_DH0:
            kv_mask = (cols_k < K)[:, None] & (cols_v < V)[None, :]
            tl.store(dh0 + bh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :], dS, mask=kv_mask)
    if PASSES == 3:
        tl.debug_barrier()  # pass B reads what other threads parked
    if PASSES & 2:
        if RATIO == 1:
            if allow:
                quitter = _pass_b(q, k, v, g, do, dq, dk, dv, dg, scr, parts_q, parts_k, parts_v, other_q, other_k,
                                  other_v, flags, bh, row_qk, row_v, row_flags, T, K, V, scale, stride_qk, stride_v,
                                  cols_k, cols_v, S, c_lo, c_hi, C, LOG2C, BK, BV, REV, HANDOFF, DOT_BF16, PRECISION,
                                  1, MEET, SPIN)
            else:
                quitter = _pass_b(q, k, v, g, do, dq, dk, dv, dg, scr, parts_q, parts_k, parts_v, other_q, other_k,
                                  other_v, flags, bh, row_qk, row_v, row_flags, T, K, V, scale, stride_qk, stride_v,
                                  cols_k, cols_v, S, c_lo, c_hi, C, LOG2C, BK, BV, REV, HANDOFF, DOT_BF16, PRECISION,
                                  0, MEET, SPIN)
        else:
            quitter = _pass_b(q, k, v, g, do, dq, dk, dv, dg, scr, parts_q, parts_k, parts_v, other_q, other_k,
                              other_v, flags, bh, row_qk, row_v, row_flags, T, K, V, scale, stride_qk, stride_v,
                              cols_k, cols_v, S, c_lo, c_hi, C, LOG2C, BK, BV, REV, HANDOFF, DOT_BF16, PRECISION,
                              RATIO, MEET, SPIN)
        if HANDOFF and MEET:  # (here, not in each chunk math's pass B: one copy of it to compile)
            if (quitter >= 0) & (c_hi - c_lo >= 2):  # (as the forward's: a one-chunk walk has no tail)
                _tail_bwd(dq, dk, dv, parts_q, parts_k, parts_v, other_q, other_k, other_v,
                          flags + row_flags + c_lo + 1, bh, row_qk, row_v, T, K, V, stride_qk, stride_v, cols_k,
                          cols_v, c_lo, c_hi - c_lo, C)


@triton.jit
def _gla_bwd_single_pass_kernel(
    q, k, v, g, gr, do, dq, dk, dv, dg, dgr, h0, dht, dh0, scratch, parts, flags, bstates,
    T, H, K, V, scale, SEG_CHUNKS,
    C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIDIR: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    HAS_BSTATES: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, PASSES: tl.constexpr = 3,
    RATIO: tl.constexpr = 0, MEET: tl.constexpr = False, SPIN: tl.constexpr = 0, PREFETCH_A: tl.constexpr = True,
):
    """Backward, one program per (batch·head, direction, segment); see the module docstring.

    ``scratch``: ``[B·H·directions, N, BK, BV]`` float32 (the segments of a sequence use
    disjoint chunks of it). ``parts``: dq, dk, dv parts, each ``[2, B·H, N·C, width]``
    float32, one after the other (bidirectional only). ``flags``: ``[B·H, N]`` int32, zero on
    entry. Long sequences are cut into segments of ``SEG_CHUNKS`` chunks that start from the
    boundary states ``bstates`` (slots F, R, dF, dR; causal: F, dF; see
    ``kernels_boundary_states.py``); without ``HAS_BSTATES`` there is one segment."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch.compile) passes floats as float64
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    NSEG = tl.num_programs(1)
    NDIR: tl.constexpr = 2 if BIDIR else 1
    SLOTS: tl.constexpr = 4 if BIDIR else 2
    bh = pid // NDIR
    direction = pid % NDIR
    row_qk, row_v = _sequence_rows(bh, T, H, K, V)
    cols_k = tl.arange(0, BK)
    cols_v = tl.arange(0, BV)
    n_chunks = tl.cdiv(T, C)
    c_lo = seg * SEG_CHUNKS
    c_hi = tl.minimum(c_lo + SEG_CHUNKS, n_chunks)
    BH = tl.num_programs(0) // NDIR
    scr = scratch + pid.to(tl.int64) * n_chunks * BK * BV
    size_k = BH.to(tl.int64) * n_chunks * C * K  # one direction's dq (or dk) parts
    size_v = BH.to(tl.int64) * n_chunks * C * V
    parts_q = parts
    parts_k = parts + 2 * size_k
    parts_v = parts + 4 * size_k
    row_flags = bh * n_chunks
    kv = tl.cast(K, tl.int64) * V
    bst = bstates + bh.to(tl.int64) * (NSEG + 1) * kv  # slot 0, boundary 0 of this sequence
    bst_slot = BH.to(tl.int64) * (NSEG + 1) * kv
    S = tl.zeros([BK, BV], dtype=tl.float32)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if direction == 0:
        if HAS_BSTATES:  # F at the segment's left edge, dF at its right edge
            S = _load_state(bst + seg * kv, cols_k, cols_v, K, V)
            dS = _load_state(bst + (SLOTS // 2) * bst_slot + (seg + 1) * kv, cols_k, cols_v, K, V)
        else:
            if HAS_H0:
                S = _load_state(h0 + bh.to(tl.int64) * kv, cols_k, cols_v, K, V)
            if HAS_DHT:
                dS = _load_state(dht + bh.to(tl.int64) * kv, cols_k, cols_v, K, V)
        _direction_bwd(q, k, v, g, do, dq, dk, dv, dg, dh0, scr, parts_q, parts_k, parts_v,
                       parts_q + size_k, parts_k + size_k, parts_v + size_v, flags, bh, row_qk, row_v, row_flags,
                       T, K, V, scale, H * K, H * V, cols_k, cols_v, S, dS, c_lo, c_hi, C, LOG2C, BK, BV, False,
                       BIDIR, STORE_DH0, DOT_BF16, PRECISION, PASSES, RATIO, MEET, SPIN, PREFETCH_A)
    else:
        if HAS_BSTATES:  # R at the segment's right edge, dR at its left edge
            S = _load_state(bst + bst_slot + (seg + 1) * kv, cols_k, cols_v, K, V)
            dS = _load_state(bst + 3 * bst_slot + seg * kv, cols_k, cols_v, K, V)
        _direction_bwd(q, k, v, gr, do, dq, dk, dv, dgr, dh0, scr, parts_q + size_k, parts_k + size_k,
                       parts_v + size_v, parts_q, parts_k, parts_v, flags, bh, row_qk, row_v, row_flags,
                       T, K, V, scale, H * K, H * V, cols_k, cols_v, S, dS, c_lo, c_hi, C, LOG2C, BK, BV, True,
                       BIDIR, False, DOT_BF16, PRECISION, PASSES, RATIO, MEET, SPIN, PREFETCH_A)
