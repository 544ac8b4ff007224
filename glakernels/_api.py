"""The public op."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from . import _custom_op  # noqa: F401  (registers torch.ops.glakernels.*)
from ._autocast import cast_for_autocast
from ._dispatch import get_backend, select_backend_name
from ._custom_op import run_forward
from ._eager import EagerGLA, eager_path_applies
from ._validation import validate, validate_backend_name
from ._value_checks import check_values, value_checks_enabled
from ._problem import GLAInputs, state_dtype_for

Tensor = torch.Tensor


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    bidirectional: bool = True,
    *,
    g_reverse: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Gated linear attention, causal or bidirectional (ViG's direction-wise gating).

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` **log** forget gates (normally ``<= 0``, e.g. ``logsigmoid(x) / 16``).
        bidirectional: average a forward and a reverse pass (default) or run causally.
        g_reverse: log gates of the reverse pass (bidirectional only); defaults to ``g``.
        scale: multiplies the output; defaults to ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token (causal only); float32,
            or float64 for float64 inputs.
        output_final_state: also return the state after the last token (causal only).
        backend: run on this backend (``"torch"``, ``"numba"``, ``"triton"``, ``"cupy"``...)
            or ``"auto"``. Default: :func:`use_backend`, then ``$GLAKERNELS_BACKEND``, then
            the best available backend for the inputs' device. A backend asked for by name
            that cannot run the call raises; it never falls back silently.

    Returns:
        ``o`` of shape ``[B, T, H, V]`` in the dtype of ``q``, or ``(o, final_state)`` when
        ``output_final_state`` (the state in float32, float64 for float64 inputs).

    Causal, per batch and head, with state ``S_t`` of shape ``[K, V]``::

        S_t = diag(exp(g_t)) · S_{t-1} + k_t v_tᵀ        (S_0 = initial_state or 0)
        o_t = scale · S_tᵀ q_t

    Bidirectional: ``o = ½ (causal(q, k, v, g) + flip(causal(flip q, flip k, flip v,
    flip g_reverse)))`` with ``flip`` reversing time; the token's own ``k_t v_tᵀ`` counts in
    both directions.

    Equivalent PyTorch (causal, float32 accumulation)::

        S = torch.zeros(B, H, K, V) if initial_state is None else initial_state
        for t in range(T):
            S = g[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            o[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)

    Gradients flow to ``q, k, v, g, g_reverse`` and ``initial_state``. Inputs may be
    non-contiguous. Under ``torch.autocast`` the tensors run in the autocast dtype. Under
    ``torch.compile`` the backend is chosen when the graph is traced.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> from glakernels import gated_linear_attention
        >>> B, T, H, K, V = 2, 196, 3, 32, 64
        >>> q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, H, V)
        >>> g = F.logsigmoid(torch.randn(B, T, H, K)) / 16
        >>> gated_linear_attention(q, k, v, g).shape
        torch.Size([2, 196, 3, 64])
    """
    if isinstance(q, torch.Tensor):  # autocast first, as for a matmul: mixed float32/bfloat16 inputs are fine there
        q, k, v, g, g_reverse = cast_for_autocast((q, k, v, g, g_reverse), q.device.type)
    spec, scale = validate(q, k, v, g, bidirectional, g_reverse, scale, initial_state, output_final_state)
    backend = validate_backend_name(backend)
    if value_checks_enabled() and not torch.compiler.is_compiling():  # they sync: eager only
        check_values(
            {"q": q, "k": k, "v": v, "g": g, "g_reverse": g_reverse, "initial_state": initial_state},
            gate_names=("g", "g_reverse"),
        )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, g_reverse, initial_state)
    )
    if needs_grad:
        spec = dataclasses.replace(spec, needs_grad=True)
    name = select_backend_name(spec, backend)
    if bidirectional and g_reverse is None:
        g_reverse = g
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype_for(spec.dtype)).contiguous()
    args = (
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g.contiguous(),
        g_reverse.contiguous() if g_reverse is not None else None,
        initial_state,
        scale,
        bidirectional,
        output_final_state,
        name,
    )
    if needs_grad and not torch.compiler.is_compiling():
        get_backend(name).prepare_backward(GLAInputs(*args[:7], spec))
    if eager_path_applies(name, *args[:6]):
        # no gradient wanted: the same forward without autograd's Function (host time). Not
        # while compiling, whose traced triton path stays the one measured on a GPU.
        if not needs_grad and not torch.compiler.is_compiling():
            o, final_state = run_forward(*args)
            return (o, final_state) if output_final_state else o
        return EagerGLA.apply(*args)
    o, final_state = torch.ops.glakernels.gla_forward(*args)
    return (o, final_state) if output_final_state else o
