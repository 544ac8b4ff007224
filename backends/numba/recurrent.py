"""Recurrent GLA kernels for the CPU, compiled by Numba.

Per (batch, head, direction) the state ``S`` of shape ``[K, V]`` is carried token by token::

    S_t = diag(a_t) · S_{t-1} + k_t v_tᵀ,   a_t = exp(g_t)
    o_t = scale · S_tᵀ q_t

A recurrence multiplies by one decay ``a_t <= 1`` per step, so it is stable for every finite
gate in ``[-1e4, 0]`` with no special care (``a_t = 0`` is a hard reset), and its cost is
exactly linear in ``T``. The reverse direction is the same recurrence walking time backwards
with ``g_reverse``; no flipped copies are made.

Parallelism: one work item is (batch, head, direction, block of value columns). The columns
of ``S`` evolve independently, so splitting ``V`` needs no communication in the forward pass;
in the backward pass, the sums over ``V`` (``dq``, ``dk``) are written per block and added in a
fixed order afterwards. Every item owns its outputs, so results never depend on scheduling.

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
``decay = exp(g)`` is precomputed by the caller (once, instead of once per value block).
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
def forward_recurrence(q, k, v, decay, decay_rev, scale, initial, use_initial, n_dirs, block_v, o_bufs, final, write_final):
    """The output of ``n_dirs`` directions (1: causal, 2: bidirectional), times ``scale``.

    One buffer (``o_bufs.shape[0] == 1``): a work item walks every direction of its sequence
    in turn and adds them up in place. ``n_dirs`` buffers: every direction is a work item of
    its own (more items for few sequences) and writes its own buffer; the caller adds them.
    ``decay_rev`` serves direction 1; ``initial`` / ``final`` ``[B, H, K, V]`` are used only
    when ``use_initial`` / ``write_final`` (causal)."""
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
            a_all = decay if d == 0 else decay_rev
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
                a_t = a_all[b, t, h]
                for j in range(w):
                    acc[j] = zero
                for i in range(K):
                    a = a_t[i]
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


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def backward_sweeps(
    q, k, v, decay, decay_rev, do, scale, initial, use_initial, d_final, use_d_final, block_v,
    dq_parts, dk_parts, dv_dirs, d_initial, final_dot_parts,
):
    """Both sweeps of the backward pass for every (batch, head, direction, value block).

    Writes ``dq_parts`` / ``dk_parts`` ``[n_dirs, n_blocks, B, T, H, K]`` (this block's share
    of the sums over V), ``dv_dirs`` ``[n_dirs, B, T, H, V]``, ``d_initial`` ``[B, H, K, V]``
    when ``use_initial`` and, when ``use_d_final``, ``final_dot_parts[blk, b, h, i] =
    Σ_{v in block} dS_T[i, v] · S_T[i, v]`` in float64.

    ``reassoc`` lets the compiler vectorise the one sum along a contiguous row (``dk``); the
    order it picks depends only on the block width, so results stay bitwise reproducible and
    independent of the batch. No other fast-math flag is set: infinities and NaNs propagate.
    """
    B, T, H, K = q.shape
    V = v.shape[3]
    n_dirs = dv_dirs.shape[0]
    n_blocks = (V + block_v - 1) // block_v
    zero = q.dtype.type(0)
    for item in prange(B * H * n_dirs * n_blocks):
        b, h, d, blk = _work_item(item, H, n_dirs, n_blocks)
        j0 = blk * block_v
        w = min(block_v, V - j0)
        a_all = decay if d == 0 else decay_rev

        # forward sweep: recompute S_t, stored transposed ([w, K]) so that dq_t = S_t do_t
        # is a sum over rows and vectorises over K without reassociation
        state_t = np.zeros((w, K), dtype=q.dtype)
        if use_initial:
            for j in range(w):
                for i in range(K):
                    state_t[j, i] = initial[b, h, i, j0 + j]
        dq_acc = np.empty(K, dtype=q.dtype)
        for n in range(T):
            t = _time_index(n, T, d)
            a_t = a_all[b, t, h]
            k_t = k[b, t, h]
            v_t = v[b, t, h, j0 : j0 + w]
            do_t = do[b, t, h, j0 : j0 + w]
            for i in range(K):
                dq_acc[i] = zero
            for j in range(w):
                vj = v_t[j]
                dj = do_t[j] * scale
                row = state_t[j]
                for i in range(K):
                    s = a_t[i] * row[i] + k_t[i] * vj
                    row[i] = s
                    dq_acc[i] += s * dj
            out = dq_parts[d, blk, b, t, h]
            for i in range(K):
                out[i] = dq_acc[i]
        if use_d_final:
            for i in range(K):
                total = 0.0
                for j in range(w):
                    total += np.float64(d_final[b, h, i, j0 + j]) * np.float64(state_t[j, i])
                final_dot_parts[blk, b, h, i] = total

        # reverse sweep: Λ ([K, w]) walks back from the final-state gradient; after step t it
        # is multiplied by a_t, which is what reaches step t - 1
        lam = np.zeros((K, w), dtype=q.dtype)
        if use_d_final:
            for i in range(K):
                for j in range(w):
                    lam[i, j] = d_final[b, h, i, j0 + j]
        dv_acc = np.empty(w, dtype=q.dtype)
        for n in range(T - 1, -1, -1):
            t = _time_index(n, T, d)
            a_t = a_all[b, t, h]
            q_t = q[b, t, h]
            k_t = k[b, t, h]
            v_t = v[b, t, h, j0 : j0 + w]
            do_t = do[b, t, h, j0 : j0 + w]
            dk_t = dk_parts[d, blk, b, t, h]
            for j in range(w):
                dv_acc[j] = zero
            for i in range(K):
                sq = q_t[i] * scale
                kk = k_t[i]
                a = a_t[i]
                row = lam[i]
                dk_i = zero
                for j in range(w):
                    lam_ij = row[j] + sq * do_t[j]
                    dk_i += lam_ij * v_t[j]
                    dv_acc[j] += lam_ij * kk
                    row[j] = a * lam_ij
                dk_t[i] = dk_i
            dv_t = dv_dirs[d, b, t, h, j0 : j0 + w]
            for j in range(w):
                dv_t[j] = dv_acc[j]
        if use_initial:
            for i in range(K):
                for j in range(w):
                    d_initial[b, h, i, j0 + j] = lam[i, j]


@njit(parallel=True, cache=True)
def combine_gradients(q, k, dq_parts, dk_parts, final_dot_parts, use_d_final, dq, dk, dg, dg_rev):
    """Add the per-block, per-direction shares into ``dq`` and ``dk`` (fixed order: direction,
    then block) and form each direction's gate gradient (``dg``, and ``dg_rev`` for direction
    1) by the suffix-sum identity, accumulated in float64 along that direction's time order."""
    B, T, H, K = q.shape
    n_dirs, n_blocks = dq_parts.shape[0], dq_parts.shape[1]
    for item in prange(B * H):
        b = item // H
        h = item % H
        gate_sum = np.zeros(K, dtype=np.float64)
        dq_d = np.empty(K, dtype=q.dtype)
        dk_d = np.empty(K, dtype=q.dtype)
        for d in range(n_dirs):
            dg_d = dg if d == 0 else dg_rev
            for i in range(K):
                gate_sum[i] = 0.0
            if use_d_final:  # causal only: Σ_v dS_T ⊙ S_T enters every step
                for blk in range(n_blocks):
                    for i in range(K):
                        gate_sum[i] += final_dot_parts[blk, b, h, i]
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
                q_t = q[b, t, h]
                k_t = k[b, t, h]
                dg_t = dg_d[b, t, h]
                for i in range(K):
                    gate_sum[i] += np.float64(q_t[i]) * np.float64(dq_d[i]) - np.float64(k_t[i]) * np.float64(dk_d[i])
                    dg_t[i] = gate_sum[i]
                dq_t = dq[b, t, h]
                dk_t = dk[b, t, h]
                if d == 0:
                    for i in range(K):
                        dq_t[i] = dq_d[i]
                        dk_t[i] = dk_d[i]
                else:
                    for i in range(K):
                        dq_t[i] += dq_d[i]
                        dk_t[i] += dk_d[i]


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
