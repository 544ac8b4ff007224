"""Memory-lean autograd for the elementwise work around ViG's matmuls.

Eager autograd keeps every intermediate of a chain of elementwise ops alive until backward
(the normalised branches, the sigmoid, the mix, the SwiGLU product, ...). At 1024 px those
intermediates, not the weights, set a training step's peak memory. The two functions here save
only their *inputs* and recompute the cheap rest in backward, as a fused kernel would:

- :func:`mix_global_local`: ``silu?(σ(z)·RMSNorm(o) + (1 − σ(z))·RMSNorm(local))`` per head
  saves ``o, local, z`` (3 tensors instead of ~7);
- :func:`swiglu_linear`: ``(silu(gate) · value) @ Wᵀ`` saves the ``[gate, value]`` projection
  (2·I per token instead of 4·I).

Arithmetic is float32 inside (the inputs may be bfloat16 under autocast); results come back
in the input dtype. Under ``torch.compile`` both trace as ordinary autograd functions and
inductor fuses their elementwise parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["mix_global_local", "swiglu_linear"]


def _acc(x: Tensor) -> Tensor:
    """float32 arithmetic for low-precision inputs, float64 kept for float64 ones."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Normalised ``x · rstd`` (before the weight) and ``rstd``, in float32 (float64 kept)."""
    x = _acc(x)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


def _rms_backward(grad_normed: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """Gradient w.r.t. ``x`` of ``x_hat = x · rstd(x)`` given the gradient of ``x_hat``."""
    return rstd * (grad_normed - x_hat * (grad_normed * x_hat).mean(-1, keepdim=True))


def _sum_to_last(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).sum(0)


class _MixGlobalLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, global_out, local_out, gate_logits, global_weight, local_weight, eps, out_act):
        # forward as eager PyTorch would run it (fused rms_norm kernels, input dtype) ...
        na = F.rms_norm(global_out, (global_out.shape[-1],), global_weight.to(global_out.dtype), eps)
        nb = F.rms_norm(local_out, (local_out.shape[-1],), local_weight.to(local_out.dtype), eps).to(na.dtype)
        mixed = torch.lerp(nb, na, torch.sigmoid(gate_logits).to(na.dtype))
        ctx.save_for_backward(global_out, local_out, gate_logits, global_weight, local_weight)
        ctx.eps, ctx.out_act = eps, out_act
        return F.silu(mixed) if out_act else mixed

    @staticmethod
    def backward(ctx, grad_out):
        # ... and backward recomputes the normalised branches from the saved inputs, in float32
        global_out, local_out, gate_logits, global_weight, local_weight = ctx.saved_tensors
        a_hat, a_rstd = _rms_forward(global_out, global_weight, ctx.eps)
        b_hat, b_rstd = _rms_forward(local_out, local_weight, ctx.eps)
        wa, wb = _acc(global_weight), _acc(local_weight)
        na, nb = a_hat * wa, b_hat * wb
        g = torch.sigmoid(_acc(gate_logits))
        grad = _acc(grad_out)
        if ctx.out_act:
            mixed = torch.lerp(nb, na, g)
            s = torch.sigmoid(mixed)
            grad = grad * s * (1 + mixed * (1 - s))
        grad_na, grad_nb = grad * g, grad * (1 - g)
        grad_z = grad * (na - nb) * g * (1 - g)
        grad_a = _rms_backward(grad_na * wa, a_hat, a_rstd)
        grad_b = _rms_backward(grad_nb * wb, b_hat, b_rstd)
        return (
            grad_a.to(global_out.dtype),
            grad_b.to(local_out.dtype),
            grad_z.to(gate_logits.dtype),
            _sum_to_last(grad_na * a_hat).to(global_weight.dtype),
            _sum_to_last(grad_nb * b_hat).to(local_weight.dtype),
            None,
            None,
        )


def mix_global_local(global_out: Tensor, local_out: Tensor, gate_logits: Tensor, global_weight: Tensor,
                     local_weight: Tensor, eps: float, out_act: bool) -> Tensor:
    """``silu?( g · RMSNorm_g(global) + (1 − g) · RMSNorm_l(local) )``, ``g = sigmoid(gate_logits)``.

    ``global_out, local_out, gate_logits``: ``[..., heads, head_dim]`` (any strides); the
    norms are over ``head_dim``. Returns the dtype of ``global_out``."""
    return _MixGlobalLocal.apply(global_out, local_out, gate_logits, global_weight, local_weight, eps, out_act)


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, weight):
        gate, value = projected.chunk(2, dim=-1)
        product = F.silu(gate) * value
        ctx.save_for_backward(projected, weight)
        return F.linear(product, weight.to(product.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        projected, weight = ctx.saved_tensors
        gate, value = projected.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        product = gate * sig * value  # recomputed, not kept from forward
        w = weight.to(grad_out.dtype)
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
        grad_product = grad_out @ w
        grad_gate = grad_product * value * sig * (1 + gate * (1 - sig))
        grad_value = grad_product * gate * sig
        return torch.cat([grad_gate, grad_value], dim=-1), grad_weight.to(weight.dtype)


def swiglu_linear(projected: Tensor, weight: Tensor) -> Tensor:
    """``(silu(gate) · value) @ weightᵀ`` with ``[gate, value] = projected.chunk(2, -1)``."""
    return _SwiGLULinear.apply(projected, weight)
