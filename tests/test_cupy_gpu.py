"""What only a GPU can show about the cupy backend (the shared suites already run it on
CUDA against the reference): the chunked path at test sizes, PyTorch's current stream, CUDA
graph capture, 64-bit offsets past 2^31 elements, and the compile cache across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gla_testing import Case, check_against_reference, make_inputs, temporary_backend
from glakernels import gated_linear_attention
from glakernels._dispatch import registry

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy_backend():
    backend = registry.get("cupy")
    if backend.availability():
        pytest.skip("; ".join(backend.availability()))
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return backend


@pytest.fixture(scope="module")
def chunked(cupy_backend):
    """The cupy backend cutting time into 5-token chunks (the path long sequences take)."""
    from glakernels.backends.cupy import CupyBackend, _driver
    from glakernels.backends.cupy._runtime import CupyLauncher

    class Chunked(CupyBackend):
        name = "cupy-chunk5"
        auto_priority = {}

        def forward(self, inputs):
            return _driver.forward(inputs, CupyLauncher(inputs.q.device), chunk_len=5)

        def backward(self, inputs, grad_output, grad_final_state):
            return _driver.backward(inputs, grad_output.contiguous(), grad_final_state,
                                    CupyLauncher(inputs.q.device), chunk_len=5)

    with temporary_backend(Chunked()) as backend:
        yield backend.name


CHUNKED_CASES = [
    Case(2, 67, 2, 17, 33, torch.float32),
    Case(2, 67, 2, 17, 33, torch.bfloat16, bidirectional=False, states=True),
    Case(1, 45, 2, 72, 100, torch.float16, gates="extreme"),
    Case(1, 50, 2, 8, 8, torch.float32, bidirectional=False, states=True, gates="extreme"),
    Case(1, 23, 1, 256, 256, torch.float32, bidirectional=False, states=True),
]


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=lambda c: c.id())
def test_chunked_path_matches_reference(chunked, case):
    check_against_reference(chunked, case, "cuda", seed=3)


def test_runs_on_the_current_stream(cupy_backend):
    case = Case(4, 300, 3, 32, 64, torch.bfloat16)
    x = make_inputs(case, "cuda", seed=1)
    expected = gated_linear_attention(**x, backend="cupy")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = gated_linear_attention(**x, backend="cupy")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seq_len", [196, 1100], ids=["one-chunk", "chunked"])
def test_cuda_graph_capture(cupy_backend, seq_len):
    """Forward and backward captured once, replayed on new inputs: same bits as eager."""
    case = Case(2, seq_len, 2, 32, 64, torch.bfloat16)
    static = {n: t.requires_grad_() for n, t in make_inputs(case, "cuda", seed=2).items()}
    grad = torch.randn(2, seq_len, 2, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out = gated_linear_attention(**static, backend="cupy")
        return (out, *torch.autograd.grad(out, list(static.values()), grad))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = make_inputs(case, "cuda", seed=7)
    with torch.no_grad():
        for name, tensor in static.items():
            tensor.copy_(fresh[name])
    graph.replay()
    expected = step()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_offsets_past_two_to_the_31(cupy_backend):
    """q, k, v, g, o with more than 2^31 elements: the last head (whose elements all lie past
    2^31) equals, bitwise, the same head run alone (batch/head invariance + 64-bit indexing)."""
    free, _ = torch.cuda.mem_get_info()
    T, H, K = (1 << 21) + 77, 32, 32
    if free < 40 * (1 << 30):
        pytest.skip("needs ~40 GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda: torch.randn(1, T, H, K, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v = make(), make(), make()
    g = torch.nn.functional.logsigmoid(make().float()).div_(16).to(torch.bfloat16)
    assert q.numel() > 2**31
    with torch.no_grad():
        o = gated_linear_attention(q, k, v, g, False, backend="cupy")
        last = [x[:, :, -1:].contiguous() for x in (q, k, v, g)]
        alone = gated_linear_attention(*last, False, backend="cupy")
    assert torch.isfinite(o[:, -1000:, -1]).all()
    assert torch.equal(o[:, :, -1:], alone)


def test_compiled_kernels_are_cached_on_disk(cupy_backend, tmp_path):
    """A second process loads the compiled kernels from CuPy's cache instead of compiling."""
    code = (
        "import time, torch, glakernels\n"
        "from glakernels.backends.cupy._runtime import warm_up\n"
        "print(warm_up(torch.device('cuda'), torch.float16, 40, 24))\n"
    )
    env = {**__import__("os").environ, "CUPY_CACHE_DIR": str(tmp_path)}
    first, second = (float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          env=env, check=True).stdout.split()[-1]) for _ in range(2))
    print(f"first-call compile {first:.2f}s, cached {second:.2f}s")
    assert second < first


# the tensor-core forward (kernels/gla_chunk_forward.cu) on the GPU: the shapes of its
# emulated tests, ViG's, and gates that send chunks down its exact path
CHUNK_FORWARD_CASES = [
    Case(2, 1, 1, 32, 64, torch.bfloat16),
    Case(1, 17, 2, 16, 16, torch.bfloat16),
    Case(1, 33, 2, 32, 48, torch.bfloat16),
    Case(3, 100, 2, 32, 64, torch.bfloat16),
    Case(4, 196, 3, 32, 64, torch.bfloat16),
    Case(2, 512, 1, 32, 64, torch.bfloat16),
    Case(2, 77, 2, 16, 32, torch.bfloat16, bidirectional=False),
    Case(2, 196, 3, 32, 64, torch.bfloat16, gates="strong"),
    Case(2, 196, 3, 32, 64, torch.bfloat16, gates="extreme"),
    Case(2, 60, 1, 32, 64, torch.bfloat16, bidirectional=False, gates="extreme"),
    # segments of 256 tokens (the last one partial): local states, scan, outputs
    Case(2, 1100, 3, 32, 64, torch.bfloat16),
    Case(1, 777, 2, 16, 48, torch.bfloat16, gates="extreme"),
    Case(2, 600, 2, 32, 32, torch.bfloat16, bidirectional=False),
    Case(4, 196, 3, 32, 64, torch.float16),
    Case(2, 1100, 3, 32, 64, torch.float16, gates="extreme"),
    Case(2, 77, 2, 16, 32, torch.float16, bidirectional=False),
]


def _check_recording(case: Case, seed: int) -> list[str]:
    """check_against_reference through the cupy backend's drivers with a launcher that records
    every kernel's name; returns the names (skips below compute capability 8.0)."""
    from glakernels.backends.cupy import CupyBackend, _driver
    from glakernels.backends.cupy._runtime import CupyLauncher

    names = []

    class Recording(CupyLauncher):
        def __call__(self, file, name, *rest):
            names.append(name)
            return super().__call__(file, name, *rest)

    class Spied(CupyBackend):
        name = "cupy-recorded"
        auto_priority = {}

        def forward(self, inputs):
            return _driver.forward(inputs, Recording(inputs.q.device))

        def backward(self, inputs, grad_output, grad_final_state):
            return _driver.backward(inputs, grad_output.contiguous(), grad_final_state, Recording(inputs.q.device))

    if not Recording(torch.device("cuda")).tensor_cores:
        pytest.skip("the tensor-core kernels need compute capability 8.0")
    with temporary_backend(Spied()) as backend:
        check_against_reference(backend.name, case, "cuda", seed=seed)
    return names


@pytest.mark.parametrize("case", CHUNK_FORWARD_CASES, ids=lambda c: c.id())
def test_tensor_core_forward_matches_reference(cupy_backend, case):
    names = _check_recording(case, seed=17)
    assert any(n.startswith("gla::gla_chunk_forward") for n in names), names


@pytest.mark.parametrize("bidirectional", [True, False])
def test_tensor_core_forward_launches_agree_bitwise(cupy_backend, bidirectional):
    """The plan picks the tensor-core forward's launch by grid size; every launch must give
    the same bits (a sequence's result may not depend on the rest of the batch)."""
    from glakernels._custom_op import _inputs
    from glakernels.backends.cupy import _driver, _plan
    from glakernels.backends.cupy._runtime import CupyLauncher

    launcher = CupyLauncher(torch.device("cuda"))
    if not launcher.tensor_cores:
        pytest.skip("the tensor-core forward needs compute capability 8.0")
    x = make_inputs(Case(64, 196, 3, 32, 64, torch.bfloat16, bidirectional, gates="extreme"), "cuda", seed=4)
    inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, 32 ** -0.5, bidirectional, False)
    launches = [_plan.ChunkForwardLaunch(w, p, m) for w in _plan.CHUNK_FORWARD_WARPS for p in (True, False)
                for m in (1, 3)]
    outs = [_driver.forward(inputs, launcher, chunk_forward_launch=launch)[0] for launch in launches]
    for launch, o in zip(launches[1:], outs[1:]):
        assert torch.equal(o, outs[0]), launch


# the tensor-core backward (kernels/gla_chunk_backward.cu): bfloat16 and float16, one segment
# or several; strong and extreme gates flag sequences for the sweeps
CHUNK_BACKWARD_CASES = [
    Case(2, 1, 1, 32, 64, torch.bfloat16),
    Case(1, 17, 2, 16, 16, torch.bfloat16),
    Case(1, 33, 2, 32, 48, torch.bfloat16),
    Case(3, 100, 2, 32, 64, torch.bfloat16),
    Case(4, 196, 3, 32, 64, torch.bfloat16),
    Case(2, 512, 1, 32, 64, torch.bfloat16),
    Case(2, 77, 2, 16, 32, torch.bfloat16, bidirectional=False),
    Case(2, 196, 3, 32, 64, torch.bfloat16, gates="strong"),
    Case(2, 196, 3, 32, 64, torch.bfloat16, gates="extreme"),
    Case(2, 60, 1, 32, 64, torch.bfloat16, bidirectional=False, gates="extreme"),
    # segments of 256 tokens: entering states and adjoints, the gate gradients' fixup
    Case(2, 1100, 3, 32, 64, torch.bfloat16),
    Case(1, 777, 2, 16, 48, torch.bfloat16, gates="extreme"),
    Case(2, 600, 2, 32, 32, torch.bfloat16, bidirectional=False),
    # float16: dout and v as two exact bfloat16 parts
    Case(4, 196, 3, 32, 64, torch.float16),
    Case(2, 196, 3, 32, 64, torch.float16, gates="extreme"),
    Case(2, 77, 2, 16, 32, torch.float16, bidirectional=False),
    Case(2, 1100, 3, 32, 64, torch.float16),
    Case(1, 33, 2, 32, 48, torch.float16),
]


@pytest.mark.parametrize("case", CHUNK_BACKWARD_CASES, ids=lambda c: c.id())
def test_tensor_core_backward_matches_reference(cupy_backend, case):
    from glakernels.backends.cupy import _plan

    names = _check_recording(case, seed=19)
    fused = _plan.chunk_backward_launch(1, case.K, case.V, case.bidirectional, _plan.chunking(case.T)[0], 1).fused
    walk = "gla::gla_chunk_backward_" + ("adjoint<" if fused else "dkv<")
    dtype = _plan.C_TYPES[case.dtype]
    assert any(n.startswith(walk + dtype + (", " if fused else ", true")) for n in names), names


@pytest.mark.parametrize("bidirectional", [True, False])
def test_tensor_core_backward_launches_agree_bitwise(cupy_backend, bidirectional):
    """Every launch of the tensor-core backward gives the same bits, and a sequence's gradients
    do not depend on the batch (one sequence with a hard reset goes to the sweeps)."""
    from glakernels._custom_op import _inputs
    from glakernels.backends.cupy import _driver, _plan
    from glakernels.backends.cupy._runtime import CupyLauncher

    launcher = CupyLauncher(torch.device("cuda"))
    if not launcher.tensor_cores:
        pytest.skip("the tensor-core backward needs compute capability 8.0")
    x = make_inputs(Case(64, 196, 3, 32, 64, torch.bfloat16, bidirectional), "cuda", seed=4)
    x["g"][5, 100, 1] = -1e4
    dout = torch.randn_like(x["v"])

    def grads(x, dout, launch=None):
        inputs = _inputs(x["q"], x["k"], x["v"], x["g"], x.get("g_reverse"), None, 32 ** -0.5, bidirectional, False)
        return _driver.backward(inputs, dout, None, launcher, chunk_backward_launch=launch)

    fields = ("dq", "dk", "dv", "dg", "dg_reverse")
    separate = [_plan.ChunkBackwardLaunch(w, m, w, m) for w in (1, 2) for m in (1, 3)]
    fused = [_plan.ChunkBackwardLaunch(2, m, 2, m, True, p, shared) for m in (1, 2, 3) for p in (True, False)
             for shared in (False, True)]
    firsts = []
    for family in (separate, fused):  # the fused walk sums dk's V halves in its own order
        outs = [grads(x, dout, launch) for launch in family]
        firsts.append(outs[0])
        for launch, got in zip(family[1:], outs[1:]):
            for field in fields:
                if getattr(got, field) is not None:
                    assert torch.equal(getattr(got, field), getattr(outs[0], field)), (launch, field)
    assert torch.equal(firsts[0].dv, firsts[1].dv)  # the fused walk's dv is the dv walk's arithmetic
    together = grads(x, dout)
    for b in (0, 5, 63):
        alone = grads({n: t[b:b + 1] for n, t in x.items()}, dout[b:b + 1])
        for field in fields:
            if getattr(alone, field) is not None:
                assert torch.equal(getattr(alone, field), getattr(together, field)[b:b + 1]), (b, field)
