"""PyTorch's float32 precision switches, read the way every kernel here needs them.

PyTorch has two APIs for tf32: the legacy ``allow_tf32`` flags and the per-backend
``fp32_precision`` settings. Once a process has set both, reading a legacy flag raises
(PyTorch 2.11 and 2.13), and so does ``torch.get_float32_matmul_precision()``. The readers
here never raise.
"""

from __future__ import annotations

import torch


def tf32_allowed(kind: str) -> bool:
    """Whether PyTorch lets float32 ``"matmul"`` (cuBLAS) or ``"conv"`` (cuDNN) work use tf32:
    the per-backend ``fp32_precision`` where this PyTorch has it ("none" defers to the global
    ``torch.backends.fp32_precision``), else the legacy ``allow_tf32`` flag."""
    if kind not in ("matmul", "conv"):
        raise ValueError(f"kind must be 'matmul' or 'conv', got {kind!r}")
    backend = torch.backends.cuda.matmul if kind == "matmul" else torch.backends.cudnn
    settings = backend if kind == "matmul" else getattr(backend, "conv", None)
    precision = getattr(settings, "fp32_precision", None)
    if precision is None:  # a PyTorch without the per-backend API
        return bool(backend.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def float32_matmul_precision() -> str:
    """``torch.get_float32_matmul_precision()``, or "highest" where PyTorch declines to answer
    (once the legacy and the per-backend APIs were mixed)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "highest"


# Under torch.compile the kernels' launch code (vig's kernels, the triton backend's launches)
# is traced, and these readers with it; Dynamo refuses the pybind getter behind
# ``fp32_precision`` with ``fullgraph=True``. Marked as constant results, they are called once
# while tracing and their values baked into the graph (as Inductor bakes in its own
# settings): a switch flipped later does not recompile. This is what
# ``torch.compiler.assume_constant_result`` does, set directly because that decorator imports
# Dynamo, and importing glakernels or vig must not (tests/test_dispatch.py);
# tests/test_torch_integration.py::test_precision_switches_read_under_fullgraph_compile fails
# if a PyTorch release changes the marker.
for _reader in (tf32_allowed, float32_matmul_precision):
    _reader._dynamo_marked_constant = True
del _reader
