"""The cupy backend's tensor-core backward (``kernels/gla_chunk_backward.cu``) on the CPU
emulator, as ``test_cupy_chunk_forward_emulated.py`` checks the forward: fragment orders, the
reversed walk of the adjoint, the gate gradients' suffix sums, the midpoint hand-over of
dq, dk and dv, and the hand-off of sequences with strong gates to the recurrent sweeps —
every gradient against the float64 reference."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cuda_emulator import compiler
from gla_testing import GATE_REGIMES, Case, check_against_reference, make_inputs
from glakernels import gated_linear_attention
from glakernels.backends.cupy import _driver, _plan
from test_cupy_chunk_forward_emulated import NAME, SEGMENT, SEGMENTED, launcher  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++20 compiler (g++ or clang++) to build the emulator")


def _ran(launcher, kernel: str) -> bool:
    """Whether a kernel whose name starts so ran (the tensor-core backward's names without their
    16-bit type: ``gla_chunk_backward_dkv<true`` is the dv walk of either)."""
    def untyped(name):
        return name.replace("<gla::bf16, ", "<").replace("<gla::f16, ", "<") if "chunk_backward" in name else name

    return any(untyped(name).startswith(f"gla::{kernel}") for name in launcher.names)


def _sweeps_filtered(launcher) -> bool:
    return _ran(launcher, "gla_sweep")


def _ran_adjoint(launcher, case: Case, segment_len: int | None = None) -> bool:
    """Whether the adjoint walks the plan chooses for this kind of call ran: the fused walk, or
    the dv and the dk walk."""
    length = segment_len or _plan.chunking(case.T, None)[0]
    if _plan.chunk_backward_launch(1, case.K, case.V, case.bidirectional, length, 1).fused:
        return _ran(launcher, "gla_chunk_backward_adjoint") and not _ran(launcher, "gla_chunk_backward_dkv<true")
    return _ran(launcher, "gla_chunk_backward_dkv<true") and _ran(launcher, "gla_chunk_backward_dkv<false")


# T around the chunk (16) and midpoint (32) boundaries, every K and V the kernels take, and the
# largest sequence they take (512)
CASES = [
    Case(2, 1, 1, 32, 64, torch.bfloat16),
    Case(1, 15, 2, 16, 16, torch.bfloat16),
    Case(1, 17, 1, 32, 48, torch.bfloat16),
    Case(1, 32, 1, 32, 64, torch.bfloat16),
    Case(1, 33, 2, 16, 32, torch.bfloat16),
    Case(2, 70, 1, 32, 64, torch.bfloat16),
    Case(1, 100, 1, 16, 64, torch.bfloat16),
    Case(1, 1, 1, 16, 16, torch.bfloat16, bidirectional=False),
    Case(2, 37, 1, 32, 64, torch.bfloat16, bidirectional=False),
    Case(1, 64, 1, 16, 48, torch.bfloat16, bidirectional=False),
    # float16: dout and v as two exact bfloat16 parts, the gate sums and dout . v^T as float16 products
    Case(1, 33, 1, 32, 64, torch.float16),
    Case(1, 17, 2, 16, 48, torch.float16),
    Case(2, 37, 1, 32, 64, torch.float16, bidirectional=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_matches_reference(launcher, case):  # noqa: F811
    launcher.names.clear()
    check_against_reference(NAME, case, "cpu", seed=zlib.crc32(case.id().encode()) % 1000)
    assert _ran(launcher, "gla_chunk_backward_dq"), launcher.names
    assert _ran_adjoint(launcher, case), launcher.names


# gates whose in-chunk sums leave the decay ratio's range: the sweeps redo those sequences
HOSTILE = [
    Case(1, 40, 1, 32, 64, torch.bfloat16, gates="strong"),
    Case(2, 40, 1, 32, 64, torch.bfloat16, gates="extreme"),
    Case(1, 23, 2, 16, 32, torch.bfloat16, bidirectional=False, gates="extreme"),
    Case(2, 50, 1, 32, 64, torch.bfloat16, bidirectional=False, gates="extreme"),  # the fused adjoint walk
    Case(2, 40, 1, 32, 64, torch.float16, gates="extreme"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.id())
def test_strong_gates_go_to_the_sweeps(launcher, case):  # noqa: F811
    launcher.names.clear()
    check_against_reference(NAME, case, "cpu", seed=zlib.crc32(case.id().encode()) % 1000)
    assert _ran(launcher, "gla_chunk_backward_dq") and _sweeps_filtered(launcher), launcher.names


def _grads(x: dict, backend: str, bidirectional: bool = True) -> dict:
    """Gradients of ``<o, x["dout"]>`` for every input in ``x``."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items() if n != "dout"}
    o = gated_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], bidirectional,
                               g_reverse=leaves.get("g_reverse"), backend=backend)
    o.backward(x["dout"])
    return {n: t.grad for n, t in leaves.items()}


def test_one_strong_sequence_leaves_the_others_alone(launcher):  # noqa: F811
    """A batch where one (batch, head) has a hard reset mid-chunk: that sequence's gradients
    come from the sweeps, the others' from the tensor cores — each bitwise what it gets alone
    (batch invariance), all within the bound."""
    case = Case(2, 40, 2, 32, 64, torch.bfloat16)
    x = make_inputs(case, "cpu", seed=3)
    x["g"][1, 21, 0] = -1e4
    x["dout"] = torch.randn_like(x["v"])
    launcher.names.clear()
    together = _grads(x, NAME)
    assert _ran_adjoint(launcher, case) and _sweeps_filtered(launcher)
    for b in range(2):
        alone = _grads({n: t[b:b + 1] for n, t in x.items()}, NAME)
        for n in together:
            assert torch.equal(together[n][b:b + 1], alone[n]), (b, n)
    reference = _grads({n: t.double() for n, t in x.items()}, "torch")
    for n in together:
        assert torch.isfinite(together[n]).all(), n
        err = ((together[n].double() - reference[n]).norm() / reference[n].norm()).item()
        assert err < 2e-2, (n, err)


def test_longest_sequence_it_takes(launcher):  # noqa: F811
    """T = 512 (the largest single segment): the dk, dv hand-over parks [512, K + V] floats."""
    case = Case(1, _plan.SINGLE_CHUNK_MAX, 1, 16, 16, torch.bfloat16)
    launcher.names.clear()
    check_against_reference(NAME, case, "cpu", seed=4)
    assert _ran_adjoint(launcher, case)


# sequences cut into segments of 32 tokens (the path of sequences over 512): the forward's
# segment states enter the dq walk, the adjoint walk's local states and the adjoint scan the
# dv and dk walks, the gate gradients' segment sums go through gla_gate_grad_fixup
SEGMENTED_CASES = [
    Case(1, 33, 1, 32, 64, torch.bfloat16),
    Case(2, 100, 1, 32, 64, torch.bfloat16),
    Case(1, 96, 2, 16, 48, torch.bfloat16, bidirectional=False),
    Case(1, 70, 2, 16, 32, torch.bfloat16, gates="extreme"),
    Case(1, 45, 1, 16, 16, torch.bfloat16, bidirectional=False, gates="strong"),
    Case(2, 90, 1, 32, 32, torch.bfloat16, bidirectional=False),
    Case(1, 70, 1, 32, 64, torch.float16),
]


@pytest.mark.parametrize("case", SEGMENTED_CASES, ids=lambda c: c.id())
def test_segments_match_reference(launcher, case):  # noqa: F811
    launcher.names.clear()
    check_against_reference(SEGMENTED, case, "cpu", seed=zlib.crc32(case.id().encode()) % 1000)
    assert _ran(launcher, "gla_chunk_backward_dq"), launcher.names
    assert _ran_adjoint(launcher, case, SEGMENT), launcher.names
    assert any(n.endswith("true>") and "backward_dkv" in n for n in launcher.names), launcher.names  # local adjoints
    assert f"gla::gla_gate_grad_fixup<{_plan.C_TYPES[case.dtype]}>" in launcher.names


def test_segmented_batch_with_one_strong_sequence(launcher):  # noqa: F811
    """Segments, and one sequence with a hard reset in its second segment: the flags (shared by
    a sequence's segments) send it, and only it, through the sweeps' own segmented path."""
    x = make_inputs(Case(2, 80, 1, 16, 32, torch.bfloat16), "cpu", seed=9)
    x["g_reverse"][0, 40, 0] = -1e4
    x["dout"] = torch.randn_like(x["v"])
    together = _grads(x, SEGMENTED)
    reference = _grads({n: t.double() for n, t in x.items()}, "torch")
    for b in range(2):
        alone = _grads({n: t[b:b + 1] for n, t in x.items()}, SEGMENTED)
        for n in together:
            assert torch.equal(together[n][b:b + 1], alone[n]), (b, n)
    for n in together:
        err = ((together[n].double() - reference[n]).norm() / reference[n].norm()).item()
        assert err < 2e-2, (n, err)


@given(data=st.data())
def test_matches_reference_drawn(launcher, data):  # noqa: F811
    """Hypothesis, within the kernels' domain: batch, length (one segment or several of 32
    tokens), heads, K and V in multiples of 16, mode and gate regime drawn; fresh inputs."""
    segmented = data.draw(st.booleans(), label="segments of 32")
    case = Case(
        B=data.draw(st.integers(1, 2), label="B"),
        T=data.draw(st.integers(1, 90), label="T"),
        H=data.draw(st.integers(1, 2), label="H"),
        K=data.draw(st.sampled_from([16, 32]), label="K"),
        V=data.draw(st.sampled_from([16, 32, 48, 64]), label="V"),
        dtype=data.draw(st.sampled_from([torch.bfloat16, torch.float16]), label="dtype"),
        bidirectional=data.draw(st.booleans(), label="bidirectional"),
        gates=data.draw(st.sampled_from(GATE_REGIMES), label="gates"),
    )
    launcher.names.clear()
    check_against_reference(SEGMENTED if segmented else NAME, case, "cpu", seed=data.draw(st.integers(0, 2**31 - 1)))
    assert _ran(launcher, "gla_chunk_backward_dq"), launcher.names


def test_not_taken_where_it_does_not_apply(launcher):  # noqa: F811
    """float32, K = 48, V = 72: the sweeps run the backward."""
    for case in [Case(1, 20, 1, 32, 64, torch.float32), Case(1, 20, 1, 16, 72, torch.bfloat16),
                 Case(1, 20, 1, 48, 64, torch.bfloat16)]:
        x = make_inputs(case, "cpu", seed=1)
        x["dout"] = torch.randn_like(x["v"])
        launcher.names.clear()
        _grads(x, NAME)
        assert not _ran(launcher, "gla_chunk_backward"), (case, launcher.names)


@pytest.mark.parametrize("bidirectional, dtype", [(True, torch.bfloat16), (False, torch.bfloat16),
                                                  (True, torch.float16)], ids=["bf16-bi", "bf16-causal", "f16-bi"])
def test_as_accurate_as_the_float32_sweeps(launcher, bidirectional, dtype):  # noqa: F811
    """The split products keep the tensor-core gradients about as accurate as the sweeps'
    float32 arithmetic (both are dominated by rounding the 16-bit outputs; float16's 11 bits
    make a split product's dropped terms show more than bfloat16's 8)."""
    from glakernels._custom_op import _inputs

    case = Case(2, 50, 2, 32, 64, dtype, bidirectional)
    x = make_inputs(case, "cpu", seed=2)
    dout = torch.randn_like(x["v"])
    inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, 32 ** -0.5, bidirectional, False)
    reference = _grads({**{n: t.double() for n, t in x.items()}, "dout": dout.double()}, "torch", bidirectional)
    launcher.names.clear()
    tensor_cores = _driver.backward(inputs, dout, None, launcher)
    assert _ran_adjoint(launcher, case)
    sweeps = _driver.backward(inputs, dout, None, launcher, chunk_backward=False)
    fields = dict(q="dq", k="dk", v="dv", g="dg", g_reverse="dg_reverse")
    for n in reference:
        err = lambda d: ((d.double() - reference[n]).norm() / reference[n].norm()).item()  # noqa: E731
        got, base = err(getattr(tensor_cores, fields[n])), err(getattr(sweeps, fields[n]))
        assert got <= 1.5 * base + 1e-4, (n, got, base)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("segmented", [False, True])
def test_fused_adjoint_walk_against_the_separate_walks(launcher, bidirectional, segmented):  # noqa: F811
    """The fused adjoint walk (dv, dk and the gate gradients in one pass, dk's V halves swapped
    between warps) against the dv and dk walks it replaces: dv's arithmetic is the dv walk's,
    so dv is bitwise the same; dk and the gate gradients sum their V halves in another order,
    so they are held to the reference. With and without prefetching, with the adjoint in
    registers or in shared memory: bitwise the same."""
    from glakernels._custom_op import _inputs

    x = make_inputs(Case(2, 70, 2, 32, 64, torch.bfloat16, bidirectional), "cpu", seed=5)
    dout = torch.randn_like(x["v"])
    inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, 32 ** -0.5, bidirectional, False)
    chunk_len = 32 if segmented else None
    run = lambda launch: _driver.backward(inputs, dout, None, launcher, chunk_len=chunk_len,  # noqa: E731
                                          chunk_backward_launch=launch)
    launcher.names.clear()
    separate, fused, *variants = (run(launch) for launch in (
        _plan.ChunkBackwardLaunch(fused=False), _plan.ChunkBackwardLaunch(fused=True),
        _plan.ChunkBackwardLaunch(fused=True, fused_prefetch=False),
        _plan.ChunkBackwardLaunch(fused=True, fused_prefetch=False, fused_shared_state=True)))
    assert _ran(launcher, "gla_chunk_backward_adjoint") and _ran(launcher, "gla_chunk_backward_dkv<true")
    mode = "true" if bidirectional else "false"
    assert _ran(launcher, f"gla_chunk_backward_adjoint<2, 2, 2, {mode}, false, true,"), launcher.names  # shared state
    assert torch.equal(fused.dv, separate.dv)
    for variant in variants:
        for field in ("dq", "dk", "dv", "dg", "dg_reverse"):
            assert torch.equal(getattr(fused, field), getattr(variant, field)) if getattr(fused, field) is not None \
                else getattr(variant, field) is None, field
    reference = _grads({**{n: t.double() for n, t in x.items()}, "dout": dout.double()}, "torch", bidirectional)
    for n, field in dict(q="dq", k="dk", v="dv", g="dg", g_reverse="dg_reverse").items():
        if n not in reference:
            continue
        got, base = (getattr(r, field).double() for r in (fused, separate))
        assert torch.isfinite(got).all(), field
        err = lambda d: ((d - reference[n]).norm() / reference[n].norm()).item()  # noqa: E731
        assert err(got) < 2e-2 and err(got) <= 1.5 * err(base) + 1e-4, (field, err(got), err(base))


def test_ranking_takes_the_calls_the_tensor_core_kernels_take(monkeypatch):
    """Automatic selection on an sm_80+ GPU: cupy above triton's single-pass rank (300) for
    forward-only bidirectional calls the tensor-core forward takes, and for training calls the
    tensor-core backward takes (bfloat16, either mode); its base rank otherwise —
    never by B or H, so a sequence's bits do not depend on the batch."""
    from glakernels._problem import ProblemSpec
    from glakernels._dispatch import registry
    from glakernels.backends.cupy import _runtime

    monkeypatch.setattr(_runtime, "device_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cupy = registry.get("cupy")
    vig = dict(batch=128, seq_len=196, heads=3, head_dim_k=32, head_dim_v=64, dtype=torch.bfloat16,
               device_type="cuda", bidirectional=True)
    # (spec, needs_grad): ranked above triton's single-pass kernels?
    expected = [
        (vig, False, True), (vig, True, True),
        (dict(vig, batch=1, heads=1), True, True),
        (dict(vig, bidirectional=False), False, False), (dict(vig, bidirectional=False), True, True),
        (dict(vig, seq_len=_plan.SINGLE_CHUNK_MAX), True, True),
        (dict(vig, seq_len=_plan.SINGLE_CHUNK_MAX + 1), True, True),
        (dict(vig, seq_len=4096), False, True), (dict(vig, seq_len=4096), True, True),
        (dict(vig, seq_len=4096, bidirectional=False), True, True),
        (dict(vig, seq_len=_plan.SINGLE_CHUNK_MAX, bidirectional=False), True, True),
        (dict(vig, dtype=torch.float16), False, True), (dict(vig, dtype=torch.float16), True, True),
        (dict(vig, dtype=torch.float32), True, False),
        (dict(vig, head_dim_k=48), True, False), (dict(vig, head_dim_v=72), False, False),
    ]
    got = [cupy.priority_for_problem(ProblemSpec(**spec, needs_grad=grad)) > 300 for spec, grad, _ in expected]
    assert got == [row[-1] for row in expected]
    monkeypatch.setattr(_runtime, "device_capability", lambda index: (7, 5))
    assert cupy.priority_for_problem(ProblemSpec(**vig, needs_grad=True)) == cupy.priority_for("cuda")
