"""DESIGN.md §5: custom op registration, gradcheck, torch.compile, strides, autocast."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gla_testing import Case, assert_close, backend_params, compile_recording_targets, make_inputs, outputs_and_grads
from glakernels import gated_linear_attention
from glakernels._dispatch import registry

BACKENDS = backend_params()


def _float64_or_skip(name):
    if torch.float64 not in registry.get(name).dtypes:
        pytest.skip(f"{name} has no float64 path for gradcheck")


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("mode", ["bi", "causal-state"])
def test_gradcheck_float64(backend_device, mode):
    name, device = backend_device
    _float64_or_skip(name)
    case = Case(1, 11, 2, 3, 4, torch.float64, bidirectional=mode == "bi", states=mode != "bi", gates="strong")
    x = {n: t.requires_grad_() for n, t in make_inputs(case, device, seed=1).items()}
    kwargs = dict(bidirectional=case.bidirectional, backend=name)
    if case.states:
        kwargs["output_final_state"] = True
    names = list(x)
    assert torch.autograd.gradcheck(
        lambda *tensors: gated_linear_attention(**dict(zip(names, tensors)), **kwargs), tuple(x.values())
    )


def test_opcheck_forward_and_backward():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    case = Case(2, 9, 2, 3, 5, torch.float32, bidirectional=False, states=True)
    x = make_inputs(case, seed=2)
    for tensor in x.values():
        tensor.requires_grad_()
    args = (x["q"], x["k"], x["v"], x["g"], None, x["initial_state"], 0.5, False, True, "torch")
    torch.library.opcheck(torch.ops.glakernels.gla_forward.default, args)
    bi = make_inputs(Case(1, 7, 1, 4, 3, torch.float32), seed=3)
    for tensor in bi.values():
        tensor.requires_grad_()
    torch.library.opcheck(
        torch.ops.glakernels.gla_forward.default,
        (bi["q"], bi["k"], bi["v"], bi["g"], bi["g_reverse"], None, 0.5, True, False, "torch"),
    )
    grad = torch.randn(1, 7, 1, 3)
    torch.library.opcheck(
        torch.ops.glakernels.gla_backward.default,
        (grad, None, bi["q"], bi["k"], bi["v"], bi["g"], bi["g_reverse"], None, 0.5, True, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )


class _TinyGLA(torch.nn.Module):
    """Projects tokens to q, k, v, gates and calls the op, as a ViG block would."""

    def __init__(self, dim=12, heads=2, head_k=4, head_v=6, backend=None):
        super().__init__()
        self.heads, self.head_k, self.head_v, self.backend = heads, head_k, head_v, backend
        self.proj = torch.nn.Linear(dim, heads * (3 * head_k + head_v + head_k))

    def forward(self, x):
        B, T, _ = x.shape
        h, k, v = self.heads, self.head_k, self.head_v
        q, key, val, g, g_rev = self.proj(x).split([h * k, h * k, h * v, h * k, h * k], dim=-1)
        shape = lambda t, d: t.reshape(B, T, h, d)  # noqa: E731
        out = gated_linear_attention(
            shape(q, k), shape(key, k), shape(val, v), shape(F.logsigmoid(g), k) / 16,
            g_reverse=shape(F.logsigmoid(g_rev), k) / 16, backend=self.backend,
        )
        return out.reshape(B, T, h * v)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_compile_fullgraph_matches_eager(backend_device):
    name, device = backend_device
    torch.manual_seed(0)
    model = _TinyGLA(backend=name).to(device)
    x = torch.randn(2, 19, 12, device=device)
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled_out = compiled(x)
    compiled_out.square().sum().backward()
    bound = registry.get(name).tolerance(torch.float32)
    assert_close({"o": compiled_out}, {"o": eager_out}, bound, "compiled output")
    assert_close({n: p.grad for n, p in model.named_parameters()}, eager_grads, bound, "compiled grads")


def test_precision_switches_read_under_fullgraph_compile():
    """The kernels read PyTorch's tf32 / matmul-precision switches while Dynamo traces them
    (vig's kernels and the triton launches are traced under torch.compile); a raw read of
    ``fp32_precision`` is a pybind getter Dynamo refuses with ``fullgraph=True``."""
    from glakernels._precision import float32_matmul_precision, tf32_allowed

    def pick(x):
        if tf32_allowed("matmul") or tf32_allowed("conv") or float32_matmul_precision() == "medium":
            return x * 2
        return x + 1

    torch._dynamo.reset()
    x = torch.arange(3.0)
    assert torch.equal(torch.compile(pick, fullgraph=True, backend="eager")(x), pick(x))


class _TracedTorchBackend(type(registry.get("torch"))):
    """The torch backend, declared traceable on CPU: torch.compile traces its forward and
    backward instead of calling the custom op (as it does for triton on CUDA)."""

    name = "torch-traced"
    device_types = frozenset({"cpu"})
    auto_priority = {}
    traceable_on = frozenset({"cpu"})


@pytest.mark.parametrize("force_custom_op", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_compile_traces_a_traceable_backend(monkeypatch, grad, force_custom_op):
    """A call on a backend traceable on the device is traced (no custom op in the graph),
    forward-only or with gradients; GLAKERNELS_EAGER_CUSTOM_OP=1 keeps the custom op. Either
    way the compiled results and gradients are the eager ones. (The zero gradients torch 2.11
    gave the traced triton backward, ``glakernels._custom_op._contiguous``, show only where
    Dynamo records Triton launches, on a GPU: test_compile_records_the_triton_launches_on_cuda.)"""
    from gla_testing import temporary_backend

    monkeypatch.setenv("GLAKERNELS_EAGER_CUSTOM_OP", "1" if force_custom_op else "0")
    torch.manual_seed(3)
    with temporary_backend(_TracedTorchBackend()), torch.set_grad_enabled(grad):
        model = _TinyGLA(backend="torch-traced")
        x = torch.randn(2, 13, 12)
        eager_out = model(x)
        compiled, targets = compile_recording_targets(model)
        out = compiled(x)
        if grad:
            eager_out.square().sum().backward()
            eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            out.square().sum().backward()
    custom_op_nodes = [t for t in targets if "glakernels" in t]
    if force_custom_op:
        assert custom_op_nodes, "expected the custom op in the graph"
    else:
        assert not custom_op_nodes, f"a traceable backend still ran as the custom op: {custom_op_nodes}"
    bound = registry.get("torch").tolerance(torch.float32)
    assert_close({"o": out}, {"o": eager_out}, bound, "compiled output")
    if grad:
        assert all(p.grad.abs().max() > 0 for p in model.parameters()), "a compiled gradient is all zero"
        assert_close({n: p.grad for n, p in model.named_parameters()}, eager_grads, bound, "compiled grads")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("grad", [False, True])
def test_compile_records_the_triton_launches_on_cuda(grad):
    """Under torch.compile a triton call is its launches in the graph (Inductor launches
    them), forward-only or forward and backward, and gives the eager result and gradients."""
    torch.manual_seed(4)
    model = _TinyGLA(dim=24, heads=2, head_k=16, head_v=32, backend="triton").cuda()
    x = torch.randn(3, 70, 24, device="cuda")
    with torch.set_grad_enabled(grad):
        eager_out = model(x)
        compiled, targets = compile_recording_targets(model)
        compiled(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(x)  # inductor
        if grad:
            eager_out.square().sum().backward()
            eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            out.square().sum().backward()
    assert not [t for t in targets if "glakernels" in t]
    assert any("triton_kernel" in t for t in targets), targets
    bound = registry.get("triton").tolerance(torch.float32)
    assert_close({"o": out}, {"o": eager_out}, bound, "compiled output")
    if grad:
        assert all(p.grad.abs().max() > 0 for p in model.parameters()), "a compiled gradient is all zero"
        assert_close({n: p.grad for n, p in model.named_parameters()}, eager_grads, bound, "compiled grads")


def _run_compiled_kernel_check(script: str, *args: str, cwd, missing: str) -> str:
    """stdout of ``script`` run in a fresh Python without Triton's interpreter (Inductor only
    sees compiled kernels); a skip when the script exits 77 (this torch lacks ``missing``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=300)
    if result.returncode == 77:
        pytest.skip(f"this torch has no {missing} to check against ({result.stdout.strip()})")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


_EMBEDDING_CHECK = r"""
import ast, importlib, sys
import triton
try:
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as closure
except ImportError as error:
    print("no closure:", error)
    sys.exit(77)
bad = []
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    for attr, fn in vars(module).items():
        if isinstance(fn, triton.runtime.jit.JITFunction) and fn.__module__ == module.__name__:
            src = closure(fn)
            # as torch 2.11's Inductor embeds it: inside a plain ''' literal, ''' itself escaped
            literal = "'''" + src.replace("'''", "\\'\\'\\'") + "'''"
            try:
                embedded = ast.literal_eval(literal)
                compile(embedded, attr, "exec")
            except SyntaxError as error:
                bad.append(f"{name}.{attr}: {error}")
                continue
            if embedded != src:
                bad.append(f"{name}.{attr}: changed by the embedding")
print("\n".join(bad) or "ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_sources_survive_inductors_embedding(tmp_path):
    """``torch.compile`` copies each user Triton kernel with the functions and constants it
    reads (``repr`` for strings) into a generated module, and torch 2.11's Inductor puts that
    source inside a plain ``'''`` literal without escaping backslashes: a ``\\n`` in a
    constant's ``repr`` (the inline PTX, when it spanned lines) turned into a line break there,
    and every compiled call of the single-pass kernels failed on the GPU with a SyntaxError.
    Every kernel of the triton backend and of vig/ must come through that literal unchanged.
    (Run without the interpreter, whose kernels Inductor's walk does not follow.)"""
    modules = ["glakernels.backends.triton." + m for m in
               ("kernels", "kernels_single_pass", "kernels_single_pass_bwd", "kernels_boundary_states",
                "kernels_gluon_forward")] + ["vig.triton_kernels", "vig.triton_backward", "vig.triton_matmuls"]
    stdout = _run_compiled_kernel_check(_EMBEDDING_CHECK, *modules, cwd=tmp_path, missing="Inductor closure function")
    assert stdout.strip() == "ok", stdout


_ANALYSIS_CHECK = r"""
import logging, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
try:
    import torch._higher_order_ops.triton_kernel_wrap as wrap_module
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
except ImportError as error:
    print("no analysis:", error)
    sys.exit(77)


class Sm90:  # what TTIR generation asks of the driver; no GPU is touched
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(Sm90())
launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
torch.compiler.is_compiling = lambda: True  # the launch as Dynamo traces it
from glakernels.backends.triton import launch
from glakernels.bench import Shape, random_inputs

x = random_inputs(Shape("vig", 2, 196, 3, 32, 64), torch.bfloat16, "cpu", bidirectional=True)
args = x["q"], x["k"], x["v"], x["g"], x["g_reverse"], None
o, _ = launch.forward(*args, 32 ** -0.5, True, False)
launch.backward(*args, torch.randn_like(o), None, 32 ** -0.5, True)
fallbacks = []
handler = logging.Handler()
handler.emit = lambda record: fallbacks.append(record.getMessage())
handler.addFilter(lambda record: "identify_accessed_tensors" in record.getMessage())
wrap_module.log.addHandler(handler)  # the logger the analysis reports its fallback to
for kernel, args, kwargs in launches:
    named = dict(zip(kernel.arg_names, args), **kwargs)
    for option in ("num_warps", "num_stages", "maxnreg"):
        named.pop(option, None)
    accesses = identify_accessed_tensors(kernel, named, {})
    written = sorted(d.name for d in accesses.read_writes.writes if isinstance(named.get(d.name), torch.Tensor))
    print(kernel.fn.__name__, named.get("PASSES", ""), *written)
print("\n".join(fallbacks) or "analysed")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_inductor_can_analyse_the_traced_launches(tmp_path):
    """Inductor works out which tensors a traced Triton kernel writes from its TTIR; inline PTX
    with side effects (the meeting's poll) stops that analysis, and it then takes every tensor
    argument for written and copies it around the launch: in the forward, the float32 scratch
    passed in three unused slots, three copies of 41 MB at ViG-T's 224 px batch. Its search
    also follows every argument of a call back from a store's address, so a value returned by
    the walks' calls (which receive q, k, v, g) and used in an address made those inputs
    written too, and the compiled backward copied them. A traced launch polls without inline
    PTX (``launch._meet_spin``) and the tails read the meeting's outcome back from memory
    (``kernels_single_pass._tail_chunks``): each kernel of a bidirectional forward and
    backward must come out writing exactly its outputs and scratch (Triton's TTIR for sm_90,
    made on this CPU; run without the interpreter, whose kernels Inductor never sees)."""
    stdout = _run_compiled_kernel_check(_ANALYSIS_CHECK, cwd=tmp_path, missing="triton kernel analysis")
    assert stdout.strip().splitlines() == [
        "_gla_fwd_single_pass_kernel  flags o part",
        "_gla_bwd_single_pass_kernel 1 scratch",  # pass A: the state gradients it parks
        "_gla_bwd_single_pass_kernel 2 dg dgr dk dq dv flags parts",  # pass B
        "analysed",
    ], stdout[-3000:]


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_non_contiguous_inputs(backend_device):
    """Transposed, sliced and expanded views give the same result as contiguous copies."""
    name, device = backend_device
    B, T, H, K, V = 2, 21, 3, 8, 5
    torch.manual_seed(0)
    # [B, H, T, D] storage viewed as [B, T, H, D]; every other time step; an expanded gate
    q = torch.randn(B, H, T, K, device=device).transpose(1, 2)
    k = torch.randn(B, T * 2, H, K, device=device)[:, ::2]
    v = torch.randn(B, T, H, 2 * V, device=device)[..., V:]
    g = F.logsigmoid(torch.randn(1, T, H, K, device=device)).expand(B, T, H, K)
    g_rev = F.logsigmoid(torch.randn(B, T, H, K, device=device)).transpose(0, 0)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or g.is_contiguous())
    tensors = dict(q=q, k=k, v=v, g=g, g_reverse=g_rev)
    got, cot = outputs_and_grads(gated_linear_attention, tensors, None, backend=name)
    copies = {n: t.contiguous() for n, t in tensors.items()}
    expected, _ = outputs_and_grads(gated_linear_attention, copies, cot, backend=name)
    for tensor_name in expected:
        assert torch.equal(got[tensor_name], expected[tensor_name]), tensor_name


def test_autocast_runs_in_autocast_dtype():
    """Like a matmul: float32 inputs under autocast run (and return) in the autocast dtype,
    and gradients come back to the float32 leaves in float32."""
    case = Case(2, 13, 2, 8, 8, torch.float32)
    x = {n: t.requires_grad_() for n, t in make_inputs(case, seed=4).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_linear_attention(**x)
    assert out.dtype == torch.bfloat16
    expected = gated_linear_attention(**{n: t.detach().to(torch.bfloat16) for n, t in x.items()})
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in x.values())
    with torch.autocast("cpu", enabled=False):
        assert gated_linear_attention(**x).dtype == torch.float32


def test_autocast_takes_mixed_dtypes_and_keeps_float64():
    """As a matmul under autocast: float32 and bfloat16 inputs mixed run in the autocast
    dtype (the mix is an error only outside autocast), and float64 inputs stay float64."""
    case = Case(1, 11, 2, 4, 6, torch.float32)
    x = make_inputs(case, seed=7)
    mixed = dict(x, k=x["k"].to(torch.bfloat16))
    with pytest.raises(TypeError, match="k has dtype bfloat16 but q has float32"):
        gated_linear_attention(**mixed, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_linear_attention(**mixed, backend="torch")
        in_double = gated_linear_attention(**{n: t.double() for n, t in x.items()}, backend="torch")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, gated_linear_attention(**{n: t.to(torch.bfloat16) for n, t in x.items()}, backend="torch"))
    assert in_double.dtype == torch.float64


def test_autocast_keeps_state_in_float32():
    case = Case(1, 9, 1, 4, 4, torch.float32, bidirectional=False, states=True)
    x = make_inputs(case, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, state = gated_linear_attention(**x, bidirectional=False, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32


def test_final_state_gradient_flows_when_only_state_is_used():
    case = Case(1, 10, 1, 3, 3, torch.float64, bidirectional=False, states=True)
    x = {n: t.requires_grad_() for n, t in make_inputs(case, seed=6).items()}
    _, state = gated_linear_attention(**x, bidirectional=False, output_final_state=True)
    state.sum().backward()
    assert x["initial_state"].grad is not None and x["initial_state"].grad.abs().sum() > 0
    assert x["q"].grad.abs().sum() == 0  # o was not used: nothing flows to q


def test_default_reverse_gate_is_the_forward_gate():
    """With g_reverse omitted both directions use g, and g receives both directions' gradient."""
    case = Case(1, 15, 2, 4, 4, torch.float64, separate_reverse_gate=False)
    x = make_inputs(case, seed=8)
    got, cot = outputs_and_grads(gated_linear_attention, x, None)
    with_copy = dict(x, g_reverse=x["g"].clone())
    expected, _ = outputs_and_grads(gated_linear_attention, with_copy, cot)
    assert_close({"o": got["o"]}, {"o": expected["o"]}, 1e-12)
    assert_close({"dg": got["dg"]}, {"dg": expected["dg"] + expected["dg_reverse"]}, 1e-12)
