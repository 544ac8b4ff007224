"""The memory-lean autograd functions of ``vig.fused`` against plain autograd (float64
gradcheck and an eager composition of the same ops), including low-precision inputs."""

import pytest
import torch
import torch.nn.functional as F

from vig.fused import log_gates, mix_global_local, norm_conv_act, rms_norm, swiglu_linear, swiglu_mlp
from vig.layers import SwiGLU


def _eager_mix(a, b, z, wa, wb, eps, out_act):
    na = F.rms_norm(a, (a.shape[-1],), wa, eps)
    nb = F.rms_norm(b, (b.shape[-1],), wb, eps)
    g = torch.sigmoid(z)
    m = g * na + (1 - g) * nb
    return F.silu(m) if out_act else m


@pytest.mark.parametrize("out_act", [False, True])
def test_mix_gradcheck_float64(out_act):
    gen = torch.Generator().manual_seed(0)
    shape = (2, 5, 3, 7)
    a, b, z = (torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    wa, wb = (torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *t: mix_global_local(*t, 1e-6, out_act), (a, b, z, wa, wb))
    ref = _eager_mix(a, b, z, wa, wb, 1e-6, out_act)
    ours = mix_global_local(a, b, z, wa, wb, 1e-6, out_act)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-12


def test_mix_bfloat16_inputs_float32_weights():
    gen = torch.Generator().manual_seed(1)
    a, b, z = (torch.randn(4, 9, 2, 16, generator=gen) for _ in range(3))
    wa, wb = (torch.rand(16, generator=gen) + 0.5 for _ in range(2))
    low = mix_global_local(a.bfloat16(), b.bfloat16(), z.bfloat16(), wa, wb, 1e-6, True)
    assert low.dtype == torch.bfloat16
    ref = _eager_mix(a.bfloat16().double(), b.bfloat16().double(), z.bfloat16().double(), wa.double(), wb.double(), 1e-6, True)
    assert ((low.double() - ref).norm() / ref.norm()).item() <= 2e-2


def test_swiglu_linear_gradcheck_and_value():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(3, 4, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_linear, (h, w))
    gate, value = h.chunk(2, -1)
    ref = (F.silu(gate) * value) @ w.T
    assert ((swiglu_linear(h, w) - ref).norm() / ref.norm()).item() <= 1e-12


@pytest.mark.parametrize("out_act", [False, True])
def test_mix_with_output_projection_gradcheck_float64(out_act):
    gen = torch.Generator().manual_seed(3)
    a, b, z = (torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    wa, wb = (torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    wo = torch.randn(6, 15, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda *t: mix_global_local(*t[:5], 1e-6, out_act, t[5])  # noqa: E731
    assert torch.autograd.gradcheck(f, (a, b, z, wa, wb, wo))
    ref = _eager_mix(a, b, z, wa, wb, 1e-6, out_act).flatten(-2) @ wo.T
    assert ((f(a, b, z, wa, wb, wo) - ref).norm() / ref.norm()).item() <= 1e-12


def test_log_gates_gradient_from_the_output():
    # hostile logits included: far below zero (gates near -1e4/16) and far above (gates near 0)
    z = torch.cat([torch.linspace(-1e4, 60, 41, dtype=torch.float64), torch.randn(20, dtype=torch.float64)])
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: log_gates(t, 16.0), (z,))
    g = log_gates(z, 16.0)
    assert torch.equal(g, F.logsigmoid(z) / 16)
    # bfloat16 gates: the slope is recovered from the rounded output, within bfloat16 accuracy
    zb = torch.randn(1000, dtype=torch.bfloat16, requires_grad=True)
    (grad,) = torch.autograd.grad(log_gates(zb, 16.0).float().sum(), zb)
    exact = torch.sigmoid(-zb.detach().double()) / 16
    assert ((grad.double() - exact).norm() / exact.norm()).item() <= 2e-2


def test_rms_norm_gradcheck_and_value():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    ref = F.rms_norm(x, (12,), w, 1e-6)
    assert ((rms_norm(x, w, 1e-6) - ref).norm() / ref.norm()).item() <= 1e-12


@pytest.mark.parametrize("act", [False, True])
def test_norm_conv_act_gradcheck_and_value(act):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    wn = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    wc = torch.randn(6, 1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda a, b, c: norm_conv_act(a, b, 1e-6, c, act)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, wn, wc))
    normed = F.rms_norm(x, (6,), wn, 1e-6).permute(0, 3, 1, 2)
    ref = F.conv2d(normed, wc, padding=1, groups=6).permute(0, 2, 3, 1)
    ref = F.silu(ref) if act else ref
    assert ((f(x, wn, wc) - ref).norm() / ref.norm()).item() <= 1e-12


def test_swiglu_mlp_gradcheck_and_value():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_mlp, (x, w_in, w_out))
    gate, value = (x @ w_in.T).chunk(2, -1)
    ref = (F.silu(gate) * value) @ w_out.T
    assert ((swiglu_mlp(x, w_in, w_out) - ref).norm() / ref.norm()).item() <= 1e-12


def test_swiglu_recompute_matches_kept_projection_under_autocast():
    """The recomputing MLP gives the same output and gradients as the one that keeps its
    projection, in float32 and under bfloat16 autocast (where backward must redo autocast's
    casts itself), and keeps less for backward."""
    torch.manual_seed(8)
    mlp = SwiGLU(16, 24)
    x0 = torch.randn(4, 64, 16)  # enough tokens that activations, not weights, dominate
    for autocast in (False, True):
        results, saved = {}, {}
        for recompute in (False, True):
            mlp.recompute_projection = recompute
            mlp.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_()
            sizes = []

            def pack(t, sizes=sizes):
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = mlp(x)
            out.float().square().sum().backward()
            saved[recompute] = sum(sizes)
            results[recompute] = [out, x.grad] + [p.grad for p in mlp.parameters()]
        assert saved[True] < saved[False], saved
        for kept, recomputed in zip(results[False], results[True]):
            assert kept.dtype == recomputed.dtype
            assert torch.isfinite(recomputed).all()
            assert torch.equal(kept, recomputed), (autocast, (kept - recomputed).abs().max())


def test_add_rms_norm_gradcheck_and_value():
    from vig.fused import add_rms_norm

    gen = torch.Generator().manual_seed(21)
    x, b = (torch.randn(3, 4, 9, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    # both outputs used, and each alone (the other's gradient is None)
    assert torch.autograd.gradcheck(lambda *t: add_rms_norm(*t, 1e-6), (x, b, w))
    assert torch.autograd.gradcheck(lambda *t: add_rms_norm(*t, 1e-6)[1], (x, b, w))
    assert torch.autograd.gradcheck(lambda *t: add_rms_norm(*t, 1e-6)[0], (x, b, w))
    total, normed = add_rms_norm(x, b, w, 1e-6)
    assert torch.equal(total, x + b)
    ref = F.rms_norm(x + b, (9,), w, 1e-6)
    assert ((normed - ref).norm() / ref.norm()).item() <= 1e-12


@pytest.mark.parametrize("act", [False, True])
def test_add_norm_conv_act_gradcheck_and_value(act):
    from vig.fused import add_norm_conv_act

    gen = torch.Generator().manual_seed(23)
    x, b = (torch.randn(2, 5, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    wn = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    wc = torch.randn(6, 1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda *t: add_norm_conv_act(t[0], t[1], t[2], 1e-6, t[3], act)  # noqa: E731
    # both outputs used, and each alone (the other's gradient is None)
    assert torch.autograd.gradcheck(f, (x, b, wn, wc))
    assert torch.autograd.gradcheck(lambda *t: f(*t)[1], (x, b, wn, wc))
    assert torch.autograd.gradcheck(lambda *t: f(*t)[0], (x, b, wn, wc))
    total, out = f(x, b, wn, wc)
    assert torch.equal(total, x + b)
    ref = norm_conv_act(x + b, wn, 1e-6, wc, act)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-12
    with pytest.raises(ValueError, match="branch"):
        add_norm_conv_act(x, b[:1], wn, 1e-6, wc, act)


def test_log_gates_pair_gradcheck_and_value():
    from vig.fused import log_gates_pair

    gen = torch.Generator().manual_seed(22)
    z = torch.randn(5, 2, 12, generator=gen, dtype=torch.float64) * 8
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: log_gates_pair(t, 16.0), (z,))
    assert torch.autograd.gradcheck(lambda t: log_gates_pair(t, 16.0)[1], (z,))  # forward gates unused
    fwd, rev = log_gates_pair(z, 16.0)
    assert fwd.is_contiguous() and rev.is_contiguous()
    assert torch.equal(torch.cat([fwd, rev], -1), F.logsigmoid(z) / 16)
    with pytest.raises(ValueError, match="logits"):
        log_gates_pair(z[..., :5], 16.0)


def test_low_rank_log_gates_pair_gradcheck_and_value():
    """The fused gate projection is ``log_gates_pair(Linear(Linear(x)))``: the same value and
    gradients for every input, also when only one direction's gates are used."""
    from vig.fused import log_gates_pair, low_rank_log_gates_pair

    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, 3, 4, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(3, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = (torch.randn(14, 3, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    b1 = torch.randn(14, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda *t: low_rank_log_gates_pair(*t, 16.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w0, w1, b1))
    assert torch.autograd.gradcheck(lambda *t: f(*t)[0], (x, w0, w1, b1))  # reverse gates unused
    fwd, rev = f(x, w0, w1, b1)
    ref_fwd, ref_rev = log_gates_pair(F.linear(F.linear(x, w0), w1, b1), 16.0)
    assert fwd.shape == (2, 3, 4, 7) and fwd.is_contiguous() and rev.is_contiguous()
    assert torch.allclose(fwd, ref_fwd, rtol=1e-12, atol=0) and torch.allclose(rev, ref_rev, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="w1"):
        f(x, w0, w1[:13], b1[:13])


@pytest.mark.parametrize("act", [False, True])
def test_layer_norm_act_gradcheck_and_value(act):
    from vig.fused import layer_norm_act

    gen = torch.Generator().manual_seed(23)
    x = torch.randn(3, 4, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    f = lambda *t: layer_norm_act(*t, 1e-5, act, torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    ref = F.layer_norm(x, (10,), w, b, 1e-5)
    ref = F.silu(ref) if act else ref
    assert ((f(x, w, b) - ref).norm() / ref.norm()).item() <= 1e-12


def test_patch_conv_gradcheck_and_value():
    from vig.fused import patch_conv

    gen = torch.Generator().manual_seed(37)
    x = torch.randn(2, 3, 13, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda *t: patch_conv(*t, 4, 1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    ref = F.conv2d(x, w, b, stride=4, padding=1).permute(0, 2, 3, 1)
    assert ((f(x, w, b) - ref).norm() / ref.norm()).item() <= 1e-12


def test_patch_embed_equals_its_layers_in_sequence():
    """PatchEmbedV2 runs its ``proj`` layers with fused norms: same result as the Sequential."""
    import vig
    from vig.layers import nchw_to_nhwc

    torch.manual_seed(0)
    embed = vig.create_model("vig_tiny", img_size=64, depth=1).patch_embed.double()
    with torch.no_grad():
        for p in embed.parameters():  # non-trivial norm parameters
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref = nchw_to_nhwc(embed.proj(x))
    ours = embed(x)
    assert ours.shape == ref.shape and ours.is_contiguous()
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-12


def test_add_rms_norm_rejects_broadcasting():
    from vig.fused import add_rms_norm

    with pytest.raises(ValueError, match="branch"):
        add_rms_norm(torch.ones(2, 3, 4), torch.ones(1, 3, 4), torch.ones(4), 1e-6)


@pytest.mark.parametrize("shape", [(8192, 5), (3, 4096, 7), (4097, 3), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_weight_gradient_sums_over_rows(shape, dtype):
    """The row sums behind bias and norm-weight gradients (two stages for tall inputs whose row
    count 64 divides, one otherwise): float32 accumulation, float64 kept, against float64."""
    from vig.fused import _sum_to_last

    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64).to(dtype)
    out = _sum_to_last(x)
    ref = x.double().reshape(-1, shape[-1]).sum(0)
    assert out.dtype == torch.promote_types(dtype, torch.float32) and out.shape == (shape[-1],)
    bound = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((out.double() - ref).norm() / ref.norm()).item() <= bound


def _projections_composed(x, w_qkv, kd, wg, bg, w0, w1, b1, normalizer):
    """vig's mixer projections as separate autograd nodes (the form before mixer_projections)."""
    from vig.fused import low_rank_log_gates_pair

    q, k, v = F.linear(x, w_qkv[:kd]), F.linear(x, w_qkv[kd : 2 * kd]), F.linear(x, w_qkv[2 * kd :])
    g_fwd, g_rev = low_rank_log_gates_pair(x, w0, w1, b1, normalizer)
    return q, k, v, g_fwd, g_rev, F.linear(x, wg, bg)


def _projection_inputs(gen, dtype, C=10, kd=3, V=10, R=4, shape=(2, 3, 4)):
    x = torch.randn(*shape, C, generator=gen, dtype=dtype)
    w_qkv = torch.randn(2 * kd + V, C, generator=gen, dtype=dtype)
    wg, bg = torch.randn(V, C, generator=gen, dtype=dtype), torch.randn(V, generator=gen, dtype=dtype)
    w0 = torch.randn(R, C, generator=gen, dtype=dtype)
    w1, b1 = torch.randn(2 * kd, R, generator=gen, dtype=dtype) * 4, torch.randn(2 * kd, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (x, w_qkv, wg, bg, w0, w1, b1)], kd


@pytest.mark.parametrize("used", ["all", "q_and_logits", "gates_only", "reverse_gate_only"])
def test_mixer_projections_gradcheck_and_value(used):
    """One autograd node for the mixer's five projections of its local branch: the values and
    every gradient of the separate projections, also when only some outputs are used (the
    input gradient is then a sum over the used ones only)."""
    from vig.mixer_projections import mixer_projections

    pick = {"all": slice(None), "q_and_logits": [0, 5], "gates_only": [3, 4], "reverse_gate_only": [4]}[used]
    gen = torch.Generator().manual_seed(31)
    (x, w_qkv, wg, bg, w0, w1, b1), kd = _projection_inputs(gen, torch.float64)

    def ours(*t):
        out = mixer_projections(t[0], t[1], kd, *t[2:], 16.0)
        return tuple(out[i] for i in (range(6) if pick == slice(None) else pick))

    inputs = (x, w_qkv, wg, bg, w0, w1, b1)
    assert torch.autograd.gradcheck(ours, inputs)
    outs = mixer_projections(x, w_qkv, kd, wg, bg, w0, w1, b1, 16.0)
    refs = _projections_composed(x, w_qkv, kd, wg, bg, w0, w1, b1, 16.0)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.is_contiguous()
        assert torch.allclose(o, r, rtol=1e-12, atol=1e-12)


def test_mixer_projections_under_bfloat16_autocast():
    """Under autocast the matmuls run in bfloat16 (as the separate projections do), and the
    gradients are as close to float64 ones as the separate projections' are."""
    from vig.mixer_projections import mixer_projections

    gen = torch.Generator().manual_seed(32)
    inputs, kd = _projection_inputs(gen, torch.float32, C=48, kd=16, V=48, R=8, shape=(2, 7, 9))
    seeds = [torch.randn(s, generator=gen) for s in [(2, 7, 9, 16)] * 2 + [(2, 7, 9, 48)] + [(2, 7, 9, 16)] * 2
             + [(2, 7, 9, 48)]]

    def grads(fn, tensors, autocast):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        x, w_qkv, *rest = tensors
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = fn(x, w_qkv, kd, *rest, 16.0)
        loss = sum((o.double() * s.double()).sum() for o, s in zip(outs, seeds))
        loss.backward()
        return [o.detach().double() for o in outs], [t.grad.double() for t in tensors]

    ref_out, ref_grads = grads(_projections_composed, [t.double() for t in inputs], False)
    out, got = grads(mixer_projections, inputs, True)
    base_out, base = grads(_projections_composed, inputs, True)
    assert all(o.dtype == torch.float64 for o in out)
    for name, o, b, r in zip(["x", "qkv_w", "g_w", "g_b", "down", "up", "gate_b"], got, base, ref_grads):
        err = ((o - r).norm() / r.norm()).item()
        base_err = ((b - r).norm() / r.norm()).item()
        assert err == err and err <= max(2 * base_err, 4e-3), (name, err, base_err)
    for o, b, r in zip(out, base_out, ref_out):
        assert ((o - r).norm() / r.norm()).item() <= max(2 * ((b - r).norm() / r.norm()).item(), 4e-3)


def test_mixer_projections_rejects_a_qkv_weight_without_values():
    from vig.mixer_projections import mixer_projections

    gen = torch.Generator().manual_seed(33)
    (x, w_qkv, wg, bg, w0, w1, b1), kd = _projection_inputs(gen, torch.float32)
    with pytest.raises(ValueError, match="qkv_weight"):
        mixer_projections(x, w_qkv[: 2 * kd], kd, wg, bg, w0, w1, b1, 16.0)
    with pytest.raises(ValueError, match="gate_up"):
        mixer_projections(x, w_qkv, kd, wg, bg, w0, w1[:5], b1[:5], 16.0)
