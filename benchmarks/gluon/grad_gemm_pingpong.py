r"""Gluon prototype (Triton 3.6, sm_90): ``grad_x = dz·W`` with the softmax in the prologue, warp-specialised
(``stats_gemm.py``'s producer + two consumers), ``dz`` staged through **shared memory** as wgmma's A operand.

    dz = coef·exp(z − lse) − T·[c = y] − E        (per row: coef, T, E, lse, target y; as ``_dz_tile``)

Why shared memory: ``grad_gemm.py``'s register-A wgmma is serialised by ptxas under ``setmaxnreg`` (C7512), while
the SMEM-A wgmma of ``stats_gemm.py`` pipelines there. Shapes: z (r, V) bf16 row-major (row-padded view), W (V, H)
bf16 row-major, grad_x (r, H) bf16 (or, with V splits, an fp32 workspace ``(splits, r_pad, H)`` summed by the host).

One CTA per SM, persistent over *units* ``(tile, split)`` (``unit = tile·splits + split``, tiles row-major over
(row blocks, feature blocks) so the units in flight share z row blocks and W k-slabs in L2). A unit is a
128-row × 256-feature output block over a V range; it is split between the two consumers by rows:

- producer (worker, 1 warp, 40 registers): per unit and 64-class step k, waits ``empty[s]`` and TMA-loads into
  slot ``s = q % S`` (``q`` the CTA's step counter) the two 64×64 z halves (rows of consumer 0 and 1) and the
  64×256 W tile, completing ``ready[s]`` (expect-tx).
- consumer c ∈ {0, 1} (4 warps each, 232 registers; consumer 0 is the default partition): output rows
  ``off_m + 64c``, a 64×256 fp32 accumulator (128 registers a thread). Step k: wait ``ready[s]``; load its 64×64 z
  half from shared memory; form dz (fp32, ``exp2``), convert to bf16 and store it into its own dz buffer
  ``k % 2`` (NVMMA 128-byte swizzle); ``fence_async_shared`` + warpgroup barrier; wait for its MMA turn; issue
  ``warpgroup_mma(dz_smem, W_smem, acc, is_async=True)`` (m64n256k16 × 4); pass the turn to the other consumer;
  ``warpgroup_mma_wait(1)`` (its step k − 1 retired: that dz buffer is free, and it releases slot (q − 1) % S by
  one arrival on ``empty``, which has arrival count 2: both consumers read every slot).

Why this shape (64×256 per consumer, the two consumers sharing the W tile):
- ``exp2`` is recomputed once per 256-feature block: 1 ``ex2`` per ``2·256`` MMA FLOPs, i.e. MUFU time = ½ of the
  MMA time (at 128 features per dz it would equal it — nothing could hide it).
- L2 → SM traffic per step: 2 × 8 KB of z + 32 KB of W for 2 × 64×256×64 MACs = 87 FLOP/B, cuBLAS's 128×256
  level (64-row tiles each loading their own W would be 52 FLOP/B, v14's 64×512 lesson: starved at ~58).
- Occupancy: at r = 4096, H = 896: 32 × 4 units for 132 SMs (12.5% of the MMA wasted on the 4th, half-empty
  feature block); H = 2048: 256 units, 2 waves (97%); r = 2048, H = 768: 48 tiles → V splits (``choose_splits``).

The MMA *turn* (``PINGPONG``): the two consumers issue their wgmmas strictly alternately, step by step
(c0 k, c1 k, c0 k + 1, ...), so while the tensor core runs one consumer's step the other forms its next dz —
FA3's inter-warpgroup overlap; within a consumer the double-buffered dz lets step k + 1's ``exp2`` run under its
own step k. (``stats_gemm.py`` passes the turn per *tile*, which hides an epilogue; here the softmax sits in every
step, so the turn is per step.) ``PINGPONG=False`` drops the turn (free-running consumers), also correct.

mbarrier protocol (phase n = the n-th completion, waited with parity n & 1):
- ``ready[s]`` (count 1: the producer's expect + TMA bytes) completes phase n when fill n of slot s lands. Each
  consumer waits every fill of every slot, in order. Fill n + 1 needs ``empty[s]`` phase n, which needs *this*
  consumer's release of fill n, issued after it waited fill n; fill n − 1 it waited itself: no aliasing.
- ``empty[s]`` (count 2) completes phase n when both consumers released fill n (after the wgmma reading it
  retired). The producer's fill n waits phase n − 1 (parity ``((q // S) & 1) ^ 1``; fill 0 passes on a fresh
  barrier); phase n cannot have completed (fill n not issued), and the producer waited phase n − 2 at fill n − 1.
- ``turn[c]`` (count 1): consumer c's global step g (over all its units) waits ``turn[c]`` phase g; ``turn[0]``
  phase 0 is pre-arrived, consumer 1's step g arrives ``turn[0]`` (phase g + 1), consumer 0's step g arrives
  ``turn[1]`` (phase g). ``turn[c]`` phase g + 1 needs the other consumer's step g (+ 1), which needs this one's
  step g first: no aliasing. Both consumers walk the same units and steps, so every wait is matched.
The turn is not needed for the ring's correctness (each consumer waits every fill itself); deadlock-free because
the producer's order (unit, k) is both consumers' order and S ≥ 2.

Epilogue: the 64×256 accumulator in four 64×64 pieces through the consumer's two dz buffers (TMA store, bf16; or
fp32 partials of a V split through the two buffers reinterpreted as one 64×64 fp32 tile), piece pi to columns
``off_n + 64i`` (the first GPU run stored p1 and p2 in each other's place, as ``grad_gemm.py`` had: every check
rel. error ~1; ``epilogue_pieces`` + ``check_grad_pingpong.py --selftest`` check the order on the CPU). The next
unit's first dz store waits for those TMA stores (``store_wait(0)``; Triton's membar puts a warpgroup ``bar.sync``
after every ``cp.async.bulk.wait_group.read``, so no thread writes a buffer before the issuing thread's wait).
"""

from __future__ import annotations

import torch
import triton

# shared with the register-A kernel (this folder is on sys.path wherever these modules are imported from)
from grad_gemm import _gl_dtype, _unit_coords, choose_splits
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

__all__ = ["PingPongConfig", "DEFAULT", "grad_x", "choose_splits", "descriptors", "epilogue_pieces", "plan"]

_LOG2E = gl.constexpr(1.4426950408889634)


class PingPongConfig:
    """Per-consumer tile ``64 × block_n`` (the CTA's unit is ``128 × block_n``), ``block_k`` classes per step,
    ring depth, register budgets (consumer 0 gets what ``maxnreg`` leaves), the per-step MMA turn."""

    def __init__(
        self, block_n=256, block_k=64, stages=4, consumer_regs=232, producer_regs=40, maxnreg=168, pingpong=True
    ):
        self.block_m = 64  # rows per consumer (one m64 warpgroup); a unit is 2 * block_m rows
        self.block_n, self.block_k, self.stages = block_n, block_k, stages
        self.consumer_regs, self.producer_regs, self.maxnreg = consumer_regs, producer_regs, maxnreg
        self.pingpong = pingpong

    def __repr__(self):
        return (
            f"2x{self.block_m}x{self.block_n}x{self.block_k} s{self.stages} regs {self.consumer_regs}/"
            f"{self.producer_regs} maxnreg {self.maxnreg} pingpong {int(self.pingpong)}"
        )


DEFAULT = PingPongConfig()


# ---------------------------------------------------------------------------------------------------------------
# device code


@gluon.jit
def _producer(z_desc, w_desc, z_bufs, w_bufs, ready, empty, n_units, tiles_n, splits, k_steps, steps_per_split):
    BLOCK_M: gl.constexpr = z_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = z_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    S: gl.constexpr = w_bufs.type.shape[0]
    nbytes: gl.constexpr = 2 * z_desc.block_type.nbytes + w_desc.block_type.nbytes
    q = 0  # the CTA's step counter over its units
    for unit in range(gl.program_id(0), n_units, gl.num_programs(0)):
        pid_m, pid_n, split, k_lo, n = _unit_coords(unit, tiles_n, splits, k_steps, steps_per_split)
        off_m = pid_m * (2 * BLOCK_M)
        off_n = pid_n * BLOCK_N
        for k in range(n):
            s = q % S
            # fill n = q // S of slot s needs both consumers' releases of fill n - 1
            mbarrier.wait(empty.index(s), ((q // S) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            col = (k_lo + k) * BLOCK_K
            tma.async_copy_global_to_shared(z_desc, [off_m, col], bar, z_bufs.index(2 * s))
            tma.async_copy_global_to_shared(z_desc, [off_m + BLOCK_M, col], bar, z_bufs.index(2 * s + 1))
            tma.async_copy_global_to_shared(w_desc, [col, off_n], bar, w_bufs.index(s))
            q += 1


@gluon.jit
def _store_piece(out_desc, piece, buf, row, col):
    tma.store_wait(pendings=1)  # the store issued two pieces ago (same buffer) has read it
    buf.store(piece.to(out_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [row, col], buf)


@gluon.jit
def _consumer(
    z_desc,
    w_desc,
    out_desc,
    z_bufs,
    w_bufs,
    dz_bufs,
    ready,
    empty,
    turn,
    target_ptr,
    lse_ptr,
    coef_ptr,
    n_rows,
    n_units,
    tiles_n,
    splits,
    k_steps,
    steps_per_split,
    out_rows_per_split,
    CONSUMER: gl.constexpr,
    HAS_SMOOTHING: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    BLOCK_M: gl.constexpr = z_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = z_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    EPI_N: gl.constexpr = out_desc.block_type.shape[1]
    S: gl.constexpr = w_bufs.type.shape[0]
    gl.static_assert(gl.num_warps() == 4, "a consumer is one warpgroup")
    gl.static_assert(BLOCK_M == 64)
    gl.static_assert(EPI_N == BLOCK_K)
    gl.static_assert(BLOCK_N == 4 * EPI_N)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    # z / dz tile in registers: 8 consecutive classes (16 B) a thread, a warp covers 4 rows of 64 classes
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    row_l: gl.constexpr = gl.SliceLayout(1, zl)
    col_l: gl.constexpr = gl.SliceLayout(0, zl)
    dz_a = dz_bufs.index(2 * CONSUMER)
    dz_b = dz_bufs.index(2 * CONSUMER + 1)
    my_turn = turn.index(CONSUMER)
    other_turn = turn.index(1 - CONSUMER)
    cols = gl.arange(0, BLOCK_K, layout=col_l)

    q = 0  # the CTA's step counter (the producer's q): slot q % S, fill q // S
    for unit in range(gl.program_id(0), n_units, gl.num_programs(0)):
        pid_m, pid_n, split, k_lo, n = _unit_coords(unit, tiles_n, splits, k_steps, steps_per_split)
        off_m = pid_m * (2 * BLOCK_M) + CONSUMER * BLOCK_M
        off_n = pid_n * BLOCK_N

        offs = off_m + gl.arange(0, BLOCK_M, layout=row_l)
        mask = offs < n_rows
        lse2 = gl.load(lse_ptr + offs, mask=mask, other=0.0) * _LOG2E
        coef = gl.load(coef_ptr + offs, mask=mask, other=0.0)
        t_coef = gl.load(coef_ptr + n_rows + offs, mask=mask, other=0.0)
        if HAS_SMOOTHING:
            e_coef = gl.load(coef_ptr + 2 * n_rows + offs, mask=mask, other=0.0)
        else:
            e_coef = gl.zeros_like(t_coef)
        te = t_coef + e_coef
        # the target relative to the unit's first class (negative targets never match a column)
        target = gl.load(target_ptr + offs, mask=mask, other=-1)
        tgt_rel = gl.where(target >= 0, target - k_lo * BLOCK_K, -1).to(gl.int32)

        tma.store_wait(pendings=0)  # the previous unit's output pieces have left the dz buffers
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=acc_layout)
        for k in range(n):
            s = q % S
            mbarrier.wait(ready.index(s), (q // S) & 1)
            z = z_bufs.index(2 * s + CONSUMER).load(zl)
            p = gl.exp2(z.to(gl.float32) * _LOG2E - lse2[:, None])
            on_target = cols[None, :] == (tgt_rel - k * BLOCK_K)[:, None]
            if HAS_SMOOTHING:
                sub = gl.where(on_target, te[:, None], e_coef[:, None])
            else:
                sub = gl.where(on_target, te[:, None], 0.0)
            dz = (coef[:, None] * p - sub).to(z_desc.dtype)
            # dz buffer k % 2: its previous reader, step k - 2's wgmma, retired at step k - 1's wait(1)
            dz_buf = dz_bufs.index(2 * CONSUMER + k % 2)
            dz_buf.store(dz)
            fence_async_shared()  # the generic-proxy stores before the async-proxy (wgmma) read
            gl.thread_barrier()  # ... by every thread of the warpgroup
            if PINGPONG:
                mbarrier.wait(my_turn, q & 1)  # the other consumer issued its previous step
            acc = warpgroup_mma(dz_buf, w_bufs.index(s), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(other_turn)
            # at most this wgmma in flight: step k - 1 retired (its slot and dz buffer are free)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((q + S - 1) % S), pred=k > 0)
            q += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((q + S - 1) % S), pred=n > 0)

        # epilogue: four 64 x 64 pieces through the two dz buffers
        out_row = split * out_rows_per_split + off_m
        a2, b2 = gl.split(acc.reshape([BLOCK_M, 2, BLOCK_N // 2]).permute(0, 2, 1))
        p0, p1 = gl.split(a2.reshape([BLOCK_M, 2, EPI_N]).permute(0, 2, 1))
        p2, p3 = gl.split(b2.reshape([BLOCK_M, 2, EPI_N]).permute(0, 2, 1))
        # p0..p3 are columns [0, 64), [64, 128), [128, 192), [192, 256) of the tile: the reshape is row-major, so the
        # first split gives columns [0, 128) and [128, 256), the second their halves. (The first GPU run stored p2 at
        # +64 and p1 at +128, as grad_gemm.py's first version: half of every tile's columns swapped, grad_x rel.
        # error ~1 in every check. ``epilogue_pieces`` is this sequence in torch; ``check_grad_pingpong.py
        # --selftest`` checks it and the store offsets below, read from this source, on the CPU.)
        if out_desc.dtype == gl.float32:
            # the consumer's two bf16 buffers (16 KB, adjacent) as one 64 x 64 fp32 tile
            buf = dz_bufs._reinterpret(gl.float32, [2, BLOCK_M, EPI_N], out_desc.layout).index(CONSUMER)
            tma.store_wait(pendings=0)
            buf.store(p0)
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [out_row, off_n], buf)
            tma.store_wait(pendings=0)
            buf.store(p1)
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [out_row, off_n + EPI_N], buf)
            tma.store_wait(pendings=0)
            buf.store(p2)
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [out_row, off_n + 2 * EPI_N], buf)
            tma.store_wait(pendings=0)
            buf.store(p3)
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [out_row, off_n + 3 * EPI_N], buf)
        else:
            _store_piece(out_desc, p0, dz_a, out_row, off_n)
            _store_piece(out_desc, p1, dz_b, out_row, off_n + EPI_N)
            _store_piece(out_desc, p2, dz_a, out_row, off_n + 2 * EPI_N)
            _store_piece(out_desc, p3, dz_b, out_row, off_n + 3 * EPI_N)
    tma.store_wait(pendings=0)


@gluon.jit
def _grad_x_pp_kernel(
    z_desc,
    w_desc,
    out_desc,
    target_ptr,
    lse_ptr,
    coef_ptr,
    n_rows,
    n_units,
    tiles_n,
    splits,
    k_steps,
    steps_per_split,
    out_rows_per_split,
    HAS_SMOOTHING: gl.constexpr,
    PINGPONG: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    """grad_x (or a V split's fp32 partial) = dz·W, dz formed per step by the consumers and staged in shared memory."""
    BLOCK_M: gl.constexpr = z_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = z_desc.block_type.shape[1]
    gl.static_assert(w_desc.block_type.shape[0] == BLOCK_K)
    gl.static_assert(out_desc.block_type.shape[0] == BLOCK_M)
    z_bufs = gl.allocate_shared_memory(z_desc.dtype, [2 * NUM_STAGES] + z_desc.block_type.shape, z_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES] + w_desc.block_type.shape, w_desc.layout)
    # per consumer two 64 x 64 bf16 dz tiles (the A operand; also the epilogue's staging): [c0 a, c0 b, c1 a, c1 b]
    dz_bufs = gl.allocate_shared_memory(z_desc.dtype, [4] + z_desc.block_type.shape, z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    for c in gl.static_range(2):
        mbarrier.init(turn.index(c), count=1)
    fence_async_shared()  # barrier inits visible to the async proxy before any use
    mbarrier.arrive(turn.index(0))  # consumer 0 owns the first MMA turn (turn[0] phase 0)

    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    z_desc,
                    w_desc,
                    out_desc,
                    z_bufs,
                    w_bufs,
                    dz_bufs,
                    ready,
                    empty,
                    turn,
                    target_ptr,
                    lse_ptr,
                    coef_ptr,
                    n_rows,
                    n_units,
                    tiles_n,
                    splits,
                    k_steps,
                    steps_per_split,
                    out_rows_per_split,
                    0,
                    HAS_SMOOTHING,
                    PINGPONG,
                ),
            ),
            (
                _consumer,
                (
                    z_desc,
                    w_desc,
                    out_desc,
                    z_bufs,
                    w_bufs,
                    dz_bufs,
                    ready,
                    empty,
                    turn,
                    target_ptr,
                    lse_ptr,
                    coef_ptr,
                    n_rows,
                    n_units,
                    tiles_n,
                    splits,
                    k_steps,
                    steps_per_split,
                    out_rows_per_split,
                    1,
                    HAS_SMOOTHING,
                    PINGPONG,
                ),
            ),
            (
                _producer,
                (z_desc, w_desc, z_bufs, w_bufs, ready, empty, n_units, tiles_n, splits, k_steps, steps_per_split),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )


# ---------------------------------------------------------------------------------------------------------------
# host code


def descriptors(z, w, out, cfg: PingPongConfig = DEFAULT):
    """TMA descriptors: z (64, BLOCK_K), W (BLOCK_K, BLOCK_N), out (64, 64); 128-byte swizzled NVMMA layouts.
    Works on CPU tensors too (compile checks)."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k

    def desc(t, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t.dtype))
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)

    return desc(z, [bm, bk]), desc(w, [bk, bn]), desc(out, [bm, bk])


def epilogue_pieces(acc: torch.Tensor, epi_n: int = 64) -> dict[str, torch.Tensor]:
    """The consumer epilogue's split in torch (same reshape / permute / split sequence, ``gl.split`` =
    ``unbind(-1)``): ``{"p0": ..., "p3": ...}`` for a ``(64, block_n)`` accumulator. Where the kernel stores each
    piece is read from its source by ``check_grad_pingpong.py --selftest``; keep this in step with ``_consumer``."""
    m, n = acc.shape
    a2, b2 = acc.reshape(m, 2, n // 2).permute(0, 2, 1).unbind(-1)
    p0, p1 = a2.reshape(m, 2, epi_n).permute(0, 2, 1).unbind(-1)
    p2, p3 = b2.reshape(m, 2, epi_n).permute(0, 2, 1).unbind(-1)
    return {"p0": p0, "p1": p1, "p2": p2, "p3": p3}


def plan(r: int, h: int, v: int, sms: int, cfg: PingPongConfig = DEFAULT, splits: int | None = None):
    """The launch: ``(tiles_m, tiles_n, k_steps, splits, steps_per_split)`` (128-row units), no empty split."""
    tiles_m, tiles_n = triton.cdiv(r, 2 * cfg.block_m), triton.cdiv(h, cfg.block_n)
    k_steps = triton.cdiv(v, cfg.block_k)
    if splits is None:
        splits = choose_splits(tiles_m * tiles_n, sms, k_steps)
    steps_per_split = triton.cdiv(k_steps, splits)
    return tiles_m, tiles_n, k_steps, triton.cdiv(k_steps, steps_per_split), steps_per_split


def _check(z, w, target, lse, coefs, out):
    r, v = z.shape
    h = w.shape[1]
    assert w.shape[0] == v and z.dtype == w.dtype == torch.bfloat16
    assert out.shape == (r, h) and out.dtype in (torch.bfloat16, torch.float32)
    assert target.shape == (r,) and target.dtype == torch.int64 and target.is_contiguous()
    assert lse.shape == (r,) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert coefs.shape == (3, r) and coefs.dtype == torch.float32 and coefs.is_contiguous()
    for t in (z, w, out):
        assert t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def grad_x(
    z: torch.Tensor,
    w: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    coefs: torch.Tensor,
    smoothing: bool,
    out: torch.Tensor,
    cfg: PingPongConfig = DEFAULT,
    splits: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = dz·W`` (bf16 or fp32), dz formed in the prologue; ``coefs`` (3, r) fp32 = coef, T, E (E read only
    when ``smoothing``). With ``splits > 1`` (default: :func:`choose_splits`) the partial products go to an fp32
    workspace ``(splits, r_pad, H)`` summed here."""
    _check(z, w, target, lse, coefs, out)
    (r, v), h = z.shape, w.shape[1]
    if r == 0:
        return out
    sms = torch.cuda.get_device_properties(z.device).multi_processor_count
    tiles_m, tiles_n, k_steps, splits, steps_per_split = plan(r, h, v, sms, cfg, splits)
    if splits > 1 or out.dtype != torch.bfloat16:
        r_pad = tiles_m * 2 * cfg.block_m
        if workspace is None or workspace.shape != (splits, r_pad, h):
            workspace = torch.empty((splits, r_pad, h), dtype=torch.float32, device=z.device)
        dst, rows_per_split = workspace.view(splits * r_pad, h), r_pad
    else:
        dst, rows_per_split = out, 0
    zd, wd, od = descriptors(z, w, dst, cfg)
    n_units = tiles_m * tiles_n * splits
    _grad_x_pp_kernel[(max(1, min(sms, n_units)),)](
        zd,
        wd,
        od,
        target,
        lse,
        coefs,
        r,
        n_units,
        tiles_n,
        splits,
        k_steps,
        steps_per_split,
        rows_per_split,
        bool(smoothing),
        bool(cfg.pingpong),
        cfg.stages,
        cfg.consumer_regs,
        cfg.producer_regs,
        num_warps=4,
        maxnreg=cfg.maxnreg,
    )
    if dst is not out:
        torch.sum(workspace[:, :r], dim=0, out=out) if out.dtype == torch.float32 else out.copy_(
            workspace[:, :r].sum(0)
        )
    return out
