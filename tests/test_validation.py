"""DESIGN.md §9: every bad input gets a ValueError/TypeError naming the argument and what was
expected, before any kernel runs. One test case per bad input."""

import re

import pytest
import torch

import glakernels
from gla_testing import temporary_backend
from glakernels import BackendNotSupportedError, gated_linear_attention
from backends_for_tests import RecordingBackend

B, T, H, K, V = 2, 5, 3, 4, 6


def good(**overrides):
    args = {
        "q": torch.randn(B, T, H, K),
        "k": torch.randn(B, T, H, K),
        "v": torch.randn(B, T, H, V),
        "g": -torch.rand(B, T, H, K),
    }
    args.update(overrides)
    return args


BAD_INPUTS = {
    # name: (arguments, expected exception, regex the message must match)
    "q-not-tensor": (good(q=[[1.0]]), TypeError, r"q must be a torch\.Tensor, got list"),
    "v-not-tensor": (good(v=None), TypeError, r"v must be a torch\.Tensor"),
    "q-integer": (good(q=torch.ones(B, T, H, K, dtype=torch.int64)), TypeError, r"q has dtype int64; expected a floating dtype"),
    "g-bool": (good(g=torch.zeros(B, T, H, K, dtype=torch.bool)), TypeError, r"g has dtype bool"),
    "q-complex": (good(q=torch.randn(B, T, H, K, dtype=torch.complex64)), TypeError, r"q has dtype complex64"),
    "q-rank-3": (good(q=torch.randn(B, T, H * K)), ValueError, r"q must have 4 dimensions \[batch, time, heads, head_dim_k\], got 3"),
    "v-rank-5": (good(v=torch.randn(B, T, H, V, 1)), ValueError, r"v must have 4 dimensions \[batch, time, heads, head_dim_v\]"),
    "k-batch-mismatch": (good(k=torch.randn(B + 1, T, H, K)), ValueError, r"k must have shape \[B, T, H, K\] = \(2, 5, 3, 4\).*got \(3, 5, 3, 4\)"),
    "k-head-dim-mismatch": (good(k=torch.randn(B, T, H, K + 1)), ValueError, r"k must have shape \[B, T, H, K\]"),
    "v-time-mismatch": (good(v=torch.randn(B, T + 1, H, V)), ValueError, r"v must have shape \[B, T, H, V\] = \(2, 5, 3, 6\)"),
    "v-heads-mismatch": (good(v=torch.randn(B, T, H + 1, V)), ValueError, r"v must have shape \[B, T, H, V\]"),
    "g-shape-mismatch": (good(g=torch.randn(B, T, H, 1)), ValueError, r"g must have shape \[B, T, H, K\]"),
    "zero-time": (good(q=torch.randn(B, 0, H, K), k=torch.randn(B, 0, H, K), v=torch.randn(B, 0, H, V), g=torch.randn(B, 0, H, K)), ValueError, r"q has time size 0"),
    "zero-head-dim-v": (good(v=torch.randn(B, T, H, 0)), ValueError, r"v has head_dim_v size 0"),
    "mixed-dtypes": (good(k=torch.randn(B, T, H, K, dtype=torch.float64)), TypeError, r"k has dtype float64 but q has float32"),
    "mixed-dtypes-gate": (good(g=torch.randn(B, T, H, K, dtype=torch.bfloat16)), TypeError, r"g has dtype bfloat16 but q has float32"),
    "mixed-devices": (good(v=torch.randn(B, T, H, V, device="meta")), ValueError, r"v is on device meta but q is on cpu"),
    "bidirectional-not-bool": (good(bidirectional="yes"), TypeError, r"bidirectional must be a bool, got str"),
    "g-reverse-with-causal": (good(bidirectional=False, g_reverse=torch.randn(B, T, H, K)), ValueError, r"g_reverse was given with bidirectional=False"),
    "g-reverse-shape": (good(g_reverse=torch.randn(B, T, H, K + 2)), ValueError, r"g_reverse must have shape \[B, T, H, K\]"),
    "g-reverse-dtype": (good(g_reverse=torch.randn(B, T, H, K, dtype=torch.float16)), TypeError, r"g_reverse has dtype float16 but q has float32"),
    "g-reverse-not-tensor": (good(g_reverse=1.0), TypeError, r"g_reverse must be a torch\.Tensor"),
    "initial-state-with-bidirectional": (good(initial_state=torch.zeros(B, H, K, V)), ValueError, r"initial_state and output_final_state are causal-only"),
    "final-state-with-bidirectional": (good(output_final_state=True), ValueError, r"causal-only.*output_final_state=True"),
    "initial-state-shape": (good(bidirectional=False, initial_state=torch.zeros(B, H, V, K)), ValueError, r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 4, 6\)"),
    "initial-state-integer": (good(bidirectional=False, initial_state=torch.zeros(B, H, K, V, dtype=torch.int32)), TypeError, r"initial_state has dtype int32"),
    "initial-state-bfloat16": (good(bidirectional=False, initial_state=torch.zeros(B, H, K, V, dtype=torch.bfloat16)), TypeError, r"initial_state has dtype bfloat16; expected float32 or float64"),
    "initial-state-device": (good(bidirectional=False, initial_state=torch.zeros(B, H, K, V, device="meta")), ValueError, r"initial_state is on device meta"),
    "output-final-state-not-bool": (good(bidirectional=False, output_final_state=1), TypeError, r"output_final_state must be a bool, got int"),
    "scale-not-number": (good(scale="0.5"), TypeError, r"scale must be a real number or None, got str"),
    "scale-nan": (good(scale=float("nan")), ValueError, r"scale must be finite"),
    "scale-bool": (good(scale=True), TypeError, r"scale must be a real number"),
    "backend-unknown": (good(backend="no-such-backend"), ValueError, r"unknown backend 'no-such-backend' \(chosen by the backend= argument\); registered backends: .*torch"),
    "backend-not-str": (good(backend=3), TypeError, r"backend must be a backend name \(str\) or None, got int"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises(case):
    args, exc, pattern = BAD_INPUTS[case]
    with pytest.raises(exc, match=pattern):
        gated_linear_attention(**args)


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if "backend" not in c], ids=[c for c in BAD_INPUTS if "backend" not in c])
def test_bad_input_raises_before_any_kernel(case):
    """The checks run before dispatch: a backend asked for by name never sees bad input."""
    args, exc, _ = BAD_INPUTS[case]
    with temporary_backend(RecordingBackend("recorder")) as backend:
        with pytest.raises(exc):
            gated_linear_attention(**args, backend="recorder")
    assert backend.calls == []


def test_head_dim_above_backend_limit():
    with temporary_backend(RecordingBackend("small", max_head_dim_k=16, max_head_dim_v=16)):
        args = good(q=torch.randn(B, T, H, 32), k=torch.randn(B, T, H, 32), g=-torch.rand(B, T, H, 32))
        with pytest.raises(BackendNotSupportedError, match=r"backend 'small' .* head_dim_k=32 above this backend's limit 16.*Backends that can: [\w, -]*\btorch\b"):
            gated_linear_attention(**args, backend="small")
        args = good(v=torch.randn(B, T, H, 17))
        with pytest.raises(ValueError, match=r"head_dim_v=17 above this backend's limit 16"):
            gated_linear_attention(**args, backend="small")


def test_value_checks_are_opt_in(monkeypatch):
    nan_q = good()
    nan_q["q"][0, 0, 0, 0] = float("nan")
    positive_gate = good(g=torch.rand(B, T, H, K))
    monkeypatch.delenv("GLAKERNELS_CHECK", raising=False)
    gated_linear_attention(**positive_gate)  # no host synchronisation, no check
    gated_linear_attention(**nan_q)
    monkeypatch.setenv("GLAKERNELS_CHECK", "1")
    with pytest.raises(ValueError, match=r"q contains NaN or infinite values \(GLAKERNELS_CHECK=1"):
        gated_linear_attention(**nan_q)
    with pytest.raises(ValueError, match=r"g has positive entries .* must be <= 0"):
        gated_linear_attention(**positive_gate)
    with pytest.raises(ValueError, match=r"g_reverse has positive entries"):
        gated_linear_attention(**good(g_reverse=torch.rand(B, T, H, K)))
    inf_state = torch.zeros(B, H, K, V)
    inf_state[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"initial_state contains NaN or infinite"):
        gated_linear_attention(**good(bidirectional=False, initial_state=inf_state))
    gated_linear_attention(**good())  # valid inputs still pass with checks on


def test_error_messages_name_no_internal_names():
    """Errors read as user-facing text: the argument name first, no 'assert'."""
    for args, exc, _ in BAD_INPUTS.values():
        with pytest.raises(exc) as info:
            gated_linear_attention(**args)
        assert not isinstance(info.value, AssertionError)
        assert re.match(r"^(\w+|unknown backend|initial_state and)", str(info.value)), str(info.value)


def test_public_api_is_small():
    assert set(glakernels.__all__) == {
        "gated_linear_attention", "available_backends", "use_backend", "BackendNotSupportedError", "__version__"
    }


def test_numpy_bools_are_bools():
    """Flags often come out of numpy (configs, sweeps): numpy.bool_ counts as a bool; the error
    for anything else names the type in full."""
    np = pytest.importorskip("numpy")
    inputs = good()
    expected = gated_linear_attention(**inputs, bidirectional=False, backend="torch")
    got = gated_linear_attention(**inputs, bidirectional=np.bool_(False), backend="torch")
    assert torch.equal(got, expected)
    with pytest.raises(TypeError, match=r"bidirectional must be a bool, got numpy.int64"):
        gated_linear_attention(**good(bidirectional=np.int64(1)))
