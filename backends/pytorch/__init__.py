"""The ``torch`` backend: chunked pure PyTorch, on any device PyTorch runs on.

Slow but portable and always present; the fallback of automatic selection on every device.
The recurrent specification it is tested against lives in :mod:`glakernels.reference`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from glakernels._backend import Backend
from glakernels._dispatch import register_backend
from glakernels._problem import GLAGradients, GLAInputs

#: Tokens per chunk. The in-chunk decay tensor is ``[C, C, K]`` per chunk, so memory grows
#: with C while the Python-level state scan shrinks with it; 16 balances the two.
CHUNK_SIZE = 16


def _flip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[1])


def _sequence(x: Optional[torch.Tensor], b: int) -> Optional[torch.Tensor]:
    return None if x is None else x[b : b + 1].clone()


def _sequences(inputs: GLAInputs):
    spec = dataclasses.replace(inputs.spec, batch=1)
    for b in range(inputs.spec.batch):
        yield b, GLAInputs(*(_sequence(getattr(inputs, n), b) for n in ("q", "k", "v", "g", "g_reverse", "initial_state")),
                           inputs.scale, spec)


def _cat(parts: list) -> Optional[torch.Tensor]:
    return None if parts[0] is None else torch.cat(parts)


class TorchBackend(Backend):
    name = "torch"
    description = "chunked pure PyTorch (any device; slow, portable, always present)"
    device_types = frozenset({"any"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    auto_priority = {"any": 0}

    # One sequence at a time, on every device: batched matmuls choose their algorithm by the
    # batch count (and by address alignment), so a sequence's result would change bitwise with
    # what else is in the batch — found on an H100 (cuBLAS) and on CPUs too (K = 32, V = 64:
    # last-bit differences in o and dv with two sequences against one). Calls shaped
    # [1, T, H, D] on fresh copies, aligned alike, give every sequence the same kernels
    # whatever the batch (DESIGN §9), a batch of one included.

    def forward(self, inputs: GLAInputs):
        outs = [self._forward(one) for _, one in _sequences(inputs)]
        return _cat([o for o, _ in outs]), _cat([s for _, s in outs])

    def backward(self, inputs: GLAInputs, grad_output, grad_final_state: Optional[torch.Tensor]):
        grads = [self._backward(one, _sequence(grad_output, b), _sequence(grad_final_state, b))
                 for b, one in _sequences(inputs)]
        return GLAGradients(*(_cat([g[i] for g in grads]) for i in range(len(GLAGradients._fields))))

    def _forward(self, inputs: GLAInputs):
        from .chunked import causal_forward

        spec = inputs.spec
        acc = spec.state_dtype
        q, k, v, g = (x.to(acc) for x in (inputs.q, inputs.k, inputs.v, inputs.g))
        chunk = min(CHUNK_SIZE, spec.seq_len)
        if not spec.bidirectional:
            o, final = causal_forward(q, k, v, g, inputs.scale, inputs.initial_state, chunk)
            return o.to(spec.dtype), (final if spec.output_final_state else None)
        half = 0.5 * inputs.scale  # the two directions are averaged
        o_fwd, _ = causal_forward(q, k, v, g, half, None, chunk)
        g_rev = inputs.g_reverse.to(acc)
        o_rev, _ = causal_forward(_flip(q), _flip(k), _flip(v), _flip(g_rev), half, None, chunk)
        return (o_fwd + _flip(o_rev)).to(spec.dtype), None

    def _backward(self, inputs: GLAInputs, grad_output, grad_final_state: Optional[torch.Tensor]):
        from .chunked import causal_backward

        spec = inputs.spec
        acc = spec.state_dtype
        q, k, v, g, do = (x.to(acc) for x in (inputs.q, inputs.k, inputs.v, inputs.g, grad_output))
        chunk = min(CHUNK_SIZE, spec.seq_len)
        cast = lambda x: x.to(spec.dtype)  # noqa: E731
        if not spec.bidirectional:
            dq, dk, dv, dg, dh0 = causal_backward(
                q, k, v, g, inputs.scale, inputs.initial_state, do, grad_final_state, chunk
            )
            return GLAGradients(cast(dq), cast(dk), cast(dv), cast(dg), None, dh0)
        half = 0.5 * inputs.scale
        dq, dk, dv, dg, _ = causal_backward(q, k, v, g, half, None, do, None, chunk)
        g_rev = inputs.g_reverse.to(acc)
        rq, rk, rv, rg, _ = causal_backward(
            _flip(q), _flip(k), _flip(v), _flip(g_rev), half, None, _flip(do), None, chunk
        )
        return GLAGradients(
            cast(dq + _flip(rq)), cast(dk + _flip(rk)), cast(dv + _flip(rv)), cast(dg), cast(_flip(rg)), None
        )


register_backend(TorchBackend())
