"""Find which construct breaks the Triton kernels on a GPU, one isolated process per case.

    python -m glakernels.backends.triton.diagnose_gpu

A kernel fault (illegal address) poisons the whole CUDA context, so every case — forward or
backward, bidirectional or causal, chunk 32 or 64, each variant — runs in its own process and
reports ``ok`` with its worst relative error against the float64 torch backend, or the fault.
Variants swap one helper of ``kernels.py`` before the first compile:

* ``as-is``          the kernels as they are;
* ``no-pipelining``  ``num_stages=1`` (no asynchronous prefetch of loop loads);
* ``2d-scans``       segmented products by one 2-D scan over a permuted tile instead of a scan
                     along the middle axis of a reshaped 3-D tile;
* ``raw-rows``       masked-out rows keep their out-of-range addresses (the first GPU run's
                     code), to confirm or refute that as the cause of its illegal accesses.

This is a development tool: it monkeypatches module globals of ``kernels.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import triton
import triton.language as tl

from . import kernels as K

MODES = ("fwd_bi", "fwd_causal", "bwd_bi", "bwd_causal")
CASES = (
    [("as-is", mode, chunk) for mode in MODES for chunk in (32, 64)]
    + [(variant, mode, 32) for variant in ("no-pipelining", "2d-scans") for mode in MODES]
    + [("raw-rows", "fwd_bi", 32), ("raw-rows", "bwd_bi", 32)]
)


@triton.jit
def _tile_raw_rows(ptr, row0, rows, row_ok, stride_t, cols, ncols):
    offs = row0 + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    mask = row_ok[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _seg_cumprod_2d(x, ROWS: tl.constexpr, SEG: tl.constexpr, COLS: tl.constexpr, REVERSE: tl.constexpr):
    if SEG == 1:
        out = x
    elif SEG == ROWS:
        out = tl.cumprod(x, axis=0, reverse=REVERSE)
    else:
        y = tl.permute(tl.reshape(x, (ROWS // SEG, SEG, COLS)), (1, 0, 2))
        y = tl.cumprod(tl.reshape(y, (SEG, (ROWS // SEG) * COLS)), axis=0, reverse=REVERSE)
        out = tl.reshape(tl.permute(tl.reshape(y, (SEG, ROWS // SEG, COLS)), (1, 0, 2)), (ROWS, COLS))
    return out


def _run_case(variant: str, mode: str, chunk: int) -> str:
    import torch

    from glakernels import gated_linear_attention
    from glakernels.bench import Shape, random_inputs

    from . import launch

    if variant == "raw-rows":
        K._tile = _tile_raw_rows
    if variant == "2d-scans":
        K._seg_cumprod = _seg_cumprod_2d
    bidir = mode.endswith("_bi")
    device = os.environ.get("DIAGNOSE_DEVICE", "cuda")  # "cpu" with TRITON_INTERPRET=1 to try the tool
    B, T, H = 2, 196, 3
    x = random_inputs(Shape("diagnose", B, T, H, 32, 64), torch.bfloat16, device, bidirectional=bidir, seed=3)
    grad = torch.randn(B, T, H, 64, device=device, dtype=torch.bfloat16)
    stages = 1 if variant == "no-pipelining" else 2
    with launch.override_config(chunk=chunk, num_stages=stages):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        out = gated_linear_attention(**leaves, bidirectional=bidir, backend="triton")
        if mode.startswith("bwd"):
            out.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
    ref_leaves = {n: t.detach().double().requires_grad_() for n, t in x.items()}
    ref = gated_linear_attention(**ref_leaves, bidirectional=bidir, backend="torch")
    errors = {"o": ((out.double() - ref).norm() / ref.norm()).item()}
    if mode.startswith("bwd"):
        ref.backward(grad.double())
        for name in x:
            r = ref_leaves[name].grad
            errors["d" + name] = ((leaves[name].grad.double() - r).norm() / r.norm()).item()
    return f"ok worst={max(errors.values()):.1e} " + " ".join(f"{n}={e:.1e}" for n, e in errors.items())


def main() -> int:
    jobs = []
    for case in CASES:
        cmd = [sys.executable, "-m", __spec__.name, "--case", *map(str, case)]
        jobs.append((case, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for (variant, mode, chunk), proc in jobs:
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = "TIMEOUT"
        result = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if result:
            text = result[-1][len("RESULT "):]
        else:
            errors = [line.strip() for line in out.splitlines() if "Error" in line]
            text = "FAILED " + " | ".join(errors[-2:])[:300]
        print(f"{variant:<14} {mode:<11} chunk={chunk:<3} {text}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        t0 = time.time()
        print("RESULT " + _run_case(sys.argv[2], sys.argv[3], int(sys.argv[4])) + f" ({time.time() - t0:.0f} s)")
        sys.exit(0)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
