"""Time the triton backend's forward under config variants, on one GPU, in one run.

    python benchmarks/triton_configs_gpu.py [--shapes vigT_224,vigB_224,32x196x8x128x128] [--dtype bfloat16]
        [--variants "single_pass=False;single_pass_chunk=16,single_pass_num_warps=8;..."]
        [--baselines cupy] [--backward] [--strong-gate-every 128]

Every variant is first checked against the float64 torch backend on the GPU (relative error of
``o``; NaN or an error above the DESIGN §3 bound marks the row FAILED), then timed as GPU time:
the forward is captured in a CUDA graph, 30 calls cycling over 3 input sets (so most reads
miss L2, as they would in a model), and the graph replayed; the median replay / 30 is the time
per call. Baselines (other backends) are timed the same way in the same run. The table is
sorted by time and printed last, with the ratio to the memory floor at 3.0 TB/s and to the
first variant (the backend's defaults). ``--backward`` times forward+backward instead (one
autograd call of the op per replay step) and checks every gradient too.

``single_pass_num_warps`` and ``single_pass_maxnreg`` set the forward's large-grid launch; a
grid of at most four programs per SM takes one of ``single_pass_small_grid_launches`` instead
(``launch._single_pass_launch``): add ``single_pass_small_grid_launches=()`` to a variant to
time its setting on every grid.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glakernels import gated_linear_attention
from glakernels.bench import SHAPES, Shape, memory_floor_bytes, random_inputs

BOUNDS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DEFAULT_VARIANTS = ";".join([
    "",  # the defaults
    "single_pass=False",  # the two-phase forward of kernels.py
    "single_pass_num_warps=8",
    "single_pass_num_warps=2",
    "single_pass_chunk=16",
    "single_pass_chunk=64",
    "single_pass_chunk=16,single_pass_num_warps=2",
    "single_pass_block_v=32",
    "single_pass_block_v=32,single_pass_num_warps=2",
    "single_pass_num_stages=2",
    "single_pass_maxnreg=168",
    "single_pass_maxnreg=128",
])


def shape_from(name: str) -> Shape:
    """A DESIGN §7 shape by name, or ``BxTxHxKxV``."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        b, t, h, k, v = (int(n) for n in name.split("x"))
    except ValueError:
        raise ValueError(f"{name!r} is neither one of {sorted(SHAPES)} nor BxTxHxKxV") from None
    return Shape(name, b, t, h, k, v)


def graph_time(call, sets, reps: int = 10, replays: int = 7) -> float:
    """ms per call: median CUDA-graph replay of ``reps`` calls per input set, cycling sets."""
    for x in sets:  # compile and warm up outside the capture
        call(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                for x in sets:
                    call(x)
    torch.cuda.current_stream().wait_stream(stream)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (reps * len(sets)))
    return statistics.median(times)


def raw_forward_backward(x: dict, backend: str, grad: torch.Tensor):
    """The backend's forward and backward called directly (autograd's engine cannot be
    captured from here: it runs backward on the forward's stream)."""
    from glakernels._custom_op import _inputs
    from glakernels._dispatch import registry

    x = {n: t.detach() for n, t in x.items()}
    inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x["g_reverse"], None, x["q"].shape[-1] ** -0.5, True, False)
    impl = registry.get(backend)
    impl.forward(inputs)
    return impl.backward(inputs, grad, None)


def rel_error(outs, refs) -> float:
    """The largest relative error over the output (and every gradient); NaN or inf: inf."""
    errors = []
    for out, ref in zip(outs, refs):
        if not torch.isfinite(out).all():
            return float("inf")
        errors.append(((out.double() - ref).norm() / ref.norm()).item())
    return max(errors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="vigT_224,vigB_224",
                        help="DESIGN §7 shape names, or BxTxHxKxV for any other (e.g. 32x196x8x128x128)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="';'-separated config overrides of the triton backend ('' = defaults)")
    parser.add_argument("--baselines", default="cupy", help="other backends timed in the same run")
    parser.add_argument("--backward", action="store_true", help="time forward+backward, check gradients")
    parser.add_argument("--strong-gate-every", type=int, default=0, metavar="TOKENS",
                        help="set the first K column's gate (both directions) to -3 at every TOKENS-th token: "
                             "below the ratio chunk math's bound, so walks that read one take the hierarchy "
                             "(128 reaches every walk of a single-pass kernel; 0: ViG-like gates only)")
    args = parser.parse_args(argv)
    from glakernels.backends.triton import launch

    dtype = getattr(torch, args.dtype)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows = []
    try:
        shapes = [shape_from(name) for name in args.shapes.split(",")]
    except ValueError as e:
        parser.error(f"--shapes: {e}")
    for shape in shapes:
        shape_name = shape.name
        sets = [{n: t.detach() for n, t in random_inputs(shape, dtype, "cuda", seed=s).items()} for s in range(3)]
        if args.strong_gate_every:
            for x in sets:
                for name in ("g", "g_reverse"):
                    x[name][:, ::args.strong_gate_every, :, 0] = -3.0
        grad = torch.randn(shape.batch, shape.seq_len, shape.heads, shape.head_dim_v, device="cuda", dtype=dtype)
        if args.backward:
            for x in sets:
                for t in x.values():
                    t.requires_grad_()

        def call(x, backend, grad=grad):
            if not args.backward:
                with torch.no_grad():
                    return [gated_linear_attention(**x, backend=backend)]
            out = gated_linear_attention(**x, backend=backend)
            return [out, *torch.autograd.grad(out, list(x.values()), grad)]

        ref = call({n: t.detach().double().requires_grad_(args.backward) for n, t in sets[0].items()}, "torch",
                   grad.double())
        floor_ms = memory_floor_bytes(shape, dtype, backward=args.backward) / 3.0e12 * 1e3
        runs = [("triton", v) for v in args.variants.split(";")]
        runs += [(b, None) for b in filter(None, args.baselines.split(","))]
        base = None
        for backend, variant in runs:
            label = backend if variant is None else f"triton[{variant or 'defaults'}]"
            try:
                with launch.override_config(**launch.config_fields(variant or "")):
                    t0 = time.perf_counter()
                    out = call(sets[0], backend)
                    torch.cuda.synchronize()
                    first_s = time.perf_counter() - t0
                    err = rel_error(out, ref)
                    timed = call if not args.backward else (lambda x, b: raw_forward_backward(x, b, grad))
                    ms = graph_time(lambda x: timed(x, backend), sets)
            except Exception as exc:  # a variant that does not compile or run: report, go on
                print(f"{shape_name} {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            base = ms if base is None else base
            status = "ok" if err <= BOUNDS[dtype] else "FAILED"
            rows.append((shape_name, ms, label, err, status, first_s, floor_ms, base))
            print(f"{shape_name} {label}: {ms * 1e3:.1f} us, err {err:.1e} {status}, first call {first_s:.1f} s",
                  flush=True)
    what = "forward+backward" if args.backward else "forward"
    print(f"\n{what}, {args.dtype}, bidirectional; GPU time per call (CUDA-graph replay)")
    print("| shape | variant | µs | × floor | ÷ defaults | rel. error | first call s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape_name, ms, label, err, status, first_s, floor_ms, base in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"| {shape_name} | {label} | {ms * 1e3:.1f} | {ms / floor_ms:.1f} | {ms / base:.2f} | "
              f"{err:.1e}{'' if status == 'ok' else ' FAILED'} | {first_s:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
