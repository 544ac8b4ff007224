"""Shared pieces of every benchmark: the DESIGN.md §7 shapes, inputs, memory floors, timing.

Used by ``glakernels bench``, the asv suites and the GPU benchmark scripts, so that they all
time the same thing the same way.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_len: int
    heads: int
    head_dim_k: int
    head_dim_v: int

    def __str__(self) -> str:
        return (
            f"{self.name}(B={self.batch},T={self.seq_len},H={self.heads},"
            f"K={self.head_dim_k},V={self.head_dim_v})"
        )


#: DESIGN.md §7: the shapes every benchmark uses (B, T, H, K, V).
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("vigT_224", 128, 196, 3, 32, 64),
        Shape("vigB_224", 64, 196, 12, 32, 64),
        Shape("vigT_1024", 8, 4096, 3, 32, 64),
        Shape("vigT_2048", 2, 16384, 3, 32, 64),
        Shape("lm_4k", 4, 4096, 8, 128, 128),
    )
}

#: Small versions for CPU runs: ViG-T at 224 px with B=8 and at 1024 px with B=1.
CPU_SHAPES: dict[str, Shape] = {
    "vigT_224_B8": Shape("vigT_224_B8", 8, 196, 3, 32, 64),
    "vigT_1024_B1": Shape("vigT_1024_B1", 1, 4096, 3, 32, 64),
}

#: Each DESIGN shape cut down (batch, then length) so that a CPU benchmark of the slowest
#: backend stays well under a second; same heads and head dims as the original.
_CPU_SCALED = {
    "vigT_224": (2, 196),
    "vigB_224": (1, 196),
    "vigT_1024": (1, 1024),
    "vigT_2048": (1, 2048),
    "lm_4k": (1, 256),
}


def shape_for_device(name: str, device_type: str) -> Shape:
    """The DESIGN §7 shape ``name`` on GPUs; its cut-down version (same name) on the CPU."""
    shape = SHAPES[name]
    if device_type != "cpu":
        return shape
    batch, seq_len = _CPU_SCALED[name]
    return Shape(name, batch, seq_len, shape.heads, shape.head_dim_k, shape.head_dim_v)


def random_inputs(
    shape: Shape,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    bidirectional: bool = True,
    requires_grad: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """ViG-like inputs: unit-variance q, k, v; gates ``logsigmoid(x) / 16`` as in ViG."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K, V = shape.batch, shape.seq_len, shape.heads, shape.head_dim_k, shape.head_dim_v

    def make(*size, gate=False):
        x = torch.randn(*size, generator=gen)
        if gate:
            x = F.logsigmoid(x) / 16
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    inputs = {
        "q": make(B, T, H, K),
        "k": make(B, T, H, K),
        "v": make(B, T, H, V),
        "g": make(B, T, H, K, gate=True),
    }
    if bidirectional:
        inputs["g_reverse"] = make(B, T, H, K, gate=True)
    return inputs


def memory_floor_bytes(shape: Shape, dtype: torch.dtype, *, bidirectional: bool = True, backward: bool = False) -> int:
    """Bytes that must move: read q, k, v, g (and g_reverse), write o; with ``backward`` also
    read those and dO, and write every input gradient (~2.75x the forward at ViG's shapes)."""
    size = torch.tensor([], dtype=dtype).element_size()
    tokens = shape.batch * shape.seq_len * shape.heads
    gates = 2 if bidirectional else 1
    inputs = tokens * ((2 + gates) * shape.head_dim_k + shape.head_dim_v)
    output = tokens * shape.head_dim_v
    forward = inputs + output
    if not backward:
        return forward * size
    return (forward + (inputs + output) + inputs) * size


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """``fn`` captured once in a CUDA graph, after ``warmup`` calls on a side stream (lazy
    initialisation, kernel compilation and allocations must not happen during capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def median_time(fn: Callable[[], object], device: str | torch.device = "cpu", *, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in seconds; GPU work is synchronised around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str | torch.device = "cpu") -> float:
    """Measured device-memory bandwidth in bytes/s (bytes read plus written by a large copy):
    the rate the memory floor is taken at, measured on the machine that runs the benchmark."""
    cuda = torch.device(device).type == "cuda"
    numel = (1 << 28) if cuda else (1 << 25)  # 1 GiB on GPUs, 128 MiB on the CPU (float32)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, warmup=2, repeats=9)
    return 2 * src.numel() * src.element_size() / seconds


@contextlib.contextmanager
def kernels_replaced(backend: str, output: torch.Tensor, gradients: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, backend ``backend``'s ``forward`` returns ``output`` (and no state) and
    its ``backward`` returns ``gradients`` (dq, dk, dv, dg, dg_reverse), doing no work: a call
    then costs only what surrounds the kernels (validation, dispatch, the eager path, autograd).
    ``benchmarks/host_overhead.py --layers`` and asv's ``TimeOpLayer`` time calls so. Not
    thread-safe: every call of that backend in the process sees the replacement."""
    from ._dispatch import get_backend
    from ._problem import GLAGradients

    target = get_backend(backend)
    own = {name: vars(target)[name] for name in ("forward", "backward") if name in vars(target)}
    dq, dk, dv, dg, dg_reverse = gradients
    # instance attributes shadow the class's methods until they are deleted again
    target.forward = lambda inputs: (output, None)
    target.backward = lambda inputs, grad_output, grad_state: GLAGradients(dq, dk, dv, dg, dg_reverse, None)
    try:
        yield
    finally:
        for name in ("forward", "backward"):
            if name in own:
                setattr(target, name, own[name])
            else:
                delattr(target, name)
