"""asv suites for the op: every registered backend × DESIGN §7 shape × dtype × direction.

Backends come from the registry, so a new backend is benchmarked as soon as it registers.
A combination a backend cannot run on this machine (not installed, wrong device, dtype...)
raises ``NotImplementedError`` in ``setup``, which asv records as skipped. On a CUDA machine the
shapes are DESIGN §7's; on the CPU they are cut down (``glakernels.bench.shape_for_device``).
JIT compilation and autotuning happen in ``setup``, so ``time_*`` holds only the measured call;
GPU work is synchronised inside every timed call. ``GLAKERNELS_ASV_{BACKENDS,SHAPES,DTYPES,
DIRECTIONS}`` (comma-separated) restrict the parameter grid, e.g. for a short GPU recording.
"""

import os

import torch

from glakernels import bench, gated_linear_attention
from glakernels._dispatch import registry
from glakernels._problem import ProblemSpec


def _selection(variable: str, default: list[str]) -> list[str]:
    """A comma-separated subset from the environment, e.g. GLAKERNELS_ASV_BACKENDS=triton,cupy
    to record a short GPU run; the default is every value."""
    chosen = [v.strip() for v in os.environ.get(variable, "").split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(default))
    if unknown:
        raise ValueError(f"{variable}: unknown {unknown}; choose from {default}")
    return chosen or default


BACKENDS = _selection("GLAKERNELS_ASV_BACKENDS", registry.names())
SHAPES = _selection("GLAKERNELS_ASV_SHAPES", list(bench.SHAPES))
DTYPES = _selection("GLAKERNELS_ASV_DTYPES", ["bfloat16", "float32"])
DIRECTIONS = _selection("GLAKERNELS_ASV_DIRECTIONS", ["bidirectional", "causal"])


def _device() -> str:
    # decided inside each benchmark process, never at import: asv's forkserver imports this
    # module once and forks, and CUDA must not be initialised before the fork
    return "cuda" if torch.cuda.is_available() else "cpu"


def _require_support(backend: str, shape: bench.Shape, dtype: torch.dtype, device: str, bidirectional: bool):
    """Raise ``NotImplementedError`` (asv: skipped) where ``backend`` cannot run the problem here."""
    spec = ProblemSpec(shape.batch, shape.seq_len, shape.heads, shape.head_dim_k, shape.head_dim_v, dtype,
                       torch.device(device).type, bidirectional)
    reasons = registry.get(backend).not_supported_reasons(spec)
    if reasons:
        raise NotImplementedError(f"{backend}: {'; '.join(reasons)}")


class _Op:
    params = (BACKENDS, SHAPES, DTYPES, DIRECTIONS)
    param_names = ["backend", "shape", "dtype", "direction"]
    timeout = 600

    def setup(self, backend, shape_name, dtype_name, direction):
        self.device = _device()
        self.shape = bench.shape_for_device(shape_name, torch.device(self.device).type)
        self.dtype = getattr(torch, dtype_name)
        self.bidirectional = direction == "bidirectional"
        s = self.shape
        _require_support(backend, s, self.dtype, self.device, self.bidirectional)
        self.backend = backend
        self.inputs = bench.random_inputs(s, self.dtype, self.device, bidirectional=self.bidirectional,
                                          requires_grad=True)
        self.grad = torch.randn(s.batch, s.seq_len, s.heads, s.head_dim_v, device=self.device, dtype=self.dtype)
        self.forward_backward()  # compile / autotune / JIT outside the timings

    def forward(self):
        with torch.no_grad():
            gated_linear_attention(**self.inputs, bidirectional=self.bidirectional, backend=self.backend)
        bench.synchronize(self.device)

    def forward_backward(self):
        out = gated_linear_attention(**self.inputs, bidirectional=self.bidirectional, backend=self.backend)
        out.backward(self.grad)
        bench.synchronize(self.device)


class TimeOp(_Op):
    """Wall time of one call (forward only, and forward + backward)."""

    def time_forward(self, *params):
        self.forward()

    def time_forward_backward(self, *params):
        self.forward_backward()


class MemoryOp(_Op):
    """Peak process memory (RSS) of forward + backward."""

    def peakmem_forward_backward(self, *params):
        self.forward_backward()


class GpuMemoryOp(_Op):
    """Peak GPU memory the allocator held during forward + backward, above the inputs."""

    def setup(self, *params):
        if _device() != "cuda":
            raise NotImplementedError("GPU memory is tracked on CUDA machines only")
        super().setup(*params)

    def track_peak_memory_forward_backward(self, *params):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.forward_backward()
        return torch.cuda.max_memory_allocated() - before

    track_peak_memory_forward_backward.unit = "bytes"


class BandwidthOp(_Op):
    """Achieved bandwidth (bytes that must move / time) and time over the memory floor, the
    floor taken at this machine's measured copy bandwidth (DESIGN §8 uses 3.0 TB/s on H100)."""

    def setup_cache(self):
        return bench.copy_bandwidth(_device())

    def setup(self, bandwidth, *params):
        super().setup(*params)
        self.copy_bandwidth = bandwidth

    def _bytes(self, backward):
        return bench.memory_floor_bytes(self.shape, self.dtype, bidirectional=self.bidirectional, backward=backward)

    def track_forward_bandwidth(self, *params):
        return self._bytes(False) / bench.median_time(self.forward, self.device, warmup=1, repeats=3) / 1e9

    track_forward_bandwidth.unit = "GB/s"

    def track_forward_floor_ratio(self, *params):
        return bench.median_time(self.forward, self.device, warmup=1, repeats=3) / (self._bytes(False) / self.copy_bandwidth)

    track_forward_floor_ratio.unit = "x floor"

    def track_forward_backward_floor_ratio(self, *params):
        return bench.median_time(self.forward_backward, self.device, warmup=1, repeats=3) / (self._bytes(True) / self.copy_bandwidth)

    track_forward_backward_floor_ratio.unit = "x floor"


#: batches of ViG-T at 224 px (T = 196, 3 heads, K = 32, V = 64) for the latency regime
SMALL_BATCHES = [1, 8, 32]
_SMALL_BATCH_CALLS = 10  # forward calls per graph replay


class GpuOpSmallBatch:
    """GPU time of one bfloat16 forward at small batch (ViG-T at 224 px), replayed from a CUDA
    graph, in µs: the latency regime (batch-1 inference, DiG's sampling steps), where the
    grid leaves most SMs idle and a launch is bound by its chain of chunk steps, not by the
    memory floor; the graph keeps host time out. CUDA machines only."""

    params = (BACKENDS, SMALL_BATCHES, DIRECTIONS)
    param_names = ["backend", "batch", "direction"]
    timeout = 600

    def setup(self, backend, batch, direction):
        if _device() != "cuda":
            raise NotImplementedError("the small-batch regime is measured on CUDA machines only")
        base = bench.SHAPES["vigT_224"]
        shape = bench.Shape(f"vigT_224_B{batch}", batch, base.seq_len, base.heads, base.head_dim_k, base.head_dim_v)
        bidirectional = direction == "bidirectional"
        _require_support(backend, shape, torch.bfloat16, "cuda", bidirectional)
        inputs = bench.random_inputs(shape, torch.bfloat16, "cuda", bidirectional=bidirectional)

        def calls():
            with torch.no_grad():
                for _ in range(_SMALL_BATCH_CALLS):
                    gated_linear_attention(**inputs, bidirectional=bidirectional, backend=backend)

        self.graph = bench.capture_cuda_graph(calls)

    def track_forward_us(self, *params):
        return bench.median_time(self.graph.replay, "cuda", warmup=1, repeats=7) / _SMALL_BATCH_CALLS * 1e6

    track_forward_us.unit = "us"
