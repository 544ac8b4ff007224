"""Hypothesis profiles, the GPU marker, and Triton's interpreter on machines without a GPU.

``HYPOTHESIS_PROFILE=ci`` (default) keeps property tests bounded for CI on 2 cores;
``HYPOTHESIS_PROFILE=thorough`` draws many more examples (run it on a workstation or GPU box).
"""

import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_INTERPRET = "TRITON_INTERPRET"
_set_interpret = pytest.StashKey[bool]()


def _share_cpu_threads_among_workers():
    """Under pytest-xdist, give each worker its share of the CPU's cores for PyTorch's
    intra-op threads. Left alone, every worker starts one thread per core: 16 workers on a
    16-core GPU host ran 256 threads, and the float64 gradchecks of the vig tests (CPU
    convolutions) crawled until the call's time limit (NOTES.md, session 16)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and workers.isdigit() and int(workers) > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(workers)))


def pytest_configure(config):
    """Without a GPU, run the triton backend's kernels through Triton's interpreter on CPU
    tensors for this session (it must be on before the kernels are first imported), so the
    shared suites test them in CI; the variable is restored when the session ends."""
    _share_cpu_threads_among_workers()
    if not torch.cuda.is_available() and _INTERPRET not in os.environ and importlib.util.find_spec("triton"):
        os.environ[_INTERPRET] = "1"
        config.stash[_set_interpret] = True


def pytest_unconfigure(config):
    if config.stash.get(_set_interpret, False):
        os.environ.pop(_INTERPRET, None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
