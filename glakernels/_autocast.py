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
    """Cast floating tensors to the autocast dtype when autocast is on for ``device_type``,
    as autocast casts a matmul's: float64 ones stay float64, anything else is left for the
    input checks to judge."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors

    def cast(x):
        eligible = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
        return x.to(dtype) if eligible and x.device.type == device_type else x

    return tuple(cast(x) for x in tensors)


def autocast_disabled(device_type: str):
    """Inside the op, a backend's own arithmetic (e.g. float32 accumulation in the torch
    backend) must not be cast again by autocast."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
