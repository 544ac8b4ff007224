"""vig.weight_casts: the blocks' matmul weights cast for autocast together, with the values
and gradients of per-weight casts, bit for bit."""

import pytest
import torch

import vig
from vig import weight_casts
from vig.weight_casts import autocast_matmul_weights, cast_together


def _weights(gen, shapes, dtype=torch.float32):
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_together_equals_per_weight_casts(dtype):
    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 3), (1,), (2, 5, 3), (4, 1, 3, 3)]
    ws = _weights(gen, shapes)
    refs = [w.detach().clone().requires_grad_() for w in ws]
    cast = cast_together(ws, dtype)
    assert all(c.dtype == dtype and c.shape == w.shape and c.is_contiguous() for c, w in zip(cast, ws))
    assert all(torch.equal(c, r.detach().to(dtype)) for c, r in zip(cast, refs))
    # gradients as low-precision values (what a matmul's backward gives), weights 1 and 3 only
    seeds = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    for out in (cast, [r.to(dtype) for r in refs]):
        ((out[0] * seeds[0]).float().sum() + (out[3] * seeds[3]).float().sum()).backward()
    for w, r in zip(ws, refs):
        expected = torch.zeros_like(w) if r.grad is None else r.grad
        assert w.grad.dtype == torch.float32 and torch.equal(w.grad, expected)
    assert torch.equal(ws[0].grad, seeds[0].float()) and not ws[1].grad.any()


def test_cast_together_rejects_mixed_dtypes_and_passes_no_grad():
    gen = torch.Generator().manual_seed(6)
    a, b = _weights(gen, [(3,), (2,)])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        cast_together([a, b.detach().double()], torch.bfloat16)
    with torch.no_grad():
        out = cast_together([a, b], torch.bfloat16)
    assert not any(o.requires_grad for o in out)
    assert cast_together([], torch.bfloat16) == []


def _model(name):
    torch.manual_seed(0)
    if name == "vig_tiny":
        return vig.create_model(name, num_classes=4, depth=2, embed_dim=48, num_heads=2, img_size=32)
    return vig.create_model(name, num_classes=4, depths=(1, 1, 1, 1), dims=16, num_heads=(1, 1, 2, 2),
                            drop_path_rate=0.0)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_models_cast_together_as_each_module_would(name, monkeypatch):
    """Under bf16 autocast, the model's output and every parameter's gradient are bitwise what
    each module's own casts give (the same matmuls on the same cast values); without
    autocast nothing is cast."""
    model = _model(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = []
    real = weight_casts.cast_together
    monkeypatch.setattr(weight_casts, "cast_together", lambda ws, dtype: calls.append(len(ws)) or real(ws, dtype))
    out, grads = _step(model, x)
    blocks = [m for m in model.modules() if hasattr(m, "matmul_weights") and hasattr(m, "drop_path")]
    assert calls == [sum(len(b.matmul_weights()) for b in blocks)], "one cast for all the blocks' weights"
    module = vig.vig if name == "vig_tiny" else vig.vig_h
    monkeypatch.setattr(module, "autocast_matmul_weights", lambda modules, like: [None] * len(modules))
    ref_out, ref_grads = _step(model, x)
    assert out.dtype == ref_out.dtype and torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert (grads[n] is None) == (ref_grads[n] is None), n
        assert grads[n] is None or (grads[n].dtype == torch.float32 and torch.equal(grads[n], ref_grads[n])), n
    assert autocast_matmul_weights(blocks, x) == [None] * len(blocks)  # autocast off


def test_autocast_matmul_weights_leaves_low_precision_models_alone():
    model = _model("vig_tiny").to(torch.bfloat16)
    x = torch.randn(1, 3, 32, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_matmul_weights(list(model.blocks), x) == [None] * len(model.blocks)
