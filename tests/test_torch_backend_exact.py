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
