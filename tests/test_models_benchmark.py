"""benchmarks/models_gpu.py's ``--triton-config``: the model benchmark's way to A/B a kernel
setting from one tree. It must reach the kernels' launch config and reject what it cannot apply."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("triton")
from glakernels.backends.triton import launch  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "models_gpu.py"


@pytest.fixture(scope="module")
def models_gpu():
    spec = importlib.util.spec_from_file_location("models_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look modules up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_triton_config_reaches_the_launch_config(models_gpu):
    default = launch.choose_config(196, 32, 64)
    assert default.single_pass_ratio and default.single_pass_chunk == 16
    with models_gpu.triton_overrides("single_pass_ratio=False, single_pass_chunk=32"):
        inside = launch.choose_config(196, 32, 64)
    assert (inside.single_pass_ratio, inside.single_pass_chunk) == (False, 32)
    assert launch.choose_config(196, 32, 64) == default  # and only while the rows run


def test_empty_triton_config_changes_nothing(models_gpu):
    with models_gpu.triton_overrides(" "):
        assert launch._overrides == {}


@pytest.mark.parametrize("text, named", [
    ("no_such_field=1", "no_such_field=1"),
    ("single_pass_ratio", "single_pass_ratio"),
    ("single_pass_ratio=Flase", "Flase"),
])
def test_bad_triton_config_is_refused_before_any_row(models_gpu, text, named):
    with pytest.raises(ValueError, match=named):
        models_gpu.triton_overrides(text)


def test_bad_triton_config_is_a_usage_error(models_gpu, capsys):
    with pytest.raises(SystemExit) as exit_info:
        models_gpu.main(["--device", "cpu", "--tiny", "--models", "ViG-T", "--triton-config", "chunk_size=8"])
    assert exit_info.value.code == 2
    assert "--triton-config" in capsys.readouterr().err
