"""Segment boundary states for long sequences, chunk-parallel: two launches, no long chain.

A sequence longer than one segment (``launch.py``) needs, before its segment programs run,
each state at every segment boundary: ``F`` and ``R`` for the forward, and also ``dF`` and
``dR`` for the backward (notation of ``kernels.py``). Across one segment every one of them is
an affine map of the state at the segment's near edge,

    state_far = Γ_p ⊙ state_near + u_p,

with ``Γ_p`` the segment's product of decay factors (one per K row) and ``u_p`` the segment's
own contribution (the walk step of ``kernels._walk_parts`` started from zero). So:

1. ``_gla_segment_sums_kernel`` computes ``(Γ_p, u_p)`` of every (sequence, kind, segment) at
   once: one program per (sequence · K block · V block, kind, segment), each walking its
   segment from a zero state in steps of ``STEP`` tokens. ``u_p`` is parked where the state
   it leads to will live.
2. ``_gla_boundary_scan_kernel`` composes the maps along the walk direction, element-wise
   over the K·V state (each element's recurrence is independent), turning each ``u`` into
   the state itself, in place. Its chain is ``NSEG`` multiply-adds per element, with the
   loads ``ROWS`` boundaries at a time and one step ahead, instead of ``NSEG`` matmul steps.
   (``tl.associative_scan`` over the boundaries measured 2-4× slower on an H100.)

Composition only multiplies factors in [0, 1] and adds, so it cannot overflow; the scan's
order is fixed, so results are bitwise reproducible. The boundary that starts each walk gets
the initial state (``h0`` for F, the final-state gradient for dF, zero otherwise), and the
boundary that ends it is also written to ``ht`` (F) or ``dh0`` (dF) when asked.

Layout (as the segment kernels read it): ``bstates[slot, bh, p]`` = the state of kind ``slot ·
KIND_STRIDE`` at boundary ``p`` (token ``p · SEG``), p = 0..NSEG, float32 ``[K, V]``; kinds
0 = F (left to right, k v g), 1 = R (right to left, k v gr), 2 = dF (right to left, q dO g),
3 = dR (left to right, q dO gr). ``gammas[slot, bh, p]`` = ``Γ_p`` (``[K]``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _row, _sequence_rows, _store_state, _walk_parts


@triton.jit
def _segment_sum(a, b, gate, row_a, row_b, seg0, T, stride_a, stride_b, cols_k, cols_v, K, V, coef,
                 SEG: tl.constexpr, STEP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                 INCLUSIVE: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """``(Γ, u)`` of the segment starting at token ``seg0``: walk steps of ``STEP`` tokens in
    the walk direction, from a zero state (steps past ``T`` are identities)."""
    state = tl.zeros([BK, BV], dtype=tl.float32)
    total = tl.full([BK], 1.0, tl.float32)
    NSTEP: tl.constexpr = SEG // STEP
    for j in tl.static_range(NSTEP):
        t0 = seg0 + ((NSTEP - 1 - j) if REVERSE else j) * STEP
        step_total, part = _walk_parts(a, b, gate, row_a, row_b, t0, T - t0, stride_a, stride_b, cols_k, cols_v,
                                       K, V, coef, STEP, BK, REVERSE, INCLUSIVE, DOT_BF16, PRECISION)
        state = step_total[:, None] * state + part
        total = step_total * total
    return total, state


@triton.jit
def _gla_segment_sums_kernel(
    q, k, v, g, gr, do, bstates, gammas,
    T, H, K, V, coef_grad, NSEG,
    SEG: tl.constexpr, STEP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NKB: tl.constexpr,
    NVB: tl.constexpr, KIND_STRIDE: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """``u_p`` into ``bstates`` (at the segment's far boundary in the walk direction) and
    ``Γ_p`` into ``gammas``; program (bh · K block · V block, slot, segment p), walking its
    segment in steps of ``STEP`` tokens."""
    coef_grad = tl.cast(coef_grad, tl.float32)  # Inductor (torch.compile) passes floats as float64
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    p = tl.program_id(2)
    kind = slot * KIND_STRIDE
    vb = pid % NVB
    kb = (pid // NVB) % NKB
    bh = pid // (NVB * NKB)
    BH = tl.num_programs(0) // (NVB * NKB)
    row_qk, row_v = _sequence_rows(bh, T, H, K, V)
    stride_qk = H * K
    stride_v = H * V
    cols_k = kb * BK + tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    kv = tl.cast(K, tl.int64) * V
    t0 = p * SEG
    if kind == 0:
        total, part = _segment_sum(k, v, g, row_qk, row_v, t0, T, stride_qk, stride_v, cols_k, cols_v, K, V, 1.0,
                                   SEG, STEP, BK, BV, False, False, DOT_BF16, PRECISION)
        far = p + 1
    elif kind == 1:
        total, part = _segment_sum(k, v, gr, row_qk, row_v, t0, T, stride_qk, stride_v, cols_k, cols_v, K, V, 1.0,
                                   SEG, STEP, BK, BV, True, False, DOT_BF16, PRECISION)
        far = p
    elif kind == 2:
        total, part = _segment_sum(q, do, g, row_qk, row_v, t0, T, stride_qk, stride_v, cols_k, cols_v, K, V,
                                   coef_grad, SEG, STEP, BK, BV, True, True, DOT_BF16, PRECISION)
        far = p
    else:
        total, part = _segment_sum(q, do, gr, row_qk, row_v, t0, T, stride_qk, stride_v, cols_k, cols_v, K, V,
                                   coef_grad, SEG, STEP, BK, BV, False, True, DOT_BF16, PRECISION)
        far = p + 1
    sb = (slot * BH + bh).to(tl.int64)
    _store_state(bstates + (sb * (NSEG + 1) + far) * kv, part, cols_k, cols_v, K, V)
    if vb == 0:  # one V block writes the K rows' totals
        tl.store(gammas + (sb * NSEG + p) * K + cols_k, total, mask=cols_k < K)


@triton.jit
def _scan_tile(base, gbase, r0, NSEG, ltr, e, e_ok, krow, kv, K, ROWS: tl.constexpr):
    """Pointers and contents of the ``ROWS`` boundaries of a scan step: the segment sums ``u``
    (0 past the end) and the totals ``Γ`` (1 past the end: identity maps)."""
    j = r0 + tl.arange(0, ROWS)  # the j-th segment along the walk
    ok = j < NSEG
    j = tl.where(ok, j, 0)
    seg = ltr * j + (1 - ltr) * (NSEG - 1 - j)
    far = seg + ltr  # the boundary each segment's map leads to
    mask = ok[:, None] & e_ok[None, :]
    ptrs = base + far[:, None].to(tl.int64) * kv + e[None, :]
    u = tl.load(ptrs, mask=mask, other=0.0)
    gam = tl.load(gbase + seg[:, None].to(tl.int64) * K + krow[None, :], mask=mask, other=1.0)
    return ptrs, mask, u, gam


@triton.jit
def _gla_boundary_scan_kernel(
    bstates, gammas, h0, dht, ht, dh0,
    K, V, NSEG,
    KIND_STRIDE: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_HT: tl.constexpr,
    STORE_DH0: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Every boundary state from the segment sums, in place; program (bh, slot, block of
    ``BLOCK`` state elements). Each step loads ``ROWS`` boundaries at once (the next step's
    loads go out before this step's arithmetic) and composes them one by one: ``BLOCK`` is one
    element per thread, so the row picks below stay within each thread's registers."""
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    blk = tl.program_id(2)
    BH = tl.num_programs(0)
    kind = slot * KIND_STRIDE
    # 1 for the kinds that walk left to right (F, dR), 0 for right to left (R, dF)
    ltr = ((kind == 0) | (kind == 3)).to(tl.int32)
    kv = tl.cast(K, tl.int64) * V
    sb = (slot * BH + bh).to(tl.int64)
    base = bstates + sb * (NSEG + 1) * kv
    gbase = gammas + sb * NSEG * K
    e = blk * BLOCK + tl.arange(0, BLOCK)
    e_ok = e < kv
    e = tl.where(e_ok, e, 0)
    krow = e // V
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_H0:
        if kind == 0:
            carry = tl.load(h0 + bh.to(tl.int64) * kv + e, mask=e_ok, other=0.0)
    if HAS_DHT:
        if kind == 2:
            carry = tl.load(dht + bh.to(tl.int64) * kv + e, mask=e_ok, other=0.0)
    start = (1 - ltr) * NSEG  # boundary 0 (left to right) or NSEG
    tl.store(base + start * kv + e, carry, mask=e_ok)
    rows = tl.arange(0, ROWS)[:, None]
    n_ptrs, n_mask, n_u, n_gam = _scan_tile(base, gbase, 0, NSEG, ltr, e, e_ok, krow, kv, K, ROWS)
    for r0 in range(0, NSEG, ROWS):
        ptrs, mask, u, gam = n_ptrs, n_mask, n_u, n_gam
        n_ptrs, n_mask, n_u, n_gam = _scan_tile(base, gbase, r0 + ROWS, NSEG, ltr, e, e_ok, krow, kv, K, ROWS)
        states = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for r in tl.static_range(ROWS):
            carry = _row(gam, r, ROWS) * carry + _row(u, r, ROWS)
            states = tl.where(rows == r, carry[None, :], states)
        tl.store(ptrs, states, mask=mask)
    if STORE_HT:
        if kind == 0:
            tl.store(ht + bh.to(tl.int64) * kv + e, carry, mask=e_ok)
    if STORE_DH0:
        if kind == 2:
            tl.store(dh0 + bh.to(tl.int64) * kv + e, carry, mask=e_ok)
