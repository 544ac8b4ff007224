"""The ViG token mixer: bidirectional gated linear attention with 2D locality injection.

ViG (Liao et al. 2024, arXiv 2405.18425), §3: a depth-wise 3×3 convolution injects 2D
locality; queries, keys, values and two sets of data-dependent forget gates (one per scan
direction, through a low-rank projection, ``logsigmoid(·)/16``) are projected from its output;
bidirectional GLA gives the global branch; the global and the (RMS-normalised) local branch
are mixed per channel by a learned sigmoid gate, then projected out.

Speed notes (the reasons behind the shape of ``forward``):

- Activations are ``[B, H, W, C]`` end to end; ``q``, ``k``, ``v`` and the gates are
  ``[B, T, heads, dim]`` views of contiguous linear outputs, the op's native layout.
- Everything projected from the local branch (``q``, ``k``, ``v``, both directions' gates,
  the mix gate's logits) is one autograd function (:func:`vig.mixer_projections.mixer_projections`):
  the fused ``qkv_proj`` weight (the checkpoint format) is cast once and applied as three
  matmuls on row slices, so each output is contiguous and the op copies nothing (a split of one
  matmul's output would give strided views that must be copied); the gates' low-rank
  projection, ``logsigmoid(·)/16`` and the split into two contiguous tensors are one Triton
  kernel on CUDA (:func:`vig.fused.low_rank_log_gates_pair`; the 2K logits per token are never
  written); in backward the input gradients of all five are one running matmul sum.
- Both scan directions run in **one** ``gated_linear_attention(..., bidirectional=True,
  g_reverse=...)`` call: no flipped copies, no batch concatenation, the same path in training
  and evaluation.
- The normalisations, the sigmoid mix and the optional SiLU are one autograd function
  (:func:`vig.fused.mix_global_local`) that keeps only its inputs for backward and that
  ``torch.compile`` fuses into one kernel each way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from glakernels import gated_linear_attention

from .fused import add_norm_conv_act, mix_global_local, norm_conv_act
from .layers import RMSNorm, depthwise_conv_nhwc
from .mixer_projections import mixer_projections

Tensor = torch.Tensor

__all__ = ["GatedLinearAttention2D"]


class GatedLinearAttention2D(nn.Module):
    """ViG's mixer on a channels-last token grid ``[B, H, W, C]`` -> ``[B, H, W, C]``.

    Args:
        dim: channels ``C``.
        num_heads: heads; ``dim · expand_k`` and ``dim · expand_v`` must divide by it.
        expand_k, expand_v: key and value widths relative to ``dim``. The local branch is
            normalised per head with the value head size, so ``expand_v`` must be 1.
        gate_low_rank_dim: rank of the gate projection (16 in ViG).
        gate_logit_normalizer: the gates are ``logsigmoid(·) / gate_logit_normalizer``.
        act_in_conv: SiLU after the depth-wise convolution (ViG-T's configuration).
        out_act: SiLU after the global/local mix (ViG-T's configuration).
        norm_eps: epsilon of the two per-head RMSNorms.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        act_in_conv: bool = False,
        out_act: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        key_dim, value_dim = int(dim * expand_k), int(dim * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide key width {key_dim} (dim·expand_k) and "
                f"value width {value_dim} (dim·expand_v)"
            )
        if value_dim != dim:
            raise ValueError(f"expand_v must be 1 (the local branch has dim={dim} channels), got {expand_v}")
        self.num_heads = num_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.out_act = out_act
        self.norm_eps = norm_eps

        # names and shapes as in the official checkpoints
        self.in_proj = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False),
            nn.SiLU() if act_in_conv else nn.Identity(),
        )
        self.qkv_proj = nn.Linear(dim, 2 * key_dim + value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, 2 * key_dim, bias=True),  # [forward gates; reverse gates]
        )
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.g_norm = RMSNorm(value_dim // num_heads, eps=norm_eps)
        self.l_norm = RMSNorm(value_dim // num_heads, eps=norm_eps)
        self.g_proj = nn.Linear(dim, value_dim, bias=True)
        # the convolution runs channels-last, and so do its weight gradients: keep the weight
        # in the same layout (DistributedDataParallel buckets gradients in the weight's layout)
        # (explicit strides: with one input channel per group, .contiguous(channels_last) is a no-op)
        w = self.in_proj[0].weight.data
        out_ch, in_ch, kh, kw = w.shape
        self.in_proj[0].weight.data = torch.empty_strided(
            w.shape, (kh * kw * in_ch, 1, kw * in_ch, in_ch), dtype=w.dtype, device=w.device
        ).copy_(w)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # as the official code: small Xavier init of every projection (gain 2^-2.5)
        for weight in (self.qkv_proj.weight, self.in_proj[0].weight, self.g_proj.weight, self.o_proj.weight,
                       self.gk_proj[0].weight, self.gk_proj[1].weight):
            nn.init.xavier_uniform_(weight, gain=2**-2.5)
        nn.init.zeros_(self.g_proj.bias)
        nn.init.zeros_(self.gk_proj[1].bias)

    def matmul_weights(self) -> tuple[Tensor, ...]:
        """The weights the mixer's matmuls use, in the order ``forward``'s ``weights`` takes
        them cast (:func:`vig.weight_casts.autocast_matmul_weights`): ``qkv_proj``, ``g_proj``,
        the gates' low-rank ``gk_proj`` pair, ``o_proj``. Biases stay as they are: their
        gradients are float32 sums."""
        down, up = self.gk_proj
        return self.qkv_proj.weight, self.g_proj.weight, down.weight, up.weight, self.o_proj.weight

    def forward(self, x: Tensor, pre_norm: RMSNorm | None = None, weights: tuple[Tensor, ...] | None = None
                ) -> Tensor:
        """``x``: ``[B, H, W, C]``, already normalised, or raw with ``pre_norm`` given (the
        block's RMSNorm, then fused with the convolution: see :func:`vig.fused.norm_conv_act`).
        ``weights``: :meth:`matmul_weights` already cast (else the module's own are used)."""
        if pre_norm is not None:
            local = norm_conv_act(x, pre_norm.weight, pre_norm.eps, self.in_proj[0].weight, self._act_in_conv)
        else:
            local = self.in_proj[1](depthwise_conv_nhwc(x, self.in_proj[0].weight))
        return self.forward_local(local, weights)

    def forward_with_residual(self, x: Tensor, branch: Tensor, pre_norm: RMSNorm,
                              weights: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``(s, forward(s, pre_norm, weights))`` with ``s = x + branch``: a residual add left
        over from the block before, fused with the pre-norm's statistics pass
        (:func:`vig.fused.add_norm_conv_act`)."""
        s, local = add_norm_conv_act(x, branch, pre_norm.weight, pre_norm.eps, self.in_proj[0].weight,
                                     self._act_in_conv)
        return s, self.forward_local(local, weights)

    @property
    def _act_in_conv(self) -> bool:
        return isinstance(self.in_proj[1], nn.SiLU)

    def forward_local(self, local: Tensor, weights: tuple[Tensor, ...] | None = None) -> Tensor:
        """The rest of the mixer, from the local branch (the convolution's output)."""
        B, H, W, C = local.shape
        heads = self.num_heads
        w_qkv, w_g, w_down, w_up, w_out = self.matmul_weights() if weights is None else weights
        # the five projections of `local` as one autograd node (vig.mixer_projections): its
        # input gradient is one running matmul sum; both directions' gates come from one
        # low-rank projection as two contiguous tensors (on CUDA one kernel: vig.triton_matmuls)
        q, k, v, g_fwd, g_rev, gate_logits = mixer_projections(
            local, w_qkv, self.key_dim, w_g, self.g_proj.bias, w_down, w_up, self.gk_proj[1].bias,
            self.gate_logit_normalizer,
        )
        q, k, v = (t.view(B, H * W, heads, -1) for t in (q, k, v))

        o = gated_linear_attention(
            q, k, v, g_fwd.view(B, H * W, heads, -1), bidirectional=True,
            g_reverse=g_rev.view(B, H * W, heads, -1),
        )
        gate_logits = gate_logits.view(B, H * W, heads, -1)
        out = mix_global_local(
            o, local.reshape(B, H * W, heads, -1), gate_logits, self.g_norm.weight, self.l_norm.weight,
            self.norm_eps, self.out_act, w_out,
        )
        return out.view(B, H, W, -1)
