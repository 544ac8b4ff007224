"""Train and evaluate a ViG classifier: ``python -m vig.train``.

By default a small ViG trains on scikit-learn's handwritten digits (upsampled to 24 px, no
download) and reports the test accuracy. The same command runs unchanged under ``torchrun``
(DistributedDataParallel: gloo on CPU, NCCL on GPU; a ``DistributedSampler``; the global batch
is split across processes; rank 0 alone writes checkpoints)::

    python -m vig.train --output-dir runs/digits
    torchrun --nproc_per_node=2 -m vig.train --output-dir runs/digits
    python -m vig.train --output-dir runs/digits --resume auto      # continue where it stopped

Checkpoints hold the model (``{"model": state_dict}``, like the official ones), the optimizer,
the schedule and the position in training; a run can resume on a different process count.
``--print-param-hash`` prints a hash of every process's parameters at the end (replicas of a
correct data-parallel run are bitwise identical). The sequence of global batches does not
depend on the process count, so 1 and N processes train the same model up to rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ._registry import create_model, list_models
from .data import load_digits_datasets
from .progress import progress_bar


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vig.train", description=__doc__.split("\n\n")[0])
    # the model's flags default to None so that a resumed run can tell which were given (the
    # checkpoint's own model description fills the rest); MODEL_DEFAULTS holds their defaults
    p.add_argument("--model", default=None, choices=[m for m in list_models() if not m.startswith("dig")],
                   help="architecture (default: vig_tiny, shrunk by the size flags below)")
    p.add_argument("--embed-dim", type=int, default=None, help="width of a plain ViG (default 64 for the digits)")
    p.add_argument("--depth", type=int, default=None, help="blocks of a plain ViG (default 4)")
    p.add_argument("--num-heads", type=int, default=None, help="heads of a plain ViG (default 2)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size of a plain ViG (default 4)")
    p.add_argument("--official-size", action="store_true", default=None,
                   help="ignore the four size flags: the model as published (ViG-H models always are)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution the digits are upsampled to (default 24)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split across processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay of weight matrices and kernels (none on norms, biases, pos_embed)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (1: a small model gains little from more, and spinning "
                        "threads on a shared machine cost far more than they save)")
    p.add_argument("--output-dir", default=None, help="where checkpoints go (none written without it)")
    p.add_argument("--resume", default=None, help="a checkpoint to continue from, or 'auto' (<output-dir>/last.pt)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-param-hash", action="store_true", help="print every process's parameter hash at the end")
    args = p.parse_args(argv)
    args.model_flags_given = sorted(name for name in MODEL_DEFAULTS if getattr(args, name) is not None)
    for name, value in MODEL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    size_flags = [f"--{n.replace('_', '-')}" for n in ("embed_dim", "depth", "num_heads", "patch_size")
                  if n in args.model_flags_given]
    if size_flags and (args.model.startswith("vig_h") or args.official_size):
        p.error(f"{', '.join(size_flags)} shape a plain ViG; {args.model}"
                f"{' with --official-size' if args.official_size else ''} is built as published")
    if args.batch_size < 1 or args.epochs < 1:
        p.error("--batch-size and --epochs must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.resume == "auto" and args.output_dir is None:
        p.error("--resume auto needs --output-dir")
    if args.eval_only and args.resume is None:
        p.error("--eval-only needs --resume")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        p.error(f"--resume {args.resume}: no such file")
    return args


#: the flags that describe the model (parse_args fills in these defaults)
MODEL_DEFAULTS = dict(model="vig_tiny", embed_dim=64, depth=4, num_heads=2, patch_size=4, official_size=False,
                      img_size=24)


class Distributed:
    """What this process is in a (possibly one-process) data-parallel run."""

    def __init__(self, device_arg: Optional[str]):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        device_type = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is available")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device(device_type)
        self.enabled = self.world_size > 1
        if self.enabled:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled:
            # every rank reaches the teardown before any tears down: a rank that destroys its
            # process group while another is still in a collective can leave gloo hanging
            dist.barrier()
            dist.destroy_process_group()


def model_description(args: argparse.Namespace) -> tuple[str, dict]:
    """The registered name and the keyword arguments the flags ask for."""
    kwargs = dict(num_classes=10, in_chans=1, img_size=args.img_size)
    if not args.official_size and not args.model.startswith("vig_h"):
        kwargs.update(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, patch_size=args.patch_size,
                      drop_path_rate=0.0)
    return args.model, kwargs


def resumed_description(args: argparse.Namespace, ckpt: dict, path: str) -> tuple[str, dict]:
    """The model a resumed run builds: the checkpoint's own, unless model flags were given, which
    must then describe that same model (the plain sizes share parameter names and shapes, so a
    mismatch would otherwise load without complaint into a different network)."""
    saved = (ckpt.get("model_name"), ckpt.get("model_kwargs"))
    if None in saved:
        raise ValueError(f"{path} has no model description (model_name, model_kwargs): not a checkpoint of this CLI")
    if not args.model_flags_given:
        return saved
    asked = model_description(args)
    if asked != saved:
        raise ValueError(f"{path} holds {saved[0]} {saved[1]}, but the flags ({', '.join(args.model_flags_given)}) "
                         f"ask for {asked[0]} {asked[1]}: leave the model flags out to use the checkpoint's")
    return saved


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return 0.5 * args.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups as the official ViG recipe sets them: weight decay on the weight matrices
    and convolution kernels only; none on one-dimensional parameters (norms' scales, biases)
    or on what the model lists in ``no_weight_decay()`` (the position embedding). Decaying a
    norm's scale pulls it towards zero, not towards its identity value of one."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def save_checkpoint(path: str, model: nn.Module, optimizer, state: dict, args: argparse.Namespace, model_kwargs: dict) -> None:
    """Atomically (a crash never leaves a truncated file behind)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_name=args.model,
                   model_kwargs=model_kwargs, args=vars(args), **state)
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, env: Distributed, args: argparse.Namespace) -> tuple[int, int]:
    """Correct and total over the whole test set: every process takes every ``world``-th image."""
    model.eval()
    images, labels = dataset.tensors
    images, labels = images[env.rank :: env.world_size], labels[env.rank :: env.world_size]
    correct = 0
    for start in range(0, len(labels), 256):
        x = images[start : start + 256].to(env.device)
        with autocast(env, args):
            logits = model(x)
        correct += (logits.argmax(-1).cpu() == labels[start : start + 256]).sum().item()
    model.train()
    correct, total = env.sum([float(correct), float(len(labels))])
    return int(correct), int(total)


def autocast(env: Distributed, args: argparse.Namespace):
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()


def use_cpu_threads(threads: int) -> None:
    """``--threads`` for PyTorch's ops and for the GLA op's CPU backend (Numba, whose own
    count is otherwise every core: two torchrun processes on two cores ran four threads)."""
    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    env = Distributed(args.device)
    if env.device.type == "cpu":
        use_cpu_threads(args.threads)
    if args.batch_size % env.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the {env.world_size} processes")
    log = print if env.is_main else (lambda *a, **k: None)

    resume = os.path.join(args.output_dir, "last.pt") if args.resume == "auto" else args.resume
    ckpt = None
    if resume is not None:
        if args.resume == "auto" and not os.path.exists(resume):
            if args.eval_only:
                raise FileNotFoundError(f"--eval-only --resume auto: no checkpoint at {resume}")
            log(f"no checkpoint at {resume}: starting from scratch")
        else:
            # tensors, numbers and strings only (save_checkpoint): no pickled objects to trust
            ckpt = torch.load(resume, map_location=env.device, weights_only=True)
    model_name, model_kwargs = resumed_description(args, ckpt, resume) if ckpt is not None else model_description(args)
    args.model, args.img_size = model_name, model_kwargs["img_size"]  # the data follows the model

    torch.manual_seed(args.seed)  # the same initial weights on every process
    train_set, test_set = load_digits_datasets(args.img_size, seed=args.seed)
    model = create_model(model_name, **model_kwargs)
    model.to(env.device)
    if ckpt is not None and len(ckpt["optimizer"]["param_groups"]) == 1:
        # a checkpoint from before the groups (weight decay on every parameter): resume it as it ran
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr)

    state = dict(epoch=0, step=0, epoch_step=0)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {key: ckpt[key] for key in state}
        log(f"resumed from {resume} ({model_name}): epoch {state['epoch']}, step {state['step']}")

    if args.eval_only:
        correct, total = evaluate(model, test_set, env, args)
        log(f"test accuracy: {100 * correct / total:.2f}% ({correct}/{total})")
        env.close()
        return 0

    per_process_batch = args.batch_size // env.world_size
    if env.enabled:
        sampler = DistributedSampler(train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator())
    loader = DataLoader(train_set, batch_size=per_process_batch, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:  # drop_last: a batch larger than the training set would train nothing
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images "
                         f"({per_process_batch} per process against {len(train_set) // env.world_size})")
    total_steps = args.epochs * steps_per_epoch
    if args.steps is not None:
        total_steps = min(total_steps, args.steps)

    train_model = model
    if env.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    if args.compile:
        train_model = torch.compile(train_model)
    log(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
        f"{env.world_size} x {env.device.type}, {len(train_set)} train / {len(test_set)} test images, "
        f"{steps_per_epoch} steps per epoch")

    def checkpoint() -> None:
        if args.output_dir is not None:
            if env.is_main:
                save_checkpoint(os.path.join(args.output_dir, "last.pt"), model, optimizer, state, args, model_kwargs)
            env.barrier()

    start_time = time.perf_counter()
    result = None
    model.train()
    while state["epoch"] < args.epochs and state["step"] < total_steps:
        epoch = state["epoch"]
        if env.enabled:
            sampler.set_epoch(epoch)
        else:
            # the permutation DistributedSampler draws (seed + epoch): the sequence of global
            # batches is then the same for any process count
            sampler.generator.manual_seed(args.seed + epoch)
        bar = progress_bar(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                           disable=not env.is_main or args.no_progress)
        bar.update(state["epoch_step"])
        for i, (x, y) in enumerate(loader):
            if i < state["epoch_step"]:  # resuming inside this epoch: these batches are done
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["step"], total_steps, args)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with autocast(env, args):
                loss = F.cross_entropy(train_model(x).float(), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            state["epoch_step"] = i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if state["step"] >= total_steps:
                break
        bar.close()
        if state["epoch_step"] >= steps_per_epoch:
            state["epoch"] += 1
            state["epoch_step"] = 0
        checkpoint()
        result = evaluate(model, test_set, env, args)
        log(f"epoch {state['epoch']} step {state['step']}: test accuracy {100 * result[0] / result[1]:.2f}% "
            f"({time.perf_counter() - start_time:.0f} s)")

    correct, total = result if result is not None else evaluate(model, test_set, env, args)
    log(f"test accuracy: {100 * correct / total:.2f}% ({correct}/{total}) after {state['step']} steps, "
        f"{time.perf_counter() - start_time:.0f} s")
    if args.print_param_hash:
        print(f"param-hash rank={env.rank} world={env.world_size} sha256={parameter_hash(model)}", flush=True)
    env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
