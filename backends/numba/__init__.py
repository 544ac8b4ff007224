"""The ``numba`` backend: recurrent GLA kernels compiled for the CPU by Numba.

The automatic choice for CPU tensors. Forward and backward, causal and bidirectional (both
directions in one parallel launch), with states; float32 and float64 computed natively,
float16 / bfloat16 computed in float32 and returned in the input dtype. Parallel over
batch × heads × directions (and blocks of value columns when those are fewer than the
threads); the thread count is Numba's (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``).

Kernels are compiled on first use and cached on disk (``cache=True``): next to the sources
when that directory is writable, else in Numba's user cache (``NUMBA_CACHE_DIR`` or
``~/.cache/numba``), so a read-only install works too. The algorithm is described in
:mod:`.recurrent`; tensor plumbing is in :mod:`.launch`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from glakernels._backend import Backend
from glakernels._dispatch import register_backend
from glakernels._problem import GLAGradients, GLAInputs


class NumbaBackend(Backend):
    name = "numba"
    description = "recurrent kernels compiled by Numba, parallel over batch x heads (CPU)"
    device_types = frozenset({"cpu"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    auto_priority = {"cpu": 10}  # above the torch backend's 0: the default CPU path

    def unavailable_reasons(self) -> list[str]:
        try:
            import numba  # noqa: F401
        except ImportError as exc:
            return [f"numba is not importable ({exc}); pip install numba"]
        return []

    def forward(self, inputs: GLAInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from . import launch

        with _torch_threads_kept():
            return launch.forward(inputs)

    def backward(self, inputs: GLAInputs, grad_output: torch.Tensor, grad_final_state: Optional[torch.Tensor]) -> GLAGradients:
        from . import launch

        with _torch_threads_kept():
            return launch.backward(inputs, grad_output, grad_final_state)


@contextlib.contextmanager
def _torch_threads_kept():
    """Leave PyTorch's CPU thread count as the caller set it. Numba's OpenMP threading layer,
    when it starts (the first parallel call in a process), sets the calling thread's OpenMP
    thread count, and PyTorch reads its own from the same OpenMP runtime: after the first
    numba call, ``torch.get_num_threads()`` read Numba's count (every core) where the caller
    had asked ``torch.set_num_threads(1)`` (one thread per process under ``torchrun``, or per
    pytest-xdist worker: ``test_xdist_workers_share_the_cpu_threads`` failed so)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


register_backend(NumbaBackend())
