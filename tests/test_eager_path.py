"""The eager fast path (glakernels/_eager.py): plain eager calls bypass the custom op, give the
same results bit for bit, and every context that must see the custom op still sees it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gla_testing import Case, backend_params, make_inputs, outputs_and_grads
from glakernels import gated_linear_attention
from glakernels._eager import ENV_FORCE_CUSTOM_OP

BACKENDS = backend_params()


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _leaves(case, device="cpu", seed=0):
    return {n: x.requires_grad_() for n, x in make_inputs(case, device, seed).items()}


def test_plain_eager_call_takes_the_fast_path(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_CUSTOM_OP, raising=False)
    x = _leaves(Case(1, 5, 1, 3, 4))
    assert type(gated_linear_attention(**x, backend="torch").grad_fn).__name__ == "EagerGLABackward"
    monkeypatch.setenv(ENV_FORCE_CUSTOM_OP, "1")
    assert "EagerGLA" not in type(gated_linear_attention(**x, backend="torch").grad_fn).__name__


def test_dispatch_mode_sees_the_custom_ops(monkeypatch):
    """FakeTensorMode, FlopCounterMode and the like must see one op, not the kernels behind it."""
    monkeypatch.delenv(ENV_FORCE_CUSTOM_OP, raising=False)
    x = _leaves(Case(1, 5, 1, 3, 4))
    with _RecordOps() as mode:
        gated_linear_attention(**x, backend="torch").sum().backward()
    assert "glakernels.gla_forward.default" in mode.names, mode.names
    assert "glakernels.gla_backward.default" in mode.names, mode.names


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("mode", ["bi", "causal-state"])
def test_fast_path_matches_custom_op_bitwise(backend_device, mode, monkeypatch):
    name, device = backend_device
    case = Case(2, 19, 2, 5, 7, torch.float32, bidirectional=mode == "bi", states=mode != "bi", gates="strong")
    inputs = make_inputs(case, device, seed=4)
    kwargs = dict(bidirectional=case.bidirectional, backend=name)
    if case.states:
        kwargs["output_final_state"] = True
    results = {}
    for force in ("0", "1"):
        monkeypatch.setenv(ENV_FORCE_CUSTOM_OP, force)
        results[force], _ = outputs_and_grads(gated_linear_attention, inputs, None, **kwargs)
    assert set(results["0"]) == set(results["1"])
    for key, fast in results["0"].items():
        assert torch.equal(fast, results["1"][key]), f"{name}: {key} differs between the two paths"


@pytest.mark.parametrize("force", ["0", "1"])
def test_double_backward_raises_on_both_paths(force, monkeypatch):
    monkeypatch.setenv(ENV_FORCE_CUSTOM_OP, force)
    x = _leaves(Case(1, 4, 1, 2, 3, torch.float64))
    out = gated_linear_attention(**x, backend="torch")
    (dq,) = torch.autograd.grad(out.sum(), x["q"], create_graph=True)
    # the gradient must carry a graph (whose backward raises), not come back as a constant
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="gla_backward|double backward"):
        torch.autograd.grad(dq.sum(), x["k"])


@pytest.mark.parametrize("force", ["0", "1"])
def test_gradient_penalty_is_never_silently_dropped(force, monkeypatch):
    """A gradient penalty (``loss + |grad(loss, q)|²`` with ``create_graph=True``) needs the
    op's second derivative, which it does not have: the second backward must raise rather than
    leave out the penalty's contribution."""
    monkeypatch.setenv(ENV_FORCE_CUSTOM_OP, force)
    x = _leaves(Case(1, 4, 1, 2, 3, torch.float64))
    loss = gated_linear_attention(**x, backend="torch").square().sum()
    (dq,) = torch.autograd.grad(loss, x["q"], create_graph=True)
    with pytest.raises(RuntimeError, match="gla_backward|double backward"):
        (loss + dq.square().sum()).backward()


def test_first_order_gradients_under_create_graph_are_unchanged(monkeypatch):
    """``create_graph=True`` alone (no second backward) still gives the plain gradients."""
    monkeypatch.delenv(ENV_FORCE_CUSTOM_OP, raising=False)
    x = _leaves(Case(1, 5, 1, 3, 4, torch.float64))
    out = gated_linear_attention(**x, backend="torch")
    plain = torch.autograd.grad(out.sum(), list(x.values()), retain_graph=True)
    graphed = torch.autograd.grad(out.sum(), list(x.values()), create_graph=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())


def test_fast_path_under_no_grad_and_inference_mode(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_CUSTOM_OP, raising=False)
    x = make_inputs(Case(1, 6, 2, 3, 4), seed=5)
    expected = gated_linear_attention(**x, backend="torch")
    with torch.no_grad():
        assert torch.equal(gated_linear_attention(**x, backend="torch"), expected)
    with torch.inference_mode():
        assert torch.equal(gated_linear_attention(**x, backend="torch"), expected)


def test_calls_wanting_no_gradient_skip_the_autograd_function(monkeypatch):
    """Under ``no_grad``, ``inference_mode``, or with no input requiring grad, the fast path runs
    the backend's forward without ``EagerGLA`` (its host time buys nothing there), with the same
    bits as a call that records the graph."""
    from glakernels import _eager

    monkeypatch.delenv(ENV_FORCE_CUSTOM_OP, raising=False)
    x = make_inputs(Case(1, 6, 2, 3, 4, bidirectional=False, states=True), seed=6)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    recorded, recorded_state = gated_linear_attention(**leaves, bidirectional=False, output_final_state=True,
                                                      backend="torch")
    assert type(recorded.grad_fn).__name__ == "EagerGLABackward"

    def refuse(*args):
        raise AssertionError("EagerGLA.apply ran for a call that wants no gradient")

    monkeypatch.setattr(_eager.EagerGLA, "apply", refuse)
    for context in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        inputs = leaves if context is not torch.enable_grad else x  # enable_grad: no input requires grad
        with context():
            o, state = gated_linear_attention(**inputs, bidirectional=False, output_final_state=True, backend="torch")
        assert o.grad_fn is None and not o.requires_grad
        assert torch.equal(o, recorded.detach()) and torch.equal(state, recorded_state.detach())
