"""Single-pass forward: each direction walks the sequence once (ViG at 224 px: T = 196), or,
for long sequences, each segment once from its boundary states.

``kernels.py`` runs the forward in two phases: walk the states and park them in scratch, then
revisit every chunk for its output — every chunk is loaded and its decays formed twice, and
one program carries both directions' chains. Here:

* one program per (batch·head, direction, V block) walks its direction's chunks once, in
  order, with the state in registers: each chunk's part of the output is complete as soon as
  it is computed. Splitting the directions halves each program's dependency chain and
  doubles the programs (H100, vigT_224: 94.7 against 113.6 µs with both directions in one
  program, NOTES.md session 4; since then, shorter chains did not help: the SM's rate of
  chunk steps bounds it, session 5);
* a chunk's output is the sum of two parts, one per direction, made by two programs. By
  default they meet once, in the middle of their walks (``_meet``): each parks the parts of
  its first half (and of the middle chunk) in ``part`` (float32) and counts itself in on its
  segment's counter in ``flags``; the second to count adds the other's parked parts in its
  whole second half and writes ``o``; the first reads the counter for the other (a bounded
  number of times: the other need not be resident, so nobody waits for ever) and then does
  the same, or gives up and parks its second half too, which the last of the two to finish
  sums (``_tail``). One fence and a few atomics per walk, where the chunk-by-chunk handoff
  (``MEET`` off) put a fence and an atomic round trip into every chunk step: a program parks
  its part and increments the chunk's counter, and the one that finds 1 there adds the
  other's part and writes ``o`` (one that reaches the chunk in its second half reads the
  counter first). H100, bf16, forward vigT_224: 55.1 µs chunk by chunk, 47.3 meeting
  (NOTES.md session 26; the backward's pass B does the same). Every way the sum is one
  float32 addition, which is commutative: bitwise the same result whichever direction adds.
  ``PARK_ALL`` parks every part instead, and ``_gla_fwd_sum_parts_kernel`` adds them in a
  second launch (``Config.single_pass_park_all_per_sm``, off by default since the meeting);
* the next chunk's tiles are loaded before the current chunk's math (by hand: the loads feed
  elementwise work, which Triton's pipeliner does not prefetch).

Intra-chunk decays use the same binary hierarchy as ``kernels.py`` (see its docstring): the
pair (t, s) split at level ℓ gets ``Qf_ℓ[t] · Kf_ℓ[s]``, two products of factors in [0, 1].
What differs is how the factors are formed: not one segmented ``cumprod`` per level and side
(and a second, shifted gate load for the exclusive products), but one recursion from level to
level. For the forward direction, ``Qf_ℓ`` is the inclusive prefix product within 2^ℓ-token
segments and ``Kf_ℓ`` the exclusive suffix product; ``Qf_0 = f``, ``Kf_0 = 1``, and

    Qf_ℓ+1[t] = Qf_ℓ[t] · (total of the left half)    for t in the right half of its 2^(ℓ+1) block
    Kf_ℓ+1[s] = Kf_ℓ[s] · (total of the right half)   for s in the left half

where a half's total is the product of its factors = its last ``Qf_ℓ``. The reverse direction
is the mirror image (suffix and prefix swapped, totals are first elements). After the last
level ``Qf`` and ``Kf`` are exactly the chunk-wide factors the states need, and the chunk's
total decay is the product of the last level's two half totals (the same value as ``Qf``'s
last, reverse: first, row, taken without a reduction over the chunk's rows). Every factor is
still a product of at most C factors in [0, 1], formed in a different association: the same
``(n + 1)·eps`` bound, no overflow, a -1e4 gate gives an exact 0.

**The ratio chunk math** (``RATIO``, the default). Where every gate a program's walk reads is
>= ``-32 / C``, a chunk's decays stay >= e^-32, and the pair (t, s) can decay by a plain
ratio, ``Qf[t] · exp(-G[s])`` with ``Qf = exp(G)`` and ``G`` the gates' prefix sum within the
chunk (a dot with a 0/1 triangle): the scores are then one split dot, ``(q ⊙ Qf) · (k ⊙
exp(-G))ᵀ``, masked, instead of one per level (``_ratio_scores``). The hierarchy above stays
for walks with a stronger gate (down to -1e4, where the ratio's inverse would overflow); the
test is made once per program, before its walk (``_gates_allow_ratio``), so each walk is
compiled with one chunk math in its loop. H100, bf16, forward (NOTES.md session 18): vigT_224
88.1 -> 59.0 µs, vigB_224 171.2 -> 112.5, vigT_1024 153.8 -> 124.9, lm_4k 2124 -> 1173;
``kernels_single_pass_bwd.py`` does the same in both passes. The cost: the forward kernel
compiles about twice as long (two walks per direction).

Requirements (checked by the launcher): one K block (K <= ``BK`` <= 128); a sequence longer
than one segment needs its boundary states first. Masked rows past ``T`` carry q = k = v = 0
and decay 1, so they change nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (_SPLIT_IN_PTX, _chunk_allows_ratio, _dot, _dot_acc, _level_mask, _load_state, _ratio_factors, _row,
                      _sequence_rows, _store_state, _tile, one_line_ptx)


@triton.jit
def _next_level(Qf, Kf, pair, LVL: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr):
    """Level ``LVL + 1``'s factors from level ``LVL``'s (see the module docstring), and each
    half's ``own total · other half's total`` (``pair``, ``[NB, 2, BK]``): the totals of the
    next level's halves, and after the last level the chunk's total (``_total_of_pair``).
    ``pair`` comes in from the level before (unused at level 0)."""
    HALF: tl.constexpr = 1 << LVL
    NB: tl.constexpr = C // (2 * HALF)
    q4 = tl.reshape(Qf, (NB, 2, HALF, BK))
    k4 = tl.reshape(Kf, (NB, 2, HALF, BK))
    # each half's total decay, [NB, 2, BK]: at level 0 the factor itself; above, the pair
    # the level before formed for that half (held twice, bitwise equal: their sum halved is
    # exact). The same value as the half's last (reverse: first) Qf, without a reduction
    # over its rows.
    if LVL == 0:
        totals = tl.reshape(Qf, (NB, 2, BK))
    else:
        totals = tl.sum(tl.reshape(pair, (NB, 2, 2, BK)), axis=2) * 0.5
    # each half gets the other half's total: a bitwise swap of the two (one reduction where
    # picking left and right out by masked sums took two: H100, 5-7 % off the forward,
    # NOTES.md session 5, run 9)
    other3 = tl.flip(totals, 1)
    other = other3[:, :, None, :]
    side4 = tl.arange(0, 2)[None, :, None, None]
    if REV:
        q4 = q4 * tl.where(side4 == 0, other, 1.0)
        k4 = k4 * tl.where(side4 == 1, other, 1.0)
    else:
        q4 = q4 * tl.where(side4 == 1, other, 1.0)
        k4 = k4 * tl.where(side4 == 0, other, 1.0)
    return tl.reshape(q4, (C, BK)), tl.reshape(k4, (C, BK)), totals * other3


@triton.jit
def _total_of_pair(pair, BK: tl.constexpr):
    """The chunk's total decay per column from the last level's ``pair`` (both halves hold
    left·right, bitwise equal: float multiplication commutes); their sum halved is exact."""
    return tl.sum(tl.reshape(pair, (2, BK)), axis=0) * 0.5


@triton.jit
def _level_scores(qt, kt, gt, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr,
                  DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """A chunk's scores ``A`` (masked to this direction's pairs and the own token), its
    chunk-wide factors ``Qf`` and ``Kf`` and its total decay, by the binary hierarchy of the
    module docstring: stable for every gate in ``[-1e4, 0]``."""
    rows = tl.arange(0, C)
    qf32 = qt.to(tl.float32)
    kf32 = kt.to(tl.float32)
    Qf = tl.exp(gt.to(tl.float32))
    Kf = tl.full([C, BK], 1.0, tl.float32)
    # the own token, decay 1: q·k from a dot of the tiles as loaded, not a row sum. A row sum's
    # order of additions follows the tile's layout, which follows the warp count (2 warps: 8
    # columns a thread, then 4 lanes; 4 warps: 4, then 8), so bfloat16 results would change
    # with the warps; a dot adds in the same order at any warp count, which lets the launcher
    # pick warps by grid size without a sequence's result depending on the batch (DESIGN §9)
    A = tl.where(rows[:, None] == rows[None, :], _dot(qt, tl.trans(kt), DOT_BF16, PRECISION), 0.0)
    pair = Qf  # (unused at level 0)
    for LVL in tl.static_range(LOG2C):
        # level 0: Kf = 1, and the key tile goes in as loaded (exact in bfloat16: one dot fewer)
        s = _dot(qf32 * Qf, tl.trans(kt if LVL == 0 else kf32 * Kf), DOT_BF16, PRECISION)
        A += tl.where(_level_mask(C, LVL, REV), s, 0.0)
        Qf, Kf, pair = _next_level(Qf, Kf, pair, LVL, C, BK, REV)
    return A, Qf, Kf, _total_of_pair(pair, BK)


@triton.jit
def _ratio_scores(qt, kt, gt, C: tl.constexpr, REV: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """What ``_level_scores`` gives, for a chunk whose gates are all >= ``_ratio_min_gate(C)``,
    in one score dot: ``A = (q ⊙ Qf) · (k ⊙ Qf⁻¹)ᵀ``, masked (``_ratio_factors``), returned
    with its two operands ``qh = q ⊙ Qf`` and ``kh = k ⊙ Qf⁻¹`` and the chunk's total
    decay. Each term of a score is the exact term to the same relative error as in the
    hierarchy (the split dot keeps ~2^-17 of each operand, whatever its size), so nothing is
    lost to the inverses."""
    rows = tl.arange(0, C)
    Qf, inv, total = _ratio_factors(gt, C, REV, DOT_BF16, PRECISION)
    qh = qt.to(tl.float32) * Qf
    kh = kt.to(tl.float32) * inv
    keep = (rows[:, None] <= rows[None, :]) if REV else (rows[:, None] >= rows[None, :])
    return tl.where(keep, _dot(qh, tl.trans(kh), DOT_BF16, PRECISION), 0.0), qh, kh, total


@triton.jit
def _chunk_math(qt, kt, vt, gt, state, C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr,
                REV: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, RATIO: tl.constexpr):
    """One direction over one chunk: its (unscaled) part of the chunk's output, given the state
    entering the chunk in this direction, and the state leaving it. ``RATIO`` (``_walk``): 0,
    the hierarchy's scores; 1, ``_ratio_scores`` (the caller checked the gates); 2, either,
    by this chunk's gates."""
    if RATIO == 2:
        by_ratio = _chunk_allows_ratio(gt, C)
    else:  # (a compile-time choice: one chunk math in the loop)
        by_ratio = RATIO == 1
    if by_ratio:
        A, qh, kh, total = _ratio_scores(qt, kt, gt, C, REV, DOT_BF16, PRECISION)
        # k ⊙ Kf is kh with each column scaled by the chunk's total decay: the total scales
        # the updated state instead, kh's operand parts serve both of its dots, and the state
        # terms go in as the dots' accumulators (AOT sm_90, ViG-T's step: 1,177 -> 1,110
        # SASS instructions against Kf's own product and split and additions after the dots)
        out = _dot_acc(qh, state, _dot(A, vt, DOT_BF16, PRECISION), DOT_BF16, PRECISION)
        state = total[:, None] * _dot_acc(tl.trans(kh), vt, state, DOT_BF16, PRECISION)
    else:
        A, Qf, Kf, total = _level_scores(qt, kt, gt, C, LOG2C, BK, REV, DOT_BF16, PRECISION)
        out = _dot(A, vt, DOT_BF16, PRECISION) + _dot(qt.to(tl.float32) * Qf, state, DOT_BF16, PRECISION)
        state = total[:, None] * state + _dot(tl.trans(kt.to(tl.float32) * Kf), vt, DOT_BF16, PRECISION)
    return out, state


@triton.jit
def _look(flag, i, n_walk):
    """The chunk's count, read (acquire) by a program that reaches the chunk at step ``i`` of
    its ``n_walk`` in the second half of its walk: the other direction, walking the other way,
    got there at step ``n_walk - 1 - i``, so its part(s) are most likely parked already, and a
    count of 1 lets this program finish the chunk without parking or counting. 0 otherwise."""
    arrived = 0
    if i > n_walk - 1 - i:
        arrived = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
    return arrived


@triton.jit
def _count(flag):
    """Count the chunk's parts once this program's are parked (every thread's stores before
    the count, see the barrier): 1 means the other's are parked too, and this program adds
    them and writes. The first to count never writes, and counts last: once its count is
    seen, it is done with the chunk."""
    tl.debug_barrier()
    arrived = tl.atomic_add(flag, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    return arrived


#: Read the count at $1 (acquire, GPU scope) until it is not 1 or $2 reads were made; $0: the
#: last value read (unused). One asm block, so that the compiler sees no loop inside the walks' chunk
#: loop: the same wait as a ``while`` loop there raised the backward's pass B from 88 to 696
#: bytes of spills (AOT sm_90, ViG-T's shape; NOTES.md session 26). (Labels are local to the
#: braces, so each inlined copy has its own; not unrolled: ptxas unrolled it 64 times.)
_POLL_PTX = one_line_ptx("""
        {
        .reg .pred p;
        .reg .u32 n;
        mov.u32 n, 0;
        POLL:
        .pragma "nounroll";
        ld.acquire.gpu.global.b32 $0, [$1];
        setp.ne.u32 p, $0, 1;
        @p bra DONE;
        add.u32 n, n, 1;
        setp.lt.u32 p, n, $2;
        @p bra POLL;
        DONE:
        }
        """)


@triton.jit
def _poll(meet, SPIN: tl.constexpr):
    """Wait until the count at ``meet`` is not 1, or for ``|SPIN|`` reads. Every thread reads for
    itself, so threads of different warps may stop on different values: what was seen decides
    nothing (``_meet`` decides by one compare-and-swap, the same for the whole program).

    ``SPIN >= 0`` reads through ``_POLL_PTX`` (NVIDIA, compiled); a negative ``SPIN`` through
    a loop of atomic reads, which a traced launch uses (``launch._meet_spin``): Inductor's
    analysis of which tensors a kernel writes stops at inline PTX with side effects and then
    takes every tensor argument for written, so its graph copied the forward's float32
    scratch three times around each launch (NOTES.md, session 29)."""
    READS: tl.constexpr = -SPIN if SPIN < 0 else SPIN
    if _SPLIT_IN_PTX and SPIN >= 0:  # (NVIDIA and compiled: the same switch as the PTX split's)
        tl.inline_asm_elementwise(asm=_POLL_PTX, constraints="=r,l,r", args=[meet, tl.full([], READS, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        seen = tl.full([], 1, tl.int32)
        tries = 0
        while (seen == 1) & (tries < READS):
            seen = tl.atomic_add(meet, 0, sem="acquire", scope="gpu")
            tries += 1


@triton.jit
def _meet(meet, DIRECTION: tl.constexpr, SPIN: tl.constexpr):
    """The two directions' one meeting, at the middle of their walks (``HANDOFF`` 3): each has
    parked the parts of its first half (and of the middle chunk, if there is one) and counts
    itself in (release: those parts are visible to whoever reads the count). The second to
    count may add the other's parked parts in its whole second half. The first waits for the
    second, reading the count up to ``SPIN`` times; if the second does not come (it may not
    even be resident), the first marks that it gave up (``3 + DIRECTION``, by compare-and-swap,
    so that a second arriving meanwhile is seen) and parks its second half too, to be summed by
    whichever finishes last (``_tail``). Nobody waits unboundedly: no deadlock in any order
    programs run in. Returns (whether this program adds the other's parts in its second half,
    the direction that gave up or -1)."""
    D: tl.constexpr = 1 if DIRECTION else 0
    tl.debug_barrier()  # (every thread's parked stores before the count)
    prev = tl.atomic_add(meet, 1, sem="acq_rel", scope="gpu")
    paired = tl.where(prev != 0, 1, 0)
    quitter = tl.where(prev >= 3, prev - 3, -1)
    if prev == 0:
        _poll(meet, SPIN)
        # 2: the other came (acquire: its parked parts are visible); 1: give up (now 3 + D)
        seen = tl.atomic_cas(meet, 1, 3 + D, sem="acq_rel", scope="gpu")
        paired = tl.where(seen == 2, 1, 0)
        quitter = tl.where(seen == 2, -1, D)
    tl.debug_barrier()
    return paired, quitter


@triton.jit
def _tail_chunks(end, c_lo, n_walk):
    """After a direction gave up at the meeting (``_meet``), the chunks of its second half have
    both parts parked and no output. Both programs count themselves out on the segment's
    second counter (after their parked stores); returns the chunks the last of the two to
    finish sums (first, count), and a count of 0 to the other.

    Which direction gave up is read back from the meeting's counter (``end - 1``), which holds
    4 + that direction once both have passed the meeting, as they have when the last counts
    out (acquire on ``end``). Not passed in: a value the walk's call returns would tie, in
    Inductor's analysis of a traced kernel, these chunks' store addresses to every pointer the
    walk received (q, k, v, g), which it would then take for written (NOTES.md, session 29)."""
    tl.debug_barrier()
    last = tl.atomic_add(end, 1, sem="acq_rel", scope="gpu") == 1
    quitter = tl.atomic_add(end - 1, 0, sem="acquire", scope="gpu") - 4
    tl.debug_barrier()
    half = n_walk // 2  # (the middle chunk, if any, was summed by the one that stayed)
    return tl.where(quitter == 0, c_lo + n_walk - half, c_lo), tl.where(last, half, 0)


@triton.jit
def _tail(part, other_part, o, end, row_part, row_v, T, V, scale, stride_v, cols_v, ok_v, c_lo, n_chunks,
          C: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """``o`` of the chunks ``_tail_chunks`` gives this program, from both parked parts: the same
    float32 addition as in the walk (bitwise the same)."""
    first, count = _tail_chunks(end, c_lo, n_chunks)
    for j in range(0, count):
        t0 = (first + j) * C
        n0 = tl.minimum(C, T - t0)
        p_at, p_mask = _chunk_at(row_part, V, cols_v, ok_v, t0, n0, C, WIDE_ROWS)
        total = (tl.load(part + p_at, mask=p_mask, other=0.0, cache_modifier=".cg")
                 + tl.load(other_part + p_at, mask=p_mask, other=0.0, cache_modifier=".cg"))
        o_at, o_mask = _chunk_at(row_v, stride_v, cols_v, ok_v, t0, n0, C, WIDE_ROWS)
        tl.store(o + o_at, (scale * total).to(o.dtype.element_ty), mask=o_mask)


@triton.jit
def _rows_ptrs(base, row0, t0, n_valid, stride_t, cols, ncols, C: tl.constexpr):
    rows = tl.arange(0, C)
    ok = rows < n_valid
    offs = row0 + tl.where(ok, t0 + rows, 0)[:, None].to(tl.int64) * stride_t + cols[None, :]
    return base + offs, ok[:, None] & (cols < ncols)[None, :]


@triton.jit
def _chunk_at(base, stride_t, cols, col_ok, t0, n_valid, C: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """Element offsets and mask of chunk rows ``t0 .. t0 + n_valid - 1`` of a tile: a 64-bit
    scalar start and offsets within the chunk in 32 bits, unless a chunk's rows span 2^31
    elements or more (``WIDE_ROWS``, set by the launcher). AOT sm_90, the forward's ratio
    step: 1,048 -> 1,006 SASS instructions against 64-bit offsets, 1,058 against
    ``_tile``'s per-row 64-bit arithmetic. Rows past ``n_valid`` point at the chunk's first
    row (at the sequence's start for a chunk with no rows), in range as ``_tile``'s are."""
    rows = tl.arange(0, C)
    ok = rows < n_valid
    start = base + tl.where(n_valid > 0, t0, 0).to(tl.int64) * stride_t
    offs = tl.where(ok, rows, 0)[:, None].to(tl.int64 if WIDE_ROWS else tl.int32) * stride_t + cols[None, :]
    return start + offs, ok[:, None] & col_ok[None, :]


@triton.jit
def _load_chunk(q, k, v, g, row_qk, row_v, t0, n_valid, stride_qk, stride_v, cols_k, cols_v, ok_k, ok_v,
                C: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """A chunk's q, k, v and log-gate tiles, as stored (rows past ``n_valid`` read as 0)."""
    at, mask = _chunk_at(row_qk, stride_qk, cols_k, ok_k, t0, n_valid, C, WIDE_ROWS)
    qt = tl.load(q + at, mask=mask, other=0.0)
    kt = tl.load(k + at, mask=mask, other=0.0)
    gt = tl.load(g + at, mask=mask, other=0.0)
    at, mask = _chunk_at(row_v, stride_v, cols_v, ok_v, t0, n_valid, C, WIDE_ROWS)
    return qt, kt, tl.load(v + at, mask=mask, other=0.0), gt


@triton.jit
def _direction_walk(q, k, v, g, o, part, flags, row_qk, row_v, row_part, other_part, row_flags, T, K, V, scale,
                    stride_qk, stride_v, cols_k, cols_v, state, c_lo, c_hi,
                    C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr,
                    HANDOFF: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr,
                    RATIO: tl.constexpr, WIDE_ROWS: tl.constexpr, SPIN: tl.constexpr = 0):
    """Walk chunks ``c_lo .. c_hi - 1`` in this direction's order, writing each chunk's part
    (``HANDOFF`` 0, causal), handing it over per chunk (1), parking it (2) or meeting the other
    direction once in the middle (3, ``_meet``); returns the leaving state and the direction
    that gave up at the meeting (or -1). Every tile's element offsets within a chunk are formed
    once, before the walk (``_chunk_at``)."""
    n_chunks = c_hi - c_lo
    first = c_hi - 1 if REV else c_lo
    ok_k = cols_k < K
    ok_v = cols_v < V
    nq, nk, nv, ng = _load_chunk(q, k, v, g, row_qk, row_v, first * C, tl.minimum(C, T - first * C), stride_qk,
                                 stride_v, cols_k, cols_v, ok_k, ok_v, C, WIDE_ROWS)
    paired = tl.full([], 0, tl.int32)  # 1 past the meeting if the other's parts are parked
    quitter = tl.full([], -1, tl.int32)
    for i in range(0, n_chunks):
        c = c_hi - 1 - i if REV else c_lo + i
        t0 = c * C
        n0 = tl.minimum(C, T - t0)
        # the next chunk's loads go out before this chunk's math (none past the last chunk):
        # their latency hides behind it (measured 94 -> 75 us at vigT_224 on an H100)
        qt, kt, vt, gt = nq, nk, nv, ng
        c_next = c - 1 if REV else c + 1
        n_next = tl.where(i + 1 < n_chunks, tl.minimum(C, T - c_next * C), 0)
        nq, nk, nv, ng = _load_chunk(q, k, v, g, row_qk, row_v, c_next * C, n_next, stride_qk, stride_v,
                                     cols_k, cols_v, ok_k, ok_v, C, WIDE_ROWS)
        p_at, p_mask = _chunk_at(row_part, V, cols_v, ok_v, t0, n0, C, WIDE_ROWS)
        out, state = _chunk_math(qt, kt, vt, gt, state, C, LOG2C, BK, REV, DOT_BF16, PRECISION, RATIO)
        o_at, o_mask = _chunk_at(row_v, stride_v, cols_v, ok_v, t0, n0, C, WIDE_ROWS)
        if HANDOFF == 3:
            # first half (and the middle chunk): park; then, once, the meeting; second half:
            # add the other's part and write, or park if the other never came
            if (2 * i <= n_chunks - 1) | (paired == 0):
                tl.store(part + p_at, out, mask=p_mask)
            if i == n_chunks // 2:
                paired, quitter = _meet(flags + row_flags + c_lo, REV, SPIN)
            if (paired != 0) & (2 * i >= n_chunks - 1):
                # (loaded here, not ahead with the next chunk's tiles: held across the step it
                # cost spills, H100 vigT_224 53.0 against 48.8 µs, NOTES.md session 26)
                out += tl.load(other_part + p_at, mask=p_mask, other=0.0, cache_modifier=".cg")
                tl.store(o + o_at, (scale * out).to(o.dtype.element_ty), mask=o_mask)
        elif HANDOFF == 2:  # park every part; _gla_fwd_sum_parts_kernel writes o afterwards
            tl.store(part + p_at, out, mask=p_mask)
        elif HANDOFF == 1:
            arrived = _look(flags + row_flags + c, i, n_chunks)
            if arrived == 0:  # park this direction's part, then count
                tl.store(part + p_at, out, mask=p_mask)
                arrived = _count(flags + row_flags + c)
            if arrived == 1:
                out += tl.load(other_part + p_at, mask=p_mask, other=0.0, cache_modifier=".cg")
                tl.store(o + o_at, (scale * out).to(o.dtype.element_ty), mask=o_mask)
        else:
            tl.store(o + o_at, (scale * out).to(o.dtype.element_ty), mask=o_mask)
    return state, quitter


@triton.jit
def _gates_allow_ratio(g, row_qk, T, stride_qk, cols_k, K, c_lo, c_hi, C: tl.constexpr, BK: tl.constexpr):
    """Whether every gate of chunks ``c_lo .. c_hi - 1`` is >= ``_ratio_min_gate(C)``: an
    element-wise minimum over the chunks' gate tiles (independent loads), one reduction at
    the end; a minimum is exact, so the answer is the same at any launch setting."""
    rows = tl.arange(0, C)
    low = tl.zeros([C, BK], dtype=tl.float32)
    for c in range(c_lo, c_hi):
        t0 = c * C
        gt = _tile(g, row_qk, t0 + rows, rows < T - t0, stride_qk, cols_k, K)
        low = tl.minimum(low, gt.to(tl.float32))
    return _chunk_allows_ratio(low, C)


@triton.jit
def _walk(q, k, v, g, o, part, flags, row_qk, row_v, row_part, other_part, row_flags, T, K, V, scale,
          stride_qk, stride_v, cols_k, cols_v, state, c_lo, c_hi,
          C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr,
          HANDOFF: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, RATIO: tl.constexpr,
          WIDE_ROWS: tl.constexpr, SPIN: tl.constexpr = 0):
    """``_direction_walk`` with the chunk math ``RATIO`` asks for: 0, the hierarchy; 1, the
    ratio math where every gate of the walk allows it (checked first, one test per program,
    so that each of the two walks compiles with only its own chunk math in its loop); 2, a
    test per chunk, both maths in one loop (the forward's AOT sm_90 compile at 2 warps spilled
    868 bytes against 332 with 1; ``Config.single_pass_ratio_per_chunk``)."""
    if RATIO == 1:
        if _gates_allow_ratio(g, row_qk, T, stride_qk, cols_k, K, c_lo, c_hi, C, BK):
            state, quitter = _direction_walk(q, k, v, g, o, part, flags, row_qk, row_v, row_part, other_part,
                                             row_flags, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v, state,
                                             c_lo, c_hi, C, LOG2C, BK, REV, HANDOFF, DOT_BF16, PRECISION, 1,
                                             WIDE_ROWS, SPIN)
        else:
            state, quitter = _direction_walk(q, k, v, g, o, part, flags, row_qk, row_v, row_part, other_part,
                                             row_flags, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v, state,
                                             c_lo, c_hi, C, LOG2C, BK, REV, HANDOFF, DOT_BF16, PRECISION, 0,
                                             WIDE_ROWS, SPIN)
    else:
        state, quitter = _direction_walk(q, k, v, g, o, part, flags, row_qk, row_v, row_part, other_part,
                                         row_flags, T, K, V, scale, stride_qk, stride_v, cols_k, cols_v, state,
                                         c_lo, c_hi, C, LOG2C, BK, REV, HANDOFF, DOT_BF16, PRECISION, RATIO,
                                         WIDE_ROWS, SPIN)
    if HANDOFF == 3:  # (here, not in each chunk math's walk: one copy of it to compile)
        # (a one-chunk walk leaves no chunk to sum, and its second counter would be the next
        # segment's or sequence's first)
        if (quitter >= 0) & (c_hi - c_lo >= 2):
            _tail(part, other_part, o, flags + row_flags + c_lo + 1, row_part, row_v, T, V, scale, stride_v,
                  cols_v, cols_v < V, c_lo, c_hi - c_lo, C, WIDE_ROWS)
    return state


@triton.jit
def _gla_fwd_single_pass_kernel(
    q, k, v, g, gr, o, part, flags, h0, ht, bstates,
    T, H, K, V, scale, SEG_CHUNKS,
    C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BIDIR: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, HAS_BSTATES: tl.constexpr,
    DOT_BF16: tl.constexpr, PRECISION: tl.constexpr, PARK_ALL: tl.constexpr = False,
    RATIO: tl.constexpr = 0, WIDE_ROWS: tl.constexpr = False, MEET: tl.constexpr = False,
    SPIN: tl.constexpr = 0,
):
    """Forward with one program per (batch·head, direction, V block, segment): each walks one
    direction only, so its dependency chain is half as long as when one program walks both. A
    chunk's two parts meet through ``part`` (``[2, B·H, N·C, V]`` float32) and ``flags``
    (``[B·H·V blocks, N]`` int32, zero on entry): with ``MEET``, once in the middle of the
    walks on the counters at a segment's first two chunks (``_meet``, ``_tail``); without it,
    chunk by chunk on each chunk's counter (a direction parks its part and increments it; the
    one that finds 1 there adds the other's part and writes ``o``); see the module docstring.
    The sum is one addition of two float32 values, the same whichever adds: bitwise
    reproducible.

    Long sequences are cut into segments of ``SEG_CHUNKS`` chunks, one program each, starting
    from the boundary states (``bstates``, see ``kernels_boundary_states.py``): F at the
    segment's left edge, R at its right edge. Without ``HAS_BSTATES`` there is one segment."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch.compile) passes floats as float64
    pid = tl.program_id(0)
    vb = tl.program_id(1)
    seg = tl.program_id(2)
    NSEG = tl.num_programs(2)
    NDIR: tl.constexpr = 2 if BIDIR else 1
    HANDOFF: tl.constexpr = (2 if PARK_ALL else (3 if MEET else 1)) if BIDIR else 0
    bh = pid // NDIR
    BH = tl.num_programs(0) // NDIR
    direction = pid % NDIR
    row_qk, row_v = _sequence_rows(bh, T, H, K, V)
    stride_qk = H * K
    stride_v = H * V
    cols_k = tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    kv = tl.cast(K, tl.int64) * V
    n_chunks = tl.cdiv(T, C)
    c_lo = seg * SEG_CHUNKS
    c_hi = tl.minimum(c_lo + SEG_CHUNKS, n_chunks)
    row_part = bh.to(tl.int64) * n_chunks * C * V
    part_size = BH.to(tl.int64) * n_chunks * C * V
    row_flags = (bh * tl.num_programs(1) + vb) * n_chunks
    # this sequence's boundary states: slot 0 (F) at boundary 0
    bst = bstates + bh.to(tl.int64) * (NSEG + 1) * kv
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if direction == 0:
        if HAS_BSTATES:
            state = _load_state(bst + seg * kv, cols_k, cols_v, K, V)
        elif HAS_H0:
            state = _load_state(h0 + bh.to(tl.int64) * kv, cols_k, cols_v, K, V)
        state = _walk(q, k, v, g, o, part, flags, row_qk, row_v, row_part, part + part_size, row_flags,
                      T, K, V, scale, stride_qk, stride_v, cols_k, cols_v, state, c_lo, c_hi,
                      C, LOG2C, BK, False, HANDOFF, DOT_BF16, PRECISION, RATIO, WIDE_ROWS, SPIN)
        if STORE_HT:
            _store_state(ht + bh.to(tl.int64) * kv, state, cols_k, cols_v, K, V)
    else:
        if HAS_BSTATES:
            state = _load_state(bst + BH.to(tl.int64) * (NSEG + 1) * kv + (seg + 1) * kv, cols_k, cols_v, K, V)
        _walk(q, k, v, gr, o, part + part_size, flags, row_qk, row_v, row_part, part, row_flags,
              T, K, V, scale, stride_qk, stride_v, cols_k, cols_v, state, c_lo, c_hi,
              C, LOG2C, BK, True, HANDOFF, DOT_BF16, PRECISION, RATIO, WIDE_ROWS, SPIN)


@triton.jit
def _gla_fwd_sum_parts_kernel(part, o, T, H, V, PART_ROWS, scale, ROWS: tl.constexpr, BV: tl.constexpr):
    """``o = scale · (forward part + reverse part)`` after a forward launch with ``PARK_ALL``:
    one program per (batch·head, ``ROWS`` tokens, V block), every load independent of the
    others. The same float32 addition and multiplication as the per-chunk handoff makes
    (addition commutes), so ``o`` is the same bit for bit either way."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch.compile) passes floats as float64
    bh = tl.program_id(0)
    t0 = tl.program_id(1) * ROWS
    cols = tl.program_id(2) * BV + tl.arange(0, BV)
    row_part = bh.to(tl.int64) * PART_ROWS * V  # (PART_ROWS: the sequence's chunks, whole)
    part_size = tl.num_programs(0).to(tl.int64) * PART_ROWS * V
    n0 = tl.minimum(ROWS, T - t0)
    f_ptrs, mask = _rows_ptrs(part, row_part, t0, n0, V, cols, V, ROWS)
    total = tl.load(f_ptrs, mask=mask, other=0.0) + tl.load(f_ptrs + part_size, mask=mask, other=0.0)
    _, row_v = _sequence_rows(bh, T, H, 1, V)
    o_ptrs, o_mask = _rows_ptrs(o, row_v, t0, n0, H * V, cols, V, ROWS)
    tl.store(o_ptrs, (scale * total).to(o.dtype.element_ty), mask=o_mask)
