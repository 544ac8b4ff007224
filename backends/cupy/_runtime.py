"""Compiling and launching the kernels with CuPy, on PyTorch's current CUDA stream.

Modules are compiled by NVRTC (``cupy.RawModule``) the first time a (source, kernels,
device architecture) combination is needed, kept for the life of the process, and cached on
disk by CuPy (``~/.cupy/kernel_cache``, or ``$CUPY_CACHE_DIR``) under a key that covers the
source text, the compile options, the architecture and the NVRTC version — so the next
process loads the binary instead of compiling. Tensors travel as raw device addresses: no
copy, no DLPack round trip, no synchronisation.
"""

from __future__ import annotations

import threading
import time

import torch

from . import _plan as plan
from ._sources import SCAN_FILE, SWEEP_FILE, kernel_source, source_digest

#: NVRTC options; part of the cache key (CuPy adds the architecture and ``-ftz=true``).
NVRTC_OPTIONS = ("-std=c++17",)
#: dynamic shared memory a kernel may use without opting in
_DEFAULT_SMEM_LIMIT = 48 * 1024

_lock = threading.Lock()
_modules: dict[tuple, object] = {}
_kernels: dict[tuple, object] = {}
_smem_set: dict[tuple, int] = {}
_streams: dict[tuple, object] = {}
#: seconds spent compiling or loading each module in this process (for ``compile_report``)
compile_seconds: dict[tuple, float] = {}


def _family_of(file: str, name: str) -> tuple[str, ...]:
    """The name expressions compiled together with ``name`` (one NVRTC call)."""
    if file == SCAN_FILE:
        return plan.scan_family()
    # gla::gla_sweep<dtype, tile, role>: every role of that dtype and tile
    prefix = name[: name.rindex(",")]
    return tuple(f"{prefix}, {role}>" for role in plan.ROLES)


def _kernel(device_index: int, file: str, name: str):
    import cupy

    with cupy.cuda.Device(device_index) as device:
        arch = device.compute_capability
        key = (arch, file, name)
        kernel = _kernels.get(key)
        if kernel is not None:
            return kernel
        with _lock:
            family = _family_of(file, name)
            module_key = (arch, file, source_digest(file), NVRTC_OPTIONS, family)
            module = _modules.get(module_key)
            if module is None:
                start = time.perf_counter()
                module = cupy.RawModule(code=kernel_source(file), options=NVRTC_OPTIONS,
                                        name_expressions=list(family))
                module.compile()
                compile_seconds[module_key] = time.perf_counter() - start
                _modules[module_key] = module
            kernel = module.get_function(name)
            _kernels[key] = kernel
        return kernel


def _stream(device_index: int):
    import cupy

    handle = torch.cuda.current_stream(device_index).cuda_stream
    key = (device_index, handle)
    stream = _streams.get(key)
    if stream is None:
        stream = _streams[key] = cupy.cuda.ExternalStream(handle, device_index)
    return stream


class CupyLauncher:
    """Launches kernels on ``device``'s current PyTorch stream."""

    def __init__(self, device: torch.device):
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()

    def __call__(self, file: str, name: str, grid: tuple, block: int, smem: int, args: tuple) -> None:
        import cupy

        kernel = _kernel(self.device_index, file, name)
        if smem > _DEFAULT_SMEM_LIMIT:
            key = (self.device_index, file, name)
            if _smem_set.get(key, 0) < smem:
                with cupy.cuda.Device(self.device_index):
                    kernel.max_dynamic_shared_size_bytes = smem
                _smem_set[key] = smem
        with cupy.cuda.Device(self.device_index), _stream(self.device_index):
            kernel(tuple(grid), (block, 1, 1), args, shared_mem=smem)


def warm_up(device: torch.device, dtype: torch.dtype, head_dim_k: int, head_dim_v: int) -> float:
    """Compile (or load from CuPy's disk cache) every kernel a call of this shape needs;
    returns the seconds it took."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    start = time.perf_counter()
    for inner in {head_dim_k, head_dim_v}:
        tile = plan.tile_for(inner)
        _kernel(index, SWEEP_FILE, plan.sweep_name(dtype, tile, plan.FORWARD_OUTPUT))
    _kernel(index, SCAN_FILE, plan.SCAN_NAME)
    return time.perf_counter() - start
