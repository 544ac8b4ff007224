"""Relative errors over many seeds: how often a backend misses the DESIGN §3 bound.

    python benchmarks/precision_survey.py [--backends triton,cupy] [--dtype bfloat16]
        [--seeds 100] [--device cuda] [--half-dots bf16x3]

The shared test suite draws one fixed seed per shape, so a bound missed by a few percent of
the inputs passes or fails by the luck of that seed. This runs the suite's shapes and modes
(``tests/test_backends.py``) over ``--seeds`` seeds each and prints, per backend, shape and
mode, the worst relative error over the output, the final state and every gradient, and the
number of seeds above the bound. Errors follow ``tests/gla_testing.py``: the float64
reference sees the same dtype-rounded inputs and cotangents. Outputs whose reference is
exactly zero (the gate gradients of a one-token sequence without a state) are left out.
``--half-dots`` runs the triton backend with that ``Config.half_dots`` (how its matmuls treat
float16 / bfloat16 operands, ``backends/triton/launch.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from gla_testing import Case, backend_and_reference, make_inputs  # noqa: E402

BOUNDS = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SHAPES = [(1, 1, 1, 1, 1), (2, 67, 2, 17, 33), (1, 100, 1, 72, 1), (1, 31, 3, 33, 72), (1, 9, 1, 100, 17)]
MODES = [("bi", True, False), ("causal", False, False), ("causal-state", False, True)]


def worst_error(backend: str, case: Case, device: str, seed: int) -> float:
    kwargs = {"bidirectional": case.bidirectional}
    if case.states:
        kwargs["output_final_state"] = True
    got, expected = backend_and_reference(backend, make_inputs(case, device, seed), **kwargs)
    errors = []
    for name, ref in expected.items():
        if got.get(name) is None or ref.norm() == 0:
            continue
        out = got[name].double().cpu()
        errors.append(float("inf") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item())
    return max(errors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="triton,cupy")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--half-dots", default=None, help="triton's Config.half_dots (default: the dtype's)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bound = BOUNDS[dtype]
    with contextlib.ExitStack() as stack:
        if args.half_dots:
            from glakernels.backends.triton import launch

            stack.enter_context(launch.override_config(half_dots=args.half_dots))
        survey(args.backends.split(","), dtype, bound, args.seeds, args.device)
    return 0


def survey(backends, dtype, bound, seeds, device):
    for backend in backends:
        for shape in SHAPES:
            for mode, bidirectional, states in MODES:
                case = Case(*shape, dtype, bidirectional, states)
                errors = [worst_error(backend, case, device, seed) for seed in range(seeds)]
                over = sum(e > bound for e in errors)
                print(f"{backend:7s} {case.id():40s} worst {max(errors):.2e}, above {bound:g} in {over}/{seeds} "
                      f"seeds", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
