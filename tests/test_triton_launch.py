"""``glakernels._triton_launch``: the cached launch path of our Triton kernels.

On CPU the launch logic runs against a stand-in for Triton's compiled kernel (no GPU can
launch anything here): which calls reach Triton's own path, which reuse a compiled kernel,
and the argument layout handed to it. On a GPU the real kernels run both ways and must agree
bit for bit, including calls that Triton specialises differently (misaligned pointers,
integers equal to 1).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from glakernels import _triton_launch  # noqa: E402
from glakernels._triton_launch import ENV_FAST_LAUNCH, launch_kernel  # noqa: E402


def _scale_rows(x_ptr, out_ptr, n, factor, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = 3):  # noqa: F821
    pass


def _plain_jit_function(fn=_scale_rows) -> JITFunction:
    """A real ``JITFunction`` whatever ``TRITON_INTERPRET`` says (``triton.jit`` would give the
    interpreter's function on a machine without a GPU)."""
    return JITFunction(fn)


class _Compiled:
    """Records launches the way Triton's ``CompiledKernel.run`` receives them."""

    def __init__(self, log):
        self.log = log
        self.function = "function"
        self.packed_metadata = "metadata"

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit_, *values):
        self.log.append(("fast", (g0, g1, g2), stream, values))

    def launch_metadata(self, grid, stream, *values):
        return None


@pytest.fixture
def recorded(monkeypatch):
    """Launches of plain JITFunctions, recorded: ``("triton", args, kwargs)`` for Triton's own
    path, ``("fast", grid, stream, values)`` for the cached one."""
    log = []

    def run(self, *args, grid, warmup, **kwargs):
        log.append(("triton", args, kwargs))
        return _Compiled(log)

    monkeypatch.setattr(JITFunction, "run", run)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    monkeypatch.delenv(ENV_FAST_LAUNCH, raising=False)
    return log


def _aligned(n=64, dtype=torch.float32, alignment=128):
    """``n`` elements whose address is a multiple of ``alignment`` bytes and of no larger power
    of two up to 128 (the alignment classes the key tells apart)."""
    x = torch.zeros(n + 512 // _element_size(dtype), dtype=dtype)
    offset = (-x.data_ptr() % 256 + alignment % 256) // x.element_size()
    return x[offset:offset + n]


def _element_size(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def test_repeated_call_reuses_the_compiled_kernel_with_arguments_in_parameter_order(recorded):
    kernel = _plain_jit_function()
    x, out = _aligned(), _aligned()
    launch_kernel(kernel, (4,), x, out, 64, 0.5, BLOCK=16)
    assert [entry[0] for entry in recorded] == ["triton"]
    y, out2 = _aligned(), _aligned()  # other tensors, same dtype and alignment: same key
    launch_kernel(kernel, (4, 2), y, out2, 64, 0.5, BLOCK=16)
    assert recorded[1][0] == "fast"
    _, grid, stream, values = recorded[1]
    assert grid == (4, 2, 1) and stream == 1234
    # x_ptr, out_ptr, n, factor positionally, BLOCK by keyword, FLAG from its default
    assert values[0] is y and values[1] is out2 and values[2:] == (64, 0.5, 16, 3)


@pytest.mark.parametrize(
    "first, second",
    [
        ({"n": 64}, {"n": 1}),  # Triton makes an integer equal to 1 a constant
        ({"n": 64}, {"n": 65}),  # divisibility by 16
        ({"n": 1}, {"n": True}),  # equal as dict keys, compiled differently
        ({"factor": 0.5}, {"factor": 1}),
        ({"BLOCK": 16}, {"BLOCK": 32}),
        ({"num_warps": 4}, {"num_warps": 8}),
        ({"misaligned": False}, {"misaligned": True}),
        ({"alignment": 16}, {"alignment": 128}),  # a Triton that read 32-byte alignment would differ
        ({"dtype": torch.float32}, {"dtype": torch.bfloat16}),
    ],
)
def test_a_call_triton_could_specialise_differently_takes_tritons_path(recorded, first, second):
    kernel = _plain_jit_function()

    def call(n=64, factor=0.5, BLOCK=16, misaligned=False, dtype=torch.float32, alignment=128, **options):
        x = _aligned(80, dtype, alignment)
        x = x[1:65] if misaligned else x[:64]
        launch_kernel(kernel, (4,), x, _aligned(), n, factor, BLOCK=BLOCK, **options)

    call(**first)
    call(**second)
    call(**first)
    call(**second)
    assert [entry[0] for entry in recorded] == ["triton", "triton", "fast", "fast"]


def test_triton_path_when_switched_off_or_for_a_callable_grid_or_another_kernel_type(recorded, monkeypatch):
    kernel = _plain_jit_function()
    x, out = _aligned(), _aligned()
    monkeypatch.setenv(ENV_FAST_LAUNCH, "0")
    for _ in range(2):
        launch_kernel(kernel, (4,), x, out, 64, 0.5, BLOCK=16)
    monkeypatch.setenv(ENV_FAST_LAUNCH, "1")
    for _ in range(2):
        launch_kernel(kernel, lambda meta: (4,), x, out, 64, 0.5, BLOCK=16)
    assert [entry[0] for entry in recorded] == ["triton"] * 4

    class Subclass(JITFunction):  # e.g. the interpreter's or Gluon's: their own launch path
        pass

    calls = []
    sub = Subclass(_scale_rows)
    sub.run = lambda *args, grid, warmup, **kwargs: calls.append(grid)
    for _ in range(2):
        launch_kernel(sub, (4,), x, out, 64, 0.5, BLOCK=16)
    assert calls == [(4,), (4,)]


def test_an_unverified_triton_version_takes_tritons_path(recorded, monkeypatch):
    jit_function, knobs, _ = _triton_launch._triton()
    monkeypatch.setattr(_triton_launch, "_TRITON", (jit_function, knobs, False))
    kernel = _plain_jit_function()
    x, out = _aligned(), _aligned()
    for _ in range(2):
        launch_kernel(kernel, (4,), x, out, 64, 0.5, BLOCK=16)
    assert [entry[0] for entry in recorded] == ["triton", "triton"]


@pytest.mark.parametrize("text, version", [("3.6.0", (3, 6)), ("3.9.0+git1a2b", (3, 9)), ("3.10", (3, 10)),
                                           ("4.0.0rc1", (4, 0))])
def test_triton_version_parsing(text, version):
    assert _triton_launch.triton_version(text) == version


def test_the_switch_rejects_typos(monkeypatch):
    monkeypatch.setenv(ENV_FAST_LAUNCH, "maybe")
    with pytest.raises(ValueError, match=ENV_FAST_LAUNCH):
        _triton_launch.fast_launch_enabled()


def test_the_cache_keeps_a_bounded_number_of_keys(recorded, monkeypatch):
    monkeypatch.setattr(_triton_launch, "MAX_KEYS_PER_KERNEL", 3)
    kernel = _plain_jit_function()
    x, out = _aligned(), _aligned()
    for n in (16, 32, 48, 64, 16):
        launch_kernel(kernel, (4,), x, out, n, 0.5, BLOCK=16)
    # 16 was dropped when 64 came in (the oldest key goes first), so it compiles again
    assert [entry[0] for entry in recorded] == ["triton"] * 5
    assert len(kernel.__dict__[_triton_launch._CACHE_ATTRIBUTE]) == 3


# ---- on a GPU: the real kernels, both paths -------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_specialised_launches_stay_correct_on_the_gpu(dtype):
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, out_ptr, n, stride, factor, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets * stride, mask=mask).to(tl.float32)
        tl.store(out_ptr + offsets, (x * factor).to(out_ptr.dtype.element_ty), mask=mask)

    base = torch.randn(4099, device="cuda", dtype=dtype)
    # aligned then misaligned pointers, stride 1 (a constant to Triton) then 2, n divisible by
    # 16 then not: each call must get a kernel compiled for what it passes
    for start, n, stride in [(0, 1024, 1), (1, 1024, 1), (0, 1024, 2), (3, 1000, 2), (0, 1024, 1), (1, 1000, 1)]:
        x = base[start:]
        out = torch.empty(n, device="cuda", dtype=dtype)
        launch_kernel(scale_kernel, (triton.cdiv(n, 256),), x, out, n, stride, 0.5, BLOCK=256)
        expected = (x[: n * stride : stride].float() * 0.5).to(dtype)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@gpu
def test_op_and_vig_give_the_same_bits_with_and_without_the_cached_launch(monkeypatch):
    from glakernels import gated_linear_attention
    from glakernels.bench import SHAPES, random_inputs
    import vig

    x = random_inputs(SHAPES["vigT_224"], torch.bfloat16, "cuda", bidirectional=True, requires_grad=True)
    grad = torch.randn_like(x["v"])
    model = vig.create_model("vig_tiny").cuda()
    params = list(model.parameters())
    images = torch.randn(4, 3, 224, 224, device="cuda")

    def results():
        out = []
        for _ in range(2):  # the second call takes the cached path where it is on
            o = gated_linear_attention(**x, backend="triton")
            out = [o, *torch.autograd.grad(o, list(x.values()), grad)]
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(images).float().square().mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out += [loss.detach(), *(g for g in grads if g is not None)]
        return out

    monkeypatch.setenv(ENV_FAST_LAUNCH, "0")
    slow = results()
    monkeypatch.setenv(ENV_FAST_LAUNCH, "1")
    fast = results()
    assert len(slow) == len(fast) > 6
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)
