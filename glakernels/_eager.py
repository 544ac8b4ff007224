"""The eager fast path: the op as a plain ``torch.autograd.Function``.

Going through ``torch.ops.glakernels.gla_forward`` costs host time on every call (the
custom op's autograd wrapper, schema checks and redispatch), and at ViG's sizes one call's
GPU work takes about as long as that. Outside tracing nothing needs the custom op, so plain
eager calls take this path instead: it runs the very same backend code (``run_forward`` /
``run_backward``), saves the same tensors, and gives the same results bit for bit.

The custom op still runs whenever something may need to see one op rather than the kernels
behind it: ``torch.compile`` / ``torch.export`` tracing, a ``TorchDispatchMode`` or
``TorchFunctionMode`` (FakeTensorMode, FlopCounterMode, ``with torch.device(...)``),
``torch.func`` transforms, and tensor subclasses. ``GLAKERNELS_EAGER_CUSTOM_OP=1`` forces
the custom op everywhere (to compare the two paths, or to debug one).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from ._custom_op import run_backward, run_forward

ENV_FORCE_CUSTOM_OP = "GLAKERNELS_EAGER_CUSTOM_OP"
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_path_applies(*tensors) -> bool:
    """Whether this call may bypass the custom op (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    if os.environ.get(ENV_FORCE_CUSTOM_OP, "") not in ("", "0"):
        return False
    return all(x is None or type(x) in _PLAIN_TENSOR_TYPES for x in tensors)


class EagerGLA(torch.autograd.Function):
    """``apply(q, k, v, g, g_reverse, initial_state, scale, bidirectional,
    output_final_state, backend)`` -> ``o``, or ``(o, final_state)``."""

    @staticmethod
    def forward(ctx, q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state, backend):
        o, final_state = run_forward(
            q, k, v, g, g_reverse, initial_state, scale, bidirectional, output_final_state, backend
        )
        ctx.save_for_backward(q, k, v, g, g_reverse, initial_state)
        ctx.call = (scale, bidirectional, output_final_state, backend)
        return (o, final_state) if output_final_state else o

    @staticmethod
    @once_differentiable  # like the custom op: its backward has no derivative of its own
    def backward(ctx, grad_output, grad_final_state=None):
        q, k, v, g, g_reverse, initial_state = ctx.saved_tensors
        scale, bidirectional, output_final_state, backend = ctx.call
        grad_final_state = grad_final_state.contiguous() if output_final_state else None
        dq, dk, dv, dg, dg_reverse, d_initial = run_backward(
            grad_output.contiguous(), grad_final_state, q, k, v, g, g_reverse, initial_state,
            scale, bidirectional, backend,
        )
        return dq, dk, dv, dg, dg_reverse, d_initial, None, None, None, None
