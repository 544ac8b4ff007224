"""Between tensors and the Numba kernels: compute dtype, buffers, how the work is split.

Tensors cross into the kernels as NumPy views of CPU tensors (no copies for contiguous
float32 / float64 inputs); every output buffer is allocated here with torch, so the results
are ordinary tensors. Importing this module imports Numba (and compiles or loads the kernels
on first call), so the backend imports it only inside its methods.
"""

from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch

from glakernels._problem import GLAGradients, GLAInputs

from . import recurrent

#: Narrowest block of value columns the forward pass splits ``V`` into when there are fewer
#: sequences than threads; below this the vector loop over columns gets too short.
MIN_FORWARD_BLOCK_V = 16

#: The backward pass cuts ``V`` into blocks of this width (the last may be narrower). The sums
#: over V (dq, dk) are formed per block and then added in block order, so the block width
#: must depend on V alone — never on the batch or the thread count — for a sequence's
#: gradients to be bitwise independent of the rest of the batch. 64 columns per row keep the
#: one horizontal sum per row (dk) cheap relative to the row's work (measured: 2x faster
#: reverse sweep than 32).
BACKWARD_BLOCK_V = 64


def _array(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous NumPy view (a copy only when a cast or a re-layout is needed)."""
    return x.detach().to(dtype).contiguous().numpy()


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests swap in NaN-filled buffers to catch
    an element a kernel forgets to write)."""
    return torch.empty(shape, dtype=dtype)


def _placeholder(ndim: int, dtype: torch.dtype) -> np.ndarray:
    # an absent optional array travels as an empty one of the right rank and dtype, so that
    # it does not add a compiled specialisation per combination of present/absent arguments
    return np.empty((0,) * ndim, dtype=torch.empty((), dtype=dtype).numpy().dtype)


def _decays(g: torch.Tensor, acc: torch.dtype) -> np.ndarray:
    """``exp(g)`` for the backward pass, once instead of once per sweep and value block.
    Computed by Numba, not torch: torch's CPU exp treats the tail of a buffer with another
    (scalar) routine, which would make a token's decay depend on its position in the batch."""
    gates = _array(g, acc)
    out = _empty(gates.shape, acc).numpy()
    recurrent.exp_rows(gates.reshape(-1, gates.shape[-1]), out.reshape(-1, gates.shape[-1]))
    return out


def _threads() -> int:
    """Numba's thread count for this thread (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``)."""
    return numba.get_num_threads()


#: Rough cost of running directions as separate work items (a second buffer and a pass that
#: adds them up) relative to items that own whole sequences; only decides between layouts.
SPLIT_OVERHEAD = 1.15


def directions_apart(sequences: int, n_dirs: int, threads: int) -> bool:
    """Whether the directions of a bidirectional call should be work items of their own.

    Items that own a whole sequence (every direction in turn) avoid extra buffers and passes;
    items per direction are twice as many, which balances better when the sequences do not
    divide evenly among the threads (3 sequences on 2 threads: 2 rounds of 2 directions
    against 3 rounds of 1). The choice never changes a result bit, only the time."""
    if n_dirs == 1:
        return False
    whole = -(-sequences // threads) * n_dirs
    apart = -(-(sequences * n_dirs) // threads) * SPLIT_OVERHEAD
    return apart < whole


def forward_block_v(work_items: int, head_dim_v: int, threads: int) -> int:
    """Columns per work item in the forward pass: all of V when there are enough work items
    for every thread, else V split until there are (results do not change: the columns of
    the state are independent)."""
    if work_items >= threads:
        return head_dim_v
    blocks = min(-(-threads // work_items), max(1, head_dim_v // MIN_FORWARD_BLOCK_V))
    return -(-head_dim_v // blocks)


def _sum_directions(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1]`` for ``[2, B, T, H, D]``. A Numba kernel rather than torch's add,
    whose own thread pool would contend with Numba's for the same cores."""
    out = _empty(parts.shape[1:], parts.dtype)
    recurrent.sum_directions(parts.numpy().reshape(2, -1, parts.shape[-1]), out.numpy().reshape(-1, parts.shape[-1]))
    return out


def forward(inputs: GLAInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    spec = inputs.spec
    acc = spec.state_dtype
    B, T, H, K, V = spec.batch, spec.seq_len, spec.heads, spec.head_dim_k, spec.head_dim_v
    n_dirs = 2 if spec.bidirectional else 1
    q, k, v, g = (_array(x, acc) for x in (inputs.q, inputs.k, inputs.v, inputs.g))
    g_rev = _array(inputs.g_reverse, acc) if spec.bidirectional else g
    # the two directions are averaged: each runs with half the scale
    scale = q.dtype.type(inputs.scale * (0.5 if spec.bidirectional else 1.0))
    initial = _array(inputs.initial_state, acc) if spec.has_initial_state else _placeholder(4, acc)
    final = _empty((B, H, K, V), acc) if spec.output_final_state else None
    threads = _threads()
    # one work item walks every direction of its sequence and adds them in place, or every
    # direction is an item of its own and the buffers are added afterwards (same arithmetic)
    n_bufs = n_dirs if directions_apart(B * H, n_dirs, threads) else 1
    o_bufs = _empty((n_bufs, B, T, H, V), acc)
    block_v = forward_block_v(B * H * n_bufs, V, threads)
    recurrent.forward_recurrence(
        q, k, v, g, g_rev, scale, initial, spec.has_initial_state, n_dirs, block_v,
        o_bufs.numpy(), final.numpy() if final is not None else _placeholder(4, acc), final is not None,
    )
    o = o_bufs[0] if n_bufs == 1 else _sum_directions(o_bufs)
    return o.to(spec.dtype), final


def backward(inputs: GLAInputs, grad_output: torch.Tensor, grad_final_state: Optional[torch.Tensor]) -> GLAGradients:
    spec = inputs.spec
    acc = spec.state_dtype
    B, T, H, K, V = spec.batch, spec.seq_len, spec.heads, spec.head_dim_k, spec.head_dim_v
    n_dirs = 2 if spec.bidirectional else 1
    n_blocks = -(-V // BACKWARD_BLOCK_V)
    q, k, v, do = (_array(x, acc) for x in (inputs.q, inputs.k, inputs.v, grad_output))
    decay = _decays(inputs.g, acc)
    decay_rev = _decays(inputs.g_reverse, acc) if spec.bidirectional else decay
    scale = q.dtype.type(inputs.scale * (0.5 if spec.bidirectional else 1.0))
    initial = _array(inputs.initial_state, acc) if spec.has_initial_state else _placeholder(4, acc)
    use_d_final = grad_final_state is not None
    d_final = _array(grad_final_state, acc) if use_d_final else _placeholder(4, acc)
    d_initial = _empty((B, H, K, V), acc) if spec.has_initial_state else None
    d_initial_array = d_initial.numpy() if d_initial is not None else _placeholder(4, acc)
    dq, dk, dg = (_empty((B, T, H, K), acc) for _ in range(3))
    dg_rev = _empty((B, T, H, K), acc) if spec.bidirectional else None
    dg_rev_array = dg_rev.numpy() if dg_rev is not None else _placeholder(4, acc)

    if n_blocks == 1 and not directions_apart(B * H, n_dirs, _threads()):
        # items own whole sequences and write only the gradients
        dv = _empty((B, T, H, V), acc)
        recurrent.backward_whole_sequences(
            q, k, v, decay, decay_rev, do, scale, n_dirs, initial, spec.has_initial_state, d_final, use_d_final,
            dq.numpy(), dk.numpy(), dv.numpy(), dg.numpy(), dg_rev_array, d_initial_array,
        )
    else:
        # items per direction and value block, writing shares that are added afterwards
        dq_parts = _empty((n_dirs, n_blocks, B, T, H, K), acc).numpy()
        dk_parts = _empty((n_dirs, n_blocks, B, T, H, K), acc).numpy()
        dv_dirs = _empty((n_dirs, B, T, H, V), acc)
        final_dot_parts = _empty((n_blocks, B, H, K), torch.float64).numpy() if use_d_final else _placeholder(4, torch.float64)
        recurrent.backward_sweeps(
            q, k, v, decay, decay_rev, do, scale, initial, spec.has_initial_state, d_final, use_d_final,
            BACKWARD_BLOCK_V, dq_parts, dk_parts, dv_dirs.numpy(), d_initial_array, final_dot_parts,
        )
        recurrent.combine_gradients(
            q, k, dq_parts, dk_parts, final_dot_parts, use_d_final, dq.numpy(), dk.numpy(), dg.numpy(), dg_rev_array
        )
        dv = dv_dirs[0] if n_dirs == 1 else _sum_directions(dv_dirs)
    cast = lambda x: x.to(spec.dtype)  # noqa: E731
    return GLAGradients(
        dq=cast(dq),
        dk=cast(dk),
        dv=cast(dv),
        dg=cast(dg),
        dg_reverse=cast(dg_rev) if dg_rev is not None else None,
        dinitial_state=d_initial,
    )
