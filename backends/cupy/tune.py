"""Time the cupy backend's tile and chunking variants against the other GPU backends.

    python -m glakernels.backends.cupy.tune [--shape vigT_224 ...] [--variants] [--sdpa]
                                            [--baseline triton] [--profile-host] [--json out.json]

For every DESIGN §7 shape (bf16, bidirectional): forward and forward+backward through the
public op, for each available CUDA backend and (with ``--variants``) cupy variants with other
tiles or chunk lengths. Each time is the median of CUDA-event timings after warm-up, rotating
between input sets so that small shapes do not run from L2; "graph" columns replay the same
call from a CUDA graph, i.e. device time without Python/launch overhead. A variant is checked
against the default cupy output before it is timed. ``--sdpa`` adds PyTorch's
scaled_dot_product_attention (FlashAttention; head dim 64, same B, T, H: the DESIGN §8 anchor)
and the memory floors (DESIGN §7 bytes at this card's measured copy bandwidth). Ratios are
against ``--baseline`` (default triton) timed in the same run. ``--profile-host`` prints
where the host time of 200 eager cupy forwards at the first shape goes. A development tool;
the regression benchmarks are the asv suites.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from glakernels import bench, gated_linear_attention
from glakernels._dispatch import registry

from . import CupyBackend, _driver
from ._plan import DEFAULT_TILES, Tile
from ._runtime import CupyLauncher


def _tiles(**overrides):
    """DEFAULT_TILES with the tile for some inner-dim limits replaced."""
    return tuple((limit, overrides.get(f"d{limit}", tile)) for limit, tile in DEFAULT_TILES)


VARIANTS = {
    "opt2": dict(tiles=_tiles(d32=Tile(32, 2, 2, 16, 8), d64=Tile(32, 2, 4, 16, 8), d128=Tile(32, 2, 8, 16, 8))),
    "opt4": dict(tiles=_tiles(d32=Tile(32, 4, 4, 8, 8), d64=Tile(32, 4, 4, 16, 8), d128=Tile(32, 4, 8, 16, 4))),
    "split1": dict(tiles=_tiles(d32=Tile(32, 1, 1, 32, 8), d64=Tile(32, 2, 2, 32, 8), d128=Tile(32, 2, 4, 32, 4))),
    "own64": dict(tiles=_tiles(d32=Tile(64, 2, 2, 16, 16), d64=Tile(64, 2, 4, 16, 8), d128=Tile(64, 2, 8, 16, 8))),
    "chunk128": dict(chunk_len=128),
    "chunk512": dict(chunk_len=512),
}


class _Variant(CupyBackend):
    auto_priority = {}

    def __init__(self, name, tiles=None, chunk_len=None):
        self.name, self.tiles, self.chunk_len = name, tiles, chunk_len

    def forward(self, inputs):
        return _driver.forward(inputs, CupyLauncher(inputs.q.device), chunk_len=self.chunk_len, tiles=self.tiles)

    def backward(self, inputs, grad_output, grad_final_state):
        return _driver.backward(inputs, grad_output.contiguous(), grad_final_state, CupyLauncher(inputs.q.device),
                                chunk_len=self.chunk_len, tiles=self.tiles)


def _median_ms(fn, sets: int, warmup: int = 3, repeats: int = 15) -> float:
    for i in range(warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph_ms(fn, sets: int) -> float:
    graphs = [bench.capture_cuda_graph(lambda i=i: fn(i), warmup=1) for i in range(sets)]
    return _median_ms(lambda i: graphs[i].replay(), sets)


def time_backend(name: str, inputs: list, grad: torch.Tensor) -> dict:
    def forward(i):
        with torch.no_grad():
            return gated_linear_attention(**inputs[i], backend=name)

    def forward_backward(i):
        out = gated_linear_attention(**inputs[i], backend=name)
        torch.autograd.grad(out, list(inputs[i].values()), grad)

    sets = len(inputs)
    result = {"fwd": _median_ms(forward, sets), "fwd_bwd": _median_ms(forward_backward, sets)}
    for key, fn in (("fwd_graph", forward), ("fwd_bwd_graph", forward_backward)):
        try:
            result[key] = _graph_ms(fn, sets)
        except Exception as exc:  # a backend that cannot be captured still gets eager times
            result[key] = float("nan")
            result[key + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return result


def _copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (_median_ms(lambda i: dst.copy_(src), 1) / 1e3)


def _print_row(shape_name, name, r, base):
    ratio = (lambda k: f"{r[k] / base[k]:.2f}" if base else "-")
    print(f"{shape_name:<10} {name:<14} {r['fwd']:>8.3f} {r['fwd_bwd']:>8.3f} {r['fwd_graph']:>8.3f} "
          f"{r['fwd_bwd_graph']:>8.3f} {ratio('fwd_graph'):>8} {ratio('fwd_bwd_graph'):>8}", flush=True)


def _time_sdpa(shape, dtype) -> dict:
    """FlashAttention through SDPA on the same B, T, H with head dim 64 (DESIGN §8)."""
    import torch.nn.functional as F

    B, T, H = shape.batch, shape.seq_len, shape.heads
    q, k, v = (torch.randn(B, H, T, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, 64, device="cuda", dtype=dtype)

    def forward(i):
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    def forward_backward(i):
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)

    result = {"fwd": _median_ms(forward, 1), "fwd_bwd": _median_ms(forward_backward, 1)}
    result["fwd_graph"] = _graph_ms(forward, 1)
    result["fwd_bwd_graph"] = _graph_ms(forward_backward, 1)
    return result


def _profile_host(shape, dtype) -> None:
    import cProfile
    import pstats

    inputs = bench.random_inputs(shape, dtype, "cuda")
    with torch.no_grad():
        for _ in range(5):
            gated_linear_attention(**inputs, backend="cupy")
        torch.cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            gated_linear_attention(**inputs, backend="cupy")
        profile.disable()
        torch.cuda.synchronize()
    print(f"host profile: 200 eager cupy forwards at {shape}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", choices=list(bench.SHAPES))
    parser.add_argument("--variants", action="store_true", help="also time cupy tile/chunk variants")
    parser.add_argument("--backends", default="triton,cupy,torch")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--sdpa", action="store_true", help="also time SDPA and print the memory floors")
    parser.add_argument("--baseline", default="triton", help="backend the ratios are taken against")
    parser.add_argument("--profile-host", action="store_true")
    parser.add_argument("--matmul-precision", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision first ('medium': the triton backend's single "
                             "bfloat16 dots, faster and less accurate)")
    args = parser.parse_args(argv)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    dtype = torch.bfloat16
    names = [n for n in args.backends.split(",") if n in registry.names() and registry.get(n).available]
    variants = []
    if args.variants:
        for label, kwargs in VARIANTS.items():
            variant = _Variant(f"cupy-{label}", **kwargs)
            registry.register(variant)
            variants.append(variant.name)
    results = {}
    bandwidth = _copy_bandwidth() if args.sdpa else None
    print(f"GPU: {torch.cuda.get_device_name()}; bf16, bidirectional; ms, median of CUDA-event timings"
          + (f"; copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""))
    print(f"{'shape':<10} {'backend':<14} {'fwd':>8} {'fwd+bwd':>8} {'fwd(g)':>8} {'f+b(g)':>8} "
          f"{'fwd/base':>8} {'f+b/base':>8}   (ratios: graph times over {args.baseline}'s)")
    try:
        for shape_name in args.shape or list(bench.SHAPES):
            shape = bench.SHAPES[shape_name]
            per_set = 2 * shape.batch * shape.seq_len * shape.heads * (3 * shape.head_dim_k + 2 * shape.head_dim_v)
            sets = 1 if per_set > (64 << 20) else 3  # rotate inputs unless one set already exceeds L2
            inputs = [bench.random_inputs(shape, dtype, "cuda", requires_grad=True, seed=s) for s in range(sets)]
            grad = torch.randn(shape.batch, shape.seq_len, shape.heads, shape.head_dim_v, device="cuda", dtype=dtype)
            reference = None
            row = {}
            for name in names + variants:
                if name.startswith("cupy-"):
                    with torch.no_grad():
                        got = gated_linear_attention(**inputs[0], backend=name).float()
                    err = float((got - reference).norm() / reference.norm())
                    if not err < 1e-2:
                        print(f"{shape_name:<10} {name:<14} WRONG: relative difference {err:.2e} from cupy")
                        continue
                if name == "cupy":
                    with torch.no_grad():
                        reference = gated_linear_attention(**inputs[0], backend="cupy").float()
                try:
                    row[name] = time_backend(name, inputs, grad)
                except Exception as exc:
                    print(f"{shape_name:<10} {name:<14} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                _print_row(shape_name, name, row[name], row.get(args.baseline))
            if args.sdpa:
                row["sdpa"] = _time_sdpa(shape, dtype)
                _print_row(shape_name, "sdpa", row["sdpa"], row.get(args.baseline))
                floors = {f"floor_{k}": bench.memory_floor_bytes(shape, dtype, backward=k == "fwd_bwd") / bandwidth * 1e3
                          for k in ("fwd", "fwd_bwd")}
                row["floor"] = floors
                print(f"{shape_name:<10} {'memory floor':<14} {floors['floor_fwd']:>8.3f} {floors['floor_fwd_bwd']:>8.3f}")
            results[shape_name] = row
            del inputs
            torch.cuda.empty_cache()
    finally:
        for name in variants:
            registry.unregister(name)
    if args.profile_host:
        _profile_host(bench.SHAPES[(args.shape or list(bench.SHAPES))[0]], dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
