"""The ``glakernels`` command (also ``python -m glakernels``).

``glakernels``          all three below, on the CPU by default (the project's main job)
``glakernels info``     every backend, available or not, and why
``glakernels check``    every backend that runs here against the float64 reference
``glakernels bench``    a short timing table of every backend that runs here
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from . import bench
from ._api import gated_linear_attention
from ._dispatch import available_backends, registry
from ._problem import ProblemSpec
from .reference import gated_linear_attention_reference

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _spec(shape: bench.Shape, dtype: torch.dtype, device: str, bidirectional: bool, states: bool = False) -> ProblemSpec:
    return ProblemSpec(
        shape.batch, shape.seq_len, shape.heads, shape.head_dim_k, shape.head_dim_v,
        dtype, torch.device(device).type, bidirectional, states, states,
    )


def _runnable(spec: ProblemSpec) -> list[str]:
    return [b.name for b in registry.backends() if not b.not_supported_reasons(spec)]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def cmd_info(args) -> int:
    print(f"glakernels backends (torch {torch.__version__}):")
    for status in available_backends():
        print(f"  {status}")
        if status.description:
            print(f"           {status.description}")
    return 0


def cmd_check(args) -> int:
    """Outputs and every gradient against the float64 recurrent reference, fresh random inputs."""
    dtype = _DTYPES[args.dtype]
    shape = bench.Shape("check", 2, 67, 2, 17, 33)  # odd sizes on purpose: T not a chunk multiple
    print(f"\ncheck: {shape} {args.dtype} on {args.device}, against the float64 reference")
    print(f"  {'backend':<8} {'mode':<14} {'output err':>11} {'worst grad':>11} {'bound':>8}  result")
    failures = 0
    for bidirectional in (True, False):
        spec = _spec(shape, dtype, args.device, bidirectional, states=not bidirectional)
        inputs = bench.random_inputs(shape, dtype, args.device, bidirectional=bidirectional, seed=args.seed)
        if not bidirectional:
            B, H, K, V = shape.batch, shape.heads, shape.head_dim_k, shape.head_dim_v
            inputs["initial_state"] = torch.randn(B, H, K, V, device=args.device, dtype=spec.state_dtype)
        kwargs = {"output_final_state": True} if not bidirectional else {}
        ref_in = {n: x.detach().double().cpu().requires_grad_() for n, x in inputs.items()}
        ref = gated_linear_attention_reference(**ref_in, bidirectional=bidirectional, **kwargs)
        ref_outs = ref if isinstance(ref, tuple) else (ref,)
        weights = [torch.randn_like(r) for r in ref_outs]
        sum(((r * w).sum() for r, w in zip(ref_outs, weights))).backward()
        for name in _runnable(spec):
            run_in = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
            out = gated_linear_attention(**run_in, bidirectional=bidirectional, backend=name, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum(((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights)))
            loss.backward()
            out_err = max(_rel_err(o, r) for o, r in zip(outs, ref_outs))
            grad_err = max(_rel_err(run_in[n].grad, ref_in[n].grad) for n in run_in)
            bound = registry.get(name).tolerance(dtype)
            ok = out_err <= bound and grad_err <= bound
            failures += not ok
            mode = "bidirectional" if bidirectional else "causal+states"
            print(f"  {name:<8} {mode:<14} {out_err:>11.2e} {grad_err:>11.2e} {bound:>8.0e}  {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


def cmd_bench(args) -> int:
    dtype = _DTYPES[args.dtype]
    cuda = torch.device(args.device).type == "cuda"
    shapes = bench.SHAPES if cuda else bench.CPU_SHAPES
    if args.shape:
        pool = {**bench.SHAPES, **bench.CPU_SHAPES}
        unknown = [s for s in args.shape if s not in pool]
        if unknown:
            print(f"unknown shape(s) {unknown}; choose from {', '.join(pool)}", file=sys.stderr)
            return 2
        shapes = {s: pool[s] for s in args.shape}
    print(f"\nbench: bidirectional, {args.dtype}, {args.device}, median of {args.repeats} (ms; ratio = torch backend / this)")
    print(f"  {'shape':<14} {'backend':<8} {'forward':>9} {'fwd+bwd':>9} {'fwd ratio':>9} {'f+b ratio':>9}")
    for shape in shapes.values():
        spec = _spec(shape, dtype, args.device, True)
        inputs = bench.random_inputs(shape, dtype, args.device, requires_grad=True)
        results = {}
        for name in _runnable(spec):
            def forward(name=name):
                with torch.no_grad():
                    return gated_linear_attention(**inputs, backend=name)

            def forward_backward(name=name):
                gated_linear_attention(**inputs, backend=name).sum().backward()

            results[name] = (
                bench.median_time(forward, args.device, repeats=args.repeats) * 1e3,
                bench.median_time(forward_backward, args.device, repeats=args.repeats) * 1e3,
            )
        base = results.get("torch")
        for name, (fwd, fb) in results.items():
            r1 = f"{base[0] / fwd:.2f}x" if base else "-"
            r2 = f"{base[1] / fb:.2f}x" if base else "-"
            print(f"  {shape.name:<14} {name:<8} {fwd:>9.3f} {fb:>9.3f} {r1:>9} {r2:>9}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glakernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(command="all")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="list backends and why unavailable ones are")
    for name in ("check", "bench", "all"):
        p = sub.add_parser(name, help={"check": "check backends against the reference", "bench": "time backends", "all": "info, check and bench"}[name])
        # the options may come before or after the command: a subcommand's parser sets only
        # what it was given, so it never overwrites `glakernels --device cuda check`'s value
        _add_common(p, argparse.SUPPRESS)
    _add_common(parser)
    return parser


def _add_common(p: argparse.ArgumentParser, suppress: str | None = None) -> None:
    default = (lambda value: suppress) if suppress else (lambda value: value)
    p.add_argument("--device", default=default("cpu"), help="torch device to run on (default: cpu)")
    p.add_argument("--dtype", default=default("float32"), choices=sorted(_DTYPES))
    p.add_argument("--seed", type=int, default=default(0))
    p.add_argument("--repeats", type=int, default=default(5), help="timed repeats per measurement")
    p.add_argument("--shape", action="append", default=default(None), help="bench only this shape (repeatable)")


def _device_error(device: str) -> str | None:
    """Why ``device`` cannot run here, or None."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:  # torch raises AssertionError for CUDA on CPU builds
        return f"--device {device!r} cannot be used here: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    error = _device_error(args.device)
    if error:
        print(f"glakernels: {error}", file=sys.stderr)
        return 2
    if args.command == "check":
        return cmd_check(args)
    if args.command == "bench":
        return cmd_bench(args)
    cmd_info(args)
    status = cmd_check(args)
    cmd_bench(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
