"""The ViG mixer against the official formulation, in float64.

The official training path flips the sequence, concatenates it on the batch axis, runs one
causal GLA and averages the two halves; ours makes one bidirectional call with ``g_reverse``.
The reference below follows the official steps literally (channels-first convolution, flipped
copies, the token-by-token recurrence of ``glakernels.reference``), so it shares no code path
with the model's forward beyond the parameters."""

import pytest
import torch
import torch.nn.functional as F

from gla_testing import rel_err
from glakernels.reference import causal_recurrence
from vig.gla_mixer import GatedLinearAttention2D


def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if p.ndim == 1 else 0.0))


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def official_mixer(m: GatedLinearAttention2D, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    heads, kd, vd = m.num_heads, m.key_dim, m.value_dim
    local = F.conv2d(x.permute(0, 3, 1, 2).contiguous(), m.in_proj[0].weight, padding=1, groups=C)
    if isinstance(m.in_proj[1], torch.nn.SiLU):
        local = F.silu(local)
    xs = local.flatten(2).transpose(1, 2)  # [B, N, C]
    q, k, v = torch.split(xs @ m.qkv_proj.weight.T, [kd, kd, vd], dim=2)
    gk = m.gk_proj[1](m.gk_proj[0](xs))
    fw, bw = gk.chunk(2, dim=2)
    gk = F.logsigmoid(torch.cat([fw, bw.flip(1)], dim=0)) / 16
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1)  # noqa: E731
    q2, k2, v2 = (torch.cat([t, t.flip(1)], dim=0) for t in (q, k, v))
    o, _ = causal_recurrence(split(q2), split(k2), split(v2), split(gk), (kd // heads) ** -0.5)
    o_f, o_b = o.chunk(2)
    o = (o_f + o_b.flip(1)) / 2
    local_heads = split(xs)
    o = _rms(o, m.g_norm.weight, m.norm_eps)
    g = torch.sigmoid(xs @ m.g_proj.weight.T + m.g_proj.bias).reshape(B, H * W, heads, -1)
    o = o * g + _rms(local_heads, m.l_norm.weight, m.norm_eps) * (1 - g)
    o = o.reshape(B, H * W, vd)
    if m.out_act:
        o = F.silu(o)
    return (o @ m.o_proj.weight.T).reshape(B, H, W, C)


def _rel_err(a, b):
    # the project's metric (tests/gla_testing.py): relative, and absolute where the reference
    # is exactly zero (the gate gradients at T = 1, which backends reach only up to rounding)
    return rel_err(a, b)


@pytest.mark.parametrize(
    "B, H, W, C, heads, acts",
    [(2, 5, 7, 24, 3, True), (1, 1, 1, 16, 2, False), (2, 4, 4, 12, 1, False), (1, 9, 3, 40, 4, True)],
    ids=["B2-5x7-C24-h3-act", "T1", "B2-4x4-C12-h1", "B1-9x3-C40-h4-act"],
)
def test_mixer_matches_official_flip_and_concat_formulation(B, H, W, C, heads, acts):
    torch.manual_seed(0)
    m = GatedLinearAttention2D(C, heads, act_in_conv=acts, out_act=acts).double()
    _randomize(m, seed=B * 100 + C)
    x = torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=True)
    ours = m(x)
    ref = official_mixer(m, x)
    assert torch.isfinite(ours).all()
    assert _rel_err(ours, ref) <= 1e-10
    grad = torch.randn_like(ours)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    tensors = [x] + list(m.parameters())
    ours_g = torch.autograd.grad(ours, tensors, grad)
    ref_g = torch.autograd.grad(ref, tensors, grad)
    for name, a, b in zip(names, ours_g, ref_g):
        assert _rel_err(a, b) <= 1e-10, name


def test_mixer_float32_close_to_float64_with_hostile_gates():
    """Gates saturated far below zero (bias -1e4 → logsigmoid/16 ≈ -625 per step: hard resets)
    stay finite and correct in float32."""
    torch.manual_seed(1)
    m = GatedLinearAttention2D(32, 2).double()
    _randomize(m, seed=7)
    with torch.no_grad():
        m.gk_proj[1].bias[:8] = -1e4
    x = torch.randn(2, 6, 6, 32, dtype=torch.float64)
    ref = official_mixer(m, x)
    ours = m.float()(x.float())
    assert torch.isfinite(ours).all()
    assert _rel_err(ours.double(), ref) <= 1e-4


def test_block_fused_pre_norm_equals_norm_then_mixer():
    """ViG blocks hand their RMSNorm to the mixer (fused with the convolution); the result and
    every gradient equal normalising first."""
    from vig.vig import ViGBlock

    torch.manual_seed(2)
    block = ViGBlock(24, 3, act_in_conv=True, out_act=True).double()
    _randomize(block, seed=11)
    x = torch.randn(2, 4, 5, 24, dtype=torch.float64, requires_grad=True)
    fused = block.attn(x, pre_norm=block.attn_norm)
    plain = block.attn(block.attn_norm(x))
    assert _rel_err(fused, plain) <= 1e-12
    grad = torch.randn_like(fused)
    tensors = [x] + list(block.parameters())
    for a, b in zip(torch.autograd.grad(fused, tensors, grad, allow_unused=True),
                    torch.autograd.grad(plain, tensors, grad, allow_unused=True)):
        assert (a is None and b is None) or _rel_err(a, b) <= 1e-10


def test_model_defers_each_blocks_last_residual_add():
    """ViG's blocks leave their last residual add to the next block (fused with its pre-norm)
    or to the final norm: the features and every gradient equal running the blocks one by one."""
    from vig.vig import ViG

    torch.manual_seed(4)
    model = ViG(img_size=32, patch_size=16, embed_dim=24, depth=3, num_heads=3, num_classes=5).double()
    _randomize(model, seed=12)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def one_by_one(images):
        x = model.patch_embed(images)
        x = x + model.position_embedding(tuple(x.shape[1:3]))
        for block in model.blocks:
            x = block(x)
        return model.norm(x)

    deferred, plain = model.forward_features(images), one_by_one(images)
    assert _rel_err(deferred, plain) <= 1e-12
    grad = torch.randn_like(deferred)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(deferred, params, grad, allow_unused=True),
                    torch.autograd.grad(plain, params, grad, allow_unused=True)):
        assert (a is None and b is None) or _rel_err(a, b) <= 1e-10
