"""``benchmarks/ncu_summary.py`` on CSV pages laid out as Nsight Compute 2025.3 writes them
(no GPU needed): kernels, stall reasons in order, where the samples fall."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("ncu_summary", ROOT / "benchmarks" / "ncu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RAW = '''==PROF== Connected to process 1
"ID","Kernel Name","gpu__time_duration.sum","launch__grid_size","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_membar_per_issue_active.ratio","smsp__average_warps_issue_stalled_drain_per_issue_active.ratio"
"","","us","","inst","inst","inst"
"0","fill","2.4","10","0.5","0","0.01"
"1","walk","57.6","1,536","1.25","1.68","0.02"
'''

SOURCE = '''"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","stall_wait","stall_wait (Not Issued)","stall_membar"
"0","LDC R1, c[0x0][0x28]","0","0","0","0","0"
"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","stall_wait","stall_wait (Not Issued)","stall_membar"
"0","HMMA.16816.F32.BF16 R52, R60, R18, RZ","10","4","10","4","0"
"1","@P5   ERRBAR","30","20","1","1","29"
"2","FADD R9, R125, R9","5","5","5","5","0"
'''


def test_raw_page_kernels_and_stalls_in_order(tmp_path):
    path = tmp_path / "raw_tl_bi.csv"
    path.write_text(RAW)
    lines = _module().raw_summary(path)
    walk = lines.index("raw_tl_bi.csv :: walk")
    assert lines[walk + 1] == "  time: 57.6 us" and lines[walk + 2] == "  grid: 1,536"
    # largest first; a term under 0.05 left out
    assert lines[walk + 3].endswith("membar 1.68, wait 1.25")
    assert lines[1:4] != lines[walk + 1:walk + 4]


def test_source_page_samples_by_reason_opcode_and_line(tmp_path):
    path = tmp_path / "src_tl_bi.csv"
    path.write_text(SOURCE)
    lines = _module().source_summary(path, top=2)
    # the kernel with no samples (the first block) is left out
    assert lines[0] == "src_tl_bi.csv: 3 SASS lines, 45 samples"
    assert lines[1] == "  by reason: stall_membar 29, stall_wait 16"
    assert lines[2] == "  by opcode: ERRBAR 30, HMMA 10, FADD 5"  # (a predicate is not an opcode)
    assert len(lines) == 5 and "ERRBAR" in lines[4] and "HMMA" in lines[3]  # the two busiest, in code order
