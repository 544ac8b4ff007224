"""Model registry: ``vig.create_model`` without timm, and timm's registry when timm is installed.

Every model entry point is registered here with :func:`register_model`. When timm can be
imported, the same entry point is also registered with ``timm.models.register_model``, so
``timm.create_model("vig_tiny")`` works after ``import vig``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_ENTRY_POINTS: dict[str, Callable[..., nn.Module]] = {}


def _timm_register() -> Callable | None:
    if importlib.util.find_spec("timm") is None:
        return None
    try:
        from timm.models import register_model as timm_register_model
    except Exception:  # a broken timm install must not break ``import vig``
        return None
    return timm_register_model


def register_model(fn: Callable[..., nn.Module] | None = None, *, timm: bool = True):
    """Register ``fn`` under its ``__name__`` — here, and with timm when timm is installed and
    ``timm`` is true. Use as ``@register_model`` or ``@register_model(timm=False)``."""
    if fn is None:
        return lambda f: register_model(f, timm=timm)
    name = fn.__name__
    if name in _ENTRY_POINTS and _ENTRY_POINTS[name] is not fn:
        raise ValueError(f"model name {name!r} is already registered by {_ENTRY_POINTS[name].__module__}")
    _ENTRY_POINTS[name] = fn
    timm_register = _timm_register() if timm else None
    if timm_register is not None:
        timm_register(fn)
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_ENTRY_POINTS)


def is_model(name: str) -> bool:
    return name in _ENTRY_POINTS


def create_model(name: str, pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (``"vig_tiny"``, ``"vig_h_small"``, ``"dig_s_2"``...).
        pretrained: must be False: no weights are downloaded. Load an official checkpoint with
            ``checkpoint_path`` instead.
        checkpoint_path: a checkpoint file that holds tensors only (a native one, or an official
            state dict saved on its own), loaded with ``weights_only=True`` and strictly through
            the model's ``checkpoint_filter_fn`` (position embeddings resampled to ``img_size``).
            Official training checkpoints also pickle their config: load those with
            ``vig.load_checkpoint(model, path, weights_only=False)`` (files you trust only).
        **kwargs: model arguments (``num_classes``, ``img_size``, ``drop_path_rate``, ...).
    """
    if not isinstance(name, str) or name not in _ENTRY_POINTS:
        raise ValueError(f"unknown model name {name!r}; expected one of {list_models()}")
    model = _ENTRY_POINTS[name](pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path, strict=True)
    return model


def check_no_download(name: str, pretrained: bool) -> None:
    """Entry points call this: there is nothing to download (and no network where CI runs)."""
    if pretrained:
        raise ValueError(
            f"pretrained=True: {name} has no hosted weights here; pass checkpoint_path= (an official "
            "checkpoint file) to vig.create_model, or call vig.load_checkpoint(model, path)"
        )


def drop_timm_kwargs(kwargs: dict) -> dict:
    """timm's factory passes its own arguments to every entry point; our constructors take none
    of them (a ``pretrained_cfg`` is not a model argument)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        value = kwargs.pop(key, None)
        if key == "features_only" and value:
            raise ValueError("features_only=True is not supported by ViG models")
    return kwargs


def check_global_pool(global_pool: object) -> str:
    """The pooling ViG and ViG-H heads take: 'avg', or '' (none: the head sees every token)."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


def build_classifier(cls: type, name: str, pretrained: bool, config: dict, kwargs: dict,
                     default_cfg: dict) -> nn.Module:
    """What a ViG / ViG-H entry point does: refuse downloads, build ``cls`` from the named
    ``config`` with the caller's ``kwargs`` on top, and attach what timm's builder would (its
    data pipeline reads mean, std and input size from ``pretrained_cfg``)."""
    check_no_download(name, pretrained)
    model = cls(**{**config, **drop_timm_kwargs(kwargs)})
    model.pretrained_cfg = model.default_cfg = dict(default_cfg, architecture=name)
    return model
