"""Chunked GLA in plain PyTorch: forward and an explicit backward, one causal direction.

The sequence is cut into chunks of ``C`` tokens. Inside a chunk the output is a small masked
attention with a per-channel decay; across chunks a ``[K, V]`` state is carried by a scan
(Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training", §4).

Numerical stability for any finite gate in ``[-1e4, 0]``: every decay factor is
``exp(sum of gates over a range of steps)``, and each of those sums is accumulated *directly*
(prefix sums, suffix sums, and a masked cumulative sum per key position) — never as a
difference of two cumulative sums. Such differences are the usual failure: after a gate of
-1e4 the cumulative sums are ~1e4 in magnitude, float32 keeps them to ~1e-3, and the small
in-chunk decays that follow come out 0.1% wrong. Factoring ``exp(G_t - G_s)`` into
``exp(G_t) · exp(-G_s)`` is worse still (overflow). Every exponent here is ``<= 0``.

Shapes inside this module: chunked tensors are ``[B, H, N, C, D]`` (``N`` chunks of ``C``).
All arithmetic runs in the dtype it is given (the backend passes float32 or float64).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def to_chunks(x: Tensor, chunk: int) -> Tensor:
    """``[B, T, H, D]`` -> ``[B, H, N, C, D]``, zero-padded at the end of time."""
    B, T, H, D = x.shape
    n_chunks = -(-T // chunk)
    x = x.transpose(1, 2)
    if n_chunks * chunk != T:
        x = F.pad(x, (0, 0, 0, n_chunks * chunk - T))
    return x.reshape(B, H, n_chunks, chunk, D)


def from_chunks(x: Tensor, seq_len: int) -> Tensor:
    """``[B, H, N, C, D]`` -> ``[B, T, H, D]`` (drops the padding)."""
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)[:, :, :seq_len].transpose(1, 2)


def reverse_cumsum(x: Tensor, dim: int) -> Tensor:
    return x.flip(dim).cumsum(dim).flip(dim)


class ChunkDecays(NamedTuple):
    """Decay factors of one chunked gate tensor ``g`` of shape ``[B, H, N, C, K]``."""

    from_start: Tensor  # exp(sum_{r<=t} g_r): chunk start -> token t          [B,H,N,C,K]
    to_end: Tensor  # exp(sum_{r>t} g_r): token t -> chunk end                     [B,H,N,C,K]
    whole: Tensor  # exp(sum_r g_r): across the whole chunk                        [B,H,N,K]
    pairwise: Tensor  # exp(sum_{s<r<=t} g_r) for s<=t, 0 above the diagonal      [B,H,N,C,C,K]


def chunk_decays(g: Tensor) -> ChunkDecays:
    C = g.shape[-2]
    prefix = g.cumsum(-2)
    next_gate = F.pad(g[..., 1:, :], (0, 0, 0, 1))  # g_{t+1}, 0 past the chunk end
    suffix = reverse_cumsum(next_gate, -2)
    idx = torch.arange(C, device=g.device)
    after = (idx[None, :] > idx[:, None])[..., None]  # [s, r, 1]: r > s
    # running[..., s, t, :] = sum_{s < r <= t} g_r, summed term by term from s (no cancellation)
    running = torch.where(after, g.unsqueeze(-3), 0).cumsum(-2)
    causal = (idx[:, None] >= idx[None, :])[..., None]  # [t, s, 1]: s <= t
    pairwise = torch.where(causal, torch.exp(running.transpose(-3, -2)), 0)
    return ChunkDecays(prefix.exp(), suffix.exp(), prefix[..., -1, :].exp(), pairwise)


def scan_states(chunk_states: Tensor, chunk_decay: Tensor, initial: Optional[Tensor]):
    """Carry the state across chunks: ``S_n = decay_n * S_{n-1} + chunk_states_n``.

    Returns the state entering every chunk ``[B, H, N, K, V]`` and the final state."""
    B, H, N, K, V = chunk_states.shape
    state = chunk_states.new_zeros(B, H, K, V) if initial is None else initial
    entering = []
    for n in range(N):
        entering.append(state)
        state = chunk_decay[:, :, n, :, None] * state + chunk_states[:, :, n]
    return torch.stack(entering, dim=2), state


def scan_state_grads(chunk_grads: Tensor, chunk_decay: Tensor, final_grad: Optional[Tensor]):
    """The adjoint of :func:`scan_states`, walking chunks from last to first.

    ``chunk_grads[n]`` is what chunk ``n``'s outputs send to the state entering it. Returns the
    gradient of the state leaving every chunk ``[B, H, N, K, V]`` and that of the initial state."""
    B, H, N, K, V = chunk_grads.shape
    grad = chunk_grads.new_zeros(B, H, K, V) if final_grad is None else final_grad
    leaving = [None] * N
    for n in reversed(range(N)):
        leaving[n] = grad
        grad = chunk_decay[:, :, n, :, None] * grad + chunk_grads[:, :, n]
    return torch.stack(leaving, dim=2), grad


def _intra_scores(q: Tensor, k: Tensor, pairwise: Tensor) -> Tensor:
    """``A[t, s] = sum_k q_t[k] k_s[k] exp(sum_{s<r<=t} g_r[k])`` for ``s <= t``; ``[B,H,N,C,C]``."""
    return torch.einsum("bhntk,bhntsk,bhnsk->bhnts", q, pairwise, k)


def causal_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Optional[Tensor],
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Causal GLA. Inputs ``[B, T, H, D]``; returns ``o`` ``[B, T, H, V]`` and the final state."""
    T = q.shape[1]
    q, k, v, g = (to_chunks(x, chunk) for x in (q, k, v, g))
    decay = chunk_decays(g)
    o = _intra_scores(q, k, decay.pairwise) @ v
    keys_to_end = k * decay.to_end
    entering, final = scan_states(keys_to_end.transpose(-1, -2) @ v, decay.whole, initial_state)
    o = o + (q * decay.from_start) @ entering
    return from_chunks(o * scale, T), final


def causal_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Optional[Tensor],
    grad_output: Tensor,
    grad_final_state: Optional[Tensor],
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients ``dq, dk, dv, dg, d initial_state`` of :func:`causal_forward`.

    The gate gradient uses the identity of Yang et al. (2023): with ``G_t`` the cumulative log
    gate, ``dL/dG_t = q_t * dq_t - k_t * dk_t`` (plus ``sum_v dS_T * S_T`` at the final state),
    and ``dg_r = sum_{t >= r} dL/dG_t``. The suffix sum is taken within chunks and then across
    chunk totals, which keeps float32 rounding to O((C + N) eps) instead of O(T eps).
    """
    T = q.shape[1]
    q, k, v, g, do = (to_chunks(x, chunk) for x in (q, k, v, g, grad_output))
    decay = chunk_decays(g)

    # inside chunks: o_t += scale * sum_{s<=t} A[t, s] v_s
    scores = _intra_scores(q, k, decay.pairwise)
    d_scores = scale * (do @ v.transpose(-1, -2))
    dq = torch.einsum("bhnts,bhntsk,bhnsk->bhntk", d_scores, decay.pairwise, k)
    dk = torch.einsum("bhnts,bhntsk,bhntk->bhnsk", d_scores, decay.pairwise, q)
    dv = (scale * scores).transpose(-1, -2) @ do

    # across chunks: recompute the entering states, then walk the adjoint backwards
    keys_to_end = k * decay.to_end
    entering, final = scan_states(keys_to_end.transpose(-1, -2) @ v, decay.whole, initial_state)
    queries_from_start = q * decay.from_start
    dq = dq + scale * decay.from_start * (do @ entering.transpose(-1, -2))
    leaving_grad, d_initial = scan_state_grads(
        scale * (queries_from_start.transpose(-1, -2) @ do), decay.whole, grad_final_state
    )
    dk = dk + decay.to_end * (v @ leaving_grad.transpose(-1, -2))
    dv = dv + keys_to_end @ leaving_grad

    # gates: reverse cumulative sum of dL/dG over the whole sequence
    dG = q * dq - k * dk
    within = reverse_cumsum(dG, -2)
    chunk_totals = within[..., 0, :]
    later_chunks = reverse_cumsum(F.pad(chunk_totals[..., 1:, :], (0, 0, 0, 1)), -2)
    dg = within + later_chunks[..., None, :]
    if grad_final_state is not None:
        dg = dg + (grad_final_state * final).sum(-1)[:, :, None, None, :]

    grads = tuple(from_chunks(x, T) for x in (dq, dk, dv, dg))
    return (*grads, d_initial if initial_state is not None else None)
