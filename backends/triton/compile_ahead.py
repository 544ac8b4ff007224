"""Compiling the backward's kernels while the forward runs.

A new shape's first forward+backward on a GPU spends nearly all its time in Triton's
compiler, one kernel after the other: the forward's when the forward launches, then the
backward's (pass A's and pass B's; the boundary-state kernels' too on long sequences) when
the backward launches. Pass B alone takes more than half of it (sm_90, ViG-T's shape on a
2-core CPU: forward 4.8 s, pass A 1.7 s, pass B 10.7 s; NOTES.md session 30).

So when a forward's backward is to follow (the op's inputs need gradients), ``start``
records the launches the backward will make — ``launch.backward`` itself with ``_record``:
the same code, ``meta`` tensors for its outputs and scratch, nothing launched — and compiles
each of them in a thread of its own with Triton's ``warmup`` (compile, do not launch), while
the caller's thread compiles and runs the forward. Triton's compiler leaves the GIL in its
MLIR and LLVM passes, so the compiles run side by side. ``launch.backward`` waits for them
(``wait``) and then finds its kernels in Triton's cache.

Each distinct call (shapes, dtype, device, options, matmul precision, config overrides) is
compiled ahead once per process; a launch whose specialisation still differs (an input at an
address not 16-byte aligned) compiles as before, in the thread that launches it. A compile that
fails here is ignored: the launch compiles again and raises the error itself.

On by default; ``GLAKERNELS_TRITON_COMPILE_AHEAD=0`` switches it off. The threads are not
daemons, so a process that never runs the backward (a model evaluated without
``torch.no_grad``) waits at exit for compiles still running, and finds them in Triton's cache
next time. Daemon threads aborted such processes: a daemon thread that was still dropping its
tensors when the interpreter shut down was ended by ``pthread_exit`` inside PyTorch's C++
tensor destructor, and the forced unwind there ends in ``std::terminate`` ("terminate called
without an active exception", exit status 134; 2 of 24 runs in session 30, found with gdb in
session 31; NOTES.md). ``wait`` joins the threads, so none is left running after it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from glakernels._env import env_flag

#: Environment switch, on unless set to 0: compile the backward's kernels ahead (off: each
#: kernel compiles when it is first launched, as Triton does).
ENV_SWITCH = "GLAKERNELS_TRITON_COMPILE_AHEAD"
#: Calls compiled ahead so far are remembered up to this many, then forgotten all at once (a
#: forgotten one only costs a second recording, whose compiles hit Triton's cache).
MAX_REMEMBERED = 4096

_started: set = set()
_pending: list = []  # threads of the compiles not yet waited for


def start(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, g_reverse: Optional[torch.Tensor],
          initial_state: Optional[torch.Tensor], scale: float, bidirectional: bool, output_final_state: bool) -> None:
    """Compile, in background threads, the kernels the backward of this forward call will
    launch (the forward's arguments, contiguous; the triton backend calls it for CUDA
    tensors, the tests with CPU tensors and a stand-in driver)."""
    if not env_flag(ENV_SWITCH, default=True):  # (first: switched off, a call pays this read only)
        return
    from . import launch

    B, T, H, K = q.shape
    V = v.shape[-1]
    key = (q.shape, v.shape, q.dtype, q.device, bidirectional, initial_state is not None, output_final_state,
           torch.get_float32_matmul_precision(), id(launch._overrides))
    if key in _started:
        return
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if len(_started) >= MAX_REMEMBERED:
        _started.clear()
    _started.add(key)
    record: list = []
    # the gradients the backward will get: o's (q's dtype, as the forward allocates it) and,
    # with a final state, the state's (float32)
    grad_output = torch.empty(B, T, H, V, dtype=q.dtype, device="meta")
    grad_final_state = torch.empty(B, H, K, V, dtype=torch.float32, device="meta") if output_final_state else None
    try:
        launch.backward(q, k, v, g, g_reverse, initial_state, grad_output, grad_final_state, scale, bidirectional,
                        _record=record)
        for kernel, *_ in record:
            caches = getattr(kernel, "device_caches", None)
            if caches is not None:  # (its per-device cache made here, not raced for by two threads)
                caches[q.device.index if q.device.type == "cuda" else 0]
    except Exception:  # a head start only: whatever stops it here, the launches meet (and report) themselves
        return
    _pending[:] = [thread for thread in _pending if thread.is_alive()]  # (ended, never waited for)
    for kernel, grid, args, kwargs in record:
        thread = threading.Thread(target=_compile, args=(q.device, kernel, grid, args, kwargs),
                                  name="glakernels-compile-ahead")  # (not a daemon: module docstring)
        thread.start()
        _pending.append(thread)  # (after start: a wait in another thread may join it at once)


def _compile(device: torch.device, kernel, grid, args, kwargs) -> None:
    try:
        # (Triton keys its caches by the current device; a CPU device: the tests' fake driver)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            kernel.warmup(*args, grid=grid, **kwargs)
    except Exception:  # a head start only: the launch compiles again and raises it there
        pass


def wait() -> None:
    """Block until every compile started ahead has finished (successfully or not) and its
    thread has ended."""
    while _pending:
        _pending.pop().join()
