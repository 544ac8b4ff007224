"""Small building blocks shared by ViG, ViG-H and DiG.

Every tensor of tokens here is channels-last: ``[B, H, W, C]`` (or ``[B, N, C]``), which is what
a linear projection reads and writes, so no block transposes its activations. Convolutions see
the same memory as an NCHW tensor in ``torch.channels_last`` format (a free ``permute``).

Parameter names follow the official ViG / DiG code, so their checkpoints load unchanged; the
forward passes are our own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused import rms_norm as fused_rms_norm
from .fused import swiglu_linear, swiglu_mlp

Tensor = torch.Tensor

__all__ = [
    "RMSNorm",
    "LayerNorm2d",
    "DropPath",
    "SwiGLU",
    "rms_norm",
    "nhwc_to_nchw",
    "nchw_to_nhwc",
    "depthwise_conv_nhwc",
]


def rms_norm(x: Tensor, weight: Tensor, eps: float, to_autocast_dtype: bool = False) -> Tensor:
    """RMSNorm over the last dimension, computed in float32 and returned in the dtype of ``x``
    (a float32 weight under autocast does not promote bfloat16 activations), or in autocast's
    dtype with ``to_autocast_dtype`` under autocast; backward keeps only ``x`` (see
    :mod:`vig.fused`)."""
    return fused_rms_norm(x, weight, eps, to_autocast_dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a weight and no bias (the official ViG/DiG checkpoints store ``weight`` only)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor.

    Our NCHW tensors are channels-last in memory, so the permutes around ``layer_norm`` are
    views, not copies."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(nchw_to_nhwc(x), self.normalized_shape, self.weight, self.bias, self.eps)
        return nhwc_to_nchw(y)


def check_images(x: object, in_chans: int) -> None:
    """A classifier's input: a floating [B, in_chans, H, W] tensor (errors say so, rather than
    what a convolution deep inside makes of it)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, {in_chans}, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"images must have shape [B, {in_chans}, H, W] (in_chans={in_chans}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point (e.g. normalised float32), got {x.dtype}")


def nhwc_to_nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def nchw_to_nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def depthwise_conv_nhwc(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Depth-wise 'same' convolution of a channels-last ``[B, H, W, C]`` tensor.

    Run as a channels-last NCHW convolution so that the result comes back as a contiguous
    ``[B, H, W, C]`` tensor (the layout the linear projections that follow want)."""
    channels, _, kh, kw = weight.shape
    y = F.conv2d(nhwc_to_nchw(x), weight, bias, padding=(kh // 2, kw // 2), groups=channels)
    return nchw_to_nhwc(y)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SwiGLU(nn.Module):
    """``W_out · (silu(gate) * value)`` with ``[gate, value] = W_in · x``; no biases.

    The official code names the two projections differently in ViG (``gate_proj`` /
    ``down_proj``, width rounded up to a multiple of 256) and ViG-H (``fc1`` / ``fc2``,
    multiple of 32); ``names`` picks them so that both checkpoints load.

    ``recompute_projection`` (default on): backward recomputes ``W_in · x`` instead of keeping
    it, so a training step keeps C instead of 2·hidden values per token (ViG-T at 1024 px,
    batch 8: about 620 MiB less peak memory) for one extra matmul. Results are the same
    either way; set the attribute to ``False`` to trade the memory back for the matmul."""

    def __init__(self, dim: int, hidden: int, names: tuple[str, str] = ("gate_proj", "down_proj"),
                 recompute_projection: bool = True):
        super().__init__()
        self.hidden = hidden
        self.recompute_projection = recompute_projection
        self._in_name, self._out_name = names
        setattr(self, self._in_name, nn.Linear(dim, 2 * hidden, bias=False))
        setattr(self, self._out_name, nn.Linear(hidden, dim, bias=False))

    @staticmethod
    def hidden_size(dim: int, multiple_of: int, ratio: float = 4.0) -> int:
        """``2/3 · ratio · dim`` rounded up to ``multiple_of``: the official sizing rule."""
        hidden = int(dim * ratio * 2 / 3)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    def matmul_weights(self) -> tuple[Tensor, Tensor]:
        """``(W_in, W_out)``, the order ``forward``'s ``weights`` takes them cast
        (:func:`vig.weight_casts.autocast_matmul_weights`)."""
        return getattr(self, self._in_name).weight, getattr(self, self._out_name).weight

    def forward(self, x: Tensor, weights: tuple[Tensor, Tensor] | None = None) -> Tensor:
        w_in, w_out = self.matmul_weights() if weights is None else weights
        if self.recompute_projection:  # keep x only; the projection is recomputed in backward
            return swiglu_mlp(x, w_in, w_out)
        # keep the projection; the product silu(gate)·value is recomputed (see vig.fused)
        return swiglu_linear(F.linear(x, w_in), w_out)
