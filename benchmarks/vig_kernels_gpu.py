"""vig's Triton forward kernels against the PyTorch forms they replace, on ViG-T's tensors.

For each DESIGN.md §8 model point (224 px batch 128, 1024 px batch 8: ViG-T's token grid,
192 channels, 3 heads of 64, SwiGLU hidden 512) and each :mod:`vig.fused` forward, under bf16
autocast as in the model: GPU time per call with the kernels (``VIG_TRITON_KERNELS`` auto)
and without them (the PyTorch forms), their ratio, and the time the bytes that must move take
at the measured copy bandwidth (the memory floor). Calls are replayed from a CUDA graph, so
host time is not counted.

    python benchmarks/vig_kernels_gpu.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from glakernels.bench import capture_cuda_graph, copy_bandwidth, median_time  # noqa: E402
from vig import fused, triton_kernels  # noqa: E402

POINTS = {"224px_b128": (128, 14), "1024px_b8": (8, 64)}
C, HEADS, HIDDEN = 192, 3, 512
CALLS_PER_REPLAY = 20


def cases(batch: int, side: int, device: torch.device):
    """name -> (function of no arguments, bytes it must read and write)."""
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s, dtype=torch.bfloat16: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
    tokens = batch * side * side
    x = rand(batch, side, side, C, dtype=torch.float32)  # the float32 residual stream under autocast
    norm_w, dw_w = rand(C, dtype=torch.float32), rand(C, 1, 3, 3, dtype=torch.float32)
    a, b, z = (rand(batch, side * side, HEADS, C // HEADS) for _ in range(3))
    wa, wb = rand(C // HEADS, dtype=torch.float32), rand(C // HEADS, dtype=torch.float32)
    projected = rand(batch, side * side, 2 * HIDDEN)
    branch = rand(batch, side, side, C)
    logits = rand(batch, side * side, C)  # [forward | reverse] gate logits, K = C/2 each
    # the patch embedding's first channel norm: C/2 channels at twice the grid's side
    embed = rand(batch, 2 * side, 2 * side, C // 2)
    embed_w, embed_b = rand(C // 2, dtype=torch.float32), rand(C // 2, dtype=torch.float32)
    # the patch embedding's first convolution: the float32 image in, C/2 channels out (k9 s8)
    image = rand(batch, 3, 16 * side, 16 * side, dtype=torch.float32)
    conv_w, conv_b = rand(C // 2, 3, 9, 9, dtype=torch.float32), rand(C // 2, dtype=torch.float32)
    # the fused matmuls (vig.triton_matmuls): the MLP's input projection with its product, and
    # the gates' two low-rank projections with their log gates; float32 weights, as autocast sees them
    local = rand(batch, side, side, C)
    w_in, w_out = rand(2 * HIDDEN, C, dtype=torch.float32) * C**-0.5, rand(C, HIDDEN, dtype=torch.float32)
    w0, w1, b1 = rand(16, C, dtype=torch.float32), rand(C, 16, dtype=torch.float32), rand(C, dtype=torch.float32)
    return {
        "patch conv": (lambda: fused.patch_conv(image, conv_w, conv_b, 8, 1),
                       image.numel() * 4 + 4 * tokens * C // 2 * 2),
        "add+rms_norm": (lambda: fused.add_rms_norm(x, branch, norm_w, 1e-6, to_autocast_dtype=True),
                         tokens * C * (4 + 2 + 4 + 2)),
        "log gates pair": (lambda: fused.log_gates_pair(logits, 16.0), tokens * C * 2 * 2),
        "layer_norm+silu": (lambda: fused.layer_norm_act(embed, embed_w, embed_b, 1e-6, True, torch.bfloat16),
                            4 * tokens * C // 2 * 2 * 2),
        "rms_norm -> bf16": (lambda: fused.rms_norm(x, norm_w, 1e-6, to_autocast_dtype=True), tokens * C * (4 + 2)),
        "norm+dwconv+silu": (lambda: fused.norm_conv_act(x, norm_w, 1e-6, dw_w, True), tokens * C * (4 + 2)),
        "global/local mix": (lambda: fused.mix_global_local(a, b, z, wa, wb, 1e-6, True), tokens * C * 2 * 4),
        "swiglu product": (lambda: fused._swiglu_product(projected), tokens * HIDDEN * 2 * 3),
        # (with the output projection: the unfused form is that of the models before session 7)
        "swiglu mlp": (lambda: fused.swiglu_mlp(local, w_in, w_out), tokens * (C + 2 * HIDDEN + C) * 2),
        "low-rank gates": (lambda: fused.low_rank_log_gates_pair(local, w0, w1, b1, 16.0),
                           tokens * (C + 16 + C) * 2),
    }


def gpu_seconds(fn) -> float:
    """GPU seconds per call, from a CUDA graph of several calls (no host time)."""
    graph = capture_cuda_graph(lambda: [fn() for _ in range(CALLS_PER_REPLAY)])
    return median_time(graph.replay, "cuda", warmup=3, repeats=15) / CALLS_PER_REPLAY


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", default=",".join(POINTS), help=f"comma list of {list(POINTS)}")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for point in args.points.split(","):
        batch, side = POINTS[point]
        for name, (fn, nbytes) in cases(batch, side, device).items():
            times = {}
            for mode in ("auto", "0"):
                triton_kernels.MODE = mode
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    times[mode] = gpu_seconds(fn)
            triton_kernels.MODE = "auto"
            rows.append((point, name, times["auto"], times["0"], nbytes / bandwidth))
    print(f"\n{'point':11} {'forward':18} {'triton us':>10} {'torch us':>10} {'speedup':>8} {'floor us':>9} {'x floor':>8}")
    for point, name, ours, theirs, floor in rows:
        print(f"{point:11} {name:18} {ours * 1e6:10.1f} {theirs * 1e6:10.1f} {theirs / ours:7.2f}x "
              f"{floor * 1e6:9.1f} {ours / floor:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
