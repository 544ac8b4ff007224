"""Loading official and native checkpoints, and resampling position embeddings.

Official ViG checkpoints are ``torch.save``'d dicts ``{"model": state_dict, "optimizer": ...,
"config": ...}`` (sometimes with ``"model_ema"``); their parameter names are the ones our
modules use, so after unwrapping the container a state dict loads with ``strict=True``.
Each model module has a ``checkpoint_filter_fn(state_dict, model)`` (timm's convention) built
from the helpers here.
"""

from __future__ import annotations

import inspect
import os
import pickle
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["unwrap_state_dict", "resample_pos_embed", "load_checkpoint"]

#: containers seen in the wild, in order of preference (the raw weights before EMA ones)
_CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
#: prefixes added by DistributedDataParallel and torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict inside a checkpoint container, without DDP / torch.compile prefixes."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping (a state dict or a container of one), got {type(checkpoint)}")
    state = checkpoint
    for key in _CONTAINER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            state = checkpoint[key]
            break
    out = {}
    for name, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def resample_pos_embed(pos_embed: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """Bicubic resampling of a ``[1, gh·gw, C]`` position embedding to another token grid."""
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos_embed
    _, length, channels = pos_embed.shape
    if length != src_grid[0] * src_grid[1]:
        raise ValueError(f"pos_embed has {length} tokens, expected {src_grid[0]}·{src_grid[1]} for grid {src_grid}")
    grid = pos_embed.reshape(1, src_grid[0], src_grid[1], channels).permute(0, 3, 1, 2)
    # bicubic interpolation wants float32 (and so does accuracy)
    grid = F.interpolate(grid.float(), size=dst_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], channels).to(pos_embed.dtype)


def square_grid(length: int) -> tuple[int, int]:
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(f"cannot infer the token grid of a pos_embed with {length} tokens (not a square)")
    return side, side


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    weights_only: bool = True,
    source_grid: tuple[int, int] | None = None,
):
    """Load an official or native checkpoint (a path or an already loaded dict) into ``model``.

    The checkpoint goes through the model's ``checkpoint_filter_fn`` (container unwrapped,
    prefixes stripped, position embeddings resampled). Official training checkpoints also pickle
    their config object; loading those needs ``weights_only=False`` (only for files you trust).
    ``source_grid``: the (rows, columns) token grid the checkpoint's position embedding was
    trained at, where it is neither square nor recorded in the checkpoint (ViG's
    ``checkpoint_filter_fn``). Returns what ``load_state_dict`` returns.
    """
    if not isinstance(checkpoint, Mapping):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as error:  # the weights-only unpickler refused: say what to do about it
            if not weights_only:
                raise
            raise ValueError(
                f"could not load {checkpoint!s} with weights_only=True ({error}); official training "
                "checkpoints pickle their config: pass weights_only=False if you trust the file"
            ) from error
    filter_fn = getattr(model, "checkpoint_filter_fn", None)
    if source_grid is not None:
        if filter_fn is None or "source_grid" not in inspect.signature(filter_fn).parameters:
            raise ValueError(f"source_grid: {type(model).__name__} has no position embedding to resample")
        state = filter_fn(checkpoint, source_grid=source_grid)
    else:
        state = filter_fn(checkpoint) if filter_fn is not None else unwrap_state_dict(checkpoint)
    return model.load_state_dict(state, strict=strict)
