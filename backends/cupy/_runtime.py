"""Compiling and launching the kernels with CuPy, on PyTorch's current CUDA stream.

Modules are compiled by NVRTC (``cupy.RawModule``) the first time a (source, kernels,
device architecture) combination is needed, kept for the life of the process, and cached on
disk by CuPy (``~/.cupy/kernel_cache``, or ``$CUPY_CACHE_DIR``) under a key that covers the
source text, the compile options, the architecture and the NVRTC version — so the next
process loads the binary instead of compiling. Tensors travel as raw device addresses: no
copy, no DLPack round trip, no synchronisation.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import warnings

import torch

from . import _plan as plan
from ._sources import CHUNK_BACKWARD_FILE, CHUNK_FORWARD_FILE, SCAN_FILE, SWEEP_FILE, kernel_source, source_digest

#: NVRTC options; part of the cache key (CuPy adds the architecture and ``-ftz=true``).
NVRTC_OPTIONS = ("-std=c++17",)
#: dynamic shared memory a kernel may use without opting in
_DEFAULT_SMEM_LIMIT = 48 * 1024

_lock = threading.Lock()
_modules: dict[tuple, object] = {}
_kernels: dict[tuple, object] = {}
_smem_set: dict[tuple, int] = {}
_streams: dict[tuple, object] = {}
_functions: dict[tuple, object] = {}
#: seconds spent compiling (or loading from the disk cache) each module in this process
compile_seconds: dict[tuple, float] = {}


def _family_of(file: str, name: str) -> tuple[str, ...]:
    """The name expressions compiled together with ``name`` (one NVRTC call)."""
    if file == SCAN_FILE:
        return plan.scan_family()
    if file in (CHUNK_FORWARD_FILE, CHUNK_BACKWARD_FILE):  # one kernel a module: a call needs one shape
        return (name,)
    # gla::gla_sweep<dtype, tile, role>: every role of that dtype and tile
    prefix = name[: name.rindex(",")]
    return tuple(f"{prefix}, {role}>" for role in plan.ROLES)


def _kernel(device_index: int, file: str, name: str):
    """The compiled kernel ``name`` of ``file`` for device ``device_index``."""
    kernel = _kernels.get((device_index, file, name))
    if kernel is not None:
        return kernel
    import cupy

    with _lock, cupy.cuda.Device(device_index) as device:
        family = _family_of(file, name)
        module_key = (device.compute_capability, file, source_digest(file), NVRTC_OPTIONS, family)
        module = _modules.get(module_key)
        if module is None:
            start = time.perf_counter()
            module = cupy.RawModule(code=kernel_source(file), options=NVRTC_OPTIONS, name_expressions=list(family))
            module.compile()
            compile_seconds[module_key] = time.perf_counter() - start
            _modules[module_key] = module
        kernel = _kernels[(device_index, file, name)] = module.get_function(name)
        return kernel


def _stream(device_index: int):
    """CuPy's handle on PyTorch's current stream of ``device_index`` (cached per stream)."""
    import cupy

    torch_stream = torch.cuda.current_stream(device_index)
    key = (device_index, torch_stream.cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        try:
            stream = cupy.cuda.Stream.from_external(torch_stream)
        except Exception:  # CuPy or PyTorch without the __cuda_stream__ protocol
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)
        _streams[key] = stream
    return stream


@functools.lru_cache(maxsize=None)
def device_capability(device_index: int) -> tuple[int, int]:
    """The device's compute capability, read once per process (dispatch asks on every call)."""
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class CupyLauncher:
    """Launches kernels on ``device``'s current PyTorch stream.

    Host time matters at ViG's sizes (a forward is one short kernel), so the common path
    is a cached ``cupy.cuda.Function`` called with the stream as an argument: no device or
    stream context is entered unless CuPy's current device differs from the tensors'."""

    def __init__(self, device: torch.device):
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        # the tensor-core forward's mma.sync / movmatrix need sm_80 or newer
        self.tensor_cores = device_capability(self.device_index) >= (8, 0)
        self.sm_count = sm_count(self.device_index)  # the tensor-core forward's launch depends on it

    def __call__(self, file: str, name: str, grid: tuple, block: int, smem: int, args: tuple) -> None:
        import cupy

        index = self.device_index
        if cupy.cuda.runtime.getDevice() != index:
            with cupy.cuda.Device(index):
                return self(file, name, grid, block, smem, args)
        key = (index, file, name)
        kernel = _kernel(index, file, name)
        if smem > _DEFAULT_SMEM_LIMIT and _smem_set.get(key, 0) < smem:
            kernel.max_dynamic_shared_size_bytes = smem
            _smem_set[key] = smem
        stream = _stream(index)
        function = _functions.get(key)
        if function is None:
            function = _functions[key] = getattr(kernel, "kernel", None) or False
        if function:
            try:
                function(tuple(grid), (block, 1, 1), args, smem, stream)
                return
            except TypeError:  # a CuPy whose Function takes other arguments
                _functions[key] = False
        with stream:
            kernel(tuple(grid), (block, 1, 1), args, shared_mem=smem)


def warm_up(device: torch.device, dtype: torch.dtype, head_dim_k: int, head_dim_v: int) -> float:
    """Compile (or load from CuPy's disk cache) every kernel a call of this shape needs;
    returns the seconds it took."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    start = time.perf_counter()
    for inner in {head_dim_k, head_dim_v}:
        tile = plan.tile_for(inner)
        _kernel(index, SWEEP_FILE, plan.sweep_name(dtype, tile, plan.FORWARD_OUTPUT))
    if plan.chunk_forward_fits(dtype, 1, head_dim_k, head_dim_v, False) and device_capability(index) >= (8, 0):
        for bidirectional in (True, False):  # the launches of a full grid (ViG's batches)
            launch = plan.chunk_forward_launch(10**6, head_dim_v, bidirectional, sm_count(index))
            for output in (True, False):
                name = plan.chunk_forward_name(dtype, head_dim_k, head_dim_v, bidirectional, launch, output)
                _kernel(index, CHUNK_FORWARD_FILE, name)
    if plan.chunk_backward_fits(dtype, 1, head_dim_k, head_dim_v, False) and device_capability(index) >= (8, 0):
        # ViG's 224 px sequences and segments of longer ones (their adjoint walks can differ)
        for bidirectional, length in itertools.product((True, False), (196, plan.CHUNK_LEN)):
            launch = plan.chunk_backward_launch(10**6, head_dim_k, head_dim_v, bidirectional, length, sm_count(index))
            _kernel(index, CHUNK_BACKWARD_FILE, plan.chunk_backward_dq_name(dtype, head_dim_k, head_dim_v, bidirectional, launch))
            walks = ((False, True),) + (() if launch.fused else ((True, False), (False, False)))
            for dv, local in walks:
                name = plan.chunk_backward_adjoint_name(dtype, dv, head_dim_k, head_dim_v, bidirectional, launch, local)
                _kernel(index, CHUNK_BACKWARD_FILE, name)
            if launch.fused:
                name = plan.chunk_backward_fused_name(dtype, head_dim_k, head_dim_v, bidirectional, launch)
                _kernel(index, CHUNK_BACKWARD_FILE, name)
    _kernel(index, SCAN_FILE, plan.SCAN_NAME)
    return time.perf_counter() - start
