"""Everything ViG's mixer projects from its local branch, as one autograd function.

The mixer reads its local branch ``x`` (the depth-wise convolution's output) six times: the
query, key and value projections, the low-rank gate projection and the mix gate's logits
(``g_proj``), and the mix itself. As separate autograd nodes each returns its own gradient
for ``x`` and autograd adds them one by one: at ViG-T 224 px, batch 128, that was 5 additions
of a ``[25088, 192]`` bfloat16 tensor per block (0.35 ms of a ~18 ms training step on an H100),
and ``g_proj``'s bias gradient was autograd's one-stage ``sum(0)`` (0.59 ms a step). Here the
five projections' input gradients are one matmul and four ``addmm_`` into its result (cuBLAS
adds the running sum in the epilogue, in float32, rounding once per term), and the bias
gradient is a float32 column sum (:func:`vig.fused._bias_grad`).

The forward is the same matmuls as before (and the gates' Triton kernel on CUDA); values and
gradients equal the composition ``F.linear`` / :func:`vig.fused.low_rank_log_gates_pair`
(tests/test_vig_fused.py). Module hooks on ``qkv_proj``, ``g_proj`` and ``gk_proj`` do not
run: the weights are read directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import _autocast_dtype, _bias_grad, _cast, _low_rank_log_gates_backward, _low_rank_log_gates_forward

Tensor = torch.Tensor

__all__ = ["mixer_projections"]


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _qkv_slices(w_qkv: Tensor, key_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The query, key and value rows of the fused ``[2·key_dim + V, C]`` weight."""
    return w_qkv[:key_dim], w_qkv[key_dim : 2 * key_dim], w_qkv[2 * key_dim :]


class _MixerProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qkv_weight, key_dim, g_weight, g_bias, gate_down, gate_up, gate_bias, normalizer):
        dtype = _autocast_dtype(x)
        # under autocast: one cast of each weight (the fused qkv weight cast once for three slices)
        xc, w_qkv, w_g, b_g = (t if dtype is None else _cast(t, dtype) for t in (x, qkv_weight, g_weight, g_bias))
        q, k, v = (F.linear(xc, w) for w in _qkv_slices(w_qkv, key_dim))
        gate_logits = F.linear(xc, w_g, b_g)
        low, g_fwd, g_rev, w_down, w_up = _low_rank_log_gates_forward(x, gate_down, gate_up, gate_bias, normalizer)
        # the weights kept as cast (small); x is kept anyway by the mix after this
        ctx.save_for_backward(xc, w_qkv, w_g, low, w_down, w_up, g_fwd, g_rev)
        ctx.key_dim, ctx.normalizer = key_dim, normalizer
        ctx.dtypes = (x.dtype, qkv_weight.dtype, g_weight.dtype, g_bias.dtype)
        ctx.gate_dtypes = (gate_down.dtype, gate_up.dtype, gate_bias.dtype)
        return q, k, v, g_fwd, g_rev, gate_logits

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v, grad_g_fwd, grad_g_rev, grad_logits):
        xc, w_qkv, w_g, low, gate_down, gate_up, g_fwd, g_rev = ctx.saved_tensors
        x_dtype, qkv_dtype, g_weight_dtype, g_bias_dtype = ctx.dtypes
        dtype = xc.dtype
        needs = ctx.needs_input_grad
        x_rows = _rows(xc)
        slices = _qkv_slices(w_qkv, ctx.key_dim)
        grads_qkv = [None if g is None else _rows(g).to(dtype) for g in (grad_q, grad_k, grad_v)]
        grad_logits = None if grad_logits is None else _rows(grad_logits).to(dtype)

        gate_grads = (None,) * 4
        if grad_g_fwd is not None or grad_g_rev is not None:
            gate_grads = _low_rank_log_gates_backward(xc, low, gate_down, gate_up, ctx.gate_dtypes, g_fwd, g_rev,
                                                      ctx.normalizer, grad_g_fwd, grad_g_rev)
        grad_low = gate_grads[0]

        grad_x = None
        if needs[0]:
            terms = [*zip(grads_qkv, slices), (grad_logits, w_g),
                     (grad_low, None if grad_low is None else gate_down.to(grad_low.dtype))]
            for grad, weight in terms:
                if grad is None:
                    continue
                # one running sum: cuBLAS adds it in the epilogue (no separate addition pass)
                grad_x = grad @ weight if grad_x is None else grad_x.addmm_(grad, weight)
            if grad_x is None:
                grad_x = torch.zeros_like(xc)
            grad_x = grad_x.view(xc.shape).to(x_dtype)

        grad_qkv_weight = None
        if needs[1]:
            parts = [torch.zeros_like(w) if g is None else g.t() @ x_rows for g, w in zip(grads_qkv, slices)]
            grad_qkv_weight = torch.cat(parts).to(qkv_dtype)
        grad_g_weight = grad_g_bias = None
        if grad_logits is not None:
            grad_g_weight = (grad_logits.t() @ x_rows).to(g_weight_dtype) if needs[3] else None
            grad_g_bias = _bias_grad(grad_logits).to(g_bias_dtype) if needs[4] else None
        _, grad_down, grad_up, grad_gate_bias = gate_grads
        return (grad_x, grad_qkv_weight, None, grad_g_weight, grad_g_bias, grad_down, grad_up, grad_gate_bias, None)


def mixer_projections(x: Tensor, qkv_weight: Tensor, key_dim: int, g_weight: Tensor, g_bias: Tensor,
                      gate_down: Tensor, gate_up: Tensor, gate_bias: Tensor, normalizer: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(q, k, v, g_forward, g_reverse, gate_logits)`` from ``x`` (``[..., C]``):

    - ``q, k, v``: ``x`` times the row slices ``[:key_dim]``, ``[key_dim : 2·key_dim]`` and
      ``[2·key_dim:]`` of ``qkv_weight`` (``[2·key_dim + V, C]``, the checkpoint's fused weight);
    - ``g_forward, g_reverse``: :func:`vig.fused.low_rank_log_gates_pair` of ``x`` with
      ``gate_down`` (``[R, C]``), ``gate_up`` (``[2·key_dim, R]``), ``gate_bias``;
    - ``gate_logits``: ``x @ g_weightᵀ + g_bias`` (the global/local mix's gate).

    Each output is contiguous. Under autocast the matmuls run in autocast's dtype."""
    if key_dim < 1 or qkv_weight.shape[0] <= 2 * key_dim:
        raise ValueError(f"qkv_weight: expected [2·key_dim + V, C] rows with key_dim={key_dim}, got shape "
                         f"{tuple(qkv_weight.shape)}")
    if gate_up.shape[0] % 2:
        raise ValueError(f"gate_up: expected an even number of rows [2K, R], got shape {tuple(gate_up.shape)}")
    return _MixerProjections.apply(x, qkv_weight, key_dim, g_weight, g_bias, gate_down, gate_up, gate_bias,
                                   normalizer)
