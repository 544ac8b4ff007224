"""The chunked ``torch`` backend against the independent quadratic formula in float64, so the
backend is anchored to two formulations, not only to the recurrence it is usually compared with."""

import pytest
import torch

from gla_testing import Case, assert_close, make_inputs, outputs_and_grads, quadratic_gla
from glakernels import gated_linear_attention

CASES = [
    Case(2, 37, 2, 5, 7, torch.float64, gates="extreme"),
    Case(1, 64, 1, 16, 8, torch.float64, gates="strong"),
    Case(1, 33, 2, 3, 9, torch.float64, bidirectional=False, states=True, gates="extreme"),
    Case(1, 1, 1, 2, 2, torch.float64, bidirectional=False, states=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id("torch"))
def test_torch_backend_matches_quadratic_formula(case):
    inputs = make_inputs(case, seed=7)
    kwargs = {"bidirectional": case.bidirectional}
    if case.states:
        kwargs["output_final_state"] = True
    got, cot = outputs_and_grads(gated_linear_attention, inputs, None, backend="torch", **kwargs)
    expected, _ = outputs_and_grads(quadratic_gla, inputs, cot, **kwargs)
    assert_close(got, expected, 1e-10, case.id("torch"))


@pytest.mark.parametrize("mode", ["bi", "causal-state"])
def test_one_sequence_at_a_time_path(mode, monkeypatch):
    """Every device runs the batch one sequence per call (for bitwise batch invariance): the
    same results as the quadratic formula, and a sequence's results bitwise the same alone and
    inside the batch."""
    import glakernels.backends.pytorch as torch_backend

    calls = []
    for method in ("_forward", "_backward"):
        original = getattr(torch_backend.TorchBackend, method)
        monkeypatch.setattr(torch_backend.TorchBackend, method,
                            lambda self, inputs, *rest, _original=original: calls.append(inputs.spec.batch)
                            or _original(self, inputs, *rest))
    case = Case(3, 21, 2, 4, 5, torch.float64, bidirectional=mode == "bi", states=mode != "bi", gates="strong")
    inputs = make_inputs(case, seed=8)
    kwargs = {"bidirectional": case.bidirectional}
    if case.states:
        kwargs["output_final_state"] = True
    got, cot = outputs_and_grads(gated_linear_attention, inputs, None, backend="torch", **kwargs)
    assert calls == [1] * 6, calls  # forward and backward, each split into 3 sequences
    expected, _ = outputs_and_grads(quadratic_gla, inputs, cot, **kwargs)
    assert_close(got, expected, 1e-10, case.id("torch") + "-one-at-a-time")
    single, _ = outputs_and_grads(gated_linear_attention, {n: x[1:2] for n, x in inputs.items()},
                                  [c[1:2] for c in cot], backend="torch", **kwargs)
    for name, value in single.items():
        assert torch.equal(got[name][1:2], value), name
