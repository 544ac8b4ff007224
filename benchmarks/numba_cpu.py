"""The numba backend against the torch backend on this CPU: speed, growth in T, compile time.

    python benchmarks/numba_cpu.py                # everything (a few minutes on 2 cores)
    python benchmarks/numba_cpu.py --skip-compile --rounds 5

Timings are interleaved: every round times each contender once, in turn, in one process, so
load from other processes on a shared machine falls on all of them alike. Reported: median
and minimum over rounds (ms), and ratios of medians and of minima (on a machine shared with
other work the minimum is the steadier estimate of the unloaded time). The issue's targets (DESIGN §8, issue
#3): forward+backward at least 3x faster than torch at (8, 196, 3, 32, 64) and
(1, 4096, 3, 32, 64), bidirectional float32; T = 8192 at most 2.2x the time of T = 4096
(the growth table also shows T = 2048 and 16384, to tell cache effects from the algorithm).

Compile time: a fresh process with an empty ``NUMBA_CACHE_DIR`` (cold: every kernel compiled),
then a second process on the same directory (warm: kernels loaded from the disk cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from glakernels import bench, gated_linear_attention

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def machine() -> str:
    import numba

    # the threading layer is chosen on the first parallel launch
    x = bench.random_inputs(bench.Shape("tiny", 1, 2, 1, 2, 2), torch.float32)
    gated_linear_attention(**x, backend="numba")

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} logical CPUs, load average {load}; numba {numba.__version__} "
        f"({numba.get_num_threads()} threads, layer {numba.threading_layer()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every contender, one call each per round, in turn."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def forward_backward(inputs: dict[str, torch.Tensor], backend: str) -> Callable[[], None]:
    def run():
        for x in inputs.values():
            x.grad = None
        gated_linear_attention(**inputs, backend=backend).sum().backward()

    return run


def forward_only(inputs: dict[str, torch.Tensor], backend: str) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            gated_linear_attention(**inputs, backend=backend)

    return run


def _ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:9.2f} {min(times) * 1e3:9.2f}"


def _ratios(numerator: list[float], denominator: list[float]) -> str:
    medians = statistics.median(numerator) / statistics.median(denominator)
    minima = min(numerator) / min(denominator)
    return f"{medians:7.2f}x {minima:7.2f}x"


def speed_table(dtype: torch.dtype, rounds: int) -> None:
    print(f"\nnumba vs torch, bidirectional {str(dtype).replace('torch.', '')}, {rounds} interleaved rounds "
          "(ms: median, min; ratios torch / numba of medians, of minima)")
    print(f"  {'shape':<40} {'pass':<8} {'torch':>19} {'numba':>19} {'ratios':>16}")
    for shape in bench.CPU_SHAPES.values():
        inputs = bench.random_inputs(shape, dtype, requires_grad=True)
        for label, make in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
            times = interleaved({"torch": make(inputs, "torch"), "numba": make(inputs, "numba")}, rounds)
            print(f"  {str(shape):<40} {label:<8} {_ms(times['torch'])} {_ms(times['numba'])} "
                  f"{_ratios(times['torch'], times['numba'])}")


def growth_table(dtype: torch.dtype, rounds: int) -> None:
    lengths = (2048, 4096, 8192, 16384)
    print(f"\nnumba, growth in T (B=1, H=3, K=32, V=64, bidirectional), {rounds} interleaved rounds "
          "(ms: median, min; ratios to the previous T of medians, of minima)")
    print(f"  {'pass':<8} {'T':>6} {'time':>19} {'ratios':>16}")
    inputs = {T: bench.random_inputs(bench.Shape(f"T{T}", 1, T, 3, 32, 64), dtype, requires_grad=True) for T in lengths}
    for label, make in (("fwd", forward_only), ("fwd+bwd", forward_backward)):
        times = interleaved({T: make(x, "numba") for T, x in inputs.items()}, rounds)
        for previous, T in zip((None, *lengths), lengths):
            ratios = _ratios(times[T], times[previous]) if previous else ""
            print(f"  {label:<8} {T:>6} {_ms(times[T])} {ratios}")


_FIRST_CALL = """
import time
t0 = time.perf_counter()
import torch
from glakernels import bench, gated_linear_attention
from glakernels.backends.numba import launch  # imports numba
t1 = time.perf_counter()
x = bench.random_inputs(bench.Shape("tiny", 2, 16, 2, 8, 8), torch.{dtype}, requires_grad=True)
gated_linear_attention(**x, backend="numba").sum().backward()
t2 = time.perf_counter()
gated_linear_attention(**x, backend="numba").sum().backward()
t3 = time.perf_counter()
print(f"{{t1 - t0:.2f}} {{t2 - t1:.2f}} {{(t3 - t2) * 1e3:.1f}}")
"""


def compile_table(dtype_name: str) -> None:
    print(f"\ncompile time, {dtype_name} (s; a fresh process each; first call = forward+backward, bidirectional)")
    print(f"  {'cache':<6} {'import':>7} {'first call':>11} {'second call':>12}")
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", _FIRST_CALL.format(dtype=dtype_name)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            print(f"  {label:<6} {float(out[0]):7.2f} {float(out[1]):11.2f} {float(out[2]):9.1f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args(argv)
    dtype = _DTYPES[args.dtype]
    print("machine:", machine())
    if not args.skip_compile:
        compile_table(args.dtype)
    if not args.skip_speed:
        speed_table(dtype, args.rounds)
    if not args.skip_growth:
        growth_table(dtype, 3 * args.rounds)
    print("\nload average at the end:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
