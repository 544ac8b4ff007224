"""Backend registry and selection.

Selection order (DESIGN.md §4): ``backend=`` argument > ``use_backend()`` context manager >
``GLAKERNELS_BACKEND`` > automatic. A backend chosen by name that cannot run the call raises
:class:`BackendNotSupportedError` with its reasons; there is no silent fallback. Automatic
selection orders backends by their declared ``auto_priority`` for the input's device type (a
backend may rank some calls differently: ``Backend.priority_for_problem``) and takes the first
whose ``not_supported_reasons`` is empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ._backend import Backend
from ._problem import ProblemSpec

ENV_BACKEND = "GLAKERNELS_BACKEND"
AUTO = "auto"


class BackendNotSupportedError(ValueError):
    """A backend asked for by name cannot run this call, or no backend can."""


@dataclass(frozen=True)
class BackendStatus:
    """One line of :func:`available_backends`: whether a backend can run here, and why not."""

    name: str
    available: bool
    reasons: tuple[str, ...]
    device_types: tuple[str, ...]
    description: str

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable: " + "; ".join(self.reasons)
        return f"{self.name:<8} [{', '.join(self.device_types)}] {state}"


class BackendRegistry:
    """Name -> backend instance. The built-in backends register themselves when
    ``glakernels.backends`` is imported, which happens on first use, not at import time."""

    def __init__(self, builtin_package: Optional[str] = "glakernels.backends") -> None:
        self._backends: dict[str, Backend] = {}
        self._builtin_package = builtin_package
        self._builtins_loaded = builtin_package is None
        # reentrant: importing the built-ins registers them (and may ask for the registry)
        # from the importing thread, while other threads wait for the import to finish
        self._lock = threading.RLock()
        self._loading = False

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        with self._lock:
            if self._builtins_loaded or self._loading:  # loaded meanwhile, or this thread is importing them
                return
            self._loading = True
            try:
                importlib.import_module(self._builtin_package)
                self._builtins_loaded = True
            finally:  # a failed import raises here, and the next call tries again
                self._loading = False

    def register(self, backend: Backend) -> Backend:
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a glakernels Backend instance, got {type(backend).__name__}")
        name = getattr(backend, "name", None)
        if not isinstance(name, str) or not name or name == AUTO:
            raise ValueError(f"backend name must be a non-empty string other than {AUTO!r}, got {name!r}")
        if name in self._backends:
            raise ValueError(f"a backend named {name!r} is already registered")
        self._backends[name] = backend
        return backend

    def unregister(self, name: str) -> Backend:
        """Remove and return a backend (for tests that register temporary ones)."""
        self._load_builtins()
        return self._backends.pop(name)

    def names(self) -> list[str]:
        self._load_builtins()
        return list(self._backends)

    def backends(self) -> list[Backend]:
        self._load_builtins()
        return list(self._backends.values())

    def get(self, name: str, source: Optional[str] = None) -> Backend:
        """The backend registered as ``name``; ``source`` (where the name came from, e.g. "the
        GLAKERNELS_BACKEND environment variable") goes into the error for an unknown name."""
        self._load_builtins()
        try:
            return self._backends[name]
        except KeyError:
            chosen = f" (chosen by {source})" if source else ""
            raise BackendNotSupportedError(
                f"unknown backend {name!r}{chosen}; registered backends: {', '.join(self._backends)} "
                f"(or {AUTO!r} for automatic selection)"
            ) from None

    def select(self, spec: ProblemSpec, name: Optional[str], source: str) -> Backend:
        """The backend that runs ``spec``: ``name`` if given (else automatic)."""
        if name is not None and name != AUTO:
            backend = self.get(name, source)
            reasons = backend.not_supported_reasons(spec)
            if reasons:
                can_run = [b.name for b in self.backends() if not b.not_supported_reasons(spec)]
                raise BackendNotSupportedError(
                    f"backend {name!r} (chosen by {source}) cannot run this call "
                    f"({spec.describe()}): {'; '.join(reasons)}. "
                    f"Backends that can: {', '.join(can_run) or 'none'}"
                )
            return backend
        ranked = sorted(
            (b for b in self.backends() if b.priority_for_problem(spec) is not None),
            key=lambda b: -b.priority_for_problem(spec),
        )
        for backend in ranked:
            if not backend.not_supported_reasons(spec):
                return backend
        details = "; ".join(
            f"{b.name}: {', '.join(b.not_supported_reasons(spec))}" for b in self.backends()
        )
        raise BackendNotSupportedError(f"no backend can run this call ({spec.describe()}): {details}")


registry = BackendRegistry()

_context = threading.local()


def _context_stack() -> list[str]:
    stack = getattr(_context, "stack", None)
    if stack is None:
        stack = _context.stack = []
    return stack


def register_backend(backend: Backend) -> Backend:
    """Add a backend instance to the registry; tests and benchmarks pick it up from there."""
    return registry.register(backend)


def get_backend(name: str) -> Backend:
    return registry.get(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend | None]:
    """Run every ``gated_linear_attention`` call in this block (in this thread) on backend
    ``name`` (or ``"auto"``), unless a call passes ``backend=`` itself.

    >>> with glakernels.use_backend("torch"):
    ...     o = gated_linear_attention(q, k, v, g)
    """
    if not isinstance(name, str):
        raise TypeError(f"use_backend() takes a backend name (str), got {type(name).__name__}")
    backend = None if name == AUTO else registry.get(name, "use_backend()")  # unknown names fail here, not later
    stack = _context_stack()
    stack.append(name)
    try:
        yield backend
    finally:
        stack.pop()


def requested_backend(argument: Optional[str]) -> tuple[Optional[str], str]:
    """The backend name asked for, and where the request came from."""
    if argument is not None:
        return argument, "the backend= argument"
    stack = _context_stack()
    if stack:
        return stack[-1], "use_backend()"
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env:
        return env, f"the {ENV_BACKEND} environment variable"
    return None, "automatic selection"


def select_backend(spec: ProblemSpec, argument: Optional[str] = None) -> Backend:
    """The backend that will run a call described by ``spec`` (see module docstring)."""
    name, source = requested_backend(argument)
    return registry.select(spec, name, source)


#: ProblemSpec's field names, read outside any tracing: ``dataclasses.astuple`` recurses into
#: every value and calls ``hasattr(torch.dtype, ...)``, which torch 2.11's Dynamo cannot trace
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ProblemSpec))


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without its import of ``torch._dynamo``,
    which made ``import glakernels`` take 1.4 s longer: the decorator only sets this attribute
    on ``fn`` (tests/test_dispatch.py checks that it still does, on the installed torch)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _select_backend_name(*spec_fields_and_argument) -> str:
    *fields, argument = spec_fields_and_argument
    return select_backend(ProblemSpec(*fields), argument).name


def select_backend_name(spec: ProblemSpec, argument: Optional[str] = None) -> str:
    """:func:`select_backend`'s name. Under ``torch.compile`` this runs once, at trace time,
    and its result is baked into the graph: selection reads environment and thread state that
    the compiler should not trace, so only plain fields cross the boundary."""
    return _select_backend_name(*(getattr(spec, name) for name in _SPEC_FIELDS), argument)


def available_backends() -> list[BackendStatus]:
    """Every registered backend, whether it can run on this machine, and why not."""
    return [
        BackendStatus(
            name=b.name,
            available=b.available,
            reasons=b.availability(),
            device_types=tuple(sorted(b.runs_on())),
            description=b.description,
        )
        for b in registry.backends()
    ]
