"""DiG: diffusion transformers with a gated-linear-attention backbone.

*DiG: Scalable and Efficient Diffusion Models with Gated Linear Attention*, Zhu et al., 2024 —
https://arxiv.org/abs/2405.18428. A DiT (Peebles & Xie 2023) whose attention is **causal**
GLA: every block runs one causal scan, the token order is reversed after every block and the
token grid is transposed (H↔W) after every second block, so that scans cover the image in
four directions; an optional depth-wise 3×3 convolution after each block adds 2D locality.
Conditioning on timestep and class is adaLN-Zero.

Parameter names follow the official code (hustvl/DiG ``models_dig.py`` / ``module_dig.py``,
which reuse DiT's embedders). DiG-S/B/L/XL with patch 2: :func:`dig_s_2` ... :func:`dig_xl_2`.
The training loss and a sampler are in :mod:`vig.diffusion`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from glakernels import gated_linear_attention

from ._registry import check_no_download, register_model
from .layers import SwiGLU, depthwise_conv_nhwc, nchw_to_nhwc, rms_norm

Tensor = torch.Tensor

__all__ = ["DiG", "DiGBlock", "dig_s_2", "dig_b_2", "dig_l_2", "dig_xl_2", "sincos_pos_embed_2d"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x · (1 + scale) + shift`` with per-sample ``shift, scale`` of shape ``[B, C]``."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (float) timestep, then a 2-layer MLP (DiT's embedder)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return F.pad(features, (0, dim % 2))

    def forward(self, t: Tensor) -> Tensor:
        features = self.timestep_features(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; label ``num_classes`` is the "no class" token of classifier-free
    guidance, and training drops labels to it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: Tensor, train: bool) -> Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class RMSNormSwishGate(nn.Module):
    """``RMSNorm(o) · silu(gate)`` per head (the official ``g_norm_swish_gate``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, o: Tensor, gate: Tensor) -> Tensor:
        return rms_norm(o, self.weight, self.eps) * F.silu(gate)


class CausalGLA(nn.Module):
    """GLA token mixer of DiG, on ``[B, T, C]`` tokens: one causal scan (the direction comes
    from the token order the model feeds in), output gate ``silu(g_proj(x))``."""

    def __init__(self, dim: int, num_heads: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-6):
        super().__init__()
        key_dim, value_dim = int(dim * expand_k), int(dim * expand_v)
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide key width {key_dim} and value width {value_dim}")
        self.num_heads = num_heads
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, key_dim, bias=True)
        )
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.g_norm_swish_gate = RMSNormSwishGate(value_dim // num_heads, eps=norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        heads = self.num_heads
        q = self.q_proj(x).view(B, T, heads, -1)
        k = self.k_proj(x).view(B, T, heads, -1)
        v = self.v_proj(x).view(B, T, heads, -1)
        g = (F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer).view(B, T, heads, -1)
        o = gated_linear_attention(q, k, v, g, bidirectional=False)
        o = self.g_norm_swish_gate(o, self.g_proj(x).view(B, T, heads, -1))
        return self.o_proj(o.view(B, T, -1))


class DiGBlock(nn.Module):
    """adaLN-Zero block: ``x + gate · mixer(modulate(LN(x)))``, the same for the SwiGLU MLP, then
    the optional depth-wise convolution over the block's current token grid."""

    def __init__(self, dim: int, num_heads: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 dw_conv: bool = True, conv_kernel_size: int = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CausalGLA(dim, num_heads, expand_k, expand_v)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, SwiGLU.hidden_size(dim, multiple_of=256), names=("gate_proj", "down_proj"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.dw_conv = (
            nn.Conv2d(dim, dim, conv_kernel_size, padding=conv_kernel_size // 2, groups=dim, bias=True)
            if dw_conv else None
        )

    def forward(self, x: Tensor, c: Tensor, grid: tuple[int, int]) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        if self.dw_conv is not None:
            B, T, C = x.shape
            x = depthwise_conv_nhwc(x.view(B, grid[0], grid[1], C), self.dw_conv.weight, self.dw_conv.bias)
            x = x.reshape(B, T, C)
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch × patch`` convolution; ``[B, C, H, W]`` -> ``[B, h·w, D]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = nchw_to_nhwc(self.proj(x.contiguous(memory_format=torch.channels_last)))
        return x.reshape(x.shape[0], -1, x.shape[-1])


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2D sine-cosine position embedding ``[h·w, dim]`` (MAE / DiT): the first half of the
    channels encodes the column, the second half the row."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for a 2D sin-cos embedding, got {dim}")

    def encode(positions: np.ndarray, channels: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(channels // 2, dtype=np.float64) / (channels / 2))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64), indexing="ij")
    return torch.from_numpy(np.concatenate([encode(cols, dim // 2), encode(rows, dim // 2)], axis=1)).float()


class DiG(nn.Module):
    """DiG noise predictor: ``forward(x, t, y)`` -> ``[B, out_channels, H, W]``.

    Args:
        input_size: latent size (32 for 256-px images through the SD VAE); patch_size: 2.
        in_channels: latent channels; learn_sigma: also predict the variance (doubles the output).
        hidden_size, depth, num_heads: the model size.
        num_classes: class-conditional when > 0 (plus a "no class" label for guidance).
        class_dropout_prob: label drop rate in training (classifier-free guidance).
        dw_conv: depth-wise 3×3 convolution after every block; transpose: transpose the token
            grid after every second block (the four-direction scan).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        dw_conv: bool = True,
        transpose: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.transpose = transpose
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # fixed, as in DiT (stored in the state dict, not trained)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiGBlock(hidden_size, num_heads, expand_k, expand_v, dw_conv=dw_conv) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if block.dw_conv is not None:
                # identity convolution at start: the block's output passes through unchanged
                with torch.no_grad():
                    block.dw_conv.weight.zero_()
                    block.dw_conv.weight[:, :, block.dw_conv.kernel_size[0] // 2, block.dw_conv.kernel_size[1] // 2] = 1
                    block.dw_conv.bias.zero_()
            # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid).unsqueeze(0))
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h·w, p·p·c]`` -> ``[B, c, h·p, w·p]``."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid[0], grid[1], p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid[0] * p, grid[1] * p)

    def check_inputs(self, x: Tensor, t, y) -> tuple[Tensor, Tensor | None]:
        """Raise ``ValueError`` naming the argument for inputs this model cannot take; returns
        ``t`` and ``y`` as ``[B]`` tensors on ``x``'s device (a scalar is every sample's)."""
        size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        expected = f"[B, {self.in_channels}, {size[0]}, {size[1]}]"
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be floating-point latents {expected}, got {got}")
        if x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != size:
            raise ValueError(f"x must be latents {expected} (in_channels, input_size), got {tuple(x.shape)}")
        batch = x.shape[0]

        def per_sample(value, name: str) -> Tensor:
            value = torch.as_tensor(value, device=x.device)
            if value.ndim == 0:
                value = value.expand(batch)
            if value.shape != (batch,):
                raise ValueError(f"{name} must be a scalar or [B] = [{batch}], got shape {tuple(value.shape)}")
            return value

        t = per_sample(t, "t")
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("y: this DiG is unconditional (num_classes=0); pass y=None")
            return t, None
        if y is None:
            raise ValueError("y (class labels) is required for a class-conditional DiG")
        y = per_sample(y, "y")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got {y.dtype}")
        return t, y

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: ``[B, C, H, W]`` noisy latents; t: ``[B]`` timesteps (or one for all); y: ``[B]``
        class labels (``num_classes`` = the "no class" label of a model built with
        ``class_dropout_prob > 0``), None for an unconditional model."""
        t, y = self.check_inputs(x, t, y)
        grid = self.grid
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.num_classes > 0:
            c = c + self.y_embedder(y, self.training)
        B, T, C = x.shape
        flipped, transposed = False, False
        for i, block in enumerate(self.blocks):
            x = block(x, c, grid)
            # next block scans the other way; reversing a row-major grid is a 180° rotation,
            # which commutes with the transpose below, so the two are undone independently
            x = x.flip(1)
            flipped = not flipped
            if self.transpose and i % 2 == 1:
                x = x.view(B, grid[0], grid[1], C).transpose(1, 2).reshape(B, T, C)
                grid = (grid[1], grid[0])
                transposed = not transposed
        if flipped:
            x = x.flip(1)
        if transposed:
            x = x.view(B, grid[0], grid[1], C).transpose(1, 2).reshape(B, T, C)
            grid = (grid[1], grid[0])
        return self.unpatchify(self.final_layer(x, c), grid)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Classifier-free guidance: conditional and unconditional passes in one batch; the
        guided noise prediction is ``uncond + cfg_scale · (cond − uncond)``. Needs the "no
        class" label: a class-conditional model built with ``class_dropout_prob > 0``."""
        if self.num_classes == 0:
            raise ValueError("forward_with_cfg: guidance needs a class-conditional DiG (num_classes > 0)")
        if self.y_embedder.dropout_prob <= 0:
            raise ValueError("forward_with_cfg: guidance needs the \"no class\" label, which only a DiG built "
                             "with class_dropout_prob > 0 has")
        t, y = self.check_inputs(x, t, y)
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        eps = uncond[:, : self.in_channels] + cfg_scale * (cond[:, : self.in_channels] - uncond[:, : self.in_channels])
        return torch.cat([eps, cond[:, self.in_channels:]], dim=1)


# official sizes (models_dig.py): all with patch 2, the depth-wise conv and the transposed scans
_CONFIGS: dict[str, dict[str, Any]] = {
    "dig_s_2": dict(hidden_size=384, depth=12, num_heads=6),
    "dig_b_2": dict(hidden_size=768, depth=12, num_heads=12),
    "dig_l_2": dict(hidden_size=1024, depth=24, num_heads=16),
    "dig_xl_2": dict(hidden_size=1152, depth=28, num_heads=18),
}


def _create_dig(name: str, pretrained: bool, **kwargs) -> DiG:
    check_no_download(name, pretrained)
    config = dict(patch_size=2, **_CONFIGS[name])
    config.update(kwargs)
    return DiG(**config)


# not classifiers: registered with vig.create_model only, not with timm
@register_model(timm=False)
def dig_s_2(pretrained: bool = False, **kwargs) -> DiG:
    """DiG-S/2: 384 channels, 6 heads, 12 blocks."""
    return _create_dig("dig_s_2", pretrained, **kwargs)


@register_model(timm=False)
def dig_b_2(pretrained: bool = False, **kwargs) -> DiG:
    """DiG-B/2: 768 channels, 12 heads, 12 blocks."""
    return _create_dig("dig_b_2", pretrained, **kwargs)


@register_model(timm=False)
def dig_l_2(pretrained: bool = False, **kwargs) -> DiG:
    """DiG-L/2: 1024 channels, 16 heads, 24 blocks."""
    return _create_dig("dig_l_2", pretrained, **kwargs)


@register_model(timm=False)
def dig_xl_2(pretrained: bool = False, **kwargs) -> DiG:
    """DiG-XL/2: 1152 channels, 18 heads, 28 blocks."""
    return _create_dig("dig_xl_2", pretrained, **kwargs)
