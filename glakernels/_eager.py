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

A call that wants no gradient (``no_grad``, ``inference_mode``, or no input requiring grad)
skips even this Function outside tracing and runs ``run_forward`` directly (``_api``): the
Function's bookkeeping was a third of such a call's host time on a CPU.

One exception under ``torch.compile``: a call on a backend that declares the device in
``Backend.traceable_on`` (triton on CUDA) is traced through this same function, forward and
backward, so Dynamo records its Triton launches as graph nodes and Inductor launches them
from its generated code. A custom op would cost a dispatcher round trip and a Triton launch
from Python on every call of the compiled graph: H100, ViG-T inference compiled, 224 px
batch 128, 15,547 -> 17,296 img/s (NOTES.md, session 10).
"""

from __future__ import annotations

import functools

import torch

from ._custom_op import run_backward, run_forward
from ._dispatch import get_backend
from ._env import env_flag

ENV_FORCE_CUSTOM_OP = "GLAKERNELS_EAGER_CUSTOM_OP"
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


DOUBLE_BACKWARD_MESSAGE = "glakernels: gradients of gated_linear_attention's gradients (double backward) are not supported"


class _NoSecondDerivative(torch.autograd.Function):
    """``apply(n, *gradients, *inputs)`` -> the n gradients as they are, in a graph that reaches
    the op's inputs and raises when a second backward gets there."""

    @staticmethod
    def forward(ctx, n, *tensors):
        return tuple(None if x is None else x.view_as(x) for x in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def _backward_without_derivative(backward):
    """``once_differentiable`` that also looks at the saved inputs.

    ``torch.autograd.function.once_differentiable`` attaches its raising node only when an
    incoming gradient requires grad. With ``create_graph=True`` over a plain loss (a gradient
    penalty: ``grad(loss, q, create_graph=True)``) none does, so the gradients would come back
    as constants and a second backward would silently leave out the penalty's part. The
    gradients depend on the saved q, k, v, g too: where any of those requires grad, they come
    back in a graph that reaches them and raises when a second backward gets there, as the
    custom op's ``gla_backward`` (no autograd formula) does."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        inputs = [x for x in (*grads, *ctx.saved_tensors) if isinstance(x, torch.Tensor) and x.requires_grad]
        if not inputs:
            return outputs
        return _NoSecondDerivative.apply(len(outputs), *outputs, *inputs)

    return wrapper


def _custom_op_forced() -> bool:
    return env_flag(ENV_FORCE_CUSTOM_OP)


def eager_path_applies(backend: str, *tensors) -> bool:
    """Whether this call on backend ``backend`` may bypass the custom op (see the module
    docstring)."""
    if torch.compiler.is_compiling():
        device_type = tensors[0].device.type
        return device_type in get_backend(backend).traceable_on and not _custom_op_forced()
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    if _custom_op_forced():
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
    @_backward_without_derivative  # like the custom op: its backward has no derivative of its own
    def backward(ctx, grad_output, grad_final_state=None):
        q, k, v, g, g_reverse, initial_state = ctx.saved_tensors
        scale, bidirectional, output_final_state, backend = ctx.call
        grad_final_state = grad_final_state.contiguous() if output_final_state else None
        dq, dk, dv, dg, dg_reverse, d_initial = run_backward(
            grad_output.contiguous(), grad_final_state, q, k, v, g, g_reverse, initial_state,
            scale, bidirectional, backend,
        )
        return dq, dk, dv, dg, dg_reverse, d_initial, None, None, None, None
