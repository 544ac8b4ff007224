"""The ``cupy`` backend: raw CUDA C++ kernels compiled by CuPy (NVRTC) on first use.

Sources: ``kernels/gla_sweep.cu`` (every recurrent sweep, forward and backward, both
directions in one launch), ``kernels/gla_scan.cu`` (stitching time chunks together) and
``kernels/gla_chunk_forward.cu`` (the tensor-core forward of 16-bit calls with K <= 32,
V <= 64 and no states, on sm_80 and newer) and ``kernels/gla_chunk_backward.cu`` (the
tensor-core backward of such calls); each algorithm is described at the top of its
file. Kernels run on PyTorch's current CUDA stream with the tensors' device addresses as
arguments: no copies, no synchronisation, so the op can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from glakernels._backend import Backend
from glakernels._dispatch import register_backend
from glakernels._problem import GLAInputs

from ._plan import MAX_HEAD_DIM


class CupyBackend(Backend):
    name = "cupy"
    description = "raw CUDA C++ kernels compiled by CuPy/NVRTC on first use (CUDA GPUs)"
    device_types = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim_k = MAX_HEAD_DIM
    max_head_dim_v = MAX_HEAD_DIM
    # The base rank on CUDA: above triton's base 100 (the calls neither backend's fast kernels
    # take: wider heads, float32 training on short sequences), below triton's single-pass
    # kernels (300) and this backend's own tensor-core kernels (400, below), which the
    # automatic selection ranks per call.
    auto_priority = {"cuda": 200}

    #: Rank of the calls the tensor-core kernels take where they measured faster than triton's,
    #: above triton's 300 for its single-pass kernels. H100, CUDA-graph GPU time, cupy / triton.
    #: Forward-only bidirectional 16-bit calls with K <= 32 and V <= 64 (multiples of 16), the
    #: tensor-core forward (kernels/gla_chunk_forward.cu; `python benchmarks/cupy_chunk_forward_gpu.py
    #: [--dtype float16]`, NOTES.md runs 21c-d, h), µs: bfloat16 vigT_224 36.9 / 54.3, vigB_224
    #: 69.8 / 102.6, 8 x 196 x 3 17.1 / 17.5, 32 x 512 x 3 42.5 / 52.7, vigT_1024 74.7 / 114.8,
    #: vigT_2048 78.1 / 118.4; float16 vigT_224 43.3 / 58.0, vigB_224 83.1 / 111.0, vigT_1024
    #: 83.4 / 128.3, 8 x 196 x 3 18.0 / 17.7. Forward-only causal calls tied or lost on short
    #: sequences (0.89-1.15x): triton keeps them.
    #: Training calls (forward + backward) in bfloat16 with those head dims, both modes, the
    #: tensor-core forward and backward (kernels/gla_chunk_backward.cu; `python
    #: benchmarks/cupy_chunk_backward_gpu.py`, NOTES.md runs 22c, 22h), forward + backward µs:
    #: bidirectional vigT_224 162 / 297, vigB_224 332 / 572, 32 x 512 x 3 151 / 264, vigT_1024
    #: 303 / 491, vigT_2048 325 / 499, but 8 x 196 x 3 89 / 77 (24 sequences: too few blocks);
    #: causal vigT_224 96 / 139, 8 x 196 x 3 57 / 56, vigT_1024 222 / 247, vigT_2048 234 / 252.
    #: The choice may not depend on B or H (a sequence's bits would then depend on the batch),
    #: so small batches pay the 1.16x. float16 training calls too since session 24 (dout and v
    #: as two exact bfloat16 parts; NOTES.md run 24b, `--dtype float16`), forward + backward µs,
    #: cupy / triton: bidirectional vigT_224 185 / 335, vigB_224 371 / 633, 8 x 196 x 3 83 /
    #: 85, vigT_1024 345 / 569; causal vigT_224 94 / 160, 8 x 196 x 3 55 / 66, vigT_1024 203 / 290.
    chunk_kernels_priority = 400

    def priority_for_problem(self, spec) -> Optional[int]:
        base = self.priority_for(spec.device_type)
        if base is None or spec.device_type != "cuda":
            return base
        from ._plan import chunk_backward_fits, chunk_forward_fits
        from ._runtime import device_capability

        shape = (spec.dtype, spec.seq_len, spec.head_dim_k, spec.head_dim_v, spec.uses_states)
        fits = chunk_backward_fits(*shape) if spec.needs_grad else spec.bidirectional and chunk_forward_fits(*shape)
        if fits and device_capability(torch.cuda.current_device()) >= (8, 0):
            return self.chunk_kernels_priority
        return base

    def unavailable_reasons(self) -> list[str]:
        reasons = []
        try:
            import cupy  # noqa: F401
        except Exception as exc:  # ImportError, or a CuPy built for another CUDA
            reasons.append(f"cupy is not importable ({type(exc).__name__}: {exc}); "
                           "pip install -e '.[cupy]' from a checkout, or cupy-cuda13x")
        if torch.version.cuda is None:
            reasons.append("this PyTorch build has no CUDA support")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA GPU is visible")
        return reasons

    def forward(self, inputs: GLAInputs):
        from ._driver import forward
        from ._runtime import CupyLauncher

        return forward(inputs, CupyLauncher(inputs.q.device))

    def backward(self, inputs: GLAInputs, grad_output: torch.Tensor, grad_final_state: Optional[torch.Tensor]):
        from ._driver import backward
        from ._runtime import CupyLauncher

        return backward(inputs, grad_output.contiguous(), grad_final_state, CupyLauncher(inputs.q.device))


register_backend(CupyBackend())
