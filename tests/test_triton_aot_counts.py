"""The ahead-of-time instruction counter (benchmarks/triton_aot_counts.py) on a CPU-only
machine: it must compile the kernels the way a launch does, and find their chunk loops."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
if not hasattr(compiler, "ASTSource"):
    pytest.skip("this Triton has no triton.compiler.ASTSource", allow_module_level=True)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "triton_aot_counts.py"


def _run(tmp_path, *args):
    """The script in its own process (this one runs Triton interpreted); its report and PTX."""
    ptx = tmp_path / "k.ptx"
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--ptx", str(ptx), *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, ptx.read_text()


def test_forward_loads_are_vectorised_as_in_a_launch(tmp_path):
    """K and V divisible by 16 are marked so, as the JIT marks them: the tiles load 16 bytes
    at a time. Without the mark every element is a 2-byte load (what sessions 5-7 counted)."""
    _, ptx = _run(tmp_path)
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx)
    assert not re.search(r"ld\.global\.b16", ptx)
    # an odd K and V get no mark, and their loads are scalar: the mark makes the difference
    _, ptx = _run(tmp_path, "--k", "17", "--v", "17")
    assert re.search(r"ld\.global(\.\w+)*\.b16", ptx)


@pytest.mark.parametrize("kind, n_loops", [("fwd", 4), ("bwd", 8)])
def test_finds_each_directions_chunk_loops(tmp_path, kind, n_loops):
    """Forward: one walk per direction and chunk math (the ratio's and the hierarchy's, see
    ``kernels_single_pass``); backward: pass A and pass B per direction and chunk math. Every
    walk does tensor-core work; the other loops (the directions' meeting's tail, which adds
    parked parts, one per direction) do none and are not walks."""
    report, _ = _run(tmp_path, "--kernel", kind, "--top", "40")
    loops = re.findall(r"^loop \S+: (\d+) instructions; (.*)$", report, re.M)
    walks = [(int(total), int(mma.group(1))) for total, ops in loops for mma in [re.search(r"\bmma:(\d+)", ops)]
             if mma]
    assert len(walks) == n_loops, report
    assert len(loops) - len(walks) <= 2, report
    for total, mma in walks:
        assert total > 100 and mma > 0, report


def test_counts_the_machine_code_of_each_walk(tmp_path):
    """``--sass``: the cubin's loops, from Triton's own cuobjdump: the forward's four walks
    (two directions, two chunk maths) each with tensor-core instructions (HMMA) in the loop,
    and the gate pre-pass loops without."""
    report, _ = _run(tmp_path, "--sass", "--top", "60")
    loops = re.findall(r"^sass loop \S+: (\d+) instructions, spills STL (\d+) LDL (\d+); (.*)$", report, re.M)
    walks = [(int(total), ops) for total, _, _, ops in loops if re.search(r"\bHMMA:\d+", ops)]
    assert len(walks) == 4, report
    assert all(total > 500 for total, _ in walks), report
    assert any("HMMA" not in ops for _, _, _, ops in loops), report


def test_counts_the_two_phase_backward(tmp_path):
    """``--kernel bwd2``: the two-phase backward (K or V > 64) at lm_4k's shape compiles as
    ``launch`` launches it, and its chunk loops do tensor-core work."""
    report, _ = _run(tmp_path, "--kernel", "bwd2", "--t", "4096", "--k", "128", "--v", "128", "--heads", "8")
    loops = re.findall(r"^loop \S+: (\d+) instructions; (.*)$", report, re.M)
    assert sum(bool(re.search(r"\bmma:\d+", ops)) for _, ops in loops) >= 2, report


def test_config_overrides_reach_the_launch(tmp_path):
    """``--config`` sets launch.Config fields as ``override_config`` does: with the forward's
    register cap lifted, the compile options it reports carry none; a field Config lacks is
    refused by name."""
    report, _ = _run(tmp_path)
    assert "'maxnreg': 168" in report, report
    report, _ = _run(tmp_path, "--config", "single_pass_maxnreg=None")
    assert "maxnreg" not in report, report
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--config", "no_such_field=1"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode != 0 and "no_such_field" in run.stderr, run.stderr[-2000:]


def test_counts_each_statement_of_inline_asm_on_one_line():
    """Inline PTX is written on one line (``kernels.one_line_ptx``, for torch.compile): each
    of its statements counts, labels and ``.reg`` declarations do not, and the loop ends at
    the function's closing brace."""
    spec = importlib.util.spec_from_file_location("triton_aot_counts", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ptx = "\n".join([
        "$L__BB0_3:                              // =>This Inner Loop Header: Depth=1",
        "\tmov.u32 \t%r1, 0;",
        "\t{ .reg .pred p; POLL: ld.acquire.gpu.global.b32 %r2, [%rd1]; setp.ne.u32 p, %r2, 1; @p bra DONE; DONE: }",
        "\t@%p1 bra \t$L__BB0_3;  // back; to the header",
        "}",
        "\tadd.s32 \t%r3, %r3, 1;",
    ])
    assert script.loop_counts(ptx) == {"L__BB0_3": {"mov": 1, "ld": 1, "setp": 1, "bra": 2}}
