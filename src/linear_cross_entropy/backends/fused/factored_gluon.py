r"""The factored row pass's exponential GEMM for Hopper, in Gluon (Triton 3.6's ``triton.experimental.gluon``).

Same outputs as :func:`.factored_kernels._exp_logits_kernel` (``E = exp(a·(x·Wᵀ + b) − c − o)`` in x's dtype and
one partial per slot and row), with the schedule written out: a persistent kernel, one CTA per SM walking the tile
order of :mod:`.factored_schedule` (``tile = pid, pid + P, ...``; each consumer is one of its ``W = 2P``
workers), three partitions (FA3's / CUTLASS's "ping-pong"):

- producer (1 warp): TMA loads of the x and W tiles into a ring of ``S`` slots (``ready`` / ``empty`` mbarriers);
- consumers 0 and 1 (one warpgroup each) take the CTA's even and odd tiles. Each waits for its MMA *turn*, issues
  its K loop of async wgmma, hands the turn over, then runs its epilogue — the exponential (one MUFU op per
  logit), the two row sums and the TMA store — while the other consumer's wgmmas run.

The plain-Triton kernel cannot overlap the exponential with the MMA and runs 1.13-1.26× cuBLAS's logits GEMM on an
H100 (v16); this one 1.06-1.11× (benchmarks/NOTES.md, v17).

mbarrier protocol (each barrier has arrival count 1; phase n = its n-th completion, waited with parity n & 1):
``ready[s]`` phase n when fill n of slot s lands (load q waits parity ``(q // S) & 1``); ``empty[s]`` phase n when
the wgmma reading fill n finished (the producer's load q waits parity ``((q // S) & 1) ^ 1``, which passes at once
on a fresh barrier); ``turn[c]`` phase m when consumer c may start its m-th tile (``turn[0]`` phase 0 pre-arrived).
A parity wait is right only if the barrier completed exactly n or n + 1 phases: the turns serialise the consumers'
K loops, so every load of the CTA's earlier tiles was waited for before a tile's wgmmas start, and fill n + 1 of a
slot needs the waiter's own release of fill n (without the turns a consumer could run onto a slot whose previous
fill has not landed). The full argument and the measurements: ``benchmarks/gluon/README.md``.

The Gluon API is experimental and changes between Triton releases: :func:`runs_on` takes this path only with the
Triton it was written and measured with (3.6) on a compute-capability 9.0 GPU; anywhere else the plain-Triton
kernel runs. Nothing here can run in the interpreter: the GPU tests cover it.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..grid import cdiv, sm_count
from .factored_schedule import tile_schedule

__all__ = ["BLOCK_M", "BLOCK_N", "GROUP_M", "runs_on", "workers", "exp_logits"]

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
# 4 stages: 197 KB of shared memory with the two staging tiles. 5 (230 KB) ran 2% faster at H = 768, the same at
# 896 and 14-17% slower at 1536-2048 on an H100 (benchmarks/NOTES.md, v17)
_STAGES, GROUP_M = 4, 8
# Registers per thread: the two consumers 232 each (a 128×128 fp32 accumulator is 128), the producer 40; 168 a
# thread at launch across the 12 warps (the pool setmaxnreg redistributes).
_CONSUMER_REGS, _PRODUCER_REGS, _MAXNREG = 232, 40, 168
_TESTED_TRITON = "3.6."

try:
    if not triton.__version__.startswith(_TESTED_TRITON):
        raise ImportError(f"written against Triton {_TESTED_TRITON}x's Gluon API")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # another Triton: the plain-Triton kernel runs
    gluon = None


def runs_on(x: torch.Tensor) -> bool:
    """Whether this kernel takes ``x``'s chunk: Triton 3.6's Gluon, a compute-capability 9.0 GPU, 16-bit inputs."""
    return (
        gluon is not None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device) == (9, 0)
    )


if gluon is not None:
    _LOG2E = gl.constexpr(1.4426950408889634)
    _LN2 = gl.constexpr(0.6931471805599453)

    # the schedule's one source (.factored_schedule), compiled by Gluon's frontend
    _tile_schedule = gluon.jit(tile_schedule)

    @gluon.jit
    def _producer(x_desc, w_desc, a_bufs, b_bufs, ready, empty, GROUP_M: gl.constexpr):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        S: gl.constexpr = a_bufs.type.shape[0]
        tiles_m = gl.cdiv(x_desc.shape[0], BLOCK_M)
        tiles_n = gl.cdiv(w_desc.shape[0], BLOCK_N)
        k_steps = gl.cdiv(x_desc.shape[1], BLOCK_K)
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        q = 0  # the CTA's load counter: local tile j, step k -> q = j * k_steps + k
        for tile in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
            pid_m, pid_n, _, _ = _tile_schedule(tile, tiles_m, tiles_n, GROUP_M, 2 * gl.num_programs(0))
            for k in range(k_steps):
                s = q % S
                mbarrier.wait(empty.index(s), ((q // S) & 1) ^ 1)  # release n - 1 of the slot
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, k * BLOCK_K], bar, a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, k * BLOCK_K], bar, b_bufs.index(s))
                q += 1

    @gluon.jit
    def _initial_accumulator(bias_ptr, off_n, n_cols, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             acc_layout: gl.constexpr, HAS_BIAS: gl.constexpr):  # fmt: skip
        """A consumer tile's fp32 accumulator: zeros, or the bias. Starting from the bias keeps no bias registers
        live in the epilogue (adding it there spilled); it is loaded one class a thread and spread through shared
        memory before the turn wait, which hides its latency. Past N it is 0."""
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=acc_layout)
        if HAS_BIAS:
            offs_b = off_n + gl.arange(0, BLOCK_N, layout=gl.BlockedLayout([1], [32], [4], [0]))
            bias = gl.load(bias_ptr + offs_b, mask=offs_b < n_cols, other=0.0).to(gl.float32)
            acc += gl.convert_layout(bias, gl.SliceLayout(0, acc_layout))[None, :]
        return acc

    @gluon.jit
    def _mma_turn(acc, a_bufs, b_bufs, ready, empty, my_turn, other_turn, i, q0, k_steps):
        """A consumer's MMA turn for its ``i``-th tile (loads ``q0 .. q0 + k_steps − 1`` of the ring): wait for the
        turn, issue the K loop's async wgmmas (one in flight; each finished one releases its slot), hand the turn
        over once all are issued, drain, release the last slot. The protocol is the module docstring's."""
        S: gl.constexpr = a_bufs.type.shape[0]
        mbarrier.wait(my_turn, i & 1)  # the other consumer issued all wgmmas of the previous local tile
        for k in range(k_steps):
            q = q0 + k
            s = q % S
            mbarrier.wait(ready.index(s), (q // S) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            # one wgmma in flight: the previous step's is done with its slot
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((q + S - 1) % S), pred=k > 0)
        mbarrier.arrive(other_turn)  # this tile's loads waited for, its wgmmas issued
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((q0 + k_steps - 1) % S))
        return acc

    @gluon.jit
    def _exp_partial(acc, shift, col_mask, to_log2, CLAMP: gl.constexpr, MASKED: gl.constexpr):
        """``(E, o, Σ)`` of one tile, as ``_exp_tile`` of the plain kernel: the row max taken on the accumulator
        ``u`` (``z = a·u``, ``to_log2 = a·log2(e)``, ``a > 0``), ``o`` folded into the row's shift
        ``s = c·log2(e) + o``, then ``E = exp2(u·a·log2(e) − s)`` (one FFMA and one MUFU op a logit), ``o`` (base 2)
        and ``Σ E``. Only a tile past V masks (``MASKED``)."""
        if MASKED:
            acc = gl.where(col_mask[None, :], acc, -float("inf"))
        base = shift * _LOG2E
        tile_max = gl.max(acc, axis=1) * to_log2 - base
        offset = gl.where(tile_max > CLAMP * _LOG2E, tile_max, 0.0)
        e = gl.exp2(acc * to_log2 - (base + offset)[:, None])
        return e, offset, gl.sum(e, axis=1)

    @gluon.jit
    def _exp_epilogue(acc, shift, off_n, n_cols, to_log2, acc_layout: gl.constexpr, CLAMP: gl.constexpr):
        """``_exp_partial`` of the tile, its masks only on the last vocabulary tile (a uniform branch)."""
        BLOCK_N: gl.constexpr = acc.shape[1]
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        if off_n + BLOCK_N <= n_cols:
            e, offset, tile_sum = _exp_partial(acc, shift, offs_n < n_cols, to_log2, CLAMP, False)
        else:
            e, offset, tile_sum = _exp_partial(acc, shift, offs_n < n_cols, to_log2, CLAMP, True)
        return e, offset, tile_sum

    @gluon.jit
    def _consumer(x_desc, w_desc, e_desc, a_bufs, b_bufs, c_bufs, ready, empty, turn, bias_ptr, shift_ptr,
                  partials_ptr, logit_scale, CONSUMER: gl.constexpr, HAS_BIAS: gl.constexpr, CLAMP: gl.constexpr,
                  GROUP_M: gl.constexpr):  # fmt: skip
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        gl.static_assert(gl.num_warps() == 4, "a consumer is one warpgroup")
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        n_rows = x_desc.shape[0]
        n_cols = w_desc.shape[0]
        tiles_m = gl.cdiv(n_rows, BLOCK_M)
        tiles_n = gl.cdiv(n_cols, BLOCK_N)
        k_steps = gl.cdiv(x_desc.shape[1], BLOCK_K)
        nprog = gl.num_programs(0)
        c_smem = c_bufs.index(CONSUMER)
        my_turn = turn.index(CONSUMER)
        other_turn = turn.index(1 - CONSUMER)
        to_log2 = logit_scale * _LOG2E
        # this worker's slot, summed over its tiles (.factored_schedule): base-2 offset and sum a row
        run_offset = gl.zeros((BLOCK_M,), gl.float32, layout=gl.SliceLayout(1, acc_layout))
        run_sum = gl.zeros((BLOCK_M,), gl.float32, layout=gl.SliceLayout(1, acc_layout))
        i = 0  # this consumer's tile count m; its local tile is j = 2 * i + CONSUMER
        for tile in range(gl.program_id(0) + CONSUMER * nprog, tiles_m * tiles_n, 2 * nprog):
            pid_m, pid_n, slot, last = _tile_schedule(tile, tiles_m, tiles_n, GROUP_M, 2 * nprog)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            q0 = (2 * i + CONSUMER) * k_steps
            acc = _initial_accumulator(bias_ptr, off_n, n_cols, BLOCK_M, BLOCK_N, acc_layout, HAS_BIAS)
            offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
            shift = gl.load(shift_ptr + offs_m, mask=offs_m < n_rows, other=0.0)
            acc = _mma_turn(acc, a_bufs, b_bufs, ready, empty, my_turn, other_turn, i, q0, k_steps)
            # the epilogue, under the other consumer's wgmmas
            e, offset, tile_sum = _exp_epilogue(acc, shift, off_n, n_cols, to_log2, acc_layout, CLAMP)
            # _add_partial of the plain kernel: the slot's running (o, Σ), stored as o + log2 Σ after its last tile
            new_offset = gl.maximum(run_offset, offset)
            run_sum = run_sum * gl.exp2(run_offset - new_offset) + tile_sum * gl.exp2(offset - new_offset)
            run_offset = new_offset
            if last:
                partial = (run_offset + gl.log2(run_sum)) * _LN2
                gl.store(partials_ptr + slot.to(gl.int64) * n_rows + offs_m, partial, mask=offs_m < n_rows)
            run_offset = gl.where(last, 0.0, run_offset)
            run_sum = gl.where(last, 0.0, run_sum)
            e = e.to(e_desc.dtype)
            tma.store_wait(pendings=0)  # this consumer's previous store has read c_smem
            c_smem.store(e)
            fence_async_shared()
            tma.async_copy_shared_to_global(e_desc, [off_m, off_n], c_smem)
            i += 1
        tma.store_wait(pendings=0)

    @gluon.jit
    def _ping_pong_smem(x_desc, w_desc, out_desc, NUM_STAGES: gl.constexpr):
        """``(a_bufs, b_bufs, c_bufs, ready, empty, turn)``: the ring of x and W tiles, the consumers' two output
        staging tiles and the barriers, initialised, with consumer 0 holding the first MMA turn (turn[0] phase 0)."""
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [NUM_STAGES] + x_desc.block_type.shape, x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES] + w_desc.block_type.shape, w_desc.layout)
        c_bufs = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape, out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for c in gl.static_range(2):
            mbarrier.init(turn.index(c), count=1)
        fence_async_shared()  # barrier inits visible to the async proxy (TMA) before any use
        mbarrier.arrive(turn.index(0))
        return a_bufs, b_bufs, c_bufs, ready, empty, turn

    @gluon.jit
    def _exp_logits_gluon_kernel(x_desc, w_desc, e_desc, bias_ptr, shift_ptr, partials_ptr, logit_scale,
                                 HAS_BIAS: gl.constexpr, CLAMP: gl.constexpr, NUM_STAGES: gl.constexpr,
                                 GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                 PRODUCER_REGS: gl.constexpr):  # fmt: skip
        a_bufs, b_bufs, c_bufs, ready, empty, turn = _ping_pong_smem(x_desc, w_desc, e_desc, NUM_STAGES)
        # the partitions' argument tuples spelled out: the frontend does not build them from a shared one
        gl.warp_specialize(  # fmt: skip
            [
                (
                    _consumer,
                    (
                        x_desc,
                        w_desc,
                        e_desc,
                        a_bufs,
                        b_bufs,
                        c_bufs,
                        ready,
                        empty,
                        turn,
                        bias_ptr,
                        shift_ptr,
                        partials_ptr,
                        logit_scale,
                        0,
                        HAS_BIAS,
                        CLAMP,
                        GROUP_M,
                    ),
                ),
                (
                    _consumer,
                    (
                        x_desc,
                        w_desc,
                        e_desc,
                        a_bufs,
                        b_bufs,
                        c_bufs,
                        ready,
                        empty,
                        turn,
                        bias_ptr,
                        shift_ptr,
                        partials_ptr,
                        logit_scale,
                        1,
                        HAS_BIAS,
                        CLAMP,
                        GROUP_M,
                    ),
                ),
                (_producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, GROUP_M)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )


def _descriptor(t: torch.Tensor, block: tuple[int, int]):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), _shared_layout(block, t.dtype))


# Host time: a chunk's launch builds three descriptors; their layouts and the SM count are the same every call.
@functools.cache
def _shared_layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(
        list(block), {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    )


def workers(rows: int, num_classes: int, device: torch.device) -> int:
    """The schedule's workers for a chunk (:mod:`.factored_schedule`): two consumers a CTA, one CTA an SM (fewer
    when the chunk has fewer tiles)."""
    tiles = cdiv(rows, BLOCK_M) * cdiv(num_classes, BLOCK_N)
    return 2 * min(sm_count(device), tiles)


def exp_logits(
    x: torch.Tensor,  # (r, H) 16-bit, TMA-ready
    w: torch.Tensor,  # (V, H) x's dtype
    bias: torch.Tensor | None,  # (V,)
    shift: torch.Tensor,  # (r,) fp32
    logit_scale: float,  # a > 0
    clamp: float,
    e: torch.Tensor,  # (r, V) x's dtype, 16-byte row stride: written
    partials: torch.Tensor,  # (≥ slots, r) fp32: written (.factored_schedule.slots)
    n_workers: int,  # workers(r, V, device)
    group_m: int,  # the schedule's GROUP_M: largest_group(n_workers, GROUP_M)
) -> None:
    """``E`` and the partials, as :func:`.factored_kernels._exp_logits_kernel` computes them."""
    if x.shape[0] == 0:
        return
    _exp_logits_gluon_kernel[(n_workers // 2,)](
        _descriptor(x, (BLOCK_M, BLOCK_K)), _descriptor(w, (BLOCK_N, BLOCK_K)), _descriptor(e, (BLOCK_M, BLOCK_N)),
        bias if bias is not None else partials, shift, partials, float(logit_scale), bias is not None, float(clamp),
        _STAGES, group_m,
        _CONSUMER_REGS, _PRODUCER_REGS, num_warps=4, maxnreg=_MAXNREG,
    )  # fmt: skip
