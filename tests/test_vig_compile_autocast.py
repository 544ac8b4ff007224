"""ViG / ViG-H / DiG under ``torch.compile(fullgraph=True)`` and under autocast.

On CPU the graphs are captured whole (``fullgraph=True``: no graph break anywhere, the op
included) and run through ``aot_eager`` — tracing, not code generation, is what can break, and
it keeps CI fast. The GPU test compiles with inductor."""

import pytest
import torch

import vig
from gla_testing import compile_recording_targets


def _small(name):
    torch.manual_seed(0)
    if name == "vig_tiny":
        return vig.create_model(name, num_classes=4, depth=2, embed_dim=48, num_heads=2, img_size=48)
    if name == "vig_h_tiny":
        return vig.create_model(name, num_classes=4, depths=(1, 1, 1, 1), dims=16, num_heads=(1, 1, 2, 2),
                                drop_path_rate=0.0)  # stochastic depth would differ between two calls
    return vig.create_model(name, hidden_size=32, depth=2, num_heads=2, input_size=8, num_classes=5)


def _inputs(name, batch=2, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    if name.startswith("dig"):
        x = torch.randn(batch, 4, 8, 8, generator=gen)
        return (x.to(device), torch.tensor([3, 700][:batch], device=device), torch.tensor([1, 4][:batch], device=device))
    return (torch.randn(batch, 3, 48, 48, generator=gen).to(device),)


def _randomize_zero_inits(model):
    # adaLN-Zero and zero output layers make an untrained DiG constant: give every weight a value
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny", "dig_s_2"])
def test_fullgraph_compile_forward_backward_matches_eager(name):
    model = _small(name)
    _randomize_zero_inits(model)
    args = _inputs(name)
    eager = model(*args)
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    out.square().mean().backward()
    assert _rel(out, eager) <= 1e-5
    assert set(eager_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in eager_grads:
            assert _rel(p.grad, eager_grads[n]) <= 1e-4, n


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny", "dig_s_2"])
def test_bfloat16_autocast_close_to_float32(name):
    model = _small(name).eval()
    _randomize_zero_inits(model)
    args = _inputs(name)
    with torch.no_grad():
        reference = model(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(*args)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert _rel(low, reference) <= 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_inductor_compile_bf16_on_cuda(name):
    model = _small(name).cuda()
    args = _inputs(name, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(*args)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(*args)
        out.float().square().mean().backward()
    assert _rel(out, eager) <= 2e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name, min_kernels", [("vig_tiny", 10), ("vig_h_tiny", 10), ("dig_s_2", 1)])
def test_compile_keeps_vig_kernels_on_cuda(name, min_kernels):
    """Under torch.compile on CUDA, vig's Triton kernels (DiG: the op's) are recorded in the
    graph (Inductor launches them) instead of their PyTorch forms, and the compiled forward
    and gradients match eager ones (bf16 autocast)."""
    torch.manual_seed(0)
    model = _small(name).cuda()
    _randomize_zero_inits(model)
    args = _inputs(name, device="cuda")
    params = list(model.parameters())

    def step(fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(*args)
        out.float().square().mean().backward()
        return out.detach().float(), torch.cat([p.grad.flatten().float() for p in params if p.grad is not None])

    eager_out, eager_grads = step(model)
    compiled, targets = compile_recording_targets(model)
    step(compiled)
    assert sum("triton_kernel" in t for t in targets) >= min_kernels, "vig's kernels were not traced"
    torch._dynamo.reset()
    out, grads = step(torch.compile(model, fullgraph=True))
    assert _rel(out, eager_out) <= 2e-2
    assert _rel(grads, eager_grads) <= 2e-2
