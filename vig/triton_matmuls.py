"""Triton matmuls with their elementwise consumers fused in (CUDA forwards of :mod:`vig.fused`).

Profiling ViG-T on an H100 (224 px, batch 128, bf16 autocast, GPU time; benchmarks/
RESULTS.md, seventh session) showed two places where a small matmul writes an intermediate
that one elementwise kernel reads straight back:

- the MLP: ``x @ W_inᵀ`` writes ``[gate, value]`` (2·hidden per token), ``silu(gate) · value``
  reads it and writes hidden per token: 24.9 + 26.1 µs a block. :func:`swiglu_matmul` keeps
  the two halves' accumulators in registers and writes only the product.
- the gates: ``x @ W₀ᵀ`` (rank 16), ``@ W₁ᵀ + b₁`` (2K logits), ``logsigmoid(·)/n`` split into
  two tensors: 4.4 + 8.5 + 13.0 µs a block. :func:`low_rank_log_gates_pair` does the three in
  one pass over ``x``, and writes the rank-16 projection (backward's input) and the gates.

Both compute in float32 from operands in the compute dtype (autocast's, else the inputs'):
bfloat16 or float16 tensor-core operands, float32 ones (tf32 when PyTorch's matmul switch
allows it) for float32 inputs. The intermediates are not rounded to the compute dtype as
PyTorch's separate matmuls would round them (the rank-16 projection is, as it is an operand
of the second matmul): results match the unfused forms to the compute dtype's rounding.

Same switches as :mod:`vig.triton_kernels` (``VIG_TRITON_KERNELS``, :func:`enabled_for`).
"""

from __future__ import annotations

import torch

from glakernels._launch_device import launch_device
from glakernels._precision import tf32_allowed

from .triton_kernels import _as_rows, _pow2, triton

if triton is not None:
    import triton.language as tl

    from .triton_kernels import _logsigmoid

Tensor = torch.Tensor

__all__ = ["swiglu_matmul", "low_rank_log_gates_pair", "SWIGLU_LAUNCH", "LOW_RANK_GATES_LAUNCH"]

#: :func:`swiglu_matmul`'s tiles (rows, hidden columns per half, reduction step) and launch
#: settings, from a sweep on an H100 at ViG-T's shapes (benchmarks/RESULTS.md, seventh session).
SWIGLU_LAUNCH = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
#: :func:`low_rank_log_gates_pair`'s rows per program, reduction step and gate columns per step.
LOW_RANK_GATES_LAUNCH = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def _dot_format(x: Tensor) -> tuple[bool, str]:
    """(upcast operands to float32?, float32 input precision) for a kernel on ``x``'s device.
    Triton's interpreter multiplies bfloat16 operands as raw bits: CPU runs take float32."""
    if x.device.type == "cpu":
        return True, "ieee"
    return False, "tf32" if tf32_allowed("matmul") else "ieee"


if triton is not None:

    @triton.jit
    def _mm(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision=PRECISION)
        return tl.dot(a, b, acc)

    @triton.jit
    def _swiglu_matmul_kernel(x_ptr, w_ptr, out_ptr, M, K, HIDDEN, stride_x, stride_w, stride_out,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # rows of x times columns n of both halves of W_in (gate: n, value: HIDDEN + n); the
        # product of the two accumulators is the only store
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < HIDDEN
        # masked rows and columns read row 0: in-range addresses for pipelined loads
        x_rows = x_ptr + tl.where(m_ok, rm, 0).to(tl.int64)[:, None] * stride_x
        n_safe = tl.where(n_ok, rn, 0)
        w_gate = w_ptr + n_safe.to(tl.int64)[None, :] * stride_w
        w_value = w_ptr + (n_safe + HIDDEN).to(tl.int64)[None, :] * stride_w
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & n_ok[None, :]
            acc_gate = _mm(a, tl.load(w_gate + kk[:, None], mask=w_ok, other=0.0), acc_gate, UPCAST, PRECISION)
            acc_value = _mm(a, tl.load(w_value + kk[:, None], mask=w_ok, other=0.0), acc_value, UPCAST, PRECISION)
        product = acc_gate * tl.sigmoid(acc_gate) * acc_value
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :]
        tl.store(out, product.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _low_rank_log_gates_kernel(x_ptr, w0_ptr, w1_ptr, b1_ptr, low_ptr, fwd_ptr, rev_ptr,
                                   M, C, R, NG, inv_normalizer, stride_x,
                                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        # low = x @ W0ᵀ ([BLOCK_M, R], rounded to the compute dtype as the operand of the second
        # matmul), then per block of gate columns: logits = low @ W1ᵀ + b1, gates =
        # logsigmoid(logits) / n, the first NG columns to fwd, the next NG to rev
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rows = tl.where(m_ok, rm, 0).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < C
            a = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w0 = tl.load(w0_ptr + tl.where(r_ok, rr, 0)[None, :] * C + kk[:, None], mask=k_ok[:, None] & r_ok[None, :],
                         other=0.0)
            low = _mm(a, w0, low, UPCAST, PRECISION)
        low = low.to(low_ptr.dtype.element_ty)
        tl.store(low_ptr + rows[:, None] * R + rr[None, :], low, mask=m_ok[:, None] & r_ok[None, :])
        for n0 in range(0, 2 * NG, BLOCK_N):
            cn = n0 + tl.arange(0, BLOCK_N)  # logit columns, over both halves
            n_ok = cn < 2 * NG
            w1 = tl.load(w1_ptr + tl.where(n_ok, cn, 0)[None, :] * R + rr[:, None], mask=r_ok[:, None] & n_ok[None, :],
                         other=0.0)
            logits = _mm(low, w1, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            logits += tl.load(b1_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            # the cast: Inductor (torch.compile) passes Python floats as float64
            gates = (_logsigmoid(logits) * tl.cast(inv_normalizer, tl.float32)).to(fwd_ptr.dtype.element_ty)
            is_fwd = cn < NG
            col = tl.where(is_fwd, cn, cn - NG)
            offs = rows[:, None] * NG + col[None, :]
            tl.store(fwd_ptr + offs, gates, mask=m_ok[:, None] & (n_ok & is_fwd)[None, :])
            tl.store(rev_ptr + offs, gates, mask=m_ok[:, None] & (n_ok & (cn >= NG))[None, :])


def swiglu_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """``silu(gate) · value`` with ``[gate, value] = (x @ weightᵀ).chunk(2, -1)``, accumulated
    and multiplied in float32, as ``x.dtype``. ``x``: ``[..., K]``; ``weight``: ``[2·hidden,
    K]`` in ``x``'s dtype."""
    rows = _as_rows(x)
    w = weight.contiguous()
    hidden = w.shape[0] // 2
    out = torch.empty((rows.shape[0], hidden), dtype=x.dtype, device=x.device)
    upcast, precision = _dot_format(x)
    launch = dict(SWIGLU_LAUNCH)
    if x.device.type == "cpu":  # the interpreter: fewer, larger steps
        launch["BLOCK_K"] = max(16, min(128, _pow2(rows.shape[1])))
    grid = (triton.cdiv(rows.shape[0], launch["BLOCK_M"]), triton.cdiv(hidden, launch["BLOCK_N"]))
    with launch_device(x):
        _swiglu_matmul_kernel[grid](rows, w, out, rows.shape[0], rows.shape[1], hidden, rows.stride(0), w.stride(0),
                                    out.stride(0), UPCAST=upcast, PRECISION=precision, **launch)
    return out.view(*x.shape[:-1], hidden)


def low_rank_log_gates_pair(x: Tensor, w0: Tensor, w1: Tensor, b1: Tensor, normalizer: float
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``(low, fwd, rev)``: ``low = x @ w0ᵀ`` (``[..., R]``), and ``logsigmoid(low @ w1ᵀ + b1) /
    normalizer`` split into its first and last ``NG`` columns (two contiguous ``[..., NG]``
    tensors), all as ``x.dtype``. ``w0``: ``[R, C]``, ``w1``: ``[2·NG, R]`` in ``x``'s dtype;
    ``b1``: ``[2·NG]`` in any float dtype (added in float32)."""
    rows = _as_rows(x)
    M, C = rows.shape
    R, NG = w0.shape[0], w1.shape[0] // 2
    w0, w1, b1 = w0.contiguous(), w1.contiguous(), b1.contiguous()
    low = torch.empty((M, R), dtype=x.dtype, device=x.device)
    fwd = torch.empty((M, NG), dtype=x.dtype, device=x.device)
    rev = torch.empty_like(fwd)
    upcast, precision = _dot_format(x)
    launch = dict(LOW_RANK_GATES_LAUNCH)
    if x.device.type == "cpu":
        launch["BLOCK_K"] = max(16, min(128, _pow2(C)))
    with launch_device(x):
        _low_rank_log_gates_kernel[(triton.cdiv(M, launch["BLOCK_M"]),)](
            rows, w0, w1, b1, low, fwd, rev, M, C, R, NG, 1.0 / normalizer, rows.stride(0),
            UPCAST=upcast, PRECISION=precision, BLOCK_R=max(16, _pow2(R)), **launch,
        )
    lead = x.shape[:-1]
    return low.view(*lead, R), fwd.view(*lead, NG), rev.view(*lead, NG)
