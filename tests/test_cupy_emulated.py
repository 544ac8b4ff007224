"""The cupy backend's CUDA kernels, compiled by a C++ compiler and run on the CPU by the
emulator in ``tests/cuda_emulator``: the shared correctness checks hold for the kernels'
logic on every CI run, GPU or not. Two emulated backends are registered for the duration of
this module: one with the backend's own plan, one cutting time into 7-token chunks so that
the chunked path (chunk states, state scan, gate-gradient fix-up) runs at test sizes too.

What this cannot check: speed, and behaviour only a GPU has (memory ordering between warps
beyond barriers, occupancy); the GPU runs of the shared suites cover those."""

from __future__ import annotations

import zlib

import pytest
import torch

import test_backends as shared
from cuda_emulator import Emulator, compiler
from gla_testing import Case, check_against_reference, temporary_backend
from glakernels.backends.cupy import CupyBackend, _driver, _plan, _sources

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++20 compiler (g++ or clang++) to build the emulator")

CHUNK = 7
NAMES = {"plan": "cupy-emulated", "chunked": "cupy-emulated-chunked"}

#: the tensor-core forward's launches beyond the plan's (every split of V = 64, without
#: prefetching), for the bitwise checks of test_cupy_chunk_forward_emulated.py
FORWARD_LAUNCHES = [_plan.ChunkForwardLaunch(w, p, 1) for w in _plan.CHUNK_FORWARD_WARPS for p in (True, False)]
#: the tensor-core backward's adjoint walks beyond the plan's at K = 32, V = 64: the separate
#: dv and dk walks, the fused walk without prefetching, and with its adjoint in shared memory
#: (test_cupy_chunk_backward_emulated.py)
BACKWARD_LAUNCHES = [_plan.ChunkBackwardLaunch(fused=False), _plan.ChunkBackwardLaunch(fused=True, fused_prefetch=False),
                     _plan.ChunkBackwardLaunch(fused=True, fused_prefetch=False, fused_shared_state=True)]
_emulators: dict = {}


def shared_emulator(tmp_path_factory) -> Emulator:
    """One emulator library per test session for every module of emulated cupy tests (its
    build, every kernel at -O1, takes tens of seconds): every kernel the plan can launch, and
    the extra tensor-core forward launches."""
    base = tmp_path_factory.getbasetemp()
    if base not in _emulators:
        names = dict(_plan.every_name_expression())
        file = _sources.CHUNK_FORWARD_FILE
        names[file] = tuple(dict.fromkeys(names[file] + tuple(
            _plan.chunk_forward_name(dtype, 32, 64, bi, launch) for launch in FORWARD_LAUNCHES
            for bi in (True, False) for dtype in (torch.bfloat16, torch.float16))))
        file = _sources.CHUNK_BACKWARD_FILE
        extra = [_plan.chunk_backward_fused_name(torch.bfloat16, 32, 64, bi, launch) if launch.fused else
                 _plan.chunk_backward_adjoint_name(torch.bfloat16, dv, 32, 64, bi, launch)
                 for launch in BACKWARD_LAUNCHES for bi in (True, False) for dv in (True, False)]
        names[file] = tuple(dict.fromkeys(names[file] + tuple(extra)))
        _emulators[base] = Emulator(names, base / "emulator")
    return _emulators[base]


class EmulatedCupy(CupyBackend):
    """The cupy backend's drivers and kernels, on CPU tensors, through the emulator."""

    description = "cupy kernels on the CPU emulator (tests only)"
    device_types = frozenset({"cpu"})
    auto_priority = {}

    def __init__(self, name, emulator, chunk_len=None):
        self.name, self.emulator, self.chunk_len = name, emulator, chunk_len

    def unavailable_reasons(self):
        return []

    def forward(self, inputs):
        return _driver.forward(inputs, self.emulator, chunk_len=self.chunk_len)

    def backward(self, inputs, grad_output, grad_final_state):
        return _driver.backward(inputs, grad_output.contiguous(), grad_final_state, self.emulator,
                                chunk_len=self.chunk_len)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    emulator = shared_emulator(tmp_path_factory)
    with temporary_backend(EmulatedCupy(NAMES["plan"], emulator)), \
            temporary_backend(EmulatedCupy(NAMES["chunked"], emulator, CHUNK)):
        yield NAMES


VARIANTS = list(NAMES)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [Case(B, T, H, K, V, dtype, bi, states)
         for dtype in DTYPES for B, T, H, K, V in shared.SHAPES for _, bi, states in shared.MODES]
# the chunked path shares the per-dtype code with the plain one: two dtypes are enough there
VARIANT_CASES = [(variant, case) for variant in VARIANTS for case in CASES
                 if variant == "plan" or case.dtype != torch.float16]


@pytest.mark.parametrize("variant, case", VARIANT_CASES, ids=lambda x: x if isinstance(x, str) else x.id())
def test_matches_reference(emulated, variant, case):
    check_against_reference(emulated[variant], case, "cpu", seed=zlib.crc32(case.id().encode()) % 1000)


BIG_HEADS = [  # the largest tiles (inner dims up to 256), chunked and not
    Case(1, 12, 1, 256, 130, torch.float32, bidirectional=False, states=True),
    Case(1, 12, 1, 129, 256, torch.bfloat16),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", shared.HOSTILE + BIG_HEADS, ids=lambda c: c.id())
def test_hostile_gates_and_big_heads(emulated, variant, case):
    if case.dtype == torch.float64:
        case = Case(case.B, case.T, case.H, case.K, case.V, torch.float32, case.bidirectional, case.states, case.gates)
    check_against_reference(emulated[variant], case, "cpu", seed=11)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hard_reset(emulated, variant):
    shared.test_hard_reset((emulated[variant], "cpu"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_bidirectional_identity(emulated, variant):
    shared.test_bidirectional_identity((emulated[variant], "cpu"), torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", [1, 16, 29])
def test_state_carry(emulated, variant, split):
    shared.test_state_carry((emulated[variant], "cpu"), split)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["bi", "causal-state"])
def test_batch_invariance(emulated, variant, mode):
    shared.test_batch_invariance((emulated[variant], "cpu"), mode)


@pytest.mark.parametrize("variant", VARIANTS)
def test_determinism(emulated, variant):
    shared.test_determinism((emulated[variant], "cpu"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_drawn(emulated, variant):
    shared.test_matches_reference_drawn((emulated[variant], "cpu"))


def test_params_struct_layout_matches_the_numpy_type(tmp_path):
    """The kernels take ``gla::Params`` by value and the launcher sends the bytes of
    ``_sources.params_dtype()``: both must lay the fields out alike (C++'s offsets and size,
    from the very header the kernels include, against NumPy's)."""
    import ctypes
    import subprocess

    from cuda_emulator import HERE

    unit = tmp_path / "layout.cpp"
    unit.write_text(
        '#include "prelude.h"\n#include "gla_common.cuh"\n#include <cstddef>\n'
        "#define GLA_OFFSET(type, name) offsetof(gla::Params, name),\n"
        'extern "C" unsigned long long gla_params_layout(unsigned long long* out) {\n'
        "  const unsigned long long offsets[] = {GLA_PARAM_FIELDS(GLA_OFFSET)};\n"
        "  for (unsigned i = 0; i < sizeof(offsets) / sizeof(offsets[0]); ++i) out[i] = offsets[i];\n"
        "  return sizeof(gla::Params);\n}\n"
    )
    library = tmp_path / "layout.so"
    subprocess.run([compiler(), "-std=c++20", "-shared", "-fPIC", "-DGLA_EMULATION", "-Wno-unknown-pragmas",
                    f"-I{HERE}", f"-I{_sources.KERNEL_DIR}", str(unit), "-o", str(library)], check=True)
    dtype = _sources.params_dtype()
    offsets = (ctypes.c_ulonglong * len(dtype.names))()
    size = ctypes.CDLL(str(library)).gla_params_layout(offsets)
    assert list(offsets) == [dtype.fields[name][1] for name in dtype.names]
    assert size == dtype.itemsize
    assert dtype.names == tuple(name for _, name in _sources.param_fields())


def test_kernel_params_start_from_the_base_without_changing_it():
    base = _sources.kernel_params({"B": 3, "scale": 0.25, "q": 1 << 40})
    (args,) = _sources.kernel_args({"dq": 12345, "B": 4}, base)
    assert (int(args["B"]), float(args["scale"]), int(args["q"]), int(args["dq"])) == (4, 0.25, 1 << 40, 12345)
    assert (int(base["B"]), int(base["dq"])) == (3, 0)
    with pytest.raises(KeyError, match="not_a_field"):
        _sources.kernel_params({"not_a_field": 1})
