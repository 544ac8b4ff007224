"""The contract every backend fulfils.

A backend is one subclass of :class:`Backend` that *declares* what it supports as class
attributes; dispatch and the tests read those declarations and nothing else. A support check
returns reasons, not a bool: "supported" means "no reasons". Heavy dependencies (triton, cupy,
numba) are imported inside methods, so importing glakernels stays cheap.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Mapping, Optional

import torch

from ._problem import GLAGradients, GLAInputs, ProblemSpec

#: DESIGN.md §3: relative-RMS error against a float64 reference that every backend must meet,
#: for outputs and gradients alike. A backend may declare tighter bounds, never looser ones.
#: Value of ``device_types`` / ``auto_priority`` keys meaning "every device PyTorch runs on".
ANY_DEVICE = "any"

DESIGN_TOLERANCES: Mapping[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


class Backend:
    """Base class of a GLA backend. Subclasses set the class attributes and implement
    ``forward`` and ``backward``; ``unavailable_reasons`` if they need optional packages."""

    #: Name users pass as ``backend=``, to ``use_backend`` or in ``GLAKERNELS_BACKEND``.
    name: ClassVar[str]
    #: One line for ``glakernels info``.
    description: ClassVar[str] = ""
    #: ``torch.device.type`` values this backend runs on (``"any"``: wherever PyTorch runs).
    device_types: ClassVar[frozenset[str]] = frozenset()
    #: Input dtypes this backend accepts.
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset()
    #: Largest head dims, ``None`` for no limit.
    max_head_dim_k: ClassVar[Optional[int]] = None
    max_head_dim_v: ClassVar[Optional[int]] = None
    supports_causal: ClassVar[bool] = True
    supports_bidirectional: ClassVar[bool] = True
    supports_states: ClassVar[bool] = True
    #: Same inputs give bitwise-identical outputs (and a sequence's result is independent of
    #: the rest of the batch). The shared tests hold every backend that declares it to it.
    deterministic: ClassVar[bool] = True
    #: Rank in automatic selection per device type (higher is tried first; key ``"any"`` for
    #: every device). A device type that is absent means "only when asked for by name" there.
    auto_priority: ClassVar[Mapping[str, int]] = {}
    #: Device types on which ``torch.compile`` traces this backend's ``forward`` and
    #: ``backward`` instead of calling the custom op: Dynamo then records the backend's
    #: Triton launches as graph nodes that Inductor compiles and launches with the rest of the
    #: graph (no custom-op dispatch, no Triton launcher in Python on every call). Only for
    #: backends whose launch code Dynamo can trace with ``fullgraph=True``.
    traceable_on: ClassVar[frozenset[str]] = frozenset()
    #: Per-dtype error bounds the shared tests hold this backend to.
    tolerances: ClassVar[Mapping[torch.dtype, float]] = DESIGN_TOLERANCES
    #: The largest problem (B*T*H) the shared property tests should draw for this backend on
    #: CPU; slow emulated paths (e.g. the Triton interpreter) lower it.
    test_max_tokens_cpu: ClassVar[int] = 4096

    # ---- availability ----------------------------------------------------------------------

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all on this machine (missing package, no GPU...).

        Computed once per process by :meth:`availability`; override this, not that."""
        return []

    @functools.cached_property
    def _availability(self) -> tuple[str, ...]:
        try:
            return tuple(self.unavailable_reasons())
        except Exception as exc:  # a broken optional install must not break the whole library
            return (f"availability check failed: {type(exc).__name__}: {exc}",)

    def availability(self) -> tuple[str, ...]:
        """Cached :meth:`unavailable_reasons`; empty when the backend can run here."""
        return self._availability

    @property
    def available(self) -> bool:
        return not self.availability()

    def runs_on(self) -> frozenset[str]:
        """Device types this backend runs on in this process (may depend on the environment,
        e.g. Triton's interpreter adds ``cpu``)."""
        return self.device_types

    # ---- support for one problem -----------------------------------------------------------

    def not_supported_reasons(self, spec: ProblemSpec) -> list[str]:
        """Every reason this backend cannot run ``spec``; empty when it can."""
        reasons = list(self.availability())
        devices = self.runs_on()
        if ANY_DEVICE not in devices and spec.device_type not in devices:
            reasons.append(
                f"device {spec.device_type!r} not supported (runs on {', '.join(sorted(devices))})"
            )
        if spec.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            reasons.append(f"dtype {str(spec.dtype).replace('torch.', '')} not supported ({names})")
        if self.max_head_dim_k is not None and spec.head_dim_k > self.max_head_dim_k:
            reasons.append(f"head_dim_k={spec.head_dim_k} above this backend's limit {self.max_head_dim_k}")
        if self.max_head_dim_v is not None and spec.head_dim_v > self.max_head_dim_v:
            reasons.append(f"head_dim_v={spec.head_dim_v} above this backend's limit {self.max_head_dim_v}")
        if spec.bidirectional and not self.supports_bidirectional:
            reasons.append("bidirectional mode not supported")
        if not spec.bidirectional and not self.supports_causal:
            reasons.append("causal mode not supported")
        if spec.uses_states and not self.supports_states:
            reasons.append("initial_state / output_final_state not supported")
        return reasons

    def priority_for(self, device_type: str) -> Optional[int]:
        """Rank in automatic selection on ``device_type``; ``None``: never chosen automatically."""
        return self.auto_priority.get(device_type, self.auto_priority.get(ANY_DEVICE))

    def priority_for_problem(self, spec: ProblemSpec) -> Optional[int]:
        """Rank for this call in automatic selection: the device type's, unless a backend
        knows it is faster (or slower) for some calls (e.g. forward-only ones)."""
        return self.priority_for(spec.device_type)

    def tolerance(self, dtype: torch.dtype) -> float:
        return self.tolerances[dtype]

    # ---- computation -----------------------------------------------------------------------

    def forward(self, inputs: GLAInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``o`` (``[B, T, H, V]``, input dtype) and the final state (``[B, H, K, V]``,
        ``spec.state_dtype``) when ``spec.output_final_state``, else ``None``."""
        raise NotImplementedError

    def backward(
        self,
        inputs: GLAInputs,
        grad_output: torch.Tensor,
        grad_final_state: Optional[torch.Tensor],
    ) -> GLAGradients:
        """Gradients of every tensor input, recomputing whatever forward state is needed.

        ``grad_output`` is contiguous ``[B, T, H, V]`` in the input dtype; ``grad_final_state``
        is ``None`` unless ``spec.output_final_state``."""
        raise NotImplementedError

    def prepare_backward(self, inputs: GLAInputs) -> None:
        """Called before an eager forward whose backward autograd will run (its inputs need
        gradients), with the same inputs: a backend may start host-side work that backward
        will need — the triton backend compiles its backward's kernels while the forward runs.
        It must not launch device work nor read tensor values. By default nothing."""

    def __repr__(self) -> str:
        return f"<glakernels backend {self.name!r}>"
