"""First-call time of the triton backend's forward+backward, with an empty Triton cache, with
and without compiling the backward's kernels ahead (``backends/triton/compile_ahead.py``).

    python benchmarks/first_call_gpu.py [--shapes vigT_224,vigT_1024] [--dtype bfloat16]
        [--models vig_tiny:224:8]

Each measurement runs in a fresh Python with a fresh ``TRITON_CACHE_DIR``, so every kernel
compiles: one training call (bidirectional, inputs needing gradients) timed from the call to
the end of its backward (``torch.cuda.synchronize``), split at the forward's return. ``--models``
adds a model's first training step (``name:pixels:batch``, bf16 autocast, forward, a loss and
its backward), where the model's own Triton kernels compile too. "inline"
sets ``GLAKERNELS_TRITON_COMPILE_AHEAD=0`` (each kernel compiles at its first launch, as
Triton does); "ahead" is the default (``=1``). Both modes of a shape run back to back on the same
machine, so their ratio is the comparison to read (compile times vary with the host's CPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import sys, time
import torch
from glakernels import gated_linear_attention
from glakernels.bench import SHAPES, random_inputs

shape, dtype = SHAPES[sys.argv[1]], getattr(torch, sys.argv[2])
x = {n: t.requires_grad_() for n, t in random_inputs(shape, dtype, "cuda", bidirectional=True).items()}
torch.cuda.synchronize()
t0 = time.perf_counter()
o = gated_linear_attention(**x, backend="triton")
torch.cuda.synchronize()
t1 = time.perf_counter()
o.backward(torch.ones_like(o))
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""

_MODEL_CHILD = r"""
import sys, time
import torch
import vig

name, pixels, batch = sys.argv[1].split(":")
model = vig.create_model(name, img_size=int(pixels)).cuda()
x = torch.randn(int(batch), 3, int(pixels), int(pixels), device="cuda")
torch.cuda.synchronize()
t0 = time.perf_counter()
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = model(x).float().square().mean()
torch.cuda.synchronize()
t1 = time.perf_counter()
loss.backward()
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def first_call(child: str, case: str, dtype: str, inline: bool) -> tuple[float, float]:
    """(forward s, backward s) of one training call (``child`` run on ``case``) in a fresh
    process and Triton cache."""
    with tempfile.TemporaryDirectory() as cache:
        # (a model's GLA calls on the triton backend too: automatic selection may take cupy's)
        env = dict(os.environ, TRITON_CACHE_DIR=cache, GLAKERNELS_BACKEND="triton")
        env["GLAKERNELS_TRITON_COMPILE_AHEAD"] = "0" if inline else "1"
        out = subprocess.run([sys.executable, "-c", child, case, dtype], env=env, capture_output=True, text=True,
                             check=True)
    forward, backward = map(float, out.stdout.split()[-2:])
    return forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="vigT_224,vigT_1024", help="DESIGN §7 shape names")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--models", default="", help="name:pixels:batch items, e.g. vig_tiny:224:8")
    args = parser.parse_args()
    import torch

    print(f"first forward+backward, triton backend, {args.dtype}, bidirectional, empty Triton cache; "
          f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPUs")
    print("| shape or model | compile | forward s | backward s | total s | ÷ inline |")
    print("| --- | --- | --- | --- | --- | --- |")
    cases = [(_CHILD, shape) for shape in filter(None, args.shapes.split(","))]
    cases += [(_MODEL_CHILD, model) for model in filter(None, args.models.split(","))]
    for child, case in cases:
        inline = first_call(child, case, args.dtype, inline=True)
        ahead = first_call(child, case, args.dtype, inline=False)
        for label, (f, b) in (("inline", inline), ("ahead", ahead)):
            print(f"| {case} | {label} | {f:.1f} | {b:.1f} | {f + b:.1f} | {(f + b) / sum(inline):.2f} |")


if __name__ == "__main__":
    main()
