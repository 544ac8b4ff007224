"""GPU time of the op's kernels called eagerly against the same call inside ``torch.compile``.

    python benchmarks/compiled_op_gpu.py [--backend triton] [--shapes vigT_224,vigB_224,vigT_1024]

Under ``torch.compile`` a backend that declares CUDA traceable (triton) is traced: Dynamo
records its Triton launches and Inductor compiles and launches them with the graph. Inductor
compiles them with its own options, not with Triton's launch options: it keeps ``num_warps``
and ``num_stages`` but drops ``maxnreg`` (torch 2.11-2.13), and the single-pass forward is
slower without its register cap (``backends/triton/NOTES.md``, session 11). This prints, per
shape (bf16, bidirectional), the summed device time of the kernels one call runs, from
torch.profiler, eagerly and compiled (default mode), forward under ``no_grad`` and
forward+backward, with the largest difference between the compiled and the eager output.
A row near 1.00x means Inductor launches the kernels as fast as Triton's launcher does.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from glakernels import gated_linear_attention
from glakernels.bench import SHAPES, random_inputs


def device_us_per_call(fn, calls: int = 20) -> float:
    """Microseconds of device time per call, summed over every kernel ``fn`` launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CUDA)
    return total / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--shapes", default="vigT_224,vigB_224,vigT_1024")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("compiled_op_gpu.py needs a CUDA device")
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| backend", args.backend,
          "| bf16 bidirectional")

    def op(q, k, v, g, g_reverse):
        return gated_linear_attention(q, k, v, g, g_reverse=g_reverse, backend=args.backend)

    rows = []
    for name in args.shapes.split(","):
        x = random_inputs(SHAPES[name], torch.bfloat16, "cuda", bidirectional=True, requires_grad=True)
        grad = torch.randn_like(x["v"])
        torch._dynamo.reset()
        compiled = torch.compile(op, fullgraph=True)
        row = {"shape": name}
        for label, fn in (("eager", op), ("compiled", compiled)):
            def forward(fn=fn):
                with torch.no_grad():
                    return fn(**x)

            row[f"{label} fwd"] = device_us_per_call(forward)
            row[f"{label} f+b"] = device_us_per_call(lambda fn=fn: fn(**x).backward(grad))
        with torch.no_grad():
            row["max diff"] = (compiled(**x).float() - op(**x).float()).abs().max().item()
        rows.append(row)
    print("\nmicroseconds of device time per call; ratio = compiled / eager")
    print(f"{'shape':<10}{'eager fwd':>11}{'compiled':>10}{'ratio':>7}{'eager f+b':>11}{'compiled':>10}"
          f"{'ratio':>7}{'max diff':>10}")
    for r in rows:
        print(f"{r['shape']:<10}{r['eager fwd']:>11.1f}{r['compiled fwd']:>10.1f}"
              f"{r['compiled fwd'] / r['eager fwd']:>6.2f}x{r['eager f+b']:>11.1f}{r['compiled f+b']:>10.1f}"
              f"{r['compiled f+b'] / r['eager f+b']:>6.2f}x{r['max diff']:>10.1e}")


if __name__ == "__main__":
    main()
