"""The specification: gated linear attention as a plain token-by-token recurrence.

Short and step by step on purpose; every backend is tested against this (run in float64).
It is differentiable through ordinary autograd, and slow: one Python iteration per token.

Causal, per (batch, head), state ``S_t`` of shape ``[K, V]``::

    S_t = diag(exp(g_t)) · S_{t-1} + k_t v_tᵀ          (S_0 = initial_state or 0)
    o_t = scale · S_tᵀ q_t

Bidirectional (ViG's direction-wise gating)::

    o = ½ · ( causal(q, k, v, g) + flip_T(causal(flip_T q, flip_T k, flip_T v, flip_T g_reverse)) )
"""

from __future__ import annotations

from typing import Optional

import torch

from ._problem import state_dtype_for

__all__ = ["gated_linear_attention_reference", "causal_recurrence"]


def causal_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal pass over ``[B, T, H, D]`` inputs, in the accumulator dtype.

    Returns ``o`` (``[B, T, H, V]``, accumulator dtype) and the final state ``[B, H, K, V]``."""
    acc = state_dtype_for(q.dtype)
    q, k, v, g = (x.to(acc) for x in (q, k, v, g))
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        state = q.new_zeros(B, H, K, V)
    else:
        state = initial_state.to(acc)
    outputs = []
    for t in range(T):
        decay = torch.exp(g[:, t])  # [B, H, K]
        state = decay[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def gated_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    bidirectional: bool = True,
    *,
    g_reverse: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
):
    """Same signature and semantics as :func:`glakernels.gated_linear_attention`, no checks."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not bidirectional:
        o, state = causal_recurrence(q, k, v, g, scale, initial_state)
        o = o.to(q.dtype)
        return (o, state) if output_final_state else o
    if g_reverse is None:
        g_reverse = g
    forward, _ = causal_recurrence(q, k, v, g, scale)
    flip = lambda x: torch.flip(x, dims=[1])  # noqa: E731
    backward, _ = causal_recurrence(flip(q), flip(k), flip(v), flip(g_reverse), scale)
    return (0.5 * (forward + flip(backward))).to(q.dtype)
