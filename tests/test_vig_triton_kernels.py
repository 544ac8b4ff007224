"""The Triton forward kernels of ``vig.triton_kernels`` against float64 formulas, and the
``vig.fused`` functions with and without them.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest) with ``VIG_TRITON_KERNELS=1`` forced here; on a GPU
they run on CUDA tensors as in the models.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vig import fused, triton_backward, triton_kernels, triton_matmuls
from vig.mixer_projections import mixer_projections

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: the rounding unit of each output dtype: the kernels compute in float32 and round once
UNIT = {torch.float32: 2e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
if DEVICE == "cpu":
    # Triton's interpreter converts float32 to bfloat16 by truncation, not to nearest: twice
    # the error bound (on a GPU the kernels round to nearest and the bound above holds)
    UNIT[torch.bfloat16] = 2.0**-7


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setattr(triton_kernels, "MODE", "1")
    if DEVICE == "cpu" and not triton_kernels._interpreting():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")


def _rand(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(ours).any(), "NaN in the kernel's result"
    return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _rms64(x, w, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("width", [1, 17, 64, 192, 300])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_against_float64(width, out_dtype):
    gen = torch.Generator().manual_seed(width)
    # rows of very different scales, one all-zero row (its result must be 0, not NaN)
    x = _rand(gen, 37, width) * torch.logspace(-3, 3, 37, device=DEVICE)[:, None]
    x[5] = 0
    w = _rand(gen, width)
    y = triton_kernels.rms_norm(x, w, 1e-6, out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    assert torch.all(y[5] == 0)
    assert _rel_err(y, _rms64(x, w, 1e-6)) <= UNIT[out_dtype]


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_strided_rows(in_dtype):
    gen = torch.Generator().manual_seed(1)
    base = _rand(gen, 6, 5, 40, dtype=in_dtype)
    x = base[:, ::2, 3:27]  # rows with a gap between them: read in place
    w = _rand(gen, 24)
    y = triton_kernels.rms_norm(x, w, 1e-5, torch.float32)
    assert _rel_err(y, _rms64(x, w, 1e-5)) <= UNIT[torch.float32]


def _norm_conv_act64(x, nw, eps, cw, act):
    n = _rms64(x, nw, eps)
    kh, kw = cw.shape[-2:]
    y = F.conv2d(n.permute(0, 3, 1, 2), cw.double(), padding=(kh // 2, kw // 2), groups=cw.shape[0])
    y = y.permute(0, 2, 3, 1)
    return F.silu(y) if act else y


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 5, 7, 24), (1, 9, 33, 17), (1, 4, 3, 192)])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 5)])
@pytest.mark.parametrize("act", [False, True])
def test_norm_dwconv_act_against_float64(shape, kernel, act):
    gen = torch.Generator().manual_seed(sum(shape) + kernel[1])
    C = shape[-1]
    x = _rand(gen, *shape, scale=10.0)
    nw, cw = _rand(gen, C), _rand(gen, C, 1, *kernel)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = triton_kernels.norm_dwconv_act(x, nw, 1e-6, cw, act, out_dtype)
        assert y.dtype == out_dtype and y.shape == x.shape
        assert _rel_err(y, _norm_conv_act64(x, nw, 1e-6, cw, act)) <= UNIT[out_dtype]


def test_norm_dwconv_act_strided_input_and_channels_last_weight():
    gen = torch.Generator().manual_seed(7)
    big = _rand(gen, 2, 6, 12, 20)
    x = big[:, 1:, ::2, :16]  # every stride but the channels' is irregular
    nw = _rand(gen, 16)
    w = _rand(gen, 16, 1, 3, 3)
    # the layout ViG keeps its convolution weight in (see GatedLinearAttention2D)
    cl = torch.empty_strided(w.shape, (9, 1, 3, 1), dtype=w.dtype, device=w.device).copy_(w)
    y = triton_kernels.norm_dwconv_act(x, nw, 1e-6, cl, True, torch.float32)
    assert _rel_err(y, _norm_conv_act64(x, nw, 1e-6, w, True)) <= UNIT[torch.float32]


@pytest.mark.parametrize("branch_dtype", [torch.float32, torch.bfloat16])
def test_add_norm_dwconv_act_against_float64(branch_dtype):
    """The residual add fused with the norm's statistics: ``s = x + branch`` exactly as
    PyTorch adds them (promoted dtype), and the convolution of ``RMSNorm(s)``."""
    gen = torch.Generator().manual_seed(9)
    x = _rand(gen, 2, 5, 7, 24, scale=10.0)
    branch = _rand(gen, 2, 5, 7, 24, dtype=branch_dtype)
    nw, cw = _rand(gen, 24), _rand(gen, 24, 1, 3, 3)
    s, y = triton_kernels.norm_dwconv_act(x, nw, 1e-6, cw, True, torch.bfloat16, branch=branch)
    assert s.dtype == torch.float32 and torch.equal(s, x + branch)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, _norm_conv_act64(s, nw, 1e-6, cw, True)) <= UNIT[torch.bfloat16]


def _mix64(a, b, z, wa, wb, eps, act):
    g = torch.sigmoid(z.double())
    m = g * _rms64(a, wa, eps) + (1 - g) * _rms64(b, wb, eps)
    return F.silu(m) if act else m


@pytest.mark.parametrize("head_dim", [1, 17, 64])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [False, True])
def test_mix_against_float64(head_dim, in_dtype, act):
    gen = torch.Generator().manual_seed(head_dim)
    a, b = _rand(gen, 3, 11, 2, head_dim, scale=5.0, dtype=in_dtype), _rand(gen, 3, 11, 2, head_dim, dtype=in_dtype)
    z = _rand(gen, 3, 11, 2, head_dim, scale=30.0, dtype=in_dtype)  # saturated sigmoids included
    wa, wb = _rand(gen, head_dim), _rand(gen, head_dim)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = triton_kernels.mix_global_local(a, b, z, wa, wb, 1e-6, act, out_dtype)
        assert y.dtype == out_dtype and y.shape == a.shape
        assert _rel_err(y, _mix64(a, b, z, wa, wb, 1e-6, act)) <= UNIT[out_dtype]


@pytest.mark.parametrize("hidden", [1, 5, 512, 700])
def test_swiglu_product_against_float64(hidden):
    gen = torch.Generator().manual_seed(hidden)
    for dtype in (torch.float32, torch.bfloat16):
        p = _rand(gen, 2, 13, 2 * hidden, scale=4.0, dtype=dtype)
        y = triton_kernels.swiglu_product(p)
        gate, value = p.double().chunk(2, -1)
        assert y.dtype == dtype and y.shape == (2, 13, hidden)
        assert _rel_err(y, F.silu(gate) * value) <= UNIT[dtype]


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 13, 17, 5), (3, 40, 192, 512), (70, 96, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_matmul_against_float64(shape, dtype):
    """The MLP's projection and product in one kernel: rows past a tile, odd widths, K = 1."""
    *lead, k, hidden = shape
    gen = torch.Generator().manual_seed(k * hidden)
    x = _rand(gen, *lead, k, dtype=dtype)
    w = _rand(gen, 2 * hidden, k, scale=k**-0.5, dtype=dtype)
    y = triton_matmuls.swiglu_matmul(x, w)
    gate, value = (x.double() @ w.double().T).chunk(2, -1)
    assert y.dtype == dtype and y.shape == (*lead, hidden)
    assert _rel_err(y, F.silu(gate) * value) <= UNIT[dtype]


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 9, 24, 16, 12), (130, 192, 16, 96), (5, 33, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_log_gates_pair_against_float64(shape, dtype):
    """The gate projection's two matmuls and log gates in one kernel, with logits from far below
    zero (gates near -1e4/16) to far above (gates that round to 0 in a naive formula)."""
    *lead, c, r, ng = shape
    gen = torch.Generator().manual_seed(c * r + ng)
    x = _rand(gen, *lead, c, dtype=dtype)
    w0 = _rand(gen, r, c, scale=c**-0.5, dtype=dtype)
    w1 = _rand(gen, 2 * ng, r, scale=30.0, dtype=dtype)
    b1 = _rand(gen, 2 * ng, scale=30.0)
    low, fwd, rev = triton_matmuls.low_rank_log_gates_pair(x, w0, w1, b1, 16.0)
    assert _rel_err(low, x.double() @ w0.double().T) <= UNIT[dtype]
    # the logits from the projection as stored (the second matmul's operand, rounded once)
    logits = low.double() @ w1.double().T + b1.double()
    gates = F.logsigmoid(logits) / 16
    # each gate to its own accuracy: one rounding of the result, plus the float32 logit's error
    # (a sum of R + 1 terms, <= 2^-20 of their magnitudes) times the gate's slope, down to the
    # dtype's normal range (a gate of -1e-78 stores as 0)
    logit_err = 2.0**-20 * (low.double().abs() @ w1.double().abs().T + b1.double().abs())
    bound = UNIT[dtype] * gates.abs() + torch.sigmoid(-logits) / 16 * logit_err + torch.finfo(dtype).tiny
    for ours, ref, ok in ((fwd, gates[..., :ng], bound[..., :ng]), (rev, gates[..., ng:], bound[..., ng:])):
        assert ours.dtype == dtype and ours.shape == (*lead, ng) and ours.is_contiguous()
        assert not torch.isnan(ours).any()
        assert ((ours.double() - ref).abs() <= ok).all()


@pytest.mark.parametrize("hidden", [1, 5, 512, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_against_float64(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden + 1)
    p = _rand(gen, 3, 11, 2 * hidden, scale=4.0, dtype=dtype)
    g = _rand(gen, 3, 11, hidden, dtype=dtype)
    grad, product = triton_backward.swiglu_backward(p, g)
    p64 = p.double().requires_grad_()
    gate, value = p64.chunk(2, -1)
    ref_product = F.silu(gate) * value
    (ref_grad,) = torch.autograd.grad(ref_product, p64, g.double())
    assert grad.dtype == product.dtype == dtype and grad.shape == p.shape and product.shape == g.shape
    assert _rel_err(grad, ref_grad) <= UNIT[dtype]
    assert _rel_err(product, ref_product.detach()) <= UNIT[dtype]


@pytest.mark.parametrize("head_dim", [2, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [False, True])
def test_mix_backward_against_float64(head_dim, dtype, act):
    """Every gradient of the mix from one kernel: rows of very different scales (the norms), the
    norm weights' gradients summed over rows from per-program partial sums. (Not D = 1: a
    one-wide RMSNorm's gradient is eps-sized, and its float32 formula, PyTorch's included,
    cancels to ~1e-3 relative.)"""
    gen = torch.Generator().manual_seed(head_dim + 7)
    rows = torch.logspace(-2, 2, 37, dtype=torch.float64)[:, None, None].to(DEVICE)
    a = (_rand(gen, 37, 3, head_dim, dtype=torch.float64) * rows).to(dtype)
    b, z, g = (_rand(gen, 37, 3, head_dim, scale=2.0, dtype=dtype) for _ in range(3))
    wa, wb = _rand(gen, head_dim), _rand(gen, head_dim)
    ours = triton_backward.mix_backward(a, b, z, wa, wb, 1e-6, act, g)
    leaves = [t.double().requires_grad_() for t in (a, b, z, wa, wb)]
    na, nb = _rms64(leaves[0], leaves[3], 1e-6), _rms64(leaves[1], leaves[4], 1e-6)
    m = nb + torch.sigmoid(leaves[2]) * (na - nb)
    refs = torch.autograd.grad(F.silu(m) if act else m, leaves, g.double())
    for name, o, r, t in zip("a b z wa wb".split(), ours, refs, (a, b, z, wa, wb)):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        # one rounding of each result; the weights' sums in float32 over 111 rows
        assert _rel_err(o, r) <= 2 * UNIT[o.dtype], name


@pytest.mark.parametrize("width", [2, 17, 192, 300])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_backward_against_float64(width, residual):
    """RMSNorm's input and weight gradients in one pass, rows of very different scales, with and
    without a residual gradient added; the incoming gradient in bfloat16 as in the models."""
    gen = torch.Generator().manual_seed(width + residual)
    x = _rand(gen, 37, width) * torch.logspace(-3, 3, 37, device=DEVICE)[:, None]
    w = _rand(gen, width)
    g = _rand(gen, 37, width, dtype=torch.bfloat16)
    res = _rand(gen, 37, width) if residual else None
    grad_x, grad_w = triton_backward.rms_norm_backward(x, w, 1e-6, g, res)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref_x, ref_w = torch.autograd.grad(_rms64(x64, w64, 1e-6), (x64, w64), g.double())
    if residual:
        ref_x = ref_x + res.double()
    assert grad_x.dtype == x.dtype and grad_w.dtype == w.dtype
    assert _rel_err(grad_x, ref_x) <= 2 * UNIT[torch.float32]
    assert _rel_err(grad_w, ref_w) <= 2 * UNIT[torch.float32]


def _dwconv_grads64(x, g, w):
    """A depth-wise 'same' convolution's input and weight gradients, float64, by PyTorch."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    kh, kw = w.shape[-2:]
    y = F.conv2d(x64.permute(0, 3, 1, 2), w64, padding=(kh // 2, kw // 2), groups=w.shape[0])
    return torch.autograd.grad(y.permute(0, 2, 3, 1), (x64, w64), g.double())


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 5, 7, 24), (1, 9, 33, 17), (2, 6, 10, 40)])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 5), (5, 3)])
@pytest.mark.parametrize("row_blocks, small_blocks", [(128, False), (2, False), (128, True)])
def test_depthwise_conv_backward_against_float64(monkeypatch, shape, kernel, row_blocks, small_blocks):
    """Both gradients of the convolution in one pass: programs of one image row or several
    (``row_blocks``), rows wider than one piece of pixels (33 > 8), taps cut by every edge,
    and with ``small_blocks`` channels past a block (40 > 16; the default block of 64 holds
    every channel count here); the input and gradient in bfloat16 as in the models."""
    monkeypatch.setitem(triton_backward.DWCONV_BACKWARD_LAUNCH, "row_blocks", row_blocks)
    if small_blocks:
        monkeypatch.setitem(triton_backward.DWCONV_BACKWARD_LAUNCH, "BLOCK_C", 16)
    gen = torch.Generator().manual_seed(sum(shape) + kernel[0] + row_blocks)
    C = shape[-1]
    x = _rand(gen, *shape, dtype=torch.bfloat16)
    g = _rand(gen, *shape, dtype=torch.bfloat16)
    w = _rand(gen, C, 1, *kernel, dtype=torch.bfloat16)
    ref_x, ref_w = _dwconv_grads64(x, g, w)
    for out_dtype in (torch.float32, torch.bfloat16):
        grad_x, grad_w = triton_backward.depthwise_conv_backward(x, g, w, out_dtype, torch.float32)
        assert grad_x.dtype == out_dtype and grad_x.shape == x.shape and grad_x.is_contiguous()
        assert grad_w.dtype == torch.float32 and grad_w.shape == w.shape
        assert _rel_err(grad_x, ref_x) <= UNIT[out_dtype]
        # float32 sums of up to ~600 products per program, then over the programs
        assert _rel_err(grad_w, ref_w) <= 8 * UNIT[torch.float32]


def test_depthwise_conv_backward_strided_inputs_and_channels_last_weight():
    gen = torch.Generator().manual_seed(5)
    x = _rand(gen, 2, 6, 12, 20)[:, 1:, ::2, :16]  # every stride but the channels' is irregular
    g = _rand(gen, 2, 5, 6, 32)[..., ::2]  # a channel stride of 2: copied
    w = _rand(gen, 16, 1, 3, 3)
    cl = torch.empty_strided(w.shape, (9, 1, 3, 1), dtype=w.dtype, device=w.device).copy_(w)
    grad_x, grad_w = triton_backward.depthwise_conv_backward(x, g, cl)
    ref_x, ref_w = _dwconv_grads64(x, g, w)
    assert grad_w.dtype == cl.dtype
    assert _rel_err(grad_x, ref_x) <= 2 * UNIT[torch.float32]
    assert _rel_err(grad_w, ref_w) <= 8 * UNIT[torch.float32]


def test_depthwise_conv_backward_rejects_other_shapes():
    x = torch.zeros(1, 4, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="grad: expected the shape of x"):
        triton_backward.depthwise_conv_backward(x, x[..., :4], torch.zeros(8, 1, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="weight: expected"):
        triton_backward.depthwise_conv_backward(x, x, torch.zeros(8, 1, 2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="weight: expected"):
        triton_backward.depthwise_conv_backward(x, x, torch.zeros(4, 1, 3, 3, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_backward_against_float64(dtype):
    gen = torch.Generator().manual_seed(9)
    y = _rand(gen, 5, 333, scale=6.0)
    g = _rand(gen, 5, 333, dtype=dtype)
    y64 = y.double().requires_grad_()
    (ref,) = torch.autograd.grad(F.silu(y64), y64, g.double())
    out = triton_backward.silu_backward(y, g, dtype)
    assert out.dtype == dtype and out.shape == y.shape
    assert _rel_err(out, ref) <= UNIT[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unused", [None, "fwd", "rev"])
def test_log_gates_pair_backward_against_float64(dtype, unused):
    """The logits' gradient from the gates alone, for logits from -1e4 to +90 (slopes from 1 to
    e^-90: a plain exp(x) - 1 loses the small ones), with one direction unused (gradient 0)."""
    z = torch.cat([torch.linspace(-1e4, 90, 44, dtype=torch.float64), torch.linspace(2, 40, 44, dtype=torch.float64),
                   torch.randn(44, generator=torch.Generator().manual_seed(4), dtype=torch.float64)])
    z = z.view(4, 33).to(dtype).to(DEVICE)
    gates = F.logsigmoid(z.double()) / 16
    fwd, rev = gates[:, :16].to(dtype).contiguous(), gates[:, 16:32].to(dtype).contiguous()
    gen = torch.Generator().manual_seed(5)
    grad_f, grad_r = _rand(gen, 4, 16, dtype=dtype), _rand(gen, 4, 16, dtype=dtype)
    grad_f, grad_r = (None if unused == "fwd" else grad_f), (None if unused == "rev" else grad_r)
    out = triton_backward.log_gates_pair_backward(grad_f, fwd, grad_r, rev, 16.0)
    # the exact slope at the stored gates: sigmoid(-z) = -expm1(16 · gate), over 16
    ref = [torch.zeros(4, 16, dtype=torch.float64, device=DEVICE) if g is None else
           g.double() * -torch.expm1(16 * gate.double()) / 16 for g, gate in ((grad_f, fwd), (grad_r, rev))]
    ref = torch.cat(ref, -1)
    assert out.dtype == dtype and out.shape == (4, 32) and not torch.isnan(out).any()
    tiny = torch.finfo(dtype).tiny
    assert ((out.double() - ref).abs() <= UNIT[dtype] * ref.abs() + tiny).all()


@pytest.mark.parametrize("unused", [None, "rev"])
def test_log_gates_pair_backward_column_sums(unused):
    """With ``column_sums``, the same gradient bit for bit and its sum over every row (the gate
    bias's gradient) in float32, over several programs' rows (64 a program at K = 20) and a
    partial last one."""
    gen = torch.Generator().manual_seed(6)
    fwd, rev = (F.logsigmoid(_rand(gen, 3, 101, 20, scale=4.0)) / 16 for _ in range(2))
    fwd, rev = fwd.to(torch.bfloat16).contiguous(), rev.to(torch.bfloat16).contiguous()
    grad_f = _rand(gen, 3, 101, 20, dtype=torch.bfloat16)
    grad_r = None if unused == "rev" else _rand(gen, 3, 101, 20, dtype=torch.bfloat16)
    plain = triton_backward.log_gates_pair_backward(grad_f, fwd, grad_r, rev, 16.0)
    out, sums = triton_backward.log_gates_pair_backward(grad_f, fwd, grad_r, rev, 16.0, column_sums=True)
    assert torch.equal(out, plain)
    assert sums.dtype == torch.float32 and sums.shape == (40,)
    ref = out.double().sum((0, 1))
    assert _rel_err(sums, ref) <= 1e-6
    if unused == "rev":
        assert not sums[20:].any()


@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 7), (1000, 192), (2, 517, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_column_sums_against_float64(shape, dtype):
    """A bias's gradient: float32 sums over every dimension but the last, over one program or
    many (32 rows a program at 192 columns, 16 at 300) with a partial last one."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = _rand(gen, *shape, scale=3.0, dtype=dtype) + 1.0  # (a common offset: sums far from 0)
    got = triton_backward.column_sums(x)
    assert got.dtype == torch.float32 and got.shape == (shape[-1],)
    assert _rel_err(got, x.double().reshape(-1, shape[-1]).sum(0)) <= 1e-6


def _with_and_without_kernels(monkeypatch, fn, *inputs):
    """(result, grads) of ``fn`` through the kernels, then through the PyTorch forms."""
    out = []
    for mode in ("1", "0"):
        monkeypatch.setattr(triton_kernels, "MODE", mode)
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y = fn(*leaves)
        grads = torch.autograd.grad(y.float().square().sum(), [t for t in leaves if t.requires_grad])
        out.append((y.detach(), grads))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_functions_same_result_and_gradients_with_kernels(monkeypatch, dtype):
    """The kernels replace the forwards only: same dtype, same values within rounding, and
    backward (recomputed in PyTorch from the saved inputs) gives the same gradients."""
    gen = torch.Generator().manual_seed(11)
    x = _rand(gen, 2, 4, 5, 12, dtype=dtype)
    nw, cw = _rand(gen, 12), _rand(gen, 12, 1, 3, 3, dtype=dtype)
    a, b, z = (_rand(gen, 2, 20, 3, 4, dtype=dtype) for _ in range(3))
    wa, wb, wo = _rand(gen, 4), _rand(gen, 4), _rand(gen, 6, 12, dtype=dtype)
    p, w_out = _rand(gen, 2, 20, 16, dtype=dtype), _rand(gen, 5, 8, dtype=dtype)
    cases = {
        "rms_norm": (lambda x, w: fused.rms_norm(x, w, 1e-6), (x, nw)),
        "norm_conv_act": (lambda x, nw, cw: fused.norm_conv_act(x, nw, 1e-6, cw, True), (x, nw, cw)),
        # both outputs (the sum and the convolution), so both gradient paths are checked
        "add_norm_conv_act": (lambda x, b, nw, cw: torch.cat(fused.add_norm_conv_act(x, b, nw, 1e-6, cw, True), -1),
                              (x, x.flip(1), nw, cw)),
        "mix": (lambda *t: fused.mix_global_local(*t, 1e-6, True), (a, b, z, wa, wb)),
        "mix_proj": (lambda a, b, z, wa, wb, wo: fused.mix_global_local(a, b, z, wa, wb, 1e-6, False, wo),
                     (a, b, z, wa, wb, wo)),
        "swiglu_linear": (fused.swiglu_linear, (p, w_out)),
        "swiglu_mlp": (fused.swiglu_mlp, (x, _rand(gen, 16, 12, dtype=dtype), w_out)),
        "low_rank_log_gates_pair": (
            lambda x, w0, w1, b1: torch.cat(fused.low_rank_log_gates_pair(x, w0, w1, b1, 16.0), -1),
            (x, _rand(gen, 3, 12, dtype=dtype), _rand(gen, 8, 3, scale=4.0, dtype=dtype), _rand(gen, 8, dtype=dtype))),
        # q, k, v (key dim 4, values 12), the gates (rank 3) and the mix gate's logits with
        # their biases: the biases' gradients are the kernels' column sums when they run
        "mixer_projections": (
            lambda *t: torch.cat(mixer_projections(t[0], t[1], 4, *t[2:], 16.0), -1),
            (x, _rand(gen, 20, 12, dtype=dtype), _rand(gen, 12, 12, dtype=dtype), _rand(gen, 12, dtype=dtype),
             _rand(gen, 3, 12, dtype=dtype), _rand(gen, 8, 3, scale=4.0, dtype=dtype), _rand(gen, 8, dtype=dtype))),
    }
    for name, (fn, inputs) in cases.items():
        (y_k, g_k), (y_t, g_t) = _with_and_without_kernels(monkeypatch, fn, *inputs)
        assert y_k.dtype == y_t.dtype, name
        assert _rel_err(y_k, y_t.double()) <= 2 * UNIT[y_t.dtype], name
        for gk, gt in zip(g_k, g_t):
            # the loss is computed from the result, which differs by rounding: so do gradients
            assert _rel_err(gk, gt.double()) <= 4 * UNIT[dtype], name


@pytest.mark.skipif(DEVICE != "cuda", reason="autocast dtypes: checked on a GPU (CPU autocast keeps rms_norm's dtype)")
def test_autocast_result_dtypes_match_pytorch(monkeypatch):
    gen = torch.Generator().manual_seed(12)
    x = _rand(gen, 2, 4, 5, 12)
    nw, cw = _rand(gen, 12), _rand(gen, 12, 1, 3, 3)
    a, b, z = (_rand(gen, 2, 20, 3, 4, dtype=torch.bfloat16) for _ in range(3))
    wa, wb, wo = _rand(gen, 4), _rand(gen, 4), _rand(gen, 6, 12)
    calls = [
        lambda: fused.rms_norm(x, nw, 1e-6),
        lambda: fused.rms_norm(x, nw, 1e-6, to_autocast_dtype=True),
        lambda: fused.norm_conv_act(x, nw, 1e-6, cw, True),
        lambda: fused.mix_global_local(a, b, z, wa, wb, 1e-6, True),
        lambda: fused.mix_global_local(a, b, z, wa, wb, 1e-6, True, wo),
        lambda: fused.swiglu_mlp(x, _rand(gen, 10, 12), wo[:, :5]),
        lambda: fused.low_rank_log_gates_pair(x, _rand(gen, 3, 12), _rand(gen, 8, 3), _rand(gen, 8), 16.0)[1],
    ]
    for call in calls:
        dtypes = []
        for mode in ("1", "0"):
            monkeypatch.setattr(triton_kernels, "MODE", mode)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                dtypes.append(call().dtype)
        assert dtypes[0] == dtypes[1]


def test_tf32_switches_read_after_mixing_pytorchs_two_apis():
    """The float32 matmul and convolution kernels follow PyTorch's tf32 switches, also in a
    process that set the legacy ``allow_tf32`` flags and then the per-backend ``fp32_precision``
    (reading the legacy flags then raises; a subprocess: the mixed state cannot be undone)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend precision API")
    code = (
        "import torch\n"
        "from glakernels._precision import tf32_allowed as _tf32_allowed\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "torch.backends.cudnn.allow_tf32 = True\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'\n"
        "print(_tf32_allowed('matmul'), _tf32_allowed('conv'))\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "torch.backends.cudnn.conv.fp32_precision = 'tf32'\n"
        "print(_tf32_allowed('matmul'), _tf32_allowed('conv'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["False False", "True True"]


def test_mode_off_and_float64_stay_in_pytorch(monkeypatch):
    x = torch.ones(2, 3, device=DEVICE)
    assert triton_kernels.enabled_for(x)
    assert not triton_kernels.enabled_for(x.double())
    monkeypatch.setattr(triton_kernels, "MODE", "0")
    assert not triton_kernels.enabled_for(x)


@pytest.mark.parametrize("width", [1, 17, 192])
def test_add_rms_norm_against_float64(width):
    gen = torch.Generator().manual_seed(width + 5)
    x = _rand(gen, 2, 9, width, scale=30.0)  # a float32 residual stream ...
    branch = _rand(gen, 2, 9, width, dtype=torch.bfloat16)  # ... plus a bfloat16 branch, as under autocast
    w = _rand(gen, width)
    total, normed = triton_kernels.add_rms_norm(x, branch, w, 1e-6, torch.bfloat16)
    exact = x.double() + branch.double()
    assert total.dtype == torch.float32 and normed.dtype == torch.bfloat16
    assert _rel_err(total, exact) <= UNIT[torch.float32]
    assert _rel_err(normed, _rms64(exact, w, 1e-6)) <= UNIT[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_gates_pair_against_float64(dtype):
    # hostile logits: far below zero (gates near -1e4/16), far above (gates that round to 0 in
    # a naive log(1 + exp(-z))), and ordinary ones
    z = torch.cat([torch.linspace(-1e4, 90, 60, dtype=torch.float64),
                   torch.randn(60, generator=torch.Generator().manual_seed(3), dtype=torch.float64)])
    z = z.view(4, 30).to(dtype).to(DEVICE)
    fwd, rev = triton_kernels.log_gates_pair(z, 16.0)
    exact = F.logsigmoid(z.double()) / 16
    assert fwd.is_contiguous() and rev.is_contiguous() and fwd.dtype == dtype
    for ours, ref in ((fwd, exact[:, :15]), (rev, exact[:, 15:])):
        assert not torch.isnan(ours).any()
        # every element to its own relative accuracy (tiny gates included), not just in norm
        assert ((ours.double() - ref).abs() <= UNIT[dtype] * ref.abs() + 1e-30).all()


def test_fused_pair_functions_same_result_and_gradients_with_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(13)
    x, branch, w = _rand(gen, 3, 7, 24), _rand(gen, 3, 7, 24, dtype=torch.bfloat16), _rand(gen, 24)
    z = _rand(gen, 3, 7, 32, scale=4.0, dtype=torch.bfloat16)
    cases = {
        "add_rms_norm": (lambda x, b, w: torch.cat([t.float() for t in fused.add_rms_norm(x, b, w, 1e-6)], -1),
                         (x, branch, w)),
        "log_gates_pair": (lambda z: torch.cat(fused.log_gates_pair(z, 16.0), -1), (z,)),
    }
    for name, (fn, inputs) in cases.items():
        (y_k, g_k), (y_t, g_t) = _with_and_without_kernels(monkeypatch, fn, *inputs)
        assert _rel_err(y_k, y_t.double()) <= 2 * UNIT[torch.bfloat16], name
        for gk, gt in zip(g_k, g_t):
            assert _rel_err(gk, gt.double()) <= 4 * UNIT[torch.bfloat16], name


@pytest.mark.parametrize("width", [1, 17, 96, 192])
@pytest.mark.parametrize("act", [False, True])
def test_layer_norm_act_against_float64(width, act):
    gen = torch.Generator().manual_seed(width + act)
    # an offset far larger than the spread: the variance must come from centred values
    x = _rand(gen, 3, 11, width, scale=2.0) + 100.0
    w, b = _rand(gen, width), _rand(gen, width)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = triton_kernels.layer_norm_act(x, w, b, 1e-5, act, out_dtype)
        ref = F.layer_norm(x.double(), (width,), w.double(), b.double(), 1e-5)
        ref = F.silu(ref) if act else ref
        assert y.dtype == out_dtype
        # float32 inputs near 100 carry ~1e-5 absolute error into the centred values
        assert _rel_err(y, ref) <= max(UNIT[out_dtype], 1e-4 if width > 1 else UNIT[out_dtype])


@pytest.mark.parametrize("width", [1, 17, 96, 192])
@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_act_backward_against_float64(width, act, dtype):
    """LayerNorm's (and SiLU's) gradients in one pass: rows of very different scales and
    offsets, the output gradient in bfloat16 as under autocast; the weight and bias gradients
    are float32 sums over 37 rows."""
    gen = torch.Generator().manual_seed(width + 2 * act)
    # (an offset of three spreads: float32 centring loses ~1e-7 · offset / spread, see the forward's test)
    x = ((_rand(gen, 37, width) + 3.0) * torch.logspace(-2, 2, 37, device=DEVICE)[:, None]).to(dtype)
    w, b = _rand(gen, width), _rand(gen, width)
    g = _rand(gen, 37, width, dtype=torch.bfloat16)
    grad_x, grad_w, grad_b = triton_backward.layer_norm_act_backward(x, w, b, 1e-5, act, g)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y = F.layer_norm(x64, (width,), w64, b64, 1e-5)
    refs = torch.autograd.grad(F.silu(y) if act else y, (x64, w64, b64), g.double())
    assert (grad_x.dtype, grad_w.dtype, grad_b.dtype) == (dtype, w.dtype, b.dtype)
    for name, ours, ref in zip(("x", "weight", "bias"), (grad_x, grad_w, grad_b), refs):
        if width == 1 and name == "weight":  # LayerNorm's output is the bias alone: x_hat = 0
            assert torch.all(ours == 0), name
        elif width == 1 and name == "x":
            # the true gradient is 0; h - mean(h) of one element is 0 only without a fused
            # multiply-add (on a GPU, g·w - mean may become fma(g, w, -mean): the product's
            # rounding error), then scaled by rstd = 1/sqrt(eps) ≈ 316. (float64 PyTorch: ~1e-14)
            assert not torch.isnan(ours).any()
            assert ours.abs().max() <= 316 * 2**-23 * (g.abs().max() * w.abs().max() * 2), name
        else:
            assert _rel_err(ours, ref) <= 4 * UNIT[dtype if name == "x" else torch.float32], name


def test_layer_norm_act_same_result_and_gradients_with_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(17)
    x, w, b = _rand(gen, 2, 6, 5, 24, dtype=torch.bfloat16), _rand(gen, 24), _rand(gen, 24)
    fn = lambda x, w, b: fused.layer_norm_act(x, w, b, 1e-6, True, torch.float32)  # noqa: E731
    (y_k, g_k), (y_t, g_t) = _with_and_without_kernels(monkeypatch, fn, x, w, b)
    assert y_k.dtype == y_t.dtype == torch.float32
    assert _rel_err(y_k, y_t.double()) <= 1e-5
    for gk, gt in zip(g_k, g_t):
        assert _rel_err(gk, gt.double()) <= 4 * UNIT[torch.bfloat16]


@pytest.mark.parametrize(
    "geometry",
    # (B, C_in, H, W, C_out, kernel, stride, padding): ViG's first patch convolution on a small
    # image, odd sizes whose last windows cross the padding, more output channels than one tile
    [(2, 3, 40, 36, 96, 9, 8, 1), (1, 3, 17, 23, 20, 5, 4, 1), (1, 2, 9, 9, 130, 3, 2, 1)],
    ids=lambda g: "x".join(map(str, g)),
)
def test_patch_conv_against_float64(geometry, monkeypatch):
    # float32 operands stay float32 only with PyTorch's cuDNN tf32 switch off (it is on by default)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    B, C, H, W, C_out, ks, stride, pad = geometry
    gen = torch.Generator().manual_seed(H * W)
    x, w, b = _rand(gen, B, C, H, W), _rand(gen, C_out, C, ks, ks, scale=0.1), _rand(gen, C_out)
    ref = F.conv2d(x.double(), w.double(), b.double(), stride=stride, padding=pad).permute(0, 2, 3, 1)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = triton_kernels.patch_conv(x.contiguous(memory_format=layout), w, b, stride, pad, torch.float32)
        assert y.shape == ref.shape and y.is_contiguous()
        assert _rel_err(y, ref) <= 1e-5
    y = triton_kernels.patch_conv(x, w, b, stride, pad, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and _rel_err(y, ref) <= 4 * UNIT[torch.bfloat16]


def test_patch_conv_same_result_and_gradients_with_kernels(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 on both sides
    gen = torch.Generator().manual_seed(29)
    x, w, b = _rand(gen, 2, 3, 33, 35), _rand(gen, 12, 3, 9, 9, scale=0.1), _rand(gen, 12)
    fn = lambda x, w, b: fused.patch_conv(x, w, b, 8, 1)  # noqa: E731
    (y_k, g_k), (y_t, g_t) = _with_and_without_kernels(monkeypatch, fn, x, w, b)
    assert y_k.shape == y_t.shape == (2, 4, 4, 12)
    assert _rel_err(y_k, y_t.double()) <= 1e-5
    for gk, gt in zip(g_k, g_t):  # backward is PyTorch's in both: the same up to rounding
        assert _rel_err(gk, gt.double()) <= 1e-5


@pytest.mark.parametrize(
    "geometry",
    # as test_patch_conv_against_float64, and more pixels than one program sums (64 · 16)
    [(2, 3, 40, 36, 96, 9, 8, 1), (1, 3, 17, 23, 20, 5, 4, 1), (1, 2, 9, 9, 130, 3, 2, 1), (3, 3, 90, 94, 24, 3, 2, 1)],
    ids=lambda g: "x".join(map(str, g)),
)
def test_patch_conv_weight_grad_against_float64(geometry, monkeypatch):
    """The weight and bias gradients of the patch convolution from one kernel over the image as
    stored (NCHW or channels-last), against float64 autograd: output channels past one tile,
    windows cut by the padding, pixels split over several programs."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    B, C, H, W, C_out, ks, stride, pad = geometry
    gen = torch.Generator().manual_seed(H * W + 1)
    x, w, b = _rand(gen, B, C, H, W), _rand(gen, C_out, C, ks, ks, scale=0.1), _rand(gen, C_out)
    OH, OW = (H + 2 * pad - ks) // stride + 1, (W + 2 * pad - ks) // stride + 1
    grad = _rand(gen, B, OH, OW, C_out)
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    y64 = F.conv2d(x.double(), w64, b64, stride=stride, padding=pad).permute(0, 2, 3, 1)
    ref_w, ref_b = torch.autograd.grad(y64, [w64, b64], grad.double())
    for layout in (torch.contiguous_format, torch.channels_last):
        gw, gb = triton_backward.patch_conv_weight_grad(x.contiguous(memory_format=layout), grad, ks, stride, pad,
                                                        torch.float32)
        assert gw.shape == w.shape and gb.shape == b.shape and gw.dtype == gb.dtype == torch.float32
        assert _rel_err(gw, ref_w) <= 1e-5 and _rel_err(gb, ref_b) <= 1e-5
    # bfloat16 operands (as under autocast): the image and the gradient rounded once
    gw, gb = triton_backward.patch_conv_weight_grad(x, grad.bfloat16(), ks, stride, pad, torch.bfloat16)
    assert _rel_err(gw, ref_w) <= 4 * UNIT[torch.bfloat16] and _rel_err(gb, ref_b) <= 4 * UNIT[torch.bfloat16]
    with pytest.raises(ValueError, match="grad: expected"):
        triton_backward.patch_conv_weight_grad(x, grad[:, 1:], ks, stride, pad, torch.float32)


def test_patch_conv_gradients_with_a_frozen_image(monkeypatch):
    """Without the image's gradient (training) the weight and bias gradients come from the
    kernel: the same as PyTorch's convolution backward's, and None where not needed."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gen = torch.Generator().manual_seed(30)
    x, w, b = _rand(gen, 2, 3, 33, 35), _rand(gen, 12, 3, 9, 9, scale=0.1), _rand(gen, 12)
    grads = {}
    for mode in ("1", "0"):
        monkeypatch.setattr(triton_kernels, "MODE", mode)
        wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
        fused.patch_conv(x, wl, bl, 8, 1).square().sum().backward()
        grads[mode] = (wl.grad, bl.grad)
        wl = w.clone().requires_grad_()  # the bias frozen too
        fused.patch_conv(x, wl, b, 8, 1).square().sum().backward()
        assert wl.grad is not None
    for ours, theirs in zip(grads["1"], grads["0"]):
        assert _rel_err(ours, theirs.double()) <= 1e-5


def test_patch_conv_under_autocast_computes_in_autocast_dtype():
    gen = torch.Generator().manual_seed(31)
    x, w, b = _rand(gen, 1, 3, 24, 24), _rand(gen, 8, 3, 9, 9, scale=0.1), _rand(gen, 8)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = fused.patch_conv(x, w, b, 8, 1)
        theirs = F.conv2d(x, w, b, stride=8, padding=1)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    ref = F.conv2d(x.double(), w.double(), b.double(), stride=8, padding=1).permute(0, 2, 3, 1)
    assert _rel_err(ours, ref) <= 4 * UNIT[torch.bfloat16]


def test_fake_tensors_and_transforms_stay_in_pytorch():
    """Kernels need real memory: under a fake-tensor mode or vmap the PyTorch forms run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = torch.randn(2, 5, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        assert not triton_kernels.enabled_for(fx, fw)
        assert fused.rms_norm(fx, fw, 1e-6).shape == x.shape
    seen = []
    torch.func.vmap(lambda t: seen.append(triton_kernels.enabled_for(t)) or t)(x)
    assert seen == [False]


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_model_same_result_and_gradients_with_kernels(monkeypatch, name):
    """Every kernel wired into a whole (two-block) model: the output and every parameter's
    gradient as with the PyTorch forms, in float32."""
    import vig

    # float32 convolutions, not cuDNN's default tf32 (which the patch-embedding kernel follows):
    # two tf32 convolutions differ by ~1e-3, more than the float32 bound below
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    depth = dict(depth=2) if name == "vig_tiny" else dict(depths=(1, 1, 1, 1))
    # (no stochastic depth: the two runs must draw nothing at random)
    model = vig.create_model(name, img_size=64, num_classes=5, drop_path_rate=0.0, **depth).to(DEVICE)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    runs = []
    for mode in ("1", "0"):
        monkeypatch.setattr(triton_kernels, "MODE", mode)
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().sum().backward()
        runs.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (y_k, g_k), (y_t, g_t) = runs
    assert _rel_err(y_k, y_t.double()) <= 50 * UNIT[torch.float32]
    assert g_k.keys() == g_t.keys()
    for n in g_t:
        assert _rel_err(g_k[n], g_t[n].double()) <= 50 * UNIT[torch.float32], n
