"""Short tables from Nsight Compute's CSV pages (``benchmarks/ncu_op_call.py`` says how to make
them): for each ``raw_*.csv`` (``--page raw --csv``) every kernel's time, launch, occupancy,
issue rate and stall reasons; for each ``src_*.csv`` (``--page source --csv --print-source
sass``) where each kernel's warp-state samples fall: by stall reason, by opcode, and the SASS
lines with the most samples.

    python benchmarks/ncu_summary.py DIR [--top 25]

Stall reasons are ncu's ``smsp__average_warps_issue_stalled_<reason>_per_issue_active``: cycles
a warp spends stalled for that reason per instruction issued (terms under 0.05 are left out).
"""

from __future__ import annotations

import argparse
import csv
import io
import pathlib
import re
from collections import Counter

METRICS = {
    "gpu__time_duration.sum": "time",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
    "launch__registers_per_thread": "registers",
    "launch__occupancy_limit_registers": "blocks/SM (registers)",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "warps active %",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue busy %",
    "smsp__inst_executed.sum": "instructions",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles / instruction",
    "lts__t_sector_hit_rate.pct": "L2 hit %",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum": "smem bank conflicts",
}
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def read_csv(path: pathlib.Path) -> list[list[str]]:
    """The CSV rows of an ncu page (its ``==PROF==`` lines left out)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith("==")]
    return list(csv.reader(io.StringIO("\n".join(lines))))


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def raw_summary(path: pathlib.Path) -> list[str]:
    """One block per kernel of a raw page: the metrics above, then the stall reasons."""
    rows = read_csv(path)
    if len(rows) < 3:
        return [f"{path.name}: no kernels"]
    head, units = rows[0], rows[1]
    out = []
    for row in rows[2:]:
        cells = dict(zip(head, row))
        out.append(f"{path.name} :: {cells.get('Kernel Name', '?')[:90]}")
        for metric, label in METRICS.items():
            if metric in cells:
                unit = units[head.index(metric)]
                out.append(f"  {label}: {cells[metric]} {unit}".rstrip())
        stalls = [(m.group(1), number(cells[name])) for name in head for m in [STALL.match(name)] if m]
        stalls = sorted(((r, v) for r, v in stalls if v is not None and v >= 0.05), key=lambda rv: -rv[1])
        out.append("  stalls (cycles per issued instruction): " + ", ".join(f"{r} {v:.2f}" for r, v in stalls))
    return out


def source_blocks(rows: list[list[str]]) -> list[list[list[str]]]:
    """A source page holds one block per kernel, each starting with its own header row."""
    blocks = []
    for row in rows:
        if "Source" in row and any("Address" in cell for cell in row):
            blocks.append([row])
        elif blocks and row:
            blocks[-1].append(row)
    return blocks


def source_summary(path: pathlib.Path, top: int) -> list[str]:
    """Per kernel of a source page: samples by reason and opcode, and the busiest SASS lines."""
    out = []
    for block in source_blocks(read_csv(path)):
        head, body = block[0], block[1:]
        samples = next((i for i, h in enumerate(head) if h.startswith("Warp Stall Sampling (All")), None)
        if samples is None:
            out.append(f"{path.name}: no sampling column")
            continue
        src = head.index("Source")
        reasons = [i for i, h in enumerate(head) if h.startswith("stall_") and "Not Issued" not in h]

        def cell(row, i):
            return (number(row[i]) if i < len(row) else None) or 0.0

        total = sum(cell(r, samples) for r in body)
        if total == 0:
            continue  # (a kernel too short to be sampled, e.g. the counters' fill)
        by_reason = Counter({head[i]: sum(cell(r, i) for r in body) for i in reasons})
        by_op = Counter()
        for row in body:
            words = [w for w in (row[src].split() if src < len(row) else []) if not w.startswith("@")]
            by_op[words[0].split(".")[0] if words else "?"] += cell(row, samples)
        out.append(f"{path.name}: {len(body)} SASS lines, {total:.0f} samples")
        out.append("  by reason: " + ", ".join(f"{k} {v:.0f}" for k, v in by_reason.most_common(10) if v))
        out.append("  by opcode: " + ", ".join(f"{k} {v:.0f}" for k, v in by_op.most_common(14) if v))
        busiest = sorted(range(len(body)), key=lambda j: -cell(body[j], samples))[:top]
        for j in sorted(busiest):
            row = body[j]
            top3 = sorted(((head[i], cell(row, i)) for i in reasons if cell(row, i)), key=lambda kv: -kv[1])[:3]
            out.append(f"  {j:5d} {cell(row, samples):6.0f}  {row[src][:60]:<60} "
                       + ", ".join(f"{k} {v:.0f}" for k, v in top3))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--top", type=int, default=25, help="SASS lines listed per kernel")
    args = parser.parse_args(argv)
    lines = []
    for path in sorted(args.dir.glob("raw_*.csv")):
        lines += raw_summary(path)
    for path in sorted(args.dir.glob("src_*.csv")):
        lines += source_summary(path, args.top)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
