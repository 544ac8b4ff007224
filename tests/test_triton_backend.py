"""What the shared suites do not reach in the triton backend: the single-pass forward's chunk
counts and V blocks, the multi-segment path (states kernel) at small sizes, head dims up to
256, the matmul precision switches (tf32, split or rounded bfloat16), its availability rules,
and on a GPU: CUDA graph capture, no host synchronisation, 64-bit offsets.

On a machine without a GPU the kernels run through Triton's interpreter (``conftest.py``
turns it on for the session), so everything here except the ``gpu`` tests runs in CI."""

import os
import subprocess
import sys

import pytest
import torch

from gla_testing import (Case, assert_close, backend_and_reference, check_against_reference, make_inputs,
                         outputs_and_grads)
from glakernels import gated_linear_attention
from glakernels._dispatch import registry, select_backend
from glakernels._precision import float32_matmul_precision
from glakernels._problem import ProblemSpec

BACKEND = registry.get("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    bool(BACKEND.availability()) or DEVICE not in BACKEND.runs_on(),
    reason=f"triton backend cannot run here: {'; '.join(BACKEND.availability()) or 'no device'}",
)


def _launch():
    from glakernels.backends.triton import launch

    return launch


# ---------------------------------------------------------------------------------------------
# paths the shared shapes do not take


# segment layouts of long sequences: several chunks per segment (phase 1 walks them), and
# one chunk per segment (phase 1 skipped); segment sums in one step or two; scans of 2 or 4
# boundaries per step, so the scan carries its state across steps, and scan blocks (32
# elements) smaller than most states
LONG_LAYOUTS = {
    # the two-phase kernels' segment programs (kernels.py)
    "chunks-per-segment-2": dict(single_pass=False, single_pass_backward=False, chunk=16, segment=32,
                                 states_block_k=16, states_block_v=16, states_step=16, scan_rows=2,
                                 scan_num_warps=1),
    "one-chunk-segments": dict(single_pass=False, single_pass_backward=False, chunk=16, segment=16,
                               states_block_k=16, states_block_v=16, scan_rows=4, scan_num_warps=1),
    # the single-pass kernels' segment programs (kernels_single_pass*.py; the backward's
    # only for V <= 64, else the two-phase one as above)
    "single-pass-segments": dict(single_pass_max_t=32, single_pass_segment=32, chunk=16, segment=32,
                                 states_block_k=16, states_block_v=16, states_step=16, scan_rows=2,
                                 scan_num_warps=1),
}


@pytest.mark.parametrize("layout", list(LONG_LAYOUTS))
@pytest.mark.parametrize(
    "case",
    [
        Case(2, 100, 2, 8, 8, torch.float32, gates="extreme"),
        Case(1, 77, 1, 8, 6, torch.float32, bidirectional=False, states=True, gates="extreme"),
        # gates under which state crosses many segments (the ones above reset it often)
        Case(1, 70, 2, 16, 16, torch.bfloat16, gates="vig"),
        Case(1, 33, 1, 20, 40, torch.float32, bidirectional=False, states=True, gates="vig"),
        Case(2, 90, 1, 8, 8, torch.float32, gates="none"),
    ],
    ids=lambda c: c.id(),
)
def test_multi_segment_path(case, layout):
    """Sequences longer than one segment get their segment boundary states first (segment
    sums, then the scan); force short segments so that path runs (with partial last segments
    and chunks, two K and V blocks) at test sizes."""
    with _launch().override_config(**LONG_LAYOUTS[layout]):
        check_against_reference("triton", case, DEVICE, seed=7)


@pytest.mark.parametrize(
    "dims",
    [(256, 256), (256, 1), (1, 256), (130, 70)],
    ids=lambda d: f"K{d[0]}-V{d[1]}",
)
def test_head_dims_up_to_256(dims):
    """Several K and V blocks per program (the shared suites stop at 80)."""
    K, V = dims
    check_against_reference("triton", Case(1, 5, 1, K, V, torch.float32, gates="strong"), DEVICE, seed=3)
    check_against_reference("triton", Case(1, 6, 1, K, V, torch.float32, bidirectional=False, states=True),
                            DEVICE, seed=4)


def test_segment_boundaries_do_not_change_results():
    """One segment or many, chunks of 16 or 32: the same function within float32 rounding."""
    case = Case(1, 90, 2, 12, 10, torch.float32, gates="strong")  # (one sequence: interpreted, slow)
    x = make_inputs(case, DEVICE, seed=12)
    single, cot = outputs_and_grads(gated_linear_attention, x, None, backend="triton")
    for layout, fields in LONG_LAYOUTS.items():
        with _launch().override_config(**fields):
            multi, _ = outputs_and_grads(gated_linear_attention, x, cot, backend="triton")
        assert_close(multi, single, 1e-5, f"segments ({layout})")


@pytest.mark.parametrize(
    "case",
    [
        # 1, 2 (even: every chunk's parts meet across the middle) and 3 (odd: the middle
        # chunk) chunks of 16, a partial last chunk, V in two blocks, odd K
        Case(1, 1, 1, 33, 100, torch.float32, gates="extreme"),
        Case(2, 31, 1, 5, 100, torch.float32, gates="extreme"),
        Case(1, 48, 2, 16, 17, torch.bfloat16, gates="strong"),
        Case(1, 47, 1, 64, 130, torch.float16, gates="extreme"),
        Case(1, 40, 1, 33, 70, torch.float32, bidirectional=False, states=True, gates="strong"),
        # K past 64 (its own warps; the backward is the two-phase one)
        Case(1, 33, 1, 100, 24, torch.float32, gates="extreme"),
        Case(1, 20, 1, 128, 8, torch.bfloat16, bidirectional=False, states=True, gates="vig"),
    ],
    ids=lambda c: c.id(),
)
def test_single_pass_forward(case):
    """One-segment sequences run the single-pass forward kernel: outputs, final state and
    gradients against float64, at chunk counts (of 16) and V blocks (of up to 64) where its
    two directions' parts meet differently."""
    launch = _launch()
    cfg = launch.choose_config(case.T, case.K, case.V)
    assert cfg.single_pass and cfg.segment >= case.T and case.K <= cfg.single_pass_max_k
    check_against_reference("triton", case, DEVICE, seed=11)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "causal-states"])
def test_single_pass_kernels_equal_two_phase_kernels(bidirectional):
    """The single-pass and the two-phase kernels compute the same function and gradients
    (float32; the causal case with an initial state and the final state's gradient)."""
    case = Case(2, 70, 3, 24, 40, torch.float32, gates="strong", bidirectional=bidirectional,
                states=not bidirectional)
    x = make_inputs(case, DEVICE, seed=5)
    kwargs = {"bidirectional": bidirectional, "backend": "triton"}
    if not bidirectional:
        kwargs["output_final_state"] = True
    single, cot = outputs_and_grads(gated_linear_attention, x, None, **kwargs)
    with _launch().override_config(single_pass=False, single_pass_backward=False):
        two_phase, _ = outputs_and_grads(gated_linear_attention, x, cot, **kwargs)
    assert set(single) == set(two_phase) and len(single) >= 6
    assert_close(single, two_phase, 1e-5, "single pass vs two phases")


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "causal"])
def test_single_pass_kernels_take_positive_gates(bidirectional):
    """Gates above 0 are outside the documented range but the reference computes them; the
    single-pass kernels' decay totals are picked out exactly (not as minima, which holds
    only for factors <= 1), so they agree with it there too."""
    case = Case(1, 50, 2, 16, 32, torch.float32, bidirectional=bidirectional)
    x = make_inputs(case, DEVICE, seed=17)
    for name in ("g", "g_reverse"):
        if name in x:
            x[name] = torch.rand(x[name].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 0.1 - 0.02
    got, cot = outputs_and_grads(gated_linear_attention, x, None, bidirectional=bidirectional, backend="triton")
    ref, _ = outputs_and_grads(gated_linear_attention, {n: t.double() for n, t in x.items()}, cot,
                               bidirectional=bidirectional, backend="torch")
    assert_close(got, ref, 1e-4, "positive gates")


def _gates_down_to(shape, lowest: float, seed: int) -> torch.Tensor:
    """Gates uniform in ``[lowest, 0]``, a tenth of them exactly ``lowest``."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(shape, generator=gen, dtype=torch.float64) * lowest
    return torch.where(torch.rand(shape, generator=gen) < 0.1, torch.tensor(lowest, dtype=torch.float64), g)


def _inputs_down_to(case: Case, lowest: float, seed: int, gate_seed: int):
    """``case``'s inputs with its gates from ``_gates_down_to(lowest)``, and the call's
    keyword arguments (a causal case asks for the final state)."""
    x = make_inputs(case, DEVICE, seed=seed)
    for name in ("g", "g_reverse"):
        if name in x:
            x[name] = _gates_down_to(x[name].shape, lowest, seed=len(name) + gate_seed).to(DEVICE, case.dtype)
    kwargs = {"bidirectional": case.bidirectional}
    if not case.bidirectional:
        kwargs["output_final_state"] = True
    return x, kwargs


RATIO_DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", RATIO_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["one-segment", "single-pass-segments"])
def test_ratio_chunks_at_their_gate_bound(dtype, layout):
    """Chunks whose gates are all >= -32 / chunk take the one-dot ratio scores
    (``kernels_single_pass._ratio_scores``), where a chunk's decays reach e^-32 and their
    inverses e^32: outputs, states and gradients against float64 there, with an initial
    state (bidirectional: both directions), and the path is taken (float32: the output and
    gradients are not bit for bit the hierarchy's)."""
    launch = _launch()
    lowest = -32.0 / launch.choose_config(70, 20, 24).single_pass_chunk
    fields = {} if layout == "one-segment" else dict(LONG_LAYOUTS[layout])
    for bidirectional in (True, False):
        # one sequence of two heads: the programs run one at a time under the interpreter
        case = Case(1, 70, 2, 20, 24, dtype, bidirectional=bidirectional, states=not bidirectional)
        x, kwargs = _inputs_down_to(case, lowest, seed=31, gate_seed=0)
        with launch.override_config(**fields):
            got, expected = backend_and_reference("triton", x, **kwargs)
            assert_close(got, expected, BACKEND.tolerance(dtype), f"{case.id()} {layout}")
        if dtype != torch.float32:  # (16-bit outputs round both maths' float32 results alike)
            continue
        with launch.override_config(**fields):
            got, cot = outputs_and_grads(gated_linear_attention, x, None, **kwargs, backend="triton")
        with launch.override_config(single_pass_ratio=False, single_pass_bwd_ratio=False, **fields):
            levels, _ = outputs_and_grads(gated_linear_attention, x, cot, **kwargs, backend="triton")
        for name in ("o", "dq", "dk"):  # the forward's and the backward's ratio math ran
            assert not torch.equal(levels[name], got[name]), name


def test_a_gate_below_the_bound_sends_the_walk_to_the_hierarchy():
    """A walk takes the ratio chunk math only if every gate it reads allows it: one gate just
    below the bound in one sequence gives that sequence the hierarchy's output and gradients
    bit for bit (forward, and both passes of the backward), while the other sequence keeps
    the ratio math (causal: one walk makes each output)."""
    launch = _launch()
    lowest = -32.0 / launch.choose_config(40, 8, 8).single_pass_chunk
    x = make_inputs(Case(2, 40, 1, 8, 8, torch.float32, bidirectional=False), DEVICE, seed=41)
    x["g"] = _gates_down_to(x["g"].shape, lowest, seed=5).to(DEVICE, torch.float32)
    x["g"][0, 37, 0, 3] = lowest * 1.001
    ratio, cot = outputs_and_grads(gated_linear_attention, x, None, bidirectional=False, backend="triton")
    with launch.override_config(single_pass_ratio=False, single_pass_bwd_ratio=False):
        levels, _ = outputs_and_grads(gated_linear_attention, x, cot, bidirectional=False, backend="triton")
    assert set(ratio) == {"o", "dq", "dk", "dv", "dg"}
    for name in ratio:  # tensors are [B, T, H, dim]: sequence 0, then 1
        assert torch.equal(ratio[name][0], levels[name][0]), name
        assert not torch.equal(ratio[name][1], levels[name][1]), name
    _, ref = backend_and_reference("triton", x, bidirectional=False)
    assert_close(ratio, ref, 1e-4, "ratio and hierarchy walks in one launch")


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "causal-states"])
def test_ratio_tested_per_chunk(bidirectional):
    """``single_pass_ratio_per_chunk``: the test per chunk, both chunk maths in one loop. A
    walk with one strong gate then takes the hierarchy for that chunk only: against float64
    (outputs, states, gradients), and not the per-walk test's result (which takes the
    hierarchy for the whole walk)."""
    launch = _launch()
    lowest = -32.0 / launch.choose_config(70, 20, 24).single_pass_chunk
    case = Case(2, 70, 2, 20, 24, torch.float32, bidirectional=bidirectional, states=not bidirectional)
    x = make_inputs(case, DEVICE, seed=43)
    for name in ("g", "g_reverse"):
        if name in x:
            x[name] = _gates_down_to(x[name].shape, lowest, seed=9).to(DEVICE, torch.float32)
            x[name][:, 37, :, 5] = -7.0  # chunk 2 of 5, in every walk
    kwargs = {"bidirectional": bidirectional}
    if not bidirectional:
        kwargs["output_final_state"] = True
    with launch.override_config(single_pass_ratio_per_chunk=True):
        got, expected = backend_and_reference("triton", x, **kwargs)
        assert_close(got, expected, 1e-4, "ratio tested per chunk")
        per_chunk, cot = outputs_and_grads(gated_linear_attention, x, None, **kwargs, backend="triton")
    per_walk, _ = outputs_and_grads(gated_linear_attention, x, cot, **kwargs, backend="triton")
    for name in ("o", "dq", "dk"):
        assert not torch.equal(per_chunk[name], per_walk[name]), name


@pytest.mark.parametrize("dtype, layout", [
    *((torch.float32, layout) for layout in ("one-segment", "chunks-per-segment-2", "one-chunk-segments")),
    *((dtype, "one-segment") for dtype in RATIO_DTYPES[1:]),
], ids=lambda p: p if isinstance(p, str) else str(p).split(".")[-1])
def test_two_phase_backward_ratio_at_its_gate_bound(dtype, layout):
    """The two-phase backward (``kernels._gla_bwd_kernel``; here for V = 72 > 64) scores a
    chunk's pairs by the decay ratio where its gates are all >= -32 / chunk: gradients against
    float64 with every gate down to that bound, in one segment and in segment programs (with
    and without a walk in phase 1), bidirectional and causal with states; and the path is
    taken (float32, bidirectional: dq and dk are not bit for bit the hierarchy's)."""
    launch = _launch()
    fields = {} if layout == "one-segment" else dict(LONG_LAYOUTS[layout])
    T = 70 if layout == "one-segment" else 40  # (segments of 16 or 32: 3 and 2 of them; interpreted, slow)
    with launch.override_config(**fields):
        lowest = -32.0 / launch.choose_config(T, 20, 72).chunk
    for bidirectional in (True, False):
        case = Case(1, T, 1, 20, 72, dtype, bidirectional=bidirectional, states=not bidirectional)
        x, kwargs = _inputs_down_to(case, lowest, seed=33, gate_seed=2)
        with launch.override_config(**fields):
            got, expected = backend_and_reference("triton", x, **kwargs)
            assert_close(got, expected, BACKEND.tolerance(dtype), f"{case.id()} {layout}")
        if dtype != torch.float32 or not bidirectional:  # (one check of the path is enough)
            continue
        with launch.override_config(**fields):
            ratio, cot = outputs_and_grads(gated_linear_attention, x, None, **kwargs, backend="triton")
        with launch.override_config(two_phase_bwd_ratio=False, **fields):
            levels, _ = outputs_and_grads(gated_linear_attention, x, cot, **kwargs, backend="triton")
        assert torch.equal(ratio["o"], levels["o"])  # (the forward is not this switch's)
        for name in ("dq", "dk"):
            assert not torch.equal(levels[name], ratio[name]), name


def test_two_phase_backward_tests_the_ratio_per_chunk():
    """In the two-phase backward each chunk (and K tile) tests its own gates: one gate just
    below the bound in a chunk of one sequence, in both directions, gives that chunk's rows
    the hierarchy's gradients bit for bit, while the sequence's other chunks and the other
    sequence keep the ratio math; all against float64."""
    launch = _launch()
    C = launch.choose_config(90, 8, 72).chunk
    lowest = -32.0 / C
    x = make_inputs(Case(2, 90, 1, 8, 72, torch.float32), DEVICE, seed=45)
    for name in ("g", "g_reverse"):
        x[name] = _gates_down_to(x[name].shape, lowest, seed=len(name) + 4).to(DEVICE, torch.float32)
        x[name][0, C + 5, 0, 3] = lowest * 1.001  # chunk 1 of sequence 0
    ratio, cot = outputs_and_grads(gated_linear_attention, x, None, bidirectional=True, backend="triton")
    with launch.override_config(two_phase_bwd_ratio=False):
        levels, _ = outputs_and_grads(gated_linear_attention, x, cot, bidirectional=True, backend="triton")
    strong = slice(C, 2 * C)
    for name in ("dq", "dk", "dv", "dg", "dg_reverse"):  # tensors are [B, T, H, dim]
        assert torch.equal(ratio[name][0, strong], levels[name][0, strong]), name
    for name in ("dq", "dk"):
        assert not torch.equal(ratio[name][0, :C], levels[name][0, :C]), name
        assert not torch.equal(ratio[name][1], levels[name][1]), name
    _, ref = backend_and_reference("triton", x, bidirectional=True)
    assert_close(ratio, ref, 1e-4, "ratio and hierarchy chunks in one backward")


@pytest.mark.parametrize(
    "case, layout",
    [
        (Case(2, 50, 2, 16, 32, torch.bfloat16, gates="strong"), "one-segment"),
        (Case(1, 47, 1, 33, 17, torch.float32, gates="extreme"), "one-segment"),
        (Case(1, 47, 1, 33, 17, torch.float32, gates="extreme"), "single-pass-segments"),
        (Case(1, 40, 1, 8, 24, torch.float32, bidirectional=False, states=True, gates="vig"), "single-pass-segments"),
    ],
    ids=lambda p: p if isinstance(p, str) else p.id(),
)
def test_single_pass_backward_in_one_or_two_launches(case, layout):
    """The single-pass backward as two launches (pass A, then pass B from its scratch: the
    default) against float64, and against the one launch (``single_pass_bwd_split=False``)
    that makes the same arithmetic, within float32 rounding."""
    fields = {} if layout == "one-segment" else dict(LONG_LAYOUTS[layout])
    with _launch().override_config(single_pass_bwd_split=True, **fields):
        check_against_reference("triton", case, DEVICE, seed=21)
    x = make_inputs(case, DEVICE, seed=22)
    kwargs = {"bidirectional": case.bidirectional, "backend": "triton"}
    if not case.bidirectional:
        kwargs["output_final_state"] = True
    results, cot = {}, None
    for split in (True, False):
        with _launch().override_config(single_pass_bwd_split=split, **fields):
            results[split], cot = outputs_and_grads(gated_linear_attention, x, cot, **kwargs)
    assert set(results[True]) == set(results[False]) and len(results[True]) >= 5
    assert_close(results[True], results[False], 1e-6, "two launches vs one")


@pytest.mark.parametrize(
    "case, layout",
    [
        (Case(1, 40, 1, 16, 32, torch.bfloat16, gates="strong"), "one-segment"),
        (Case(1, 40, 1, 17, 9, torch.float32, gates="extreme"), "single-pass-segments"),
        (Case(1, 40, 1, 8, 24, torch.float32, bidirectional=False, states=True, gates="vig"), "single-pass-segments"),
        (Case(2, 1, 1, 8, 5, torch.float32), "one-segment"),
    ],
    ids=lambda p: p if isinstance(p, str) else p.id(),
)
def test_backward_pass_a_prefetch_is_bitwise_neutral(case, layout):
    """Pass A loading the next chunk's tiles ahead (the default) or each chunk's when it gets
    there (``single_pass_bwd_pass_a_prefetch=False``), in its own launch or in pass B's:
    against float64, and the same gradients bit for bit (only the loads move)."""
    fields = {} if layout == "one-segment" else dict(LONG_LAYOUTS[layout])
    with _launch().override_config(**fields):
        check_against_reference("triton", case, DEVICE, seed=28)
    x = make_inputs(case, DEVICE, seed=29)
    kwargs = {"bidirectional": case.bidirectional, "backend": "triton"}
    if not case.bidirectional:
        kwargs["output_final_state"] = True
    variants = [dict(single_pass_bwd_split=split, single_pass_bwd_pass_a_prefetch=ahead)
                for split in (True, False) for ahead in (True, False)]
    results, cot = [], None
    for variant in variants:
        with _launch().override_config(**variant, **fields):
            out, cot = outputs_and_grads(gated_linear_attention, x, cot, **kwargs)
        results.append(out)
    assert len(results[0]) >= 5
    for pair in ((0, 1), (2, 3)):
        for name in results[pair[0]]:
            assert torch.equal(results[pair[0]][name], results[pair[1]][name]), \
                f"{name} differs between {variants[pair[0]]} and {variants[pair[1]]}"


@pytest.mark.parametrize(
    "case, layout",
    [
        (Case(2, 50, 2, 16, 32, torch.bfloat16, gates="strong"), "one-segment"),
        (Case(1, 33, 1, 17, 72, torch.float32, gates="extreme"), "one-segment"),
        (Case(1, 47, 1, 33, 17, torch.float32, gates="extreme"), "single-pass-segments"),
        (Case(1, 1, 1, 8, 5, torch.float32), "one-segment"),
    ],
    ids=lambda p: p if isinstance(p, str) else p.id(),
)
def test_forward_parts_meet_per_chunk_or_parked_bitwise(monkeypatch, case, layout):
    """A bidirectional forward's two parts per chunk meet once in the middle of the walks (the
    default; on a GPU also with no waiting there, so that the first to arrive gives up and the
    last to finish sums the rest), chunk by chunk in the walk (``single_pass_meet=False``), or
    are all parked and summed by a second launch (``single_pass_park_all_per_sm``): each
    against float64, and bit for bit the same ``o`` (V over one block and over two, one
    segment and several, a one-token sequence). On the CPU interpreter programs run one at a
    time, so there the first to arrive always gives up."""
    from glakernels.backends.triton import kernels_single_pass

    fields = {} if layout == "one-segment" else dict(LONG_LAYOUTS[layout])
    handoffs = [dict(single_pass_park_all_per_sm=0), dict(single_pass_park_all_per_sm=0, single_pass_meet=False),
                dict(single_pass_park_all_per_sm=10**9)]
    if DEVICE == "cuda":
        handoffs.append(dict(single_pass_park_all_per_sm=0, single_pass_meet_spin=0))
    launches = _record_launches(monkeypatch, kernels_single_pass)
    outs, sums, meets = [], [], []
    for handoff in handoffs:
        with _launch().override_config(**handoff, **fields):
            check_against_reference("triton", case, DEVICE, seed=23)
            x = make_inputs(case, DEVICE, seed=24)
            first = len(launches)  # the launches of this call only
            with torch.no_grad():
                outs.append(gated_linear_attention(**x, backend="triton"))
            mine = launches[first:]
            sums.append(sum(name == "_gla_fwd_sum_parts_kernel" for name, _ in mine))
            meets.append([args.get("MEET") for name, args in mine if name == "_gla_fwd_single_pass_kernel"])
    assert sums == [0, 0, 1] + [0] * (len(handoffs) - 3), f"second launches per call {sums}: a setting did not take"
    assert meets[0] == [True] and meets[1] == [False], meets
    for handoff, out in zip(handoffs[1:], outs[1:]):
        assert torch.equal(outs[0], out), f"o differs between the meeting and {handoff}"


@pytest.mark.parametrize(
    "case, layout",
    [
        (Case(2, 50, 1, 16, 32, torch.float32, gates="strong"), "one-segment"),
        (Case(1, 47, 1, 33, 17, torch.float32, gates="extreme"), "single-pass-segments"),
        (Case(1, 1, 1, 8, 5, torch.float32), "one-segment"),
    ],
    ids=lambda p: p if isinstance(p, str) else p.id(),
)
def test_backward_parts_meet_or_hand_over_bitwise(case, layout):
    """The single-pass backward's dq, dk and dv parts meet once in the middle of pass B's walks
    (the default; on a GPU also with no waiting there, so that the last to finish sums what the
    one that gave up parked) or chunk by chunk: against float64, and bit for bit the same
    gradients."""
    fields = {} if layout == "one-segment" else dict(LONG_LAYOUTS[layout])
    handoffs = [{}, dict(single_pass_meet=False)] + ([dict(single_pass_meet_spin=0)] if DEVICE == "cuda" else [])
    x = make_inputs(case, DEVICE, seed=25)
    results, cot = [], None
    for handoff in handoffs:
        with _launch().override_config(**handoff, **fields):
            if not results:
                check_against_reference("triton", case, DEVICE, seed=26)
            out, cot = outputs_and_grads(gated_linear_attention, x, cot, bidirectional=True, backend="triton")
        results.append(out)
    assert len(results[0]) >= 5
    for handoff, other in zip(handoffs[1:], results[1:]):
        for name in results[0]:
            assert torch.equal(results[0][name], other[name]), f"{name} differs between the meeting and {handoff}"


@pytest.mark.parametrize("case, layout", [
    (Case(3, 9, 2, 8, 8, torch.float32), "one-segment"),  # one chunk a sequence
    (Case(2, 48, 1, 8, 24, torch.float32), "single-pass-segments"),  # a last segment of one chunk
], ids=lambda p: p if isinstance(p, str) else p.id())
def test_meeting_counters_stay_in_their_segment(monkeypatch, case, layout):
    """After a bidirectional forward and backward, each segment's meeting counter holds 2 (both
    met), or 4 or 5 (one gave up, then the other came; always so under the interpreter, which
    runs programs one at a time), its second counter 0 or 2 (the last to finish, after a give-
    up), and no other counter was touched: a walk of one chunk has no second counter (it would
    be the next segment's or sequence's meeting counter, which a stray count there would
    corrupt: the first to arrive would take it for the other's)."""
    from glakernels.backends.triton import kernels_single_pass, kernels_single_pass_bwd

    fields = {} if layout == "one-segment" else dict(LONG_LAYOUTS[layout])
    launches = _record_launches(monkeypatch, kernels_single_pass, kernels_single_pass_bwd)
    x = make_inputs(case, DEVICE, seed=27)
    with _launch().override_config(single_pass_park_all_per_sm=0, **fields):
        outputs_and_grads(gated_linear_attention, x, None, bidirectional=True, backend="triton")
    walks = [(name, args) for name, args in launches
             if name in ("_gla_fwd_single_pass_kernel", "_gla_bwd_single_pass_kernel") and args.get("PASSES", 2) & 2]
    assert [name for name, _ in walks] == ["_gla_fwd_single_pass_kernel", "_gla_bwd_single_pass_kernel"]
    n_chunks = -(-case.T // 16)
    for name, args in walks:
        seg_chunks = args["SEG_CHUNKS"]
        flags = args["flags"].cpu().view(-1, n_chunks)  # a row per sequence (and V block)
        expected_zero = torch.ones_like(flags, dtype=torch.bool)
        for c_lo in range(0, n_chunks, seg_chunks):
            n = min(seg_chunks, n_chunks - c_lo)
            assert set(flags[:, c_lo].tolist()) <= {2, 4, 5}, (name, c_lo, flags)
            expected_zero[:, c_lo] = False
            if n >= 2:
                assert set(flags[:, c_lo + 1].tolist()) <= {0, 2}, (name, c_lo, flags)
                expected_zero[:, c_lo + 1] = False
        assert not flags[expected_zero].any(), (name, flags)


def _record_launches(monkeypatch, *modules) -> list:
    """Wrap every ``*_kernel`` of ``modules`` so that each launch appends ``(kernel name,
    {argument name: value})`` (positional and keyword arguments) to the returned list, then
    launches as usual."""
    import inspect

    launches = []

    class Recording:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name
            self.params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, dict(zip(self.params, args)) | kwargs))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for module in modules:
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
                monkeypatch.setattr(module, name, Recording(getattr(module, name), name))
    return launches


# the tensors a launch returns to the user; torch.compile's functionalisation clones each
# argument a kernel may write on its own, so such a tensor passed in a second argument slot
# comes back as whichever clone was taken last (NOTES.md session 11: dgr = dg gave DiG
# garbage gate gradients under torch.compile on CUDA)
_RESULT_ARGS = ("o", "dq", "dk", "dv", "dg", "dgr")


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("layout", ["one-segment", "chunks-per-segment-2", "single-pass-segments"])
def test_launches_never_pass_a_result_tensor_twice(monkeypatch, bidirectional, layout):
    """Every kernel launch of a forward and backward gets its output and gradient tensors in
    one argument slot each: no other argument of the launch shares their memory."""
    from glakernels.backends.triton import kernels, kernels_boundary_states, kernels_single_pass
    from glakernels.backends.triton import kernels_single_pass_bwd

    launches = _record_launches(monkeypatch, kernels, kernels_boundary_states, kernels_single_pass,
                                kernels_single_pass_bwd)
    case = Case(1, 70, 2, 8, 16, torch.float32, bidirectional=bidirectional, gates="vig")
    fields = {} if layout == "one-segment" else LONG_LAYOUTS[layout]
    with _launch().override_config(**fields):
        outputs_and_grads(gated_linear_attention, make_inputs(case, DEVICE, seed=5), None,
                          bidirectional=bidirectional, backend="triton")
    assert len(launches) >= 2
    for kernel, args in launches:
        tensors = {n: t for n, t in args.items() if isinstance(t, torch.Tensor)}
        for name in _RESULT_ARGS:
            if name not in tensors:
                continue
            ptr = tensors[name].untyped_storage().data_ptr()
            shared = [n for n, t in tensors.items() if n != name and t.untyped_storage().data_ptr() == ptr]
            assert not shared, f"{kernel}: {name} shares its memory with {shared}"


def test_single_pass_forward_launch_follows_the_grid():
    """The forward's launch is the first small-grid setting whose slots hold the grid in one
    wave, else the large-grid one; while Dynamo traces, capped settings are skipped (Inductor
    drops ``maxnreg``); wide K has no small-grid settings."""
    launch = _launch()
    cfg = launch.choose_config(196, 32, 64)
    ladder = cfg.single_pass_small_grid_launches
    large = (cfg.single_pass_num_warps, cfg.single_pass_maxnreg)
    assert ladder and large[1] is not None, "the defaults this test is about changed"
    sms = 132
    for traced in (False, True):
        usable = [(w, cap, per_sm) for w, cap, per_sm in ladder if not (traced and cap is not None)]
        assert usable, "an uncapped small-grid setting is expected"
        for i, (w, cap, per_sm) in enumerate(usable):
            # the first grid this entry takes, and its last
            first = usable[i - 1][2] * sms + 1 if i else 1
            assert launch._single_pass_launch(cfg, first, sms, traced) == (w, cap)
            assert launch._single_pass_launch(cfg, per_sm * sms, sms, traced) == (w, cap)
        assert launch._single_pass_launch(cfg, usable[-1][2] * sms + 1, sms, traced) == large
    # the entries are in order of their slots, and the defaults skip the cap under tracing
    assert [per_sm for _, _, per_sm in ladder] == sorted(per_sm for _, _, per_sm in ladder)
    assert launch._single_pass_launch(cfg, ladder[1][2] * sms, sms, True) != ladder[1][:2]
    assert launch._single_pass_launch(cfg, 1, 0, False) == large  # no SMs known: large
    none = launch._config(196, 32, 64, dict(single_pass_small_grid_launches=()))
    assert launch._single_pass_launch(none, 1, sms, False) == large
    wide = launch.choose_config(196, 128, 128)
    assert launch._single_pass_launch(wide, 1, sms, False) == (wide.single_pass_num_warps, None)


def test_single_pass_gradients_are_bitwise_reproducible():
    """The backward's dq, dk, dv parts meet like the forward's: repeated calls agree bitwise."""
    case = Case(2, 50, 2, 16, 32, torch.bfloat16, gates="strong")
    x = make_inputs(case, DEVICE, seed=13)
    first, cot = outputs_and_grads(gated_linear_attention, x, None, backend="triton")
    again, _ = outputs_and_grads(gated_linear_attention, x, cot, backend="triton")
    assert set(first) == set(again)
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_single_pass_forward_is_bitwise_reproducible():
    """Whichever direction's program finishes a chunk second adds the other's part: one float32
    addition, commutative, so repeated calls agree bitwise."""
    case = Case(3, 50, 2, 16, 64, torch.bfloat16, gates="strong")
    x = make_inputs(case, DEVICE, seed=9)
    with torch.no_grad():
        first = gated_linear_attention(**x, backend="triton")
        for _ in range(3):
            assert torch.equal(gated_linear_attention(**x, backend="triton"), first)


def test_single_pass_calls_prefer_triton_on_cuda():
    """Automatic selection on CUDA: triton above cupy where its single-pass kernels measured
    faster (forward-only K <= 64, and K <= 128 with 16-bit inputs; training K, V <= 64, with
    float32 inputs on long sequences only, and 64 < K, V <= 128 with 16-bit inputs on long
    sequences), below it otherwise, whatever the matmul precision."""
    launch = _launch()
    short = dict(batch=128, seq_len=196, heads=3, head_dim_k=32, head_dim_v=64, dtype=torch.bfloat16,
                 device_type="cuda", bidirectional=True)
    long = dict(short, seq_len=launch.SINGLE_SEGMENT_MAX_T + 1)
    wide_v = dict(long, head_dim_v=launch.SINGLE_PASS_MAX_K + 1)
    wide = dict(short, head_dim_k=launch.SINGLE_PASS_MAX_K + 1)
    wider = dict(short, head_dim_k=launch.SINGLE_PASS_FORWARD_MAX_K + 1)
    cupy_rank = registry.get("cupy").priority_for("cuda")
    # (spec, needs_grad): triton first by default?, under "medium"?
    expected = [
        (short, False, True, True), (short, True, True, True),
        (long, False, True, True), (long, True, True, True),
        (wide_v, False, True, True), (wide_v, True, False, False),
        (wide, False, True, True), (wide, True, False, False),
        (dict(wide, dtype=torch.float32), False, False, False),
        (dict(long, head_dim_k=128, head_dim_v=128), True, True, True),
        (dict(long, head_dim_k=128, head_dim_v=128, dtype=torch.float32), True, False, False),
        (dict(long, head_dim_k=128, head_dim_v=129), True, False, False),
        (dict(long, head_dim_k=36, head_dim_v=72), True, False, False),
        (dict(short, head_dim_k=128, head_dim_v=128), True, False, False),
        (wider, False, False, False), (wider, True, False, False),
        (dict(short, dtype=torch.float32), True, False, False),
    ]
    before = float32_matmul_precision()
    try:
        for column, precision in ((2, "highest"), (3, "medium")):
            torch.set_float32_matmul_precision(precision)
            got = [BACKEND.priority_for_problem(ProblemSpec(**spec, needs_grad=grad)) > cupy_rank
                   for spec, grad, *_ in expected]
            assert got == [row[column] for row in expected], precision
    finally:
        torch.set_float32_matmul_precision(before)
    assert BACKEND.priority_for_problem(ProblemSpec(**dict(short, device_type="cpu"))) is None


@pytest.mark.parametrize("precision, expected", [
    # PyTorch's default and "high": 16-bit inputs split their float32 intermediates
    ("highest", {torch.bfloat16: (True, "bf16x3"), torch.float16: (True, "bf16x3"), torch.float32: (False, "ieee")}),
    ("high", {torch.bfloat16: (True, "bf16x3"), torch.float16: (True, "bf16x3"), torch.float32: (False, "tf32")}),
    # the opt-in to bfloat16 internal computation: one rounded dot
    ("medium", {torch.bfloat16: (True, "bf16"), torch.float16: (False, "tf32"), torch.float32: (False, "tf32")}),
])
def test_matmul_precision_follows_pytorchs_switch(precision, expected):
    """Which operands the CUDA kernels' matmuls get (``launch._dot_mode``), by input dtype, under
    ``torch.set_float32_matmul_precision``; ``Config.half_dots`` overrides it for 16-bit inputs."""
    launch = _launch()
    cfg = launch.choose_config(196, 32, 64)
    before = float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        assert {d: launch._dot_mode(d, "cuda", cfg) for d in expected} == expected
        with launch.override_config(half_dots="tf32x3"):
            assert launch._dot_mode(torch.bfloat16, "cuda", launch.choose_config(196, 32, 64)) == (False, "tf32x3")
            assert launch._dot_mode(torch.float32, "cuda", launch.choose_config(196, 32, 64)) == expected[torch.float32]
    finally:
        torch.set_float32_matmul_precision(before)
    # the interpreter (CPU tensors) always multiplies float32 operands
    assert launch._dot_mode(torch.bfloat16, "cpu", cfg) == (False, "ieee")


def test_tf32_switch_read_after_mixing_pytorchs_two_apis():
    """Once a process has set PyTorch's legacy ``allow_tf32`` and then the per-backend
    ``fp32_precision``, reading the legacy flag raises: the float32 mode follows the newer
    setting instead of failing the call (a subprocess: the mixed state cannot be undone)."""
    _launch()  # skips without triton
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend precision API")
    code = (
        "import torch\n"
        "from glakernels.backends.triton import launch\n"
        "cfg = launch.choose_config(196, 32, 64)\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "print(launch._dot_mode(torch.float32, 'cuda', cfg))\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "print(launch._dot_mode(torch.float32, 'cuda', cfg))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["(False, 'ieee')", "(False, 'tf32')"]


# ---------------------------------------------------------------------------------------------
# declarations and availability


def test_never_chosen_automatically_on_cpu():
    spec = ProblemSpec(1, 8, 1, 4, 4, torch.float32, "cpu", True)
    assert BACKEND.priority_for("cpu") is None
    assert select_backend(spec).name != "triton"


def test_unavailable_without_gpu_or_interpreter(tmp_path):
    """Without a GPU and without the interpreter the backend says why it cannot run."""
    code = (
        "import glakernels\n"
        "s = {b.name: b for b in glakernels.available_backends()}['triton']\n"
        "print(s.available, s.reasons)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "False" in result.stdout and "no CUDA GPU" in result.stdout, result.stdout


def test_chunk_rows_need_64bit_offsets_from_2_31_elements():
    """The forward's offsets within a chunk are 32-bit below 2^31 elements a chunk (rows x H x
    the wider head dim) and 64-bit from there."""
    need = _launch()._chunk_rows_need_64bit
    assert not need(16, 2**20 - 1, 128, 16) and need(16, 2**20, 128, 16)
    assert not need(64, 2**19 - 1, 1, 64) and need(64, 2**19, 1, 64)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_forward_with_64bit_chunk_offsets_is_the_same(monkeypatch, bidirectional):
    """The forward built with 64-bit offsets within a chunk (``WIDE_ROWS``, taken for chunks
    past 2^31 elements) gives the 32-bit build's outputs bit for bit, and is launched so."""
    from glakernels.backends.triton import kernels_single_pass

    launch = _launch()
    x = make_inputs(Case(2, 37, 3, 16, 24, torch.bfloat16, bidirectional=bidirectional, gates="vig"), DEVICE,
                    seed=4)
    launches = _record_launches(monkeypatch, kernels_single_pass)
    with torch.no_grad():
        narrow = gated_linear_attention(**x, bidirectional=bidirectional, backend="triton")
        monkeypatch.setattr(launch, "_chunk_rows_need_64bit", lambda *shape: True)
        wide = gated_linear_attention(**x, bidirectional=bidirectional, backend="triton")
    assert [args["WIDE_ROWS"] for name, args in launches if name == "_gla_fwd_single_pass_kernel"] == [False, True]
    assert torch.equal(narrow, wide)


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_single_pass_forward_launches_agree_bitwise(monkeypatch, bidirectional, dtype):
    """Every launch setting the forward may pick by grid size (warps, register cap, and for
    bidirectional calls the parts parked and summed by a second launch) gives the same result
    bit for bit, and each is launched as configured. Before the chunk's diagonal
    became a dot, 4 warps differed from 2 in 67-3,600 of 1.6 M outputs of this size on an
    H100 (a row sum's order followed the warps; NOTES.md session 13); hence the size."""
    from glakernels.backends.triton import kernels_single_pass

    launch = _launch()
    launches = _record_launches(monkeypatch, kernels_single_pass)
    x = make_inputs(Case(64, 196, 4, 32, 64, dtype, bidirectional=bidirectional, gates="vig"), "cuda", seed=3)
    cfg = launch.choose_config(196, 32, 64)
    settings = [(w, cap) for w, cap, _ in cfg.single_pass_small_grid_launches]
    settings += [(cfg.single_pass_num_warps, cfg.single_pass_maxnreg), (8, None), (1, None)]
    outputs = []
    for warps, cap in settings:
        # one entry that holds any grid: this setting runs whatever the grid's size
        with launch.override_config(single_pass_small_grid_launches=((warps, cap, 10**6),),
                                    single_pass_park_all_per_sm=0), torch.no_grad():
            outputs.append(gated_linear_attention(**x, bidirectional=bidirectional, backend="triton"))
    seen = [(args["num_warps"], args.get("maxnreg")) for name, args in launches
            if name == "_gla_fwd_single_pass_kernel"]
    assert seen == settings
    if bidirectional:  # the parts parked and summed by a second launch, at two of the settings
        for warps, cap in (settings[0], settings[-1]):
            with launch.override_config(single_pass_small_grid_launches=((warps, cap, 10**6),),
                                        single_pass_park_all_per_sm=10**6), torch.no_grad():
                outputs.append(gated_linear_attention(**x, bidirectional=bidirectional, backend="triton"))
            settings.append((warps, cap, "parked"))
        assert sum(name == "_gla_fwd_sum_parts_kernel" for name, _ in launches) == 2
    for setting, out in zip(settings[1:], outputs[1:]):
        differ = (out != outputs[0]).sum().item()
        assert differ == 0, f"{setting}: {differ} outputs differ from {settings[0]}"


@pytest.mark.gpu
def test_float32_uses_ieee_unless_tf32_is_allowed():
    """float32 matmuls are IEEE by default; ``torch.backends.cuda.matmul.allow_tf32`` opts in."""
    case = Case(2, 96, 2, 64, 64, torch.float32, gates="vig")
    x = make_inputs(case, "cuda", seed=5)
    ref = gated_linear_attention(**{n: t.double() for n, t in x.items()}, backend="torch")
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = gated_linear_attention(**x, backend="triton")
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = gated_linear_attention(**x, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    err = lambda out: ((out.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(ieee) < 1e-5
    assert not torch.equal(ieee, tf32) and err(tf32) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bi", "causal-state"])
def test_cuda_graph_capture_and_no_host_sync(mode):
    """Forward and backward capture into a CUDA graph (no host synchronisation inside the
    op: sync debug mode raises on any) and replay on new inputs."""
    case = Case(2, 150, 3, 32, 64, torch.bfloat16, bidirectional=mode == "bi", states=mode != "bi")
    kwargs = {"bidirectional": case.bidirectional, "backend": "triton"}
    if case.states:
        kwargs["output_final_state"] = True
    static = {n: t.clone().requires_grad_() for n, t in make_inputs(case, "cuda", seed=1).items()}
    grad = torch.randn(case.B, case.T, case.H, case.V, device="cuda", dtype=case.dtype)

    def step():
        out = gated_linear_attention(**static, **kwargs)
        o = out[0] if isinstance(out, tuple) else out
        loss = (o.float() * grad.float()).sum() + (out[1].sum() if isinstance(out, tuple) else 0)
        grads = torch.autograd.grad(loss, list(static.values()))
        return o, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and allocate outside the capture
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_static, grads_static = step()
    fresh = make_inputs(case, "cuda", seed=2)
    with torch.no_grad():
        for name, tensor in static.items():
            tensor.copy_(fresh[name])
    graph.replay()
    o_eager, grads_eager = step()
    assert torch.equal(o_static, o_eager)
    for name, a, b in zip(static, grads_static, grads_eager):
        assert torch.equal(a, b), name


def _inputs_past_2_31():
    """Inputs whose q has more than 2^31 elements (2^31 + 3072), 20 GiB in all, and the slice
    of their last three sequences."""
    B, T, H, K, V = 2**21 + 3, 64, 1, 16, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = {n: torch.randn(B, T, H, K if n != "v" else V, device="cuda", dtype=torch.bfloat16, generator=gen)
         for n in ("q", "k", "v")}
    for n in ("g", "g_reverse"):
        x[n] = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda", generator=gen)).to(torch.bfloat16)
    assert x["q"].numel() > 2**31
    return x, slice(B - 3, B)


def _needs_free_gpu_memory(gib):
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs about {gib} GiB of free GPU memory")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("park_all_per_sm", [0, 10**9], ids=["meeting", "parked"])
def test_64bit_offsets_forward(park_all_per_sm):
    """The last sequences of inputs past 2^31 elements come out exactly as when run alone
    (index arithmetic past 2^31 is 64-bit), with the directions' parts meeting in the middle
    of the walks (the default) or parked and summed by a second launch (the three sequences
    alone take the small-grid launches)."""
    _needs_free_gpu_memory(45)
    x, tail = _inputs_past_2_31()
    with torch.no_grad():
        with _launch().override_config(single_pass_park_all_per_sm=park_all_per_sm):
            full = gated_linear_attention(**x, backend="triton")[tail]
        alone = gated_linear_attention(**{n: t[tail] for n, t in x.items()}, backend="triton")
    assert torch.equal(full, alone)


@pytest.mark.gpu
@pytest.mark.slow
def test_64bit_offsets_within_a_chunk():
    """A chunk whose rows span more than 2^31 elements (16 rows x 1.2 M heads x K = 128) gives
    its last heads exactly as when they run alone: the forward's offsets within a chunk are
    64-bit there (``launch._chunk_rows_need_64bit``; 32-bit below)."""
    _needs_free_gpu_memory(28)
    B, T, H, K, V = 1, 16, 1_200_000, 128, 16
    assert _launch()._chunk_rows_need_64bit(16, H, K, V) and 15 * H * K >= 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = {n: torch.randn(B, T, H, V if n == "v" else K, device="cuda", dtype=torch.bfloat16, generator=gen)
         for n in ("q", "k", "v")}
    for n in ("g", "g_reverse"):
        x[n] = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda", generator=gen)).to(torch.bfloat16)
    tail = slice(H - 3, H)
    with torch.no_grad():
        full = gated_linear_attention(**x, backend="triton")[:, :, tail]
        alone = gated_linear_attention(**{n: t[:, :, tail].contiguous() for n, t in x.items()}, backend="triton")
    assert torch.equal(full, alone)


@pytest.mark.gpu
def test_bfloat16_split_in_ptx_is_the_portable_split():
    """The kernels' float32 -> (hi, lo) bfloat16 split in inline PTX (``kernels._split_bf16``,
    on NVIDIA GPUs) gives the bits of ``hi = bf16(x)``, ``lo = bf16(x - hi)`` as PyTorch
    rounds them, for values across the float32 range, ties, subnormals, zeros, infinities
    and NaN (NaN gives NaN in both parts)."""
    import triton
    import triton.language as tl

    from glakernels.backends.triton import kernels

    assert kernels._SPLIT_IN_PTX  # (on an NVIDIA GPU without the interpreter)

    @triton.jit
    def split(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        hi, lo = kernels._split_bf16_ptx(tl.load(x_ptr + i))
        tl.store(hi_ptr + i, hi)
        tl.store(lo_ptr + i, lo)

    gen = torch.Generator(device="cuda").manual_seed(0)
    n = 1 << 16
    x = torch.randn(n, device="cuda", generator=gen) * torch.exp2(torch.randint(-140, 128, (n,), device="cuda",
                                                                               generator=gen).float())
    special = torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, -(1.0 + 2**-9), 2**-149, 2**-130,
                            -(2**-127), 3.3895e38, 3.3961e38, 3.4028e38, float("inf"), float("-inf"), float("nan")],
                           device="cuda")
    x[: special.numel()] = special
    hi, lo = torch.empty(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16)
    split[(1,)](x, hi, lo, N=n)
    want_hi = x.to(torch.bfloat16)
    want_lo = (x - want_hi.float()).to(torch.bfloat16)
    for got, want in ((hi, want_hi), (lo, want_lo)):
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


# GPU memory each backward needs at this size: inputs, gradients and the output gradient
# (44 GiB) plus the two-phase kernel's scratch (24 GiB), or the single-pass kernel's scratch
# and parked dq/dk/dv parts (64 GiB: an H200, not an 80 GB H100)
BACKWARD_64BIT = {"two-phase": (dict(single_pass_backward=False), 72), "single-pass": ({}, 112)}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("kernel", list(BACKWARD_64BIT))
def test_64bit_offsets_backward(kernel):
    """The gradients of the last sequences of inputs past 2^31 elements are exactly those of
    the same sequences run alone."""
    fields, gib = BACKWARD_64BIT[kernel]
    _needs_free_gpu_memory(gib)
    x, tail = _inputs_past_2_31()
    small = {n: t[tail].detach().clone().requires_grad_() for n, t in x.items()}
    with _launch().override_config(**fields):
        leaves = {n: t.requires_grad_() for n, t in x.items()}
        gated_linear_attention(**leaves, backend="triton")[tail].float().sum().backward()
        tail_grads = {n: t.grad[tail].clone() for n, t in leaves.items()}
        del leaves, x
        gated_linear_attention(**small, backend="triton").float().sum().backward()
    for name, tensor in small.items():
        assert torch.equal(tensor.grad, tail_grads[name]), name


def test_config_overrides_reach_other_threads():
    """On CUDA autograd runs the backward on its own thread: an override opened around a
    forward and backward must hold there too, else tests and benchmarks would time or check
    the defaults in the backward while believing they ran a variant."""
    import threading

    launch = _launch()
    seen = {}
    with launch.override_config(single_pass_segment=64):
        worker = threading.Thread(target=lambda: seen.update(cfg=launch.choose_config(1000, 32, 64)))
        worker.start()
        worker.join()
    assert seen["cfg"].single_pass_segment == 64
    assert launch.choose_config(1000, 32, 64).single_pass_segment != 64


@pytest.mark.parametrize("fields, named", [
    (dict(single_pass_segment=96), "single_pass_segment=96"),  # not a power of two
    (dict(single_pass_segment=8), "single_pass_segment=8"),  # shorter than a chunk
    (dict(states_step=48), "states_step=48"),
    (dict(segment=48), "segment=48"),
    (dict(half_dots="fp8"), "half_dots='fp8'"),
])
def test_invalid_segment_configs_are_refused(fields, named):
    """Segment lengths the kernels cannot tile, and unknown matmul modes, are refused with the
    field's name, before any kernel is compiled."""
    launch = _launch()
    with launch.override_config(**fields), pytest.raises(ValueError, match=named):
        launch.choose_config(1000, 32, 64)
