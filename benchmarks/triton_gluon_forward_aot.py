"""Compile the Gluon forward (``backends/triton/kernels_gluon_forward.py``) ahead of time for
sm_90 in the variants the launcher asks for, and print registers, spills and the SASS of its
chunk loops (no GPU needed; ``cuobjdump`` from Triton's wheel).

    python benchmarks/triton_gluon_forward_aot.py [--variants "BK=32,BV=32;BK=32,BV=32,IS_F16=True"]

A variant is the kernel's constexprs and ``maxnreg`` (defaults: BK=32, BV=32, bidirectional bfloat16, the
directions meeting once in the middle, no states). Columns: registers, stack bytes (spills), SASS
instructions in all, and per chunk step of the largest loop (the forward walk's chunk loop,
with its exact path; the reverse walk's is the same size), its tensor-core products (HMMA)
and shared-memory stores (STS: the exact path's operands) and barriers (BAR).
"""

from __future__ import annotations

import argparse
import ast
import collections
import pathlib
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

try:  # Triton 3.9 exports it; 3.6 keeps it in the runtime module
    from triton.experimental.gluon import GluonASTSource
except ImportError:
    from triton.experimental.gluon._runtime import GluonASTSource

from glakernels.backends.triton.kernels_gluon_forward import _gla_fwd_gluon_kernel

DEFAULTS = dict(BK=32, BV=32, BIDIR=True, HAS_H0=False, STORE_HT=False, HAS_BSTATES=False, PARK_ALL=False,
                IS_F16=False, MEET=True, SPIN=64)
POINTERS = ("q", "k", "v", "g", "gr", "o", "part", "flags", "h0", "ht", "bstates")


def compile_variant(maxnreg=None, **constexprs):
    """The kernel for sm_90 with these constexprs (and register cap), pointers and K, V marked
    16-divisible as the JIT specialises ViG's calls."""
    consts = {**DEFAULTS, **constexprs}
    dtype = "fp16" if consts["IS_F16"] else "bf16"
    signature = {n: f"*{dtype}" for n in POINTERS[:6]}
    signature.update(part="*fp32", flags="*i32", h0="*fp32", ht="*fp32", bstates="*fp32", T="i32", H="i32",
                     K="i32", V="i32", scale="fp32", SEG_CHUNKS="i32")
    signature.update({name: "constexpr" for name in consts})
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS + ("K", "V")}
    source = GluonASTSource(fn=_gla_fwd_gluon_kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, maxnreg=maxnreg))


def sass_summary(cubin: bytes) -> dict:
    """Registers, stack, SASS instructions in all and in the largest loop (and its mix)."""
    tools = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    lines = [(int(m.group(1), 16), m.group(2)) for line in sass.splitlines()
             for m in [re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)] if m]
    loops = []
    for addr, text in lines:  # backward branches: (span, start, end)
        m = re.search(r"BRA\s+.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append(((addr - int(m.group(1), 16)) // 16 + 1, int(m.group(1), 16), addr))
    _, lo, hi = max(loops) if loops else (0, 0, -1)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                              for addr, text in lines if lo <= addr <= hi)
    return dict(regs=regs, stack=stack, sass=len(lines), loop=sum(ops.values()), ops=ops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="BV=32;BV=64;BV=32,IS_F16=True;BV=32,BIDIR=False;"
                        "BV=32,PARK_ALL=True,HAS_BSTATES=True;BK=16,BV=16,BIDIR=False,HAS_H0=True,STORE_HT=True")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_90, one warp a program")
    print(f"{'variant':<48} {'regs':>4} {'stack':>5} {'sass':>5} {'loop':>5} {'HMMA':>5} {'STS':>4} {'BAR':>4}")
    for text in args.variants.split(";"):
        fields = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, value = item.split("=")
            fields[name.strip()] = ast.literal_eval(value.strip())
        s = sass_summary(compile_variant(**fields).asm["cubin"])
        print(f"{text or '(defaults)':<48} {s['regs']:>4} {s['stack']:>5} {s['sass']:>5} {s['loop']:>5} "
              f"{s['ops']['HMMA']:>5} {s['ops']['STS']:>4} {s['ops']['BAR']:>4}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
