"""Chunked gated linear attention in Triton: forward and backward, causal and bidirectional,
both directions in one launch. Launchers live in ``launch.py``; this file holds only kernels.

Algorithm
=========

Notation per (batch, head) sequence: log gates ``g`` (forward direction) and ``gr`` (reverse
direction), decay factors ``f = exp(g)``, ``fr = exp(gr)`` (each in [0, 1]). The causal
recurrence is ``S_t = diag(f_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale · S_tᵀ q_t``; the reverse one
runs the same over flipped time with ``fr``. So token ``t`` sees token ``s`` with the weight

    forward (s <= t):  decay(t, s) = prod_{s < u <= t} f_u
    reverse (s >= t):  decay(t, s) = prod_{t <= u < s} fr_u

**Decays are products, never differences.** Every decay is formed as a cumulative *product* of
factors in [0, 1] (``tl.cumprod`` over a tile, restarted at segment boundaries), never as
``exp(G_t − G_s)`` from cumulative log sums: there is no overflow (no factor exceeds 1), no
cancellation (a product of n factors has relative error <= n·eps whatever the size of the log
sums: after a -1e4 gate the factor is exactly 0 and the products restart cleanly), and no gate
clamping. The error bound of every decay is (number of factors + 1)·eps_float32 relative,
i.e. <= 260 · 6e-8 = 1.6e-5 for the longest product (a 256-token segment), typically sqrt of
that; everything else is ordinary float32 accumulation. (One exception, where it is safe: the
ratio form of the backward's intra-chunk scores, below.)

**Intra-chunk scores without division: a binary hierarchy of reference points.** Time is cut
into chunks of ``C`` tokens (C a power of two). Inside a chunk, the pair (t, s) with s < t is
split at the highest bit ℓ where t and s differ: s lies in the left half and t in the right
half of one aligned block of 2·2^ℓ tokens, and the decay factors at the boundary ``m`` between
the halves into two products that never exceed 1:

    decay(t, s) = [prod_{m < u <= t} f_u] · [prod_{s < u <= m} f_u]
                =  Qf_ℓ[t]  ·  Kf_ℓ[s]

``Qf_ℓ`` is the inclusive prefix product within 2^ℓ-token segments, ``Kf_ℓ`` the exclusive
suffix product within them. So the score matrix is, per level ℓ = 0 .. log2(C) − 1,
``A += mask_ℓ ⊙ ((q ⊙ Qf_ℓ) (k ⊙ Kf_ℓ)ᵀ)`` — one tensor-core matmul per level — plus the
diagonal ``q_t · k_t`` (decay 1). The reverse direction is the mirror image (upper triangle,
``Qr_ℓ`` = inclusive suffix, ``Kr_ℓ`` = exclusive prefix products of ``fr``), and both
directions add into one score matrix, so ``o = (A_fwd + A_rev) v`` is one matmul.

**The ratio form (backward).** Where a chunk's gates (within a K tile) are all >= -32 / C,
the backward takes the pairs' decays as ``exp(G_t) · exp(-G_s)`` with ``G`` the gates' prefix
sum within the chunk (``_ratio_factors``, ``_ratio_pairs``): one dot each for the scores, dq
and dk instead of three a level. The bound keeps every inverse <= e^32, so both factors are
finite and the split dots keep each term to ~2^-17 of its size, as in the hierarchy. Each
chunk tests its own gates, so a strong gate sends only its chunk (and K tile) to the
hierarchy (H100, bf16, lm_4k forward+backward 7.30 -> 6.25 ms; NOTES.md session 19). The
forward here keeps the hierarchy: by default it runs only for K > 128, the single-pass forward (which
has the ratio form of its own, per walk) taking everything else.

**Across chunks: states.** With ``qbar = q ⊙ (prefix product of f from the chunk start)``,
``kbar = k ⊙ (exclusive suffix product of f to the chunk end)`` and ``Γ`` the chunk's total
product, the forward state at chunk boundaries obeys ``F[n+1] = Γ_n ⊙ F[n] + kbar_nᵀ v_n`` and
the chunk's output gains ``qbar F[n]``. The reverse state ``R`` runs right to left the same way
(``R[n] = Γr_n ⊙ R[n+1] + kbarr_nᵀ v_n``) and the chunk gains ``qbarr R[n+1]``. Then

    o_chunk = scale' · ( (A_fwd + A_rev) v + qbar F[n] + qbarr R[n+1] ),   scale' = ½·scale
    (bidirectional) or scale (causal).

**Launch structure.** The sequence is cut into segments of ``SEG`` tokens (a multiple of C).

* ``_gla_fwd_kernel``, one program per (batch·head, segment, V block). Phase 1 walks the
  segment's chunks left to right for ``F`` and right to left for ``R`` at once (two
  independent chains), starting from the segment's boundary states, and parks each chunk's
  entering states in a float32 scratch buffer. A CTA barrier (``bar.sync`` orders the
  threads' global stores before the other threads' loads). Phase 2 computes every chunk's
  output (scores + states) and writes ``o`` once — the two directions are combined in
  registers, no atomics, bitwise deterministic.
* For short sequences (the whole sequence is one segment: ViG at 224 px) that is the only
  launch. (With K, V <= 64 those now run the single-pass kernels of
  ``kernels_single_pass.py`` and ``kernels_single_pass_bwd.py`` instead, which walk each
  direction in its own program: on an H100 at vigT_224 the forward is 2.7× faster, and
  forward+backward 1.9× faster with the single-pass backward than with this one.)
* For long ones, the states at segment boundaries come first, from two chunk-parallel
  launches (``kernels_boundary_states.py``: every segment's own contribution at once, then a
  scan that composes them), and the segment programs start from them. When a segment is one
  chunk (``ONE_CHUNK``), phase 1 has nothing to walk: phase 2 reads the boundary states
  directly and the segment programs are fully parallel.

**Backward**, same structure. With ``dA = dO vᵀ`` (shared by both directions),

    dq_fwd = scale'·[ Σ_ℓ Qf_ℓ ⊙ ((dA ⊙ mask_ℓ)(k ⊙ Kf_ℓ)) + diag(dA) k + qf ⊙ (dO F[n]ᵀ) ]
    dk_fwd = scale'·[ Σ_ℓ Kf_ℓ ⊙ ((dA ⊙ mask_ℓ)ᵀ(q ⊙ Qf_ℓ)) + diag(dA) q ] + kf ⊙ (v dF[n+1]ᵀ)
    dv     = scale'·(A_fwd + A_rev)ᵀ dO + kbar dF[n+1] + kbarr dR[n]

(reverse direction mirrored), where the state gradients run the opposite way to the states:
``dF[n] = Γ_n ⊙ dF[n+1] + scale'·qbar_nᵀ dO_n`` (right to left, from ``dF[N]`` = gradient of
the final state) and ``dR[n+1] = Γr_n ⊙ dR[n] + scale'·qbarr_nᵀ dO_n`` (left to right). So the
backward needs four walks — F and dR left to right, R and dF right to left — which phase 1 runs
from the segment boundary states (``kernels_boundary_states.py`` computes all four for long
inputs).

Gate gradients use the identity of Yang et al. (2023): with ``dG_t = q_t ⊙ dq_t − k_t ⊙ dk_t``
(this direction's dq, dk, without the diagonal terms, which cancel), ``dg_r = Σ_{t >= r} dG_t``.
The sum is hierarchical: within the chunk it is a direct suffix sum (``tl.cumsum(reverse)``),
and everything after the chunk is one closed-form term — adding δ to the gate of the first
token after the chunk scales the state ``F[n+1]`` by e^δ, so

    Σ_{t > chunk n} dG_t (+ the final-state term) = Σ_v F[n+1] ⊙ dF[n+1]

(for the reverse direction, the prefix sum within the chunk plus ``Σ_v R[n] ⊙ dR[n]``). No
total-minus-prefix differences anywhere, no cross-chunk scan.

Numerics: accumulation is float32. Matmuls (``_dot``) take float32 operands for float32
inputs — IEEE, tf32 only when the caller allows it (see ``launch.py``) — and bfloat16
tensor-core operands for float16 and bfloat16 inputs, where every float32 intermediate is
split into a high and a low bfloat16 part (``_dot_bf16x3``, about float32 accuracy; a single
rounded bfloat16 dot only under PyTorch's "medium" matmul precision). Never float16
operands: the states could overflow it. States and scratch are float32. All index
arithmetic that can pass 2³¹ is int64 (the single-pass forward's offsets within a chunk are
32-bit where the launcher knows a chunk spans fewer elements: ``kernels_single_pass._chunk_at``),
and masked-out lanes carry in-range addresses (see ``_tile``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

# bfloat16 splits (``_split_bf16``) in inline PTX: on NVIDIA GPUs only — not under Triton's
# interpreter (it runs no PTX; read as Triton reads it, when the kernels are defined) or ROCm
_SPLIT_IN_PTX = tl.constexpr(not interpreter_enabled() and torch.version.hip is None)

# ------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _dot(a, b, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """Matmul with float32 accumulation in the operand format chosen for the input dtype
    (``launch._dot_mode``): bfloat16 tensor-core operands (``PRECISION`` "bf16": rounded,
    "bf16x3": split, see ``_dot_bf16x3``), or float32 operands at ``PRECISION`` ("ieee",
    "tf32", "tf32x3")."""
    return _dot_acc(a, b, tl.zeros([a.shape[0], b.shape[1]], dtype=tl.float32), DOT_BF16, PRECISION)


@triton.jit
def _dot_acc(a, b, acc, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b``, the product as ``_dot`` makes it, into ``acc`` as the accumulator:
    where a float32 term is added to a product (a state to its chunk's increment), the
    addition is the tensor cores' own, not a pass over the tile afterwards."""
    if DOT_BF16:
        if PRECISION == "bf16x3":
            out = _dot_bf16x3(a, b, acc)
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return out


def one_line_ptx(text: str) -> tl.constexpr:
    """Inline PTX as a constexpr of one line (PTX does not care). ``torch.compile`` copies a
    Triton kernel and the globals it reads into a generated module, a string constant as its
    ``repr``, and torch 2.11's Inductor places that source inside a plain ``'''`` literal: the
    ``\\n`` escapes of a multi-line string became line breaks there, the module no longer
    parsed, and every compiled call of the single-pass kernels failed
    (``test_kernel_sources_survive_inductors_embedding``)."""
    return tl.constexpr(" ".join(text.split()))


#: Two float32 values ($2, $3) split into bfloat16 high parts ($0, packed) and low parts ($1):
#: one packed conversion for each part, the high part back to float32 by a shift and a mask.
#: Shared by ``_split_bf16_ptx`` and the Gluon forward's ``_split``.
SPLIT_BF16X2_PTX = one_line_ptx("""
        {
        .reg .b32 h0, h1, l0, l1;
        cvt.rn.bf16x2.f32 $0, $3, $2;
        shl.b32 h0, $0, 16;
        and.b32 h1, $0, 0xffff0000;
        sub.f32 l0, $2, h0;
        sub.f32 l1, $3, h1;
        cvt.rn.bf16x2.f32 $1, l1, l0;
        }
        """)


@triton.jit
def _split_bf16_ptx(x):
    """``_split_bf16`` for float32 ``x`` on NVIDIA GPUs, two elements at a time: one packed
    conversion for each part, the high part back to float32 by a shift and a mask (AOT sm_90,
    the forward's ratio step at ViG-T's shape: 1,058 -> 1,006 SASS instructions, against
    Triton's conversion per element and repacking). The same roundings of the same values:
    bitwise the same parts (``test_bfloat16_split_in_ptx_is_the_portable_split``)."""
    return tl.inline_asm_elementwise(
        asm=SPLIT_BF16X2_PTX,
        constraints="=r,=r,r,r",
        args=[x],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=2,
    )


@triton.jit
def _split_bf16(x):
    """``x`` as bfloat16 ``hi = bf16(x)`` and ``lo = bf16(x − hi)``: together ``x`` to ~2^-17
    relative (exactly, for a float16 ``x``). A bfloat16 ``x`` is its own ``hi``; its ``lo``
    is never used (``_dot_bf16x3``)."""
    if x.dtype == tl.bfloat16:
        hi = x
        lo = x
    elif _SPLIT_IN_PTX:
        hi, lo = _split_bf16_ptx(x.to(tl.float32))
    else:
        hi = x.to(tl.bfloat16)
        lo = (x.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _dot_bf16x3(a, b, acc):
    """``acc + a @ b`` on bfloat16 tensor cores to about float32 accuracy: ``hi·hi + hi·lo +
    lo·hi`` (``lo·lo`` is below 2^-16 of the product and dropped). An operand that is already
    bfloat16 (an input tile) is exact and has no low part, so it costs two dots or one.
    Why: the other operands are float32 intermediates (states, decayed q and k, scores), and
    rounding them to bfloat16 costs up to 2^-9 each; where the output is a small difference
    of larger terms (a state's contribution cancelling the chunk's own), that grew past the
    bfloat16 bound of DESIGN §3 (H100: 0.20 relative on the worst of 1,000 seeds of a
    one-token case, NOTES.md session 5, run 13). The small products go first, into the same
    float32 accumulator."""
    a_hi, a_lo = _split_bf16(a)
    b_hi, b_lo = _split_bf16(b)
    if a.dtype == tl.bfloat16:
        if b.dtype == tl.bfloat16:
            out = tl.dot(a_hi, b_hi, acc)
        else:
            out = tl.dot(a_hi, b_hi, tl.dot(a_hi, b_lo, acc))
    elif b.dtype == tl.bfloat16:
        out = tl.dot(a_hi, b_hi, tl.dot(a_lo, b_hi, acc))
    else:
        out = tl.dot(a_hi, b_hi, tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, acc)))
    return out


@triton.jit
def _seg_cumprod(x, ROWS: tl.constexpr, SEG: tl.constexpr, COLS: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive cumulative product along rows, restarting every ``SEG`` rows."""
    if SEG == 1:
        out = x
    elif SEG == ROWS:
        out = tl.cumprod(x, axis=0, reverse=REVERSE)
    else:
        y = tl.reshape(x, (ROWS // SEG, SEG, COLS))
        y = tl.cumprod(y, axis=1, reverse=REVERSE)
        out = tl.reshape(y, (ROWS, COLS))
    return out


@triton.jit
def _level_factors(f, f_shift, ROWS: tl.constexpr, SEG: tl.constexpr, COLS: tl.constexpr, REV: tl.constexpr):
    """Query- and key-side decay factors for pairs split at segments of ``SEG`` rows.

    Forward (``REV`` false): query factor = inclusive prefix product of ``f`` within the
    segment, key factor = exclusive suffix product (``f_shift`` holds ``f`` of the next row).
    Reverse: inclusive suffix products of ``f``, exclusive prefix (``f_shift`` = previous row)."""
    i = tl.arange(0, ROWS)[:, None]
    if REV:
        q_fac = _seg_cumprod(f, ROWS, SEG, COLS, True)
        k_fac = _seg_cumprod(tl.where(i % SEG == 0, 1.0, f_shift), ROWS, SEG, COLS, False)
    else:
        q_fac = _seg_cumprod(f, ROWS, SEG, COLS, False)
        k_fac = _seg_cumprod(tl.where(i % SEG == SEG - 1, 1.0, f_shift), ROWS, SEG, COLS, True)
    return q_fac, k_fac


@triton.jit
def _level_factors_at(f, f_shift, lvl, C: tl.constexpr, BK: tl.constexpr, REV: tl.constexpr):
    """``_level_factors`` for a level known only at run time.

    The level loop is a run-time loop with one static branch per level (segment sizes must be
    static for the reshapes): only one level's temporaries are alive at a time, which keeps
    register use and compile time down compared with unrolling the levels."""
    if lvl == 0:
        q_fac, k_fac = _level_factors(f, f_shift, C, 1, BK, REV)
    elif lvl == 1:
        q_fac, k_fac = _level_factors(f, f_shift, C, 2, BK, REV)
    elif lvl == 2:
        q_fac, k_fac = _level_factors(f, f_shift, C, 4, BK, REV)
    elif lvl == 3:
        q_fac, k_fac = _level_factors(f, f_shift, C, 8, BK, REV)
    elif lvl == 4:
        q_fac, k_fac = _level_factors(f, f_shift, C, 16 if C > 16 else 8, BK, REV)
    else:
        q_fac, k_fac = _level_factors(f, f_shift, C, 32 if C > 32 else 8, BK, REV)
    return q_fac, k_fac


@triton.jit
def _level_mask(C: tl.constexpr, lvl, REV: tl.constexpr):
    """Pairs (t, s) whose highest differing index bit is ``lvl``: s in the left and t in the
    right half of one aligned block of 2^(lvl+1) rows (forward), or the other way round."""
    t = tl.arange(0, C)[:, None]
    s = tl.arange(0, C)[None, :]
    same_block = (t >> (lvl + 1)) == (s >> (lvl + 1))
    t_right = ((t >> lvl) & 1) == 1
    s_right = ((s >> lvl) & 1) == 1
    if REV:
        mask = same_block & (~t_right) & s_right
    else:
        mask = same_block & t_right & (~s_right)
    return mask


@triton.jit
def _ratio_factors(gt, C: tl.constexpr, REV: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """For a chunk whose gates are all >= ``_ratio_min_gate(C)``: ``Qf = exp(G)``, its inverse
    ``exp(-G)`` and the chunk's total decay, with ``G`` the gates' inclusive prefix sum within
    the chunk (reverse: suffix sum). The pair (t, s) then decays by ``Qf[t] · inverse[s]``,
    and the key-side factor ``Kf`` is ``total · inverse`` (callers fold ``total`` in where it
    is cheaper: into the state). ``G`` comes from a dot with a 0/1 triangle (exact operands),
    which adds in the same order at any warp count, like every sum of these kernels; the gate
    bound keeps the inverse <= e^32."""
    rows = tl.arange(0, C)
    if REV:
        tri = rows[:, None] <= rows[None, :]  # G[t] = sum of g[u] for u >= t
    else:
        tri = rows[:, None] >= rows[None, :]  # G[t] = sum of g[u] for u <= t
    if DOT_BF16:  # (the triangle and bfloat16 gates are exact operands: one product)
        G = _dot(tri.to(gt.dtype), gt, DOT_BF16, PRECISION)
    else:  # float32 gates: IEEE, also where the caller allows tf32 for the other dots
        G = tl.dot(tri.to(tl.float32), gt.to(tl.float32), input_precision="ieee")
    Qf = tl.exp(G)
    inv = tl.exp(-G)
    total = _row(Qf, 0 if REV else C - 1, C)  # (a row: one non-zero term, exact)
    return Qf, inv, total


@triton.jit
def _ratio_min_gate(C: tl.constexpr):
    """The smallest gate ``_ratio_scores`` takes: a chunk's decay stays >= e^-32."""
    return -32.0 / C


@triton.jit
def _chunk_allows_ratio(gt, C: tl.constexpr):
    """Whether every gate of the tile is >= ``_ratio_min_gate(C)`` (a minimum: exact, the same
    at any launch setting)."""
    return tl.min(tl.min(gt.to(tl.float32), axis=1), axis=0) >= _ratio_min_gate(C)


@triton.jit
def _ratio_pairs(q, k, gt, dA, C: tl.constexpr, REV: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """The pairs of a chunk whose gates are all >= ``_ratio_min_gate(C)``, by the decay ratio
    (``_ratio_factors``): their scores and their dq, dk parts in one dot each instead of one
    per level of the hierarchy (``kernels_single_pass_bwd._level_pairs``, and here
    ``_scores_and_grads_one_direction``)."""
    rows = tl.arange(0, C)
    # the pairs without the own token, whose terms the gate gradient must not see (_chunk_grads)
    pairs = (rows[:, None] < rows[None, :]) if REV else (rows[:, None] > rows[None, :])
    Qf, inv, _ = _ratio_factors(gt, C, REV, DOT_BF16, PRECISION)
    qh = q * Qf
    kh = k * inv
    A = tl.where(pairs, _dot(qh, tl.trans(kh), DOT_BF16, PRECISION), 0.0)
    dA_pairs = tl.where(pairs, dA, 0.0)
    dq = Qf * _dot(dA_pairs, kh, DOT_BF16, PRECISION)
    dk = inv * _dot(tl.trans(dA_pairs), qh, DOT_BF16, PRECISION)
    return A, dq, dk


@triton.jit
def _sequence_rows(bh, T, H, K, V):
    """Element offsets (int64) of sequence ``bh`` (= batch · H + head) in the ``[B, T, H, K]``
    and ``[B, T, H, V]`` tensors: where its first token's q (k, g) and v rows start."""
    base = ((bh // H).to(tl.int64) * T) * H + bh % H
    return base * K, base * V


@triton.jit
def _row(x, r, ROWS: tl.constexpr):
    """Row ``r`` of a 2-D tile, as a vector."""
    i = tl.arange(0, ROWS)[:, None]
    return tl.sum(tl.where(i == r, x, 0.0), axis=0)


@triton.jit
def _tile(ptr, row0, rows, row_ok, stride_t, cols, ncols):
    """Load ``ptr[(row0 + rows[i] * stride_t) + cols[j]]`` where in range, else 0.

    Masked-out rows get the address of row 0 rather than an out-of-range one: a pipelined
    (asynchronous) load may translate the address of a lane it does not read, and the row
    before a sequence's first token can lie before the start of the allocation. (Columns are
    left alone: clamping them would hide their contiguity from the compiler and cost vector
    loads; a column overrun stays within one row block of the tensor's end.)"""
    offs = tl.where(row_ok, rows, 0)[:, None].to(tl.int64) * stride_t + cols[None, :]
    mask = row_ok[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + row0 + offs, mask=mask, other=0.0)


@triton.jit
def _gates(g_ptr, row0, t0, n_valid, stride_t, cols, ncols, ROWS: tl.constexpr, SHIFT: tl.constexpr):
    """Decay factors exp(g) of rows ``t0 + SHIFT + i`` (1 outside ``[t0, t0 + n_valid)``)."""
    i = tl.arange(0, ROWS) + SHIFT
    ok = (i >= 0) & (i < n_valid)
    g = _tile(g_ptr, row0, t0 + i, ok, stride_t, cols, ncols)
    return tl.exp(g.to(tl.float32))


@triton.jit
def _state_ptrs(base, cols_k, cols_v, K, V):
    ok_k = cols_k < K
    offs = tl.where(ok_k, cols_k, 0)[:, None].to(tl.int64) * V + cols_v[None, :]
    return base + offs, ok_k[:, None] & (cols_v < V)[None, :]


@triton.jit
def _load_state(base, cols_k, cols_v, K, V):
    ptrs, mask = _state_ptrs(base, cols_k, cols_v, K, V)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_state(base, x, cols_k, cols_v, K, V):
    ptrs, mask = _state_ptrs(base, cols_k, cols_v, K, V)
    tl.store(ptrs, x, mask=mask)


@triton.jit
def _walk_parts(a_ptr, b_ptr, g_ptr, a_row0, b_row0, t0, n_valid, stride_a, stride_b, cols_k, cols_v, K, V, coef,
                STEP: tl.constexpr, BK: tl.constexpr, REVERSE: tl.constexpr, INCLUSIVE: tl.constexpr,
                DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """The two parts of one step of a state walk over rows ``[t0, t0 + n_valid)`` (``n_valid <=
    STEP``), ``state <- Γ ⊙ state + coef · (a ⊙ w)ᵀ b``: returns ``(Γ, coef · (a ⊙ w)ᵀ b)``.

    ``w`` is the product of decay factors from each row to the step's far end in the walk
    direction (exclusive of the row itself for states, inclusive for state gradients) and
    ``Γ`` (a ``[BK]`` vector) the product over the whole step. Rows past ``n_valid`` are zero
    with factor 1."""
    i = tl.arange(0, STEP)
    ok = i < n_valid
    a = _tile(a_ptr, a_row0, t0 + i, ok, stride_a, cols_k, K)
    b = _tile(b_ptr, b_row0, t0 + i, ok, stride_b, cols_v, V)
    f = _gates(g_ptr, a_row0, t0, n_valid, stride_a, cols_k, K, STEP, 0)
    if INCLUSIVE:
        w = _seg_cumprod(f, STEP, STEP, BK, not REVERSE)
        if REVERSE:
            total = _row(w, STEP - 1, STEP)
        else:
            total = _row(w, 0, STEP)
    else:
        if REVERSE:
            f_prev = _gates(g_ptr, a_row0, t0, n_valid, stride_a, cols_k, K, STEP, -1)
            w = _seg_cumprod(tl.where(i[:, None] == 0, 1.0, f_prev), STEP, STEP, BK, False)
            total = _row(f * w, STEP - 1, STEP)
        else:
            f_next = _gates(g_ptr, a_row0, t0, n_valid, stride_a, cols_k, K, STEP, 1)
            w = _seg_cumprod(tl.where(i[:, None] == STEP - 1, 1.0, f_next), STEP, STEP, BK, True)
            total = _row(f * w, 0, STEP)
    aw = (a.to(tl.float32) * w) * coef
    return total, _dot(tl.trans(aw), b, DOT_BF16, PRECISION)


@triton.jit
def _walk_step(state, a_ptr, b_ptr, g_ptr, a_row0, b_row0, t0, n_valid, stride_a, stride_b,
               cols_k, cols_v, K, V, coef,
               STEP: tl.constexpr, BK: tl.constexpr, REVERSE: tl.constexpr, INCLUSIVE: tl.constexpr,
               DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """One step of a state walk (see ``_walk_parts``): the state after the step."""
    total, contribution = _walk_parts(a_ptr, b_ptr, g_ptr, a_row0, b_row0, t0, n_valid, stride_a, stride_b,
                                      cols_k, cols_v, K, V, coef, STEP, BK, REVERSE, INCLUSIVE, DOT_BF16,
                                      PRECISION)
    return total[:, None] * state + contribution


@triton.jit
def _scores_one_direction(q, k, f, f_shift, A, C: tl.constexpr, BK: tl.constexpr, LOG2C: tl.constexpr,
                          REV: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """Add one direction's off-diagonal intra-chunk scores to ``A`` (level by level)."""
    for lvl in range(0, LOG2C):
        q_fac, k_fac = _level_factors_at(f, f_shift, lvl, C, BK, REV)
        s = _dot(q * q_fac, tl.trans(k * k_fac), DOT_BF16, PRECISION)
        A += tl.where(_level_mask(C, lvl, REV), s, 0.0)
    return A


@triton.jit
def _level_scores_and_grads(q, k, q_fac, k_fac, mask, dA, A, dq, dk, DOT_BF16: tl.constexpr,
                            PRECISION: tl.constexpr, UNIT_K_FAC: tl.constexpr):
    """One level's pairs (``mask``): their scores added to ``A``, their parts of dq and dk
    (unscaled) given the score gradient ``dA``. ``UNIT_K_FAC``: the key-side factors are all
    1 (level 0 of the single-pass kernels), so ``k`` is taken as given — as loaded, an exact
    bfloat16 operand that ``_dot_bf16x3`` need not split."""
    qh = q * q_fac
    kh = k if UNIT_K_FAC else k * k_fac
    A += tl.where(mask, _dot(qh, tl.trans(kh), DOT_BF16, PRECISION), 0.0)
    dA_level = tl.where(mask, dA, 0.0)
    dq += q_fac * _dot(dA_level, kh, DOT_BF16, PRECISION)
    dk += k_fac * _dot(tl.trans(dA_level), qh, DOT_BF16, PRECISION)
    return A, dq, dk


@triton.jit
def _scores_and_grads_one_direction(q, k, f, f_shift, gt, dA, A, C: tl.constexpr, BK: tl.constexpr,
                                    LOG2C: tl.constexpr, REV: tl.constexpr, DOT_BF16: tl.constexpr,
                                    PRECISION: tl.constexpr, RATIO: tl.constexpr):
    """Off-diagonal intra-chunk scores (added to ``A``) and their contributions to dq and dk
    given the unmasked score gradient ``dA = dO vᵀ`` (unscaled). ``RATIO``: a chunk whose log
    gates ``gt`` are all >= ``_ratio_min_gate(C)`` takes ``_ratio_pairs`` (one dot each for the
    scores, dq and dk), any other the hierarchy (three a level)."""
    if RATIO:
        by_ratio = _chunk_allows_ratio(gt, C)
    else:
        by_ratio = False
    if by_ratio:
        A_pairs, dq, dk = _ratio_pairs(q, k, gt, dA, C, REV, DOT_BF16, PRECISION)
        A += A_pairs
    else:
        dq = tl.zeros([C, BK], dtype=tl.float32)
        dk = tl.zeros([C, BK], dtype=tl.float32)
        for lvl in range(0, LOG2C):
            q_fac, k_fac = _level_factors_at(f, f_shift, lvl, C, BK, REV)
            A, dq, dk = _level_scores_and_grads(q, k, q_fac, k_fac, _level_mask(C, lvl, REV), dA, A, dq, dk,
                                                DOT_BF16, PRECISION, False)
    return A, dq, dk


@triton.jit
def _chunk_state(scr, bst, bst_slot, seg, i, kv, SCR_SLOT: tl.constexpr, BST_SLOT: tl.constexpr,
                 SLOTS: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """Where a segment program finds the state of scratch slot ``SCR_SLOT`` at its chunk
    boundary ``i``: in its scratch (parked by phase 1), or, when the segment is one chunk, at
    boundary ``seg + i`` of the boundary states' slot ``BST_SLOT`` (``bst`` points at this
    sequence's slot 0, ``bst_slot`` is the distance between slots)."""
    if ONE_CHUNK:
        ptr = bst + BST_SLOT * bst_slot + (seg + i) * kv
    else:
        ptr = scr + (i * SLOTS + SCR_SLOT) * kv
    return ptr


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _gla_fwd_kernel(
    q, k, v, g, gr, o, h0, ht, bstates, scratch,
    T, H, K, V, scale, SEG, NSEG,
    C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NKB: tl.constexpr,
    BIDIR: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, HAS_BSTATES: tl.constexpr,
    ONE_CHUNK: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward, one program per (batch·head, segment, V block); see the module docstring.

    ``scale`` is scale' (already halved for bidirectional). ``scratch`` holds, per program,
    the state entering every chunk of the segment: slot 0 = F[i], slot 1 = R[i] (boundaries
    i = 0..SEG/C). ``bstates`` (when present) holds the segment boundary states; with
    ``ONE_CHUNK`` (one chunk per segment, boundary states present) they are read directly
    and phase 1 is skipped."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch.compile) passes floats as float64
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    vb = tl.program_id(2)
    BH = tl.num_programs(0)
    SLOTS: tl.constexpr = 2 if BIDIR else 1
    row_qk, row_v = _sequence_rows(bh, T, H, K, V)
    stride_qk = H * K
    stride_v = H * V
    seg_start = seg * SEG
    seg_end = tl.minimum(seg_start + SEG, T)
    ncs = tl.cdiv(seg_end - seg_start, C)
    kv = tl.cast(K, tl.int64) * V
    scr = scratch + ((bh.to(tl.int64) * NSEG + seg) * (SEG // C + 1)) * SLOTS * kv
    bst = bstates + (bh.to(tl.int64) * (NSEG + 1)) * kv
    bst_slot = BH.to(tl.int64) * (NSEG + 1) * kv
    cols_v = vb * BV + tl.arange(0, BV)

    # phase 1: the states entering every chunk of this segment, both directions at once
    if not ONE_CHUNK:
        for kb in range(0, NKB):
            cols_k = kb * BK + tl.arange(0, BK)
            F = tl.zeros([BK, BV], dtype=tl.float32)
            R = tl.zeros([BK, BV], dtype=tl.float32)
            if HAS_BSTATES:
                F = _load_state(bst + seg * kv, cols_k, cols_v, K, V)
                if BIDIR:
                    R = _load_state(bst + bst_slot + (seg + 1) * kv, cols_k, cols_v, K, V)
            elif HAS_H0:
                F = _load_state(h0 + bh.to(tl.int64) * kv, cols_k, cols_v, K, V)
            for i in range(0, ncs):
                t0 = seg_start + i * C
                _store_state(scr + (i * SLOTS) * kv, F, cols_k, cols_v, K, V)
                F = _walk_step(F, k, v, g, row_qk, row_v, t0, tl.minimum(C, seg_end - t0), stride_qk, stride_v,
                               cols_k, cols_v, K, V, 1.0, C, BK, False, False, DOT_BF16, PRECISION)
                if BIDIR:
                    j = ncs - 1 - i
                    t1 = seg_start + j * C
                    _store_state(scr + ((j + 1) * SLOTS + 1) * kv, R, cols_k, cols_v, K, V)
                    R = _walk_step(R, k, v, gr, row_qk, row_v, t1, tl.minimum(C, seg_end - t1), stride_qk, stride_v,
                                   cols_k, cols_v, K, V, 1.0, C, BK, True, False, DOT_BF16, PRECISION)
            if STORE_HT:
                if seg == NSEG - 1:
                    _store_state(ht + bh.to(tl.int64) * kv, F, cols_k, cols_v, K, V)
        # phase 2 reads what other threads of this program wrote in phase 1
        tl.debug_barrier()

    # phase 2: every chunk's output, both directions combined in registers, written once
    rows = tl.arange(0, C)
    eye = rows[:, None] == rows[None, :]
    for i in range(0, ncs):
        t0 = seg_start + i * C
        n_valid = tl.minimum(C, seg_end - t0)
        ok = rows < n_valid
        A = tl.zeros([C, C], dtype=tl.float32)
        acc = tl.zeros([C, BV], dtype=tl.float32)
        diag = tl.zeros([C], dtype=tl.float32)
        for kb in range(0, NKB):
            cols_k = kb * BK + tl.arange(0, BK)
            qt = _tile(q, row_qk, t0 + rows, ok, stride_qk, cols_k, K).to(tl.float32)
            kt = _tile(k, row_qk, t0 + rows, ok, stride_qk, cols_k, K).to(tl.float32)
            diag += tl.sum(qt * kt, axis=1)
            f = _gates(g, row_qk, t0, n_valid, stride_qk, cols_k, K, C, 0)
            f_next = _gates(g, row_qk, t0, n_valid, stride_qk, cols_k, K, C, 1)
            A = _scores_one_direction(qt, kt, f, f_next, A, C, BK, LOG2C, False, DOT_BF16, PRECISION)
            F = _load_state(_chunk_state(scr, bst, bst_slot, seg, i, kv, 0, 0, SLOTS, ONE_CHUNK),
                            cols_k, cols_v, K, V)
            acc += _dot(qt * _seg_cumprod(f, C, C, BK, False), F, DOT_BF16, PRECISION)
            if BIDIR:
                fr = _gates(gr, row_qk, t0, n_valid, stride_qk, cols_k, K, C, 0)
                fr_prev = _gates(gr, row_qk, t0, n_valid, stride_qk, cols_k, K, C, -1)
                A = _scores_one_direction(qt, kt, fr, fr_prev, A, C, BK, LOG2C, True, DOT_BF16, PRECISION)
                R = _load_state(_chunk_state(scr, bst, bst_slot, seg, i + 1, kv, 1, 1, SLOTS, ONE_CHUNK),
                                cols_k, cols_v, K, V)
                acc += _dot(qt * _seg_cumprod(fr, C, C, BK, True), R, DOT_BF16, PRECISION)
        A += tl.where(eye, diag[:, None] * SLOTS, 0.0)  # the own token counts in each direction
        vt = _tile(v, row_v, t0 + rows, ok, stride_v, cols_v, V)
        out = scale * (_dot(A, vt, DOT_BF16, PRECISION) + acc)
        offs = row_v + (t0 + rows)[:, None].to(tl.int64) * stride_v + cols_v[None, :]
        tl.store(o + offs, out.to(o.dtype.element_ty), mask=ok[:, None] & (cols_v < V)[None, :])


@triton.jit
def _gla_bwd_kernel(
    q, k, v, g, gr, do, dq, dk, dv, dg, dgr, h0, dht, dh0, bstates, scratch,
    T, H, K, V, scale, SEG, NSEG,
    C: tl.constexpr, LOG2C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NKB: tl.constexpr, NVB: tl.constexpr,
    BIDIR: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    HAS_BSTATES: tl.constexpr, ONE_CHUNK: tl.constexpr, DOT_BF16: tl.constexpr, PRECISION: tl.constexpr,
    RATIO: tl.constexpr,
):
    """Backward, one program per (batch·head, segment); every gradient written once.
    ``RATIO``: chunks whose gates allow it score their pairs by the decay ratio
    (``_scores_and_grads_one_direction``).

    Scratch slots: 0 = F, 1 = dF, and when bidirectional 2 = R, 3 = dR. The boundary states'
    slots (``kernels_boundary_states.py``): F, (R,) dF, (dR). With ``ONE_CHUNK`` phase 2 reads
    the boundary states directly and phase 1 is skipped."""
    scale = tl.cast(scale, tl.float32)  # Inductor (torch.compile) passes floats as float64
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    BH = tl.num_programs(0)
    SLOTS: tl.constexpr = 4 if BIDIR else 2
    NDIR: tl.constexpr = 2 if BIDIR else 1
    row_qk, row_v = _sequence_rows(bh, T, H, K, V)
    stride_qk = H * K
    stride_v = H * V
    seg_start = seg * SEG
    seg_end = tl.minimum(seg_start + SEG, T)
    ncs = tl.cdiv(seg_end - seg_start, C)
    kv = tl.cast(K, tl.int64) * V
    scr = scratch + ((bh.to(tl.int64) * NSEG + seg) * (SEG // C + 1)) * SLOTS * kv
    bst = bstates + (bh.to(tl.int64) * (NSEG + 1)) * kv
    bst_slot = BH.to(tl.int64) * (NSEG + 1) * kv

    # phase 1: F and dR walk left to right, R and dF right to left, from the segment edges
    if not ONE_CHUNK:
        for kb in range(0, NKB):
            cols_k = kb * BK + tl.arange(0, BK)
            for vb in range(0, NVB):
                cols_v = vb * BV + tl.arange(0, BV)
                F = tl.zeros([BK, BV], dtype=tl.float32)
                dF = tl.zeros([BK, BV], dtype=tl.float32)
                R = tl.zeros([BK, BV], dtype=tl.float32)
                dR = tl.zeros([BK, BV], dtype=tl.float32)
                if HAS_BSTATES:
                    # the states kernel's slots: F, (R,) dF, (dR)
                    F = _load_state(bst + seg * kv, cols_k, cols_v, K, V)
                    dF = _load_state(bst + (SLOTS // 2) * bst_slot + (seg + 1) * kv, cols_k, cols_v, K, V)
                    if BIDIR:
                        R = _load_state(bst + bst_slot + (seg + 1) * kv, cols_k, cols_v, K, V)
                        dR = _load_state(bst + 3 * bst_slot + seg * kv, cols_k, cols_v, K, V)
                else:
                    if HAS_H0:
                        F = _load_state(h0 + bh.to(tl.int64) * kv, cols_k, cols_v, K, V)
                    if HAS_DHT:
                        dF = _load_state(dht + bh.to(tl.int64) * kv, cols_k, cols_v, K, V)
                for i in range(0, ncs):
                    t0 = seg_start + i * C
                    j = ncs - 1 - i
                    t1 = seg_start + j * C
                    _store_state(scr + (i * SLOTS) * kv, F, cols_k, cols_v, K, V)
                    _store_state(scr + ((j + 1) * SLOTS + 1) * kv, dF, cols_k, cols_v, K, V)
                    F = _walk_step(F, k, v, g, row_qk, row_v, t0, tl.minimum(C, seg_end - t0), stride_qk, stride_v,
                                   cols_k, cols_v, K, V, 1.0, C, BK, False, False, DOT_BF16, PRECISION)
                    dF = _walk_step(dF, q, do, g, row_qk, row_v, t1, tl.minimum(C, seg_end - t1), stride_qk,
                                    stride_v, cols_k, cols_v, K, V, scale, C, BK, True, True, DOT_BF16, PRECISION)
                    if BIDIR:
                        _store_state(scr + ((j + 1) * SLOTS + 2) * kv, R, cols_k, cols_v, K, V)
                        _store_state(scr + (i * SLOTS + 3) * kv, dR, cols_k, cols_v, K, V)
                        R = _walk_step(R, k, v, gr, row_qk, row_v, t1, tl.minimum(C, seg_end - t1), stride_qk,
                                       stride_v, cols_k, cols_v, K, V, 1.0, C, BK, True, False, DOT_BF16, PRECISION)
                        dR = _walk_step(dR, q, do, gr, row_qk, row_v, t0, tl.minimum(C, seg_end - t0), stride_qk,
                                        stride_v, cols_k, cols_v, K, V, scale, C, BK, False, True, DOT_BF16, PRECISION)
                _store_state(scr + (ncs * SLOTS) * kv, F, cols_k, cols_v, K, V)
                _store_state(scr + 1 * kv, dF, cols_k, cols_v, K, V)
                if BIDIR:
                    _store_state(scr + 2 * kv, R, cols_k, cols_v, K, V)
                    _store_state(scr + (ncs * SLOTS + 3) * kv, dR, cols_k, cols_v, K, V)
                if STORE_DH0:
                    if seg == 0:
                        _store_state(dh0 + bh.to(tl.int64) * kv, dF, cols_k, cols_v, K, V)
        tl.debug_barrier()

    # phase 2: every chunk's gradients
    rows = tl.arange(0, C)
    eye = rows[:, None] == rows[None, :]
    for i in range(0, ncs):
        t0 = seg_start + i * C
        n_valid = tl.minimum(C, seg_end - t0)
        ok = rows < n_valid
        dA = tl.zeros([C, C], dtype=tl.float32)
        for vb in range(0, NVB):
            cols_v = vb * BV + tl.arange(0, BV)
            dot_ = _tile(do, row_v, t0 + rows, ok, stride_v, cols_v, V)
            vt = _tile(v, row_v, t0 + rows, ok, stride_v, cols_v, V)
            dA += _dot(dot_, tl.trans(vt), DOT_BF16, PRECISION)
        dA_diag = tl.sum(tl.where(eye, dA, 0.0), axis=1)
        A = tl.zeros([C, C], dtype=tl.float32)
        diag = tl.zeros([C], dtype=tl.float32)
        for kb in range(0, NKB):
            cols_k = kb * BK + tl.arange(0, BK)
            io_offs = row_qk + (t0 + rows)[:, None].to(tl.int64) * stride_qk + cols_k[None, :]
            io_mask = ok[:, None] & (cols_k < K)[None, :]
            qt = _tile(q, row_qk, t0 + rows, ok, stride_qk, cols_k, K).to(tl.float32)
            kt = _tile(k, row_qk, t0 + rows, ok, stride_qk, cols_k, K).to(tl.float32)
            diag += tl.sum(qt * kt, axis=1)

            # forward direction
            gt = _tile(g, row_qk, t0 + rows, ok, stride_qk, cols_k, K)
            f = tl.exp(gt.to(tl.float32))  # (1 outside the chunk, as _gates)
            f_next = _gates(g, row_qk, t0, n_valid, stride_qk, cols_k, K, C, 1)
            A, dq_f, dk_f = _scores_and_grads_one_direction(qt, kt, f, f_next, gt, dA, A, C, BK, LOG2C, False,
                                                            DOT_BF16, PRECISION, RATIO)
            q_fac, k_fac = _level_factors(f, f_next, C, C, BK, False)
            dq_f = dq_f * scale
            dk_f = dk_f * scale
            carry = tl.zeros([BK], dtype=tl.float32)
            for vb in range(0, NVB):
                cols_v = vb * BV + tl.arange(0, BV)
                dot_ = _tile(do, row_v, t0 + rows, ok, stride_v, cols_v, V)
                vt = _tile(v, row_v, t0 + rows, ok, stride_v, cols_v, V)
                F_in = _load_state(_chunk_state(scr, bst, bst_slot, seg, i, kv, 0, 0, SLOTS, ONE_CHUNK),
                                   cols_k, cols_v, K, V)
                F_out = _load_state(_chunk_state(scr, bst, bst_slot, seg, i + 1, kv, 0, 0, SLOTS, ONE_CHUNK),
                                    cols_k, cols_v, K, V)
                dF_out = _load_state(_chunk_state(scr, bst, bst_slot, seg, i + 1, kv, 1, SLOTS // 2, SLOTS, ONE_CHUNK),
                                     cols_k, cols_v, K, V)
                dq_f += (scale * q_fac) * _dot(dot_, tl.trans(F_in), DOT_BF16, PRECISION)
                dk_f += k_fac * _dot(vt, tl.trans(dF_out), DOT_BF16, PRECISION)
                carry += tl.sum(F_out * dF_out, axis=1)
            # everything after this chunk enters through F[i+1]; see the module docstring
            dg_t = tl.cumsum(qt * dq_f - kt * dk_f, axis=0, reverse=True) + carry[None, :]
            tl.store(dg + io_offs, dg_t.to(dg.dtype.element_ty), mask=io_mask)
            dq_t = dq_f
            dk_t = dk_f

            if BIDIR:
                grt = _tile(gr, row_qk, t0 + rows, ok, stride_qk, cols_k, K)
                fr = tl.exp(grt.to(tl.float32))
                fr_prev = _gates(gr, row_qk, t0, n_valid, stride_qk, cols_k, K, C, -1)
                A, dq_r, dk_r = _scores_and_grads_one_direction(qt, kt, fr, fr_prev, grt, dA, A, C, BK, LOG2C, True,
                                                                DOT_BF16, PRECISION, RATIO)
                qr_fac, kr_fac = _level_factors(fr, fr_prev, C, C, BK, True)
                dq_r = dq_r * scale
                dk_r = dk_r * scale
                carry_r = tl.zeros([BK], dtype=tl.float32)
                for vb in range(0, NVB):
                    cols_v = vb * BV + tl.arange(0, BV)
                    dot_ = _tile(do, row_v, t0 + rows, ok, stride_v, cols_v, V)
                    vt = _tile(v, row_v, t0 + rows, ok, stride_v, cols_v, V)
                    R_in = _load_state(_chunk_state(scr, bst, bst_slot, seg, i + 1, kv, 2, 1, SLOTS, ONE_CHUNK),
                                       cols_k, cols_v, K, V)
                    R_out = _load_state(_chunk_state(scr, bst, bst_slot, seg, i, kv, 2, 1, SLOTS, ONE_CHUNK),
                                        cols_k, cols_v, K, V)
                    dR_out = _load_state(_chunk_state(scr, bst, bst_slot, seg, i, kv, 3, 3, SLOTS, ONE_CHUNK),
                                         cols_k, cols_v, K, V)
                    dq_r += (scale * qr_fac) * _dot(dot_, tl.trans(R_in), DOT_BF16, PRECISION)
                    dk_r += kr_fac * _dot(vt, tl.trans(dR_out), DOT_BF16, PRECISION)
                    carry_r += tl.sum(R_out * dR_out, axis=1)
                dgr_t = tl.cumsum(qt * dq_r - kt * dk_r, axis=0) + carry_r[None, :]
                tl.store(dgr + io_offs, dgr_t.to(dgr.dtype.element_ty), mask=io_mask)
                dq_t += dq_r
                dk_t += dk_r

            # the own token (decay 1) in each direction; its gate terms cancel, so added last
            dq_t += (NDIR * scale) * dA_diag[:, None] * kt
            dk_t += (NDIR * scale) * dA_diag[:, None] * qt
            tl.store(dq + io_offs, dq_t.to(dq.dtype.element_ty), mask=io_mask)
            tl.store(dk + io_offs, dk_t.to(dk.dtype.element_ty), mask=io_mask)

        A += tl.where(eye, diag[:, None] * NDIR, 0.0)
        for vb in range(0, NVB):
            cols_v = vb * BV + tl.arange(0, BV)
            dot_ = _tile(do, row_v, t0 + rows, ok, stride_v, cols_v, V)
            dv_t = scale * _dot(tl.trans(A), dot_, DOT_BF16, PRECISION)
            for kb in range(0, NKB):
                cols_k = kb * BK + tl.arange(0, BK)
                kt = _tile(k, row_qk, t0 + rows, ok, stride_qk, cols_k, K).to(tl.float32)
                f = _gates(g, row_qk, t0, n_valid, stride_qk, cols_k, K, C, 0)
                f_next = _gates(g, row_qk, t0, n_valid, stride_qk, cols_k, K, C, 1)
                q_fac, k_fac = _level_factors(f, f_next, C, C, BK, False)
                dF_out = _load_state(_chunk_state(scr, bst, bst_slot, seg, i + 1, kv, 1, SLOTS // 2, SLOTS, ONE_CHUNK),
                                     cols_k, cols_v, K, V)
                dv_t += _dot(kt * k_fac, dF_out, DOT_BF16, PRECISION)
                if BIDIR:
                    fr = _gates(gr, row_qk, t0, n_valid, stride_qk, cols_k, K, C, 0)
                    fr_prev = _gates(gr, row_qk, t0, n_valid, stride_qk, cols_k, K, C, -1)
                    qr_fac, kr_fac = _level_factors(fr, fr_prev, C, C, BK, True)
                    dR_out = _load_state(_chunk_state(scr, bst, bst_slot, seg, i, kv, 3, 3, SLOTS, ONE_CHUNK),
                                         cols_k, cols_v, K, V)
                    dv_t += _dot(kt * kr_fac, dR_out, DOT_BF16, PRECISION)
            offs = row_v + (t0 + rows)[:, None].to(tl.int64) * stride_v + cols_v[None, :]
            tl.store(dv + offs, dv_t.to(dv.dtype.element_ty), mask=ok[:, None] & (cols_v < V)[None, :])
