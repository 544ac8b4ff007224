"""Triton forward kernels for the elementwise work around ViG's matmuls (CUDA).

Profiling ViG-T on an H100 (224 px, batch 128, bf16 autocast) put more GPU time into the
RMSNorms, the global/local mix and the float32 -> bfloat16 casts between them than into the
GLA op itself: eager PyTorch runs each as several kernels, in float32 (autocast runs
``rms_norm`` in float32), and every kernel re-reads its input from memory. Here each is one
kernel that reads its inputs once, computes in float32 and writes its result once, in the dtype
its consumer wants:

- :func:`rms_norm`: rows of ``[..., C]``;
- :func:`norm_dwconv_act`: ``silu?(depthwise_conv(RMSNorm(x)))`` on ``[B, H, W, C]`` (the
  normalised tensor is never written: a first kernel writes each pixel's ``rstd``, the
  convolution normalises the pixels as it reads them);
- :func:`mix_global_local`: ``silu?(σ(z)·RMSNorm(a) + (1 − σ(z))·RMSNorm(b))`` per head;
- :func:`swiglu_product`: ``silu(gate) · value`` from ``[gate, value]``;
- :func:`add_rms_norm`: the residual add and the next RMSNorm (``x + branch``, and its norm);
- :func:`layer_norm_act`: LayerNorm over the last dimension, optionally followed by SiLU (the
  patch embedding's channel norms, on channels-last tensors);
- :func:`log_gates_pair`: ``logsigmoid(z) / normalizer`` of one ``[..., 2K]`` projection,
  written as two contiguous ``[..., K]`` gates (forward, reverse);
- :func:`patch_conv`: the patch embedding's first convolution (3 input channels, kernel 9,
  stride 8 for ViG) as an implicit GEMM that reads the NCHW image in place and writes
  channels-last: at 224 px, batch 128, on an H100, 99 µs against 449 µs for the cast, the
  channels-last copy and cuDNN's convolution it replaces.

They are forwards: :mod:`vig.fused` keeps its autograd functions (save the inputs, recompute
in backward) and calls these for the forward when :func:`enabled_for` says so; the backward
kernels are in :mod:`vig.triton_backward`, the fused matmuls in :mod:`vig.triton_matmuls`.
Under ``torch.compile`` they run too, on CUDA: Dynamo records each launch as a Triton kernel
node and Inductor compiles it with the graph (H100, ViG-T inference compiled, 224 px batch
128: 10,043 img/s with the PyTorch forms, 15,547 with the kernels; NOTES.md of the triton
backend, session 10). Python floats reach a kernel launched by Inductor as float64: the
kernels cast them to float32 where they enter the arithmetic.

``VIG_TRITON_KERNELS``: ``auto`` (default; CUDA tensors), ``0`` (never), ``1`` (also CPU
tensors when ``TRITON_INTERPRET=1``: how the CPU tests run these kernels).

Trade-off: a Triton launch costs more host time than a PyTorch op (about 100–130 µs per call on
the H100 hosts of benchmarks/RESULTS.md). GPU-bound work (CUDA graphs, large batches) gains
1.5–1.6× for ViG-T; eager inference that is already host-bound can lose, and runs faster with
``VIG_TRITON_KERNELS=0`` there.
"""

from __future__ import annotations

import os

import torch

from glakernels._launch_device import launch_device
from glakernels._precision import tf32_allowed

try:
    import triton
    import triton.language as tl
except ImportError:  # the models still run, through the PyTorch forms in vig.fused
    triton = None

Tensor = torch.Tensor

__all__ = ["enabled_for", "rms_norm", "norm_dwconv_act", "mix_global_local", "swiglu_product", "add_rms_norm",
           "log_gates_pair", "layer_norm_act", "patch_conv"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_MODES = ("auto", "0", "1")


def _read_mode() -> str:
    mode = os.environ.get("VIG_TRITON_KERNELS", "auto").strip().lower() or "auto"
    mode = {"true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(mode, mode)  # as env_flag
    if mode not in _MODES:
        raise ValueError(f"VIG_TRITON_KERNELS must be one of auto, 0/1, false/true, no/yes, off/on; got {mode!r}")
    return mode


MODE = _read_mode()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def enabled_for(*tensors: Tensor) -> bool:
    """Whether the forward of a :mod:`vig.fused` function on these tensors runs here."""
    if triton is None or MODE == "0":
        return False
    if torch.compiler.is_compiling():
        # Dynamo records the launches as Triton kernel nodes and Inductor compiles them with
        # the graph (the interpreter's kernels are not traceable: CUDA only). H100, ViG-T
        # inference compiled, 224 px batch 128: 10,043 -> 15,547 img/s (NOTES.md, session 10)
        return all(t.device.type == "cuda" and t.dtype in _KERNEL_DTYPES for t in tensors)
    # a kernel needs real memory: not under fake-tensor or other dispatch modes, functorch
    # transforms or tensor subclasses (the PyTorch forms handle those)
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    x = tensors[0]
    if any(type(t) not in _PLAIN_TENSOR_TYPES or t.dtype not in _KERNEL_DTYPES for t in tensors):
        return False  # float64 (gradcheck) stays in PyTorch
    if x.device.type == "cuda":
        return True
    return MODE == "1" and x.device.type == "cpu" and _interpreting()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


#: Elements per program and warps of each row-wise kernel (one program normalises, mixes or
#: differentiates whole rows: rows per program = elements // padded width, 1 to 64). From a
#: sweep of rows × warps on an H100 at ViG-T's tensors (224 px, batch 128; benchmarks/
#: RESULTS.md, fifteenth session), µs of the first choice (4096 elements, 4 warps) against the
#: entry: the mix 21.3 -> 13.8 and its backward 58.9 -> 44.0 (width 64: small programs of 2
#: warps), RMSNorm's backward 45.4 -> 36.7, LayerNorm(+SiLU)'s 67.3 -> 55.2; the others were
#: within 0.5 µs of the first choice at every setting near it and keep it.
ROWS_LAUNCH: dict[str, tuple[int, int]] = {
    "rms_norm": (4096, 4), "rstd": (4096, 4), "add_rstd": (4096, 4), "mix": (512, 2), "add_rms_norm": (4096, 4),
    "log_gates_pair": (4096, 4), "layer_norm_act": (4096, 4), "rms_norm_backward": (8192, 4),
    "layer_norm_act_backward": (4096, 2), "log_gates_backward": (4096, 4), "mix_backward": (512, 2),
    "column_sums": (16384, 1),
}
# (column_sums, eighteenth session, same sweep on [25088, 192] rows: 14.5 µs at the first guess
# (8192 elements, 4 warps) -> 9.5 at 64 rows of 1 warp; 64 / 4 warps 10.8, 32 / 1 warp 10.5.)


def _rows_launch(kernel: str, width: int) -> tuple[int, int, int]:
    """(rows per program, padded row width, warps) of row-wise ``kernel`` on rows of ``width``."""
    block = _pow2(width)
    elements, warps = ROWS_LAUNCH[kernel]
    return max(1, min(64, elements // block)), block, warps


def _as_rows(x: Tensor) -> Tensor:
    """``x`` as a 2D ``[rows, width]`` tensor with unit column stride (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


if triton is not None:

    @triton.jit
    def _row_tile(n_rows, width, col_block, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """This program's rows of a ``[n_rows, width]`` tensor: row indices, their int64 column
        vector, the column indices of block ``col_block``, the column and the tile masks."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = cols < width
        return rows, rows.to(tl.int64)[:, None], cols, col_ok, (rows < n_rows)[:, None] & col_ok[None, :]

    @triton.jit
    def _rstd(x, width, eps):
        """``rsqrt(mean(x²) + eps)`` per row of a float32 tile (masked columns hold 0). ``eps``
        is cast: Inductor (torch.compile) passes Python floats as float64, which would make
        the rows' arithmetic float64."""
        return 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + tl.cast(eps, tl.float32))

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, width, eps, stride_x, stride_out,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows, r, cols, col_ok, mask = _row_tile(n_rows, width, 0, BLOCK_ROWS, BLOCK_COLS)
        x = tl.load(x_ptr + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = x * _rstd(x, width, eps)[:, None] * w[None, :]
        tl.store(out_ptr + r * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rstd_kernel(x_ptr, rstd_ptr, n_rows, width, eps, stride_x,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows, r, cols, col_ok, mask = _row_tile(n_rows, width, 0, BLOCK_ROWS, BLOCK_COLS)
        x = tl.load(x_ptr + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(rstd_ptr + rows, _rstd(x, width, eps), mask=rows < n_rows)

    @triton.jit
    def _add_rstd_kernel(x_ptr, b_ptr, s_ptr, rstd_ptr, n_rows, width, eps, stride_x, stride_b, stride_s,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        # s = x + b (a residual add, stored) and the per-pixel rstd of s, one read of each input
        rows, r, cols, col_ok, mask = _row_tile(n_rows, width, 0, BLOCK_ROWS, BLOCK_COLS)
        x = tl.load(x_ptr + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + r * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        total = (x + b).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + r * stride_s + cols[None, :], total, mask=mask)
        tl.store(rstd_ptr + rows, _rstd(total.to(tl.float32), width, eps), mask=rows < n_rows)

    @triton.jit
    def _norm_dwconv_act_kernel(x_ptr, rstd_ptr, norm_w_ptr, conv_w_ptr, out_ptr, H, W, C,
                                sx_b, sx_h, sx_w, so_b, so_h, so_w, sw_c, sw_h, sw_w,
                                KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
                                BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program: BLOCK_W pixels of one image row, BLOCK_C channels. The per-pixel rstd
        # comes precomputed (a reduction per tap here made the kernel ~100x slower on an H100)
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        norm_w = tl.load(norm_w_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(KH):
            hh = h + i - KH // 2
            # the row test as a vector: a scalar bool in a mask breaks Triton 3.9's interpreter
            hh_vec = hh + tl.zeros((BLOCK_W,), dtype=tl.int32)
            for j in tl.static_range(KW):
                wj = ws + j - KW // 2
                w_ok = (wj >= 0) & (wj < W) & (hh_vec >= 0) & (hh_vec < H)
                # zero padding pads the *normalised* input: masked pixels load as 0
                pixel = (b * H + hh) * W + wj  # row of the pixel in the [B·H·W] rstd vector
                rstd = tl.load(rstd_ptr + pixel, mask=w_ok, other=0.0)
                ptrs = x_ptr + b.to(tl.int64) * sx_b + hh * sx_h + wj.to(tl.int64)[:, None] * sx_w + cs[None, :]
                x = tl.load(ptrs, mask=w_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                tap = tl.load(conv_w_ptr + cs * sw_c + i * sw_h + j * sw_w, mask=c_ok, other=0.0).to(tl.float32)
                acc += x * rstd[:, None] * (norm_w * tap)[None, :]
        if ACT:
            acc = acc * tl.sigmoid(acc)
        out = out_ptr + b.to(tl.int64) * so_b + h * so_h + ws.to(tl.int64)[:, None] * so_w + cs[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(ws < W)[:, None] & c_ok[None, :])

    @triton.jit
    def _mix_kernel(a_ptr, b_ptr, z_ptr, wa_ptr, wb_ptr, out_ptr, n_rows, width, eps,
                    stride_a, stride_b, stride_z, stride_out,
                    OUT_ACT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows, r, cols, col_ok, mask = _row_tile(n_rows, width, 0, BLOCK_ROWS, BLOCK_COLS)
        a = tl.load(a_ptr + r * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + r * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + r * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wa = tl.load(wa_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        wb = tl.load(wb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        na = a * _rstd(a, width, eps)[:, None] * wa[None, :]
        nb = b * _rstd(b, width, eps)[:, None] * wb[None, :]
        m = nb + tl.sigmoid(z) * (na - nb)
        if OUT_ACT:
            m = m * tl.sigmoid(m)
        tl.store(out_ptr + r * stride_out + cols[None, :], m.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_kernel(p_ptr, out_ptr, n_rows, hidden, stride_p, stride_out,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows, r, cols, col_ok, mask = _row_tile(n_rows, hidden, tl.program_id(1), BLOCK_ROWS, BLOCK_COLS)
        gate = tl.load(p_ptr + r * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        value = tl.load(p_ptr + r * stride_p + hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * stride_out + cols[None, :], (gate * tl.sigmoid(gate) * value).to(out_ptr.dtype.element_ty),
                 mask=mask)


    @triton.jit
    def _add_rms_norm_kernel(x_ptr, b_ptr, w_ptr, sum_ptr, out_ptr, n_rows, width, eps,
                             stride_x, stride_b, stride_sum, stride_out,
                             BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows, r, cols, col_ok, mask = _row_tile(n_rows, width, 0, BLOCK_ROWS, BLOCK_COLS)
        x = tl.load(x_ptr + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x += tl.load(b_ptr + r * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x.to(sum_ptr.dtype.element_ty)  # the sum as stored: the norm below reads what later layers see
        tl.store(sum_ptr + r * stride_sum + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + r * stride_out + cols[None, :], (x * _rstd(x, width, eps)[:, None] * w[None, :]).to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _logsigmoid(z):
        """``logsigmoid(z) = min(z, 0) - log1p(exp(-|z|))`` of a float32 tile, with ``log1p(u) =
        log(w)·u/(w - 1)``, ``w = 1 + u`` (accurate for tiny u, where log(1 + u) rounds to 0)."""
        u = tl.exp(-tl.abs(z))
        w = 1.0 + u
        exact = w == 1.0
        return tl.minimum(z, 0.0) - tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))

    @triton.jit
    def _log_gates_pair_kernel(z_ptr, fwd_ptr, rev_ptr, n_rows, width, inv_normalizer, stride_z,
                               BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows, r, cols, col_ok, mask = _row_tile(n_rows, width, 0, BLOCK_ROWS, BLOCK_COLS)
        half = tl.program_id(1)  # 0: the forward gates (first K columns), 1: the reverse ones
        z = tl.load(z_ptr + r * stride_z + half * width + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gates = _logsigmoid(z) * tl.cast(inv_normalizer, tl.float32)  # Inductor passes float64
        offsets = r * width + cols[None, :]
        if half == 0:
            tl.store(fwd_ptr + offsets, gates.to(fwd_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(rev_ptr + offsets, gates.to(rev_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _layer_norm_act_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_rows, width, eps, stride_x, stride_out,
                               ACT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows, r, cols, col_ok, mask = _row_tile(n_rows, width, 0, BLOCK_ROWS, BLOCK_COLS)
        x = tl.load(x_ptr + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / width
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = _rstd(centred, width, eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        if ACT:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + r * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _patch_conv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_pixels, H, W, OH, OW, C_out, kdim,
                           sxb, sxc, sxh, sxw,
                           KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, DOT_BF16: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        # implicit GEMM: rows = output pixels, columns = output channels, reduction over
        # (input channel, kernel row, kernel column) in the weight's own order
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = m < n_pixels
        n_ok = n < C_out
        b = m // (OH * OW)
        r = m % (OH * OW)
        top = (r // OW) * STRIDE - PAD
        left = (r % OW) * STRIDE - PAD
        row_base = b.to(tl.int64) * sxb
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, kdim, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < kdim
            c = kk // (KS * KS)
            kh = (kk // KS) % KS
            kw = kk % KS
            ih = top[:, None] + kh[None, :]
            iw = left[:, None] + kw[None, :]
            ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            # masked-out lanes read pixel (0, 0) of the image: an in-range address
            offs = row_base[:, None] + c[None, :].to(tl.int64) * sxc + tl.where(ok, ih * sxh + iw * sxw, 0)
            a = tl.load(x_ptr + offs, mask=ok, other=0.0)
            wt = tl.load(w_ptr + n[None, :].to(tl.int64) * kdim + kk[:, None], mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)
            if DOT_BF16:
                acc += tl.dot(a.to(tl.bfloat16), wt.to(tl.bfloat16))
            else:
                acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision=PRECISION)
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + m.to(tl.int64)[:, None] * C_out + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    """``x · rsqrt(mean(x²) + eps) · weight`` over the last dimension, in float32, as ``out_dtype``."""
    rows = _as_rows(x)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    block_rows, block_cols, warps = _rows_launch("rms_norm", rows.shape[1])
    with launch_device(x):
        _rms_norm_kernel[(triton.cdiv(rows.shape[0], block_rows),)](
            rows, weight, out, rows.shape[0], rows.shape[1], eps, rows.stride(0), out.stride(0),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
        )
    return out.view(x.shape)


#: The convolution's tile in :func:`norm_dwconv_act`: channels per program (at most; fewer when
#: C is smaller), pixels × channels per program, warps. From a sweep on an H100 with the
#: residual add (ViG-T, 224 px batch 128 / 1024 px batch 8): 64 channels and 2 warps took
#: 39.4 / 48.1 µs against 42.5 / 52.8 with 128 and 4 (192 channels fill three 64-channel
#: tiles, but half of a second 128-channel one); ViG-S's 384 channels: the same either way.
NORM_DWCONV_LAUNCH = {"MAX_BLOCK_C": 64, "TILE": 2048, "num_warps": 2}


def norm_dwconv_act(x: Tensor, norm_weight: Tensor, eps: float, conv_weight: Tensor, act: bool,
                    out_dtype: torch.dtype, branch: Tensor | None = None):
    """``silu?(depthwise_conv(RMSNorm(x)))`` ('same' zero padding, odd kernel, no bias) on a
    ``[B, H, W, C]`` tensor; ``conv_weight``: ``[C, 1, kh, kw]`` in any layout. With
    ``branch``: of ``s = x + branch`` instead (a residual add, in the promoted dtype), and
    returns ``(s, out)``."""
    B, H, W, C = x.shape
    x = x.contiguous()  # (ViG's blocks pass contiguous tensors: no copy)
    kh, kw = conv_weight.shape[-2:]
    out = torch.empty((B, H, W, C), dtype=out_dtype, device=x.device)
    # 1) rstd of every pixel (4 bytes per pixel); 2) the convolution, normalising as it reads
    rstd = torch.empty((B, H, W), dtype=torch.float32, device=x.device)
    launch = NORM_DWCONV_LAUNCH
    block_c = min(_pow2(C), launch["MAX_BLOCK_C"])
    block_w = max(1, min(_pow2(W), launch["TILE"] // block_c))
    with launch_device(x):
        if branch is None:
            block_rows, block_cols, warps = _rows_launch("rstd", C)
            _rstd_kernel[(triton.cdiv(B * H * W, block_rows),)](
                x, rstd, B * H * W, C, eps, C, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps)
        else:
            if branch.shape != x.shape:
                raise ValueError(f"branch: expected the shape of x {tuple(x.shape)}, got {tuple(branch.shape)}")
            branch = branch.contiguous()
            total = torch.empty((B, H, W, C), dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
            block_rows, block_cols, warps = _rows_launch("add_rstd", C)
            _add_rstd_kernel[(triton.cdiv(B * H * W, block_rows),)](
                x, branch, total, rstd, B * H * W, C, eps, C, C, C, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
                num_warps=warps)
            x = total
        _norm_dwconv_act_kernel[(B * H, triton.cdiv(W, block_w), triton.cdiv(C, block_c))](
            x, rstd, norm_weight, conv_weight, out, H, W, C,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            conv_weight.stride(0), conv_weight.stride(2), conv_weight.stride(3),
            KH=kh, KW=kw, ACT=act, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=launch["num_warps"],
        )
    return out if branch is None else (x, out)


def mix_global_local(a: Tensor, b: Tensor, z: Tensor, wa: Tensor, wb: Tensor, eps: float, out_act: bool,
                     out_dtype: torch.dtype) -> Tensor:
    """``silu?(σ(z)·RMSNorm(a)·wa + (1 − σ(z))·RMSNorm(b)·wb)`` over the last dimension of
    three same-shaped tensors, in float32, as ``out_dtype``."""
    ra, rb, rz = _as_rows(a), _as_rows(b), _as_rows(z)
    out = torch.empty(ra.shape, dtype=out_dtype, device=a.device)
    block_rows, block_cols, warps = _rows_launch("mix", ra.shape[1])
    with launch_device(a):
        _mix_kernel[(triton.cdiv(ra.shape[0], block_rows),)](
            ra, rb, rz, wa, wb, out, ra.shape[0], ra.shape[1], eps,
            ra.stride(0), rb.stride(0), rz.stride(0), out.stride(0),
            OUT_ACT=out_act, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
        )
    return out.view(a.shape)


def swiglu_product(projected: Tensor) -> Tensor:
    """``silu(gate) · value`` with ``[gate, value] = projected.chunk(2, -1)``, in float32, as
    ``projected.dtype``."""
    rows = _as_rows(projected)
    hidden = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], hidden), dtype=projected.dtype, device=projected.device)
    block_cols = min(256, _pow2(hidden))
    block_rows = max(1, 4096 // block_cols)
    with launch_device(projected):
        _swiglu_kernel[(triton.cdiv(rows.shape[0], block_rows), triton.cdiv(hidden, block_cols))](
            rows, out, rows.shape[0], hidden, rows.stride(0), out.stride(0),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        )
    return out.view(*projected.shape[:-1], hidden)


def add_rms_norm(x: Tensor, branch: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(s, RMSNorm(s) · weight)`` with ``s = x + branch`` in their promoted dtype (the residual add
    and the pre-norm that follows it, one read of each input); the norm as ``out_dtype``."""
    rx, rb = _as_rows(x), _as_rows(branch)
    total = torch.empty(rx.shape, dtype=torch.promote_types(x.dtype, branch.dtype), device=x.device)
    out = torch.empty(rx.shape, dtype=out_dtype, device=x.device)
    block_rows, block_cols, warps = _rows_launch("add_rms_norm", rx.shape[1])
    with launch_device(x):
        _add_rms_norm_kernel[(triton.cdiv(rx.shape[0], block_rows),)](
            rx, rb, weight, total, out, rx.shape[0], rx.shape[1], eps,
            rx.stride(0), rb.stride(0), total.stride(0), out.stride(0),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
        )
    return total.view(x.shape), out.view(x.shape)


def log_gates_pair(logits: Tensor, normalizer: float) -> tuple[Tensor, Tensor]:
    """``logsigmoid(logits) / normalizer`` of ``[..., 2K]`` logits as two contiguous ``[..., K]``
    tensors (the first K columns, then the last K), in ``logits``' dtype."""
    rows = _as_rows(logits)
    width = rows.shape[1] // 2
    fwd = torch.empty((rows.shape[0], width), dtype=logits.dtype, device=logits.device)
    rev = torch.empty_like(fwd)
    block_rows, block_cols, warps = _rows_launch("log_gates_pair", width)
    with launch_device(logits):
        _log_gates_pair_kernel[(triton.cdiv(rows.shape[0], block_rows), 2)](
            rows, fwd, rev, rows.shape[0], width, 1.0 / normalizer, rows.stride(0),
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
        )
    shape = (*logits.shape[:-1], width)
    return fwd.view(shape), rev.view(shape)


#: Tile and launch settings of :func:`patch_conv`, from a sweep on an H100 (224 px b128 /
#: 1024 px b8: 99 / 129 µs). No software pipelining: with Triton's default 3 stages the masked
#: gathers of the image took 365 µs (H200) for the same work.
PATCH_CONV_LAUNCH = {"BLOCK_M": 128, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def _conv_dot_mode(x: Tensor, dtype: torch.dtype) -> tuple[bool, str]:
    """(bfloat16 operands?, float32 dot precision) of the patch convolution's kernels (forward
    and weight gradient) computing in ``dtype``: bfloat16 operands for bfloat16, tf32 for
    float16 (its 10 mantissa bits fit) and for float32 where PyTorch's cuDNN switch allows it."""
    if x.device.type == "cpu":  # the interpreter multiplies bfloat16 operands as raw bits
        return False, "ieee"
    tf32 = dtype == torch.float16 or tf32_allowed("conv")
    return dtype == torch.bfloat16, "tf32" if tf32 else "ieee"


def patch_conv(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int, dtype: torch.dtype) -> Tensor:
    """``conv2d(x, weight, bias, stride, padding)`` as ``[B, OH, OW, C_out]`` (channels last) in
    ``dtype``: operands rounded to ``dtype`` (bfloat16, float16 via tf32, float32 as PyTorch's
    cuDNN switch says), float32 accumulation. ``x`` is read in place, in any dtype and layout."""
    B, C_in, H, W = x.shape
    C_out, _, ks, _ = weight.shape
    OH, OW = (H + 2 * padding - ks) // stride + 1, (W + 2 * padding - ks) // stride + 1
    out = torch.empty(B, OH, OW, C_out, dtype=dtype, device=x.device)
    w = weight.contiguous()
    n_pixels = B * OH * OW
    block_n = min(128, max(16, _pow2(C_out)))
    dot_bf16, precision = _conv_dot_mode(x, dtype)
    with launch_device(x):
        launch = PATCH_CONV_LAUNCH
        _patch_conv_kernel[(triton.cdiv(n_pixels, launch["BLOCK_M"]), triton.cdiv(C_out, block_n))](
            x, w, bias, out, n_pixels, H, W, OH, OW, C_out, C_in * ks * ks, *x.stride(),
            KS=ks, STRIDE=stride, PAD=padding, DOT_BF16=dot_bf16, PRECISION=precision, BLOCK_N=block_n, **launch,
        )
    return out


def layer_norm_act(x: Tensor, weight: Tensor, bias: Tensor, eps: float, act: bool, out_dtype: torch.dtype) -> Tensor:
    """``silu?(LayerNorm(x) · weight + bias)`` over the last dimension, in float32, as ``out_dtype``."""
    rows = _as_rows(x)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    block_rows, block_cols, warps = _rows_launch("layer_norm_act", rows.shape[1])
    with launch_device(x):
        _layer_norm_act_kernel[(triton.cdiv(rows.shape[0], block_rows),)](
            rows, weight, bias, out, rows.shape[0], rows.shape[1], eps, rows.stride(0), out.stride(0),
            ACT=act, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
        )
    return out.view(x.shape)
