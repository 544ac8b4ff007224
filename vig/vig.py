"""ViG: plain (isotropic) vision models on bidirectional gated linear attention.

*ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention*, Liao et al.,
2024 — https://arxiv.org/abs/2405.18425. ViG-T/S/B: the "v2" convolutional patch embedding
(patch 16), learned absolute position embeddings, 12 blocks of
``x + mixer(RMSNorm(x))`` / ``x + SwiGLU(RMSNorm(x))``, a final RMSNorm and average pooling.

Parameter names and shapes are those of the official checkpoints (hustvl/ViG), so their
``{"model": state_dict}`` files load strictly through :func:`checkpoint_filter_fn`, at any
input resolution (position embeddings resampled). Activations are channels-last
``[B, H, W, C]`` throughout.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import build_classifier, check_global_pool, register_model
from .checkpoint import resample_pos_embed, square_grid, unwrap_state_dict
from .fused import add_rms_norm, layer_norm_act, patch_conv
from .gla_mixer import GatedLinearAttention2D
from .layers import DropPath, LayerNorm2d, RMSNorm, SwiGLU, check_images, nchw_to_nhwc, nhwc_to_nchw
from .weight_casts import autocast_matmul_weights, split_by_module

Tensor = torch.Tensor

__all__ = ["ViG", "ViGBlock", "PatchEmbedV2", "checkpoint_filter_fn", "vig_tiny", "vig_small", "vig_base"]


def _to_2tuple(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class PatchEmbedV2(nn.Module):
    """Two strided convolutions (``patch/2``, then 2), each followed by a channel LayerNorm,
    with SiLU between them: the official "v2" patch embedding. NCHW in, ``[B, h, w, C]`` out."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if patch_size < 4 or patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4 (two stride-2 stages), got {patch_size}")
        self.patch_size = patch_size
        stride = patch_size // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=stride + 1, stride=stride, padding=1),
            LayerNorm2d(embed_dim // 2),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim),
        )

    def grid_size(self, img_size) -> tuple[int, int]:
        """Token grid produced for an ``img_size`` input (convolution arithmetic of ``proj``)."""
        stride = self.patch_size // 2
        first = [(s + 2 - (stride + 1)) // stride + 1 for s in _to_2tuple(img_size)]
        return tuple((s + 2 - 3) // 2 + 1 for s in first)

    def forward(self, x: Tensor) -> Tensor:
        # ``proj`` holds the layers (and the checkpoint's names); they run here so that each
        # channel norm is one kernel (vig.fused.layer_norm_act), the first with its SiLU
        conv1, norm1, _, conv2, norm2 = self.proj
        autocast = torch.is_autocast_enabled(x.device.type)
        # channels-last out ([B, h, w, C]); one kernel reads the NCHW image in place on CUDA
        x = patch_conv(x, conv1.weight, conv1.bias, conv1.stride[0], conv1.padding[0])
        # norm1 feeds a convolution: autocast's dtype; norm2 starts the float32 residual stream
        # under autocast (as autocast's own layer_norm would), else the input's dtype
        low = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        x = layer_norm_act(x, norm1.weight, norm1.bias, norm1.eps, True, low)
        x = nchw_to_nhwc(conv2(nhwc_to_nchw(x)))
        x = layer_norm_act(x, norm2.weight, norm2.bias, norm2.eps, False, torch.float32 if autocast else x.dtype)
        return x.contiguous()


class ViGBlock(nn.Module):
    """``x + mixer(RMSNorm(x))``, then ``x + SwiGLU(RMSNorm(x))``, on ``[B, H, W, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        mlp_hidden: int | None = None,
        drop_path: float = 0.0,
        act_in_conv: bool = False,
        out_act: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps=norm_eps)
        self.attn = GatedLinearAttention2D(
            dim, num_heads, expand_k=expand_k, expand_v=expand_v, act_in_conv=act_in_conv, out_act=out_act,
            norm_eps=norm_eps,
        )
        self.mlp_norm = RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden or SwiGLU.hidden_size(dim, multiple_of=256), names=("gate_proj", "down_proj"))
        self.drop_path = DropPath(drop_path)

    def matmul_weights(self) -> tuple[Tensor, ...]:
        """The mixer's matmul weights, then the MLP's (see ``forward_deferred``'s ``weights``)."""
        return (*self.attn.matmul_weights(), *self.mlp.matmul_weights())

    def forward(self, x: Tensor, weights: tuple[Tensor, ...] | None = None) -> Tensor:
        x, branch = self.forward_deferred(x, None, weights)
        return x + branch

    def forward_deferred(self, x: Tensor, branch: Tensor | None = None, weights: tuple[Tensor, ...] | None = None
                         ) -> tuple[Tensor, Tensor]:
        """The block on ``x (+ branch)``, its output as ``(x, branch)`` to be summed: the MLP's
        residual add is left to the consumer, which fuses it with its own first pass (the
        next block's pre-norm statistics, or the final norm). H100, ViG-T, batch 128 at 224 px:
        the separate add (a float32 stream plus a bfloat16 branch) took 20.6 µs a block, and
        deferring it raised CUDA-graph inference from 30,523 to 31,733 images/s (1,351 to 1,399
        at 1024 px, batch 8; benchmarks/RESULTS.md, sixth session).

        ``weights``: :meth:`matmul_weights` already cast for autocast (the model casts all its
        blocks' weights at once, :mod:`vig.weight_casts`); ``None``: the module's own."""
        attn_w, mlp_w = split_by_module(weights, self.attn, self.mlp)
        if branch is None:  # the norm is fused with the conv
            mixed = self.attn(x, pre_norm=self.attn_norm, weights=attn_w)
        else:  # ... and with the previous block's residual add
            x, mixed = self.attn.forward_with_residual(x, branch, pre_norm=self.attn_norm, weights=attn_w)
        # the residual add is fused with the MLP's pre-norm (``mlp_norm``'s weight and eps; the
        # module itself is not called). Its result only feeds the MLP's first matmul: under
        # autocast, it comes in autocast's dtype rather than float32 (autocast would cast it anyway)
        x, normed = add_rms_norm(x, self.drop_path(mixed), self.mlp_norm.weight, self.mlp_norm.eps,
                                 to_autocast_dtype=True)
        return x, self.drop_path(self.mlp(normed, mlp_w))


class ViG(nn.Module):
    """Plain ViG. ``forward_features`` gives ``[B, h, w, C]``; ``forward_head`` pools and classifies.

    Args:
        img_size: training resolution (sets the stored position-embedding grid); other
            resolutions work, the embedding is resampled on the fly.
        patch_size, in_chans, num_classes, embed_dim, depth, num_heads: as usual.
        expand_k, expand_v: key / value widths of the mixer relative to ``embed_dim``.
        act_in_conv, out_act: the mixer's optional SiLUs (on in ViG-T, off in ViG-S/B).
        drop_rate: dropout before the head; drop_path_rate: stochastic depth (linear rule).
    """

    def __init__(
        self,
        img_size=224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        mlp_hidden: int | None = None,
        act_in_conv: bool = False,
        out_act: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        global_pool: str = "avg",
    ):
        super().__init__()
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_embed = PatchEmbedV2(patch_size, in_chans, embed_dim)
        self.patch_grid = self.patch_embed.grid_size(img_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid[0] * self.patch_grid[1], embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear rule
        self.blocks = nn.ModuleList(
            ViGBlock(embed_dim, num_heads, expand_k, expand_v, mlp_hidden, rates[i], act_in_conv, out_act, norm_eps)
            for i in range(depth)
        )
        self.norm = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        # the official initialisation: N(0, 0.02) linears, small Xavier inside the mixers
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, GatedLinearAttention2D):
                module.reset_parameters()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # -- timm-style interface ------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Parameters an optimizer should not decay besides the one-dimensional ones (timm's
        convention, read by ``vig.train.parameter_groups`` and timm's optimizer factory)."""
        return {"pos_embed"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The position embedding for a token grid, ``[1, h, w, C]`` (resampled if needed)."""
        pos = resample_pos_embed(self.pos_embed, self.patch_grid, grid)
        return pos.view(1, grid[0], grid[1], -1)

    def forward_features(self, x: Tensor) -> Tensor:
        check_images(x, self.in_chans)
        x = self.patch_embed(x)
        x = x + self.position_embedding(tuple(x.shape[1:3]))
        branch = None  # each block's last residual add is done by its consumer (forward_deferred)
        # under autocast, every block's matmul weights cast in one pass (vig.weight_casts)
        weights = autocast_matmul_weights(self.blocks, x)
        for block, block_weights in zip(self.blocks, weights):
            x, branch = block.forward_deferred(x, branch, block_weights)
        if branch is None:
            return self.norm(x)
        return add_rms_norm(x, branch, self.norm.weight, self.norm.eps)[1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter_fn(self, state_dict: dict, source_grid: tuple[int, int] | None = None) -> dict:
        return checkpoint_filter_fn(state_dict, self, source_grid)


def checkpoint_filter_fn(state_dict: dict, model: ViG, source_grid: tuple[int, int] | None = None) -> dict:
    """Official (or native) checkpoint -> state dict for ``model``: unwraps ``{"model": ...}``,
    strips DDP / compile prefixes, resamples ``pos_embed`` to the model's token grid.

    The checkpoint's token grid (rows, columns) is ``source_grid`` if given, else the one its
    container records (``python -m vig.train`` checkpoints: their ``model_kwargs``'
    ``img_size``), else square (every official checkpoint: 224 px, 14 x 14). A non-square grid
    cannot be read off a token count (12 x 12 and 8 x 18 both have 144), so a checkpoint
    trained on non-square images without a record needs ``source_grid``."""
    state = unwrap_state_dict(state_dict)
    pos = state.get("pos_embed")
    if pos is None:
        return state
    grid = source_grid if source_grid is not None else _recorded_grid(state_dict, model)
    if grid is None:
        if pos.shape == model.pos_embed.shape:
            return state  # (the same token count and no other grid known: the model's own)
        try:
            grid = square_grid(pos.shape[1])
        except ValueError as error:
            raise ValueError(f"{error}: pass source_grid=(rows, columns), the token grid the checkpoint "
                             "was trained at") from None
    # (a known grid is resampled even at the model's token count: 8 x 18 is not 12 x 12)
    state["pos_embed"] = resample_pos_embed(pos, tuple(grid), model.patch_grid)
    return state


def _recorded_grid(container: Mapping[str, Any], model: ViG) -> tuple[int, int] | None:
    """The token grid a checkpoint container records for its model (vig.train's
    ``model_kwargs``), through ``model``'s patch embedding (the patch size must match for the
    weights to load at all)."""
    kwargs = container.get("model_kwargs") if isinstance(container, Mapping) else None
    if not isinstance(kwargs, Mapping) or kwargs.get("img_size") is None:
        return None
    return model.patch_embed.grid_size(kwargs["img_size"])


# official configurations (classification/configs/vig/*.yaml)
_CONFIGS: dict[str, dict[str, Any]] = {
    "vig_tiny": dict(embed_dim=192, num_heads=3, act_in_conv=True, out_act=True, drop_path_rate=0.0),
    "vig_small": dict(embed_dim=384, num_heads=6, act_in_conv=False, out_act=False, drop_path_rate=0.2),
    "vig_base": dict(embed_dim=768, num_heads=12, act_in_conv=False, out_act=False, drop_path_rate=0.5),
}

#: timm reads these when the entry points are registered with it (data config, classifier name)
default_cfgs = {
    name: dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
        interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="patch_embed.proj.0", classifier="head", paper_ids="arXiv:2405.18425",
    )
    for name in _CONFIGS
}


def _create_vig(name: str, pretrained: bool, **kwargs) -> ViG:
    config = dict(patch_size=16, depth=12, expand_k=0.5, expand_v=1.0, **_CONFIGS[name])
    return build_classifier(ViG, name, pretrained, config, kwargs, default_cfgs[name])


@register_model
def vig_tiny(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-T: 192 channels, 3 heads, 12 blocks (~6M parameters)."""
    return _create_vig("vig_tiny", pretrained, **kwargs)


@register_model
def vig_small(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-S: 384 channels, 6 heads, 12 blocks (~23M parameters)."""
    return _create_vig("vig_small", pretrained, **kwargs)


@register_model
def vig_base(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-B: 768 channels, 12 heads, 12 blocks (~89M parameters)."""
    return _create_vig("vig_base", pretrained, **kwargs)
