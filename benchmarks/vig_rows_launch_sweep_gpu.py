"""vig's row-wise kernels by rows per program and warps (``vig.triton_kernels.ROWS_LAUNCH``),
on ViG-T's tensors at 224 px, batch 128 (bf16 activations, float32 residual stream), one GPU,
one run: µs per call (CUDA-graph replay, three input sets cycled, partial sums included) of
the entry as committed ("now") and of every (rows, warps) in the grid, and the best.

    python benchmarks/vig_rows_launch_sweep_gpu.py [kernel,kernel,...]

The fifteenth session's table (H100): benchmarks/RESULTS.md.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton_configs_gpu import graph_time  # noqa: E402
from vig import triton_backward as tb  # noqa: E402
from vig import triton_kernels as tk  # noqa: E402

BF, F32 = torch.bfloat16, torch.float32
N, C = 128 * 196, 192  # ViG-T's tokens and channels at 224 px, batch 128


def _r(*shape, dtype=BF):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def _heads():
    return _r(128, 196, 3, 64)


#: kernel -> (call, input maker)
CASES = {
    "rms_norm": (lambda s: tk.rms_norm(s[0], s[1], 1e-6, BF), lambda: (_r(N, C, dtype=F32), _r(C, dtype=F32))),
    "rstd": (lambda s: tk.norm_dwconv_act(s[0], s[1], 1e-6, s[2], True, BF),
             lambda: (_r(128, 14, 14, C, dtype=F32), _r(C, dtype=F32), _r(C, 1, 3, 3, dtype=F32))),
    "add_rstd": (lambda s: tk.norm_dwconv_act(s[0], s[1], 1e-6, s[2], True, BF, s[3]),
                 lambda: (_r(128, 14, 14, C, dtype=F32), _r(C, dtype=F32), _r(C, 1, 3, 3, dtype=F32),
                          _r(128, 14, 14, C))),
    "mix": (lambda s: tk.mix_global_local(*s, 1e-6, True, BF),
            lambda: (_heads(), _heads(), _heads(), _r(64, dtype=F32), _r(64, dtype=F32))),
    "add_rms_norm": (lambda s: tk.add_rms_norm(s[0], s[1], s[2], 1e-6, BF),
                     lambda: (_r(N, C, dtype=F32), _r(N, C), _r(C, dtype=F32))),
    "log_gates_pair": (lambda s: tk.log_gates_pair(s[0], 16.0), lambda: (_r(N, 64),)),
    "layer_norm_act": (lambda s: tk.layer_norm_act(s[0], s[1], s[2], 1e-6, True, BF),
                       lambda: (_r(128, 28, 28, 96), _r(96, dtype=F32), _r(96, dtype=F32))),
    "rms_norm_backward": (lambda s: tb.rms_norm_backward(s[0], s[1], 1e-6, s[2], s[3], F32),
                          lambda: (_r(N, C, dtype=F32), _r(C, dtype=F32), _r(N, C), _r(N, C, dtype=F32))),
    "layer_norm_act_backward": (lambda s: tb.layer_norm_act_backward(s[0], s[1], s[2], 1e-6, True, s[3]),
                                lambda: (_r(128, 28, 28, 96), _r(96, dtype=F32), _r(96, dtype=F32),
                                         _r(128, 28, 28, 96))),
    # (with the column sums the model asks for: the gate bias's gradient)
    "log_gates_backward": (lambda s: tb.log_gates_pair_backward(s[0], -s[1].abs(), s[2], -s[3].abs(), 16.0,
                                                                column_sums=True),
                           lambda: (_r(N, 32), _r(N, 32), _r(N, 32), _r(N, 32))),
    "column_sums": (lambda s: tb.column_sums(s[0]), lambda: (_r(N, C),)),
    "mix_backward": (lambda s: tb.mix_backward(*s[:5], 1e-6, True, s[5], output_dtype=BF),
                     lambda: (_heads(), _heads(), _heads(), _r(64, dtype=F32), _r(64, dtype=F32), _heads())),
}


#: each kernel's row width on those tensors (rows per program = elements // padded width)
WIDTHS = {"rms_norm": C, "rstd": C, "add_rstd": C, "mix": 64, "add_rms_norm": C, "log_gates_pair": 32,
          "layer_norm_act": 96, "rms_norm_backward": C, "layer_norm_act_backward": 96, "log_gates_backward": 32,
          "mix_backward": 64, "column_sums": C}


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    names = argv[0].split(",") if argv else list(CASES)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("kernel: now (elements, warps) µs | best | every (rows per program / warps): µs")
    for name in names:
        call, make = CASES[name]
        sets = [make() for _ in range(3)]
        committed = tk.ROWS_LAUNCH[name]
        now = graph_time(call, sets) * 1e3
        times = {}
        for rows, warps in itertools.product((8, 16, 32, 64), (1, 2, 4)):
            tk.ROWS_LAUNCH[name] = (rows * tk._pow2(WIDTHS[name]), warps)
            times[rows, warps] = graph_time(call, sets) * 1e3
        tk.ROWS_LAUNCH[name] = committed
        best = min(times, key=times.get)
        every = " ".join(f"{r}/{w}:{t:.1f}" for (r, w), t in times.items())
        print(f"{name}: now {committed} {now:.1f} | best {best} {times[best]:.1f} | {every}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
