"""vig's backward kernels of the fourteenth and fifteenth sessions against what they
replaced, on ViG-T's tensors (bf16), in one run on one GPU:

* the depth-wise convolution's input and weight gradients (``vig.triton_backward.
  depthwise_conv_backward``) against cuDNN's two calls on the NHWC views, as ``vig.fused``
  made them before (``cudnn_depthwise_backward`` below), with the relative difference of the
  two results (cuDNN rounds its weight gradient to bfloat16);
* the row sums behind bias and norm-weight gradients (``vig.fused._sum_to_last``: two
  float32 stages) against PyTorch's one-stage ``sum(0)`` and its float32 copy first, with their
  error against float64;
* (fifteenth session) the patch convolution's weight and bias gradients
  (``vig.triton_backward.patch_conv_weight_grad``) against PyTorch's convolution backward.

µs per call, CUDA-graph replay (``triton_configs_gpu.graph_time``, three input sets cycled).

    python benchmarks/vig_backward_kernels_gpu.py

The models with and without these changes: ``benchmarks/vig_backward_ab_gpu.py``.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from triton_configs_gpu import graph_time  # noqa: E402
from vig import fused, triton_backward  # noqa: E402


def cudnn_depthwise_backward(x, grad, weight, out_dtype=None, weight_grad_dtype=None):
    """What ``vig.fused`` ran before: cuDNN's input and weight gradients on NHWC views (its
    PyTorch path still does), cast as the kernel's results are."""
    gx, gw = fused._depthwise_nhwc_backward(x, grad, weight)
    return gx.to(out_dtype or x.dtype), gw.to(weight_grad_dtype or weight.dtype)


def depthwise_rows():
    print("| B x H x W x C | cuDNN µs | Triton µs | ratio | difference (grad x / grad w) |")
    print("| --- | --- | --- | --- | --- |")
    for (B, H, W, C) in [(128, 14, 14, 192), (8, 64, 64, 192), (32, 32, 32, 192), (128, 14, 14, 384),
                         (1, 14, 14, 192)]:
        sets = []
        for _ in range(3):
            x = torch.randn(B, H, W, C, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(B, H, W, C, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(C, 1, 3, 3, device="cuda", dtype=torch.bfloat16)
            sets.append((x, g, w))
        ref = cudnn_depthwise_backward(*sets[0], torch.bfloat16, torch.float32)
        out = triton_backward.depthwise_conv_backward(*sets[0], torch.bfloat16, torch.float32)
        err = [((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(out, ref)]
        t_tr = graph_time(lambda s: triton_backward.depthwise_conv_backward(*s, torch.bfloat16, torch.float32),
                          sets) * 1e3
        t_cu = graph_time(lambda s: cudnn_depthwise_backward(*s, torch.bfloat16, torch.float32), sets) * 1e3
        print(f"| {B}x{H}x{W}x{C} | {t_cu:.1f} | {t_tr:.1f} | {t_tr / t_cu:.2f} | {err[0]:.1e} / {err[1]:.1e} |",
              flush=True)


def row_sum_rows():
    print("| rows x 192, dtype | method | µs | relative error |")
    print("| --- | --- | --- | --- |")
    for n in (25088, 32768):  # ViG-T's tokens at 224 px batch 128, 1024 px batch 8
        for dt in (torch.bfloat16, torch.float32):
            sets = [torch.randn(n, 192, device="cuda", dtype=dt) for _ in range(3)]
            methods = {
                "sum(0)": lambda x: x.sum(0),
                "float().sum(0)": lambda x: x.float().sum(0),
                "two stages (_sum_to_last)": fused._sum_to_last,
            }
            ref = sets[0].double().sum(0)
            for name, f in methods.items():
                t = graph_time(f, sets) * 1e3
                err = ((f(sets[0]).double() - ref).norm() / ref.norm()).item()
                print(f"| {n}, {str(dt)[6:]} | {name} | {t:.1f} | {err:.1e} |", flush=True)


def patch_conv_rows():
    """The patch convolution's weight and bias gradients (``vig.triton_backward.
    patch_conv_weight_grad``) against PyTorch's path (the image cast, then the convolution
    backward; ``vig_backward_ab_gpu.pytorch_patch_conv_weight_grad``), ViG-T's first
    convolution (9×9, stride 8, padding 1, 3 -> 96 channels), bf16 gradient."""
    from vig_backward_ab_gpu import pytorch_patch_conv_weight_grad

    print("| image | PyTorch µs | Triton µs | ratio | difference (grad w / grad b) |")
    print("| --- | --- | --- | --- | --- |")
    for B, H in ((128, 224), (8, 1024)):
        OH = (H + 2 - 9) // 8 + 1
        sets = [(torch.randn(B, 3, H, H, device="cuda"),
                 torch.randn(B, OH, OH, 96, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
        ours = lambda s: triton_backward.patch_conv_weight_grad(*s, 9, 8, 1, torch.bfloat16)  # noqa: E731
        theirs = lambda s: pytorch_patch_conv_weight_grad(*s, 9, 8, 1, torch.bfloat16)  # noqa: E731
        err = [((a - b).norm() / b.norm()).item() for a, b in zip(ours(sets[0]), theirs(sets[0]))]
        t_ours, t_theirs = graph_time(ours, sets) * 1e3, graph_time(theirs, sets) * 1e3
        print(f"| {B}x3x{H}x{H} | {t_theirs:.1f} | {t_ours:.1f} | {t_ours / t_theirs:.2f} "
              f"| {err[0]:.1e} / {err[1]:.1e} |", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    depthwise_rows()
    row_sum_rows()
    patch_conv_rows()
    return 0


if __name__ == "__main__":
    sys.exit(main())
