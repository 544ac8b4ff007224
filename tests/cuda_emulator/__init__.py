"""Run the cupy backend's CUDA kernels on the CPU, for tests on machines without a GPU.

The very ``.cu`` sources NVRTC compiles on a GPU are compiled here by a C++20 compiler
against a small emulation layer (``prelude.h``, ``gla_emulation.h``, ``runtime.h``): every
CUDA thread of a block becomes an OS thread, ``__syncthreads``/named barriers become
``std::barrier``, a warp shuffle goes through memory. It checks the kernels' logic —
indexing, chunking, barriers, the midpoint hand-over, the backward algebra — not their speed,
and not GPU-only behaviour (memory model subtleties, occupancy).

``GLAKERNELS_EMULATOR_SANITIZE=address`` builds the library with AddressSanitizer (run
python with ``LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``):
every out-of-bounds read or write of a tensor by a kernel is then reported.

``Emulator(names)`` builds a shared library holding the listed kernels (name expressions,
as the launcher asks for them) and is itself a launcher for
:func:`glakernels.backends.cupy._driver.forward` / ``backward`` on CPU tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess

import numpy as np

from glakernels.backends.cupy._sources import KERNEL_DIR, instantiation_unit, kernel_source

HERE = pathlib.Path(__file__).resolve().parent

_CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.float32: ctypes.c_float}


def compiler() -> str | None:
    """A C++20 compiler, or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _translation_unit(names_by_file: dict[str, tuple[str, ...]]) -> str:
    parts = ['#include "prelude.h"']
    for file, names in names_by_file.items():
        parts.append(instantiation_unit(file, names))
    parts.append('#include "runtime.h"')
    table = ",\n".join(
        f'  {{"{name}", [](void** a) {{ gla_emu::invoke(&{name}, a); }}}}'
        for names in names_by_file.values() for name in names
    )
    parts.append(f"static const gla_emu::Entry gla_emu_entries[] = {{\n{table}\n}};")
    parts.append(
        'extern "C" int gla_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,\n'
        "                              unsigned threads, unsigned long long smem, void** args) {\n"
        "  return gla_emu::launch(gla_emu_entries, sizeof(gla_emu_entries) / sizeof(gla_emu_entries[0]),\n"
        "                         name, gx, gy, gz, threads, smem, args);\n"
        "}\n"
    )
    return "\n".join(parts)


class Emulator:
    """A launcher running kernels on the CPU; ``names_by_file`` as in
    :func:`glakernels.backends.cupy._plan.every_name_expression`."""

    #: the tensor-core kernels' warp-matrix functions are emulated too (gla_emulation.h)
    tensor_cores = True

    def __init__(self, names_by_file: dict[str, tuple[str, ...]], build_dir: pathlib.Path):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++ or clang++) found")
        names_by_file = {f: tuple(dict.fromkeys(n)) for f, n in names_by_file.items()}
        unit = _translation_unit(names_by_file)
        flags = ["-O1"]
        sanitize = os.environ.get("GLAKERNELS_EMULATOR_SANITIZE")
        if sanitize:  # sanitizers follow ucontext switches, not the hand-written one
            flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-DGLA_EMU_UCONTEXT"]
        digest = hashlib.sha256(
            (unit + "".join(kernel_source(f) for f in names_by_file)
             + "".join((HERE / h).read_text() for h in ("prelude.h", "gla_emulation.h", "runtime.h"))
             + " ".join(flags)).encode()
        ).hexdigest()[:16]
        build_dir.mkdir(parents=True, exist_ok=True)
        library = build_dir / f"gla_emulator_{digest}.so"
        if not library.exists():
            source = build_dir / f"gla_emulator_{digest}.cpp"
            source.write_text(unit)
            command = [cxx, "-std=c++20", *flags, "-shared", "-fPIC", "-DGLA_EMULATION",
                       "-Wno-unknown-pragmas", f"-I{HERE}", f"-I{KERNEL_DIR}", str(source), "-o", str(library)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"emulator build failed:\n{' '.join(command)}\n{result.stderr[-6000:]}")
        self._lib = ctypes.CDLL(str(library))
        self._lib.gla_emu_launch.restype = ctypes.c_int
        self.names = names_by_file

    def __call__(self, file: str, name: str, grid: tuple, block: int, smem: int, args: tuple) -> None:
        # a struct by value (``gla::Params``) travels as a copy of its bytes
        values = [ctypes.create_string_buffer(a.tobytes(), a.nbytes) if isinstance(a, np.void)
                  else _CTYPES[type(a)](a.item() if hasattr(a, "item") else a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        status = self._lib.gla_emu_launch(name.encode(), grid[0], grid[1], grid[2], block, smem, pointers)
        if status != 0:
            raise RuntimeError(f"emulator launch of {name} failed with status {status}")
