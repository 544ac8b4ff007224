"""Compile the single-pass Triton kernels for a GPU target without a GPU and count what one
chunk step costs: registers and spills (ptxas), and the PTX instructions inside each loop,
by opcode.

    python benchmarks/triton_aot_counts.py [--kernel fwd|bwd|bwd2] [--k 32] [--v 64]
        [--dtype bf16] [--precision bf16x3|bf16] [--module glakernels.backends.triton.kernels_single_pass]
        [--arch 90] [--sass] [--config "FIELD=VALUE,..."]

Why: on the GPU these kernels are bound by the instruction count of a chunk step (NOTES.md
session 8), and this counts it in seconds on a CPU-only machine; ``--module`` takes an edited
copy of the kernel module (saved in ``backends/triton/``: it imports its helpers relatively,
and not while a test run is reading the kernels), so a variant can be judged before it costs
device time.

The compile gets the specialisation a real launch gets: pointer arguments 16-byte aligned,
and the integer arguments (T, H, K, V) marked divisible by 16 where the shape's values are.
Without that mark the JIT would not have, here, the loads come out scalar (one 2-byte load
per element) and the counts overstate the real kernel (sessions 5-7 compared such counts).
Launch settings (chunk, warps, register cap, tiles) are ``launch.choose_config``'s for the shape.

A loop's count is the PTX of the blocks LLVM marks as inside it ("in Loop: Header=..."): for
the forward the two directions' walks; for the backward pass A and pass B of each direction;
each of them twice, once per chunk math (tell them apart by their ``mma`` counts: the
hierarchy's has more than the ratio's; ``kernels_single_pass``' docstring).
PTX is not SASS — ptxas removes most ``mov``s and splits some operations — so use the counts
to compare variants, not as cycle counts; ``--sass`` also counts each loop of the compiled
machine code (``sass_loop_counts``), which tracked GPU time better in session 20.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argument kinds by name: the dtype of the inputs (and their gradients), float32 scratch and
# states, the int32 counters; every other non-constexpr argument is an integer, ``scale`` a float
INPUTS = {"q", "k", "v", "g", "gr", "o", "do", "dq", "dk", "dv", "dg", "dgr"}
FLOAT32 = {"part", "h0", "ht", "bstates", "dht", "dh0", "scratch", "parts"}
INT32_POINTERS = {"flags"}


def kernel_launches(kind: str, module: str | None, t: int, k: int, v: int, precision: str) -> list:
    """``(label, JIT function, constexprs, compile options)`` of each launch, as ``launch``
    makes them (its config for this shape) for one segment of a bidirectional call without
    states: the forward is one launch, the backward two (pass A, then pass B) or one."""
    from glakernels.backends.triton import launch

    cfg = launch.choose_config(t, k, v)
    if kind == "bwd2":  # the two-phase backward (kernels._gla_bwd_kernel), as launch makes it
        mod = importlib.import_module(module or "glakernels.backends.triton.kernels")
        nseg = -(-t // cfg.segment)
        consts = dict(C=cfg.chunk, LOG2C=cfg.chunk.bit_length() - 1, BK=cfg.block_k, BV=cfg.block_v,
                      NKB=-(-k // cfg.block_k), NVB=-(-v // cfg.block_v), BIDIR=True, HAS_H0=False, HAS_DHT=False,
                      STORE_DH0=False, HAS_BSTATES=nseg > 1, ONE_CHUNK=nseg > 1 and cfg.segment == cfg.chunk,
                      DOT_BF16=precision in ("bf16", "bf16x3"), PRECISION=precision, RATIO=cfg.two_phase_bwd_ratio)
        return [("bwd2", mod._gla_bwd_kernel, consts, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))]
    if kind == "fwd":
        mod = importlib.import_module(module or "glakernels.backends.triton.kernels_single_pass")
        fn = mod._gla_fwd_single_pass_kernel
        chunk = cfg.single_pass_chunk
        consts = dict(BV=cfg.single_pass_block_v, STORE_HT=False, HAS_H0=False, WIDE_ROWS=False,
                      RATIO=launch._ratio_mode(cfg.single_pass_ratio, cfg), PARK_ALL=False,
                      MEET=cfg.single_pass_meet, SPIN=cfg.single_pass_meet_spin)
        options = dict(num_warps=cfg.single_pass_num_warps, num_stages=cfg.single_pass_num_stages)
        if cfg.single_pass_maxnreg is not None:
            options["maxnreg"] = cfg.single_pass_maxnreg
        launches = [("fwd", consts, options)]
    else:
        mod = importlib.import_module(module or "glakernels.backends.triton.kernels_single_pass_bwd")
        fn = mod._gla_bwd_single_pass_kernel
        chunk = cfg.single_pass_bwd_chunk
        consts = dict(BV=launch._pow2(max(16, v)), HAS_H0=False, HAS_DHT=False, STORE_DH0=False,
                      RATIO=launch._ratio_mode(cfg.single_pass_bwd_ratio, cfg), MEET=cfg.single_pass_meet,
                      SPIN=cfg.single_pass_meet_spin, PREFETCH_A=cfg.single_pass_bwd_pass_a_prefetch)
        options = dict(num_warps=cfg.single_pass_bwd_num_warps, num_stages=1)
        if cfg.single_pass_bwd_maxnreg is not None:
            options["maxnreg"] = cfg.single_pass_bwd_maxnreg
        if cfg.single_pass_bwd_split:  # as launch._backward_single_pass: pass A's launch has no cap
            launches = [("bwd pass A", dict(consts, PASSES=1),
                         dict(num_warps=cfg.single_pass_bwd_pass_a_num_warps, num_stages=1)),
                        ("bwd pass B", dict(consts, PASSES=2), options)]
        else:
            launches = [("bwd", dict(consts, PASSES=3), options)]
    common = dict(C=chunk, LOG2C=chunk.bit_length() - 1, BK=launch._pow2(max(16, k)), BIDIR=True,
                  HAS_BSTATES=False, DOT_BF16=precision in ("bf16", "bf16x3"), PRECISION=precision)
    return [(label, fn, {**c, **common}, o) for label, c, o in launches]


def compile_asm(fn, consts: dict, options: dict, dtype: str, shape: dict, arch: int) -> dict:
    """The launch's compiled forms by stage (``ptx``, ``cubin``, ...), as Triton returns them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in INPUTS or name in FLOAT32 or name in INT32_POINTERS:
            signature[name] = "*" + (dtype if name in INPUTS else "fp32" if name in FLOAT32 else "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if shape.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm


def ptxas_report(ptx: str, arch: int) -> str:
    """Registers and spill bytes from the first ptxas that takes this PTX: Triton's bundled
    ones, then the one on PATH. A newer Triton can emit a PTX ISA version that none of them
    knows (Triton 3.9: 9.4, against 8.8 bundled and 9.0 in CUDA 13.0); the PTX is then
    retried under the version the ptxas names as its own, which these kernels' instructions
    do not exceed (the report says so when it happens)."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    candidates = sorted(glob.glob(os.path.join(bundled, "ptxas*")))
    if shutil.which("ptxas"):
        candidates.append(shutil.which("ptxas"))
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        for ptxas in candidates:
            note = ""
            run = _ptxas(ptxas, arch, suffix, path, tmp)
            known = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", run.stderr)
            if run.returncode != 0 and known:
                with open(path, "w") as fh:
                    fh.write(re.sub(r"^\.version [\d.]+", f".version {known.group(1)}", ptx, count=1, flags=re.M))
                run = _ptxas(ptxas, arch, suffix, path, tmp)
                note = f", PTX retried as ISA {known.group(1)}"
            if run.returncode == 0:
                regs = re.findall(r"Used (\d+) registers", run.stderr)
                spills = re.findall(r"(\d+) bytes spill stores", run.stderr)
                return (f"registers {','.join(regs)}, spill stores {','.join(spills)} bytes "
                        f"({os.path.basename(ptxas)}{note})")
            with open(path, "w") as fh:
                fh.write(ptx)
    return "(no ptxas here takes this PTX: registers unknown)"


def _ptxas(ptxas: str, arch: int, suffix: str, path: str, tmp: str) -> subprocess.CompletedProcess:
    return subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                          capture_output=True, text=True)


def loop_counts(ptx: str) -> dict[str, Counter]:
    """Opcode counts of each loop's blocks, keyed by the loop header's label."""
    loops: dict[str, Counter] = {}
    current = None
    for line in ptx.splitlines():
        text = line.strip()
        label = re.match(r"^\$(L__BB\w+):\s*(//.*)?$", text)
        if label:
            comment = label.group(2) or ""
            header = re.search(r"Header=(BB\w+)", comment)
            current = "L__" + header.group(1) if header else (label.group(1) if "Loop Header" in comment else None)
            continue
        if line.startswith("}"):  # a function's end (inline asm's braces are indented)
            current = None
        if current and line[:1].isspace():
            # one statement a line, except inline asm written on one line: "{ .reg ...; a; L: b; }"
            for statement in text.split("//")[0].strip("{} ").split(";"):
                statement = re.sub(r"^\s*\w+:", "", statement).strip()  # a local label
                if re.match(r"^[@a-z]", statement):
                    words = statement.split()
                    opcode = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
                    loops.setdefault(current, Counter())[opcode] += 1
    return loops


def sass_loop_counts(cubin: bytes) -> dict[str, Counter]:
    """Opcode counts of each loop of the machine code (SASS, from the cuobjdump that ships with
    Triton), keyed by the loop's address range: a loop is the span from a branch target back
    to the branch that jumps there. What runs, unlike PTX: ptxas drops most moves, and where
    PTX and SASS disagreed on a change, GPU time followed SASS (session 20: the state as an
    accumulator cut the forward step's PTX by 12 %, its SASS by 6 %, its time by ~5 %).
    ``STL``/``LDL`` are register spills and their reloads. The cubin is this machine's Triton
    and ptxas's; a GPU host with another Triton (3.6 on the device image) compiles within a
    few percent of it, so compare variants here, not counts across machines."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or tool
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    code = []  # (address, opcode, branch target or None)
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", line)
        if m:
            target = re.search(r"0x([0-9a-f]+)", m.group(3)) if m.group(2) == "BRA" else None
            code.append((int(m.group(1), 16), m.group(2), int(target.group(1), 16) if target else None))
    loops = {}
    for addr, _, target in code:
        if target is not None and target < addr:
            loops[f"0x{target:x}-0x{addr:x}"] = Counter(op for a, op, _ in code if target <= a <= addr)
    return loops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=["fwd", "bwd", "bwd2"], default="fwd",
                        help="the single-pass forward or backward, or the two-phase backward (K or V > 64)")
    parser.add_argument("--module", help="the module with the kernel: an edited copy saved beside the original "
                        "(its relative imports), e.g. glakernels.backends.triton.variant")
    parser.add_argument("--k", type=int, default=32, help="head dim K (ViG-T: 32)")
    parser.add_argument("--v", type=int, default=64, help="head dim V (ViG-T: 64)")
    parser.add_argument("--t", type=int, default=196, help="sequence length (only its divisibility matters)")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--precision", default="bf16x3", choices=["bf16x3", "bf16", "ieee", "tf32", "tf32x3"],
                        help="the dots' mode (launch._dot_mode): bf16x3 / bf16 for 16-bit inputs by default / under "
                        "'medium'; ieee (or tf32) for float32 inputs")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--top", type=int, default=12, help="opcodes listed per loop")
    parser.add_argument("--ptx", help="also write the PTX to this file")
    parser.add_argument("--sass", action="store_true",
                        help="count each loop's machine code (SASS) too: what runs; PTX overstates moves")
    parser.add_argument("--config", default="",
                        help="launch.Config fields to override (as override_config), e.g. "
                        "'single_pass_meet=False,single_pass_bwd_pass_a_prefetch=False'")
    args = parser.parse_args(argv)
    # compiled, not interpreted: the kernels are decorated at their first import, below
    os.environ.pop("TRITON_INTERPRET", None)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if args.kernel == "bwd2" and args.sass:  # (cuobjdump shows its warp-collective branches as loops too)
        parser.error("--sass: the two-phase backward's machine code has branches the loop finder takes for loops")
    if args.kernel != "bwd2" and (args.k > 64 or args.v > 64):
        parser.error("--k and --v: the single-pass settings are counted for K, V <= 64 (--kernel bwd2: any)")
    shape = dict(T=args.t, H=args.heads, K=args.k, V=args.v)
    from glakernels.backends.triton import launch

    try:
        fields = launch.config_fields(args.config)
    except ValueError as e:
        parser.error(f"--config: {e}")
    ptxs = []
    with launch.override_config(**fields):
        launches = kernel_launches(args.kernel, args.module, args.t, args.k, args.v, args.precision)
    for label, fn, consts, options in launches:
        asm = compile_asm(fn, consts, options, args.dtype, shape, args.arch)
        ptx = asm["ptx"]
        ptxs.append(ptx)
        print(f"{label} {args.module or 'default module'}, sm_{args.arch}, {args.dtype}, {args.precision}, "
              f"K={args.k} V={args.v}, {options}: {ptxas_report(ptx, args.arch)}")
        loops = loop_counts(ptx)
        if not loops:
            print("no loops found in the PTX (did LLVM's block comments change?)")
            return 1
        for name, ops in loops.items():
            top = " ".join(f"{op}:{n}" for op, n in ops.most_common(args.top))
            print(f"loop {name}: {sum(ops.values())} instructions; {top}")
        if args.sass:
            for name, ops in sass_loop_counts(asm["cubin"]).items():
                top = " ".join(f"{op}:{n}" for op, n in ops.most_common(args.top))
                print(f"sass loop {name}: {sum(ops.values())} instructions, spills STL {ops['STL']} LDL {ops['LDL']}; "
                      f"{top}")
    if args.ptx:  # the launches' PTX one after the other
        with open(args.ptx, "w") as fh:
            fh.write("\n".join(ptxs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
