"""The specification itself: the recurrent reference against the independent quadratic
formula, in float64, outputs and gradients. Trust starts here."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gla_testing import GATE_REGIMES, Case, assert_close, make_inputs, outputs_and_grads, quadratic_gla
from glakernels.reference import gated_linear_attention_reference

FLOAT64_BOUND = 1e-10  # DESIGN.md §3

CASES = [
    Case(1, 1, 1, 1, 1, torch.float64),
    Case(2, 23, 2, 5, 7, torch.float64),
    Case(1, 40, 3, 17, 33, torch.float64, gates="extreme"),
    Case(2, 31, 1, 8, 4, torch.float64, gates="strong"),
    Case(1, 29, 2, 6, 3, torch.float64, bidirectional=False, states=True),
    Case(1, 33, 2, 4, 5, torch.float64, bidirectional=False, states=True, gates="extreme"),
    Case(2, 17, 2, 3, 3, torch.float64, bidirectional=False, gates="none"),
    Case(1, 25, 1, 4, 4, torch.float64, separate_reverse_gate=False),
]


def _compare(case: Case, seed: int) -> None:
    inputs = make_inputs(case, seed=seed)
    kwargs = {"bidirectional": case.bidirectional}
    if case.states:
        kwargs["output_final_state"] = True
    got, cot = outputs_and_grads(gated_linear_attention_reference, inputs, None, **kwargs)
    expected, _ = outputs_and_grads(quadratic_gla, inputs, cot, **kwargs)
    assert_close(got, expected, FLOAT64_BOUND, "reference vs quadratic " + case.id())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id("reference"))
def test_reference_matches_quadratic_formula(case):
    _compare(case, seed=0)


@given(
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    H=st.integers(1, 2),
    K=st.integers(1, 9),
    V=st.integers(1, 9),
    mode=st.sampled_from(["bi", "causal", "causal-state"]),
    gates=st.sampled_from(GATE_REGIMES),
    seed=st.integers(0, 2**31 - 1),
)
def test_reference_matches_quadratic_formula_drawn(B, T, H, K, V, mode, gates, seed):
    case = Case(B, T, H, K, V, torch.float64, bidirectional=mode == "bi", states=mode == "causal-state", gates=gates)
    _compare(case, seed)


def test_reference_hard_reset_forgets_the_past():
    """A gate of -1e4 at step r makes the state k_r v_rᵀ exactly: outputs from r on equal a run
    that starts at r."""
    case = Case(1, 30, 2, 4, 5, torch.float64, bidirectional=False)
    x = make_inputs(case, seed=3)
    r = 11
    x["g"][:, r] = -1e4
    full = gated_linear_attention_reference(**x, bidirectional=False)
    tail = gated_linear_attention_reference(**{n: t[:, r:] for n, t in x.items()}, bidirectional=False)
    torch.testing.assert_close(full[:, r:], tail, rtol=0, atol=1e-12)
