"""Time the triton forward's launch settings by grid size, on one GPU, in one run.

    python benchmarks/triton_grid_launches_gpu.py [--batches 1,16,33,64,128] [--modes bidirectional,causal]
        [--seq-len 196] [--heads 3] [--k 32] [--v 64]

The single-pass forward picks its warps and register cap by the grid's size
(``launch._single_pass_launch``: the first of ``Config.single_pass_small_grid_launches`` whose
slots hold the grid in one wave, else the large-grid setting). For each batch (bfloat16,
ViG-T's heads at 224 px by default) this forces each setting in turn and times it, beside the
automatic choice, as GPU time per call from a CUDA graph (``triton_configs_gpu.graph_time``:
30 calls cycling 3 input sets). Before timing, every setting's output is compared bit for bit
with the large-grid setting's: the choice is only sound if they agree (a sequence's result
must not depend on the rest of the batch), and a row that differs says how many outputs do.
The table, printed last: µs per setting, the automatic choice's setting and its time against
the large-grid setting's. Bidirectional rows also time the three ways the directions' parts
meet: once in the middle of the walks (``Config.single_pass_meet``, the default), chunk by
chunk inside the walk, or every part parked and summed by a second launch
(``Config.single_pass_park_all_per_sm``); each under the automatic warps, each checked bit for
bit against the large-grid setting.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_configs_gpu import graph_time  # noqa: E402

from glakernels import gated_linear_attention  # noqa: E402
from glakernels.bench import Shape, random_inputs  # noqa: E402


# the ways a bidirectional call's two parts of a chunk can meet (launch.Config)
HANDOFFS = {
    "meeting": dict(single_pass_meet=True, single_pass_park_all_per_sm=0),
    "per chunk": dict(single_pass_meet=False, single_pass_park_all_per_sm=0),
    "park all": dict(single_pass_park_all_per_sm=10**9),
}


def _label(warps, cap=None) -> str:
    if isinstance(warps, str):  # a handoff
        return warps
    return f"{warps}w" + (f" cap {cap}" if cap else "")


def _key(k) -> str:
    return k if isinstance(k, str) else _label(*k)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16,22,33,44,64,128,256")
    parser.add_argument("--modes", default="bidirectional,causal")
    parser.add_argument("--seq-len", type=int, default=196)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--v", type=int, default=64)
    args = parser.parse_args(argv)
    from glakernels.backends.triton import launch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), f"({sms} SMs)", "torch", torch.__version__, flush=True)
    cfg = launch.choose_config(args.seq_len, args.k, args.v)
    large = (cfg.single_pass_num_warps, cfg.single_pass_maxnreg)
    settings = [(w, cap) for w, cap, _ in cfg.single_pass_small_grid_launches] + [large]
    rows = []
    for mode in args.modes.split(","):
        bidirectional = mode == "bidirectional"
        for batch in (int(b) for b in args.batches.split(",")):
            shape = Shape("grid", batch, args.seq_len, args.heads, args.k, args.v)
            sets = [random_inputs(shape, torch.bfloat16, "cuda", bidirectional=bidirectional, seed=s) for s in range(3)]
            programs = launch._single_pass_programs(batch, args.seq_len, args.heads, args.v, bidirectional, cfg)
            auto = launch._single_pass_launch(cfg, programs, sms, traced=False)

            def call(x):
                with torch.no_grad():
                    return gated_linear_attention(**x, bidirectional=bidirectional, backend="triton")

            times, differ = {}, {}
            for warps, cap in settings:
                # one entry that holds any grid: this setting runs whatever the grid's size
                forced = () if (warps, cap) == large else ((warps, cap, 10**9),)
                with launch.override_config(single_pass_small_grid_launches=forced):
                    out = call(sets[0])
                    times[(warps, cap)] = graph_time(call, sets) * 1e3
                if (warps, cap) == large:
                    reference = out
                else:
                    differ[(warps, cap)] = out
            if bidirectional:  # the two handoffs, each under the automatic warps
                for handoff, fields in HANDOFFS.items():
                    with launch.override_config(**fields):
                        differ[handoff] = call(sets[0])
                        times[handoff] = graph_time(call, sets) * 1e3
            mismatches = {s: (o != reference).sum().item() for s, o in differ.items()}
            times["auto"] = graph_time(call, sets) * 1e3
            rows.append((mode, batch, programs, auto, times, mismatches))
            print(mode, batch, programs, {_key(k): round(v, 1) for k, v in times.items()},
                  "differing outputs:", {_key(k): v for k, v in mismatches.items() if v}, flush=True)
    print(f"\nforward, bfloat16, T = {args.seq_len}, H = {args.heads}, K = {args.k}, V = {args.v}; µs per call "
          f"(CUDA-graph replay), {torch.cuda.get_device_name()}")
    handoffs = list(HANDOFFS)
    print("| mode | batch | programs | " + " | ".join(_label(*s) for s in settings) + " | "
          + " | ".join(handoffs) + " | automatic (setting) | ÷ large-grid setting | differing outputs |")
    print("| --- " * (len(settings) + 9) + "|")
    for mode, batch, programs, auto, times, mismatches in rows:
        wrong = sum(mismatches.values())
        print(f"| {mode} | {batch} | {programs} | " + " | ".join(f"{times[s]:.1f}" for s in settings) + " | "
              + " | ".join(f"{times[h]:.1f}" if h in times else "—" for h in handoffs)
              + f" | {times['auto']:.1f} ({_label(*auto)}) | {times['auto'] / times[large]:.2f} | "
              + (f"**{wrong}**" if wrong else "0") + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
