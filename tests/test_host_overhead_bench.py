"""benchmarks/host_overhead.py's ``--layers`` split, run on the CPU with the torch backend:
its three calls must run, and the backend's kernels must be its own again afterwards."""

from __future__ import annotations

import importlib.util
import pathlib

import torch

from glakernels import gated_linear_attention
from glakernels._dispatch import get_backend
from glakernels.bench import Shape, random_inputs

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"


def _script():
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_times_restores_the_backend(monkeypatch):
    script = _script()
    # each layer's call runs once (its time is not what this checks)
    monkeypatch.setattr(script, "host_time", lambda fn, calls=300, device="cuda": (fn(), 1e-6)[1])
    x = random_inputs(Shape("tiny", 1, 5, 1, 4, 6), torch.float32, "cpu", requires_grad=True)
    backend = get_backend("torch")
    times = script.layer_times("torch", x, "cpu")
    assert set(times) == {"bare Function", "op, no kernels", "op", "op, backward on this thread"}
    assert "forward" not in vars(backend) and "backward" not in vars(backend)
    # and the op computes again after the fake kernels were swapped out
    out = gated_linear_attention(**x, backend="torch")
    assert not torch.equal(out, torch.zeros_like(out))
