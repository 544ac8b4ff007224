"""One call of the op for Nsight Compute to profile: compiled and warmed first, then run once
between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that ``ncu --profile-from-start off``
records that call's kernels and nothing else.

    ncu --profile-from-start off --clock-control none --set full -o /tmp/rep_tl_bi \\
        python benchmarks/ncu_op_call.py --impl tl --mode bi [--shape 128x196x3x32x64]
    ncu -i /tmp/rep_tl_bi.ncu-rep --page raw --csv > raw_tl_bi.csv
    ncu -i /tmp/rep_tl_bi.ncu-rep --page source --csv --print-source sass > src_tl_bi.csv
    python benchmarks/ncu_summary.py .   # every raw_*.csv and src_*.csv there

``--impl``: ``tl`` (the triton backend's default kernels), ``gluon`` (its opt-in Gluon forward)
or ``cupy``; ``--mode``: ``bi`` or ``causal``; ``--backward`` profiles a forward+backward call.
Inputs: bfloat16, ViG's gates (``logsigmoid(randn) / 16``). ``--clock-control none`` leaves the
GPU's clocks as they are (the device machines' METHOD.md asks for it).
"""

from __future__ import annotations

import argparse

import torch

from glakernels import gated_linear_attention
from glakernels.backends.triton import launch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["tl", "gluon", "cupy"], default="tl")
    parser.add_argument("--mode", choices=["bi", "causal"], default="bi")
    parser.add_argument("--shape", default="128x196x3x32x64", help="BxTxHxKxV")
    parser.add_argument("--backward", action="store_true", help="profile forward+backward")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    B, T, H, K, V = (int(n) for n in args.shape.split("x"))
    torch.manual_seed(0)

    def gates():
        return (torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16).bfloat16()

    bi = args.mode == "bi"
    x = dict(q=torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16),
             k=torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16),
             v=torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16), g=gates())
    if bi:
        x["g_reverse"] = gates()
    if args.backward:
        for t in x.values():
            t.requires_grad_()
    backend = "cupy" if args.impl == "cupy" else "triton"
    fields = {} if args.impl == "cupy" else dict(single_pass_gluon=args.impl == "gluon")

    def call():
        out = gated_linear_attention(**x, bidirectional=bi, backend=backend)
        if args.backward:  # (autograd.grad: .backward() would add each call's gradients to the
            # last call's, and the profile would show those additions as the op's kernels)
            torch.autograd.grad(out, list(x.values()), torch.ones_like(out))

    with launch.override_config(**fields), torch.set_grad_enabled(args.backward):
        for _ in range(3):  # compile, load, warm the caches
            call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
