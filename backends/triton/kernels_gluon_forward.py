"""The single-pass forward written in Gluon (``triton.experimental.gluon``): every layout named,
so that chained tensor-core products pass their operands in registers.

Why: ``kernels_single_pass.py`` is bound by layout conversions, not math. In ``tl`` every
product whose operand another product made (the scores as A of ``A·v``, the state as B of
``q·S``) and every loaded operand goes through shared memory and a barrier; the cupy
backend's hand-written forward keeps them in registers and runs vigT_224 in about half the
time (NOTES.md, sessions 17-24). ``benchmarks/triton_gluon_layout_probe.py`` showed that
Gluon compiles those chains without shared memory; this kernel is that organisation:

* one warp per program, one program per (batch·head, direction, V block, segment), the same
  grid, handoff of the two directions' parts (``part``, ``flags``, ``MEET``, ``PARK_ALL``) and boundary
  states as ``_gla_fwd_single_pass_kernel``, whose launcher (``launch._forward_single_pass``)
  runs this kernel in its place for bfloat16 and float16 on NVIDIA GPUs when
  ``Config.single_pass_gluon`` is on (off by default: on an H100 it measured no faster than
  the ``tl`` kernel, NOTES.md session 25);
* every tile lives in the ``mma_v2`` accumulator layout ``M`` (m16n8k16, one warp). A
  16-token tile of q, k, g or v is loaded 8 or 16 bytes a thread and relabelled into ``M``
  without moving data: its columns are permuted (tile column ``8n + 2c + e`` is memory column
  ``c·W/4 + 2n + e``, ``c`` the lane's quad index), which every product over K or V
  undoes by itself (q and k, v and o share the permutation) and the state's loads undo by
  address;
* the state is kept transposed, ``Sᵀ [BV, BK]``, as an accumulator: ``Sᵀ`` permuted is the B
  operand of ``q·S`` for free, and the chunk's scores are the A operand of ``A·v`` for free;
  what remains moves by shuffles (``g`` and ``v`` over time, ``k ⊙ e^-G`` as the state
  update's B operand);
* per 16-token chunk (forward direction; the reverse one mirrors it with suffix sums),
  ``G = tri · g`` (the in-chunk cumulative gate sums, one exact product) and

      o   = (q ⊙ e^G) · S  +  mask(A) · v,    A = (q ⊙ e^G) · (k ⊙ e^-G)ᵀ
      Sᵀ' = ((Sᵀ + vᵀ · (k ⊙ e^-G)) ⊙ e^{G_last})

  with every float32 operand split into two bfloat16 parts (three products, ~float32
  accuracy, DESIGN §3; a float16 ``v`` is two bfloat16 parts). A chunk whose ``|G|`` passes
  32 (a gate near -1e4 must work) takes the exact path instead: its scores as float32 sums of
  ``q_t k_s e^{G_t - G_s}`` (``G_t - G_s <= 0`` on the kept pairs) through shared memory, and
  the state update with the decayed keys ``k ⊙ e^{G_last - G}`` after decaying the state.

No interpreter runs Gluon: ``TRITON_INTERPRET=1`` and CPU tensors take the ``tl`` kernel, and
the tests of this kernel run on a GPU (``tests/test_triton_gluon_forward.py``; on CPU they
compile it ahead of time for sm_90).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .kernels import SPLIT_BF16X2_PTX

# a barrier of the program's threads: gl.thread_barrier in Triton 3.6, gl.barrier from 3.9
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
# shared memory's reinterpret: public from Triton 3.9, ``_reinterpret`` in 3.6
_PUBLIC_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

@gluon.jit
def _tile_offsets(row_stride, n_cols, W: gl.constexpr):
    """Offsets (int32, within a chunk), column mask and row index of a ``[16, W]`` tile loaded
    ``W / 4`` contiguous elements a lane: ``[16 rows, 4 quads, W / 4]``, lane ``4 r + c``
    holding rows ``r``, ``r + 8`` and memory columns ``[c W / 4, (c + 1) W / 4)``."""
    ld: gl.constexpr = gl.BlockedLayout([1, 1, W // 4], [8, 4, 1], [1, 1, 1], [2, 1, 0])
    r = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, ld)))
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, ld)))
    j = gl.arange(0, W // 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, ld)))
    row = r[:, None, None]
    col = c[None, :, None] * (W // 4) + j[None, None, :]
    return row * row_stride + col, col < n_cols, row


@gluon.jit
def _to_mma(x, W: gl.constexpr):
    """A loaded ``[16, 4, W / 4]`` tile as ``[16, W]`` in the accumulator layout, columns
    permuted (module docstring): a relabelling of registers, no data moves."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    x = gl.reshape(x, [16, 4, W // 8, 2])
    x = gl.permute(x, [0, 2, 1, 3])
    x = gl.reshape(x, [16, W])
    return gl.convert_layout(x, mma, assert_trivial=True)


@gluon.jit
def _from_mma(x, W: gl.constexpr):
    """The inverse of ``_to_mma``: an accumulator tile in the store layout of ``_tile_offsets``."""
    ld: gl.constexpr = gl.BlockedLayout([1, 1, W // 4], [8, 4, 1], [1, 1, 1], [2, 1, 0])
    x = gl.reshape(x, [16, W // 8, 4, 2])
    x = gl.permute(x, [0, 2, 1, 3])
    x = gl.reshape(x, [16, 4, W // 4])
    return gl.convert_layout(x, ld, assert_trivial=True)


@gluon.jit
def _memory_column(j, W: gl.constexpr):
    """The memory column of tile column ``j`` of a ``[., W]`` tile in the permuted order."""
    return ((j >> 1) & 3) * (W // 4) + (j >> 3) * 2 + (j & 1)


@gluon.jit
def _state_offsets(K, V, n_cols_v, BK: gl.constexpr, BV: gl.constexpr):
    """Offsets and mask of ``Sᵀ [BV, BK]`` (accumulator layout, both axes permuted) in a
    ``[K, V]`` row-major state whose V columns start at this program's block."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    vr = _memory_column(gl.arange(0, BV, layout=gl.SliceLayout(1, mma)), BV)
    kc = _memory_column(gl.arange(0, BK, layout=gl.SliceLayout(0, mma)), BK)
    offs = kc[None, :].to(gl.int64) * V + vr[:, None]
    return offs, (kc[None, :] < K) & (vr[:, None] < n_cols_v)


@gluon.jit
def _split(x):
    """``x`` (float32) as two bfloat16 parts, ``hi = bf16(x)`` and ``lo = bf16(x - hi)``: ``x``
    to ~2^-17. Two elements at a time: one packed conversion a part, ``hi`` back to float32
    by a shift and a mask (``kernels.SPLIT_BF16X2_PTX``, as ``kernels._split_bf16_ptx``)."""
    return gl.inline_asm_elementwise(
        asm=SPLIT_BF16X2_PTX,
        constraints="=r,=r,r,r",
        args=[x],
        dtype=(gl.bfloat16, gl.bfloat16),
        is_pure=True,
        pack=2,
    )


@gluon.jit
def _mma3(a_hi, a_lo, b_hi, b_lo, acc):
    """``acc + a · b`` for split float32 operands: ``lo·hi + hi·lo + hi·hi`` (small terms first)."""
    acc = mma_v2(a_lo, b_hi, acc)
    acc = mma_v2(a_hi, b_lo, acc)
    return mma_v2(a_hi, b_hi, acc)


@gluon.jit
def _exact_scores(sq, sk, sg, sgt, REV: gl.constexpr, BK: gl.constexpr):
    """A chunk's scores as float32 sums ``Σ_k q_tk k_sk e^{G_tk - G_sk}`` over the kept pairs
    (module docstring), one K column at a time from shared memory: ``sq`` and ``sgt`` hold q
    and G as ``[BK, 16, 1]`` (column vectors), ``sk`` and ``sg`` k and G as ``[BK, 1, 16]``."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    t = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    s = gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    keep = (t[:, None] <= s[None, :]) if REV else (t[:, None] >= s[None, :])
    scores = gl.zeros([16, 16], gl.float32, layout=mma)
    # the buffers as arrays of [16, 1] and [1, 16] tiles (indexing wants a layout of their rank)
    per_column: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    if _PUBLIC_REINTERPRET:
        sq = sq.reinterpret(gl.float32, [BK, 16, 1], per_column)
        sgt = sgt.reinterpret(gl.float32, [BK, 16, 1], per_column)
        sk = sk.reinterpret(gl.float32, [BK, 1, 16], per_column)
        sg = sg.reinterpret(gl.float32, [BK, 1, 16], per_column)
    else:
        sq = sq._reinterpret(gl.float32, [BK, 16, 1], per_column)
        sgt = sgt._reinterpret(gl.float32, [BK, 16, 1], per_column)
        sk = sk._reinterpret(gl.float32, [BK, 1, 16], per_column)
        sg = sg._reinterpret(gl.float32, [BK, 1, 16], per_column)
    for kk in range(BK):
        qt = sq.index(kk).load(mma)
        gt = sgt.index(kk).load(mma)
        ks = sk.index(kk).load(mma)
        gs = sg.index(kk).load(mma)
        # masked pairs' exponents (which may be large and positive) never reach exp2
        e = gl.exp2(gl.where(keep, (gt - gs) * 1.4426950408889634, float("-inf")))
        scores += qt * ks * e
    return scores


@gluon.jit
def _load_chunk(q, k, g, v, row_qk, row_v, c, n_valid, stride_qk, stride_v, offs_k, ok_k, row16, offs_v, ok_v,
                row16v):
    """Chunk ``c``'s q, k, g and v tiles as loaded (rows past ``n_valid`` read as 0)."""
    at_k = row_qk + (c * 16).to(gl.int64) * stride_qk
    at_v = row_v + (c * 16).to(gl.int64) * stride_v
    qt = gl.load(q + at_k + offs_k, mask=ok_k & (row16 < n_valid), other=0.0)
    kt = gl.load(k + at_k + offs_k, mask=ok_k & (row16 < n_valid), other=0.0)
    gt = gl.load(g + at_k + offs_k, mask=ok_k & (row16 < n_valid), other=0.0)
    vt = gl.load(v + at_v + offs_v, mask=ok_v & (row16v < n_valid), other=0.0)
    return qt, kt, gt, vt


@gluon.jit
def _gluon_walk(q, k, v, g, o, part, other_part, flags_row, row_qk, row_v, row_part, T, K, n_cols_v, stride_qk,
                stride_v, V, scale, ST, c_lo, c_hi,
                BK: gl.constexpr, BV: gl.constexpr, REV: gl.constexpr, HANDOFF: gl.constexpr, IS_F16: gl.constexpr,
                SPIN: gl.constexpr):
    """Walk chunks ``c_lo .. c_hi - 1`` in this direction's order from the state ``Sᵀ`` (``ST``),
    writing each chunk's part (``HANDOFF`` 0, causal), handing it over per chunk (1), parking
    it (2) or meeting the other direction once in the middle (3), as
    ``kernels_single_pass._direction_walk`` does; returns the leaving state."""
    LOG2E: gl.constexpr = 1.4426950408889634
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    E: gl.constexpr = gl.float16 if IS_F16 else gl.bfloat16
    t = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    s = gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    keep = (t[:, None] <= s[None, :]) if REV else (t[:, None] >= s[None, :])
    # the triangle that sums the gates within a chunk (reverse: suffix sums), and all ones for
    # the chunk's total in every row: exact operands, one product each
    tri = gl.convert_layout(gl.where(keep, 1.0, 0.0).to(E), a_op)
    ones = gl.full([16, 16], 1.0, E, layout=a_op)
    zero_k = gl.zeros([16, BK], gl.float32, layout=mma)
    zero_v = gl.zeros([16, BV], gl.float32, layout=mma)
    zero_s = gl.zeros([16, 16], gl.float32, layout=mma)
    # the exact path's operands, one K column at a time (_exact_scores)
    sq = gl.allocate_shared_memory(gl.float32, [BK, 16, 1], smem)
    sgt = gl.allocate_shared_memory(gl.float32, [BK, 16, 1], smem)
    sk = gl.allocate_shared_memory(gl.float32, [BK, 1, 16], smem)
    sg = gl.allocate_shared_memory(gl.float32, [BK, 1, 16], smem)

    offs_k, ok_k, row16 = _tile_offsets(stride_qk, K, BK)
    offs_v, ok_v, row16v = _tile_offsets(stride_v, n_cols_v, BV)
    offs_p, _, _ = _tile_offsets(V, n_cols_v, BV)

    n_chunks = c_hi - c_lo
    c = c_hi - 1 if REV else c_lo
    nq, nk, ng, nv = _load_chunk(q, k, g, v, row_qk, row_v, c, gl.minimum(16, T - c * 16), stride_qk, stride_v,
                                 offs_k, ok_k, row16, offs_v, ok_v, row16v)
    if HANDOFF == 3:
        paired = gl.to_tensor(0)  # 1 past the meeting if the other's parts are parked
        quitter = gl.to_tensor(-1)
    for i in range(0, n_chunks):
        c = c_hi - 1 - i if REV else c_lo + i
        t0 = c * 16
        n0 = gl.minimum(16, T - t0)
        qt, kt, gt, vt = nq, nk, ng, nv
        # the next chunk's loads go out before this chunk's math (none past the last chunk)
        c_next = c - 1 if REV else c + 1
        n_next = gl.where(i + 1 < n_chunks, gl.minimum(16, T - c_next * 16), 0)
        c_next = gl.where(i + 1 < n_chunks, c_next, c)
        nq, nk, ng, nv = _load_chunk(q, k, g, v, row_qk, row_v, c_next, n_next, stride_qk, stride_v, offs_k, ok_k,
                                     row16, offs_v, ok_v, row16v)

        qf = _to_mma(qt, BK).to(gl.float32)
        kf = _to_mma(kt, BK).to(gl.float32)
        g_b = gl.convert_layout(_to_mma(gt, BK), b_op)
        G = mma_v2(tri, g_b, zero_k)
        G_last = mma_v2(ones, g_b, zero_k)  # the chunk's total, in every row
        v_m = _to_mma(vt, BV)
        if IS_F16:  # float16 v: two bfloat16 parts (exact: 11 significant bits in 8 + 8)
            v_hi, v_lo = _split(v_m.to(gl.float32))
            v_lo_b = gl.convert_layout(v_lo, b_op)
        else:
            v_hi = v_m
        v_b = gl.convert_layout(v_hi, b_op)
        vT_a = gl.convert_layout(gl.permute(v_b, [1, 0]), a_op)

        qh_hi, qh_lo = _split(qf * gl.exp2(G * LOG2E))
        qh_hi = gl.convert_layout(qh_hi, a_op)
        qh_lo = gl.convert_layout(qh_lo, a_op)
        ratio = gl.max(gl.max(gl.abs(G), axis=1), axis=0) <= 32.0
        if ratio:
            kx_hi, kx_lo = _split(kf * gl.exp2(-G * LOG2E))
            scores = _mma3(qh_hi, qh_lo, gl.convert_layout(gl.permute(kx_hi, [1, 0]), b_op),
                           gl.convert_layout(gl.permute(kx_lo, [1, 0]), b_op), zero_s)
        else:
            _barrier()  # (the last exact chunk's reads are done)
            sq.store(gl.reshape(gl.permute(qf, [1, 0]), [BK, 16, 1]))
            sgt.store(gl.reshape(gl.permute(G, [1, 0]), [BK, 16, 1]))
            sk.store(gl.reshape(gl.permute(kf, [1, 0]), [BK, 1, 16]))
            sg.store(gl.reshape(gl.permute(G, [1, 0]), [BK, 1, 16]))
            _barrier()
            scores = _exact_scores(sq, sk, sg, sgt, REV, BK)
            kx_hi, kx_lo = _split(kf * gl.exp2((G_last - G) * LOG2E))
        a_hi, a_lo = _split(gl.where(keep, scores, 0.0))
        a_hi = gl.convert_layout(a_hi, a_op)
        a_lo = gl.convert_layout(a_lo, a_op)

        # o = A·v + qh·S, with S as it entered the chunk
        out = mma_v2(a_lo, v_b, zero_v)
        if IS_F16:
            out = mma_v2(a_hi, v_lo_b, out)
        out = mma_v2(a_hi, v_b, out)
        S_hi, S_lo = _split(ST)
        out = _mma3(qh_hi, qh_lo, gl.convert_layout(gl.permute(S_hi, [1, 0]), b_op),
                    gl.convert_layout(gl.permute(S_lo, [1, 0]), b_op), out)

        # Sᵀ' = (Sᵀ + vᵀ kh) e^{G_last}  or, exact,  Sᵀ e^{G_last} + vᵀ kd
        decay = gl.exp2(G_last * LOG2E)
        kx_hi = gl.convert_layout(kx_hi, b_op)
        kx_lo = gl.convert_layout(kx_lo, b_op)
        if not ratio:
            ST = _decay_state(ST, decay, BK, BV)
        ST = mma_v2(vT_a, kx_lo, ST)
        if IS_F16:
            ST = mma_v2(gl.convert_layout(gl.permute(v_lo_b, [1, 0]), a_op), kx_hi, ST)
        ST = mma_v2(vT_a, kx_hi, ST)
        if ratio:
            ST = _decay_state(ST, decay, BK, BV)

        out_m = out
        out = _from_mma(out_m, BV)
        at_v = row_v + t0.to(gl.int64) * stride_v
        rows_ok = row16v < n0
        if HANDOFF == 3:
            p_at = row_part + t0.to(gl.int64) * V + offs_p
            # first half (and the middle chunk): park; then, once, the meeting; second half:
            # add the other's part and write, or park if the other never came
            if (2 * i <= n_chunks - 1) | (paired == 0):
                gl.store(part + p_at, out, mask=ok_v & rows_ok)
            if i == n_chunks // 2:
                paired, quitter = _gluon_meet(flags_row + c_lo, 1 if REV else 0, SPIN)
            if (paired != 0) & (2 * i >= n_chunks - 1):
                out += gl.load(other_part + p_at, mask=ok_v & rows_ok, other=0.0, cache_modifier=".cg")
                gl.store(o + at_v + offs_v, (scale * out).to(E), mask=ok_v & rows_ok)
        elif HANDOFF == 2:  # park every part; _gla_fwd_sum_parts_kernel writes o afterwards
            gl.store(part + row_part + t0.to(gl.int64) * V + offs_p, out, mask=ok_v & rows_ok)
        elif HANDOFF == 1:
            flag = flags_row + c
            arrived = 0
            if i > n_chunks - 1 - i:  # the other direction most likely parked its part already
                arrived = gl.atomic_add(flag, 0, sem="acquire", scope="gpu")
                _barrier()
            if arrived == 0:  # park this direction's part, then count
                gl.store(part + row_part + t0.to(gl.int64) * V + offs_p, out, mask=ok_v & rows_ok)
                _barrier()
                arrived = gl.atomic_add(flag, 1, sem="acq_rel", scope="gpu")
                _barrier()
            if arrived == 1:
                out += gl.load(other_part + row_part + t0.to(gl.int64) * V + offs_p, mask=ok_v & rows_ok,
                               other=0.0, cache_modifier=".cg")
                gl.store(o + at_v + offs_v, (scale * out).to(E), mask=ok_v & rows_ok)
        else:  # (the scaling and rounding before the relabelling: in the other order the causal
            # build failed in Triton 3.6's lowering to LLVM)
            gl.store(o + at_v + offs_v, _from_mma((scale * out_m).to(E), BV), mask=ok_v & rows_ok)
    if HANDOFF == 3:
        if (quitter >= 0) & (n_chunks >= 2):  # (a one-chunk walk has no tail; see the tl kernel's)
            _gluon_tail(part, other_part, o, flags_row + c_lo + 1, row_part, row_v, T, V, scale, stride_v, offs_v,
                        ok_v, row16v, offs_p, c_lo, n_chunks, quitter, E)
    return ST


@gluon.jit
def _gluon_meet(meet, D: gl.constexpr, SPIN: gl.constexpr):
    """``kernels_single_pass._meet``: the two directions' one meeting at the middle of their
    walks; returns (1 if this program adds the other's parked parts in its second half, the
    direction that gave up waiting or -1)."""
    _barrier()  # (the parked stores before the count)
    prev = gl.atomic_add(meet, 1, sem="acq_rel", scope="gpu")
    paired = gl.where(prev != 0, 1, 0)
    quitter = gl.where(prev >= 3, prev - 3, -1)
    if prev == 0:
        seen = prev + 1
        tries = 0
        while (seen == 1) & (tries < SPIN):
            seen = gl.atomic_add(meet, 0, sem="acquire", scope="gpu")
            tries += 1
        if seen == 1:
            seen = gl.atomic_cas(meet, 1, 3 + D, sem="acq_rel", scope="gpu")
        paired = gl.where(seen == 2, 1, 0)
        quitter = gl.where(seen == 2, -1, D)
    _barrier()
    return paired, quitter


@gluon.jit
def _gluon_tail(part, other_part, o, end, row_part, row_v, T, V, scale, stride_v, offs_v, ok_v, row16v, offs_p,
                c_lo, n_chunks, quitter, E: gl.constexpr):
    """``kernels_single_pass._tail``: after a direction gave up at the meeting, the last to
    finish sums the parked parts of that direction's second half and writes ``o``."""
    _barrier()
    last = gl.atomic_add(end, 1, sem="acq_rel", scope="gpu") == 1
    _barrier()
    if last:
        half = n_chunks // 2
        first = gl.where(quitter == 0, c_lo + n_chunks - half, c_lo)
        for j in range(0, half):
            t0 = (first + j) * 16
            ok = ok_v & (row16v < gl.minimum(16, T - t0))
            p_at = row_part + t0.to(gl.int64) * V + offs_p
            total = (gl.load(part + p_at, mask=ok, other=0.0, cache_modifier=".cg")
                     + gl.load(other_part + p_at, mask=ok, other=0.0, cache_modifier=".cg"))
            gl.store(o + row_v + t0.to(gl.int64) * stride_v + offs_v, (scale * total).to(E), mask=ok)


@gluon.jit
def _decay_state(ST, decay, BK: gl.constexpr, BV: gl.constexpr):
    """``Sᵀ ⊙ decay`` with ``decay`` a ``[16, BK]`` tile whose rows are equal (the chunk's total
    decay per K column), broadcast over Sᵀ's ``BV / 16`` row blocks."""
    ST3 = gl.reshape(ST, [BV // 16, 16, BK])
    ST3 = ST3 * gl.convert_layout(decay, gl.SliceLayout(0, ST3.type.layout), assert_trivial=True)[None, :, :]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    return gl.convert_layout(gl.reshape(ST3, [BV, BK]), mma, assert_trivial=True)


@gluon.jit
def _gla_fwd_gluon_kernel(
    q, k, v, g, gr, o, part, flags, h0, ht, bstates,
    T, H, K, V, scale, SEG_CHUNKS,
    BK: gl.constexpr, BV: gl.constexpr, BIDIR: gl.constexpr, HAS_H0: gl.constexpr, STORE_HT: gl.constexpr,
    HAS_BSTATES: gl.constexpr, PARK_ALL: gl.constexpr, IS_F16: gl.constexpr, MEET: gl.constexpr = False,
    SPIN: gl.constexpr = 0,
):
    """``kernels_single_pass._gla_fwd_single_pass_kernel``'s contract (grid, ``part``,
    ``flags``, ``bstates``, ``h0``/``ht``), for bfloat16 (``IS_F16`` false) or float16 inputs,
    one warp a program."""
    scale = scale.to(gl.float32)  # Inductor (torch.compile) passes floats as float64
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    pid = gl.program_id(0)
    vb = gl.program_id(1)
    seg = gl.program_id(2)
    NSEG = gl.num_programs(2)
    NDIR: gl.constexpr = 2 if BIDIR else 1
    HANDOFF: gl.constexpr = (2 if PARK_ALL else (3 if MEET else 1)) if BIDIR else 0
    bh = pid // NDIR
    BH = gl.num_programs(0) // NDIR
    direction = pid % NDIR
    base = ((bh // H).to(gl.int64) * T) * H + bh % H
    row_qk = base * K
    row_v = base * V + vb * BV
    stride_qk = H * K
    stride_v = H * V
    n_cols_v = V - vb * BV
    kv = gl.cast(K, gl.int64) * V  # (K == 1 arrives as a constant: the JIT specialises it)
    n_chunks = gl.cdiv(T, 16)
    c_lo = seg * SEG_CHUNKS
    c_hi = gl.minimum(c_lo + SEG_CHUNKS, n_chunks)
    row_part = bh.to(gl.int64) * n_chunks * 16 * V + vb * BV
    part_size = BH.to(gl.int64) * n_chunks * 16 * V
    flags_row = flags + (bh * gl.num_programs(1) + vb) * n_chunks
    s_offs, s_mask = _state_offsets(K, V, n_cols_v, BK, BV)
    s_offs += vb * BV
    bst = bstates + bh.to(gl.int64) * (NSEG + 1) * kv
    ST = gl.zeros([BV, BK], gl.float32, layout=mma)
    # (T > 0 always holds; without a run-time branch around it the causal build's only walk
    # failed in Triton 3.6's lowering to LLVM)
    if (direction == 0) & (T > 0):
        if HAS_BSTATES:
            ST = gl.load(bst + seg * kv + s_offs, mask=s_mask, other=0.0)
        elif HAS_H0:
            ST = gl.load(h0 + bh.to(gl.int64) * kv + s_offs, mask=s_mask, other=0.0)
        ST = _gluon_walk(q, k, v, g, o, part, part + part_size, flags_row, row_qk, row_v, row_part, T, K, n_cols_v,
                         stride_qk, stride_v, V, scale, ST, c_lo, c_hi, BK, BV, False, HANDOFF, IS_F16, SPIN)
        if STORE_HT:
            gl.store(ht + bh.to(gl.int64) * kv + s_offs, ST, mask=s_mask)
    if BIDIR:
        if direction == 1:
            if HAS_BSTATES:
                ST = gl.load(bst + BH.to(gl.int64) * (NSEG + 1) * kv + (seg + 1) * kv + s_offs, mask=s_mask,
                             other=0.0)
            _gluon_walk(q, k, v, gr, o, part + part_size, part, flags_row, row_qk, row_v, row_part, T, K, n_cols_v,
                        stride_qk, stride_v, V, scale, ST, c_lo, c_hi, BK, BV, True, HANDOFF, IS_F16, SPIN)
