r"""Gluon prototype (Triton 3.6, sm_90): a persistent, warp-specialised "ping-pong" Hopper GEMM ``z = x·Wᵀ (+ b)``
and the same GEMM with ``_logits_stats_kernel``'s softmax epilogue (issue 20, next step after v14).

Operands: x (M, K) bf16 row-major, W (N, K) bf16 row-major, bias (N,) bf16 or None, target (M,) int64.

Partitions of one CTA (one CTA per SM, a grid of ``min(#SMs, #tiles)`` programs walking the grouped tile order
``tile = pid, pid + P, pid + 2P, ...``; the CTA's j-th tile is its *local* tile j):

- producer (worker, 1 warp, few registers): for every local tile j and k-step issues the TMA loads of the x and W
  tiles into the ring slot ``q % S`` (``q = j·k_steps + k``, the CTA's load counter), after waiting on the slot's
  ``empty`` barrier; the loads complete the slot's ``ready`` barrier (expect-tx).
- consumer c ∈ {0, 1} (consumer 0 is the default partition, consumer 1 a 4-warp worker): takes local tiles
  j = c, c + 2, c + 4, ... . Per tile: wait for its MMA *turn*, run the K loop with async wgmma (one in flight,
  each finished wgmma releases its slot), hand the turn to the other consumer as soon as all its wgmmas are
  issued, drain, then run its epilogue (bf16 convert, shared-memory staging, TMA store; the stats) while the other
  consumer's wgmmas run — FA3's / CUTLASS's ping-pong.

mbarrier protocol (every barrier has arrival count 1; "phase n" = its n-th completion, waited with parity n & 1):

- ``ready[s]`` completes phase n when the n-th fill of slot s lands (the producer's ``expect`` is its one arrival,
  the TMA bytes its transaction count). The consumer of load q waits parity ``(q // S) & 1``.
- ``empty[s]`` completes phase n when the consumer of the n-th fill of slot s has finished the wgmma reading it.
  The producer's load q (fill n = q // S) waits for phase n − 1: parity ``((q // S) & 1) ^ 1`` (for n = 0 that is
  parity 1 on a fresh barrier, which returns at once).
- ``turn[c]`` completes phase m when consumer c may start the wgmmas of its m-th tile: ``turn[0]`` phase 0 is
  pre-arrived at launch, phase m ≥ 1 by consumer 1 after issuing its (m−1)-th tile's wgmmas; ``turn[1]`` phase m
  by consumer 0 after issuing its m-th tile's wgmmas. Consumer c waits parity ``m & 1`` before its m-th tile.

Why the parities cannot alias (a parity wait is only right when the barrier has completed exactly n or n + 1
phases): for ``ready``, fill n + 1 of a slot needs the waiter's own release of fill n, and fill n − 1 (load q − S)
has landed because the turn order makes every load of the CTA's earlier tiles waited-for (by one consumer or the
other) before this tile's wgmmas start, and loads of this tile before q were waited for by this consumer; for
``empty``, release n needs fill n, which this producer has not issued yet, and release n − 2 was waited for at
fill n − 1; for ``turn``, phase m + 1 of ``turn[c]`` needs the other consumer to have passed a turn that needs
this consumer's m-th tile. (This is also why the turn barriers are needed for correctness, not only for the
schedule: without them a consumer could run ahead onto a slot whose previous fill has not landed.)
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    tma,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the shared memory and barriers, the tile order, the TMA producer and the consumers' MMA turn are the library's
# (its factored exponential GEMM is the same ping-pong)
from linear_cross_entropy.backends.fused.factored_gluon import (
    _initial_accumulator,
    _mma_turn,
    _ping_pong_smem,
    _producer,
    _tile_schedule,
)

__all__ = ["Config", "DEFAULT", "WIDE", "plain_gemm", "stats_gemm", "descriptors", "stats_tiles", "row_padded"]

_LOG2E = gl.constexpr(1.4426950408889634)


class Config:
    """Per-consumer tile (BLOCK_M × BLOCK_N, fp32 accumulator = BLOCK_M·BLOCK_N/128 registers a thread), the
    reduction step, ring depth, grouping, and the register budgets of the partitions."""

    def __init__(
        self,
        block_m=128,
        block_n=128,
        block_k=64,
        stages=4,
        group_m=8,
        consumer_regs=232,
        producer_regs=40,
        maxnreg=168,
    ):
        self.block_m, self.block_n, self.block_k = block_m, block_n, block_k
        self.stages, self.group_m = stages, group_m
        # worker registers: [consumer 1, producer]; the default partition (consumer 0) gets what maxnreg leaves
        self.consumer_regs, self.producer_regs, self.maxnreg = consumer_regs, producer_regs, maxnreg

    def __repr__(self):
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k} s{self.stages} g{self.group_m} "
            f"regs {self.consumer_regs}/{self.producer_regs} maxnreg {self.maxnreg}"
        )


DEFAULT = Config()  # 128x128 per consumer, 4 stages (196 KB shared memory)
WIDE = Config(block_m=64, block_n=256)  # 64x256 per consumer (m64n256k16 wgmma; tiles of 256 classes as v14)


# ---------------------------------------------------------------------------------------------------------------
# device code


@gluon.jit
def _stats_epilogue(
    acc,
    z_low,
    off_m,
    off_n,
    n_rows,
    n_cols,
    target_ptr,
    partials_ptr,
    z_y_ptr,
    pid_n,
    tiles_n,
    acc_layout: gl.constexpr,
    HAS_SMOOTHING: gl.constexpr,
):
    """``_logits_stats_kernel``'s statistics of one (rows, classes) tile, from the stored (rounded) logits."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    BLOCK_N: gl.constexpr = acc.shape[1]
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    row_mask = offs_m < n_rows
    col_mask = offs_n < n_cols
    partial_ptr = partials_ptr + pid_n.to(gl.int64) * n_rows + offs_m  # (3, tiles, M): rows contiguous
    plane = tiles_n.to(gl.int64) * n_rows
    z = z_low.to(gl.float32)
    if HAS_SMOOTHING:
        # Σ over valid classes: past N the logits are exactly 0 (zero-filled W rows, zero bias), no mask needed
        gl.store(partial_ptr + 2 * plane, gl.sum(z, axis=1), mask=row_mask)
    # one fp32 tile live: the rounded logits, -inf past N (no class there)
    z = gl.where(col_mask[None, :], z, -float("inf"))
    target = gl.load(target_ptr + offs_m, mask=row_mask, other=-1)
    in_tile = (target >= off_n) & (target < off_n + BLOCK_N) & (target < n_cols)
    z_y = gl.sum(gl.where(offs_n[None, :] == target[:, None], z, 0.0), axis=1)
    m = gl.max(z, axis=1)
    gl.store(partial_ptr, m, mask=row_mask)
    gl.store(partial_ptr + plane, gl.sum(gl.exp2((z - m[:, None]) * _LOG2E), axis=1), mask=row_mask)
    gl.store(z_y_ptr + offs_m, z_y, mask=row_mask & in_tile)


@gluon.jit
def _consumer(
    x_desc,
    w_desc,
    z_desc,
    a_bufs,
    b_bufs,
    c_bufs,
    ready,
    empty,
    turn,
    bias_ptr,
    target_ptr,
    partials_ptr,
    z_y_ptr,
    CONSUMER: gl.constexpr,
    STATS: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    HAS_SMOOTHING: gl.constexpr,
    GROUP_M: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    gl.static_assert(gl.num_warps() == 4, "a consumer is one warpgroup")
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    n_rows = x_desc.shape[0]
    n_feat = x_desc.shape[1]
    n_cols = w_desc.shape[0]
    tiles_m = gl.cdiv(n_rows, BLOCK_M)
    tiles_n = gl.cdiv(n_cols, BLOCK_N)
    k_steps = gl.cdiv(n_feat, BLOCK_K)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    c_smem = c_bufs.index(CONSUMER)
    my_turn = turn.index(CONSUMER)
    other_turn = turn.index(1 - CONSUMER)

    i = 0  # this consumer's tile count m; its local tile is j = 2 * i + CONSUMER
    for tile in range(pid + CONSUMER * nprog, tiles_m * tiles_n, 2 * nprog):
        pid_m, pid_n, _, _ = _tile_schedule(tile, tiles_m, tiles_n, GROUP_M, 2 * nprog)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        q0 = (2 * i + CONSUMER) * k_steps

        acc = _initial_accumulator(bias_ptr, off_n, n_cols, BLOCK_M, BLOCK_N, acc_layout, HAS_BIAS)
        acc = _mma_turn(acc, a_bufs, b_bufs, ready, empty, my_turn, other_turn, i, q0, k_steps)

        # epilogue (overlaps the other consumer's wgmmas)
        z_low = acc.to(z_desc.dtype)
        tma.store_wait(pendings=0)  # this consumer's previous TMA store has finished reading c_smem
        c_smem.store(z_low)
        fence_async_shared()
        tma.async_copy_shared_to_global(z_desc, [off_m, off_n], c_smem)
        if STATS:
            _stats_epilogue(
                acc,
                z_low,
                off_m,
                off_n,
                n_rows,
                n_cols,
                target_ptr,
                partials_ptr,
                z_y_ptr,
                pid_n,
                tiles_n,
                acc_layout,
                HAS_SMOOTHING,
            )
        i += 1
    tma.store_wait(pendings=0)


@gluon.jit
def _ws_gemm_body(
    x_desc,
    w_desc,
    z_desc,
    bias_ptr,
    target_ptr,
    partials_ptr,
    z_y_ptr,
    STATS: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    HAS_SMOOTHING: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    GROUP_M: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    gl.static_assert(z_desc.block_type.shape[0] == BLOCK_M)
    gl.static_assert(z_desc.block_type.shape[1] == BLOCK_N)
    a_bufs, b_bufs, c_bufs, ready, empty, turn = _ping_pong_smem(x_desc, w_desc, z_desc, NUM_STAGES)

    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    x_desc,
                    w_desc,
                    z_desc,
                    a_bufs,
                    b_bufs,
                    c_bufs,
                    ready,
                    empty,
                    turn,
                    bias_ptr,
                    target_ptr,
                    partials_ptr,
                    z_y_ptr,
                    0,
                    STATS,
                    HAS_BIAS,
                    HAS_SMOOTHING,
                    GROUP_M,
                ),
            ),
            (
                _consumer,
                (
                    x_desc,
                    w_desc,
                    z_desc,
                    a_bufs,
                    b_bufs,
                    c_bufs,
                    ready,
                    empty,
                    turn,
                    bias_ptr,
                    target_ptr,
                    partials_ptr,
                    z_y_ptr,
                    1,
                    STATS,
                    HAS_BIAS,
                    HAS_SMOOTHING,
                    GROUP_M,
                ),
            ),
            (_producer, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, GROUP_M)),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )


@gluon.jit
def _plain_gemm_kernel(
    x_desc,
    w_desc,
    z_desc,
    NUM_STAGES: gl.constexpr,
    GROUP_M: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    """z = x·Wᵀ through TMA, bf16 out (no bias)."""
    _ws_gemm_body(
        x_desc, w_desc, z_desc, 0, 0, 0, 0, False, False, False, NUM_STAGES, GROUP_M, CONSUMER_REGS, PRODUCER_REGS
    )


@gluon.jit
def _stats_gemm_kernel(
    x_desc,
    w_desc,
    z_desc,
    bias_ptr,
    target_ptr,
    partials_ptr,
    z_y_ptr,
    HAS_BIAS: gl.constexpr,
    HAS_SMOOTHING: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    GROUP_M: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    """z = x·Wᵀ + b (bf16, through TMA) and the per-(row, 128-class tile) softmax partials, as
    ``_logits_stats_kernel``: partials (3, tiles, M) fp32 = m_t, Σ exp(z − m_t), Σ z (HAS_SMOOTHING); z_y (M,)."""
    _ws_gemm_body(
        x_desc,
        w_desc,
        z_desc,
        bias_ptr,
        target_ptr,
        partials_ptr,
        z_y_ptr,
        True,
        HAS_BIAS,
        HAS_SMOOTHING,
        NUM_STAGES,
        GROUP_M,
        CONSUMER_REGS,
        PRODUCER_REGS,
    )


# ---------------------------------------------------------------------------------------------------------------
# host code


def _gl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]


def descriptors(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, cfg: Config = DEFAULT):
    """TMA descriptors of x (BLOCK_M, BLOCK_K), W (BLOCK_N, BLOCK_K) and z (BLOCK_M, BLOCK_N), 128-byte swizzled
    NVMMA shared layouts (the wgmma operand / TMA layouts). Works on CPU tensors too (for compile checks)."""
    dt = _gl_dtype(x.dtype)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    lx = gl.NVMMASharedLayout.get_default_for([bm, bk], dt)
    lw = gl.NVMMASharedLayout.get_default_for([bn, bk], dt)
    lz = gl.NVMMASharedLayout.get_default_for([bm, bn], _gl_dtype(z.dtype))
    return (
        TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, bk], lx),
        TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk], lw),
        TensorDescriptor(z, list(z.shape), list(z.stride()), [bm, bn], lz),
    )


def _check(x, w):
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
    for t in (x, w):
        assert t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def row_padded(rows: int, cols: int, dtype, device) -> torch.Tensor:
    """(rows, cols) view of a buffer whose row stride is a multiple of 64 elements (TMA: 16-byte row strides)."""
    return torch.empty((rows, -(-cols // 64) * 64), dtype=dtype, device=device)[:, :cols]


def _grid(m: int, n: int, cfg: Config, device) -> tuple:
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return (max(1, min(sms, tiles)),)


def stats_tiles(n: int, cfg: Config = DEFAULT) -> int:
    return triton.cdiv(n, cfg.block_n)


def plain_gemm(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor | None = None, cfg: Config = DEFAULT):
    """z = x·Wᵀ in x's dtype (fp32 accumulation); z defaults to a row-padded (M, N) buffer."""
    _check(x, w)
    m, n = x.shape[0], w.shape[0]
    if z is None:
        z = row_padded(m, n, x.dtype, x.device)
    if m == 0:
        return z
    xd, wd, zd = descriptors(x, w, z, cfg)
    _plain_gemm_kernel[_grid(m, n, cfg, x.device)](
        xd,
        wd,
        zd,
        cfg.stages,
        cfg.group_m,
        cfg.consumer_regs,
        cfg.producer_regs,
        num_warps=4,
        maxnreg=cfg.maxnreg,
    )
    return z


def stats_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    smoothing: bool,
    z: torch.Tensor | None = None,
    cfg: Config = DEFAULT,
    partials: torch.Tensor | None = None,
    z_y: torch.Tensor | None = None,
):
    """``(z, partials, z_y)``: z = x·Wᵀ + b (x's dtype), partials (3, cdiv(N, BLOCK_N), M) fp32 (plane 2 only
    written when ``smoothing``), z_y (M,) fp32 (written on rows whose target is in [0, N))."""
    _check(x, w)
    m, n = x.shape[0], w.shape[0]
    assert target.shape == (m,) and target.dtype == torch.int64 and target.is_contiguous()
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous()
    if z is None:
        z = row_padded(m, n, x.dtype, x.device)
    if partials is None:
        partials = torch.empty((3, stats_tiles(n, cfg), m), dtype=torch.float32, device=x.device)
    assert partials.shape == (3, stats_tiles(n, cfg), m) and partials.is_contiguous()
    if z_y is None:
        z_y = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return z, partials, z_y
    xd, wd, zd = descriptors(x, w, z, cfg)
    _stats_gemm_kernel[_grid(m, n, cfg, x.device)](
        xd,
        wd,
        zd,
        bias if bias is not None else partials,
        target,
        partials,
        z_y,
        bias is not None,
        bool(smoothing),
        cfg.stages,
        cfg.group_m,
        cfg.consumer_regs,
        cfg.producer_regs,
        num_warps=4,
        maxnreg=cfg.maxnreg,
    )
    return z, partials, z_y
