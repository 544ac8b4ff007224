"""Forward and backward of the cupy backend: workspaces and the sequence of launches.

Device-agnostic on purpose: every launch goes through a ``launcher`` callable
``(file, name, grid, block, smem_bytes, args)``. On a GPU that is CuPy
(:mod:`._runtime`); the tests also run these very drivers, on CPU tensors, through a C++
emulator of the kernels. Nothing here reads tensor values or synchronises.

Launch sequence (N = number of time chunks, 1 for sequences up to SINGLE_CHUNK_MAX):

    forward:   [chunk_forward states, state_scan]  chunk_forward
               (tensor cores: bfloat16 or float16, K <= 32, V <= 64 in multiples of 16, no states)
               or [chunk_state, state_scan]  forward_output
    backward:  [chunk_forward states, state_scan]  chunk_backward_dq
               [chunk_backward adjoint states, state_scan]  chunk_backward (dv)  chunk_backward (dk)
               (tensor cores: bfloat16 or float16, the forward's head dims, no states; with K = 32 the
               fused adjoint walk instead of the last two for causal calls and bidirectional
               ones on short segments), then
               [chunk_state, chunk_adjoint, state_scan x2]  backward_dq  backward_dk  backward_dv
               [gate_grad_fixup]
               (after the tensor-core launches the sweeps run only the sequences the dq kernel
               flagged: gates too strong for the decay ratio; every sweep returns at once for
               the others)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from glakernels._problem import GLAGradients, GLAInputs

from . import _plan as plan
from ._sources import CHUNK_BACKWARD_FILE, CHUNK_FORWARD_FILE, SCAN_FILE, SWEEP_FILE, kernel_args, kernel_params

Launcher = Callable[[str, str, tuple, int, int, tuple], None]


def _address(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


class _Call:
    """Shapes, chunking and the parameter values shared by every launch of one call."""

    def __init__(self, inputs: GLAInputs, launcher: Launcher, chunk_len: Optional[int], tiles):
        spec = inputs.spec
        self.spec = spec
        self.launch = launcher
        self.tiles = tiles or plan.DEFAULT_TILES
        self.B, self.T, self.H, self.K, self.V = (
            spec.batch, spec.seq_len, spec.heads, spec.head_dim_k, spec.head_dim_v)
        self.bidirectional = spec.bidirectional
        self.groups = 2 if spec.bidirectional else 1
        self.chunk_len, self.n_chunks = plan.chunking(self.T, chunk_len)
        self.device = inputs.q.device
        scale = inputs.scale * (0.5 if spec.bidirectional else 1.0)  # the two directions are averaged
        # the parameters every launch of this call shares, converted once
        self.base_params = kernel_params(dict(
            q=_address(inputs.q), k=_address(inputs.k), v=_address(inputs.v), g=_address(inputs.g),
            g_rev=_address(inputs.g_reverse if spec.bidirectional else None),
            s0=_address(inputs.initial_state),
            B=self.B, T=self.T, H=self.H, K=self.K, V=self.V,
            chunk_len=self.chunk_len, n_chunks=self.n_chunks,
            bidirectional=int(spec.bidirectional), scale=scale,
        ))

    def scratch(self, *shape) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def sweep(self, role: int, **extra) -> None:
        own_is_v = role in plan.OWN_IS_V
        inner, own = (self.K, self.V) if own_is_v else (self.V, self.K)
        tile = plan.tile_for(inner, self.tiles)
        grid = (self.B * self.H, math.ceil(own / tile.own_tile), self.n_chunks)
        smem = plan.sweep_smem_bytes(tile, role, self.bidirectional, self.chunk_len)
        name = plan.sweep_name(self.spec.dtype, tile, role)
        self.launch(SWEEP_FILE, name, grid, self.groups * tile.threads, smem,
                    kernel_args(extra, self.base_params))

    def state_scan(self, adjoint: bool, **extra) -> None:
        grid = (self.B * self.H * 2, math.ceil(self.K * self.V / plan.SCAN_THREADS), 1)
        self.launch(SCAN_FILE, plan.SCAN_NAME, grid, plan.SCAN_THREADS, 0,
                    kernel_args({"lambda_scan": int(adjoint), **extra}, self.base_params))

    def chunk_entering_states(self, adjoint: bool, **extra) -> torch.Tensor:
        """State (or adjoint) entering every chunk: ``[B*H, 2, N, K, V]`` float32."""
        enter = self.scratch(self.B * self.H, 2, self.n_chunks, self.K, self.V)
        decay = self.scratch(self.B * self.H, 2, self.n_chunks, self.K)  # used by the scan only
        buffers = dict(enter=enter.data_ptr(), decay=decay.data_ptr())
        self.sweep(plan.CHUNK_ADJOINT if adjoint else plan.CHUNK_STATE, **extra, **buffers)
        self.state_scan(adjoint, **extra, **buffers)
        return enter


def _takes_chunk_forward(inputs: GLAInputs, launcher: Launcher, o: torch.Tensor) -> bool:
    """Whether the tensor-core forward runs this call: a launcher that has tensor cores (sm_80
    or newer, or the emulator), a call of the kind it takes, every tensor 16-byte aligned."""
    spec = inputs.spec
    if not getattr(launcher, "tensor_cores", False):
        return False
    if not plan.chunk_forward_fits(spec.dtype, spec.seq_len, spec.head_dim_k, spec.head_dim_v, spec.uses_states):
        return False
    tensors = (inputs.q, inputs.k, inputs.v, inputs.g, o) + ((inputs.g_reverse,) if spec.bidirectional else ())
    return all(x.data_ptr() % plan.CHUNK_FORWARD_ALIGN == 0 for x in tensors)


def _takes_chunk_backward(call: "_Call", inputs: GLAInputs, launcher: Launcher, tensors) -> bool:
    """Whether the tensor-core backward runs this call: as ``_takes_chunk_forward``, for the
    backward's kinds of call (segments a multiple of its 16-token chunks)."""
    spec = inputs.spec
    if not getattr(launcher, "tensor_cores", False) or call.chunk_len % 16 and call.n_chunks > 1:
        return False
    if not plan.chunk_backward_fits(spec.dtype, spec.seq_len, spec.head_dim_k, spec.head_dim_v, spec.uses_states):
        return False
    return all(x.data_ptr() % plan.CHUNK_FORWARD_ALIGN == 0 for x in tensors if x is not None)


def _chunk_backward(call: "_Call", common: dict, outputs: dict, launch: plan.ChunkBackwardLaunch) -> torch.Tensor:
    """The tensor-core backward's launches; returns the flags of the sequences it left to the
    sweeps (``[B*H, FLAG_SLOTS]`` int32, written by the dq kernel). Several segments: the forward's
    segment states and the scan first (the dq walk's entering states), and after the dq walk
    the adjoint walk's local end states and the adjoint scan (the dv and dk walks' entering
    adjoints); the dk walk then leaves the gate gradients' in-segment sums in ``common``'s
    ``dg_ws`` and ``dg_total`` for ``gla_gate_grad_fixup``. ``launch.fused``: one fused
    adjoint walk (dv, dk and the gate gradients) instead of the dv and the dk walk."""
    segmented = call.n_chunks > 1
    flags = (torch.zeros if segmented else torch.empty)(call.B * call.H, plan.FLAG_SLOTS, dtype=torch.int32,
                                                        device=call.device)
    bi, K, V, n = call.bidirectional, call.K, call.V, call.n_chunks
    dq_block, adjoint_block = plan.chunk_backward_blocks(bi, launch)
    grid = (call.B * call.H, n, 1)
    extra = dict(common, flags=flags.data_ptr(), **outputs)
    scratch = []  # referenced until every launch that uses it is queued (see forward)
    if segmented:
        forward_launch = plan.chunk_forward_launch(call.B * call.H * n, V, bi, getattr(call.launch, "sm_count", 1))
        scratch.append(_chunk_forward_entering_states(call, forward_launch))
        extra["enter"] = scratch[-1].data_ptr()
    dtype = call.spec.dtype
    call.launch(CHUNK_BACKWARD_FILE, plan.chunk_backward_dq_name(dtype, K, V, bi, launch), grid, dq_block,
                plan.chunk_backward_smem_bytes(call.chunk_len, K, bi), kernel_args(extra, call.base_params))
    if segmented:
        enter = call.scratch(call.B * call.H, 2, n, K, V)
        decay = call.scratch(call.B * call.H, 2, n, K)
        scratch += [enter, decay]
        states = dict(extra, enter=enter.data_ptr(), decay=decay.data_ptr())
        call.launch(CHUNK_BACKWARD_FILE, plan.chunk_backward_adjoint_name(dtype, False, K, V, bi, launch, local=True), grid,
                    adjoint_block, 0, kernel_args(states, call.base_params))
        call.state_scan(True, enter=enter.data_ptr(), decay=decay.data_ptr())
        extra["enter"] = enter.data_ptr()
    if launch.fused:  # dk's hand-over between the directions goes through global memory
        park = call.scratch(call.B * call.H * n, 2, call.chunk_len, K) if bi else None
        scratch.append(park)
        call.launch(CHUNK_BACKWARD_FILE, plan.chunk_backward_fused_name(dtype, K, V, bi, launch), grid, adjoint_block,
                    plan.chunk_backward_fused_smem_bytes(call.chunk_len, K, V, bi, launch),
                    kernel_args(dict(extra, park=_address(park)), call.base_params))
        return flags
    for dv, columns in ((True, V), (False, K)):
        call.launch(CHUNK_BACKWARD_FILE, plan.chunk_backward_adjoint_name(dtype, dv, K, V, bi, launch), grid, adjoint_block,
                    plan.chunk_backward_smem_bytes(call.chunk_len, columns, bi), kernel_args(extra, call.base_params))
    return flags


def _chunk_forward_entering_states(call: _Call, launch: plan.ChunkForwardLaunch) -> torch.Tensor:
    """The state entering every segment, ``[B*H, 2, N, K, V]`` float32 (the layout of
    ``_Call.chunk_entering_states``), from the tensor-core kernel's local end states."""
    bi, n = call.bidirectional, call.n_chunks
    enter = call.scratch(call.B * call.H, 2, n, call.K, call.V)
    decay = call.scratch(call.B * call.H, 2, n, call.K)
    extra = dict(enter=enter.data_ptr(), decay=decay.data_ptr())
    name = plan.chunk_forward_name(call.spec.dtype, call.K, call.V, bi, launch, output=False)
    call.launch(CHUNK_FORWARD_FILE, name, (call.B * call.H, n, 1), plan.chunk_forward_block(bi, launch),
                plan.chunk_forward_smem_bytes(call.chunk_len, call.V, bi, output=False), kernel_args(extra, call.base_params))
    call.state_scan(False, **extra)
    return enter


def forward(inputs: GLAInputs, launcher: Launcher, *, chunk_len: Optional[int] = None, tiles=None,
            chunk_forward: bool = True, chunk_forward_launch: Optional[plan.ChunkForwardLaunch] = None):
    """``(o, final_state or None)`` as :meth:`Backend.forward` returns them. ``chunk_forward=False``
    keeps the recurrent sweep where the tensor-core forward would run, ``chunk_forward_launch``
    overrides its launch (comparisons, tests). A ``chunk_len`` that is not a multiple of 16
    (its chunks) keeps the sweep too."""
    call = _Call(inputs, launcher, chunk_len, tiles)
    spec = inputs.spec
    o = torch.empty(call.B, call.T, call.H, call.V, dtype=spec.dtype, device=call.device)
    if chunk_forward and (chunk_len is None or chunk_len % 16 == 0) and _takes_chunk_forward(inputs, launcher, o):
        bi, n = spec.bidirectional, call.n_chunks
        grid = (call.B * call.H, n, 1)
        launch = chunk_forward_launch or plan.chunk_forward_launch(
            call.B * call.H * n, call.V, bi, getattr(launcher, "sm_count", 1))
        block = plan.chunk_forward_block(bi, launch)
        # segments: their local end states and the scan first, then each from its entering state
        enter = _chunk_forward_entering_states(call, launch) if n > 1 else None
        name = plan.chunk_forward_name(spec.dtype, call.K, call.V, bi, launch)
        launcher(CHUNK_FORWARD_FILE, name, grid, block, plan.chunk_forward_smem_bytes(call.chunk_len, call.V, bi),
                 kernel_args(dict(o=o.data_ptr(), enter=_address(enter)), call.base_params))
        return o, None
    final = (torch.empty(call.B, call.H, call.K, call.V, dtype=torch.float32, device=call.device)
             if spec.output_final_state else None)
    # scratch tensors are referenced until every launch that uses them is queued (on a GPU the
    # caching allocator may then reuse them, in stream order; on the emulator they must live)
    enter = call.chunk_entering_states(adjoint=False) if call.n_chunks > 1 else None
    call.sweep(plan.FORWARD_OUTPUT, o=o.data_ptr(), s_final=_address(final), enter=_address(enter))
    return o, final


def backward(
    inputs: GLAInputs,
    grad_output: torch.Tensor,
    grad_final_state: Optional[torch.Tensor],
    launcher: Launcher,
    *,
    chunk_len: Optional[int] = None,
    tiles=None,
    chunk_backward: bool = True,
    chunk_backward_launch: Optional[plan.ChunkBackwardLaunch] = None,
) -> GLAGradients:
    """:meth:`Backend.backward`'s gradients. ``chunk_backward=False`` keeps the recurrent sweeps
    where the tensor-core backward would run, ``chunk_backward_launch`` overrides its launch."""
    call = _Call(inputs, launcher, chunk_len, tiles)
    spec = inputs.spec
    like_k = lambda: torch.empty(call.B, call.T, call.H, call.K, dtype=spec.dtype, device=call.device)  # noqa: E731
    dq, dk, dg = like_k(), like_k(), like_k()
    dv = torch.empty(call.B, call.T, call.H, call.V, dtype=spec.dtype, device=call.device)
    dg_rev = like_k() if spec.bidirectional else None
    ds0 = (torch.empty(call.B, call.H, call.K, call.V, dtype=torch.float32, device=call.device)
           if inputs.initial_state is not None else None)
    ds_final = None if grad_final_state is None else grad_final_state.to(torch.float32).contiguous()
    q_dq = call.scratch(call.groups, call.B, call.T, call.H, call.K)  # q ⊙ dq per direction
    final_term = call.scratch(call.B, call.H, call.K) if ds_final is not None else None

    common = dict(dout=grad_output.data_ptr(), ds_final=_address(ds_final), a_ws=q_dq.data_ptr(),
                  final_term=_address(final_term))
    chunked = call.n_chunks > 1
    if chunked:  # the gate gradients' sums within each chunk, and each chunk's total, for the fixup
        dg_local = call.scratch(call.groups, call.B, call.T, call.H, call.K)
        dg_total = call.scratch(call.B * call.H, 2, call.n_chunks, call.K)
        common.update(dg_ws=dg_local.data_ptr(), dg_total=dg_total.data_ptr())
    outputs = dict(dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(), dg=dg.data_ptr(), dg_rev=_address(dg_rev))
    if chunk_backward and _takes_chunk_backward(call, inputs, launcher, (
            inputs.q, inputs.k, inputs.v, inputs.g, inputs.g_reverse, grad_output, dq, dk, dv, dg, dg_rev)):
        launch = chunk_backward_launch or plan.chunk_backward_launch(
            call.B * call.H * call.n_chunks, call.K, call.V, call.bidirectional, call.chunk_len,
            getattr(launcher, "sm_count", 1))
        flags = _chunk_backward(call, common, outputs, launch)
        # the sweeps below then redo, exactly, only the sequences whose gates left the decay
        # ratio's range (every sweep returns at once for the others)
        common["flags"] = flags.data_ptr()
    enter_state = enter_adjoint = None
    if chunked:
        enter_state = call.chunk_entering_states(adjoint=False, **common)
        enter_adjoint = call.chunk_entering_states(adjoint=True, **common)

    call.sweep(plan.BACKWARD_DQ, dq=dq.data_ptr(), enter=_address(enter_state), **common)
    call.sweep(plan.BACKWARD_DK, dk=dk.data_ptr(), dg=dg.data_ptr(), dg_rev=_address(dg_rev),
               ds0=_address(ds0), enter=_address(enter_adjoint), **common)
    call.sweep(plan.BACKWARD_DV, dv=dv.data_ptr(), enter=_address(enter_adjoint), **common)
    if chunked:
        args = kernel_args({**common, "flags": 0, "dg": dg.data_ptr(), "dg_rev": _address(dg_rev)}, call.base_params)
        launcher(SCAN_FILE, plan.fixup_name(spec.dtype), (call.B * call.H * 2, call.n_chunks, 1),
                 plan.FIXUP_THREADS, plan.fixup_smem_bytes(call.K), args)
    return GLAGradients(dq, dk, dv, dg, dg_rev, ds0)
