"""Recurrent GLA kernels for the CPU, compiled by Numba.

Per (batch, head, direction) the state ``S`` of shape ``[K, V]`` is carried token by token::

    S_t = diag(a_t) · S_{t-1} + k_t v_tᵀ,   a_t = exp(g_t)
    o_t = scale · S_tᵀ q_t

A recurrence multiplies by one decay ``a_t <= 1`` per step, so it is stable for every finite
gate in ``[-1e4, 0]`` with no special care (``a_t = 0`` is a hard reset), and its cost is
exactly linear in ``T``. The reverse direction is the same recurrence walking time backwards
with ``g_reverse``; no flipped copies are made.

Parallelism: a work item owns one (batch, head): every direction in turn, all value
columns, adding the directions in place. When that would leave threads idle or unevenly
loaded (fewer sequences than threads, or 3 sequences on 2 threads), directions and blocks
of value columns become work items of their own: the columns of ``S`` evolve independently,
so the forward pass splits ``V`` freely; the backward pass writes each block's share of the
sums over ``V`` (``dq``, ``dk``) and adds them in a fixed order afterwards (it always does so
for V above one block). Both layouts perform the same arithmetic in the same order, and
every item owns its outputs, so results never depend on the batch, the thread count or
scheduling.

Backward, without storing per-step states (Λ_t = dL/dS_t, ``dS_T`` the final-state gradient)::

    dq_t = scale · S_t do_t                                  (forward sweep, recomputes S_t)
    Λ_t  = scale · q_t do_tᵀ + diag(a_{t+1}) · Λ_{t+1},  Λ_T = scale · q_T do_Tᵀ + dS_T
    dk_t = Λ_t v_t,  dv_t = Λ_tᵀ k_t                          (reverse sweep)
    d initial_state = diag(a_1) · Λ_1
    dg_r = Σ_{t >= r} (q_t ⊙ dq_t − k_t ⊙ dk_t) + Σ_v dS_T ⊙ S_T

The gate identity follows from ``a_r <Λ_r, S_{r-1}> = <Λ_r, S_r> − k_r ⊙ dk_r`` and
``<Λ_r, S_r> = q_r ⊙ dq_r + a_{r+1} <Λ_{r+1}, S_r>``; its suffix sum is accumulated in
float64 so that T·eps rounding stays out of ``dg``.

Arrays: inputs ``[B, T, H, D]`` C-contiguous, all in one float dtype (float32 or float64),
which is also the dtype of every product and accumulator except the float64 gate sums.
The forward pass exponentiates the gates as it goes (each decay is used once); the backward
pass uses each decay twice per value block, so it reads ``decay = exp(g)`` precomputed by
:func:`exp_rows`.

Every jitted function lives in this one file on purpose: Numba's on-disk cache notices a
change to the file that holds a kernel, not to another file that holds a helper it calls.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _work_item(item, heads, n_dirs, n_blocks):
    """Split a flat item index into (batch, head, direction, value block)."""
    block = item % n_blocks
    rest = item // n_blocks
    direction = rest % n_dirs
    rest = rest // n_dirs
    return rest // heads, rest % heads, direction, block


@njit(inline="always")
def _time_index(step, seq_len, direction):
    """The token a direction visits at ``step``: forwards in time, or backwards."""
    return step if direction == 0 else seq_len - 1 - step


@njit(parallel=True, cache=True)
def forward_recurrence(q, k, v, g, g_rev, scale, initial, use_initial, n_dirs, block_v, o_bufs, final, write_final):
    """The output of ``n_dirs`` directions (1: causal, 2: bidirectional), times ``scale``.

    One buffer (``o_bufs.shape[0] == 1``): a work item walks every direction of its sequence
    in turn and adds them up in place. ``n_dirs`` buffers: every direction is a work item of
    its own (more items for few sequences) and writes its own buffer; the caller adds them.
    ``g_rev`` serves direction 1; ``initial`` / ``final`` ``[B, H, K, V]`` are used only when
    ``use_initial`` / ``write_final`` (causal). Decays are exponentiated here, each once (per
    value block), rather than read from a precomputed array: one pass over memory fewer."""
    B, T, H, K = q.shape
    V = v.shape[3]
    n_bufs = o_bufs.shape[0]
    dirs_per_item = n_dirs // n_bufs
    n_blocks = (V + block_v - 1) // block_v
    zero = q.dtype.type(0)
    for item in prange(B * H * n_bufs * n_blocks):
        b, h, buf, blk = _work_item(item, H, n_bufs, n_blocks)
        j0 = blk * block_v
        w = min(block_v, V - j0)
        state = np.zeros((K, w), dtype=q.dtype)
        acc = np.empty(w, dtype=q.dtype)
        for step_dir in range(dirs_per_item):
            d = buf + step_dir
            gates = g if d == 0 else g_rev
            for i in range(K):
                for j in range(w):
                    state[i, j] = initial[b, h, i, j0 + j] if use_initial else zero
            for n in range(T):
                t = _time_index(n, T, d)
                # slices of the block, indexed from 0: an index like j0 + j is not provably
                # non-negative, and Numba's negative-index wraparound then blocks vectorisation
                v_t = v[b, t, h, j0 : j0 + w]
                q_t = q[b, t, h]
                k_t = k[b, t, h]
                g_t = gates[b, t, h]
                for j in range(w):
                    acc[j] = zero
                for i in range(K):
                    a = np.exp(g_t[i])
                    kk = k_t[i]
                    qq = q_t[i] * scale
                    row = state[i]
                    for j in range(w):
                        s = a * row[j] + kk * v_t[j]
                        row[j] = s
                        acc[j] += qq * s
                out = o_bufs[buf, b, t, h, j0 : j0 + w]
                if step_dir == 0:
                    for j in range(w):
                        out[j] = acc[j]
                else:
                    for j in range(w):
                        out[j] += acc[j]
        if write_final:
            for i in range(K):
                for j in range(w):
                    final[b, h, i, j0 + j] = state[i, j]


# ---- backward: one step of each sweep, shared by both work layouts below ----------------------
# Both layouts call the same helpers in the same order, so they give the same bits: which
# one runs depends on the batch and the thread count, a sequence's gradients must not.


@njit(inline="always")
def _state_step(state_t, a_t, k_t, v_blk, do_blk, scale, dq_acc):
    """Forward sweep, one step on a block of state columns stored transposed (``[w, K]``):
    ``S_t = diag(a_t) S_{t-1} + k_t v_tᵀ`` and this block's share of ``dq_t = scale S_t do_t``
    into ``dq_acc``. Transposed, the sum over columns vectorises over K with no reassociation."""
    w, K = state_t.shape
    for i in range(K):
        dq_acc[i] = 0
    for j in range(w):
        vj = v_blk[j]
        dj = do_blk[j] * scale
        row = state_t[j]
        for i in range(K):
            s = a_t[i] * row[i] + k_t[i] * vj
            row[i] = s
            dq_acc[i] += s * dj


@njit(fastmath={"reassoc"})
def _adjoint_step(lam, a_t, q_t, k_t, v_blk, do_blk, scale, dk_acc, dv_acc):
    """Reverse sweep, one step on a block of columns of ``Λ`` (``[K, w]``): row ``i`` adds
    ``scale q_t[i] do_t`` to what step t + 1 carried; ``dk_acc[i]`` gets this block's share of
    ``dk_t[i] = Λ_t[i] · v_t``, ``dv_acc`` the block's ``dv_t = Λ_tᵀ k_t``; ``Λ`` is left
    multiplied by ``a_t``, which is what reaches step t - 1.

    A function of its own (not inlined into the kernels) for one reason: ``reassoc`` here,
    and nowhere else, lets the compiler vectorise the ``dk`` sum along each row. The order it
    picks depends only on the row length, so results stay reproducible; no other fast-math
    flag is set (infinities and NaNs propagate)."""
    K, w = lam.shape
    for j in range(w):
        dv_acc[j] = 0
    for i in range(K):
        sq = q_t[i] * scale
        kk = k_t[i]
        a = a_t[i]
        row = lam[i]
        dk = row.dtype.type(0)
        for j in range(w):
            lam_ij = row[j] + sq * do_blk[j]
            dk += lam_ij * v_blk[j]
            dv_acc[j] += lam_ij * kk
            row[j] = a * lam_ij
        dk_acc[i] = dk


@njit(inline="always")
def _final_state_dot(d_final_blk, state_t, gate_sum):
    """``gate_sum += Σ_v dS_T ⊙ S_T`` over a block of columns, in float64."""
    K = state_t.shape[1]
    for i in range(K):
        total = 0.0
        for j in range(state_t.shape[0]):
            total += np.float64(d_final_blk[i, j]) * np.float64(state_t[j, i])
        gate_sum[i] += total


@njit(inline="always")
def _gate_step(gate_sum, q_t, k_t, dq_d, dk_d, dg_t, dq_t, dk_t, first):
    """One step (in the direction's reverse time order) of ``dg_r = Σ_{t >= r} (q_t ⊙ dq_t −
    k_t ⊙ dk_t)`` in float64, for one direction's ``dq_d`` / ``dk_d``; these are also stored
    (``first``) or added into ``dq_t`` / ``dk_t``. ``dg_t`` may be the very memory ``dq_d``
    is read from: it is written last. (Separate loops, so that each vectorises.)"""
    K = q_t.shape[0]
    for i in range(K):
        gate_sum[i] += np.float64(q_t[i]) * np.float64(dq_d[i]) - np.float64(k_t[i]) * np.float64(dk_d[i])
    if first:
        for i in range(K):
            dq_t[i] = dq_d[i]
            dk_t[i] = dk_d[i]
    else:
        for i in range(K):
            dq_t[i] += dq_d[i]
            dk_t[i] += dk_d[i]
    for i in range(K):
        dg_t[i] = gate_sum[i]


@njit(inline="always")
def _load_state(dst, src_blk, transposed, use_src):
    """``dst = src_blk`` (or its transpose, or zeros)."""
    rows, cols = dst.shape
    for r in range(rows):
        for c in range(cols):
            if not use_src:
                dst[r, c] = 0
            elif transposed:
                dst[r, c] = src_blk[c, r]
            else:
                dst[r, c] = src_blk[r, c]


# ---- backward: work items that own whole sequences ------------------------------------------


@njit(parallel=True, cache=True)
def backward_whole_sequences(
    q, k, v, decay, decay_rev, do, scale, n_dirs, initial, use_initial, d_final, use_d_final,
    dq, dk, dv, dg, dg_rev, d_initial,
):
    """The whole backward pass, one work item per (batch, head): every direction in turn and
    all of V (at most one value block). Nothing but the gradients is written: a direction's
    ``dq`` waits in its gate-gradient output between the two sweeps, and the reverse sweep
    replaces it with the gate gradient; the second direction adds to the first's dq, dk, dv."""
    B, T, H, K = q.shape
    V = v.shape[3]
    for item in prange(B * H):
        b = item // H
        h = item % H
        state_t = np.empty((V, K), dtype=q.dtype)
        lam = np.empty((K, V), dtype=q.dtype)
        dq_acc = np.empty(K, dtype=q.dtype)
        dk_acc = np.empty(K, dtype=q.dtype)
        dv_acc = np.empty(V, dtype=q.dtype)
        gate_sum = np.empty(K, dtype=np.float64)
        for d in range(n_dirs):
            a_all = decay if d == 0 else decay_rev
            dg_d = dg if d == 0 else dg_rev
            _load_state(state_t, initial[b, h] if use_initial else initial.reshape(0, 0), True, use_initial)
            for n in range(T):
                t = _time_index(n, T, d)
                _state_step(state_t, a_all[b, t, h], k[b, t, h], v[b, t, h], do[b, t, h], scale, dq_acc)
                parked = dg_d[b, t, h]
                for i in range(K):
                    parked[i] = dq_acc[i]
            for i in range(K):
                gate_sum[i] = 0.0
            if use_d_final:
                _final_state_dot(d_final[b, h], state_t, gate_sum)
            _load_state(lam, d_final[b, h] if use_d_final else d_final.reshape(0, 0), False, use_d_final)
            for n in range(T - 1, -1, -1):
                t = _time_index(n, T, d)
                _adjoint_step(lam, a_all[b, t, h], q[b, t, h], k[b, t, h], v[b, t, h], do[b, t, h], scale, dk_acc, dv_acc)
                dv_t = dv[b, t, h]
                if d == 0:
                    for j in range(V):
                        dv_t[j] = dv_acc[j]
                else:
                    for j in range(V):
                        dv_t[j] += dv_acc[j]
                _gate_step(gate_sum, q[b, t, h], k[b, t, h], dg_d[b, t, h], dk_acc, dg_d[b, t, h], dq[b, t, h], dk[b, t, h], d == 0)
            if use_initial:
                d_init = d_initial[b, h]
                for i in range(K):
                    for j in range(V):
                        d_init[i, j] = lam[i, j]


# ---- backward: work items split by direction and value block ----------------------------------


@njit(parallel=True, cache=True)
def backward_sweeps(
    q, k, v, decay, decay_rev, do, scale, initial, use_initial, d_final, use_d_final, block_v,
    dq_parts, dk_parts, dv_dirs, d_initial, final_dot_parts,
):
    """Both sweeps for every (batch, head, direction, value block); :func:`combine_gradients`
    then adds the shares. For V above one block, or when directions as separate items balance
    the threads better.

    Writes ``dq_parts`` / ``dk_parts`` ``[n_dirs, n_blocks, B, T, H, K]`` (this block's share
    of the sums over V), ``dv_dirs`` ``[n_dirs, B, T, H, V]``, ``d_initial`` ``[B, H, K, V]``
    when ``use_initial`` and, when ``use_d_final``, ``final_dot_parts[blk, b, h]`` (float64,
    ``Σ_{v in block} dS_T ⊙ S_T``)."""
    B, T, H, K = q.shape
    V = v.shape[3]
    n_dirs = dv_dirs.shape[0]
    n_blocks = (V + block_v - 1) // block_v
    for item in prange(B * H * n_dirs * n_blocks):
        b, h, d, blk = _work_item(item, H, n_dirs, n_blocks)
        j0 = blk * block_v
        j1 = min(V, j0 + block_v)
        w = j1 - j0
        a_all = decay if d == 0 else decay_rev
        state_t = np.empty((w, K), dtype=q.dtype)
        lam = np.empty((K, w), dtype=q.dtype)
        dq_acc = np.empty(K, dtype=q.dtype)
        dv_acc = np.empty(w, dtype=q.dtype)
        _load_state(state_t, initial[b, h, :, j0:j1] if use_initial else initial.reshape(0, 0), True, use_initial)
        for n in range(T):
            t = _time_index(n, T, d)
            # value columns through slices, indexed from 0: an index like j0 + j is not provably
            # non-negative, and Numba's negative-index wraparound then blocks vectorisation
            _state_step(state_t, a_all[b, t, h], k[b, t, h], v[b, t, h, j0:j1], do[b, t, h, j0:j1], scale, dq_acc)
            out = dq_parts[d, blk, b, t, h]
            for i in range(K):
                out[i] = dq_acc[i]
        if use_d_final:
            dots = final_dot_parts[blk, b, h]
            for i in range(K):
                dots[i] = 0.0
            _final_state_dot(d_final[b, h, :, j0:j1], state_t, dots)
        _load_state(lam, d_final[b, h, :, j0:j1] if use_d_final else d_final.reshape(0, 0), False, use_d_final)
        for n in range(T - 1, -1, -1):
            t = _time_index(n, T, d)
            _adjoint_step(lam, a_all[b, t, h], q[b, t, h], k[b, t, h], v[b, t, h, j0:j1], do[b, t, h, j0:j1], scale,
                          dk_parts[d, blk, b, t, h], dv_acc)
            dv_t = dv_dirs[d, b, t, h, j0:j1]
            for j in range(w):
                dv_t[j] = dv_acc[j]
        if use_initial:
            d_init = d_initial[b, h, :, j0:j1]
            for i in range(K):
                for j in range(w):
                    d_init[i, j] = lam[i, j]


@njit(parallel=True, cache=True)
def combine_gradients(q, k, dq_parts, dk_parts, final_dot_parts, use_d_final, dq, dk, dg, dg_rev):
    """Add :func:`backward_sweeps`' shares into ``dq`` and ``dk`` (fixed order: direction, then
    block) and form each direction's gate gradient (``dg``, and ``dg_rev`` for direction 1),
    accumulated in float64 along that direction's time order."""
    B, T, H, K = q.shape
    n_dirs, n_blocks = dq_parts.shape[0], dq_parts.shape[1]
    for item in prange(B * H):
        b = item // H
        h = item % H
        gate_sum = np.empty(K, dtype=np.float64)
        dq_d = np.empty(K, dtype=q.dtype)
        dk_d = np.empty(K, dtype=q.dtype)
        for d in range(n_dirs):
            dg_d = dg if d == 0 else dg_rev
            for i in range(K):
                gate_sum[i] = 0.0
            if use_d_final:  # causal only: Σ_v dS_T ⊙ S_T enters every step
                for blk in range(n_blocks):
                    dots = final_dot_parts[blk, b, h]
                    for i in range(K):
                        gate_sum[i] += dots[i]
            for n in range(T - 1, -1, -1):
                t = _time_index(n, T, d)
                # one view per statement: a view unpacked from a tuple inside prange lost its
                # writes (Numba 0.68)
                part_q = dq_parts[d, 0, b, t, h]
                part_k = dk_parts[d, 0, b, t, h]
                for i in range(K):
                    dq_d[i] = part_q[i]
                    dk_d[i] = part_k[i]
                for blk in range(1, n_blocks):
                    part_q = dq_parts[d, blk, b, t, h]
                    part_k = dk_parts[d, blk, b, t, h]
                    for i in range(K):
                        dq_d[i] += part_q[i]
                        dk_d[i] += part_k[i]
                _gate_step(gate_sum, q[b, t, h], k[b, t, h], dq_d, dk_d, dg_d[b, t, h], dq[b, t, h], dk[b, t, h], d == 0)


@njit(parallel=True, cache=True)
def exp_rows(x, out):
    """``out = exp(x)`` for ``[N, K]`` arrays, one row per iteration: every row runs the same
    loop, so even where the compiler vectorises ``exp`` (Intel SVML) and treats a loop's tail
    with a scalar routine, a token's decays never depend on its position in the batch."""
    for r in prange(x.shape[0]):
        for i in range(x.shape[1]):
            out[r, i] = np.exp(x[r, i])


@njit(parallel=True, cache=True)
def sum_directions(parts, out):
    """``out = parts[0] + parts[1]`` for ``[2, N, D]`` / ``[N, D]`` arrays, row by row."""
    for r in prange(out.shape[0]):
        first = parts[0, r]
        second = parts[1, r]
        row = out[r]
        for i in range(out.shape[1]):
            row[i] = first[i] + second[i]
