"""The on/off environment switches (GLAKERNELS_CHECK, GLAKERNELS_EAGER_CUSTOM_OP) read alike,
and a value that is neither on nor off is an error, not a guess."""

import pytest

from gla_testing import Case, make_inputs
from glakernels import gated_linear_attention
from glakernels._eager import ENV_FORCE_CUSTOM_OP
from glakernels._env import env_flag
from glakernels._value_checks import ENV_CHECK


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), (" YES ", True), ("On", True),
                                       ("0", False), ("false", False), ("no", False), ("OFF", False)])
def test_env_flag_words(value, on, monkeypatch):
    monkeypatch.setenv("GLAKERNELS_TEST_SWITCH", value)
    assert env_flag("GLAKERNELS_TEST_SWITCH") is on


@pytest.mark.parametrize("default", [False, True])
def test_env_flag_unset_or_empty_is_the_default(default, monkeypatch):
    monkeypatch.delenv("GLAKERNELS_TEST_SWITCH", raising=False)
    assert env_flag("GLAKERNELS_TEST_SWITCH", default=default) is default
    monkeypatch.setenv("GLAKERNELS_TEST_SWITCH", " ")
    assert env_flag("GLAKERNELS_TEST_SWITCH", default=default) is default
    assert env_flag("GLAKERNELS_TEST_SWITCH") is False  # (off unless a switch says otherwise)


@pytest.mark.parametrize("variable", [ENV_CHECK, ENV_FORCE_CUSTOM_OP])
def test_switches_reject_unknown_values_naming_the_variable(variable, monkeypatch):
    monkeypatch.setenv(variable, "enabled")
    with pytest.raises(ValueError, match=f"environment variable {variable} must be one of .*got 'enabled'"):
        gated_linear_attention(**make_inputs(Case(1, 4, 1, 2, 3)), backend="torch")


def test_false_means_off_for_the_custom_op_switch(monkeypatch):
    """``GLAKERNELS_EAGER_CUSTOM_OP=false`` keeps the fast path (it once turned the custom op on)."""
    x = {n: t.requires_grad_() for n, t in make_inputs(Case(1, 5, 1, 3, 4)).items()}
    monkeypatch.setenv(ENV_FORCE_CUSTOM_OP, "false")
    assert type(gated_linear_attention(**x, backend="torch").grad_fn).__name__ == "EagerGLABackward"
    monkeypatch.setenv(ENV_FORCE_CUSTOM_OP, "true")
    assert type(gated_linear_attention(**x, backend="torch").grad_fn).__name__ != "EagerGLABackward"
