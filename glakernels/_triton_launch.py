"""Launching Triton kernels with less host time: shared by the triton backend and vig's kernels.

``kernel[grid](*args, **kwargs)`` runs Triton's whole launch path on every call: it binds the
arguments to the signature, specialises each one (type, 16-byte alignment of pointers,
integers equal to 1 or divisible by 16), builds a cache-key string, finds the compiled
kernel and then launches it. Timed around ``JITFunction.run`` in an eager ViG-T step on the
H200 machine of NOTES.md (session 29), that took 39-62 µs a launch (the timer's own cost
included), about what many of these kernels run for on the GPU; such a step makes 76
launches in inference and 212 in training.

:func:`launch_kernel` does the same launch with a cheaper key of its own: the exact value (and
type) of every non-tensor argument and option, and for every tensor its dtype and the
alignment of its address (the largest power of two dividing it, up to 128 bytes; Triton
reads 16-byte alignment today). Everything Triton's specialisation reads from an argument is
a function of that key, so two calls with one key get the same compiled kernel. The first
call with a key goes through ``kernel[grid]`` (compiling if needed) and keeps the compiled
kernel it returns; later calls with that key hand the arguments straight to it, in the
parameter order of Triton's binder. H200 machine, vigT_224 (``python
benchmarks/host_overhead.py --launch``): a vig RMSNorm call 37 -> 31 µs of host time, the
op's forward 119 -> 100 µs.

Triton's own path runs instead while ``torch.compile`` traces (Dynamo must see the launch),
for anything that is not a plain ``JITFunction`` (the interpreter's functions, Gluon
kernels), for kernels with pre-run hooks, for a callable grid, with a Triton outside
:data:`TRITON_VERSIONS` (the compiled kernel's launch signature is Triton's internal API:
3.6 was run on a GPU, 3.9's source read; widen the range after the GPU tests pass on
another), and when ``GLAKERNELS_TRITON_FAST_LAUNCH=0``. Not re-checked on the cached path:
Triton's test that the globals a kernel read have not changed since it was compiled (ours
read module constants), and ``TRITON_DEBUG`` switched on after a kernel's first launch.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ._env import env_flag

ENV_FAST_LAUNCH = "GLAKERNELS_TRITON_FAST_LAUNCH"
#: Triton versions (major, minor) whose ``CompiledKernel.run`` this module calls as written
TRITON_VERSIONS = ((3, 6), (3, 9))
#: compiled kernels kept per Triton kernel (one per distinct argument key); beyond this the
#: oldest are dropped (every ViG shape needs a handful)
MAX_KEYS_PER_KERNEL = 256
_CACHE_ATTRIBUTE = "_glakernels_launch_cache"


def fast_launch_enabled() -> bool:
    """``GLAKERNELS_TRITON_FAST_LAUNCH``: on unless set to 0/false/no/off."""
    return ENV_FAST_LAUNCH not in os.environ or env_flag(ENV_FAST_LAUNCH)


def _argument_key(x: Any) -> Any:
    """What Triton's specialisation can read from one argument (see the module docstring)."""
    if isinstance(x, torch.Tensor):
        address = x.data_ptr()
        return (x.dtype, min(address & -address, 128) if address else 0)
    # the type too: True == 1 and 1.0 == 1 as keys, yet Triton compiles them differently
    return (type(x), x)


def _positions(kernel, n_args: int, kwargs: dict) -> list[tuple[int, Any]]:
    """How to lay out a call's arguments in the kernel's parameter order, as Triton's binder
    does: (0, i) positional argument i, (1, name) keyword argument, (2, value) a default."""
    plan = []
    for i, param in enumerate(kernel.params):
        if i < n_args:
            plan.append((0, i))
        elif param.name in kwargs:
            plan.append((1, param.name))
        else:
            plan.append((2, param.default))
    return plan


def launch_kernel(kernel, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, faster on repeated calls (see the module docstring)."""
    if torch.compiler.is_compiling() or not _fast_path_applies(kernel, grid):
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    try:
        key = (device, tuple(map(_argument_key, args)), tuple((n, _argument_key(v)) for n, v in kwargs.items()))
        cache = kernel.__dict__.get(_CACHE_ATTRIBUTE)
        entry = None if cache is None else cache.get(key)
    except TypeError:  # an unhashable argument: Triton's path knows what to do with it
        kernel[grid](*args, **kwargs)
        return
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if cache is None:
            cache = kernel.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
        if len(cache) >= MAX_KEYS_PER_KERNEL:
            del cache[next(iter(cache))]
        cache[key] = (compiled, _positions(kernel, len(args), kwargs))
        return
    compiled, plan = entry
    values = [args[x] if kind == 0 else kwargs[x] if kind == 1 else x for kind, x in plan]
    _run_compiled(compiled, grid, device, values)


def _run_compiled(compiled, grid: tuple, device: int, values: list) -> None:
    """What the end of ``JITFunction.run`` does with a compiled kernel (Triton 3.6-3.9)."""
    knobs = _triton()[1]
    stream = torch._C._cuda_getCurrentRawStream(device)
    enter_hook = knobs.runtime.launch_enter_hook
    metadata = compiled.launch_metadata(grid, stream, *values) if enter_hook is not None else None
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, metadata, enter_hook, knobs.runtime.launch_exit_hook, *values)


def _fast_path_applies(kernel, grid) -> bool:
    if callable(grid) or not fast_launch_enabled():
        return False
    jit_function, _, supported = _triton()
    # exactly JITFunction: the interpreter's and Gluon's functions launch their own way
    return supported and type(kernel) is jit_function and not kernel.pre_run_hooks


_TRITON: tuple = ()


def _triton() -> tuple:
    """``(JITFunction, knobs, whether this Triton's version is in TRITON_VERSIONS)``, looked
    up once (an import statement per launch costs time)."""
    global _TRITON
    if not _TRITON:
        import triton
        from triton import knobs
        from triton.runtime.jit import JITFunction

        _TRITON = (JITFunction, knobs, TRITON_VERSIONS[0] <= triton_version(triton.__version__) <= TRITON_VERSIONS[1])
    return _TRITON


def triton_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``3.6.0`` or ``3.9.0+git1234``."""
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)

