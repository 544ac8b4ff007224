"""Autocast handling: the op behaves like a matmul under ``torch.autocast``."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs ``device_type`` work in right now, or ``None``."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def cast_for_autocast(tensors: tuple, device_type: str) -> tuple:
    """Cast floating tensors to the autocast dtype when autocast is on for ``device_type``."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(x.to(dtype) if x is not None and x.is_floating_point() else x for x in tensors)


def autocast_disabled(device_type: str):
    """Inside the op, a backend's own arithmetic (e.g. float32 accumulation in the torch
    backend) must not be cast again by autocast."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
