"""Launchers for the Triton kernels: tile and segment choice, allocation, grids.

Launch counts. With K <= 64 the forward runs the single-pass kernel
(``kernels_single_pass.py``), and with V <= 64 too the backward runs the single-pass backward
(``kernels_single_pass_bwd.py``): one launch for sequences up to ``single_pass_max_t`` tokens
(512), else three — every segment's own state contribution, the scan of the segment boundary
states (``kernels_boundary_states.py``), then one program per direction and segment of
``single_pass_segment`` tokens (256). The single-pass backward is two launches of that last
kind (its pass A, then its pass B; ``single_pass_bwd_split``). Bidirectional calls also zero
the counters where the two directions meet first (``single_pass_meet``), except a forward that
parks every part and sums them in one more launch (``single_pass_park_all_per_sm``, off by
default). Otherwise the two-phase
kernels of ``kernels.py`` run: one launch for a sequence that fits one segment, else the same
two boundary-state launches first.
Nothing here reads tensor values or synchronises, so a CUDA graph can capture the op and
``torch.compile`` can trace around it.

Matmul precision follows PyTorch's own switch for float32 matmuls, read at every call
(``_dot_mode``): by default float32 inputs use IEEE float32 matmuls, and float16 / bfloat16
inputs bfloat16 tensor cores with float32 intermediates split into two bfloat16 parts (about
float32 accuracy). The documented opt-ins: ``torch.backends.cuda.matmul.allow_tf32 = True`` (or
``torch.set_float32_matmul_precision("high")``) for tf32 with float32 inputs, and
``torch.set_float32_matmul_precision("medium")`` for single bfloat16 (tf32 for float16) dots
with 16-bit inputs. Accumulation is float32 throughout.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from glakernels._launch_device import launch_device
from glakernels._precision import float32_matmul_precision, tf32_allowed

from . import compile_ahead, kernels, kernels_boundary_states, kernels_single_pass, kernels_single_pass_bwd

#: Sequences up to this length run as one segment: one launch, the whole chain in one program.
SINGLE_SEGMENT_MAX_T = 512
#: Largest K the single-pass backward takes (and largest V: one block each per program), and
#: largest K for which the single-pass forward runs with its ViG-tuned settings.
SINGLE_PASS_MAX_K = 64
#: Largest K the single-pass forward takes (one K block; larger V is split into blocks). For
#: 64 < K <= 128 it runs 4 warps without a register cap: H100, bf16, lm_4k (K = V = 128):
#: 2.02 ms against 2.99 for the two-phase forward (cupy: 1.96; NOTES.md session 5).
SINGLE_PASS_FORWARD_MAX_K = 128
#: Segment length of the two-phase kernels for longer sequences (a power of two: a segment's
#: state contribution is one tile). H100, bf16, vigT_1024 / lm_4k (NOTES.md, session 5): 256
#: beat 64 and one-chunk segments of 32 (which skip phase 1) in the forward and the backward.
LONG_SEGMENT = 256


@dataclass(frozen=True)
class Config:
    chunk: int  # C, tokens per chunk (power of two, >= 16)
    segment: int  # tokens per segment (multiple of chunk); >= T means a single segment
    block_k: int  # K tile (power of two, >= 16)
    block_v: int  # V tile (power of two, >= 16); the forward grid splits V by it
    num_warps: int
    num_stages: int  # software pipelining depth of the segment kernels' loops
    # the boundary states of long sequences (kernels_boundary_states.py)
    states_block_k: int  # K and V tiles of the segment sums
    states_block_v: int
    states_num_warps: int
    states_step: int  # tokens per step of a segment sum's walk (power of two)
    scan_rows: int  # boundaries per step of the scan (power of two)
    scan_num_warps: int  # each scan program takes one state element per thread
    # The single-pass forward (kernels_single_pass.py), for K <= single_pass_max_k. Defaults
    # from H100 timings at vigT_224 / vigB_224 (bf16; NOTES.md): chunks of 16 and 2 warps per
    # program, registers capped at 168 so that 6 programs fit an SM (all 768 of vigT_224's
    # programs in one wave); 4 warps and no cap for K > 64.
    single_pass: bool = True
    single_pass_max_k: int = SINGLE_PASS_FORWARD_MAX_K
    single_pass_chunk: int = 16
    single_pass_block_v: int = 64
    single_pass_num_warps: int = 2
    single_pass_num_stages: int = 1
    single_pass_maxnreg: Optional[int] = 168  # registers per thread (None: the compiler's choice)
    # ... except for small grids: (warps, register cap or None, programs per SM that the SM
    # holds at those settings), tried in order; the first whose slots hold the grid in one
    # wave runs it (_single_pass_launch; () for none). Wider programs finish each chunk step
    # sooner, so a grid that leaves SMs idle gains from them. H100, bf16, T = 196 (NOTES.md
    # session 13): 4 warps uncapped take 184-188 registers (2 programs per SM), 4 warps capped
    # at 168 three, 2 warps uncapped (255 registers) four, 2 warps capped six. Sound only
    # because every one of these launches gives the same result bit for bit (a sequence's
    # result must not depend on the rest of the batch; the kernel's sums are all tensor-core
    # dots or exact, see kernels_single_pass._chunk_math).
    single_pass_small_grid_launches: tuple = ((4, None, 2), (4, 168, 3), (2, None, 4))
    # bidirectional calls: how the two directions' parts of a chunk meet. By default once, in
    # the middle of the walks (kernels_single_pass._meet): each direction parks the parts of
    # its first half and counts itself in; the second to count adds the other's parked parts
    # in its whole second half; the first reads the count up to single_pass_meet_spin times
    # for the other and, if the other does not come (it need not be resident: no deadlock),
    # parks its second half for the last to finish to sum. Otherwise (single_pass_meet=False)
    # chunk by chunk: a fence and an atomic in every chunk step (the forward's and the
    # backward's pass B's). H100, bf16, µs, meeting / chunk by chunk (NOTES.md session 26,
    # run 26d): forward vigT_224 47.3 / 55.1, vigB_224 90.1 / 105.4, vigT_1024 107.8 / 115.3;
    # forward+backward vigT_224 268.6 / 294.8, vigT_1024 463.6 / 494.0. No waiting at all
    # (spin 0) lost (run 26b: 56.5 against 53.0 at vigT_224); 512 reads: as 64.
    single_pass_meet: bool = True
    single_pass_meet_spin: int = 64
    # bidirectional forward grids of at most this many programs per SM park every chunk's
    # part instead and sum the two directions' parts in a second launch
    # (_gla_fwd_sum_parts_kernel). Off: against the meeting it won 3 % at B·H = 3 and lost
    # 10 % at 96 (H100, bf16, T = 196, µs, parked / meeting: B·H 3: 16.7 / 17.2, 12: 17.5 /
    # 17.8, 48: 17.8 / 17.2, 96: 24.0 / 21.7; NOTES.md session 26); against the chunk-by-chunk
    # handoff it had won (session 13: 6 programs 38.2 -> 28.3 µs). The same o bit for bit any
    # way (one float32 addition, which commutes).
    single_pass_park_all_per_sm: int = 0
    # walks whose gates are all >= -32 / chunk score pairs by a decay ratio, one dot a chunk,
    # instead of the binary hierarchy's one a level (kernels_single_pass._ratio_scores). H100,
    # bf16, forward (NOTES.md session 18): vigT_224 88.1 -> 59.0 µs, vigT_1024 153.8 -> 124.9,
    # lm_4k 2124 -> 1173
    single_pass_ratio: bool = True
    # ... tested per chunk instead (both chunk maths in one loop: only the chunks with a
    # stronger gate take the hierarchy, at the cost of more spills; forward and backward).
    # Off: slower than the hierarchy alone on ViG's gates (H100, bf16, vigT_224 forward 92.4
    # against 87.7 µs and 58.8 per walk; NOTES.md session 19)
    single_pass_ratio_per_chunk: bool = False
    # sequences longer than single_pass_max_t: tokens per segment program (a multiple of the
    # chunk; the boundary states come first, kernels_boundary_states.py)
    # (H100, bf16, vigT_1024: 256 171 µs, 128 187, 512 229, 64 241; NOTES.md session 5)
    single_pass_max_t: int = SINGLE_SEGMENT_MAX_T
    # the forward written in Gluon (kernels_gluon_forward.py) in place of the tl kernel, for
    # 16-bit inputs with K <= single_pass_gluon_max_k on NVIDIA GPUs (not under the
    # interpreter or while Dynamo traces): one warp a program, V blocks of
    # single_pass_gluon_block_v columns, registers capped. Off by default: H100, bf16, µs
    # (NOTES.md session 25, run 25b) Gluon / tl: vigT_224 55.7 / 54.1, vigB_224 120.4 / 102.7,
    # vigT_1024 134.6 / 115.7 (uncapped, 239 registers: 68.9 at vigT_224; 128: 135.1); with
    # the directions' meeting (session 26, run 26c) vigT_224 55.4 / 47.6
    single_pass_gluon: bool = False
    single_pass_gluon_max_k: int = 32
    single_pass_gluon_block_v: int = 32
    single_pass_gluon_maxnreg: Optional[int] = 168
    single_pass_segment: int = 256
    # its backward (kernels_single_pass_bwd.py), when V <= 64 too
    single_pass_backward: bool = True
    single_pass_bwd_chunk: int = 16
    single_pass_bwd_num_warps: int = 4
    single_pass_bwd_maxnreg: Optional[int] = None
    # pass A (the state gradients, parked) in a launch of its own before pass B, with
    # single_pass_bwd_pass_a_num_warps warps and the registers it needs: in one launch with
    # pass B it ran at pass B's occupancy (255 registers, 2 programs per SM; alone: 108
    # registers at 2 warps). H100, bf16, forward+backward: vigT_224 456 -> 415 µs, vigB_224
    # 891 -> 824, vigT_1024 720 -> 676 (4 warps: 418, 820, 708; NOTES.md session 9, run 5)
    single_pass_bwd_split: bool = True
    single_pass_bwd_pass_a_num_warps: int = 2
    # pass A loads the next chunk's q, g and dO tiles while this chunk's math runs (as pass B
    # and the forward do); off, each step waits on its own loads. H200, bf16, forward+backward,
    # µs, on / off (NOTES.md session 27, run 27c): vigT_224 252.7 / 256.6, vigB_224 492.4 /
    # 506.7, vigT_1024 441.8 / 446.1 (with pass A also capped at 128 registers: 251.9, 501.9,
    # 444.2; not kept)
    single_pass_bwd_pass_a_prefetch: bool = True
    # the ratio chunk math (as single_pass_ratio) in both passes. H100, bf16, forward+backward
    # (session 18): vigT_224 395.1 -> 321.2 µs, vigT_1024 612.5 -> 521.6 (the forward's already on)
    single_pass_bwd_ratio: bool = True
    # the two-phase backward (kernels._gla_bwd_kernel: K or V > 64), tested per chunk and K
    # tile (_scores_and_grads_one_direction): the ratio math where a chunk's gates allow it
    two_phase_bwd_ratio: bool = True
    # matmul operands of float16 / bfloat16 inputs (``_dot_mode``): one of HALF_DOT_MODES, or
    # None for the dtype's default
    half_dots: Optional[str] = None


# Process-wide, not per thread: on CUDA, autograd runs the backward on its own device thread,
# which must see the overrides of the thread that called the forward.
_overrides: dict = {}
_overrides_lock = threading.Lock()


@contextlib.contextmanager
def override_config(**fields) -> Iterator[None]:
    """Force config fields for every call in this process while the context is open (tests
    use it to run the multi-segment paths at small sizes, benchmarks to time variants). Not
    for concurrent use from several threads."""
    global _overrides
    with _overrides_lock:
        previous = _overrides
        _overrides = {**previous, **fields}
    try:
        yield
    finally:
        with _overrides_lock:
            _overrides = previous


def config_fields(text: str) -> dict:
    """``override_config``'s fields from ``"FIELD=VALUE, ..."`` (each value a Python literal),
    checked against ``Config`` here rather than at the first kernel launch (the benchmarks'
    ``--triton-config`` / ``--config`` options)."""
    known = {f.name for f in dataclasses.fields(Config)}
    fields = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"expected FIELD=VALUE items with FIELD one of launch.Config's fields, got {item!r}")
        try:
            fields[name] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{name}: expected a Python literal (True, 16, None, ...), got {value.strip()!r}") from None
    return fields


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def choose_config(T: int, K: int, V: int) -> Config:
    overrides = _overrides
    # the common case, once per call: cached (Config is frozen); not while Dynamo traces,
    # which would warn about (and bypass) the lru_cache
    if not overrides and not torch.compiler.is_compiling():
        return _default_config(T, K, V)
    return _config(T, K, V, dict(overrides))


@functools.lru_cache(maxsize=1024)
def _default_config(T: int, K: int, V: int) -> Config:
    return _config(T, K, V, {})


def _config(T: int, K: int, V: int, fields: dict) -> Config:
    # Chosen from sm_90 compiles (registers and spills from ptxas, see NOTES.md), not yet
    # from timings: chunks of 32 with 8 warps compile without spills in the forward kernel.
    chunk = fields.pop("chunk", 32)
    block_k = min(64, max(16, _pow2(K)))
    block_v = min(64, max(16, _pow2(V)))
    if T <= SINGLE_SEGMENT_MAX_T:
        segment = chunk * -(-T // chunk)
    else:
        segment = max(LONG_SEGMENT, chunk)
    segment = fields.pop("segment", segment)
    if segment % chunk or (segment < T and segment & (segment - 1)):
        raise ValueError(f"segment={segment} must be a multiple of chunk={chunk}, and a power of two "
                         f"when shorter than the sequence ({T})")
    config = Config(
        chunk=chunk,
        segment=segment,
        block_k=block_k,
        block_v=block_v,
        num_warps=8,
        num_stages=2,
        # H100, vigT_1024 (NOTES.md session 5): segment sums 59 -> 35 µs with V tiles of 64 and
        # 4 warps (from 32 and 8), the scan 35 -> 15 µs with 4 rows a step and 1 warp (from 8, 2).
        # Since then (session 14): 8 warps for K <= 32 (128 registers, 2 programs per SM, against
        # 204 and 2 at 4 warps): forward 0.96-1.00×, forward+backward 0.95-0.98× at T = 4096 and
        # 16384, batch 1-64, the same bits; lm_4k (K = 128) lost 5 % with 8, so wider K keeps 4.
        # Session 17: K tiles of 16 with 4 warps for K <= 32 (twice the programs, each half the
        # work: the sums are bound by each program's latency, not by bytes), forward 0.97-0.98×,
        # forward+backward 0.97× at vigT_1024 / vigT_2048 against 32 with 8 warps (16 with 8:
        # 0.99-1.00×; V tiles of 32: 1.12-1.27×)
        states_block_k=16 if K <= 32 else min(32, _pow2(K)),
        states_block_v=min(64, max(16, _pow2(V))),
        states_num_warps=4,
        states_step=256,
        scan_rows=4,
        scan_num_warps=1,
        single_pass_block_v=block_v,
    )
    if K > SINGLE_PASS_MAX_K:  # wide K: the state tile needs more threads (see above)
        config = dataclasses.replace(config, single_pass_num_warps=4, single_pass_maxnreg=None,
                                     single_pass_small_grid_launches=())
    config = dataclasses.replace(config, **fields) if fields else config
    seg, step = config.single_pass_segment, config.states_step
    chunks = (config.single_pass_chunk, config.single_pass_bwd_chunk)
    if config.half_dots is not None and config.half_dots not in HALF_DOT_MODES:
        raise ValueError(f"half_dots={config.half_dots!r} must be None or one of {sorted(HALF_DOT_MODES)}")
    if seg & (seg - 1) or any(seg % c for c in chunks) or step & (step - 1):
        raise ValueError(f"single_pass_segment={seg} must be a power of two and a multiple of the single-pass "
                         f"chunks {chunks}, and states_step={step} a power of two")
    return config


#: How the matmuls of float16 / bfloat16 inputs treat their operands (``kernels._dot``):
#: (bfloat16 tensor-core operands?, precision). "bf16" rounds float32 intermediates to
#: bfloat16 (2^-9 relative), "bf16x3" splits them into high and low bfloat16 parts (~2^-17,
#: up to three dots), "tf32" / "tf32x3" take float32 operands at tf32 (2^-11) or split tf32.
HALF_DOT_MODES = {"bf16": (True, "bf16"), "bf16x3": (True, "bf16x3"), "tf32": (False, "tf32"),
                  "tf32x3": (False, "tf32x3")}
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _dot_mode(dtype: torch.dtype, device_type: str, cfg: Config) -> tuple[bool, str]:
    """(bfloat16 operands?, precision) of the kernels' matmuls (``kernels._dot``).

    The kernels' matmul operands are mostly float32 intermediates (states, decayed q and k,
    scores), whatever the input dtype, so PyTorch's switch for float32 matmuls decides:
    - "highest" (PyTorch's default) and "high": bfloat16 and float16 inputs split those
      operands ("bf16x3", about float32 accuracy): rounding them to bfloat16 missed DESIGN
      §3's bounds where an output is a small difference of larger terms (NOTES.md, session 6).
      float32 inputs: IEEE float32 ("highest"), or tf32 when PyTorch allows it for float32
      matmuls ("high", ``allow_tf32``, or ``fp32_precision = "tf32"``).
    - "medium" (``torch.set_float32_matmul_precision("medium")``: "bfloat16 for internal
      computations"): one bfloat16 dot for bfloat16 inputs, tf32 for float16 and float32 —
      faster (H100, vigT_224: about 0.65× the forward's time) and outside the bounds on such
      inputs.
    ``Config.half_dots`` overrides the choice for 16-bit inputs (benchmarks, tests)."""
    if device_type == "cpu":
        # Triton's interpreter multiplies bfloat16 operands as raw bits: float32 there
        return False, "ieee"
    if dtype in _HALF_DTYPES:
        mode = cfg.half_dots
        if mode is None:
            fast = float32_matmul_precision() == "medium"
            mode = ("bf16" if dtype == torch.bfloat16 else "tf32") if fast else "bf16x3"
        return HALF_DOT_MODES[mode]
    return False, "tf32" if tf32_allowed("matmul") else "ieee"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _alloc_device(q: torch.Tensor, record: Optional[list]):
    """Where a launch's outputs and scratch go: ``q``'s device, or ``meta`` while the launches
    are only recorded (``backward``'s ``_record``): no memory, and Triton's specialisation
    reads a ``meta`` tensor's address as 0, aligned like every fresh allocation."""
    return q.device if record is None else "meta"


class _Recorder:
    """Stands in for a Triton kernel while ``backward`` records its launches."""

    def __init__(self, kernel, record: list):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.record.append((self.kernel, grid, args, kwargs))


def _kernel(kernel, record: Optional[list]):
    """``kernel`` itself, to be launched as ``kernel[grid](...)``; or, while ``backward``
    records, a stand-in that records the launch instead."""
    return kernel if record is None else _Recorder(kernel, record)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    g_reverse: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    scale: float,
    bidirectional: bool,
    output_final_state: bool,
    config: Optional[Config] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``o`` (and the final state) for contiguous ``[B, T, H, D]`` inputs; ``scale`` as given
    to the op (halved here for the bidirectional average)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = config or choose_config(T, K, V)
    C, SEG = cfg.chunk, cfg.segment
    nseg = _cdiv(T, SEG)
    slots = 2 if bidirectional else 1
    dot_bf16, precision = _dot_mode(q.dtype, q.device.type, cfg)
    scale_eff = 0.5 * scale if bidirectional else scale
    gr = g_reverse if bidirectional else g
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    if cfg.single_pass and K <= cfg.single_pass_max_k:
        return _forward_single_pass(q, k, v, g, gr, o, initial_state, scale_eff, bidirectional, output_final_state,
                                    cfg, dot_bf16, precision)
    one_chunk = nseg > 1 and SEG == C
    # phase 1's per-program chunk states (none when every segment is one chunk)
    scratch = torch.empty(1 if one_chunk else B * H * nseg * (SEG // C + 1) * slots * K * V, device=q.device,
                          dtype=torch.float32)
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else scratch
    h0 = initial_state if initial_state is not None else scratch
    bstates = scratch
    with launch_device(q):
        if nseg > 1:
            bstates = _boundary_states(q, k, v, g, gr, q, h0, scratch, ht, scratch, 1.0, slots, 1, SEG, cfg,
                                       dot_bf16, precision, has_h0=initial_state is not None, has_dht=False,
                                       store_ht=output_final_state, store_dh0=False)
        nvb = _cdiv(V, cfg.block_v)
        kernels._gla_fwd_kernel[(B * H, nseg, nvb)](
            q, k, v, g, gr, o, h0, ht, bstates, scratch,
            T, H, K, V, scale_eff, SEG, nseg,
            C=C, LOG2C=C.bit_length() - 1, BK=cfg.block_k, BV=cfg.block_v, NKB=_cdiv(K, cfg.block_k),
            BIDIR=bidirectional, HAS_H0=initial_state is not None, STORE_HT=output_final_state and nseg == 1,
            HAS_BSTATES=nseg > 1, ONE_CHUNK=one_chunk, DOT_BF16=dot_bf16, PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return o, (ht if output_final_state else None)


def _boundary_states(q, k, v, g, gr, do, h0, dht, ht, dh0, coef_grad, slots, kind_stride, segment, cfg, dot_bf16,
                     precision, *, has_h0, has_dht, store_ht, store_dh0, record=None):
    """The states at every boundary of segments of ``segment`` tokens
    (``kernels_boundary_states.py``): each segment's own contribution, all at once, then one
    scan composing them. Returns ``bstates``. ``record``: as ``backward``'s ``_record``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    nseg = _cdiv(T, segment)
    device = _alloc_device(q, record)
    bstates = torch.empty(slots, B * H, nseg + 1, K, V, device=device, dtype=torch.float32)
    gammas = torch.empty(slots, B * H, nseg, K, device=device, dtype=torch.float32)
    sbk, sbv = cfg.states_block_k, cfg.states_block_v
    nkb, nvb = _cdiv(K, sbk), _cdiv(V, sbv)
    _kernel(kernels_boundary_states._gla_segment_sums_kernel, record)[(B * H * nkb * nvb, slots, nseg)](
        q, k, v, g, gr, do, bstates, gammas,
        T, H, K, V, coef_grad, nseg,
        SEG=segment, STEP=min(cfg.states_step, segment), BK=sbk, BV=sbv, NKB=nkb, NVB=nvb, KIND_STRIDE=kind_stride,
        DOT_BF16=dot_bf16, PRECISION=precision, num_warps=cfg.states_num_warps,
    )
    block = 32 * cfg.scan_num_warps
    _kernel(kernels_boundary_states._gla_boundary_scan_kernel, record)[(B * H, slots, _cdiv(K * V, block))](
        bstates, gammas, h0, dht, ht, dh0,
        K, V, nseg,
        KIND_STRIDE=kind_stride, HAS_H0=has_h0, HAS_DHT=has_dht, STORE_HT=store_ht, STORE_DH0=store_dh0,
        ROWS=min(cfg.scan_rows, _pow2(nseg)), BLOCK=block, num_warps=cfg.scan_num_warps,
    )
    return bstates


def _ratio_mode(on: bool, cfg: Config) -> int:
    """The single-pass kernels' ``RATIO``: 0 the hierarchy only, 1 the ratio chunk math for
    walks whose gates all allow it, 2 tested per chunk (``kernels_single_pass._walk``)."""
    return (2 if cfg.single_pass_ratio_per_chunk else 1) if on else 0


def _single_pass_segments(T: int, chunk: int, cfg: Config) -> tuple[int, int]:
    """Segment length and count of the single-pass kernels: one segment (the whole sequence,
    in chunks) up to ``single_pass_max_t`` tokens, else segments of ``single_pass_segment``."""
    seg = chunk * _cdiv(T, chunk) if T <= cfg.single_pass_max_t else cfg.single_pass_segment
    return seg, _cdiv(T, seg)


def _single_pass_launch(cfg: Config, programs: int, sms: int, traced: bool) -> tuple[int, Optional[int]]:
    """``(num_warps, maxnreg)`` of a single-pass forward launch of ``programs`` programs on
    ``sms`` SMs: the first of ``cfg.single_pass_small_grid_launches`` whose slots hold the
    grid in one wave, else the large-grid setting (``single_pass_num_warps``, with the cap
    that lets six 2-warp programs share an SM). While Dynamo traces (``traced``) the capped
    entries are skipped: Inductor launches the kernel without ``maxnreg`` (torch 2.11-2.13
    pass only warps and stages on for user kernels), and a 4-warp program uncapped takes the
    register file of two capped ones, so the grid would not fit.

    H100 (132 SMs), bf16, K = 32, V = 64, T = 196, µs per forward, this choice against 2 warps
    capped (the only launch before session 12; NOTES.md session 13): bidirectional, 96
    programs 40.5 / 57.8, 264: 48.1 / 62.0, 384 (4 warps capped): 54.2 / 72.1; causal, 3-132
    programs ~24.5 / ~40.5, 264: 33.9 / 42.5 (2 warps uncapped 33.2), 384 (4 capped): 43.2 /
    52.1 (2 uncapped 42.7). Grids of more than four programs per SM (vigT_224's 768 among
    them) keep the large-grid setting: 90.2 µs, against 102.4 with 4 warps capped.
    Warps and registers do not change the arithmetic (every sum in the kernel is a
    tensor-core dot, which adds in the same order at any warp count, or exact), so the
    outputs are the same bit for bit whichever launch runs: a sequence's result does not
    depend on the rest of the batch."""
    for warps, cap, per_sm in cfg.single_pass_small_grid_launches:
        if traced and cap is not None:
            continue
        if programs <= per_sm * sms:
            return warps, cap
    return cfg.single_pass_num_warps, cfg.single_pass_maxnreg


def _single_pass_programs(B: int, T: int, H: int, V: int, bidirectional: bool, cfg: Config) -> int:
    """Programs of a single-pass forward launch: one per (batch·head, direction, V block,
    segment); what ``_single_pass_launch`` and the parking threshold compare with the SMs."""
    _, nseg = _single_pass_segments(T, cfg.single_pass_chunk, cfg)
    return B * H * (2 if bidirectional else 1) * _cdiv(V, cfg.single_pass_block_v) * nseg


@functools.lru_cache(maxsize=None)
def _sm_count_cached(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device_index: int) -> int:
    """The device's SM count; under torch.compile read once while tracing and baked into the
    graph (Dynamo calls a function marked as a constant result instead of tracing it)."""
    return _sm_count_cached(device_index)


_sm_count._dynamo_marked_constant = True  # what torch.compiler.assume_constant_result sets


def _chunk_rows_need_64bit(C: int, H: int, K: int, V: int) -> bool:
    """Whether a chunk's rows of one sequence span 2^31 elements or more in the ``[B, T, H,
    K]`` / ``[B, T, H, V]`` tensors, so that the single-pass forward's offsets within a chunk
    (``kernels_single_pass._chunk_at``, 32-bit by default) must be 64-bit."""
    return C * H * max(K, V) >= 2**31


def _gluon_forward_runs(q: torch.Tensor, K: int, V: int, cfg: Config) -> bool:
    """Whether ``_forward_single_pass`` launches the Gluon forward (``kernels_gluon_forward``)."""
    return (cfg.single_pass_gluon and q.device.type == "cuda" and torch.version.hip is None
            and q.dtype in _HALF_DTYPES and K <= cfg.single_pass_gluon_max_k and cfg.single_pass_chunk == 16
            and not torch.compiler.is_compiling() and not _chunk_rows_need_64bit(16, q.shape[2], K, V)
            and not _interpreter_enabled() and gluon_forward_available())


def _meet_spin(q: torch.Tensor, cfg: Config) -> int:
    """How many times the first direction at the meeting reads the count for the other: none
    where programs run one at a time (the CPU interpreter: the other has not started).
    Negative while ``torch.compile`` traces the launch (only CUDA launches are traced): the
    same reads without inline PTX, which Inductor can analyse (``kernels_single_pass._poll``).
    H200, compiled forward+backward, GPU time: vigT_224 467 -> 321 µs, vigB_224 885 -> 578;
    vigT_224 269 once the tails also read the meeting's outcome from memory (NOTES.md,
    session 29)."""
    spin = cfg.single_pass_meet_spin
    if torch.compiler.is_compiling():
        return -spin if spin > 0 else spin
    return 0 if q.device.type == "cpu" or _interpreter_enabled() else spin


def _interpreter_enabled() -> bool:
    from . import interpreter_enabled  # (the package imports this module)
    return interpreter_enabled()


@functools.lru_cache(maxsize=None)
def gluon_forward_available() -> bool:
    """Whether this Triton has the Gluon API the Gluon forward is written for (3.6 and later)."""
    try:
        from . import kernels_gluon_forward  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def _forward_single_pass(q, k, v, g, gr, o, initial_state, scale_eff, bidirectional, output_final_state, cfg,
                         dot_bf16, precision):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = cfg.single_pass_chunk
    gluon = _gluon_forward_runs(q, K, V, cfg)
    if gluon:
        cfg = dataclasses.replace(cfg, single_pass_block_v=cfg.single_pass_gluon_block_v)
    bv = cfg.single_pass_block_v
    n_chunks, nvb = _cdiv(T, C), _cdiv(V, bv)
    ndir = 2 if bidirectional else 1
    seg, nseg = _single_pass_segments(T, C, cfg)
    programs = _single_pass_programs(B, T, H, V, bidirectional, cfg)
    warps, extra = cfg.single_pass_num_warps, {}
    # (the CPU interpreter runs one program at a time: one "SM"; on ROCm neither choice is made)
    sms = 1 if q.device.type == "cpu" else 0
    if q.device.type == "cuda" and torch.version.hip is None:  # (maxnreg and the slots: NVIDIA's)
        sms = _sm_count(q.device.index)
        warps, cap = _single_pass_launch(cfg, programs, sms, torch.compiler.is_compiling())
        if cap is not None:
            extra["maxnreg"] = cap
    park_all = bidirectional and programs <= cfg.single_pass_park_all_per_sm * sms
    # the directions' parked parts, and the per-chunk counters of the chunk-by-chunk handoff
    part = torch.empty(2 * B * H * n_chunks * C * V if bidirectional else 1, device=q.device, dtype=torch.float32)
    flags = torch.zeros(B * H * nvb * n_chunks if bidirectional and not park_all else 1, device=q.device,
                        dtype=torch.int32)
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else part
    h0 = initial_state if initial_state is not None else part
    with launch_device(q):
        bstates = part
        if nseg > 1:
            bstates = _boundary_states(q, k, v, g, gr, q, h0, part, ht, part, 1.0, ndir, 1, seg, cfg, dot_bf16,
                                       precision, has_h0=initial_state is not None, has_dht=False,
                                       store_ht=output_final_state, store_dh0=False)
        if gluon:
            from . import kernels_gluon_forward
            kernels_gluon_forward._gla_fwd_gluon_kernel[(B * H * ndir, nvb, nseg)](
                q, k, v, g, gr, o, part, flags, h0, ht, bstates,
                T, H, K, V, scale_eff, seg // C,
                BK=max(16, _pow2(K)), BV=bv, BIDIR=bidirectional, HAS_H0=initial_state is not None,
                STORE_HT=output_final_state and nseg == 1, HAS_BSTATES=nseg > 1, PARK_ALL=park_all,
                IS_F16=q.dtype == torch.float16, MEET=cfg.single_pass_meet, SPIN=abs(_meet_spin(q, cfg)), num_warps=1,
                **({} if cfg.single_pass_gluon_maxnreg is None else {"maxnreg": cfg.single_pass_gluon_maxnreg}),
            )
        else:
            kernels_single_pass._gla_fwd_single_pass_kernel[(B * H * ndir, nvb, nseg)](
                q, k, v, g, gr, o, part, flags, h0, ht, bstates,
                T, H, K, V, scale_eff, seg // C,
                C=C, LOG2C=C.bit_length() - 1, BK=max(16, _pow2(K)), BV=bv,
                BIDIR=bidirectional, HAS_H0=initial_state is not None, STORE_HT=output_final_state and nseg == 1,
                HAS_BSTATES=nseg > 1, DOT_BF16=dot_bf16, PRECISION=precision, PARK_ALL=park_all,
                RATIO=_ratio_mode(cfg.single_pass_ratio, cfg), WIDE_ROWS=_chunk_rows_need_64bit(C, H, K, V),
                MEET=cfg.single_pass_meet, SPIN=_meet_spin(q, cfg),
                num_warps=warps, num_stages=cfg.single_pass_num_stages, **extra,
            )
        if park_all:  # o from the parked parts: 32 tokens x up to 64 columns a program
            rows, bv_sum = 32, min(64, _pow2(max(16, V)))
            kernels_single_pass._gla_fwd_sum_parts_kernel[(B * H, _cdiv(T, rows), _cdiv(V, bv_sum))](
                part, o, T, H, V, n_chunks * C, scale_eff, ROWS=rows, BV=bv_sum, num_warps=4,
            )
    return o, (ht if output_final_state else None)


def _backward_single_pass(q, k, v, g, gr, grad_output, dq, dk, dv, dg, dgr, initial_state, grad_final_state,
                          scale_eff, bidirectional, cfg, dot_bf16, precision, record):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = cfg.single_pass_bwd_chunk
    bk, bv = max(16, _pow2(K)), max(16, _pow2(V))
    n_chunks = _cdiv(T, C)
    ndir = 2 if bidirectional else 1
    seg, nseg = _single_pass_segments(T, C, cfg)
    device = _alloc_device(q, record)
    scratch = torch.empty(B * H * ndir * n_chunks * bk * bv, device=device, dtype=torch.float32)
    # the directions' parked dq, dk, dv parts and per-chunk counters (bidirectional only)
    parts = torch.empty(2 * B * H * n_chunks * C * (2 * K + V) if bidirectional else 1, device=device,
                        dtype=torch.float32)
    flags = torch.zeros(B * H * n_chunks if bidirectional else 1, device=device, dtype=torch.int32)
    dh0 = torch.empty(B, H, K, V, device=device, dtype=torch.float32) if initial_state is not None else None
    h0 = initial_state if initial_state is not None else scratch
    dht = grad_final_state if grad_final_state is not None else scratch
    extra = {}
    if cfg.single_pass_bwd_maxnreg is not None and q.device.type == "cuda" and torch.version.hip is None:
        extra["maxnreg"] = cfg.single_pass_bwd_maxnreg
    with launch_device(q):
        bstates = scratch
        if nseg > 1:
            bstates = _boundary_states(q, k, v, g, gr, grad_output, h0, dht, scratch,
                                       dh0 if dh0 is not None else scratch, scale_eff, 2 * ndir,
                                       1 if bidirectional else 2, seg, cfg, dot_bf16, precision,
                                       has_h0=initial_state is not None, has_dht=grad_final_state is not None,
                                       store_ht=False, store_dh0=initial_state is not None, record=record)
        launches = [(1, cfg.single_pass_bwd_pass_a_num_warps, {}), (2, cfg.single_pass_bwd_num_warps, extra)] \
            if cfg.single_pass_bwd_split else [(3, cfg.single_pass_bwd_num_warps, extra)]
        for passes, warps, options in launches:
            _kernel(kernels_single_pass_bwd._gla_bwd_single_pass_kernel, record)[(B * H * ndir, nseg)](
                q, k, v, g, gr, grad_output, dq, dk, dv, dg, dgr, h0, dht,
                dh0 if dh0 is not None else scratch, scratch, parts, flags, bstates,
                T, H, K, V, scale_eff, seg // C,
                C=C, LOG2C=C.bit_length() - 1, BK=bk, BV=bv, BIDIR=bidirectional, HAS_H0=initial_state is not None,
                HAS_DHT=grad_final_state is not None, STORE_DH0=initial_state is not None and nseg == 1,
                HAS_BSTATES=nseg > 1, DOT_BF16=dot_bf16, PRECISION=precision, PASSES=passes,
                RATIO=_ratio_mode(cfg.single_pass_bwd_ratio, cfg), MEET=cfg.single_pass_meet,
                SPIN=_meet_spin(q, cfg), PREFETCH_A=cfg.single_pass_bwd_pass_a_prefetch, num_warps=warps,
                num_stages=1, **options,
            )
    return dh0


def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    g_reverse: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    grad_output: torch.Tensor,
    grad_final_state: Optional[torch.Tensor],
    scale: float,
    bidirectional: bool,
    config: Optional[Config] = None,
    *,
    _record: Optional[list] = None,
):
    """``dq, dk, dv, dg, dg_reverse, d initial_state`` (``None`` where absent).

    ``_record`` (``compile_ahead``): a list that receives each launch as ``(kernel, grid,
    args, kwargs)`` instead of running it; the outputs and scratch are then ``meta`` tensors,
    so nothing touches the GPU (the inputs' shapes, dtypes and addresses are read, not their
    values). Otherwise the launches wait for any compile of theirs that ``compile_ahead``
    started."""
    if _record is None and not torch.compiler.is_compiling():
        compile_ahead.wait()
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = config or choose_config(T, K, V)
    C, SEG = cfg.chunk, cfg.segment
    nseg = _cdiv(T, SEG)
    slots = 4 if bidirectional else 2
    dot_bf16, precision = _dot_mode(q.dtype, q.device.type, cfg)
    scale_eff = 0.5 * scale if bidirectional else scale
    gr = g_reverse if bidirectional else g
    device = _alloc_device(q, _record)
    dq, dk = torch.empty_like(q, device=device), torch.empty_like(k, device=device)
    dv, dg = torch.empty_like(v, device=device), torch.empty_like(g, device=device)
    # causal: the kernels never touch dgr, but it must not be dg itself. Under torch.compile
    # each argument a kernel may write is cloned separately, and dg came back as the unwritten
    # clone (garbage gradients in compiled DiG on CUDA, NOTES.md session 11)
    dgr = torch.empty_like(g_reverse, device=device) if bidirectional else g.new_empty(1, device=device)
    if cfg.single_pass_backward and K <= SINGLE_PASS_MAX_K and V <= SINGLE_PASS_MAX_K:
        dh0 = _backward_single_pass(q, k, v, g, gr, grad_output, dq, dk, dv, dg, dgr, initial_state,
                                    grad_final_state, scale_eff, bidirectional, cfg, dot_bf16, precision, _record)
        return dq, dk, dv, dg, (dgr if bidirectional else None), dh0
    one_chunk = nseg > 1 and SEG == C
    scratch = torch.empty(1 if one_chunk else B * H * nseg * (SEG // C + 1) * slots * K * V, device=device,
                          dtype=torch.float32)
    dh0 = torch.empty(B, H, K, V, device=device, dtype=torch.float32) if initial_state is not None else None
    h0 = initial_state if initial_state is not None else scratch
    dht = grad_final_state if grad_final_state is not None else scratch
    bstates = scratch
    with launch_device(q):
        if nseg > 1:
            bstates = _boundary_states(q, k, v, g, gr, grad_output, h0, dht, scratch,
                                       dh0 if dh0 is not None else scratch, scale_eff, slots,
                                       1 if bidirectional else 2, SEG, cfg, dot_bf16, precision,
                                       has_h0=initial_state is not None, has_dht=grad_final_state is not None,
                                       store_ht=False, store_dh0=initial_state is not None, record=_record)
        _kernel(kernels._gla_bwd_kernel, _record)[(B * H, nseg)](
            q, k, v, g, gr, grad_output, dq, dk, dv, dg, dgr, h0, dht,
            dh0 if dh0 is not None else scratch, bstates, scratch,
            T, H, K, V, scale_eff, SEG, nseg,
            C=C, LOG2C=C.bit_length() - 1, BK=cfg.block_k, BV=cfg.block_v,
            NKB=_cdiv(K, cfg.block_k), NVB=_cdiv(V, cfg.block_v),
            BIDIR=bidirectional, HAS_H0=initial_state is not None, HAS_DHT=grad_final_state is not None,
            STORE_DH0=initial_state is not None and nseg == 1, HAS_BSTATES=nseg > 1, ONE_CHUNK=one_chunk,
            DOT_BF16=dot_bf16, PRECISION=precision, RATIO=cfg.two_phase_bwd_ratio,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv, dg, (dgr if bidirectional else None), dh0
