"""The cupy backend's tensor-core forward against its recurrent sweep and the triton backend,
on one GPU, in one run.

    python benchmarks/cupy_chunk_forward_gpu.py [--shapes vigT_224,vigB_224,8x196x3x32x64]
        [--modes bi,causal] [--gates vig,strong,extreme] [--launches "2,1,1;4,0,2"] [--segments 128,512]
        [--dtype bfloat16|float16]

For every shape and mode: the relative error of ``o`` against the float64 torch backend on
the same GPU (for each gate regime; ``strong`` and ``extreme`` send chunks down the kernel's
exact path), then the GPU time of each forward as ``triton_configs_gpu.graph_time`` measures
it (CUDA-graph replay, three input sets). ``--launches`` adds launches of the tensor-core
forward other than the plan's (warps per direction, prefetch 0/1, minimum blocks per SM), and
``--segments`` other segment lengths for sequences cut into segments (the plan's: 256 tokens
for sequences over 512), each checked on ViG gates and timed. The table is printed last, with the ratios to triton's time
measured in the same run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from triton_configs_gpu import BOUNDS, graph_time, shape_from  # noqa: E402

from glakernels import gated_linear_attention  # noqa: E402
from glakernels.bench import memory_floor_bytes  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from gla_testing import Case, make_inputs  # noqa: E402


def cupy_forward(chunk_forward: bool, launch=None, segment=None):
    from glakernels._custom_op import _inputs
    from glakernels.backends.cupy import _driver
    from glakernels.backends.cupy._runtime import CupyLauncher

    def run(x: dict, bidirectional: bool):
        inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, x["q"].shape[-1] ** -0.5,
                         bidirectional, False)
        return _driver.forward(inputs, CupyLauncher(x["q"].device), chunk_forward=chunk_forward,
                               chunk_forward_launch=launch, chunk_len=segment)[0]

    return run


def triton_forward(x: dict, bidirectional: bool):
    return gated_linear_attention(x["q"], x["k"], x["v"], x["g"], bidirectional, g_reverse=x.get("g_reverse"),
                                  backend="triton")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="vigT_224,vigB_224,8x196x3x32x64,128x196x6x32x64,32x512x3x32x64,64x64x4x16x32")
    parser.add_argument("--modes", default="bi,causal")
    parser.add_argument("--gates", default="vig,strong,extreme")
    parser.add_argument("--launches", default="")
    parser.add_argument("--segments", default="")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    from glakernels.backends.cupy._plan import ChunkForwardLaunch

    dtype = getattr(torch, args.dtype)
    runs = {"cupy (tensor cores)": cupy_forward(True), "cupy (sweep)": cupy_forward(False), "triton": triton_forward}
    for text in filter(None, args.launches.split(";")):
        warps, prefetch, min_blocks = (int(n) for n in text.split(","))
        runs[f"cupy tc {warps},{prefetch},{min_blocks}"] = cupy_forward(True, ChunkForwardLaunch(warps, bool(prefetch), min_blocks))
    for text in filter(None, args.segments.split(",")):
        runs[f"cupy tc segment {text}"] = cupy_forward(True, segment=int(text))
    rows = []
    for name in args.shapes.split(","):
        shape = shape_from(name)
        for mode in args.modes.split(","):
            bi = mode == "bi"
            case = lambda gates: Case(shape.batch, shape.seq_len, shape.heads, shape.head_dim_k,  # noqa: E731
                                      shape.head_dim_v, dtype, bi, gates=gates)
            errors = {}
            for gates in args.gates.split(","):
                x = make_inputs(case(gates), "cuda", seed=3)
                ref = gated_linear_attention(*(x[n].double() for n in ("q", "k", "v", "g")), bi,
                                             g_reverse=x["g_reverse"].double() if bi else None, backend="torch")
                for run_name, run in runs.items():
                    if gates != "vig" and run_name.startswith("cupy tc"):
                        continue
                    o = run(x, bi)
                    err = float("inf") if not torch.isfinite(o).all() else ((o.double() - ref).norm() / ref.norm()).item()
                    errors[run_name] = max(errors.get(run_name, 0.0), err)
                    print(f"{name} {mode} {gates} {run_name}: error {err:.2e}", flush=True)
            sets = [make_inputs(case("vig"), "cuda", seed=s) for s in range(3)]
            times = {run_name: graph_time(lambda x, run=run: run(x, bi), sets) for run_name, run in runs.items()}
            floor = memory_floor_bytes(shape, dtype, bidirectional=bi) / 3.0e12 * 1e3
            for run_name in runs:
                rows.append((name, mode, run_name, times[run_name], times[run_name] / times["triton"],
                             times[run_name] / floor, errors[run_name]))
                print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}; {args.dtype} forward, ms per call (CUDA-graph replay); error: worst over gates "
          f"{args.gates} against the float64 torch backend (bound {BOUNDS[dtype]})")
    print(f"{'shape':<18} {'mode':<7} {'backend':<20} {'ms':>8} {'÷ triton':>9} {'× floor':>8} {'error':>9}")
    for name, mode, run_name, ms, ratio, floor_ratio, err in rows:
        flag = "" if err <= BOUNDS[dtype] else "  FAILED"
        print(f"{name:<18} {mode:<7} {run_name:<20} {ms:8.4f} {ratio:9.2f} {floor_ratio:8.1f} {err:9.2e}{flag}")
    print("(cupy tc w,p,m: the tensor-core forward with w warps per direction, prefetch p, at least m blocks per SM)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
