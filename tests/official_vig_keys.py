"""The parameter names and shapes of the official ViG / ViG-H checkpoints (hustvl/ViG).

Written down from the official module definitions (``classification/models/vig.py``,
``vig_h.py``, the configs under ``classification/configs/``), *not* from our models, so that
the tests comparing the two can fail. What each entry comes from:

Plain ViG (``ViG`` with ``patch_embed_version='v2'``, ``if_cls_token=False``,
``if_abs_pos_embed=True``, ``use_swiglu=True`` by default in ``config.py``):
  - ``V2PatchEmbed.proj`` = Sequential(Conv2d(3, D/2, k=p/2+1, s=p/2, pad 1, bias),
    LayerNorm2d(D/2), SiLU, Conv2d(D/2, D, 3, s 2, pad 1, bias), LayerNorm2d(D))
  - ``pos_embed`` [1, 14·14, D] at 224 px; no ``cls_token``
  - ``GLABlock``: ``attn_norm`` / ``mlp_norm`` = fla RMSNorm (weight only); ``attn`` =
    ``GatedLinearAttention``: ``in_proj`` = Sequential(depth-wise Conv2d(D, D, 3, no bias),
    SiLU|Identity), ``qkv_proj`` Linear(D, 2·K+V, no bias), ``gk_proj`` = Sequential(
    Linear(D, 16, no bias), Linear(16, 2·K, bias)), ``o_proj`` Linear(V, D, no bias),
    ``g_norm`` / ``l_norm`` RMSNorm(V/heads), ``g_proj`` Linear(D, V, bias); ``mlp`` = GLAMLP:
    ``gate_proj`` Linear(D, 2·I, no bias), ``down_proj`` Linear(I, D, no bias) with
    I = int(8·D/3) rounded up to a multiple of 256
  - ``norm`` RMSNorm(D), ``head`` Linear(D, 1000)

Hierarchical ViG (``HierViG`` with ``PATCHEMBED v2``, ``DOWNSAMPLE v3``, ``NORM_LAYER ln2d``,
``GMLP True``):
  - ``patch_embed`` = Sequential(Conv2d(3, d/2, 3, s 2, pad 1), Identity, LayerNorm2d(d/2),
    Identity, GELU, Conv2d(d/2, d, 3, s 2, pad 1), Identity, LayerNorm2d(d))
  - ``layers.i`` = Sequential(blocks=Sequential(VSSBlock...), downsample=Sequential(Identity,
    Conv2d(d, 2d, 3, s 2, pad 1), Identity, LayerNorm2d(2d)) or Identity for the last stage)
  - ``VSSBlock``: ``norm`` / ``norm2`` LayerNorm2d(d) (weight and bias), ``op`` = GLA2D (the
    same parameters as above; Linear2d stores nn.Linear-shaped weights), ``mlp`` = gMlp:
    ``fc1`` Linear(d, 2·I, no bias), ``fc2`` Linear(I, d, no bias), I rounded up to 32
  - ``classifier`` = Sequential(norm=LayerNorm2d, permute, avgpool, flatten, head=Linear)
"""

from __future__ import annotations

#: official configurations: (embed_dim, heads) of ViG-T/S/B; (stem width, depths, heads) of ViG-H
PLAIN = {"vig_tiny": (192, 3), "vig_small": (384, 6), "vig_base": (768, 12)}
HIERARCHICAL = {
    "vig_h_tiny": (96, (2, 2, 5, 2), (3, 6, 12, 24)),
    "vig_h_small": (96, (2, 2, 17, 2), (3, 6, 12, 24)),
    "vig_h_base": (128, (2, 2, 17, 2), (4, 8, 16, 32)),
}
#: published parameter counts (ViG paper, Table 1 / 2), in millions
PUBLISHED_MILLIONS = {
    "vig_tiny": 6, "vig_small": 23, "vig_base": 89, "vig_h_tiny": 29, "vig_h_small": 50, "vig_h_base": 89,
}


def _round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


def _gla_mixer(prefix: str, d: int, heads: int) -> list[tuple[str, tuple[int, ...]]]:
    key, value = d // 2, d  # expand_k = 0.5, expand_v = 1
    return [
        (f"{prefix}.in_proj.0.weight", (d, 1, 3, 3)),
        (f"{prefix}.qkv_proj.weight", (2 * key + value, d)),
        (f"{prefix}.gk_proj.0.weight", (16, d)),
        (f"{prefix}.gk_proj.1.weight", (2 * key, 16)),
        (f"{prefix}.gk_proj.1.bias", (2 * key,)),
        (f"{prefix}.o_proj.weight", (d, value)),
        (f"{prefix}.g_norm.weight", (value // heads,)),
        (f"{prefix}.l_norm.weight", (value // heads,)),
        (f"{prefix}.g_proj.weight", (value, d)),
        (f"{prefix}.g_proj.bias", (value,)),
    ]


def plain_vig_keys(embed_dim: int, heads: int, depth: int = 12, grid: int = 14, patch: int = 16,
                   num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    d = embed_dim
    hidden = _round_up(int(d * 4 * 2 / 3), 256)
    k = patch // 2 + 1
    keys = [
        ("patch_embed.proj.0.weight", (d // 2, 3, k, k)),
        ("patch_embed.proj.0.bias", (d // 2,)),
        ("patch_embed.proj.1.weight", (d // 2,)),
        ("patch_embed.proj.1.bias", (d // 2,)),
        ("patch_embed.proj.3.weight", (d, d // 2, 3, 3)),
        ("patch_embed.proj.3.bias", (d,)),
        ("patch_embed.proj.4.weight", (d,)),
        ("patch_embed.proj.4.bias", (d,)),
        ("pos_embed", (1, grid * grid, d)),
    ]
    for i in range(depth):
        keys.append((f"blocks.{i}.attn_norm.weight", (d,)))
        keys += _gla_mixer(f"blocks.{i}.attn", d, heads)
        keys += [
            (f"blocks.{i}.mlp_norm.weight", (d,)),
            (f"blocks.{i}.mlp.gate_proj.weight", (2 * hidden, d)),
            (f"blocks.{i}.mlp.down_proj.weight", (d, hidden)),
        ]
    keys += [("norm.weight", (d,)), ("head.weight", (num_classes, d)), ("head.bias", (num_classes,))]
    return dict(keys)


def hierarchical_vig_keys(width: int, depths, heads, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    dims = [width * 2**i for i in range(len(depths))]
    d0 = dims[0]
    keys = [
        ("patch_embed.0.weight", (d0 // 2, 3, 3, 3)),
        ("patch_embed.0.bias", (d0 // 2,)),
        ("patch_embed.2.weight", (d0 // 2,)),
        ("patch_embed.2.bias", (d0 // 2,)),
        ("patch_embed.5.weight", (d0, d0 // 2, 3, 3)),
        ("patch_embed.5.bias", (d0,)),
        ("patch_embed.7.weight", (d0,)),
        ("patch_embed.7.bias", (d0,)),
    ]
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d = dims[i]
        hidden = _round_up(int(d * 4 * 2 / 3), 32)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            keys += [(f"{p}.norm.weight", (d,)), (f"{p}.norm.bias", (d,))]
            keys += _gla_mixer(f"{p}.op", d, h)
            keys += [
                (f"{p}.norm2.weight", (d,)),
                (f"{p}.norm2.bias", (d,)),
                (f"{p}.mlp.fc1.weight", (2 * hidden, d)),
                (f"{p}.mlp.fc2.weight", (d, hidden)),
            ]
        if i < len(depths) - 1:
            keys += [
                (f"layers.{i}.downsample.1.weight", (dims[i + 1], d, 3, 3)),
                (f"layers.{i}.downsample.1.bias", (dims[i + 1],)),
                (f"layers.{i}.downsample.3.weight", (dims[i + 1],)),
                (f"layers.{i}.downsample.3.bias", (dims[i + 1],)),
            ]
    keys += [
        ("classifier.norm.weight", (dims[-1],)),
        ("classifier.norm.bias", (dims[-1],)),
        ("classifier.head.weight", (num_classes, dims[-1])),
        ("classifier.head.bias", (num_classes,)),
    ]
    return dict(keys)


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    if name in PLAIN:
        return plain_vig_keys(*PLAIN[name])
    return hierarchical_vig_keys(*HIERARCHICAL[name])
