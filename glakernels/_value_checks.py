"""Opt-in checks of tensor *values* (``GLAKERNELS_CHECK=1``).

They read data back to the host, which synchronises the device, so the default path skips them.
"""

from __future__ import annotations

import torch

from ._env import env_flag

ENV_CHECK = "GLAKERNELS_CHECK"


def value_checks_enabled() -> bool:
    return env_flag(ENV_CHECK)


def check_values(named_tensors: dict[str, torch.Tensor], gate_names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for NaN/inf anywhere, or positive entries in a gate."""
    for name, x in named_tensors.items():
        if x is None:
            continue
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values ({ENV_CHECK}=1 is set)")
        if name in gate_names and bool((x > 0).any()):
            raise ValueError(
                f"{name} has positive entries (largest {float(x.max()):.4g}); gates are log "
                f"forget gates and must be <= 0, e.g. logsigmoid(x) / 16 ({ENV_CHECK}=1 is set)"
            )
