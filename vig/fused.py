"""Memory-lean autograd for the elementwise work around ViG's matmuls.

Eager autograd keeps every intermediate of a chain of elementwise ops alive until backward
(the normalised branches, the sigmoid, the mix, the SwiGLU product, ...). At 1024 px those
intermediates, not the weights, set a training step's peak memory. The functions here save
only their *inputs* and recompute the cheap rest in backward, as a fused kernel would:

- :func:`rms_norm` saves its input only; :func:`add_rms_norm` (a residual add and the norm
  after it) saves the sum only;
- :func:`layer_norm_act`: LayerNorm and an optional SiLU save the input only;
- :func:`patch_conv`: the patch embedding's first convolution, channels-last out (here for
  its fast forward kernel, not for memory);
- :func:`norm_conv_act`: ViG's pre-norm, depth-wise convolution and SiLU save the block's
  input only (instead of it, the normalised tensor and the convolution's output);
- :func:`mix_global_local`: ``silu?(σ(z)·RMSNorm(o) + (1 − σ(z))·RMSNorm(local))`` per head
  saves ``o, local, z`` (3 tensors instead of ~7) and, with the output projection fused in,
  not the projection's input either;
- :func:`log_gates`: ``logsigmoid(z) / 16`` saves its output (which the op keeps anyway), not ``z``;
  :func:`log_gates_pair` does it for ``[forward | reverse]`` logits from one projection, and
  :func:`low_rank_log_gates_pair` with that projection's two low-rank matmuls too (saves its
  input, the rank-16 projection and the gates);
- :func:`swiglu_linear`: ``(silu(gate) · value) @ Wᵀ`` saves the ``[gate, value]`` projection
  (2·I per token instead of 4·I);
- :func:`swiglu_mlp`: the whole SwiGLU MLP, ``(silu(x Wgᵀ) · x Wvᵀ) @ Woᵀ``, saves its input
  ``x`` only (C per token instead of 2·I, I ≈ 2.7·C) and recomputes the input projection in
  backward: one more matmul for about 40 % less saved activation in a ViG block at 1024 px.

Arithmetic is float32 inside (the inputs may be bfloat16 under autocast); results come back
in the input dtype (in autocast's where only a matmul or convolution follows). On CUDA:

- the forwards run as one Triton kernel each (:mod:`vig.triton_kernels`); the SwiGLU MLP's
  input projection with its product, and the low-rank gates with their two matmuls, are
  Triton matmuls with the elementwise work fused in (:mod:`vig.triton_matmuls`);
- the backwards' elementwise parts (the mix, the SwiGLU product, RMSNorm, SiLU, the log
  gates) are one Triton kernel each, and so are the depth-wise convolution's two gradients
  (:mod:`vig.triton_backward`); matmuls stay PyTorch's (cuBLAS).

Elsewhere (CPU, float64, ``VIG_TRITON_KERNELS=0``) the PyTorch forms below run, forward and
backward. Under ``torch.compile`` the autograd functions are traced; on CUDA Dynamo records
the kernels' launches and Inductor compiles them with the graph, elsewhere Inductor fuses
the PyTorch forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_backward, triton_kernels, triton_matmuls

Tensor = torch.Tensor

__all__ = ["rms_norm", "add_rms_norm", "norm_conv_act", "add_norm_conv_act", "mix_global_local", "log_gates",
           "log_gates_pair", "low_rank_log_gates_pair", "swiglu_linear", "swiglu_mlp", "autocast_weight",
           "layer_norm_act", "patch_conv"]


_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _acc(x: Tensor) -> Tensor:
    """float32 arithmetic for low-precision inputs, float32 and float64 kept as they are.
    (A dict lookup, not ``x.to(...)``: a same-dtype ``.to`` still costs a dispatcher round
    trip, and a training step makes hundreds of these calls.)"""
    dtype = _ACCUMULATE.get(x.dtype)
    return x if dtype is None else x.to(dtype)


def _autocast_dtype(x: Tensor):
    """The low-precision dtype autocast runs matmuls and convolutions in, or None when off."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, but never the no-op ``.to`` that returns ``x`` itself: returned from an
    autograd function's forward under ``torch.compile``, that alias loses every gradient in
    torch 2.11 (tests/test_vig_compile_autocast.py caught it)."""
    return x if x.dtype == dtype else x.to(dtype)


def _rms_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Normalised ``x · rstd`` (before the weight) and ``rstd``, in float32 (float64 kept)."""
    x = _acc(x)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


def _rms_backward(grad_normed: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """Gradient w.r.t. ``x`` of ``x_hat = x · rstd(x)`` given the gradient of ``x_hat``."""
    return rstd * (grad_normed - x_hat * (grad_normed * x_hat).mean(-1, keepdim=True))


def _sum_to_last(x: Tensor) -> Tensor:
    """Sums (float32 or wider) over every dimension but the last (a bias or norm weight's gradient).

    PyTorch's reduction over the rows of a tall ``[N, C]`` tensor (N in the tens of thousands,
    C a few hundred) is slow; in two stages, N as ``[N / 64, 64]``, it is 2-3× faster and still
    adds in float32 (H100, ``[25088, 192]``: bfloat16 29.4 -> 13.5 µs, float32 36.4 -> 17.6;
    benchmarks/RESULTS.md, fourteenth session)."""
    rows = x.reshape(-1, x.shape[-1])
    n, dtype = rows.shape[0], torch.promote_types(x.dtype, torch.float32)  # (float64 stays float64)
    if n >= 4096 and n % 64 == 0:
        return rows.reshape(n // 64, 64, -1).sum(1, dtype=dtype).sum(0)
    return rows.sum(0, dtype=dtype)


def _bias_grad(grad: Tensor) -> Tensor:
    """A bias's gradient, float32 (or wider): ``grad`` summed over every dimension but the last.
    On CUDA one Triton pass and an inner reduction (:func:`vig.triton_backward.column_sums`):
    the second stage of :func:`_sum_to_last`, a reduction over the outer dimension of a
    ``[392, 192]`` tensor, alone took ~11 µs (H100; benchmarks/RESULTS.md, seventeenth session)."""
    if triton_kernels.enabled_for(grad):
        return triton_backward.column_sums(grad)
    return _sum_to_last(grad)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, to_autocast_dtype):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        dtype = (_autocast_dtype(x) if to_autocast_dtype else None) or x.dtype
        if triton_kernels.enabled_for(x, weight):
            return triton_kernels.rms_norm(x, weight, eps, dtype)
        return _cast(F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps), dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        if triton_kernels.enabled_for(x, weight, grad_out):
            return (*triton_backward.rms_norm_backward(x, weight, ctx.eps, grad_out), None, None)
        x_hat, rstd = _rms_forward(x, weight, ctx.eps)
        grad = _acc(grad_out)
        grad_x = _rms_backward(grad * _acc(weight), x_hat, rstd)
        return grad_x.to(x.dtype), _sum_to_last(grad * x_hat).to(weight.dtype), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, to_autocast_dtype: bool = False) -> Tensor:
    """RMSNorm over the last dimension, computed in float32 (float64 kept), returned in
    ``x``'s dtype; keeps only ``x`` for backward (the normalised output that eager autograd
    would also keep is recomputed).

    ``to_autocast_dtype``: under autocast, return autocast's dtype instead — for a result that
    only feeds a matmul or convolution, which autocast would cast down anyway (a float32
    residual stream then costs one float32 write and one cast kernel fewer)."""
    return _RMSNorm.apply(x, weight, eps, to_autocast_dtype)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, weight, eps, to_autocast_dtype):
        total_dtype = torch.promote_types(x.dtype, branch.dtype)
        dtype = (_autocast_dtype(x) if to_autocast_dtype else None) or total_dtype
        if triton_kernels.enabled_for(x, branch, weight):
            total, normed = triton_kernels.add_rms_norm(x, branch, weight, eps, dtype)
        else:
            total = x + branch
            normed = _cast(F.rms_norm(total, (total.shape[-1],), weight.to(total.dtype), eps), dtype)
        ctx.save_for_backward(total, weight)
        ctx.eps, ctx.dtypes = eps, (x.dtype, branch.dtype)
        return total, normed

    @staticmethod
    def backward(ctx, grad_total, grad_normed):
        total, weight = ctx.saved_tensors
        grad, grad_weight = grad_total, None
        if grad_normed is not None and triton_kernels.enabled_for(total, weight, grad_normed):
            grad, grad_weight = triton_backward.rms_norm_backward(total, weight, ctx.eps, grad_normed, grad_total,
                                                                 torch.float32)
        elif grad_normed is not None:
            x_hat, rstd = _rms_forward(total, weight, ctx.eps)
            gn = _acc(grad_normed)
            through_norm = _rms_backward(gn * _acc(weight), x_hat, rstd)
            grad = through_norm if grad is None else _acc(grad) + through_norm
            grad_weight = _sum_to_last(gn * x_hat).to(weight.dtype)
        if grad is None:
            return None, None, None, None, None
        return grad.to(ctx.dtypes[0]), grad.to(ctx.dtypes[1]), grad_weight, None, None


def add_rms_norm(x: Tensor, branch: Tensor, weight: Tensor, eps: float,
                 to_autocast_dtype: bool = False) -> tuple[Tensor, Tensor]:
    """``(s, rms_norm(s, weight, eps, to_autocast_dtype))`` with ``s = x + branch``: a residual
    add and the pre-norm after it, in one pass on CUDA; keeps only ``s`` for backward."""
    if x.shape != branch.shape:
        raise ValueError(f"branch: expected the shape of x {tuple(x.shape)}, got {tuple(branch.shape)}")
    return _AddRMSNorm.apply(x, branch, weight, eps, to_autocast_dtype)


class _LayerNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, out_dtype):
        ctx.save_for_backward(x, weight, bias)
        ctx.eps, ctx.act = eps, act
        if triton_kernels.enabled_for(x, weight, bias):
            return triton_kernels.layer_norm_act(x, weight, bias, eps, act, out_dtype)
        y = F.layer_norm(_acc(x), (x.shape[-1],), _acc(weight), _acc(bias), eps)
        return _cast(F.silu(y) if act else y, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        if triton_kernels.enabled_for(x, weight, bias, grad_out):
            # one pass (as PyTorch ops: ~20 passes over float32 copies; H100, the two in ViG-T's
            # patch embedding at 224 px, batch 128: ~1.2 ms of a ~20 ms training step)
            return (*triton_backward.layer_norm_act_backward(x, weight, bias, ctx.eps, ctx.act, grad_out),
                    None, None, None)
        return (*_layer_norm_act_backward(x, weight, bias, ctx.eps, ctx.act, grad_out), None, None, None)


def _layer_norm_act_backward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, act: bool, grad_out: Tensor
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`layer_norm_act` as PyTorch ops in float32
    (what :func:`vig.triton_backward.layer_norm_act_backward` does in one pass)."""
    xf = _acc(x)
    centred = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = centred * rstd
    grad = _acc(grad_out)
    if act:
        y = x_hat * _acc(weight) + _acc(bias)
        s = torch.sigmoid(y)
        grad = grad * s * (1 + y * (1 - s))
    grad_hat = grad * _acc(weight)
    grad_x = rstd * (grad_hat - grad_hat.mean(-1, keepdim=True)
                     - x_hat * (grad_hat * x_hat).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), _sum_to_last(grad * x_hat).to(weight.dtype), _sum_to_last(grad).to(bias.dtype)


def layer_norm_act(x: Tensor, weight: Tensor, bias: Tensor, eps: float, act: bool, out_dtype: torch.dtype) -> Tensor:
    """``silu?(LayerNorm(x) · weight + bias)`` over the last dimension, computed in float32 and
    returned as ``out_dtype``; keeps only ``x`` (and the parameters) for backward."""
    return _LayerNormAct.apply(x, weight, bias, eps, act, out_dtype)


class _PatchConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        dtype = _autocast_dtype(x) or x.dtype  # what autocast's conv2d would compute in
        ctx.save_for_backward(x, weight, bias)
        ctx.stride, ctx.padding, ctx.dtype = stride, padding, dtype
        if triton_kernels.enabled_for(x, weight, bias):
            return triton_kernels.patch_conv(x, weight, bias, stride, padding, dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(_cast(x, dtype).contiguous(memory_format=torch.channels_last), _cast(weight, dtype),
                         _cast(bias, dtype), stride=stride, padding=padding)
        return y.permute(0, 2, 3, 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        dtype = ctx.dtype
        needs = ctx.needs_input_grad
        if not needs[0] and triton_kernels.enabled_for(x, weight, bias, grad_out):
            # the image needs no gradient (the usual case): the weight's and bias's from one
            # kernel that reads the image in place (vig.triton_backward.patch_conv_weight_grad)
            grad_w, grad_b = triton_backward.patch_conv_weight_grad(x, grad_out, weight.shape[-1], ctx.stride,
                                                                    ctx.padding, dtype)
            return (None, grad_w.to(weight.dtype) if needs[1] else None, grad_b.to(bias.dtype) if needs[2] else None,
                    None, None)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            _cast(grad_out, dtype).permute(0, 3, 1, 2), _cast(x, dtype), _cast(weight, dtype), [bias.shape[0]],
            [ctx.stride] * 2, [ctx.padding] * 2, [1, 1], False, [0, 0], 1, list(ctx.needs_input_grad[:3]),
        )
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def patch_conv(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int) -> Tensor:
    """``conv2d(x, weight, bias, stride, padding)`` of an NCHW image, returned channels-last
    (``[B, OH, OW, C_out]``) in the dtype autocast's convolution would use (``x``'s when
    autocast is off). On CUDA one Triton kernel reads the image in place (no cast, no layout
    copy), and so does the weight and bias gradients' kernel when the image needs no gradient;
    otherwise backward is PyTorch's convolution backward."""
    return _PatchConv.apply(x, weight, bias, stride, padding)


def autocast_weight(weight: Tensor, like: Tensor) -> Tensor:
    """``weight`` in autocast's dtype when autocast is on for ``like``'s device, else as it is.

    For a weight used in slices: autocast caches the casts of leaf parameters only, so each
    ``F.linear(x, weight[rows])`` would cast its slice again; casting the whole weight once and
    slicing the result costs one copy per forward instead."""
    dtype = _autocast_dtype(like)
    return weight if dtype is None else weight.to(dtype)


def _depthwise_nhwc(x: Tensor, weight: Tensor) -> Tensor:
    """'Same' depth-wise convolution of ``[B, H, W, C]`` (as a channels-last NCHW convolution)."""
    kh, kw = weight.shape[-2:]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, padding=(kh // 2, kw // 2), groups=weight.shape[0])
    return y.permute(0, 2, 3, 1)


def _depthwise_odd(conv_weight: Tensor) -> bool:
    return conv_weight.shape[1] == 1 and conv_weight.shape[2] % 2 == 1 and conv_weight.shape[3] % 2 == 1


def _norm_conv_act_forward(ctx, x, norm_weight, eps, conv_weight, act, branch=None):
    """``silu?(depthwise_conv(RMSNorm(s)))`` with ``s = x (+ branch)``; returns ``(s, out)``.
    Sets ``ctx.eps``, ``ctx.act`` and ``ctx.conv_dtype`` for ``_norm_conv_act_backward``."""
    ctx.eps, ctx.act = eps, act
    if _depthwise_odd(conv_weight) and triton_kernels.enabled_for(x, norm_weight, conv_weight):
        # the dtype autocast's convolution would give
        ctx.conv_dtype = _autocast_dtype(x) or x.dtype
        if branch is None:
            return x, triton_kernels.norm_dwconv_act(x, norm_weight, eps, conv_weight, act, ctx.conv_dtype)
        return triton_kernels.norm_dwconv_act(x, norm_weight, eps, conv_weight, act, ctx.conv_dtype, branch=branch)
    s = x if branch is None else x + branch
    normed = F.rms_norm(s, (s.shape[-1],), norm_weight.to(s.dtype), eps)
    y = _depthwise_nhwc(normed, conv_weight)  # autocast (when on) runs this in low precision
    ctx.conv_dtype = y.dtype
    return s, (F.silu(y) if act else y)


def _depthwise_nhwc_backward(x: Tensor, grad: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's (on CUDA cuDNN's) input and weight gradients of :func:`_depthwise_nhwc` on
    ``[B, H, W, C]`` views ('same' zero padding); ``grad_x`` as an NHWC view, ``grad_weight`` in
    ``weight``'s dtype (what :func:`vig.triton_backward.depthwise_conv_backward` does in one pass)."""
    kh, kw = weight.shape[-2:]
    nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
    conv_args = dict(padding=(kh // 2, kw // 2), groups=weight.shape[0])
    grad_x = torch.nn.grad.conv2d_input(nchw(x).shape, weight, nchw(grad), **conv_args)
    grad_weight = torch.nn.grad.conv2d_weight(nchw(x), weight.shape, nchw(grad), **conv_args)
    return grad_x.permute(0, 2, 3, 1), grad_weight


def _norm_conv_act_backward(ctx, s, norm_weight, conv_weight, grad_out, grad_residual=None):
    """Gradients of ``s`` (plus ``grad_residual``, a gradient reaching ``s`` by another path),
    the norm weight and the convolution weight (``s`` recomputed from). On CUDA the norm, its
    backward, SiLU's and the convolution's two gradients are Triton kernels
    (vig.triton_backward); otherwise PyTorch's (cuDNN for the convolution)."""
    kernels = _depthwise_odd(conv_weight) and triton_kernels.enabled_for(s, norm_weight, conv_weight, grad_out)
    weight = conv_weight.to(ctx.conv_dtype)
    grad_y = grad_out.to(ctx.conv_dtype)
    if kernels:
        normed = triton_kernels.rms_norm(s, norm_weight, ctx.eps, ctx.conv_dtype)
        if ctx.act:  # the convolution's output again (float32), from s in one pass
            y = triton_kernels.norm_dwconv_act(s, norm_weight, ctx.eps, conv_weight, False, torch.float32)
            grad_y = triton_backward.silu_backward(y, grad_y, ctx.conv_dtype)
    else:
        x_hat, rstd = _rms_forward(s, norm_weight, ctx.eps)
        wn = _acc(norm_weight)
        normed = (x_hat * wn).to(ctx.conv_dtype)
        if ctx.act:
            y = _acc(_depthwise_nhwc(normed, weight))
            sig = torch.sigmoid(y)
            grad_y = (_acc(grad_y) * sig * (1 + y * (1 - sig))).to(ctx.conv_dtype)
    if kernels:
        # both of the convolution's gradients in one pass (cuDNN: two calls and layout copies)
        grad_normed, grad_conv = triton_backward.depthwise_conv_backward(normed, grad_y, weight, ctx.conv_dtype,
                                                                         conv_weight.dtype)
        grad_s, grad_norm = triton_backward.rms_norm_backward(s, norm_weight, ctx.eps, grad_normed, grad_residual,
                                                              torch.promote_types(s.dtype, torch.float32))
        return grad_s, grad_norm, grad_conv
    grad_normed, grad_conv = _depthwise_nhwc_backward(normed, grad_y, weight)
    grad_normed = _acc(grad_normed)
    grad_s = _rms_backward(grad_normed * wn, x_hat, rstd)
    if grad_residual is not None:
        grad_s = grad_s + _acc(grad_residual)
    return grad_s, _sum_to_last(grad_normed * x_hat).to(norm_weight.dtype), grad_conv.to(conv_weight.dtype)


class _NormConvAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, eps, conv_weight, act):
        ctx.save_for_backward(x, norm_weight, conv_weight)
        return _norm_conv_act_forward(ctx, x, norm_weight, eps, conv_weight, act)[1]

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_weight, conv_weight = ctx.saved_tensors
        grad_x, grad_norm, grad_conv = _norm_conv_act_backward(ctx, x, norm_weight, conv_weight, grad_out)
        return grad_x.to(x.dtype), grad_norm, None, grad_conv, None


def norm_conv_act(x: Tensor, norm_weight: Tensor, eps: float, conv_weight: Tensor, act: bool) -> Tensor:
    """``silu?(depthwise_conv(RMSNorm(x)))`` on ``[B, H, W, C]``, keeping only ``x`` for
    backward (the normalised input and the convolution's output are recomputed)."""
    return _NormConvAct.apply(x, norm_weight, eps, conv_weight, act)


class _AddNormConvAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, norm_weight, eps, conv_weight, act):
        s, out = _norm_conv_act_forward(ctx, x, norm_weight, eps, conv_weight, act, branch=branch)
        ctx.save_for_backward(s, norm_weight, conv_weight)
        ctx.dtypes = x.dtype, branch.dtype
        return s, out

    @staticmethod
    def backward(ctx, grad_s, grad_out):
        s, norm_weight, conv_weight = ctx.saved_tensors
        grad, grad_norm, grad_conv = _norm_conv_act_backward(ctx, s, norm_weight, conv_weight, grad_out, grad_s)
        return grad.to(ctx.dtypes[0]), grad.to(ctx.dtypes[1]), grad_norm, None, grad_conv, None


def add_norm_conv_act(x: Tensor, branch: Tensor, norm_weight: Tensor, eps: float, conv_weight: Tensor,
                      act: bool) -> tuple[Tensor, Tensor]:
    """``(s, norm_conv_act(s, ...))`` with ``s = x + branch`` (a residual add, in the promoted
    dtype): on CUDA the add is fused with the norm's statistics pass, so ``s`` is written once
    and never re-read for them (ViG: the previous block's MLP output, added here rather than
    at the end of that block). Keeps only ``s`` for backward."""
    if x.shape != branch.shape:
        raise ValueError(f"branch: expected the shape of x {tuple(x.shape)}, got {tuple(branch.shape)}")
    return _AddNormConvAct.apply(x, branch, norm_weight, eps, conv_weight, act)


class _MixGlobalLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, global_out, local_out, gate_logits, global_weight, local_weight, eps, out_act, out_weight):
        ctx.eps, ctx.out_act = eps, out_act
        # the inputs' dtype, or autocast's when the output projection (a matmul) follows
        dtype = ((_autocast_dtype(global_out) if out_weight is not None else None)
                 or torch.promote_types(global_out.dtype, local_out.dtype))
        if triton_kernels.enabled_for(global_out, local_out, gate_logits, global_weight, local_weight):
            mixed = triton_kernels.mix_global_local(global_out, local_out, gate_logits, global_weight, local_weight,
                                                    eps, out_act, dtype)
        else:
            # forward as eager PyTorch would run it (fused rms_norm kernels, input dtype) ...
            na = F.rms_norm(global_out, (global_out.shape[-1],), global_weight.to(global_out.dtype), eps)
            nb = F.rms_norm(local_out, (local_out.shape[-1],), local_weight.to(local_out.dtype), eps).to(na.dtype)
            mixed = torch.lerp(nb, na, torch.sigmoid(gate_logits).to(na.dtype))
            mixed = _cast(F.silu(mixed) if out_act else mixed, dtype)
        saved = (global_out, local_out, gate_logits, global_weight, local_weight)
        if out_weight is None:
            ctx.save_for_backward(*saved, None)
            return mixed
        # the projection's weight kept as the matmul used it (cast, under autocast)
        ctx.out_weight_dtype = out_weight.dtype
        out_weight = out_weight.to(mixed.dtype)
        ctx.save_for_backward(*saved, out_weight)
        mixed = mixed.flatten(-2)  # heads back into channels
        return F.linear(mixed, out_weight)

    @staticmethod
    def backward(ctx, grad_out):
        # ... and backward recomputes the normalised branches from the saved inputs, in float32
        global_out, local_out, gate_logits, global_weight, local_weight, out_weight = ctx.saved_tensors
        kernel_args = (global_out, local_out, gate_logits, global_weight, local_weight)
        if triton_kernels.enabled_for(*kernel_args, grad_out):
            return _mix_backward_kernels(ctx, grad_out, *kernel_args, out_weight)
        a_hat, a_rstd = _rms_forward(global_out, global_weight, ctx.eps)
        b_hat, b_rstd = _rms_forward(local_out, local_weight, ctx.eps)
        wa, wb = _acc(global_weight), _acc(local_weight)
        na, nb = a_hat * wa, b_hat * wb
        g = torch.sigmoid(_acc(gate_logits))
        mixed = torch.lerp(nb, na, g)
        grad_out_weight = None
        if out_weight is not None:
            # through the output projection: its input is recomputed here, not kept
            y = F.silu(mixed) if ctx.out_act else mixed
            y = y.flatten(-2).to(grad_out.dtype)
            grad_out_weight = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ y.reshape(-1, y.shape[-1]))
            grad_out_weight = grad_out_weight.to(ctx.out_weight_dtype)
            grad_out = (grad_out @ out_weight.to(grad_out.dtype)).view(mixed.shape)
        grad = _acc(grad_out)
        if ctx.out_act:
            s = torch.sigmoid(mixed)
            grad = grad * s * (1 + mixed * (1 - s))
        grad_na, grad_nb = grad * g, grad * (1 - g)
        grad_z = grad * (na - nb) * g * (1 - g)
        grad_a = _rms_backward(grad_na * wa, a_hat, a_rstd)
        grad_b = _rms_backward(grad_nb * wb, b_hat, b_rstd)
        return (
            grad_a.to(global_out.dtype),
            grad_b.to(local_out.dtype),
            grad_z.to(gate_logits.dtype),
            _sum_to_last(grad_na * a_hat).to(global_weight.dtype),
            _sum_to_last(grad_nb * b_hat).to(local_weight.dtype),
            None,
            None,
            grad_out_weight,
        )


def _mix_backward_kernels(ctx, grad_out, global_out, local_out, gate_logits, global_weight, local_weight,
                          out_weight):
    """:class:`_MixGlobalLocal`'s backward as one Triton pass (vig.triton_backward) after the
    projection's input gradient, which also recomputes the projection's input (the mix) for
    its weight gradient."""
    args = (global_out, local_out, gate_logits, global_weight, local_weight, ctx.eps, ctx.out_act)
    if out_weight is None:
        return (*triton_backward.mix_backward(*args, grad_out), None, None, None)
    grad_mixed = (grad_out @ out_weight.to(grad_out.dtype)).view(global_out.shape)
    *grads, mixed = triton_backward.mix_backward(*args, grad_mixed, output_dtype=grad_out.dtype)
    mixed = mixed.flatten(-2)
    grad_out_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ mixed.reshape(-1, mixed.shape[-1])
    return (*grads, None, None, grad_out_weight.to(ctx.out_weight_dtype))


def mix_global_local(global_out: Tensor, local_out: Tensor, gate_logits: Tensor, global_weight: Tensor,
                     local_weight: Tensor, eps: float, out_act: bool, out_weight: Tensor | None = None) -> Tensor:
    """``silu?( g · RMSNorm_g(global) + (1 − g) · RMSNorm_l(local) )``, ``g = sigmoid(gate_logits)``,
    then ``@ out_weightᵀ`` over the flattened heads when ``out_weight`` is given.

    ``global_out, local_out, gate_logits``: ``[..., heads, head_dim]`` (any strides); the
    norms are over ``head_dim``. Returns ``[..., heads, head_dim]``, or ``[..., out]`` with
    ``out_weight`` (``[out, heads·head_dim]``)."""
    return _MixGlobalLocal.apply(global_out, local_out, gate_logits, global_weight, local_weight, eps, out_act,
                                 out_weight)


def _log_gates_grad(grad_gates: Tensor | None, gates: Tensor, normalizer: float) -> Tensor:
    """Gradient w.r.t. the logits of ``gates = logsigmoid(logits) / normalizer``, from the gates:
    d logsigmoid(z)/dz = sigmoid(-z) = 1 - exp(logsigmoid(z)) = -expm1(normalizer · gates)."""
    if grad_gates is None:
        return torch.zeros_like(gates)
    slope = -torch.expm1(_acc(gates) * normalizer) / normalizer
    return (_acc(grad_gates) * slope).to(grad_gates.dtype)


def _log_gates_pair_grad(grad_fwd: Tensor | None, fwd: Tensor, grad_rev: Tensor | None, rev: Tensor,
                         normalizer: float, bias_grad: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The ``[..., 2K]`` logits' gradient from both directions' gates (one kernel on CUDA); with
    ``bias_grad``, also the logits' bias's gradient (float32 or wider; on CUDA the same
    kernel's per-program column sums)."""
    if triton_kernels.enabled_for(fwd, rev, *(g for g in (grad_fwd, grad_rev) if g is not None)):
        return triton_backward.log_gates_pair_backward(grad_fwd, fwd, grad_rev, rev, normalizer, column_sums=bias_grad)
    grad = torch.cat([_log_gates_grad(grad_fwd, fwd, normalizer), _log_gates_grad(grad_rev, rev, normalizer)], dim=-1)
    return (grad, _sum_to_last(grad)) if bias_grad else grad


class _LogGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, normalizer):
        gates = F.logsigmoid(logits) / normalizer
        ctx.save_for_backward(gates)  # the op keeps this tensor anyway: no extra memory
        ctx.normalizer = normalizer
        return gates

    @staticmethod
    def backward(ctx, grad_gates):
        (gates,) = ctx.saved_tensors
        return _log_gates_grad(grad_gates, gates, ctx.normalizer), None


def _log_gates_pair_forward(logits: Tensor, normalizer: float) -> tuple[Tensor, Tensor]:
    if triton_kernels.enabled_for(logits):
        return triton_kernels.log_gates_pair(logits, normalizer)
    return tuple(g.contiguous() for g in (F.logsigmoid(logits) / normalizer).chunk(2, dim=-1))


class _LogGatesPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, normalizer):
        fwd, rev = _log_gates_pair_forward(logits, normalizer)
        ctx.save_for_backward(fwd, rev)  # the op keeps these tensors anyway: no extra memory
        ctx.normalizer = normalizer
        return fwd, rev

    @staticmethod
    def backward(ctx, grad_fwd, grad_rev):
        fwd, rev = ctx.saved_tensors
        return _log_gates_pair_grad(grad_fwd, fwd, grad_rev, rev, ctx.normalizer), None


def log_gates_pair(logits: Tensor, normalizer: float) -> tuple[Tensor, Tensor]:
    """:func:`log_gates` of ``[..., 2K]`` logits (one projection for both scan directions), as
    two contiguous ``[..., K]`` tensors: the first K columns' gates, then the last K's."""
    if logits.shape[-1] % 2:
        raise ValueError(f"logits: expected an even last dimension [..., 2K], got shape {tuple(logits.shape)}")
    return _LogGatesPair.apply(logits, normalizer)


def _low_rank_log_gates_forward(x: Tensor, w0: Tensor, w1: Tensor, b1: Tensor, normalizer: float
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The rank-R projection, both directions' gates (see :func:`low_rank_log_gates_pair`) and
    the two weights as the matmuls used them (cast once here, kept for backward: a weight's
    cast in backward is one more small kernel each, ~100 of them in a ViG-T training step)."""
    dtype = _matmul_dtype(x, w0, w1, b1)
    if dtype is not None and triton_kernels.enabled_for(x, w0, w1, b1):
        w0, w1 = _cast(w0, dtype), _cast(w1, dtype)
        return (*triton_matmuls.low_rank_log_gates_pair(_cast(x, dtype), w0, w1, b1, normalizer), w0, w1)
    low = F.linear(x, w0)
    return (low, *_log_gates_pair_forward(F.linear(low, w1, b1), normalizer), w0, w1)


def _low_rank_log_gates_backward(x: Tensor, low: Tensor, w0: Tensor, w1: Tensor, dtypes: tuple, fwd: Tensor,
                                 rev: Tensor, normalizer: float, grad_fwd: Tensor | None, grad_rev: Tensor | None
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_low, grad_w0, grad_w1, grad_b1)`` (in ``dtypes``, the parameters' three): all but
    the input's gradient, which is ``grad_low @ w0`` (left to the caller, who may add it into
    another matmul's result)."""
    dtype = low.dtype  # the matmuls' dtype in forward (autocast's, when it was on)
    grad_logits, grad_bias = _log_gates_pair_grad(grad_fwd, fwd, grad_rev, rev, normalizer, bias_grad=True)
    if grad_logits.dtype != dtype:  # (the bias's gradient sums the values the matmuls take)
        grad_logits = grad_logits.to(dtype)
        grad_bias = _sum_to_last(grad_logits)
    grad_logits = grad_logits.reshape(-1, grad_logits.shape[-1])
    rows_low, rows_x = low.reshape(-1, low.shape[-1]), x.reshape(-1, x.shape[-1]).to(dtype)
    grad_low = grad_logits @ w1.to(dtype)
    return (grad_low, (grad_low.t() @ rows_x).to(dtypes[0]), (grad_logits.t() @ rows_low).to(dtypes[1]),
            grad_bias.to(dtypes[2]))


class _LowRankLogGatesPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, w1, b1, normalizer):
        low, fwd, rev, w0_used, w1_used = _low_rank_log_gates_forward(x, w0, w1, b1, normalizer)
        # the rank-R projection is small (R = 16 per token); the gates are kept by the op anyway
        ctx.save_for_backward(x, low, w0_used, w1_used, fwd, rev)
        ctx.normalizer, ctx.dtypes = normalizer, (w0.dtype, w1.dtype, b1.dtype)
        return fwd, rev

    @staticmethod
    def backward(ctx, grad_fwd, grad_rev):
        x, low, w0, w1, fwd, rev = ctx.saved_tensors
        grad_low, *grad_weights = _low_rank_log_gates_backward(x, low, w0, w1, ctx.dtypes, fwd, rev,
                                                               ctx.normalizer, grad_fwd, grad_rev)
        grad_x = (grad_low @ w0.to(grad_low.dtype)).view(x.shape).to(x.dtype)
        return (grad_x, *grad_weights, None)


def low_rank_log_gates_pair(x: Tensor, w0: Tensor, w1: Tensor, b1: Tensor, normalizer: float
                            ) -> tuple[Tensor, Tensor]:
    """:func:`log_gates_pair` of ``(x @ w0ᵀ) @ w1ᵀ + b1``: ViG's low-rank gate projection and its
    log gates, as two contiguous ``[..., K]`` tensors (``w1``: ``[2K, R]``). On CUDA one kernel
    reads ``x`` once and writes the rank-R projection and the gates only (vig.triton_matmuls);
    saves ``x``, the rank-R projection and the gates."""
    if w1.shape[0] % 2:
        raise ValueError(f"w1: expected an even number of rows [2K, R], got shape {tuple(w1.shape)}")
    return _LowRankLogGatesPair.apply(x, w0, w1, b1, normalizer)


def log_gates(logits: Tensor, normalizer: float) -> Tensor:
    """``logsigmoid(logits) / normalizer`` (ViG's log forget gates); backward works from the
    output, so the logits are not kept."""
    return _LogGates.apply(logits, normalizer)


def _swiglu_backward(grad_out: Tensor, projected: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``(silu(gate) · value) @ weightᵀ`` w.r.t. ``projected = [gate, value]`` and
    ``weight``, in the dtype of ``grad_out`` (the product is recomputed, not kept)."""
    grad_product = grad_out @ weight.to(grad_out.dtype)
    if triton_kernels.enabled_for(projected, grad_product):
        # one pass: the gradient of [gate, value] and the product (vig.triton_backward)
        grad_projected, product = triton_backward.swiglu_backward(projected, grad_product)
    else:
        gate, value = projected.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        product = gate * sig * value
        grad_gate = grad_product * value * sig * (1 + gate * (1 - sig))
        grad_value = grad_product * gate * sig
        grad_projected = torch.cat([grad_gate, grad_value], dim=-1)
    grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
    return grad_projected, grad_weight.to(weight.dtype)


def _swiglu_product(projected: Tensor) -> Tensor:
    if triton_kernels.enabled_for(projected):
        return triton_kernels.swiglu_product(projected)
    gate, value = projected.chunk(2, dim=-1)
    return F.silu(gate) * value


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, weight):
        product = _swiglu_product(projected)
        ctx.save_for_backward(projected, weight)
        return F.linear(product, weight.to(product.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        projected, weight = ctx.saved_tensors
        return _swiglu_backward(grad_out, projected, weight)


def _matmul_dtype(x: Tensor, *weights: Tensor):
    """The dtype ``F.linear(x, weight)`` computes in (autocast's, or the shared dtype), or None
    where it would raise (mixed dtypes without autocast): the PyTorch form then raises."""
    dtype = _autocast_dtype(x)
    if dtype is not None:
        return dtype
    return x.dtype if all(w.dtype == x.dtype for w in weights) else None


class _SwiGLUMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_weight, out_weight):
        dtype = _matmul_dtype(x, in_weight)
        w_in = in_weight
        if dtype is not None and triton_kernels.enabled_for(x, in_weight):
            # the projection and the product in one kernel: [gate, value] is never written
            w_in = _cast(in_weight, dtype)
            product = triton_matmuls.swiglu_matmul(_cast(x, dtype), w_in)
        else:
            projected = F.linear(x, in_weight)  # under autocast: in the autocast dtype
            dtype = projected.dtype
            product = _swiglu_product(projected)
        w_out = out_weight.to(product.dtype)
        # the weights kept as the matmuls used them (cast, under autocast): no casts in backward
        ctx.save_for_backward(x, w_in, w_out)
        ctx.compute_dtype, ctx.weight_dtypes = dtype, (in_weight.dtype, out_weight.dtype)
        return F.linear(product, w_out)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_in, w_out = ctx.saved_tensors
        dtype = ctx.compute_dtype
        # the same casts and matmul as forward (autocast's, when it was on): the same projection
        x_c, w_in = x.to(dtype), w_in.to(dtype)
        projected = F.linear(x_c, w_in)
        grad_projected, grad_out_weight = _swiglu_backward(grad_out.to(dtype), projected, w_out)
        grad_x = grad_projected @ w_in
        grad_in_weight = grad_projected.reshape(-1, grad_projected.shape[-1]).t() @ x_c.reshape(-1, x_c.shape[-1])
        in_dtype, out_dtype = ctx.weight_dtypes
        return grad_x.to(x.dtype), grad_in_weight.to(in_dtype), grad_out_weight.to(out_dtype)


def swiglu_mlp(x: Tensor, in_weight: Tensor, out_weight: Tensor) -> Tensor:
    """``(silu(gate) · value) @ out_weightᵀ`` with ``[gate, value] = (x @ in_weightᵀ).chunk(2, -1)``;
    keeps only ``x`` (and the weights) for backward, where the projection is recomputed."""
    return _SwiGLUMLP.apply(x, in_weight, out_weight)


def swiglu_linear(projected: Tensor, weight: Tensor) -> Tensor:
    """``(silu(gate) · value) @ weightᵀ`` with ``[gate, value] = projected.chunk(2, -1)``."""
    return _SwiGLULinear.apply(projected, weight)
