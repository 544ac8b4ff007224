"""ViG-T/S against timm's DeiT-T/S/B: images/s and peak memory, inference and a training step.

One run measures every model at every resolution on the same device, so the ratios in the
final table compare like with like (DESIGN.md §8 targets, bf16 autocast on an H100):

- ViG-T inference >= 1.0x DeiT-T's images/s at 224 px (batch 128), >= 4.8x at 1024 px (batch 8);
- ViG-T training step at 1024 px with less peak memory than DeiT-T.

DeiT runs timm's ``VisionTransformer`` (fused SDPA attention, i.e. FlashAttention on H100);
its position embedding is sized for each resolution. ViG runs ``gated_linear_attention`` on
the best backend available (``--backend`` forces one).

    python benchmarks/models_gpu.py                              # the full table on CUDA
    python benchmarks/models_gpu.py --compile-modes eager,compile --json out.json   # + torch.compile rows
    python benchmarks/models_gpu.py --device cpu --tiny          # smoke test on a laptop / CI box
    python benchmarks/models_gpu.py --profile ViG-T:1024:8:infer  # where one step spends device time
    python benchmarks/models_gpu.py --profile ViG-T:224:128:infer:compile  # ... compiled (eager|graph|compile)
    python benchmarks/models_gpu.py --models ViG-T --triton-config single_pass_ratio=False  # a kernel A/B

Needs timm for DeiT (without it only the ViG rows are measured).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import vig  # noqa: E402  (after the path tweak, so a checkout runs without installing)
from glakernels.bench import capture_cuda_graph  # noqa: E402

#: (resolution, batch): DESIGN.md §8's measurement points
FULL_POINTS = [(224, 128), (512, 32), (1024, 8)]
TINY_POINTS = [(64, 4), (128, 2)]

#: --compile-modes that compile, and their torch.compile mode
COMPILE_MODES = {"compile": None, "compile-ro": "reduce-overhead"}

VIG_MODELS = {"ViG-T": "vig_tiny", "ViG-S": "vig_small"}
DEIT_MODELS = {"DeiT-T": "deit_tiny_patch16_224", "DeiT-S": "deit_small_patch16_224", "DeiT-B": "deit_base_patch16_224"}


def build(label: str, img_size: int, tiny: bool) -> nn.Module:
    shrink = dict(depth=2) if tiny else {}
    if label in VIG_MODELS:
        return vig.create_model(VIG_MODELS[label], img_size=img_size, **shrink)
    import timm

    return timm.create_model(DEIT_MODELS[label], img_size=img_size, **shrink)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, min_time: float, min_iters: int, after_step=None) -> float:
    """Median seconds per call over at least ``min_iters`` calls and ``min_time`` seconds."""
    after_step = after_step or (lambda: None)
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        after_step()
        if len(times) >= 200:
            break
    return statistics.median(times)


def forget_cublas_workspaces() -> None:
    """Free the cuBLAS workspaces earlier rows left behind, so that every row's peak counts
    its own. PyTorch keeps one workspace per (handle, stream) in the caching allocator, so
    they count as allocated memory, and each row's graph capture uses new streams: without
    this, every row's peak carried the workspaces of all rows before it (H100, ViG-T and
    DeiT-T alternating at 1024 px: ~33 MiB more per inference row, ~65 per training row;
    ViG-T / DeiT-T inference peak 0.88× with the carry-over, 0.98× without; nineteenth
    session, ``benchmarks/RESULTS.md``)."""
    gc.collect()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private: absent, keep the old count
    if clear is not None:
        clear()
    torch.cuda.empty_cache()


def measure(label: str, img_size: int, batch: int, mode: str, runner_kind: str, args, device,
            after_step=None) -> dict:
    """One row. ``runner_kind``: ``eager``; ``compile`` (``torch.compile``, default mode);
    ``compile-ro`` (``mode="reduce-overhead"``: compiled and replayed from CUDA graphs); or
    ``graph``: the eager step (inference, or forward, backward and the optimizer's step)
    captured once in a CUDA graph and replayed, which takes Python and kernel launches out of
    the timing (the GPU-bound speed of the same eager kernels)."""
    if device.type == "cuda":
        forget_cublas_workspaces()
    torch.manual_seed(0)
    model = build(label, img_size, args.tiny).to(device)
    model.train(mode == "train")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    if runner_kind in COMPILE_MODES:
        torch._dynamo.reset()  # a fresh compile per row: no recompiles for dynamic shapes
        runner = torch.compile(model, mode=COMPILE_MODES[runner_kind])
    else:
        runner = model
    # CUDA graph capture needs autocast's weight-cast cache off
    # (fp16: autocast in float16 without a GradScaler, whose finite-gradient check syncs the host;
    # the timing leaves out its few elementwise passes over the gradients, for every model alike)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    amp = (torch.autocast(device.type, dtype=amp_dtype, cache_enabled=runner_kind != "graph")
           if amp_dtype is not None else contextlib.nullcontext())
    # (a captured step needs the optimizer's step counters on the GPU: capturable)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda",
                                   capturable=runner_kind == "graph") if mode == "train" else None)

    def infer():
        with torch.no_grad(), amp:
            runner(x)

    def train_step():
        with amp:
            loss = nn.functional.cross_entropy(runner(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = infer if mode == "infer" else train_step

    def reset_peak():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    for i in range(args.warmup):
        step()
        if after_step is not None:
            after_step()
        if i == 0:
            # The peak counts from the second step on: the first step's one-off allocations
            # (cuDNN's benchmark workspaces, lazy initialisation) stay out. It must not start
            # after the warm-up: a CUDA graph (``graph``, and ``compile-ro``'s CUDA-graph trees)
            # takes every intermediate from its private pool while it is captured, and its
            # replays allocate nothing, so a peak taken over replays alone is the parameters'
            # and optimizer state's memory, not the step's.
            reset_peak()
    if args.warmup == 0:
        reset_peak()
    if runner_kind == "graph":
        with torch.cuda.device(device):
            step = capture_cuda_graph(step).replay
    seconds = timed(step, device, args.min_time, args.min_iters, after_step)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    del model, runner, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(model=label, img_size=img_size, batch=batch, mode=mode, compiled=runner_kind,
                images_per_s=batch / seconds, ms=1e3 * seconds, peak_mib=peak)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':8} {'px':>5} {'batch':>5} {'mode':6} {'compiled':8} {'img/s':>10} {'ms':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['model']:8} {r['img_size']:5d} {r['batch']:5d} {r['mode']:6} {r['compiled']:8} "
              f"{r['images_per_s']:10.1f} {r['ms']:9.2f} {r['peak_mib']:9.0f}")


def print_ratios(rows: list[dict]) -> None:
    """ViG over DeiT of the same size class at each point (the DESIGN.md §8 targets)."""
    index = {(r["model"], r["img_size"], r["mode"], r["compiled"]): r for r in rows}
    print("\nratios (same run, same device)")
    for (model, px, mode, compiled), r in sorted(index.items()):
        if not model.startswith("ViG"):
            continue
        deit = index.get(("DeiT" + model[3:], px, mode, compiled))
        if deit is None:
            continue
        speed = r["images_per_s"] / deit["images_per_s"]
        memory = r["peak_mib"] / deit["peak_mib"] if deit["peak_mib"] == deit["peak_mib"] else float("nan")
        print(f"  {model} / DeiT{model[3:]} at {px:4d} px, {mode:5} {compiled:8}: "
              f"{speed:5.2f}x images/s, {memory:5.2f}x peak memory")


def profile(args, device: torch.device) -> int:
    """Where one step's time goes: torch.profiler's operator table, sorted by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    label, px, batch, mode, *kind = args.profile.split(":")
    px, batch, kind = int(px), int(batch), (kind or ["eager"])[0]
    active = 2  # profile the last two timed steps: warm-up (and compiling) stays out of the table
    args.min_time, args.min_iters = 0.0, 2 + active
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    schedule = torch.profiler.schedule(wait=args.warmup + 1, warmup=1, active=active, repeat=1)
    with torch_profile(activities=activities, schedule=schedule) as prof:
        row = measure(label, px, batch, mode, kind, args, device, after_step=prof.step)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30))
    print(f"{label} {px}px b{batch} {mode} {kind}: {row['images_per_s']:.1f} img/s while profiled "
          f"(the table: {active} steps)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="2-block models at small sizes (a smoke test for CPU)")
    p.add_argument("--models", default="ViG-T,ViG-S,DeiT-T,DeiT-S,DeiT-B")
    p.add_argument("--points", default=None, help="resolution:batch list, e.g. 224:128,1024:8")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--compile-modes", default="eager",
                   help="comma list of eager, compile (torch.compile), compile-ro (torch.compile with "
                        "mode='reduce-overhead') and graph (CUDA-graph replay of the eager step, inference "
                        "or training)")
    p.add_argument("--compile-models", default="ViG-T,DeiT-T",
                   help="models that get compiled rows (compiling takes ~a minute per model, point and mode)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (fp16 without a GradScaler), or fp32: no autocast")
    p.add_argument("--backend", default=None, help="force a glakernels backend for ViG")
    p.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision: 'high' allows tf32; 'medium' also lets the triton "
                        "backend round its float32 intermediates to bfloat16 (faster, less accurate)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement")
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--profile", default=None, metavar="MODEL:PX:BATCH:MODE",
                   help="instead of the table, profile one point (e.g. ViG-T:1024:8:infer) and print the "
                        "operators that take the device's time")
    p.add_argument("--triton-config", default="", metavar="FIELD=VALUE,...",
                   help="run every row under the triton backend's launch.override_config with these Config "
                        "fields (e.g. single_pass_ratio=False): the other side of a kernel-setting A/B, from the "
                        "same tree (a second checkout on PYTHONPATH does not replace glakernels.backends)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.backend:
        os.environ["GLAKERNELS_BACKEND"] = args.backend
    if device.type == "cuda":
        torch.set_float32_matmul_precision(args.matmul_precision)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    points = FULL_POINTS if not args.tiny else TINY_POINTS
    if args.points:
        points = [tuple(int(v) for v in pt.split(":")) for pt in args.points.split(",")]
    models = args.models.split(",")
    try:
        import timm  # noqa: F401
    except ImportError:
        print("timm is not installed: measuring the ViG rows only", file=sys.stderr)
        models = [m for m in models if m in VIG_MODELS]
    compile_modes = args.compile_modes.split(",")
    unknown = set(compile_modes) - {"eager", "graph", *COMPILE_MODES}
    if unknown:
        p.error(f"--compile-modes: unknown {sorted(unknown)}; expected eager, graph, {', '.join(COMPILE_MODES)}")

    import glakernels

    try:
        overrides = triton_overrides(args.triton_config)
    except ValueError as e:
        p.error(f"--triton-config: {e}")
    backends = [b.name for b in glakernels.available_backends() if b.available]
    print(f"device: {device_name(device)}; torch {torch.__version__}; dtype {args.dtype}; "
          f"glakernels backends available: {backends}"
          + (f"; triton config {args.triton_config}" if args.triton_config else ""))
    with overrides:
        return run(args, device, points, models, compile_modes)


def triton_overrides(text: str):
    """The context ``--triton-config`` asks for: ``launch.override_config`` with its fields,
    checked against ``launch.Config`` here rather than at the first kernel launch."""
    if not text.strip():
        return contextlib.nullcontext()
    try:
        from glakernels.backends.triton import launch
    except ImportError as e:
        raise ValueError(f"needs the triton backend, which does not import here ({e})") from None
    return launch.override_config(**launch.config_fields(text))


def run(args, device, points, models, compile_modes) -> int:
    if args.profile:
        return profile(args, device)
    rows = []
    for compiled in compile_modes:
        for mode in args.modes.split(","):
            for img_size, batch in points:
                for label in models:
                    if compiled in COMPILE_MODES and label not in args.compile_models.split(","):
                        continue
                    if compiled == "graph" and device.type != "cuda":
                        continue
                    try:
                        row = measure(label, img_size, batch, mode, compiled, args, device)
                    except torch.OutOfMemoryError:
                        print(f"{label} {img_size}px batch {batch} {mode}: out of memory", file=sys.stderr)
                        gc.collect()
                        torch.cuda.empty_cache()
                        continue
                    rows.append(row)
                    print(f"{label:7} {img_size:5d}px b{batch:<4d} {mode:5} {compiled}: "
                          f"{row['images_per_s']:9.1f} img/s  {row['peak_mib']:8.0f} MiB", flush=True)
    print_table(rows)
    print_ratios(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(device), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
