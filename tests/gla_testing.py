"""Helpers shared by the tests: the independent quadratic formula, inputs, error metrics,
backend parametrisation and the "compare every tensor by name" check."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from glakernels import gated_linear_attention
from glakernels._dispatch import registry
from glakernels.reference import gated_linear_attention_reference

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# ---------------------------------------------------------------------------------------------
# the independent O(T^2) formula


def _between(T: int, reverse: bool) -> torch.Tensor:
    """``M[t, s, r] = 1`` where step ``r`` lies on the path from token ``s`` to token ``t``:
    ``s < r <= t`` (causal), ``t <= r < s`` (reverse)."""
    t = torch.arange(T)[:, None, None]
    s = torch.arange(T)[None, :, None]
    r = torch.arange(T)[None, None, :]
    m = ((s < r) & (r <= t)) if not reverse else ((t <= r) & (r < s))
    return m.double()


def quadratic_gla(q, k, v, g, bidirectional=True, *, g_reverse=None, scale=None, initial_state=None, output_final_state=False):
    """Float64 GLA from the materialised decay matrix ``W[t, s] = exp(sum of gates between)``.

    Written independently of the recurrence: no state, every output a weighted sum over
    tokens. O(T^3 K) work, for test sizes only. Differentiable."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    t_idx = torch.arange(T)

    def one_direction(gates, reverse):
        log_decay = torch.einsum("tsr,brhk->bhtsk", _between(T, reverse), gates)
        visible = (t_idx[:, None] >= t_idx[None, :]) if not reverse else (t_idx[:, None] <= t_idx[None, :])
        decay = torch.where(visible[..., None], torch.exp(log_decay), 0.0)
        scores = torch.einsum("bthk,bhtsk,bshk->bhts", q, decay, k)
        return scale * torch.einsum("bhts,bshv->bthv", scores, v)

    if bidirectional:
        g_rev = g if g_reverse is None else g_reverse.double()
        return 0.5 * (one_direction(g, False) + one_direction(g_rev, True))
    o = one_direction(g, False)
    # exp(sum_{r<=t} g_r): decay from before the first token to t
    upto = torch.einsum("tr,brhk->bthk", (t_idx[None, :] <= t_idx[:, None]).double(), g)
    if initial_state is not None:
        o = o + scale * torch.einsum("bthk,bhkv->bthv", q * torch.exp(upto), initial_state.double())
    if not output_final_state:
        return o
    after = torch.einsum("sr,brhk->bshk", (t_idx[None, :] > t_idx[:, None]).double(), g)  # sum_{r>s}
    final = torch.einsum("bshk,bshv->bhkv", k * torch.exp(after), v)
    if initial_state is not None:
        final = final + torch.exp(upto[:, -1])[..., None] * initial_state.double()
    return o, final


# ---------------------------------------------------------------------------------------------
# inputs

GATE_REGIMES = ("vig", "strong", "extreme", "none")


@dataclass(frozen=True)
class Case:
    """One problem to run: shape, dtype, mode, gate regime."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype = torch.float32
    bidirectional: bool = True
    states: bool = False
    gates: str = "vig"
    separate_reverse_gate: bool = True

    def id(self, backend: str = "") -> str:
        mode = "bi" if self.bidirectional else ("causal-state" if self.states else "causal")
        parts = [backend] if backend else []
        parts += [DTYPE_NAMES[self.dtype], f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}", mode, self.gates]
        return "-".join(parts)


def make_gates(shape, regime: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if regime == "vig":  # what ViG produces
        return F.logsigmoid(x) / 16
    if regime == "strong":  # fast decay, down to about -25 per step
        return F.logsigmoid(3 * x) * 4
    if regime == "none":  # plain linear attention
        return torch.zeros(*shape, dtype=torch.float64)
    if regime == "extreme":
        # mostly ViG-like gates; 20% of entries with magnitudes log-uniform over [1e-4, 1e4];
        # hard resets (-1e4) at ~10% of steps. Mild gates right after huge ones are the hazard:
        # cumulative sums are then large while the decays that matter are close to 1.
        mild = F.logsigmoid(x) / 16
        wild = -(10 ** (torch.rand(*shape, generator=gen, dtype=torch.float64) * 8 - 4))
        gates = torch.where(torch.rand(*shape, generator=gen) < 0.2, wild, mild)
        reset = torch.rand(shape[:2], generator=gen) < 0.1
        return torch.where(reset[..., None, None], torch.tensor(-1e4, dtype=torch.float64), gates)
    raise ValueError(regime)


def make_inputs(case: Case, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh random inputs in ``case.dtype`` on ``device`` (drawn in float64 on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    x = {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
        "k": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
        "v": torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
        "g": make_gates((B, T, H, K), case.gates, gen),
    }
    if case.bidirectional and case.separate_reverse_gate:
        x["g_reverse"] = make_gates((B, T, H, K), case.gates, gen)
    out = {n: t.to(device=device, dtype=case.dtype) for n, t in x.items()}
    if case.states:
        state_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
        out["initial_state"] = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(device=device, dtype=state_dtype)
    return out


# ---------------------------------------------------------------------------------------------
# errors


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64; NaN or inf anywhere gives ``inf``."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm()
    if denom == 0:
        return float(out.norm())
    return float((out - ref).norm() / denom)


def assert_close(results: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], bound: float, context: str = ""):
    """Every tensor by name within ``bound``; the message lists them all."""
    errors = {name: rel_err(results[name], reference[name]) for name in reference}
    bad = {n: e for n, e in errors.items() if not e <= bound}
    if bad:
        table = ", ".join(f"{n}={e:.3g}" for n, e in errors.items())
        raise AssertionError(f"{context}: errors above {bound:g} in {sorted(bad)} ({table})")


def outputs_and_grads(fn, inputs: dict[str, torch.Tensor], cotangents, **kwargs):
    """Run ``fn(**inputs, **kwargs)``; backpropagate ``cotangents``; return everything by name."""
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
    out = fn(**leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    if cotangents is None:
        gen = torch.Generator().manual_seed(1234)
        cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * c.to(o.device)).sum() for o, c in zip(outs, cotangents))
    loss.backward()
    named = {"o": outs[0]}
    if len(outs) > 1:
        named["final_state"] = outs[1]
    named.update({f"d{n}": leaf.grad for n, leaf in leaves.items()})
    return named, cotangents


def backend_and_reference(backend: str, inputs: dict[str, torch.Tensor], reference=None, **kwargs):
    """``(got, expected)``: ``backend`` run on ``inputs`` (output, final state if asked for, every
    gradient under random cotangents) and the float64 reference run on the same
    (dtype-rounded) inputs and cotangents, both by name."""
    got, cot = outputs_and_grads(gated_linear_attention, inputs, None, backend=backend, **kwargs)
    ref_inputs = {n: x.detach().cpu().double() for n, x in inputs.items()}
    # the reference sees each cotangent rounded as the backend saw it (in the output's dtype)
    outs = [got["o"], got["final_state"]] if "final_state" in got else [got["o"]]
    cot = [c.to(o.dtype).double() for c, o in zip(cot, outs)]
    expected, _ = outputs_and_grads(reference or gated_linear_attention_reference, ref_inputs, cot, **kwargs)
    return got, expected


def check_against_reference(backend: str, case: Case, device: str, seed: int = 0, reference=None) -> None:
    """Run ``backend`` on fresh inputs; compare output, final state and every gradient with the
    float64 reference run on the same (dtype-rounded) inputs."""
    kwargs = {"bidirectional": case.bidirectional}
    if case.states:
        kwargs["output_final_state"] = True
    got, expected = backend_and_reference(backend, make_inputs(case, device, seed), reference, **kwargs)
    assert_close(got, expected, registry.get(backend).tolerance(case.dtype), case.id(backend))


# ---------------------------------------------------------------------------------------------
# backend parametrisation: every registered backend on every device it runs on


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def backend_params(dtype: Optional[torch.dtype] = None):
    """``pytest.param((backend_name, device))`` for every registered backend and device type it
    can run on here (CPU, and CUDA when present); unavailable ones are kept and skipped with
    their reasons, so the test report shows them."""
    params = []
    for backend in registry.backends():
        devices = backend.runs_on()
        for device in ("cpu", "cuda"):
            if "any" not in devices and device not in devices:
                continue
            marks = []
            if device == "cuda":
                marks.append(pytest.mark.gpu)
            if backend.availability():
                marks.append(pytest.mark.skip(reason=f"{backend.name}: {'; '.join(backend.availability())}"))
            elif device == "cuda" and not _cuda_available():
                marks.append(pytest.mark.skip(reason="no CUDA device"))
            if dtype is not None and dtype not in backend.dtypes:
                continue
            params.append(pytest.param((backend.name, device), id=f"{backend.name}-{device}", marks=marks))
    return params


@contextlib.contextmanager
def temporary_backend(backend):
    """Register ``backend`` for the duration of the block (tests must not leak global state)."""
    registry.register(backend)
    try:
        yield backend
    finally:
        registry.unregister(backend.name)


def max_tokens(backend_name: str, device: str) -> int:
    backend = registry.get(backend_name)
    return backend.test_max_tokens_cpu if device == "cpu" else 1 << 20


def compile_recording_targets(fn):
    """``(compiled, targets)``: ``fn`` compiled with ``fullgraph=True`` by a backend that runs
    the graph Dynamo records eagerly and appends its call targets (the forward and backward
    bodies of autograd functions included) to ``targets`` when it is traced."""
    targets = []

    def record(gm, example_inputs):
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):
                targets.extend(str(node.target) for node in module.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=record), targets
