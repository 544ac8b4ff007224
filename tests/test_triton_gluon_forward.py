"""The triton backend's Gluon forward (``backends/triton/kernels_gluon_forward.py``).

On a CPU-only machine (CI): it compiles ahead of time for sm_90 in every variant the launcher
asks for. On a GPU, with the kernel switched on (it is opt-in, ``Config.single_pass_gluon``):
against the float64 reference on hostile inputs (odd K and V, T = 1, gates down to -1e4,
states, segments), against the ``tl`` forward it replaces, bitwise the same result at any
batch and either handoff, and the launcher picks it for the calls it takes."""

from __future__ import annotations

import itertools
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from gla_testing import Case, assert_close, make_inputs
from glakernels import gated_linear_attention
from glakernels.reference import gated_linear_attention_reference

pytest.importorskip("triton.experimental.gluon.language.nvidia.ampere", reason="this Triton has no Gluon mma_v2")

HALF = [torch.bfloat16, torch.float16]
BOUNDS = {torch.bfloat16: 2e-2, torch.float16: 5e-3}  # DESIGN §3 (the backend's tolerance)


def _launch():
    from glakernels.backends.triton import launch

    return launch


SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "triton_gluon_forward_aot.py"


def test_compiles_ahead_of_time():
    """Every variant the launcher can ask for builds for sm_90 on a machine without a GPU (a
    subprocess: this session's kernels are the interpreter's) and Triton 3.6 or 3.9, its
    chunk loop on tensor cores, and at 32 V columns a warp without spilling when uncapped
    (the launcher caps registers at 168, where it spills about 100 bytes: NOTES.md)."""
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    variants = ["BV=32", "BV=32,IS_F16=True", "BV=32,BIDIR=False,HAS_H0=True,STORE_HT=True",
                "BV=32,PARK_ALL=True,HAS_BSTATES=True", "BK=16,BV=16,BIDIR=False", "BV=64,IS_F16=True,PARK_ALL=True"]
    run = subprocess.run([sys.executable, str(SCRIPT), "--variants", ";".join(variants)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split()[0]: list(map(int, line.split()[1:])) for line in run.stdout.splitlines()[2:]}
    assert sorted(rows) == sorted(variants), run.stdout
    for variant, (regs, stack, sass, loop, hmma, sts, bar) in rows.items():
        assert regs <= 255 and loop > 0 and hmma > 0, (variant, run.stdout)
        if "BV=64" not in variant:  # (64 columns a warp: the launcher's default is 32)
            assert stack == 0, (variant, run.stdout)


# ---------------------------------------------------------------------------------------------
# on a GPU

gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _gluon_forward_on():
    """The Gluon forward is opt-in (``Config.single_pass_gluon``): on for every test here."""
    with _launch().override_config(single_pass_gluon=True):
        yield


def _forward_and_reference(x: dict, **kwargs) -> tuple[dict, dict]:
    """The triton backend's forward (output, and final state if asked for) and the float64
    reference's on the same (dtype-rounded) inputs, by name. Forward only: the backward's
    kernels are not this file's (the backend's suites check them)."""
    with torch.no_grad():
        got = gated_linear_attention(**x, **kwargs, backend="triton")
        expected = gated_linear_attention_reference(**{n: t.cpu().double() for n, t in x.items()}, **kwargs)
    name = lambda outs: dict(zip(("o", "final_state"), outs if isinstance(outs, tuple) else (outs,)))  # noqa: E731
    return name(got), name(expected)


def _gluon_runs(case: Case) -> bool:
    launch = _launch()
    q = torch.empty(1, 1, case.H, case.K, device="cuda", dtype=case.dtype)
    return launch._gluon_forward_runs(q, case.K, case.V, launch.choose_config(case.T, case.K, case.V))


CASES = [
    Case(2, 196, 3, 32, 64, bidirectional=True),  # ViG-T's call
    Case(1, 1, 1, 32, 64, bidirectional=True),  # one token
    Case(3, 17, 2, 1, 1, bidirectional=True),  # K = V = 1
    Case(2, 33, 2, 17, 33, bidirectional=True),  # odd K, V over two blocks
    Case(1, 100, 1, 32, 100, bidirectional=False, states=True),  # causal with the final state
    Case(2, 70, 1, 20, 72, bidirectional=True, gates="strong"),
    Case(2, 90, 2, 32, 40, bidirectional=True, gates="extreme"),  # resets at -1e4: the exact path
    Case(1, 90, 2, 32, 40, bidirectional=False, states=True, gates="extreme"),
    Case(2, 600, 2, 32, 64, bidirectional=True),  # segments from boundary states
    Case(1, 700, 1, 24, 48, bidirectional=False, states=True, gates="extreme"),
    Case(2, 50, 2, 32, 64, bidirectional=True, gates="none"),
]


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id().split("-", 1)[1])  # (dtype: the other parameter)
def test_against_float64(case, dtype):
    """Output and final state (the causal cases start from an initial state) against the
    float64 reference within DESIGN §3's bound; the Gluon kernel is the one that ran."""
    case = Case(**{**case.__dict__, "dtype": dtype})
    assert _gluon_runs(case), case.id()
    x = make_inputs(case, "cuda", seed=5)
    kwargs = {"bidirectional": case.bidirectional}
    if case.states:
        kwargs["output_final_state"] = True
    got, expected = _forward_and_reference(x, **kwargs)
    for name, value in got.items():
        assert not torch.isnan(value).any(), name
    assert_close(got, expected, BOUNDS[dtype], case.id())


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d).split(".")[-1])
def test_hard_resets_in_every_chunk(dtype):
    """A gate of -1e4 in every chunk, in both directions, next to mild gates: each such chunk
    takes the exact path, the others the ratio; no overflow, no NaN."""
    case = Case(2, 96, 2, 32, 64, dtype, bidirectional=True)
    x = make_inputs(case, "cuda", seed=9)
    for name in ("g", "g_reverse"):
        gates = x[name].float()
        gates[:, 5::16] = -1e4
        gates[:, 11::32] = -40.0
        x[name] = gates.to(dtype)
    got, expected = _forward_and_reference(x, bidirectional=True)
    assert not torch.isnan(got["o"]).any()
    assert_close(got, expected, BOUNDS[dtype], "resets")


@gpu
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "causal"])
def test_agrees_with_the_tl_forward(bidirectional):
    """The Gluon and the ``tl`` forward compute the same function (bf16, ViG's shape)."""
    case = Case(4, 196, 3, 32, 64, torch.bfloat16, bidirectional=bidirectional)
    x = make_inputs(case, "cuda", seed=3)
    outs = []
    for on in (True, False):
        with _launch().override_config(single_pass_gluon=on), torch.no_grad():
            outs.append(gated_linear_attention(**x, bidirectional=bidirectional, backend="triton").float())
    err = (outs[0] - outs[1]).norm() / outs[1].norm()
    assert err < 1e-2, float(err)


@gpu
def test_bitwise_the_same_at_any_batch_and_handoff():
    """A sequence's output does not depend on the batch (grid size, and so the handoff: parked
    for small grids, per chunk for large ones) nor on the handoff setting."""
    case = Case(96, 196, 3, 32, 64, torch.bfloat16, bidirectional=True)
    x = make_inputs(case, "cuda", seed=4)
    with torch.no_grad():
        full = gated_linear_attention(**x, bidirectional=True, backend="triton")
        one = gated_linear_attention(**{n: t[:1] for n, t in x.items()}, bidirectional=True, backend="triton")
        outs = []
        for per_sm in (0, 10**9):
            with _launch().override_config(single_pass_park_all_per_sm=per_sm):
                outs.append(gated_linear_attention(**x, bidirectional=True, backend="triton"))
    assert torch.equal(full[:1], one)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], full)


@gpu
def test_launcher_choice():
    """The Gluon forward takes 16-bit calls with K <= 32 on CUDA, not float32, wider K, or a
    config that turns it off."""
    launch = _launch()
    for dtype, K, on in itertools.product((torch.bfloat16, torch.float16, torch.float32), (32, 64), (True, False)):
        q = torch.empty(1, 1, 2, K, device="cuda", dtype=dtype)
        with launch.override_config(single_pass_gluon=on):
            cfg = launch.choose_config(196, K, 64)
            runs = launch._gluon_forward_runs(q, K, 64, cfg)
        assert runs == (on and dtype != torch.float32 and K <= 32), (dtype, K, on)
