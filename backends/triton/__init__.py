"""The ``triton`` backend: chunked Triton kernels for CUDA GPUs, forward and backward, causal
and bidirectional, both directions fused in one launch (algorithm: ``kernels.py``).

On a machine without a GPU the same kernels run on CPU tensors through Triton's interpreter
when ``TRITON_INTERPRET=1`` is set before the kernels are first used — slowly, for tests; the
backend is then runnable on ``cpu`` by name but never chosen automatically there.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from glakernels._backend import Backend
from glakernels._dispatch import register_backend
from glakernels._problem import GLAGradients, GLAInputs

_TRUE = ("1", "true", "on", "yes", "y")


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter is on (read the way Triton reads it, at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


class TritonBackend(Backend):
    name = "triton"
    description = "chunked Triton kernels, both directions fused in one launch (CUDA; CPU under TRITON_INTERPRET=1)"
    device_types = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim_k = 256
    max_head_dim_v = 256
    # second on CUDA, after cupy, for the calls the ranking below leaves out (K > 128; most
    # training calls with K or V > 64; float32 forwards with K > 64), where only the two-phase
    # kernels run or where cupy was not measured slower
    auto_priority = {"cuda": 100}
    #: Rank of the calls the single-pass kernels run where they measured faster than cupy:
    #: above cupy's 200. With the default matmul precision (16-bit inputs split their float32
    #: operands, ``launch._dot_mode``): forward-only calls with K <= 64, 16-bit forward-only
    #: calls with K <= 128, training calls with K, V <= 64 (float32 inputs: on sequences over
    #: ``SINGLE_SEGMENT_MAX_T`` only), and 16-bit training calls on such long sequences
    #: with 64 < K, V <= 128 (below). H100,
    #: bf16, CUDA-graph GPU time (`python benchmarks/triton_configs_gpu.py --shapes
    #: vigT_224,vigB_224,vigT_1024 --variants= [--backward]`, NOTES.md session 8, three runs),
    #: triton / cupy µs: forward vigT_224 94 / 109, vigT_1024 175 / 297; forward+backward
    #: vigT_224 462 / 469, 457 / 466, 463 / 471, vigB_224 892 / 910, 892 / 917, 894 / 875 (a
    #: tie), vigT_1024 725 / 1087; since the backward's split launches (session 9): vigT_224
    #: 415 / 468, vigB_224 824 / 915, vigT_1024 676 / 1125 (session 6: lm_4k, K = 128,
    #: forward 2160 / 1964, so cupy kept 64 < K <= 128 until the ratio chunk math of session
    #: 18: lm_4k forward 1181 / 1974 in session 19, `python -m glakernels.backends.cupy.tune
    #: --backends triton,cupy`, where triton led cupy's sweeps at every DESIGN §7 shape;
    #: cupy's later tensor-core kernels rank above it for the calls they take). Also 16-bit
    #: training calls with 64 < K, V <= 128 on sequences over ``SINGLE_SEGMENT_MAX_T``, where
    #: the two-phase backward runs with the ratio math since session 19: forward+backward
    #: lm_4k 6251 / 7669 (`python benchmarks/triton_configs_gpu.py --backward --shapes
    #: lm_4k,32x196x8x128x128,64x256x16x36x72 --variants ";two_phase_bwd_ratio=False"`;
    #: cupy stays first on the other two: 2191 / 1791 and 14370 / 4585).
    single_pass_priority = 300
    # torch.compile traces the launches on CUDA, forward and backward (not the interpreter's:
    # Dynamo records only compiled Triton kernels). H100, ViG-T under the default
    # torch.compile, 224 px batch 128: inference 15,547 -> 17,296 img/s (NOTES.md, session
    # 10), training step 2,165 -> 2,884-3,311 (session 11)
    traceable_on = frozenset({"cuda"})
    # the interpreter runs every program in Python: keep the shared CPU suites' problems small
    test_max_tokens_cpu = 300

    def unavailable_reasons(self) -> list[str]:
        try:
            import triton  # noqa: F401
        except ImportError:
            return ["triton is not installed (pip install -e '.[triton]' from a checkout, or triton)"]
        if not interpreter_enabled() and not torch.cuda.is_available():
            return ["no CUDA GPU (TRITON_INTERPRET=1 runs the kernels on CPU, slowly, for testing)"]
        return []

    def priority_for_problem(self, spec) -> Optional[int]:
        base = self.priority_for(spec.device_type)
        if base is None or spec.device_type != "cuda":
            return base
        from .launch import SINGLE_PASS_FORWARD_MAX_K, SINGLE_PASS_MAX_K, SINGLE_SEGMENT_MAX_T

        half = spec.dtype in (torch.float16, torch.bfloat16)
        narrow = spec.head_dim_k <= SINGLE_PASS_MAX_K
        if spec.needs_grad:
            # short-sequence training was measured with 16-bit inputs only: float32 stays with cupy
            wins = narrow and spec.head_dim_v <= SINGLE_PASS_MAX_K and (half or spec.seq_len > SINGLE_SEGMENT_MAX_T)
            # the two-phase backward's ratio math won on long sequences with wide heads (lm_4k),
            # not on short ones (T = 196, K = V = 128) nor with a narrow K (K = 36, V = 72)
            wide_heads = all(SINGLE_PASS_MAX_K < d <= SINGLE_PASS_FORWARD_MAX_K
                             for d in (spec.head_dim_k, spec.head_dim_v))
            wins = wins or (half and wide_heads and spec.seq_len > SINGLE_SEGMENT_MAX_T)
        else:
            wins = narrow or (half and spec.head_dim_k <= SINGLE_PASS_FORWARD_MAX_K)
        return self.single_pass_priority if wins else base

    def runs_on(self) -> frozenset[str]:
        return self.device_types | {"cpu"} if interpreter_enabled() else self.device_types

    def forward(self, inputs: GLAInputs):
        from . import launch

        spec = inputs.spec
        return launch.forward(
            inputs.q, inputs.k, inputs.v, inputs.g, inputs.g_reverse, inputs.initial_state,
            inputs.scale, spec.bidirectional, spec.output_final_state,
        )

    def prepare_backward(self, inputs: GLAInputs) -> None:
        # the backward's kernels compile in background threads while the forward compiles
        # and runs (compile_ahead.py; on unless switched off); the interpreter compiles nothing
        if inputs.q.device.type == "cuda" and not interpreter_enabled():
            from . import compile_ahead

            compile_ahead.start(inputs.q, inputs.k, inputs.v, inputs.g, inputs.g_reverse, inputs.initial_state,
                                inputs.scale, inputs.spec.bidirectional, inputs.spec.output_final_state)

    def backward(self, inputs: GLAInputs, grad_output: torch.Tensor, grad_final_state: Optional[torch.Tensor]):
        from . import launch

        dq, dk, dv, dg, dg_reverse, d_initial = launch.backward(
            inputs.q, inputs.k, inputs.v, inputs.g, inputs.g_reverse, inputs.initial_state,
            grad_output, grad_final_state, inputs.scale, inputs.spec.bidirectional,
        )
        return GLAGradients(dq, dk, dv, dg, dg_reverse, d_initial)


register_backend(TritonBackend())
