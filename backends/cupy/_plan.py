"""How a call is cut into kernel launches: tiles, chunking, shared memory, kernel names.

Everything here depends only on K, V, T and the dtype — never on B or H — so a sequence's
result cannot depend on what else is in the batch (the kernels are deterministic given the
plan). Mirrors of constants in ``kernels/gla_sweep.cu`` are marked as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: roles of ``gla_sweep`` (mirror of ``enum Role``)
FORWARD_OUTPUT, CHUNK_STATE, BACKWARD_DV, CHUNK_ADJOINT, BACKWARD_DQ, BACKWARD_DK = range(6)
ROLES = (FORWARD_OUTPUT, CHUNK_STATE, BACKWARD_DV, CHUNK_ADJOINT, BACKWARD_DQ, BACKWARD_DK)
OWN_IS_V = {FORWARD_OUTPUT, CHUNK_STATE, BACKWARD_DV, CHUNK_ADJOINT}
LOCAL_ROLES = {CHUNK_STATE, CHUNK_ADJOINT}

C_TYPES = {torch.float32: "float", torch.bfloat16: "gla::bf16", torch.float16: "gla::f16"}

#: a sequence up to this long is swept by one block per tile; longer ones are cut into chunks
#: of CHUNK_LEN tokens swept in parallel (the bidirectional midpoint buffer holds one chunk)
SINGLE_CHUNK_MAX = 512
CHUNK_LEN = 256
SCAN_THREADS = 256
FIXUP_THREADS = 256


@dataclass(frozen=True)
class Tile:
    """Mirror of ``gla::Tile``: one direction group's thread layout."""

    own_tile: int  # own-axis indices per block
    opt: int  # own indices per thread
    split: int  # threads splitting the inner axis of one own index
    ipt: int  # inner indices per thread
    ct: int  # tokens staged in shared memory at a time

    @property
    def threads(self) -> int:
        return self.own_tile // self.opt * self.split

    @property
    def inner_pad(self) -> int:
        return self.split * self.ipt

    def template(self) -> str:
        return f"gla::Tile<{self.own_tile}, {self.opt}, {self.split}, {self.ipt}, {self.ct}>"


#: (largest inner dim, tile) — the first that fits is used. Chosen from GPU timings of several
#: layouts (H100, bf16, DESIGN §7 shapes; backends/cupy/NOTES.md): for K = 32 (forward
#: output, dv) two own columns per thread over a 64-wide tile; for V = 64 (dq, dk) two own
#: columns per thread and 8 staged tokens; for 128 four own columns per thread.
DEFAULT_TILES = (
    (16, Tile(32, 1, 1, 16, 16)),
    (32, Tile(64, 2, 2, 16, 16)),
    (64, Tile(32, 2, 4, 16, 8)),
    (128, Tile(32, 4, 8, 16, 4)),
    (256, Tile(32, 1, 8, 32, 8)),
)
MAX_HEAD_DIM = DEFAULT_TILES[-1][0]


def tile_for(inner_dim: int, tiles=DEFAULT_TILES) -> Tile:
    for limit, tile in tiles:
        if inner_dim <= limit:
            return tile
    raise ValueError(f"head dim {inner_dim} above the cupy backend's limit {tiles[-1][0]}")


def all_tiles() -> tuple[Tile, ...]:
    return tuple(dict.fromkeys(t for _, t in DEFAULT_TILES))


def chunking(seq_len: int, chunk_len: int | None = None) -> tuple[int, int]:
    """``(chunk_len, n_chunks)`` for a sequence of ``seq_len`` tokens."""
    if chunk_len is None:
        chunk_len = seq_len if seq_len <= SINGLE_CHUNK_MAX else CHUNK_LEN
    chunk_len = max(1, min(chunk_len, seq_len))
    return chunk_len, math.ceil(seq_len / chunk_len)


def _staged_arrays(role: int) -> tuple[int, int]:
    """Mirror of ``RoleTraits::N_INNER`` / ``N_OWN``."""
    local = role in LOCAL_ROLES
    decay_inner = role in OWN_IS_V
    n_inner = 1 + (0 if local else 1) + (1 if decay_inner else 0)
    n_own = 3 if role == BACKWARD_DQ else 4 if role == BACKWARD_DK else 1
    return n_inner, n_own


def sweep_smem_bytes(tile: Tile, role: int, bidirectional: bool, chunk_len: int) -> int:
    """Mirror of the kernel's ``smem_needed``: staging per direction group, plus the buffer
    where bidirectional sweeps park one direction's outputs."""
    n_inner, n_own = _staged_arrays(role)
    group = n_inner * tile.ct * tile.inner_pad + n_own * tile.ct * tile.own_tile
    groups = 2 if bidirectional else 1
    parked = chunk_len * tile.own_tile if bidirectional and role not in LOCAL_ROLES else 0
    return 4 * (groups * group + parked)


def sweep_name(dtype: torch.dtype, tile: Tile, role: int) -> str:
    return f"gla::gla_sweep<{C_TYPES[dtype]}, {tile.template()}, {role}>"


def fixup_name(dtype: torch.dtype) -> str:
    return f"gla::gla_gate_grad_fixup<{C_TYPES[dtype]}>"


SCAN_NAME = "gla::gla_state_scan"


def sweep_family(dtype: torch.dtype, tile: Tile) -> tuple[str, ...]:
    """Name expressions compiled together (one NVRTC call): every role for one dtype and tile."""
    return tuple(sweep_name(dtype, tile, role) for role in ROLES)


def scan_family() -> tuple[str, ...]:
    return (SCAN_NAME,) + tuple(fixup_name(d) for d in C_TYPES)


def every_name_expression() -> dict[str, tuple[str, ...]]:
    """Every kernel the launcher can ask for, by source file (for the nvcc check in CI)."""
    from ._sources import SCAN_FILE, SWEEP_FILE

    sweeps = tuple(name for dtype in C_TYPES for tile in all_tiles() for name in sweep_family(dtype, tile))
    return {SWEEP_FILE: sweeps, SCAN_FILE: scan_family()}
