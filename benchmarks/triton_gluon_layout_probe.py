"""Which layout conversions between chained tensor-core products Triton's Gluon compiles
without shared memory (ahead of time for sm_90; no GPU needed).

    python benchmarks/triton_gluon_layout_probe.py

The triton backend's chunk step is bound by layout conversions, not math
(``backends/triton/NOTES.md``, sessions 17-21): in ``tl`` every product whose operand another
product made goes through a shared-memory round trip and a barrier, while the cupy backend's
hand-written kernels keep such operands in registers. Gluon (``triton.experimental.gluon``)
lets a kernel name its layouts; this probe compiles three chains of two 16 x 16 x 16 bfloat16
``mma_v2`` products in one warp and counts the conversion's instructions in the PTX:

- ``acc -> A``: the first product's accumulator as the second's A operand (the scores as A
  of ``A v``);
- ``acc^T -> B``: its transpose as the second's B operand (the state ``S^T`` kept so that
  it is ``q S``'s B operand);
- ``acc -> B``: the accumulator itself as a B operand (a transpose over time, which the cupy
  kernels do with ``movmatrix``).

and the same chains in ``tl`` for comparison. Measured (session 24; Triton 3.6.0, the GPU
image's, and 3.9.0): Gluon, no shared memory and no barrier in any of the three (its loads go
straight into the operand layouts); ``acc -> A`` and ``acc^T -> B`` cost nothing (``acc -> A``
passes ``assert_trivial``), ``acc -> B`` four shuffles and eight byte permutes. ``tl``: every
chain stages its loaded operands through shared memory (20 ``st.shared``, 2 ``ldmatrix``, 3
barriers), and the transposed operand adds a third ``ldmatrix`` and 2-4 barriers.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

try:  # Triton 3.9 exports it; 3.6 keeps it in the runtime module
    from triton.experimental.gluon import GluonASTSource
except ImportError:
    from triton.experimental.gluon._runtime import GluonASTSource


@gluon.jit
def _chain(a_ptr, b_ptr, o_ptr, HOW: gl.constexpr):
    # one warp, mma_v2 (m16n8k16) layouts; HOW: 0 acc -> A, 1 acc^T -> B, 2 acc -> B
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows_a = gl.arange(0, 16, layout=gl.SliceLayout(1, a_op))
    cols_a = gl.arange(0, 16, layout=gl.SliceLayout(0, a_op))
    a = gl.load(a_ptr + rows_a[:, None] * 16 + cols_a[None, :])
    rows_b = gl.arange(0, 16, layout=gl.SliceLayout(1, b_op))
    cols_b = gl.arange(0, 16, layout=gl.SliceLayout(0, b_op))
    b = gl.load(b_ptr + rows_b[:, None] * 16 + cols_b[None, :])
    zero = gl.zeros([16, 16], gl.float32, layout=mma)
    x = mma_v2(a, b, zero).to(gl.bfloat16)
    if HOW == 0:
        y = mma_v2(gl.convert_layout(x, a_op, assert_trivial=True), b, zero)
    elif HOW == 1:
        y = mma_v2(a, gl.convert_layout(gl.permute(x, [1, 0]), b_op), zero)
    else:
        y = mma_v2(a, gl.convert_layout(x, b_op), zero)
    rows_o = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    cols_o = gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    gl.store(o_ptr + rows_o[:, None] * 16 + cols_o[None, :], y)


@triton.jit
def _chain_tl(a_ptr, b_ptr, o_ptr, HOW: tl.constexpr):
    # the same chains in tl, where the compiler picks the layouts
    rows = tl.arange(0, 16)
    a = tl.load(a_ptr + rows[:, None] * 16 + rows[None, :])
    b = tl.load(b_ptr + rows[:, None] * 16 + rows[None, :])
    x = tl.dot(a, b).to(tl.bfloat16)
    if HOW == 0:
        y = tl.dot(x, b)
    elif HOW == 1:
        y = tl.dot(a, tl.trans(x))
    else:
        y = tl.dot(a, x)
    tl.store(o_ptr + rows[:, None] * 16 + rows[None, :], y)


def ptx_of(how: int, gluon_kernel: bool) -> str:
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "o_ptr": "*fp32", "HOW": "constexpr"}
    source = (GluonASTSource(fn=_chain, signature=signature, constexprs={"HOW": how}) if gluon_kernel
              else ASTSource(fn=_chain_tl, signature=signature, constexprs={"HOW": how}))
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1)).asm["ptx"]


def main() -> int:
    print(f"triton {triton.__version__}, sm_90, one warp; PTX instructions of two chained 16x16x16 products")
    print(f"  {'kernel':<6} {'chain':<8} {'all':>5} {'mma':>4} {'st.shared':>10} {'ld.shared':>10} {'ldmatrix':>9} "
          f"{'bar':>4} {'shfl':>5} {'prmt':>5}")
    for kernel in ("gluon", "tl"):
        for how, name in enumerate(("acc->A", "acc^T->B", "acc->B")):
            ops = re.findall(r"^\s+(?:@%p\d+\s+)?([a-z][\w.]*)", ptx_of(how, kernel == "gluon"), re.M)
            count = lambda prefix: sum(op.startswith(prefix) for op in ops)  # noqa: E731
            print(f"  {kernel:<6} {name:<8} {len(ops):>5} {count('mma'):>4} {count('st.shared'):>10} "
                  f"{count('ld.shared'):>10} {count('ldmatrix'):>9} {count('bar'):>4} {count('shfl'):>5} "
                  f"{count('prmt'):>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
