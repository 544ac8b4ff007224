"""How a call is cut into kernel launches: tiles, chunking, shared memory, kernel names.

Everything that decides a result's bits depends only on K, V, T and the dtype — never on B
or H — so a sequence's result cannot depend on what else is in the batch (the kernels are
deterministic given the plan). The choices by grid size, the tensor-core kernels' launches
(``chunk_forward_launch``, ``chunk_backward_launch``: how many warps split V or K, register
targets), move work between warps without changing any column's arithmetic; the tests compare
their launches bit for bit.
Mirrors of constants in ``kernels/gla_sweep.cu`` are marked as such.
"""

from __future__ import annotations

import itertools
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


def fixup_smem_bytes(head_dim_k: int) -> int:
    """The fixup's dynamic shared memory: the chunk's K offsets, float32."""
    return 4 * head_dim_k


SCAN_NAME = "gla::gla_state_scan"


def sweep_family(dtype: torch.dtype, tile: Tile) -> tuple[str, ...]:
    """Name expressions compiled together (one NVRTC call): every role for one dtype and tile."""
    return tuple(sweep_name(dtype, tile, role) for role in ROLES)


def scan_family() -> tuple[str, ...]:
    return (SCAN_NAME,) + tuple(fixup_name(d) for d in C_TYPES)


#: The tensor-core forward (``kernels/gla_chunk_forward.cu``): 16-bit inputs, head dims that
#: are multiples of 16 up to these (the warp holds the whole [V, K] state as accumulators), no
#: initial or final state; a GPU of compute capability >= 8.0. Sequences longer than
#: SINGLE_CHUNK_MAX run as segments of CHUNK_LEN tokens: the segments' local end states (the
#: same kernel without outputs), gla_state_scan, then every segment from its entering state.
#: A bidirectional block parks [segment, V] float32 outputs in shared memory.
CHUNK_FORWARD_MAX_K = 32
CHUNK_FORWARD_MAX_V = 64
#: the 16-byte loads need every tensor's start 16-byte aligned (rows then are: K, V % 16 == 0)
CHUNK_FORWARD_ALIGN = 16


def chunk_forward_fits(dtype: torch.dtype, seq_len: int, head_dim_k: int, head_dim_v: int, states: bool) -> bool:
    """Whether the tensor-core forward takes a call of this kind (alignment checked apart)."""
    return (dtype in (torch.bfloat16, torch.float16) and not states and seq_len >= 1
            and head_dim_k % 16 == 0 and head_dim_k <= CHUNK_FORWARD_MAX_K
            and head_dim_v % 16 == 0 and head_dim_v <= CHUNK_FORWARD_MAX_V)


#: warps per direction that split V between them (each holds V / warps columns of the state)
CHUNK_FORWARD_WARPS = (1, 2, 4)


@dataclass(frozen=True)
class ChunkForwardLaunch:
    """Mirror of ``gla_chunk_forward``'s launch template parameters other than the shape."""

    warps: int = 2  # warps per direction (V split between them)
    prefetch: bool = True  # the next chunk's loads in flight during this one
    min_blocks: int = 1  # blocks per SM the register allocation must allow


def chunk_forward_launch(blocks: int, head_dim_v: int, bidirectional: bool, sm_count: int) -> ChunkForwardLaunch:
    """The launch for a grid of ``blocks`` blocks (B * H * segments). H100, bf16, K = 32, V = 64, CUDA-graph
    GPU time (``python benchmarks/cupy_chunk_forward_gpu.py --launches ...``, NOTES.md run 21b):
    prefetching always won (1.1-1.5x); bidirectional calls run 2 warps a direction, at least 3
    blocks per SM (168 registers) once the grid needs more than the 2 per SM that 255
    registers allow (vigT_224, 384 blocks: 36.8 against 45.2 µs), else uncapped; causal calls
    the most warps (4, 2, 1: V split in 16, 32 or 64 columns) whose uncapped blocks still fit
    the grid in one wave (8 x 196 x 3: 12.4 against 13.5 µs with 2; 64 x 196 x 12: 37.4 with
    one warp against 47.5 with 2). Bits of o do not depend on the choice: each V column's
    arithmetic is the same in every launch (tests/test_cupy_gpu.py checks it bit for bit)."""
    tiles = head_dim_v // 16
    if bidirectional:
        warps = 2 if tiles % 2 == 0 else 1
        uncapped_blocks_per_sm = 65536 // (255 * 64 * warps)
        return ChunkForwardLaunch(warps, True, 3 if blocks > uncapped_blocks_per_sm * sm_count else 1)
    for warps in (4, 2, 1):
        if tiles % warps == 0 and blocks <= 65536 // (256 * 32 * warps) * sm_count:
            return ChunkForwardLaunch(warps, True, 1)
    return ChunkForwardLaunch(1, True, 1)


def chunk_forward_name(dtype: torch.dtype, head_dim_k: int, head_dim_v: int, bidirectional: bool,
                       launch: ChunkForwardLaunch = ChunkForwardLaunch(warps=1), output: bool = True) -> str:
    """``gla_chunk_forward<E, KT, VT, NW, BIDIR, PREFETCH, MIN_BLOCKS, OUTPUT>``: K tiles of 16,
    V tiles of 16 per warp, warps per direction; ``output=False``: the segments' local states."""
    flag = lambda x: "true" if x else "false"  # noqa: E731
    return (f"gla::gla_chunk_forward<{C_TYPES[dtype]}, {head_dim_k // 16}, {head_dim_v // 16 // launch.warps}, "
            f"{launch.warps}, {flag(bidirectional)}, {flag(launch.prefetch)}, {launch.min_blocks}, {flag(output)}>")


def chunk_forward_block(bidirectional: bool, launch: ChunkForwardLaunch) -> int:
    return 32 * launch.warps * (2 if bidirectional else 1)


def chunk_forward_smem_bytes(segment_len: int, head_dim_v: int, bidirectional: bool, output: bool = True) -> int:
    return 4 * segment_len * head_dim_v if bidirectional and output else 0


def chunk_forward_names() -> tuple[str, ...]:
    """Every launch the plan can choose for every shape (what CI compiles and emulates)."""
    names = []
    shapes = itertools.product((torch.bfloat16, torch.float16), range(16, CHUNK_FORWARD_MAX_K + 1, 16),
                               range(16, CHUNK_FORWARD_MAX_V + 1, 16), (True, False))
    for dtype, k, v, bi in shapes:
        # on a one-SM GPU, grids of 1, 3 and 5 blocks cross every threshold of the plan
        for grid, output in itertools.product((1, 3, 5), (True, False)):
            launch = chunk_forward_launch(grid, v, bi, 1)
            names.append(chunk_forward_name(dtype, k, v, bi, launch, output))
    return tuple(dict.fromkeys(names))


#: The tensor-core backward (``kernels/gla_chunk_backward.cu``): bfloat16 and float16 inputs
#: (float16 dout and v as two exact bfloat16 parts), head dims and segments as the forward's, no
#: states. Sequences whose gates leave the decay ratio's
#: range are flagged by the dq kernel and redone by the sweeps.
CHUNK_BACKWARD_DTYPES = (torch.bfloat16, torch.float16)
#: int32 flags per (batch, head) (mirror of ``kFlagSlots`` in ``kernels/gla_common.cuh``)
FLAG_SLOTS = 4


def chunk_backward_fits(dtype: torch.dtype, seq_len: int, head_dim_k: int, head_dim_v: int, states: bool) -> bool:
    """Whether the tensor-core backward takes a call of this kind (alignment checked apart)."""
    return dtype in CHUNK_BACKWARD_DTYPES and chunk_forward_fits(dtype, seq_len, head_dim_k, head_dim_v, states)


@dataclass(frozen=True)
class ChunkBackwardLaunch:
    """Mirror of the tensor-core backward kernels' launch template parameters: warps per
    direction of the dq walk and the dk walk (K split between them) and of the dv walk (V
    split), and the blocks per SM their register allocations must allow."""

    dq_warps: int = 2
    dq_min_blocks: int = 1
    adjoint_warps: int = 2  # the dv and the dk walk
    adjoint_min_blocks: int = 1
    fused: bool = False  # dv and dk in one adjoint walk (K = 32, V tiles even: two warps a direction)
    fused_prefetch: bool = True  # the fused walk's next-chunk loads in flight during a step
    fused_shared_state: bool = False  # the fused walk's adjoint in shared memory between its uses


#: the fused adjoint walk's swap buffers: per direction, two warps x two step parities x
#: [16 x 16] float32 (mirror of gla_chunk_backward_adjoint's `swap`)
FUSED_SWAP_BYTES = 2 * 2 * 16 * 16 * 4


def chunk_backward_fuses(head_dim_k: int, head_dim_v: int) -> bool:
    """Whether the fused adjoint walk takes these head dims: one K tile of dk per warp of a
    direction (K = 32) and V split evenly between the two."""
    return head_dim_k == 32 and (head_dim_v // 16) % 2 == 0


#: bidirectional calls take the fused adjoint walk on segments up to this many tokens: with its
#: adjoint in shared memory (4 T V + 24 KB at K = 32, V = 64) three blocks then fit an H100
#: SM's 228 KB up to T ~ 203 (ViG at 224 px: T = 196); longer segments would run two blocks
#: an SM, and the two walks win there (NOTES.md run 23g)
FUSED_BIDIRECTIONAL_MAX_T = 200


def chunk_backward_launch(blocks: int, head_dim_k: int, head_dim_v: int, bidirectional: bool, segment_len: int,
                          sm_count: int) -> ChunkBackwardLaunch:
    """The launch for a grid of ``blocks`` blocks (B * H * segments) over segments of
    ``segment_len`` tokens. Two warps a direction wherever the
    split axis has an even number of 16-wide tiles (each holds half of the state; one warp
    holding K = 32 x V = 64 spills, and the halves ran 1.3-2x faster). At least 3 blocks per
    SM (162-168 registers) once the grid needs more than the 2 per SM the uncapped kernels
    (180-218 registers at 128 threads) allow, else uncapped. H100, bf16, bidirectional,
    CUDA-graph GPU time of the backward (``python benchmarks/cupy_chunk_backward_gpu.py
    --launches ...``, NOTES.md run 22b): vigT_224 (384 blocks) 130.6 µs capped against 185.2
    uncapped; 8 x 196 x 3 (24 blocks) 71.3 uncapped against 77.1; 32 x 512 x 3 121.1
    against 135.3. Bits do not depend on the launch (each column's arithmetic is the same;
    tests/test_cupy_gpu.py checks it bit for bit).

    With K = 32 (V in 32-column halves) causal calls, and bidirectional ones on segments of
    at most FUSED_BIDIRECTIONAL_MAX_T tokens, take the fused adjoint walk (dv and dk in one
    pass). It sums dk's V halves in its own order, so that choice depends on the kind of call
    only (mode, T, K, V), never on the grid; its launches give the same bits as each other.
    Causal: registers, prefetching (backward vigT_224 66.4 against 75.7 µs for the two walks,
    vigT_1024 161 / 175, 8 x 196 x 3 37.1 / 41.6; runs 23b, 23g). Bidirectional: past two
    blocks an SM the adjoint in shared memory without prefetching, three blocks an SM
    unspilled (vigT_224 127.1 against 132.6, vigB_224 254.7 / 264.0), else registers and
    prefetching (8 x 196 x 3 59.9 against 71.2); longer segments keep the two walks (T = 256
    segments at vigT_1024: 282.7 against 228.3; run 23g)."""
    k_tiles, v_tiles = head_dim_k // 16, head_dim_v // 16
    even = k_tiles % 2 == 0 and v_tiles % 2 == 0
    min_blocks = 3 if blocks > 2 * sm_count else 1
    fused = chunk_backward_fuses(head_dim_k, head_dim_v) and (
        not bidirectional or segment_len <= FUSED_BIDIRECTIONAL_MAX_T)
    shared_state = fused and bidirectional and min_blocks > 1
    return ChunkBackwardLaunch(2 if k_tiles % 2 == 0 else 1, min_blocks, 2 if even else 1, min_blocks,
                               fused=fused, fused_prefetch=not shared_state, fused_shared_state=shared_state)


def chunk_backward_dq_name(dtype: torch.dtype, head_dim_k: int, head_dim_v: int, bidirectional: bool,
                           launch: ChunkBackwardLaunch) -> str:
    """``gla_chunk_backward_dq<E, KT, VT, NW, BIDIR, MIN_BLOCKS>``: K tiles of 16 per warp."""
    bi = "true" if bidirectional else "false"
    return (f"gla::gla_chunk_backward_dq<{C_TYPES[dtype]}, {head_dim_k // 16 // launch.dq_warps}, {head_dim_v // 16}, "
            f"{launch.dq_warps}, {bi}, {launch.dq_min_blocks}>")


def chunk_backward_adjoint_name(dtype: torch.dtype, dv: bool, head_dim_k: int, head_dim_v: int, bidirectional: bool,
                                launch: ChunkBackwardLaunch, local: bool = False) -> str:
    """``gla_chunk_backward_dkv<E, DV, KT, VT, NW, BIDIR, MIN_BLOCKS, LOCAL>``: the dv walk (V
    split between the warps) or the dk walk (K split); KT, VT per warp; ``local``: the dk
    walk's layout without outputs, each segment's local adjoint for the scan."""
    w = launch.adjoint_warps
    k_tiles, v_tiles = (head_dim_k // 16, head_dim_v // 16 // w) if dv else (head_dim_k // 16 // w, head_dim_v // 16)
    flag = lambda x: "true" if x else "false"  # noqa: E731
    return (f"gla::gla_chunk_backward_dkv<{C_TYPES[dtype]}, {flag(dv)}, {k_tiles}, {v_tiles}, {w}, {flag(bidirectional)}, "
            f"{launch.adjoint_min_blocks}, {flag(local)}>")


def chunk_backward_fused_name(dtype: torch.dtype, head_dim_k: int, head_dim_v: int, bidirectional: bool,
                              launch: ChunkBackwardLaunch) -> str:
    """``gla_chunk_backward_adjoint<E, KT, VT, NW, BIDIR, PREFETCH, SHARED_STATE, MIN_BLOCKS>``:
    the fused adjoint walk, two warps a direction splitting V (VT per warp), every K tile (KT)."""
    flag = lambda x: "true" if x else "false"  # noqa: E731
    return (f"gla::gla_chunk_backward_adjoint<{C_TYPES[dtype]}, {head_dim_k // 16}, {head_dim_v // 32}, 2, "
            f"{flag(bidirectional)}, "
            f"{flag(launch.fused_prefetch)}, {flag(launch.fused_shared_state)}, {launch.adjoint_min_blocks}>")


def chunk_backward_fused_smem_bytes(segment_len: int, head_dim_k: int, head_dim_v: int, bidirectional: bool,
                                    launch: ChunkBackwardLaunch) -> int:
    """The fused walk's dynamic shared memory: the parked dv (bidirectional), the swap buffers
    of each direction, then (``fused_shared_state``) each warp's part of the adjoint."""
    directions = 2 if bidirectional else 1
    state = 4 * head_dim_k * head_dim_v * directions if launch.fused_shared_state else 0
    return chunk_backward_smem_bytes(segment_len, head_dim_v, bidirectional) + FUSED_SWAP_BYTES * directions + state


def chunk_backward_blocks(bidirectional: bool, launch: ChunkBackwardLaunch) -> tuple[int, int]:
    """Threads per block of the dq and of the dv and dk kernels."""
    directions = 2 if bidirectional else 1
    return 32 * launch.dq_warps * directions, 32 * launch.adjoint_warps * directions


def chunk_backward_smem_bytes(seq_len: int, head_dim: int, bidirectional: bool) -> int:
    """Dynamic shared memory of a backward walk whose output has ``head_dim`` columns: a
    bidirectional block parks [T, head_dim] float32 outputs."""
    return 4 * seq_len * head_dim if bidirectional else 0


def chunk_backward_names() -> tuple[str, ...]:
    """Every launch the plan can choose for every shape (what CI compiles and emulates)."""
    names = []
    for dt, k, v, bi, blocks, length in itertools.product(CHUNK_BACKWARD_DTYPES, range(16, CHUNK_FORWARD_MAX_K + 1, 16),
                                                          range(16, CHUNK_FORWARD_MAX_V + 1, 16), (True, False), (1, 3),
                                                          (FUSED_BIDIRECTIONAL_MAX_T, SINGLE_CHUNK_MAX)):
        launch = chunk_backward_launch(blocks, k, v, bi, length, 1)  # one SM: 1 and 3 blocks cross the threshold
        names += [chunk_backward_dq_name(dt, k, v, bi, launch),
                  chunk_backward_adjoint_name(dt, False, k, v, bi, launch, local=True)]
        if launch.fused:
            names.append(chunk_backward_fused_name(dt, k, v, bi, launch))
        else:
            names += [chunk_backward_adjoint_name(dt, True, k, v, bi, launch),
                      chunk_backward_adjoint_name(dt, False, k, v, bi, launch)]
    return tuple(dict.fromkeys(names))


def every_name_expression() -> dict[str, tuple[str, ...]]:
    """Every kernel the launcher can ask for, by source file (for the nvcc check in CI)."""
    from ._sources import CHUNK_BACKWARD_FILE, CHUNK_FORWARD_FILE, SCAN_FILE, SWEEP_FILE

    sweeps = tuple(name for dtype in C_TYPES for tile in all_tiles() for name in sweep_family(dtype, tile))
    return {SWEEP_FILE: sweeps, SCAN_FILE: scan_family(), CHUNK_FORWARD_FILE: chunk_forward_names(),
            CHUNK_BACKWARD_FILE: chunk_backward_names()}
