"""Input checks for ``gated_linear_attention``.

Everything here looks only at metadata (types, shapes, dtypes, devices), so it never
synchronises the device. Checks that must read tensor values (NaN, positive gates) live in
``_value_checks`` and run only when the caller opts in with ``GLAKERNELS_CHECK=1``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

from ._problem import ProblemSpec, state_dtype_for

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _require_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_float_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {_dtype_name(x.dtype)}; expected a floating dtype, one of {_DTYPE_NAMES}"
        )


def _type_name(x: object) -> str:
    kind = type(x)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _require_bool(name: str, x: object) -> bool:
    if isinstance(x, bool):
        return x
    if type(x).__module__ == "numpy" and type(x).__name__ in ("bool_", "bool"):  # numpy.bool_, without importing numpy
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {_type_name(x)}")


def _require_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != expected:
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)} to match q and v, "
            f"got {tuple(x.shape)}"
        )


def _require_like(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    if x.device != q.device:
        raise ValueError(
            f"{name} is on device {x.device} but q is on {q.device}; all inputs must be on one device"
        )
    if x.dtype != q.dtype:
        raise TypeError(
            f"{name} has dtype {_dtype_name(x.dtype)} but q has {_dtype_name(q.dtype)}; "
            "q, k, v, g and g_reverse must share one dtype (cast them, or use torch.autocast)"
        )


def resolve_scale(scale: object, head_dim_k: int) -> float:
    if scale is None:
        return head_dim_k ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def validate(
    q: object,
    k: object,
    v: object,
    g: object,
    bidirectional: object,
    g_reverse: object,
    scale: object,
    initial_state: object,
    output_final_state: object,
) -> tuple[ProblemSpec, float]:
    """Check every argument of the op; return the problem's metadata and the resolved scale.

    Raises ``TypeError`` for wrong types and dtypes, ``ValueError`` for wrong shapes, devices,
    and argument combinations, each naming the argument and what was expected.
    """
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    g = _require_tensor("g", g)
    bidirectional = _require_bool("bidirectional", bidirectional)
    output_final_state = _require_bool("output_final_state", output_final_state)

    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        _require_float_dtype(name, x)
        if x.dim() != 4:
            layout = "[batch, time, heads, head_dim_v]" if name == "v" else "[batch, time, heads, head_dim_k]"
            raise ValueError(
                f"{name} must have 4 dimensions {layout}, got {x.dim()} (shape {tuple(x.shape)})"
            )
    B, T, H, K = q.shape
    V = v.shape[-1]
    for dim_name, size in (("batch", B), ("time", T), ("heads", H), ("head_dim_k", K)):
        if size < 1:
            raise ValueError(f"q has {dim_name} size {size}; every dimension must be at least 1")
    if V < 1:
        raise ValueError(f"v has head_dim_v size {V}; every dimension must be at least 1")
    qk_layout = "[B, T, H, K]"
    _require_shape("k", k, (B, T, H, K), qk_layout)
    _require_shape("v", v, (B, T, H, V), "[B, T, H, V]")
    _require_shape("g", g, (B, T, H, K), qk_layout)
    for name, x in (("k", k), ("v", v), ("g", g)):
        _require_like(name, x, q)

    if g_reverse is not None:
        if not bidirectional:
            raise ValueError(
                "g_reverse was given with bidirectional=False; the reverse gate is used only "
                "by the bidirectional op"
            )
        g_reverse = _require_tensor("g_reverse", g_reverse)
        _require_float_dtype("g_reverse", g_reverse)
        _require_shape("g_reverse", g_reverse, (B, T, H, K), qk_layout)
        _require_like("g_reverse", g_reverse, q)

    if bidirectional and (initial_state is not None or output_final_state):
        raise ValueError(
            "initial_state and output_final_state are causal-only; got "
            f"initial_state={'a tensor' if initial_state is not None else None}, "
            f"output_final_state={output_final_state} with bidirectional=True"
        )
    if initial_state is not None:
        initial_state = _require_tensor("initial_state", initial_state)
        _require_float_dtype("initial_state", initial_state)
        _require_shape("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
        if initial_state.device != q.device:
            raise ValueError(
                f"initial_state is on device {initial_state.device} but q is on {q.device}"
            )
        if initial_state.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"initial_state has dtype {_dtype_name(initial_state.dtype)}; expected float32 or "
                f"float64 (states are kept in {_dtype_name(state_dtype_for(q.dtype))} for "
                f"{_dtype_name(q.dtype)} inputs, and the initial state is converted to that)"
            )

    spec = ProblemSpec(
        batch=B,
        seq_len=T,
        heads=H,
        head_dim_k=K,
        head_dim_v=V,
        dtype=q.dtype,
        device_type=q.device.type,
        bidirectional=bidirectional,
        has_initial_state=initial_state is not None,
        output_final_state=output_final_state,
    )
    return spec, resolve_scale(scale, K)


def validate_backend_name(backend: Optional[object]) -> Optional[str]:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str) or None, got {type(backend).__name__}")
    return backend
