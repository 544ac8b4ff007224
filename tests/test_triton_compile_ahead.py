"""The triton backend compiles its backward's kernels while the forward runs
(``backends/triton/compile_ahead.py``): the launches it records must be the backward's own,
and the backward must then find every kernel compiled. On this CPU machine the checks compile
for sm_90 through a stand-in driver, in a fresh Python without Triton's interpreter (whose
kernels are never compiled); on a GPU, for real."""

import importlib.util
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_STAND_IN_DRIVER = r"""
import sys, threading
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction


class Sm90:  # what compiling for sm_90 asks of the driver; no GPU is touched
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


triton.runtime.driver.set_active(Sm90())
from glakernels.backends.triton import compile_ahead, launch
from glakernels.bench import Shape, random_inputs


def call(b, t, h, k, v, bidirectional, states, dtype=torch.bfloat16):
    x = random_inputs(Shape("case", b, t, h, k, v), dtype, "cpu", bidirectional=bidirectional)
    h0 = torch.randn(b, h, k, v) if states else None
    return (x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), h0), k ** -0.5, bidirectional, states
"""

_RECORD_CHECK = _STAND_IN_DRIVER + r"""
def summary(kernel, grid, args, kwargs):
    # what Triton specialises a launch on: tensors by dtype and 16-byte alignment, every
    # other argument by value; and the launch's grid and keyword arguments
    args = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args)
    return kernel.fn.__name__, tuple(grid), args, tuple(sorted(kwargs.items()))


real = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: real.append(summary(self, grid, args, kwargs))
cases = {"short bidirectional": call(2, 196, 3, 32, 64, True, False),
         "long causal with states": call(1, 600, 2, 32, 64, False, True),
         "long bidirectional, wide heads": call(1, 520, 1, 100, 72, True, False, torch.float16)}
for name, (args, scale, bidirectional, states) in cases.items():
    q, v = args[0], args[2]
    B, T, H, K = q.shape
    dht = torch.randn(B, H, K, v.shape[-1]) if states else None
    recorded = []
    out = launch.backward(*args, torch.empty(B, T, H, v.shape[-1], dtype=q.dtype, device="meta"),
                          None if dht is None else dht.to("meta"), scale, bidirectional, _record=recorded)
    metas = sorted({t.device.type for t in out if t is not None})
    real.clear()
    launch.backward(*args, torch.randn(B, T, H, v.shape[-1], dtype=q.dtype), dht, scale, bidirectional)
    same = [summary(*r) for r in recorded] == real
    print(name, len(recorded), "launches", "same" if same else f"differ: {[summary(*r) for r in recorded]} {real}",
          "outputs on", *metas)
"""

_COMPILE_CHECK = _STAND_IN_DRIVER + r"""
compiles = []
do_compile = JITFunction._do_compile
def counted(self, *args, **kwargs):
    compiles.append(threading.current_thread().name)
    return do_compile(self, *args, **kwargs)
JITFunction._do_compile = counted

args, scale, bidirectional, states = call(2, 196, 3, 32, 64, True, False)
compile_ahead.start(*args, scale, bidirectional, states)
compile_ahead.start(*args, scale, bidirectional, states)  # the same call again: nothing more
compile_ahead.wait()
print("ahead:", *compiles)
del compiles[:]
launched = []
run = JITFunction.run
def found_or_compiled(self, *a, grid, warmup, **kw):  # the launch, up to finding (or compiling) its kernel
    launched.append(self.fn.__name__)
    return run(self, *a, grid=grid, warmup=True, **kw)
JITFunction.run = found_or_compiled
launch.backward(*args, torch.randn_like(args[2]), None, scale, bidirectional)
print("backward:", len(launched), "launches,", len(compiles), "compiles", flush=True)
"""

_EXIT_CHECK = _STAND_IN_DRIVER + r"""
args, scale, bidirectional, states = call(2, 196, 3, 32, 64, True, False)
compile_ahead.start(*args, scale, bidirectional, states)
print("compiling:", sum(thread.is_alive() for thread in compile_ahead._pending), flush=True)
# and out, with no backward: the compiles finish first
"""


def _run(script: str, tmp_path) -> str:
    """stdout of ``script`` in a fresh Python without the interpreter and with an empty
    Triton cache (so a kernel found in the cache was compiled in this run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_recorded_backward_launches_are_the_backwards_own(tmp_path):
    """``launch.backward`` with ``_record`` makes the very launches (kernel, grid, arguments as
    Triton specialises them, options) that the real backward makes — single-pass, long with
    boundary states, two-phase — and allocates its outputs on the ``meta`` device only."""
    lines = _run(_RECORD_CHECK, tmp_path).strip().splitlines()
    assert lines == ["short bidirectional 2 launches same outputs on meta",
                     "long causal with states 4 launches same outputs on meta",
                     "long bidirectional, wide heads 3 launches same outputs on meta"], lines


def test_backward_finds_the_kernels_compiled_ahead(tmp_path):
    """After ``start`` and ``wait`` the backward's launches compile nothing: the compiles ran
    in the background threads (pass A and pass B, each once however often ``start`` is called)."""
    lines = _run(_COMPILE_CHECK, tmp_path).strip().splitlines()
    assert lines == ["ahead: glakernels-compile-ahead glakernels-compile-ahead",
                     "backward: 2 launches, 0 compiles"], lines


def test_a_process_that_skips_the_backward_exits_cleanly(tmp_path):
    """A forward whose backward never runs (a model evaluated without ``torch.no_grad``) leaves
    its compiles running; the process waits for them at exit, exits with status 0 (daemon
    threads once aborted it there: compile_ahead's docstring) and leaves the two kernels in
    Triton's cache. Each run here checks one exit; the abort hit about 1 in 12."""
    lines = _run(_EXIT_CHECK, tmp_path).strip().splitlines()
    assert lines == ["compiling: 2"], lines
    compiled = sorted(path.name for path in (tmp_path / "triton-cache").rglob("*.cubin"))
    assert compiled == ["_gla_bwd_single_pass_kernel.cubin"] * 2, compiled


def _recording_stand_in(monkeypatch, kernels):
    """Compiling ahead switched on by default, nothing started yet, and ``launch.backward``
    replaced by one that records ``kernels`` (launches with no arguments)."""
    from glakernels.backends.triton import compile_ahead, launch

    monkeypatch.delenv(compile_ahead.ENV_SWITCH, raising=False)
    monkeypatch.setattr(compile_ahead, "_started", set())
    monkeypatch.setattr(compile_ahead, "_pending", [])
    monkeypatch.setattr(launch, "backward", lambda *args, _record, **kwargs: _record.extend(
        (kernel, (1,), (), {}) for kernel in kernels))
    return compile_ahead


class _SlowKernel:
    def __init__(self, error=None):
        self.error, self.compiled = error, False

    def warmup(self, *args, grid, **kwargs):
        time.sleep(0.3)
        if self.error is not None:
            raise self.error
        self.compiled = True


def test_compiling_ahead_is_on_unless_switched_off(monkeypatch):
    """On by default; ``0`` or ``off`` switches it off; a value that is neither is an error."""
    kernel = _SlowKernel()
    compile_ahead = _recording_stand_in(monkeypatch, [kernel])
    q = torch.randn(1, 4, 1, 16)
    for value in ("0", "off"):
        monkeypatch.setenv(compile_ahead.ENV_SWITCH, value)
        compile_ahead.start(q, q, q, q, q, None, 0.25, True, False)
        assert not compile_ahead._started and not compile_ahead._pending
    monkeypatch.setenv(compile_ahead.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match=compile_ahead.ENV_SWITCH):
        compile_ahead.start(q, q, q, q, q, None, 0.25, True, False)
    monkeypatch.delenv(compile_ahead.ENV_SWITCH)
    compile_ahead.start(q, q, q, q, q, None, 0.25, True, False)
    compile_ahead.wait()
    assert kernel.compiled and len(compile_ahead._started) == 1


def test_a_failed_recording_leaves_the_call_alone(monkeypatch):
    """Compiling ahead is a head start only: a recording that raises (here: no GPU driver for
    Triton to make its caches with, or a broken launch) must not reach the forward's caller."""
    from glakernels.backends.triton import launch

    compile_ahead = _recording_stand_in(monkeypatch, [])
    q = torch.randn(1, 4, 1, 16)

    def broken(*args, **kwargs):
        raise RuntimeError("no driver")

    monkeypatch.setattr(launch, "backward", broken)
    compile_ahead.start(q, q, q, q, q, None, 0.25, True, False)
    assert compile_ahead._pending == [] and len(compile_ahead._started) == 1


def test_wait_outlasts_every_compile_failed_or_not(monkeypatch):
    """``wait`` returns once every compile thread has ended, including one whose compile
    raised (the launch compiles again and reports it); the error does not escape the thread."""
    kernels = [_SlowKernel(RuntimeError("out of resources")), _SlowKernel()]
    compile_ahead = _recording_stand_in(monkeypatch, kernels)
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    q = torch.randn(1, 4, 1, 16)
    compile_ahead.start(q, q, q, q, q, None, 0.25, True, False)
    threads = list(compile_ahead._pending)
    assert len(threads) == 2 and all(thread.is_alive() and not thread.daemon for thread in threads)
    compile_ahead.wait()
    assert compile_ahead._pending == [] and not any(thread.is_alive() for thread in threads)
    assert [kernel.compiled for kernel in kernels] == [False, True] and escaped == []


_GPU_CHECK = r"""
import threading, time
import torch
from triton.runtime.jit import JITFunction
from glakernels import gated_linear_attention
from glakernels.bench import Shape, random_inputs

compiles = []
do_compile = JITFunction._do_compile
def counted(self, *args, **kwargs):
    compiles.append((self.fn.__name__, threading.current_thread().name))
    return do_compile(self, *args, **kwargs)
JITFunction._do_compile = counted
x = random_inputs(Shape("vig", 4, 196, 3, 32, 64), torch.bfloat16, "cuda", bidirectional=True)
x = {n: t.requires_grad_() for n, t in x.items()}
o = gated_linear_attention(**x, backend="triton")
n_forward = len(compiles)
o.float().square().sum().backward()
torch.cuda.synchronize()
ahead = sorted(set(t for _, t in compiles))
backward = [c for c in compiles[n_forward:] if c[1] != "glakernels-compile-ahead"]
print("threads:", *ahead)
print("compiled by the backward itself:", len(backward), flush=True)
"""


@pytest.mark.gpu
def test_backward_kernels_compile_ahead_on_the_gpu(tmp_path):
    """A training call's backward kernels compile in the background threads, none in the
    backward itself (fresh Triton cache, so nothing is found on disk instead)."""
    lines = _run(_GPU_CHECK, tmp_path).strip().splitlines()
    assert lines == ["threads: MainThread glakernels-compile-ahead", "compiled by the backward itself: 0"], lines
