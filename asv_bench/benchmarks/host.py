"""asv suites for the host time of one eager call: what a call costs besides its kernels.

At ViG's sizes an eager call's Python and launches take longer than its GPU work (H200,
vigT_224, bf16: ~0.8-0.95 ms of host time for a forward+backward against 0.15-0.26 ms on the
GPU; ``benchmarks/host_overhead.py``, ``benchmarks/RESULTS.md`` twenty-eighth session). These
suites track that cost over commits, on a problem small enough that the kernels hardly count
(one sequence of 16 tokens, one head, K = V = 16):

- ``TimeOpTiny``: a real call on every backend that runs here;
- ``TimeOpLayer``: the same call with the backend's kernels replaced by functions returning
  preallocated tensors (``glakernels.bench.kernels_replaced``): glakernels' validation,
  dispatch and eager path plus PyTorch's autograd, and nothing else.

Calls are not synchronised: on a GPU, the time is the host's, which is the point here (the
GPU keeps up with calls this small).
"""

import torch

from glakernels import bench, gated_linear_attention

from .ops import BACKENDS, _device, _require_support

TINY = bench.Shape("tiny", 1, 16, 1, 16, 16)


class _Tiny:
    params = (BACKENDS, ["bfloat16", "float32"])
    param_names = ["backend", "dtype"]
    timeout = 300

    def setup(self, backend, dtype_name):
        self.device = _device()
        self.dtype = getattr(torch, dtype_name)
        _require_support(backend, TINY, self.dtype, self.device, True)
        self.backend = backend
        self.inputs = bench.random_inputs(TINY, self.dtype, self.device, requires_grad=True)
        self.tensors = list(self.inputs.values())
        self.grad = torch.randn_like(self.inputs["v"])
        self.time_forward_backward()  # compile / JIT outside the timings
        bench.synchronize(self.device)

    def time_forward(self, *params):
        with torch.no_grad():
            gated_linear_attention(**self.inputs, backend=self.backend)

    def time_forward_backward(self, *params):
        out = gated_linear_attention(**self.inputs, backend=self.backend)
        torch.autograd.grad(out, self.tensors, self.grad)


class TimeOpTiny(_Tiny):
    pass


class TimeOpLayer(_Tiny):
    def setup(self, backend, dtype_name):
        super().setup(backend, dtype_name)
        output = torch.empty_like(self.inputs["v"])
        gradients = [torch.empty_like(t) for t in self.tensors]
        self._replaced = bench.kernels_replaced(backend, output, gradients)
        self._replaced.__enter__()

    def teardown(self, *params):
        replaced = getattr(self, "_replaced", None)  # (asv tears down skipped setups too)
        if replaced is not None:
            replaced.__exit__(None, None, None)
