"""GPU benchmark of the op at every DESIGN.md §7 shape, against the memory floor and baselines.

    python benchmarks/gpu_ops.py [--backend triton] [--dtype bfloat16] [--shapes vigT_224,...]
                                 [--check] [--config chunk=32,num_warps=8] [--no-baselines]

Prints, per shape (bidirectional, the ViG way): the backend's forward and forward+backward
time, the memory floors at 3.0 TB/s (the DESIGN §8 anchor; the copy bandwidth measured on this
card is printed too) and the ratios to them; the raw kernel launches without the dispatch
layer (triton backend only); the time per call in a back-to-back loop (host overhead shows
there when it exceeds the GPU time); the first call (compile, when not cached); and, in the
same run on the same card, PyTorch SDPA (FlashAttention, head dim 64, same B, T, H) and — when
``fla`` (flash-linear-attention) is importable — its ``chunk_gla`` used the way the official
ViG trains (reversed copy concatenated on the batch axis, one call, outputs averaged).

GPU times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
run). ``--check`` first compares outputs and every gradient with a float64 computation on
fresh random inputs, on outputs poisoned with NaN.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from glakernels import gated_linear_attention
from glakernels.bench import SHAPES, Shape, memory_floor_bytes, random_inputs

ANCHOR_BANDWIDTH = 3.0e12  # bytes/s, DESIGN §8 (device-to-device copy on an H100)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    from triton.testing import do_bench

    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=20, rep=100, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def back_to_back(fn, calls: int = 50) -> float:
    """ms per call when calls are issued back to back (warm L2): includes host overhead."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def poison_allocator(nbytes: int = 1 << 31) -> None:
    """Fill a large cached block with NaN so that outputs allocated next start as NaN."""
    block = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)
    block.fill_(float("nan"))
    del block


def check(backend: str, shape: Shape, dtype: torch.dtype, seed: int = 1) -> tuple[str, float]:
    """Relative errors of o and every gradient against the float64 torch backend."""
    inputs = random_inputs(shape, dtype, "cuda", seed=seed)
    grad = torch.randn(shape.batch, shape.seq_len, shape.heads, shape.head_dim_v, device="cuda", dtype=dtype)

    def run(name, tensors):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}
        out = gated_linear_attention(**leaves, backend=name)
        (out.double() * grad.double()).sum().backward()
        return {"o": out, **{f"d{n}": leaf.grad for n, leaf in leaves.items()}}

    poison_allocator()
    got = run(backend, inputs)
    ref = run("torch", {n: t.double() for n, t in inputs.items()})
    errors = {}
    for name, value in got.items():
        r = ref[name].double()
        err = ((value.double() - r).norm() / r.norm()).item()
        errors[name] = err if torch.isfinite(value).all() else math.inf
    return " ".join(f"{n}={e:.1e}" for n, e in errors.items()), max(errors.values())


def time_backend(backend: str, shape: Shape, dtype: torch.dtype) -> dict:
    inputs = random_inputs(shape, dtype, "cuda", requires_grad=True)
    grad = torch.randn(shape.batch, shape.seq_len, shape.heads, shape.head_dim_v, device="cuda", dtype=dtype)
    leaves = list(inputs.values())

    def fwd():
        with torch.no_grad():
            return gated_linear_attention(**inputs, backend=backend)

    def fwd_bwd():
        gated_linear_attention(**inputs, backend=backend).backward(grad)

    out = {}
    t0 = time.perf_counter()
    fwd()
    torch.cuda.synchronize()
    out["first_fwd_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fwd_bwd()
    torch.cuda.synchronize()
    out["first_fwd_bwd_s"] = time.perf_counter() - t0
    out["fwd"] = bench(fwd)
    out["fwd_bwd"] = bench(fwd_bwd, grad_to_none=leaves)
    out["fwd_loop"] = back_to_back(fwd)
    if backend == "triton":
        from glakernels.backends.triton import launch

        x = {n: t.detach() for n, t in inputs.items()}
        scale = shape.head_dim_k ** -0.5
        out["raw_fwd"] = bench(lambda: launch.forward(x["q"], x["k"], x["v"], x["g"], x["g_reverse"], None,
                                                      scale, True, False))
        out["raw_bwd"] = bench(lambda: launch.backward(x["q"], x["k"], x["v"], x["g"], x["g_reverse"], None,
                                                       grad, None, scale, True))
    return out


def time_sdpa(shape: Shape, dtype: torch.dtype) -> tuple[float, float]:
    B, T, H = shape.batch, shape.seq_len, shape.heads
    q, k, v = (torch.randn(B, H, T, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, 64, device="cuda", dtype=dtype)

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    return bench(fwd), bench(fwd_bwd, grad_to_none=[q, k, v])


def time_fla(shape: Shape, dtype: torch.dtype):
    """fla's chunk_gla the way the official ViG trains: the reversed sequence concatenated on
    the batch axis, one call, the two halves averaged. ``None`` when fla is not importable."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception:
        return None
    inputs = random_inputs(shape, dtype, "cuda", requires_grad=True)
    q, k, v, g, gr = (inputs[n] for n in ("q", "k", "v", "g", "g_reverse"))
    grad = torch.randn(shape.batch, shape.seq_len, shape.heads, shape.head_dim_v, device="cuda", dtype=dtype)
    B = shape.batch

    def vig_way():
        cat = lambda a, b: torch.cat([a, b.flip(1)], dim=0)  # noqa: E731
        o, _ = chunk_gla(cat(q, q), cat(k, k), cat(v, v), cat(g, gr))
        return 0.5 * (o[:B] + o[B:].flip(1))

    def fwd():
        with torch.no_grad():
            return vig_way()

    def fwd_bwd():
        vig_way().backward(grad)

    return bench(fwd), bench(fwd_bwd, grad_to_none=[q, k, v, g, gr])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--check", action="store_true", help="check against float64 first")
    parser.add_argument("--config", default="", help="triton config override, e.g. chunk=32,num_warps=8")
    parser.add_argument("--no-baselines", action="store_true", help="skip SDPA and fla")
    parser.add_argument("--warmup-only", action="store_true",
                        help="one forward+backward per shape at batch 1 (fills the kernel cache), then exit")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    shapes = [SHAPES[name] for name in args.shapes.split(",") if name]
    overrides = dict(item.split("=") for item in args.config.split(",") if item)
    overrides = {key: int(value) for key, value in overrides.items()}
    import contextlib

    context = contextlib.nullcontext()
    if overrides:
        from glakernels.backends.triton import launch

        context = launch.override_config(**overrides)
    if args.warmup_only:
        import dataclasses

        with context:
            for shape in shapes:
                small = dataclasses.replace(shape, batch=1)
                x = random_inputs(small, dtype, "cuda", requires_grad=True)
                t0 = time.perf_counter()
                gated_linear_attention(**x, backend=args.backend).sum().backward()
                torch.cuda.synchronize()
                print(f"first forward+backward {shape.name} {args.config}: {time.perf_counter() - t0:.1f} s")
        return 0
    bandwidth = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  "
          f"backend {args.backend} {args.config}")
    print(f"copy bandwidth measured: {bandwidth / 1e12:.2f} TB/s; floors below use {ANCHOR_BANDWIDTH / 1e12:.1f} TB/s")
    rows = []
    with context:
        for shape in shapes:
            row = {"shape": shape.name}
            row["floor_fwd"] = memory_floor_bytes(shape, dtype) / ANCHOR_BANDWIDTH * 1e3
            row["floor_fb"] = memory_floor_bytes(shape, dtype, backward=True) / ANCHOR_BANDWIDTH * 1e3
            if args.check:
                text, worst = check(args.backend, shape, dtype)
                print(f"check {shape}: {text}", flush=True)
                row["check"] = worst
            row.update(time_backend(args.backend, shape, dtype))
            if not args.no_baselines:
                row["sdpa_fwd"], row["sdpa_fb"] = time_sdpa(shape, dtype)
                fla = time_fla(shape, dtype)
                row["fla_fwd"], row["fla_fb"] = fla if fla else (math.nan, math.nan)
            rows.append(row)
            print(f"done {shape.name}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "shape"),
                  flush=True)
    print()
    print(f"times in ms (median, L2 flushed); x = ratio to the memory floor at {ANCHOR_BANDWIDTH / 1e12:.1f} TB/s")
    header = (f"{'shape':<10} {'floor':>6} {'fwd':>7} {'x':>5} {'floor':>6} {'fwd+bwd':>8} {'x':>5} "
              f"{'raw f':>7} {'raw b':>7} {'loop f':>7} {'sdpa f':>7} {'sdpa fb':>7} {'fla f':>7} {'fla fb':>7} "
              f"{'1st s':>6}")
    print(header)
    for r in rows:
        print(f"{r['shape']:<10} {r['floor_fwd']:6.3f} {r['fwd']:7.3f} {r['fwd'] / r['floor_fwd']:5.1f} "
              f"{r['floor_fb']:6.3f} {r['fwd_bwd']:8.3f} {r['fwd_bwd'] / r['floor_fb']:5.1f} "
              f"{r.get('raw_fwd', math.nan):7.3f} {r.get('raw_bwd', math.nan):7.3f} {r['fwd_loop']:7.3f} "
              f"{r.get('sdpa_fwd', math.nan):7.3f} {r.get('sdpa_fb', math.nan):7.3f} "
              f"{r.get('fla_fwd', math.nan):7.3f} {r.get('fla_fb', math.nan):7.3f} "
              f"{r['first_fwd_s'] + r['first_fwd_bwd_s']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
