"""DiG: the four-direction scan order against the official control flow, official parameter
names, the diffusion loss and the DDIM sampler."""

import pytest
import torch
import torch.nn.functional as F

import vig
from vig.diffusion import GaussianDiffusion


def _tiny_dig(depth=4, dw_conv=True, transpose=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = vig.create_model("dig_s_2", hidden_size=32, depth=depth, num_heads=2, input_size=8, num_classes=5,
                             dw_conv=dw_conv, transpose=transpose, **kwargs).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every weight a value
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def official_dig_forward(model, x, t, y, restore=False):
    """``DiG.forward`` of hustvl/DiG ``models_dig.py`` (bid_mode='layer', if_quad_dir), step by
    step: flip after every block, transpose after every odd one, conv on the current grid
    through an NCHW reshape, unpatchify with the official einsum."""
    x = model.x_embedder.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    edge = int(x.shape[1] ** 0.5)
    for i, block in enumerate(model.blocks):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.adaLN_modulation(c).chunk(6, dim=1)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_a.unsqueeze(1)) + shift_a.unsqueeze(1)
        x = x + gate_a.unsqueeze(1) * block.attn(h)
        h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale_m.unsqueeze(1)) + shift_m.unsqueeze(1)
        x = x + gate_m.unsqueeze(1) * block.mlp(h)
        if block.dw_conv is not None:
            x = x.transpose(1, 2).reshape(-1, x.shape[-1], edge, edge)
            x = block.dw_conv(x).flatten(2).transpose(1, 2)
        x = x.flip(1)
        if i % 2 == 1:
            x = x.reshape(x.shape[0], edge, edge, x.shape[2]).transpose(1, 2).flatten(1, 2)
    if restore:  # odd depth: one flip too many; ⌈depth/2⌉ transposes, odd for depth 1 and 3
        x = x.flip(1) if len(model.blocks) % 2 else x
        if (len(model.blocks) // 2) % 2:
            x = x.reshape(x.shape[0], edge, edge, x.shape[2]).transpose(1, 2).flatten(1, 2)
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    x = model.final_layer.linear(h)
    p, ch = model.patch_size, model.out_channels
    x = x.reshape(x.shape[0], edge, edge, p, p, ch)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], ch, edge * p, edge * p)


def test_scan_order_matches_the_official_forward():
    model = _tiny_dig(depth=4)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([10, 900]), torch.tensor([0, 4])
    ours = model(x, t, y)
    ref = official_dig_forward(model, x, t, y)
    assert ours.shape == (2, 8, 8, 8)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-10


def test_scan_direction_matters():
    """The four-direction order is really used: without the transposes the output changes."""
    a = _tiny_dig(depth=4)
    b = _tiny_dig(depth=4, transpose=False)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([500]), torch.tensor([2])
    assert ((a(x, t, y) - b(x, t, y)).norm() / a(x, t, y).norm()).item() > 1e-3


@pytest.mark.parametrize("depth", [1, 3])
def test_odd_depth_restores_image_order_before_unpatchify(depth):
    """The official models all have even depths (the order ends where it started); with an
    odd depth ours undoes the last flip / transpose, which is the official forward followed by
    putting the tokens back in row-major image order."""
    model = _tiny_dig(depth=depth)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([3]), torch.tensor([1])
    ref = official_dig_forward(model, x, t, y, restore=True)
    assert ((model(x, t, y) - ref).norm() / ref.norm()).item() <= 1e-10


def test_official_parameter_names():
    with torch.device("meta"):
        model = vig.create_model("dig_s_2")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, kd, hv = 384, 192, 64
    expected = {
        "x_embedder.proj.weight": (d, 4, 2, 2),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.2.weight": (d, d),
        "y_embedder.embedding_table.weight": (1001, d),
        "pos_embed": (1, 256, d),
        "blocks.0.attn.q_proj.weight": (kd, d),
        "blocks.0.attn.k_proj.weight": (kd, d),
        "blocks.0.attn.v_proj.weight": (d, d),
        "blocks.0.attn.g_proj.weight": (d, d),
        "blocks.0.attn.gk_proj.0.weight": (16, d),
        "blocks.0.attn.gk_proj.1.weight": (kd, 16),
        "blocks.0.attn.gk_proj.1.bias": (kd,),
        "blocks.0.attn.o_proj.weight": (d, d),
        "blocks.0.attn.g_norm_swish_gate.weight": (hv,),
        "blocks.0.mlp.gate_proj.weight": (2048, d),
        "blocks.0.mlp.down_proj.weight": (d, 1024),
        "blocks.0.adaLN_modulation.1.weight": (6 * d, d),
        "blocks.11.dw_conv.weight": (d, 1, 3, 3),
        "blocks.11.dw_conv.bias": (d,),
        "final_layer.linear.weight": (2 * 2 * 8, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert len(shapes) == 8 + 12 * 15 + 4  # embedders + pos_embed; 15 tensors a block; final layer


def test_diffusion_schedule():
    diffusion = GaussianDiffusion()
    a = diffusion.alphas_cumprod
    assert a.shape == (1000,) and abs(a[0].item() - (1 - 1e-4)) < 1e-12
    assert (a[1:] < a[:-1]).all() and a[-1].item() < 1e-4


def test_ddim_with_the_exact_noise_predictor_recovers_the_data_point():
    """For data that is one fixed point x*, the ideal noise predictor is known in closed form;
    DDIM driven by it must land on x* from any starting noise."""
    diffusion = GaussianDiffusion()
    target = torch.randn(3, 2, 4, 4, dtype=torch.float64)

    def oracle(x_t, t):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * target) / (1 - a).sqrt()

    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    out = diffusion.ddim_sample(oracle, target.shape, steps=25, noise=noise)
    assert ((out - target).norm() / target.norm()).item() <= 1e-8


def test_training_steps_reduce_the_noise_prediction_loss():
    torch.manual_seed(0)
    model = vig.create_model("dig_s_2", hidden_size=32, depth=2, num_heads=2, input_size=8, num_classes=3)
    diffusion = GaussianDiffusion()
    data = torch.randn(8, 4, 8, 8)
    labels = torch.arange(8) % 3

    def fixed_loss():
        with torch.no_grad():
            return diffusion.training_loss(model, data, labels, generator=torch.Generator().manual_seed(123)).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(25):
        loss = diffusion.training_loss(model, data, labels, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.9 * before


def test_sampler_is_deterministic_for_a_model_in_training_mode():
    """Sampling mid-training (to monitor a run) must not draw label dropout from the global RNG:
    the same generator gives the same samples, and the model stays in the mode it was in."""
    model = _tiny_dig(depth=2, class_dropout_prob=0.5).float().train()
    diffusion = GaussianDiffusion()
    y = torch.tensor([1, 3])
    samples = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        samples.append(diffusion.sample(model, (2, 4, 8, 8), y, steps=3, generator=torch.Generator().manual_seed(0)))
    assert model.training
    assert torch.isfinite(samples[0]).all() and samples[0].abs().max() > 0
    assert torch.equal(samples[0], samples[1])


def test_sampler_with_guidance_runs_and_is_deterministic():
    model = _tiny_dig(depth=2).float()
    diffusion = GaussianDiffusion()
    y = torch.tensor([1, 3])
    a = diffusion.sample(model, (2, 4, 8, 8), y, steps=4, cfg_scale=4.0, generator=torch.Generator().manual_seed(0))
    b = diffusion.sample(model, (2, 4, 8, 8), y, steps=4, cfg_scale=4.0, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cfg_scale"):
        diffusion.sample(model, (2, 4, 8, 8), None, steps=2, cfg_scale=2.0)


def test_inputs_are_checked_by_name():
    """Latents of the wrong size (even by less than a patch), channels or dtype, timesteps and
    labels of the wrong shape, float labels, labels for an unconditional model: ValueErrors
    naming the argument. A scalar timestep (or label) is every sample's."""
    model = _tiny_dig(depth=2).eval()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([5, 5, 5])
    y = torch.tensor([1, 1, 1])
    with torch.no_grad():
        reference = model(x, t, y)
        assert torch.equal(model(x, 5, 1), reference)
        assert torch.equal(model(x, torch.tensor(5), y), reference)
        for bad, match in [
            (dict(x=torch.randn(3, 4, 9, 9)), r"x must be latents \[B, 4, 8, 8\]"),  # one row and column over
            (dict(x=torch.randn(3, 3, 8, 8)), r"x must be latents"),
            (dict(x=torch.randint(0, 5, (3, 4, 8, 8))), r"x must be floating-point"),
            (dict(x=torch.randn(4, 8, 8)), r"x must be floating-point latents"),
            (dict(t=torch.tensor([1, 2])), r"t must be a scalar or \[B\] = \[3\]"),
            (dict(y=torch.tensor([[1, 2, 3]])), r"y must be a scalar or \[B\]"),
            (dict(y=torch.tensor([1.0, 2.0, 3.0])), r"y must hold integer class labels"),
            (dict(y=None), r"y \(class labels\) is required"),
        ]:
            args = dict(x=x, t=t, y=y) | bad
            with pytest.raises(ValueError, match=match):
                model(args["x"], args["t"], args["y"])
    unconditional = vig.create_model("dig_s_2", hidden_size=32, depth=2, num_heads=2, input_size=8, num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x.float(), t, y)
    with pytest.raises(ValueError, match="class-conditional"):
        unconditional.forward_with_cfg(x.float(), t, y, 2.0)
    unconditional(x.float(), t)


def test_guidance_needs_the_no_class_label():
    model = _tiny_dig(depth=2, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        model.forward_with_cfg(torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 3]), torch.tensor([0, 1]),
                               2.0)
