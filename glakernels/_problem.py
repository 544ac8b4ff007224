"""What one call of the op is: its metadata (``ProblemSpec``) and its tensors (``GLAInputs``).

Backends receive these two small objects instead of long argument lists. ``ProblemSpec`` holds
only hashable metadata, so dispatch can reason about a call without touching tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass(frozen=True)
class ProblemSpec:
    """Shapes, dtype, device and mode of one call; no tensors."""

    batch: int
    seq_len: int
    heads: int
    head_dim_k: int
    head_dim_v: int
    dtype: torch.dtype
    device_type: str
    bidirectional: bool
    has_initial_state: bool = False
    output_final_state: bool = False
    #: Gradients will be asked for (grad mode on and an input requires grad): automatic
    #: selection may prefer another backend for forward-only calls than for training.
    needs_grad: bool = False

    @property
    def uses_states(self) -> bool:
        return self.has_initial_state or self.output_final_state

    @property
    def state_dtype(self) -> torch.dtype:
        return state_dtype_for(self.dtype)

    def describe(self) -> str:
        """Short human-readable form used in error messages and test ids."""
        mode = "bidirectional" if self.bidirectional else "causal"
        if self.uses_states:
            mode += "+states"
        return (
            f"B={self.batch} T={self.seq_len} H={self.heads} K={self.head_dim_k} "
            f"V={self.head_dim_v} dtype={str(self.dtype).replace('torch.', '')} "
            f"device={self.device_type} {mode}"
        )


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """States and accumulators are float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class GLAInputs:
    """The tensors of one call, contiguous, in layout ``[B, T, H, D]``, already validated.

    ``g_reverse`` is ``None`` for causal calls; for bidirectional calls it is always set (to ``g``
    when the caller gave none). ``initial_state`` is in ``spec.state_dtype`` or ``None``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    g_reverse: Optional[torch.Tensor]
    initial_state: Optional[torch.Tensor]
    scale: float
    spec: ProblemSpec


class GLAGradients(NamedTuple):
    """Gradients returned by a backend's ``backward``; ``None`` where the input was absent."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dg: torch.Tensor
    dg_reverse: Optional[torch.Tensor]
    dinitial_state: Optional[torch.Tensor]
