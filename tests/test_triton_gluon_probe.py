"""benchmarks/triton_gluon_layout_probe.py on a CPU-only machine: it compiles ahead of time, and
what backends/triton/NOTES.md (session 24) says of Gluon still holds for this Triton — chained
tensor-core products reuse an accumulator as the next operand without shared memory or
barriers, where ``tl`` stages operands through shared memory."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton.experimental.gluon.language.nvidia.ampere", reason="this Triton has no Gluon mma_v2")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "triton_gluon_layout_probe.py"


def test_gluon_chains_keep_operands_in_registers():
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {}
    for line in run.stdout.splitlines():
        fields = line.split()
        if len(fields) == 10 and fields[0] in ("gluon", "tl"):
            rows[fields[0], fields[1]] = dict(zip(("all", "mma", "st.shared", "ld.shared", "ldmatrix", "bar", "shfl",
                                                   "prmt"), map(int, fields[2:])))
    assert len(rows) == 6, run.stdout
    for chain in ("acc->A", "acc^T->B", "acc->B"):
        gluon = rows["gluon", chain]
        assert gluon["mma"] == 4 and gluon["st.shared"] == gluon["ld.shared"] == gluon["bar"] == 0, (chain, gluon)
        assert rows["tl", chain]["st.shared"] > 0, (chain, rows["tl", chain])  # what Gluon's layouts avoid
    assert rows["gluon", "acc->A"]["all"] == rows["gluon", "acc^T->B"]["all"]  # both conversions are free
