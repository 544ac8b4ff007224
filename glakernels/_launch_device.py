"""The device context a Triton launch runs in, shared by the triton backend and vig's kernels."""

from __future__ import annotations

import contextlib

import torch


def launch_device(x: torch.Tensor):
    """A context that makes ``x``'s GPU current for a launch, when another one is (Triton
    launches on the current device); a no-op otherwise, and while ``torch.compile`` traces the
    launch: Inductor's generated code sets the graph's device itself."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
