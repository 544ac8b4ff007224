"""The cupy backend's tensor-core backward against its recurrent sweeps and the triton backend,
on one GPU, in one run.

    python benchmarks/cupy_chunk_backward_gpu.py [--shapes vigT_224,vigB_224] [--modes bi,causal]
        [--gates vig,strong,extreme] [--launches "2,1,2,1;1,1,1,3;2,3,2,3,1,0,1"] [--dtype float16]

For every shape and mode: the relative error of every gradient (dq, dk, dv, dg, dg_reverse)
against the float64 torch backend on the same GPU, for each gate regime (``strong`` and
``extreme`` make the dq kernel flag sequences for the sweeps), then GPU time (CUDA-graph
replay, three input sets, ``triton_configs_gpu.graph_time``) of the backward alone and of
forward + backward, each backend's own forward. ``--launches`` adds launches of the
tensor-core backward other than the plan's (dq warps per direction, dq minimum blocks per
SM, dv and dk warps per direction, their minimum blocks per SM, and optionally 1/0: the fused
adjoint walk, 1/0: its prefetching, 1/0: its adjoint in shared memory). The table is printed last, with ratios to triton's times
measured in the same run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from triton_configs_gpu import BOUNDS, graph_time, rel_error, shape_from  # noqa: E402

from glakernels import gated_linear_attention  # noqa: E402
from glakernels.bench import memory_floor_bytes  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from gla_testing import Case, make_inputs  # noqa: E402

GRADIENTS = ("dq", "dk", "dv", "dg", "dg_reverse")


def _inputs_of(x: dict, bidirectional: bool):
    from glakernels._custom_op import _inputs

    return _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, x["q"].shape[-1] ** -0.5,
                   bidirectional, False)


def cupy_run(chunk_backward: bool, launch=None):
    """(forward, backward) of the cupy backend, the backward's tensor cores on or off."""
    from glakernels.backends.cupy import _driver
    from glakernels.backends.cupy._runtime import CupyLauncher

    def forward(x, bi):
        return _driver.forward(_inputs_of(x, bi), CupyLauncher(x["q"].device))[0]

    def backward(x, bi):
        return _driver.backward(_inputs_of(x, bi), x["dout"], None, CupyLauncher(x["q"].device),
                                chunk_backward=chunk_backward, chunk_backward_launch=launch)

    return forward, backward


def triton_run():
    from glakernels._dispatch import registry

    impl = registry.get("triton")
    return (lambda x, bi: impl.forward(_inputs_of(x, bi))[0],
            lambda x, bi: impl.backward(_inputs_of(x, bi), x["dout"], None))


def reference_gradients(x: dict, bi: bool) -> dict:
    leaves = {n: x[n].double().requires_grad_() for n in ("q", "k", "v", "g", "g_reverse") if n in x}
    o = gated_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], bi,
                               g_reverse=leaves.get("g_reverse"), backend="torch")
    o.backward(x["dout"].double())
    return {"d" + n if n != "g_reverse" else "dg_reverse": t.grad for n, t in leaves.items()}


def with_dout(case: Case, seed: int) -> dict:
    x = make_inputs(case, "cuda", seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 100)
    x["dout"] = torch.randn(x["v"].shape, generator=gen, device="cuda").to(case.dtype)
    return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="vigT_224,vigB_224,8x196x3x32x64,128x196x6x32x64,32x512x3x32x64")
    parser.add_argument("--modes", default="bi,causal")
    parser.add_argument("--gates", default="vig,strong,extreme")
    parser.add_argument("--launches", default="")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    from glakernels.backends.cupy._plan import ChunkBackwardLaunch

    dtype = getattr(torch, args.dtype)
    runs = {"cupy (tensor cores)": cupy_run(True), "cupy (sweeps)": cupy_run(False), "triton": triton_run()}
    for text in filter(None, args.launches.split(";")):
        numbers = tuple(int(n) for n in text.split(","))
        runs["cupy tc " + text] = cupy_run(True, ChunkBackwardLaunch(*numbers))
    rows = []
    for name in args.shapes.split(","):
        shape = shape_from(name)
        for mode in args.modes.split(","):
            bi = mode == "bi"
            case = lambda gates: Case(shape.batch, shape.seq_len, shape.heads, shape.head_dim_k,  # noqa: E731
                                      shape.head_dim_v, dtype, bi, gates=gates)
            errors = {}
            for gates in args.gates.split(","):
                x = with_dout(case(gates), seed=3)
                ref = reference_gradients(x, bi)
                for run_name, (_, backward) in runs.items():
                    if gates != "vig" and run_name.startswith("cupy tc"):
                        continue
                    got = backward(x, bi)
                    fields = [field for field in GRADIENTS if field in ref]
                    worst = rel_error([getattr(got, field) for field in fields], [ref[field] for field in fields])
                    errors[run_name] = max(errors.get(run_name, 0.0), worst)
                    print(f"{name} {mode} {gates} {run_name}: worst gradient error {worst:.2e}", flush=True)
            sets = [with_dout(case("vig"), seed=s) for s in range(3)]
            floor = memory_floor_bytes(shape, dtype, bidirectional=bi, backward=True) / 3.0e12 * 1e3
            times = {}
            for run_name, (forward, backward) in runs.items():
                bwd = graph_time(lambda x, backward=backward: backward(x, bi), sets)
                both = graph_time(lambda x, f=forward, b=backward: (f(x, bi), b(x, bi)), sets)
                times[run_name] = (bwd, both)
            for run_name, (bwd, both) in times.items():
                rows.append((name, mode, run_name, bwd, bwd / times["triton"][0], both, both / times["triton"][1],
                             both / floor, errors[run_name]))
                print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}; {args.dtype}, ms per call (CUDA-graph replay); error: worst gradient over gates "
          f"{args.gates} against the float64 torch backend (bound {BOUNDS[dtype]})")
    print(f"{'shape':<18} {'mode':<7} {'backend':<20} {'bwd ms':>8} {'÷ triton':>9} {'f+b ms':>8} {'÷ triton':>9} "
          f"{'× floor':>8} {'error':>9}")
    for name, mode, run_name, bwd, r1, both, r2, floor_ratio, err in rows:
        flag = "" if err <= BOUNDS[dtype] else "  FAILED"
        print(f"{name:<18} {mode:<7} {run_name:<20} {bwd:8.4f} {r1:9.2f} {both:8.4f} {r2:9.2f} {floor_ratio:8.1f} "
              f"{err:9.2e}{flag}")
    print("(cupy tc w,a,x,b[,f,p,s]: the tensor-core backward with w dq warps per direction, at least a dq blocks per "
          "SM, x dv and dk warps per direction, at least b of their blocks per SM, f = 1: the fused adjoint walk, p = 1: "
          "its prefetching, s = 1: its adjoint in shared memory; f+b: each backend's own forward, the tensor-core rows "
          "with the tensor-core forward)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
