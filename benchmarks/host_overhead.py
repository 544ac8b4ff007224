"""Host (CPU) time per call of the op, against its GPU time, on one CUDA card.

    python benchmarks/host_overhead.py [--backends cupy,triton] [--shape vigT_224] [--profile]

At ViG's sizes one forward is a single short kernel, so the Python around it can cost more
than the kernel. For each backend this prints, in one run on one card (bf16, bidirectional):

- ``graph``: GPU time per call, replayed from a CUDA graph (no host work at all);
- ``host``: host time per call when calls are issued back to back without synchronising,
  for the backend called directly, the custom op (``GLAKERNELS_EAGER_CUSTOM_OP=1``) and the
  eager fast path (the default outside tracing) — forward under ``no_grad`` and
  forward+backward. When ``host`` exceeds ``graph`` the GPU waits on Python.

``--profile`` adds a cProfile of the fast path's forward+backward (top functions by own time).

``--layers`` splits the fast path's forward+backward (``torch.autograd.grad``) into what
PyTorch's autograd costs and what glakernels' own Python costs, with no kernel work at all:

- ``bare Function``: a ``torch.autograd.Function`` of the same five inputs whose forward and
  backward return preallocated tensors (autograd's floor for such an op);
- ``op, no kernels``: ``gated_linear_attention`` with the backend's ``forward`` / ``backward``
  replaced by functions returning preallocated tensors (validation, dispatch, the eager path);
- ``op``: the real call. ``op`` minus ``op, no kernels`` is the backend's own host work
  (launches, allocations) as it runs inside autograd; compare with ``direct f+b``;
- ``op, backward on this thread``: the same under ``torch.autograd.set_multithreading_enabled
  (False)``. Autograd runs a CUDA backward on a device thread of its own; a lone op's
  forward+backward then pays the hand-over to that thread and back, which a whole model's
  backward pays once, not once per op (``backends/triton/NOTES.md``, session 29).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

from glakernels import gated_linear_attention
from glakernels._custom_op import _inputs
from glakernels._dispatch import get_backend
from glakernels.bench import SHAPES, capture_cuda_graph, kernels_replaced, random_inputs


def host_time(fn, calls: int = 300, device: str = "cuda") -> float:
    """Seconds of host time per call, issued back to back (GPU synchronised only around)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
        sync()
    return best


def graph_time(fn, calls: int = 50) -> float:
    """Seconds of GPU time per call, from CUDA-graph replay."""

    def many():
        for _ in range(calls):
            fn()

    graph = capture_cuda_graph(many, warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def layer_times(name: str, x: dict, device: str) -> dict:
    """Host seconds per forward+backward (``torch.autograd.grad``): the bare autograd floor,
    the op without kernel work, and the op (see the module docstring, ``--layers``)."""
    tensors = list(x.values())
    o = torch.empty_like(x["v"])
    grad = torch.randn_like(o)
    grads = [torch.empty_like(t) for t in tensors]

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return o

        @staticmethod
        def backward(ctx, grad_output):
            return tuple(grads)

    def op():
        return torch.autograd.grad(gated_linear_attention(**x, backend=name), tensors, grad)

    times = {"bare Function": host_time(lambda: torch.autograd.grad(Bare.apply(*tensors), tensors, grad), device=device)}
    with kernels_replaced(name, o, grads):
        times["op, no kernels"] = host_time(op, device=device)
    times["op"] = host_time(op, device=device)
    with torch.autograd.set_multithreading_enabled(False):
        times["op, backward on this thread"] = host_time(op, device=device)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="cupy,triton")
    parser.add_argument("--shape", default="vigT_224", choices=sorted(SHAPES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--layers", action="store_true",
                        help="also split forward+backward into autograd's and glakernels' host time")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "| shape", args.shape, "bf16 bidirectional")
    rows = []
    for name in args.backends.split(","):
        x = random_inputs(shape, torch.bfloat16, "cuda", bidirectional=True, requires_grad=True)
        grad = torch.randn_like(x["v"])
        plain = {key: value.detach() for key, value in x.items()}
        inputs = _inputs(plain["q"], plain["k"], plain["v"], plain["g"], plain["g_reverse"], None,
                         shape.head_dim_k ** -0.5, True, False)
        backend = get_backend(name)

        def op_forward():
            with torch.no_grad():
                gated_linear_attention(**x, backend=name)

        def op_forward_backward():
            gated_linear_attention(**x, backend=name).backward(grad)

        row = {"backend": name}
        row["graph fwd"] = graph_time(lambda: backend.forward(inputs))
        row["graph f+b"] = graph_time(lambda: (backend.forward(inputs), backend.backward(inputs, grad, None)))
        row["direct fwd"] = host_time(lambda: backend.forward(inputs))
        row["direct f+b"] = host_time(lambda: (backend.forward(inputs), backend.backward(inputs, grad, None)))
        for label, force in (("custom-op", "1"), ("fast-path", "0")):
            os.environ["GLAKERNELS_EAGER_CUSTOM_OP"] = force
            row[f"{label} fwd"] = host_time(op_forward)
            row[f"{label} f+b"] = host_time(op_forward_backward, calls=100)
        os.environ.pop("GLAKERNELS_EAGER_CUSTOM_OP")
        if args.layers:
            row.update({f"{label} f+b": t for label, t in layer_times(name, x, "cuda").items()})
        rows.append(row)
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(200):
                op_forward_backward()
            profile.disable()
            torch.cuda.synchronize()
            print(f"--- cProfile, {name}, 200 x forward+backward (fast path), by own time")
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    columns = [c for c in rows[0] if c != "backend"]
    print("\nmicroseconds per call (graph = GPU time; the rest = host time, back to back)")
    widths = [max(14, len(c) + 2) for c in columns]
    print(f"{'backend':<8}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for row in rows:
        print(f"{row['backend']:<8}" + "".join(f"{row[c] * 1e6:>{w}.1f}" for c, w in zip(columns, widths)))


if __name__ == "__main__":
    main()
