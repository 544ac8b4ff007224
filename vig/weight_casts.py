"""A model's matmul weights cast for autocast all at once, in a few kernels each way.

Under autocast every matmul casts its float32 weight to the low-precision dtype in a kernel
of its own, and backward casts each weight's gradient back in another: in a ViG-T step at
224 px, batch 128, about 100 small copies each way (H100 profile, CUDA graphs: 0.16 ms of a
3.4 ms inference step and 0.5 ms of a ~16 ms training step, benchmarks/RESULTS.md, fifteenth
session). Here the model gathers its blocks' matmul weights once per forward and casts them
together: one concatenation into a flat float32 buffer and one cast of that buffer, viewed
back as the weights; backward concatenates their gradients (autograd's split backward), casts
them back in one pass, and hands each weight a view of the result. A multi-tensor
``torch._foreach_copy_`` across dtypes measured slower than the separate copies (session 15).

The values are those of per-weight ``.to(dtype)`` casts bit for bit, and so are the gradients:
each weight's gradient arrives in the low-precision dtype (the matmuls' own output) and is
widened exactly, as autocast's per-weight cast backward does. Modules take the cast weights
as an optional ``weights`` argument (``matmul_weights()`` lists them, in order) and cast
nothing themselves when they are given.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor

__all__ = ["cast_together", "autocast_matmul_weights", "split_by_module"]


class _CastFlat(torch.autograd.Function):
    """``cat(w.flatten() for w in weights).to(dtype)``; backward: the flat gradient back in
    the weights' dtype, split into one view per weight."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.shapes = [w.shape for w in weights]
        ctx.weight_dtype = weights[0].dtype
        return torch.cat([w.reshape(-1) for w in weights]).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.to(ctx.weight_dtype).split([s.numel() for s in ctx.shapes])
        return (None, *(p.view(s) for p, s in zip(parts, ctx.shapes)))


def cast_together(weights: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``[w.to(dtype) for w in weights]`` as a concatenation (on CUDA one launch per batch of
    inputs) and one cast, the same each way for the gradients, for weights that share one
    dtype and device. Each result is a contiguous view of one flat buffer; when some results
    get a gradient, the others' is zero (autograd's split backward fills it), not None."""
    if not weights:
        return []
    first = weights[0]
    for i, w in enumerate(weights):
        if w.dtype != first.dtype or w.device != first.device:
            raise ValueError(f"weights[{i}]: expected dtype {first.dtype} on {first.device} like weights[0], "
                             f"got {w.dtype} on {w.device}")
    flat = _CastFlat.apply(dtype, *weights)
    return [part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in weights]), weights)]


def autocast_matmul_weights(modules: Sequence[torch.nn.Module], like: Tensor) -> list[tuple[Tensor, ...] | None]:
    """Each module's ``matmul_weights()`` in autocast's dtype, cast together
    (:func:`cast_together`), as one tuple per module; ``None`` for every module when autocast
    is off for ``like``'s device, or when the weights are not all of one floating dtype other
    than autocast's (the modules then cast, or not, as autocast would)."""
    device_type = like.device.type
    if not torch.is_autocast_enabled(device_type):
        return [None] * len(modules)
    dtype = torch.get_autocast_dtype(device_type)
    groups = [tuple(m.matmul_weights()) for m in modules]
    weights = [w for group in groups for w in group]
    if not weights or any(w.dtype != weights[0].dtype or w.device != like.device for w in weights):
        return [None] * len(modules)
    if weights[0].dtype == dtype or not weights[0].is_floating_point():
        return [None] * len(modules)
    cast = iter(cast_together(weights, dtype))
    return [tuple(next(cast) for _ in group) for group in groups]


def split_by_module(weights: Sequence[Tensor] | None, *modules: torch.nn.Module) -> list[tuple[Tensor, ...] | None]:
    """A block's cast ``weights`` (its modules' ``matmul_weights()`` in order, or None) cut into
    one tuple per module, for the modules' own ``weights`` arguments (None: each its own)."""
    if weights is None:
        return [None] * len(modules)
    out, start = [], 0
    for m in modules:
        n = len(m.matmul_weights())
        out.append(tuple(weights[start : start + n]))
        start += n
    return out
