"""The ``torch`` backend: chunked pure PyTorch, on any device PyTorch runs on.

Slow but portable and always present; the fallback of automatic selection on every device.
The recurrent specification it is tested against lives in :mod:`glakernels.reference`.
"""

from __future__ import annotations

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


class TorchBackend(Backend):
    name = "torch"
    description = "chunked pure PyTorch (any device; slow, portable, always present)"
    device_types = frozenset({"any"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    auto_priority = {"any": 0}

    def forward(self, inputs: GLAInputs):
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

    def backward(self, inputs: GLAInputs, grad_output, grad_final_state: Optional[torch.Tensor]):
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
