"""The CUDA sources of the cupy backend, and the kernel parameter list they declare.

The ``.cu`` files under ``kernels/`` are the single source compiled by NVRTC on the GPU
machine, by ``nvcc`` in CI, and by the C++ emulator in the tests. NVRTC receives one string,
so local ``#include "..."`` lines are inlined here; the text (headers included) is then part
of CuPy's on-disk cache key, so editing a header recompiles.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import re

import numpy as np

KERNEL_DIR = pathlib.Path(__file__).resolve().with_name("kernels")

#: kernel file -> what it holds
SWEEP_FILE = "gla_sweep.cu"
SCAN_FILE = "gla_scan.cu"
CHUNK_FORWARD_FILE = "gla_chunk_forward.cu"
CHUNK_BACKWARD_FILE = "gla_chunk_backward.cu"

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


@functools.lru_cache(maxsize=None)
def kernel_source(file_name: str) -> str:
    """``file_name``'s text with every local ``#include "x"`` (found in ``kernels/``) inlined
    once; includes of files not shipped here (the emulator's header) are left in place."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = (KERNEL_DIR / name).read_text()

        def replace(match: re.Match) -> str:
            included = match.group(1)
            if not (KERNEL_DIR / included).is_file():
                return match.group(0)
            if included in seen:
                return ""
            seen.add(included)
            return expand(included)

        return _INCLUDE.sub(replace, text)

    seen.add(file_name)
    return expand(file_name)


@functools.lru_cache(maxsize=None)
def source_digest(file_name: str) -> str:
    return hashlib.sha256(kernel_source(file_name).encode()).hexdigest()[:16]


_FIELD = re.compile(r"X\((u64|i64|float),\s*(\w+)\)")
_NUMPY_TYPES = {"u64": np.uint64, "i64": np.int64, "float": np.float32}


@functools.lru_cache(maxsize=None)
def param_fields() -> tuple[tuple[str, str], ...]:
    """``(C type, name)`` of every kernel parameter, in order, from ``GLA_PARAM_FIELDS``."""
    text = (KERNEL_DIR / "gla_common.cuh").read_text()
    block = text[text.index("#define GLA_PARAM_FIELDS") :]
    block = block[: block.index("\n\n")]
    fields = tuple((ctype, name) for ctype, name in _FIELD.findall(block))
    if not fields:
        raise RuntimeError("no GLA_PARAM_FIELDS found in gla_common.cuh")
    return fields


@functools.lru_cache(maxsize=None)
def params_dtype() -> np.dtype:
    """``gla::Params`` as a NumPy structured type: its fields in order, laid out by C's
    alignment rules (``align=True``), so its bytes are the struct the kernels take."""
    return np.dtype([(name, _NUMPY_TYPES[ctype]) for ctype, name in param_fields()], align=True)


def kernel_params(values: dict, base: np.ndarray | None = None) -> np.ndarray:
    """A ``gla::Params`` (0-d structured array): the fields in ``values``, the others from
    ``base`` (an earlier result of this function, not modified), else 0. A call's launches
    share most fields, so the driver fills them once and each launch sets what changes."""
    params = np.zeros((), params_dtype()) if base is None else base.copy()
    for name, value in values.items():
        if name not in params.dtype.fields:
            raise KeyError(f"not a kernel parameter: {name!r}")
        params[name] = value
    return params


def kernel_args(values: dict, base: np.ndarray | None = None) -> tuple:
    """The positional arguments of a launch: one ``gla::Params`` by value (a NumPy structured
    scalar, which CuPy passes as the struct's bytes), from :func:`kernel_params`. Host time
    per launch matters at ViG's sizes, where a kernel runs for tens of microseconds."""
    return (kernel_params(values, base)[()],)


def instantiation_unit(file_name: str, names) -> str:
    """A translation unit that includes ``file_name`` and instantiates every kernel in
    ``names`` (what NVRTC does with name expressions), for compilers that need it spelled
    out: nvcc in CI and the C++ emulator. Compile it with ``-I`` pointing at ``kernels/``."""
    array = file_name.replace(".", "_").replace("-", "_")
    entries = ",\n".join(f"    reinterpret_cast<void*>(&{name})" for name in names)
    return (
        f'#include "{file_name}"\n'
        f"extern void* const gla_instances_{array}[];\n"
        f"void* const gla_instances_{array}[] = {{\n{entries}\n}};\n"
    )
