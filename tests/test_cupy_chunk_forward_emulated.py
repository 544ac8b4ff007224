"""The cupy backend's tensor-core forward (``kernels/gla_chunk_forward.cu``) on the CPU
emulator: the warp-matrix functions (mma, movmatrix, shuffles) are emulated with the PTX
fragment layouts, so what is checked here is the kernel's bookkeeping — fragment orders,
the column permutation of the loads, the in-chunk sums, the exact path for strong gates,
the midpoint hand-over of a bidirectional call — against the float64 reference. Speed and
the tensor cores' own rounding are the GPU suite's (``tests/test_cupy_gpu.py``)."""

from __future__ import annotations

import zlib

import pytest
import torch

from cuda_emulator import compiler
from gla_testing import Case, check_against_reference, make_inputs, temporary_backend
from test_cupy_emulated import FORWARD_LAUNCHES, EmulatedCupy, shared_emulator
from glakernels import gated_linear_attention
from glakernels.backends.cupy import _driver, _plan

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++20 compiler (g++ or clang++) to build the emulator")

NAME = "cupy-emulated-chunk-forward"
#: the same with sequences cut into segments of 32 tokens (the path of sequences over 512)
SEGMENTED, SEGMENT = "cupy-emulated-chunk-forward-segments", 32


class Recording:
    """A launcher that records the kernels it runs, then runs them on the emulator."""

    tensor_cores = True

    def __init__(self, emulator):
        self.emulator, self.names = emulator, []

    def __call__(self, file, name, grid, block, smem, args):
        self.names.append(name)
        self.emulator(file, name, grid, block, smem, args)


# launches beyond the plan's (every split of V = 64, without prefetching), for the bitwise check
LAUNCHES = FORWARD_LAUNCHES


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    recording = Recording(shared_emulator(tmp_path_factory))
    with temporary_backend(EmulatedCupy(NAME, recording)), \
            temporary_backend(EmulatedCupy(SEGMENTED, recording, SEGMENT)):
        yield recording


def _ran_chunk_forward(launcher) -> bool:
    return any(name.startswith("gla::gla_chunk_forward") for name in launcher.names)


# T around the chunk (16) and midpoint (32) boundaries; every K, V the kernel takes
CASES = [
    Case(2, 1, 1, 32, 64, torch.bfloat16),
    Case(1, 15, 2, 16, 16, torch.bfloat16),
    Case(1, 16, 1, 32, 48, torch.bfloat16),
    Case(1, 17, 1, 32, 32, torch.bfloat16),
    Case(1, 31, 1, 16, 64, torch.bfloat16),
    Case(1, 32, 1, 32, 64, torch.bfloat16),
    Case(1, 33, 2, 32, 16, torch.bfloat16),
    Case(1, 50, 1, 16, 32, torch.bfloat16),
    Case(1, 70, 1, 32, 64, torch.bfloat16),
    Case(1, 1, 1, 16, 16, torch.bfloat16, bidirectional=False),
    Case(2, 37, 1, 32, 64, torch.bfloat16, bidirectional=False),
    Case(1, 64, 1, 16, 48, torch.bfloat16, bidirectional=False),
    # float16: v as two bfloat16 parts, gates summed by a float16 product
    Case(2, 37, 2, 32, 64, torch.float16),
    Case(1, 17, 1, 16, 48, torch.float16, bidirectional=False),
]
# gates that leave the decay ratio's range (|in-chunk sum| > 32): the exact per-chunk path
HOSTILE = [Case(1, 40, 1, 32, 64, dtype, gates=g) for g in ("strong", "extreme")
           for dtype in (torch.bfloat16, torch.float16)] + [
    Case(1, 23, 2, 16, 32, torch.bfloat16, bidirectional=False, gates="extreme"),
]


@pytest.mark.parametrize("case", CASES + HOSTILE, ids=lambda c: c.id())
def test_matches_reference(launcher, case):
    launcher.names.clear()
    check_against_reference(NAME, case, "cpu", seed=zlib.crc32(case.id().encode()) % 1000)
    assert _ran_chunk_forward(launcher), launcher.names


def test_hard_reset_mid_chunk(launcher):
    """A gate of -1e4 (a hard reset) in the middle of a chunk, in one direction's gates and
    elsewhere in the other's: the exact path, finite and within the bfloat16 bound."""
    x = make_inputs(Case(1, 40, 1, 32, 64, torch.bfloat16), "cpu", seed=5)
    x["g"][:, 21] = -1e4
    x["g_reverse"][:, 6] = -1e4
    launcher.names.clear()
    o = gated_linear_attention(x["q"], x["k"], x["v"], x["g"], g_reverse=x["g_reverse"], backend=NAME)
    assert _ran_chunk_forward(launcher)
    assert torch.isfinite(o).all()
    ref = gated_linear_attention(*(x[n].double() for n in ("q", "k", "v", "g")),
                                 g_reverse=x["g_reverse"].double(), backend="torch")
    err = ((o.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


def test_not_taken_where_it_does_not_apply(launcher):
    """float32, K = 48, states: the recurrent sweep runs, not the tensor-core forward."""
    for case, kwargs in [
        (Case(1, 20, 1, 32, 64, torch.float32), {}),
        (Case(1, 20, 1, 48, 64, torch.bfloat16), {}),
        (Case(1, 20, 1, 32, 64, torch.bfloat16, bidirectional=False), {"output_final_state": True}),
    ]:
        x = make_inputs(case, "cpu", seed=1)
        launcher.names.clear()
        gated_linear_attention(x["q"], x["k"], x["v"], x["g"], bidirectional=case.bidirectional, backend=NAME,
                               **kwargs)
        assert not _ran_chunk_forward(launcher), (case, launcher.names)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_every_launch_gives_the_same_bits(launcher, bidirectional):
    """Warps per direction (how V is split) and prefetching change who computes what, not the
    arithmetic of any output column: the plan may choose by grid size (batch invariance)."""
    from glakernels._custom_op import _inputs

    x = make_inputs(Case(2, 45, 1, 32, 64, torch.bfloat16, bidirectional), "cpu", seed=8)
    inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, 32 ** -0.5, bidirectional, False)
    outs = [_driver.forward(inputs, launcher, chunk_forward_launch=launch)[0] for launch in LAUNCHES]
    for launch, o in zip(LAUNCHES[1:], outs[1:]):
        assert torch.equal(o, outs[0]), launch


SEGMENTED_CASES = [
    Case(1, 33, 1, 32, 64, torch.bfloat16),
    Case(2, 100, 1, 32, 64, torch.bfloat16),
    Case(1, 70, 2, 16, 32, torch.bfloat16, gates="extreme"),
    Case(1, 96, 1, 32, 48, torch.bfloat16, bidirectional=False),
    Case(1, 45, 1, 16, 16, torch.bfloat16, bidirectional=False, gates="strong"),
    Case(1, 80, 1, 32, 64, torch.float16, gates="extreme"),
]


@pytest.mark.parametrize("case", SEGMENTED_CASES, ids=lambda c: c.id())
def test_segments_match_reference(launcher, case):
    """Segments of 32 tokens (the last one partial): local end states, the scan, then every
    segment from its entering state, in both directions."""
    launcher.names.clear()
    check_against_reference(SEGMENTED, case, "cpu", seed=zlib.crc32(case.id().encode()) % 1000)
    assert any(n.endswith("false>") and "chunk_forward" in n for n in launcher.names), launcher.names
    assert "gla::gla_state_scan" in launcher.names


@pytest.mark.parametrize("bidirectional", [True, False])
def test_segment_states_match_the_sweeps(launcher, bidirectional):
    """The states entering each segment, from the tensor-core kernel's local states and the
    scan, against the recurrent sweep's (the same [B*H, 2, N, K, V] layout), element by element:
    catches a state written in the wrong K or V order, which the outputs alone may not (the
    kernel reads the state back in the order it wrote it)."""
    from glakernels._custom_op import _inputs

    x = make_inputs(Case(2, 90, 1, 32, 64, torch.bfloat16, bidirectional), "cpu", seed=6)
    # gates that differ a lot between K columns, so that a column mix-up changes the scan's decays
    x["g"] = (x["g"].float() * torch.linspace(0.0, 8.0, 32)).to(torch.bfloat16)
    inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, 32 ** -0.5, bidirectional, False)
    call = _driver._Call(inputs, launcher, SEGMENT, None)
    launch = _plan.chunk_forward_launch(call.B * call.H * call.n_chunks, call.V, bidirectional, 1)
    got = _driver._chunk_forward_entering_states(call, launch)
    expected = call.chunk_entering_states(adjoint=False)
    directions = 2 if bidirectional else 1
    got, expected = got[:, :directions].double(), expected[:, :directions].double()
    assert torch.isfinite(got).all()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_as_accurate_as_the_float32_sweep(launcher, dtype):
    """The split products (float32 operands as two bfloat16 parts; a float16 v as two exact
    parts) make the tensor cores as accurate as the recurrent sweep's float32 arithmetic: both
    errors are the output's own rounding. One bfloat16 part of a float16 v would be ~7x that."""
    from glakernels._custom_op import _inputs

    for bidirectional in (True, False):
        x = make_inputs(Case(2, 50, 2, 32, 64, dtype, bidirectional), "cpu", seed=2)
        inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, 32 ** -0.5, bidirectional, False)
        ref = gated_linear_attention(*(x[n].double() for n in ("q", "k", "v", "g")), bidirectional,
                                     g_reverse=x["g_reverse"].double() if bidirectional else None, backend="torch")
        launcher.names.clear()
        tensor_cores = _driver.forward(inputs, launcher)[0]
        assert _ran_chunk_forward(launcher)
        sweep = _driver.forward(inputs, launcher, chunk_forward=False)[0]
        err = lambda o: ((o.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(tensor_cores) <= 1.5 * err(sweep), (bidirectional, err(tensor_cores), err(sweep))
