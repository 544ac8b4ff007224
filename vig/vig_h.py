"""ViG-H: the hierarchical ViG (four stages, strided-convolution downsampling).

*ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention*, Liao et al.,
2024 — https://arxiv.org/abs/2405.18425. ViG-H-T/S/B use the official stage depths and widths
(hustvl/ViG ``classification/configs/vig-h``): a two-convolution stem (stride 4), stages of
``x + mixer(LN(x))`` / ``x + SwiGLU(LN(x))`` blocks, a 3×3 stride-2 convolution + LayerNorm
between stages, and a LayerNorm / average-pool / linear classifier.

Parameter names and shapes are those of the official checkpoints (which run channels-first);
here every stage runs channels-last ``[B, H, W, C]``, the layout the linear projections want.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn as nn

from ._registry import build_classifier, check_global_pool, register_model
from .checkpoint import unwrap_state_dict
from .gla_mixer import GatedLinearAttention2D
from .layers import DropPath, LayerNorm2d, SwiGLU, check_images, nchw_to_nhwc, nhwc_to_nchw
from .weight_casts import autocast_matmul_weights, split_by_module

Tensor = torch.Tensor

__all__ = ["HierViG", "HierViGBlock", "checkpoint_filter_fn", "vig_h_tiny", "vig_h_small", "vig_h_base"]


class HierViGBlock(nn.Module):
    """``x + mixer(LN(x))``, then ``x + SwiGLU(LN(x))``, on ``[B, H, W, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        drop_path: float = 0.0,
        act_in_conv: bool = False,
        out_act: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = GatedLinearAttention2D(
            dim, num_heads, expand_k=expand_k, expand_v=expand_v, act_in_conv=act_in_conv, out_act=out_act,
            norm_eps=norm_eps,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, SwiGLU.hidden_size(dim, multiple_of=32), names=("fc1", "fc2"))

    def matmul_weights(self) -> tuple[Tensor, ...]:
        """The mixer's matmul weights, then the MLP's (see ``forward``'s ``weights``)."""
        return (*self.op.matmul_weights(), *self.mlp.matmul_weights())

    def forward(self, x: Tensor, weights: tuple[Tensor, ...] | None = None) -> Tensor:
        """``weights``: :meth:`matmul_weights` already cast for autocast (the model casts all its
        blocks' weights at once, :mod:`vig.weight_casts`); ``None``: the module's own."""
        op_w, mlp_w = split_by_module(weights, self.op, self.mlp)
        x = x + self.drop_path(self.op(self.norm(x), weights=op_w))
        return x + self.drop_path(self.mlp(self.norm2(x), mlp_w))


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    # indices 1, 3, 6 hold no parameters; they keep the official numbering of the others
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(dim // 2),
        nn.Identity(),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(dim),
    )


def _downsample(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Identity(),
        nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(out_dim),
    )


class HierViG(nn.Module):
    """Hierarchical ViG. ``forward_features`` gives the last stage ``[B, h, w, C]``;
    ``forward_head`` normalises, pools and classifies.

    Args:
        in_chans, num_classes: as usual.
        depths: blocks per stage; dims: widths per stage (an int ``d`` means ``d·2^i``);
        num_heads: heads per stage.
        expand_k, expand_v, act_in_conv, out_act: mixer options (see ``GatedLinearAttention2D``).
        drop_rate: dropout before the head; drop_path_rate: stochastic depth (linear rule).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 5, 2),
        dims: int | Sequence[int] = 96,
        num_heads: Sequence[int] = (3, 6, 12, 24),
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        act_in_conv: bool = False,
        out_act: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        global_pool: str = "avg",
        img_size: Any = None,  # accepted for interface symmetry with ViG: no position embedding here
    ):
        super().__init__()
        if isinstance(dims, int):
            dims = [dims * 2**i for i in range(len(depths))]
        if not (len(dims) == len(depths) == len(num_heads)):
            raise ValueError(f"depths {depths}, dims {dims} and num_heads {num_heads} must have the same length")
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.dims = list(dims)
        self.num_features = self.dims[-1]
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_embed = _stem(in_chans, self.dims[0])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear rule
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            blocks = nn.Sequential(*(
                HierViGBlock(self.dims[i], num_heads[i], expand_k, expand_v, rates[start + j], act_in_conv, out_act, norm_eps)
                for j in range(depth)
            ))
            last = i == len(depths) - 1
            downsample = nn.Identity() if last else _downsample(self.dims[i], self.dims[i + 1])
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        self.classifier = nn.Sequential(OrderedDict(
            norm=nn.LayerNorm(self.num_features),
            head=nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(),
        ))
        self.head_drop = nn.Dropout(drop_rate)
        self.init_weights()

    def init_weights(self) -> None:
        # the official initialisation: truncated N(0, 0.02) linears, unit LayerNorms
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.classifier.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        check_images(x, self.in_chans)
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        x = nchw_to_nhwc(x).contiguous()
        # under autocast, every block's matmul weights cast in one pass (vig.weight_casts)
        weights = iter(autocast_matmul_weights([b for layer in self.layers for b in layer.blocks], x))
        for layer in self.layers:
            for block in layer.blocks:
                x = block(x, next(weights))
            if not isinstance(layer.downsample, nn.Identity):
                # channels-last convolution: NHWC memory in, NHWC memory out
                x = nchw_to_nhwc(layer.downsample(nhwc_to_nchw(x))).contiguous()
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.classifier.norm(x)
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.classifier.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter_fn(self, state_dict: dict) -> dict:
        return checkpoint_filter_fn(state_dict, self)


#: names used by earlier official training code, renamed by their loader too
_LEGACY_PREFIXES = (
    ("patch_embed.proj.", "patch_embed.0."),
    ("patch_embed.norm.", "patch_embed.2."),
    ("norm.", "classifier.norm."),
    ("head.", "classifier.head."),
)
_LEGACY_BLOCK_PARTS = ((".ln_1.", ".norm."), (".self_attention.", ".op."))


def checkpoint_filter_fn(state_dict: dict, model: HierViG | None = None) -> dict:
    """Official (or native) checkpoint -> state dict: unwraps ``{"model": ...}``, strips DDP /
    compile prefixes and renames the keys of earlier official releases."""
    state = {}
    for name, value in unwrap_state_dict(state_dict).items():
        for old, new in _LEGACY_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith("layers."):
            for old, new in _LEGACY_BLOCK_PARTS:
                name = name.replace(old, new)
        state[name] = value
    return state


_CONFIGS: dict[str, dict[str, Any]] = {
    "vig_h_tiny": dict(dims=96, depths=(2, 2, 5, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "vig_h_small": dict(dims=96, depths=(2, 2, 17, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "vig_h_base": dict(dims=128, depths=(2, 2, 17, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.6),
}

default_cfgs = {
    name: dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="patch_embed.0", classifier="classifier.head", paper_ids="arXiv:2405.18425",
    )
    for name in _CONFIGS
}


def _create_vig_h(name: str, pretrained: bool, **kwargs) -> HierViG:
    config = dict(expand_k=0.5, expand_v=1.0, act_in_conv=False, out_act=False, **_CONFIGS[name])
    return build_classifier(HierViG, name, pretrained, config, kwargs, default_cfgs[name])


@register_model
def vig_h_tiny(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-T: widths 96..768, depths 2-2-5-2 (~29M parameters)."""
    return _create_vig_h("vig_h_tiny", pretrained, **kwargs)


@register_model
def vig_h_small(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-S: widths 96..768, depths 2-2-17-2 (~50M parameters)."""
    return _create_vig_h("vig_h_small", pretrained, **kwargs)


@register_model
def vig_h_base(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-B: widths 128..1024, depths 2-2-17-2 (~89M parameters)."""
    return _create_vig_h("vig_h_base", pretrained, **kwargs)
