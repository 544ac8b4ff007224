"""``torch.library`` registration: one forward op and one backward op for every backend.

The backend is chosen before the op is called and travels as a string argument, so the op
itself is a plain function of tensors that ``torch.compile`` can trace (through the fake
implementations below) and CUDA graphs can capture. The backward op recomputes what it needs
from the saved inputs; nothing but the inputs is kept between forward and backward.
"""

from __future__ import annotations


from typing import Optional

import torch
from torch import Tensor

from ._autocast import autocast_disabled
from ._dispatch import get_backend
from ._problem import GLAInputs, ProblemSpec, state_dtype_for


def _inputs(q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state) -> GLAInputs:
    B, T, H, K = q.shape
    spec = ProblemSpec(
        batch=B,
        seq_len=T,
        heads=H,
        head_dim_k=K,
        head_dim_v=v.shape[-1],
        dtype=q.dtype,
        device_type=q.device.type,
        bidirectional=bidirectional,
        has_initial_state=initial_state is not None,
        output_final_state=output_final_state,
    )
    return GLAInputs(q, k, v, g, g_reverse, initial_state, scale, spec)


def _contiguous(x: Tensor) -> Tensor:
    """``x.contiguous()``, but never the no-op that returns ``x`` itself: returned from an
    autograd function's forward under ``torch.compile``, that alias turns the output's
    gradient into zeros in torch 2.11 (the traced backward read a zero tensor in place of
    its tangent; 2.13 is fine). The same bug as ``vig.fused._cast``'s."""
    return x if x.is_contiguous() else x.contiguous()


def run_forward(q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state, backend):
    """``(o, final_state or None)`` from backend ``backend``, outside autocast. Shared by the
    custom op and the eager path (:mod:`._eager`), so both run exactly the same code."""
    inputs = _inputs(q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state)
    with autocast_disabled(q.device.type):
        o, final_state = get_backend(backend).forward(inputs)
    # the fake implementation promises contiguous outputs; no-ops for backends that comply
    return _contiguous(o), None if final_state is None else _contiguous(final_state)


def run_backward(grad_output, grad_final_state, q, k, v, g, g_reverse, initial_state, scale, bidirectional, backend):
    """``(dq, dk, dv, dg, dg_reverse or None, d_initial_state or None)``, contiguous."""
    inputs = _inputs(
        q, k, v, g, g_reverse, initial_state, scale, bidirectional, grad_final_state is not None
    )
    with autocast_disabled(q.device.type):
        grads = get_backend(backend).backward(inputs, grad_output, grad_final_state)
    outputs = (grads.dq, grads.dk, grads.dv, grads.dg, grads.dg_reverse, grads.dinitial_state)
    return tuple(None if x is None else _contiguous(x) for x in outputs)


def _absent(like: Tensor, dtype: torch.dtype) -> Tensor:
    # custom ops cannot return None; an empty tensor stands for "no such output"
    return like.new_empty(0, dtype=dtype)


@torch.library.custom_op("glakernels::gla_forward", mutates_args=())
def gla_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    g_reverse: Optional[Tensor],
    initial_state: Optional[Tensor],
    scale: float,
    bidirectional: bool,
    output_final_state: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    o, final_state = run_forward(q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state, backend)
    if final_state is None:
        final_state = _absent(q, state_dtype_for(q.dtype))
    return o, final_state


@gla_forward.register_fake
def _gla_forward_fake(q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state, backend):
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = q.new_empty(B, T, H, V)
    state_dtype = state_dtype_for(q.dtype)
    if output_final_state:
        return o, q.new_empty(B, H, K, V, dtype=state_dtype)
    return o, _absent(q, state_dtype)


@torch.library.custom_op("glakernels::gla_backward", mutates_args=())
def gla_backward(
    grad_output: Tensor,
    grad_final_state: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    g_reverse: Optional[Tensor],
    initial_state: Optional[Tensor],
    scale: float,
    bidirectional: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dg, dg_reverse, d_initial = run_backward(
        grad_output, grad_final_state, q, k, v, g, g_reverse, initial_state, scale, bidirectional, backend
    )
    if dg_reverse is None:
        dg_reverse = _absent(q, q.dtype)
    if d_initial is None:
        d_initial = _absent(q, state_dtype_for(q.dtype))
    return dq, dk, dv, dg, dg_reverse, d_initial


@gla_backward.register_fake
def _gla_backward_fake(grad_output, grad_final_state, q, k, v, g, g_reverse, initial_state, scale, bidirectional, backend):
    state_dtype = state_dtype_for(q.dtype)
    dg_reverse = torch.empty_like(g) if g_reverse is not None else _absent(q, q.dtype)
    d_initial = torch.empty_like(initial_state) if initial_state is not None else _absent(q, state_dtype)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), dg_reverse, d_initial


def _setup_context(ctx, inputs, output):
    q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state, backend = inputs
    ctx.save_for_backward(q, k, v, g, g_reverse, initial_state)
    ctx.scale = scale
    ctx.bidirectional = bidirectional
    ctx.output_final_state = output_final_state
    ctx.backend = backend


def _backward(ctx, grad_output, grad_final_state):
    q, k, v, g, g_reverse, initial_state = ctx.saved_tensors
    if ctx.output_final_state:
        grad_final_state = grad_final_state.contiguous()
    else:
        grad_final_state = None
    dq, dk, dv, dg, dg_reverse, d_initial = torch.ops.glakernels.gla_backward(
        grad_output.contiguous(),
        grad_final_state,
        q,
        k,
        v,
        g,
        g_reverse,
        initial_state,
        ctx.scale,
        ctx.bidirectional,
        ctx.backend,
    )
    return (
        dq,
        dk,
        dv,
        dg,
        dg_reverse if g_reverse is not None else None,
        d_initial if initial_state is not None else None,
        None,
        None,
        None,
        None,
    )


gla_forward.register_autograd(_backward, setup_context=_setup_context)
