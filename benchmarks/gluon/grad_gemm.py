r"""Gluon prototype (Triton 3.6, sm_90): ``grad_x = dz·W`` with the softmax in the GEMM's *prologue*, ``dz`` formed in
registers from each loaded bf16 ``z`` tile and fed to ``warpgroup_mma`` as its **register A operand** (Hopper wgmma
takes A from registers, B from shared memory, as FA3 feeds P·V), so ``dz`` is never written — plus a ``STORE_DZ``
mode where the units of the first feature block also store ``dz`` (bf16, TMA) for a cuBLAS ``dzᵀ·x``.

    dz = coef·exp(z − lse) − T·[c = y] − E        (per row: coef, T, E, lse, target y; as ``_dz_tile``)

computed as ``dz = coef·exp2(z·log2e − lse·log2e) − (E + [c = y]·T)`` (one FFMA for the exponent, one ``ex2``, a
compare + select for the target, one FFMA for ``coef·e − (…)``, half a pack to bf16).

Shapes: z (r, V) bf16 row-major (a row-padded view), W (V, H) bf16 row-major, grad_x (r, H) bf16 or fp32.

Design (what compiled without ptxas serialising the wgmma pipeline; see "What ptxas allowed" below):

- One program per *unit*: a CTA output tile of ``BLOCK_M = 128`` rows × ``BLOCK_N = 256`` features over a range
  of V (``splits`` ranges; 1 unless there are too few tiles for the SMs, then fp32 partials in a workspace
  ``(splits, r_pad, H)`` that the launcher sums: deterministic, no TMA reduce in 3.6's Hopper Gluon).
- 8 warps = two warpgroups, each owning 64 rows (``NVMMADistributedLayout(warps_per_cta=[8, 1], instr
  [16, 256, 16])``: one m64n256k16 wgmma per warpgroup per 16 classes); a ring of 4 (z 128×64, W 64×256) stages
  filled by TMA, ``S − 1`` steps ahead.
- Step k: wait ``ready[k % S]``; ``ldmatrix`` the z tile straight into wgmma's A register layout
  (``DotOperandLayout(0, acc_layout, k_width=2)``); form dz there (fp32 math, bf16 pack); issue the async wgmma
  with dz as A; ``warpgroup_mma_wait(1)`` (step k − 1 retired in this warpgroup); CTA barrier (retired in both);
  TMA-load step k + S − 1 into step k − 1's slot. The loop is unrolled by two (distinct dz values, so distinct
  registers: a step's A registers are rewritten only after its wgmma retired; an odd unit runs one phantom step
  with dz = 0 on reloaded step n − 1 data). Not unrolled, the next step's prologue wrote the in-flight wgmma's A
  registers (PTX undefined behaviour; 67-84 such writes per loop in the SASS, 0 now). So the ``exp2``/FMAs of
  step k + 1 run while the tensor core executes step k's wgmmas (software pipeline within each warpgroup; the SASS shows the next step's LDSM / MUFU
  between ``HGMMA … gsb0`` and the ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` of the following step).
- ``STORE_DZ``: the units of the first feature block also store dz (bf16) per step through a double-buffered
  128×64 staging tile + TMA; a runtime branch inside the one K loop.
- Epilogue: the 128×256 fp32 accumulator in four 128×64 pieces through the same 32 KB staging buffer.

What ptxas allowed (Triton 3.6's ptxas, ``compile_grad.py`` re-runs it with ``-v``):
- The warp-specialised form first written (producer warp + two 4-warp consumers with ``setmaxnreg``, as
  ``stats_gemm.py``) compiled, but ptxas serialised every register-A wgmma ("C7512 … insufficient register
  resources"): also in a minimal kernel whenever the partition's ``setmaxnreg`` exceeded the function's
  ``.maxnreg``, which 12 warps force to ≤ 168. Without warp specialisation (255 registers) it pipelines.
- An ``if pid_n == 0`` around two copies of the K loop (for STORE_DZ), and the fp32 output / split epilogue,
  gave "C7515 … non wgmma instructions defining accumulator registers": the first is fixed (one loop); **the fp32
  epilogue (fp32 ``out`` and every split run) is still serialised** (correct, slower).

Why 128 × 256: the exponential is recomputed once per feature block (``H / BLOCK_N`` times per logit) and costs
1 ``ex2`` per ``2·BLOCK_N`` MMA FLOPs: at 256 features the MUFU work is half the MMA time (a 128 × 64 z tile:
8192 ``ex2`` / 16 per clock = 512 clocks against 1024 clocks of 2 × m64n256k64), at 128 it would equal it. A
64 × 256 fp32 accumulator is 128 registers a thread, and 128-row tiles keep the L2 → SM traffic at cuBLAS's
128 × 256 level (87 FLOP/B; 64-row tiles halve it, v14's 64 × 512 lesson). H = 896 wastes 12.5% of the MMA.

mbarrier protocol: ``ready[s]`` (arrival count 1, the expect + TMA bytes) completes phase n when the n-th fill of
slot s lands; step k waits parity ``(k // S) & 1``. Fill n + 1 of a slot is issued only after every thread
passed the CTA barrier that follows the wait for fill n (program order), so parities cannot alias; no ``empty``
barriers (the CTA barrier after ``warpgroup_mma_wait(1)`` is the release).
"""

from __future__ import annotations

import torch
import triton
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

__all__ = ["GradConfig", "DEFAULT", "grad_x", "choose_splits", "descriptors", "epilogue_pieces", "unit_steps", "plan"]

_LOG2E = gl.constexpr(1.4426950408889634)


class GradConfig:
    """CTA tile ``block_m`` rows (one warpgroup per 64) × ``block_n`` features, ``block_k`` classes per step, ring
    depth. No warp specialisation (see the module docstring: ptxas serialised register-A wgmma under setmaxnreg)."""

    def __init__(self, block_m=128, block_n=256, block_k=64, stages=4):
        self.block_m, self.block_n, self.block_k, self.stages = block_m, block_n, block_k, stages
        self.epi_n = 64  # output piece (columns) per TMA store
        self.num_warps = block_m // 16

    def __repr__(self):
        return f"{self.block_m}x{self.block_n}x{self.block_k} s{self.stages} w{self.num_warps}"


DEFAULT = GradConfig()


# ---------------------------------------------------------------------------------------------------------------
# device code


@gluon.jit
def _unit_coords(unit, tiles_n, splits, k_steps, steps_per_split):
    """``(pid_m, pid_n, split, first step, steps)`` of a unit: unit = tile · splits + split, tiles row-major over
    (row blocks, feature blocks): units in flight together share the z row block and the W k-slab in L2."""
    tile = unit // splits
    split = unit % splits
    k_lo = split * steps_per_split
    n = gl.minimum(k_steps - k_lo, steps_per_split)
    return tile // tiles_n, tile % tiles_n, split, k_lo, n


@gluon.jit
def _issue(j, n, k_lo, off_m, off_n, z_desc, w_desc, z_bufs, w_bufs, ready):
    """TMA loads of the unit's step j into slot j % S, completing ready[j % S], for j < n rounded up to even; the
    phantom step n of an odd unit reloads step n − 1 (in-bounds data, its dz is zeroed: see ``_dz_step``)."""
    BLOCK_K: gl.constexpr = z_desc.block_type.shape[1]
    S: gl.constexpr = z_bufs.type.shape[0]
    nbytes: gl.constexpr = z_desc.block_type.nbytes + w_desc.block_type.nbytes
    s = j % S
    pred = j < n + (n & 1)
    col = (k_lo + gl.minimum(j, n - 1)) * BLOCK_K
    bar = ready.index(s)
    mbarrier.expect(bar, nbytes, pred=pred)
    tma.async_copy_global_to_shared(z_desc, [off_m, col], bar, z_bufs.index(s), pred=pred)
    tma.async_copy_global_to_shared(w_desc, [col, off_n], bar, w_bufs.index(s), pred=pred)


@gluon.jit
def _dz_step(
    k,
    n,
    k_lo,
    off_m,
    z_desc,
    dz_desc,
    z_bufs,
    stage,
    ready,
    lse2,
    coef,
    te,
    e_coef,
    tgt_rel,
    do_store,
    PIECE: gl.constexpr,
    a_layout: gl.constexpr,
    HAS_SMOOTHING: gl.constexpr,
    STORE: gl.constexpr,
):
    """Step k's A operand: wait for slot k % S, ldmatrix the 128 x 64 z tile into wgmma's A register layout, form
    dz (fp32 math, bf16 pack), store it (STORE_DZ, units of the first feature block; staging half ``PIECE``). The
    phantom step k = n (odd units) gets dz = 0 exactly: its row coefficients are zeroed."""
    BLOCK_K: gl.constexpr = z_desc.block_type.shape[1]
    S: gl.constexpr = z_bufs.type.shape[0]
    s = k % S
    valid = k < n
    c = gl.where(valid, coef, 0.0)
    t = gl.where(valid, te, 0.0)
    mbarrier.wait(ready.index(s), (k // S) & 1)
    z = z_bufs.index(s).load(a_layout)  # ldmatrix straight into wgmma's A layout
    p = gl.exp2(z.to(gl.float32) * _LOG2E - lse2[:, None])
    cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
    on_target = cols[None, :] == (tgt_rel - k * BLOCK_K)[:, None]
    if HAS_SMOOTHING:
        sub = gl.where(on_target, t[:, None], gl.where(valid, e_coef, 0.0)[:, None])
    else:
        sub = gl.where(on_target, t[:, None], 0.0)
    dz = (c[:, None] * p - sub).to(z_desc.dtype)
    if STORE:
        if do_store & valid:  # the units of the first feature block, real steps only
            tma.store_wait(pendings=1)  # the store of step k - 2 (same half of the staging buffer) has read it
            buf = stage.index(PIECE)
            buf.store(dz)
            fence_async_shared()
            tma.async_copy_shared_to_global(dz_desc, [off_m, (k_lo + k) * BLOCK_K], buf)
    return dz


@gluon.jit
def _k_loop(
    n,
    k_lo,
    off_m,
    off_n,
    acc,
    z_desc,
    w_desc,
    dz_desc,
    z_bufs,
    w_bufs,
    stage,
    ready,
    lse2,
    coef,
    te,
    e_coef,
    tgt_rel,
    do_store,
    a_layout: gl.constexpr,
    HAS_SMOOTHING: gl.constexpr,
    STORE: gl.constexpr,
):
    """The unit's n steps (an odd n gets a zero phantom step), **unrolled by two** so that consecutive steps' dz
    are distinct values (distinct PTX registers): a step's A registers are written again only two steps later,
    after the ``warpgroup_mma_wait(1)`` that retired its wgmma. (Not unrolled, the next step's ``cvt`` wrote the
    same PTX registers as the in-flight wgmma's A operand — undefined behaviour by the PTX ISA — and the SASS
    showed FFMA/IMAD/F2FP into its A registers (R164–R179, s4 bf16 build) before the wait that retired it.)

    Step k: form dz (while step k − 1's wgmma runs on the tensor core), issue step k's async wgmma with dz as A,
    wait until only it is in flight (step k − 1 retired, in this warpgroup), CTA barrier (retired in both),
    refill step k − 1's slot with step k + S − 1."""
    S: gl.constexpr = z_bufs.type.shape[0]
    for k in range(0, n + (n & 1), 2):
        dz0 = _dz_step(
            k, n, k_lo, off_m, z_desc, dz_desc, z_bufs, stage, ready, lse2, coef, te, e_coef, tgt_rel, do_store,
            0, a_layout, HAS_SMOOTHING, STORE,
        )  # fmt: skip
        acc = warpgroup_mma(dz0, w_bufs.index(k % S), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        gl.thread_barrier()  # both warpgroups' wgmma of step k - 1 retired: its slot may be overwritten
        _issue(k + S - 1, n, k_lo, off_m, off_n, z_desc, w_desc, z_bufs, w_bufs, ready)
        dz1 = _dz_step(
            k + 1, n, k_lo, off_m, z_desc, dz_desc, z_bufs, stage, ready, lse2, coef, te, e_coef, tgt_rel, do_store,
            1, a_layout, HAS_SMOOTHING, STORE,
        )  # fmt: skip
        acc = warpgroup_mma(dz1, w_bufs.index((k + 1) % S), acc, is_async=True)
        acc, dz0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, dz0))  # step k retired: dz0 may be reused
        gl.thread_barrier()
        _issue(k + S, n, k_lo, off_m, off_n, z_desc, w_desc, z_bufs, w_bufs, ready)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return acc


@gluon.jit
def _grad_x_kernel(
    z_desc,
    w_desc,
    out_desc,
    dz_desc,
    target_ptr,
    lse_ptr,
    coef_ptr,
    n_rows,
    tiles_n,
    splits,
    k_steps,
    steps_per_split,
    out_rows_per_split,
    HAS_SMOOTHING: gl.constexpr,
    STORE_DZ: gl.constexpr,
    NUM_STAGES: gl.constexpr,
):
    """One unit per program: grad_x (or a split's fp32 partial) = dz·W over the unit's V range,
    dz = coef·exp(z − lse) − T·[c = y] − E formed in registers as wgmma's A operand."""
    BLOCK_M: gl.constexpr = z_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = z_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    EPI_N: gl.constexpr = out_desc.block_type.shape[1]
    NW: gl.constexpr = gl.num_warps()
    gl.static_assert(NW == BLOCK_M // 16, "one m64 warpgroup per 64 rows")
    gl.static_assert(w_desc.block_type.shape[0] == BLOCK_K)
    gl.static_assert(dz_desc.block_type.shape[0] == BLOCK_M)
    gl.static_assert(dz_desc.block_type.shape[1] == BLOCK_K)
    gl.static_assert(out_desc.block_type.shape[0] == BLOCK_M)
    gl.static_assert(EPI_N == BLOCK_K)
    gl.static_assert(BLOCK_N == 4 * EPI_N)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BLOCK_N, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, a_layout)

    z_bufs = gl.allocate_shared_memory(z_desc.dtype, [NUM_STAGES] + z_desc.block_type.shape, z_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES] + w_desc.block_type.shape, w_desc.layout)
    # two BLOCK_M x 64 bf16 tiles (32 KB): dz (STORE_DZ) in the K loop, then the output pieces
    stage = gl.allocate_shared_memory(dz_desc.dtype, [2] + dz_desc.block_type.shape, dz_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()

    pid_m, pid_n, split, k_lo, n = _unit_coords(gl.program_id(0), tiles_n, splits, k_steps, steps_per_split)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    for j in gl.static_range(NUM_STAGES - 1):
        _issue(j, n, k_lo, off_m, off_n, z_desc, w_desc, z_bufs, w_bufs, ready)

    offs = off_m + gl.arange(0, BLOCK_M, layout=row_layout)
    mask = offs < n_rows
    lse2 = gl.load(lse_ptr + offs, mask=mask, other=0.0) * _LOG2E
    coef = gl.load(coef_ptr + offs, mask=mask, other=0.0)
    t_coef = gl.load(coef_ptr + n_rows + offs, mask=mask, other=0.0)
    if HAS_SMOOTHING:
        e_coef = gl.load(coef_ptr + 2 * n_rows + offs, mask=mask, other=0.0)
    else:
        e_coef = gl.zeros_like(t_coef)
    te = t_coef + e_coef
    # the target relative to the unit's first class (negative targets, e.g. ignore_index, never match a column)
    target = gl.load(target_ptr + offs, mask=mask, other=-1)
    tgt_rel = gl.where(target >= 0, target - k_lo * BLOCK_K, -1).to(gl.int32)

    acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=acc_layout)
    # one K loop for every unit (a runtime branch around the dz store only: two loop copies merged through an
    # if/else made ptxas serialise the wgmma pipeline, C7515)
    acc = _k_loop(
        n,
        k_lo,
        off_m,
        off_n,
        acc,
        z_desc,
        w_desc,
        dz_desc,
        z_bufs,
        w_bufs,
        stage,
        ready,
        lse2,
        coef,
        te,
        e_coef,
        tgt_rel,
        pid_n == 0,
        a_layout,
        HAS_SMOOTHING,
        STORE_DZ,
    )

    # epilogue: four BLOCK_M x 64 pieces through the staging buffer
    out_row = split * out_rows_per_split + off_m
    a2, b2 = gl.split(acc.reshape([BLOCK_M, 2, BLOCK_N // 2]).permute(0, 2, 1))
    p0, p1 = gl.split(a2.reshape([BLOCK_M, 2, EPI_N]).permute(0, 2, 1))
    p2, p3 = gl.split(b2.reshape([BLOCK_M, 2, EPI_N]).permute(0, 2, 1))
    # p0..p3 are columns [0, 64), [64, 128), [128, 192), [192, 256) of the tile: the reshape is row-major, so the
    # first split gives columns [0, 128) and [128, 256), the second their halves (the first GPU run stored p2 at
    # +64 and p1 at +128: half of every tile's columns swapped, grad_x rel. error ~1; ``epilogue_pieces`` below is
    # the same sequence in torch, checked on the CPU by ``check_grad.py --selftest``)
    if out_desc.dtype == gl.float32:
        buf = stage._reinterpret(gl.float32, [BLOCK_M, EPI_N], out_desc.layout)
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
        tma.store_wait(pendings=0)
        stage.index(0).store(p0.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [out_row, off_n], stage.index(0))
        stage.index(1).store(p1.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [out_row, off_n + EPI_N], stage.index(1))
        tma.store_wait(pendings=1)
        stage.index(0).store(p2.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [out_row, off_n + 2 * EPI_N], stage.index(0))
        tma.store_wait(pendings=1)
        stage.index(1).store(p3.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [out_row, off_n + 3 * EPI_N], stage.index(1))
    tma.store_wait(pendings=0)
    for s in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(ready.index(s))


# ---------------------------------------------------------------------------------------------------------------
# host code


def _gl_dtype(dtype: torch.dtype):
    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]


def descriptors(z, w, out, dz_out, cfg: GradConfig = DEFAULT):
    """TMA descriptors: z (BLOCK_M, BLOCK_K), W (BLOCK_K, BLOCK_N), out (BLOCK_M, 64), dz (BLOCK_M, BLOCK_K);
    dz_out None: a descriptor of z itself (never written: the kernel is compiled without STORE_DZ).

    TMA stores write whole 16-byte chunks (triton-lang/triton#11583, H100): the dz store of the last class block
    also writes columns ``[V, ceil(V / 8)·8)`` of each row (dz of the zero-filled z there), inside the row's own
    padding (a 16-byte-aligned row stride is ≥ that), never the next row; nothing reads them."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k

    def desc(t, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t.dtype))
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)

    return (
        desc(z, [bm, bk]),
        desc(w, [bk, bn]),
        desc(out, [bm, cfg.epi_n]),
        desc(dz_out if dz_out is not None else z, [bm, bk]),
    )


def epilogue_pieces(acc: torch.Tensor, epi_n: int = 64) -> list[tuple[int, torch.Tensor]]:
    """The kernel's epilogue split in torch (same reshape / permute / split sequence, ``gl.split`` = ``unbind(-1)``):
    ``(column offset the kernel stores the piece at, piece)``, in store order. The CPU self-test checks that each
    piece is ``acc[:, off : off + epi_n]``; keep it in step with ``_grad_x_kernel``'s epilogue."""
    m, n = acc.shape
    a2, b2 = acc.reshape(m, 2, n // 2).permute(0, 2, 1).unbind(-1)
    p0, p1 = a2.reshape(m, 2, epi_n).permute(0, 2, 1).unbind(-1)
    p2, p3 = b2.reshape(m, 2, epi_n).permute(0, 2, 1).unbind(-1)
    return [(0, p0), (epi_n, p1), (2 * epi_n, p2), (3 * epi_n, p3)]


def unit_steps(unit: int, tiles_n: int, splits: int, k_steps: int, steps_per_split: int) -> list[tuple[int, int, bool]]:
    """Host mirror of a unit's schedule (``_unit_coords`` + the unrolled ``_k_loop`` + ``_issue``): per executed
    step ``(slot, class block loaded, real step)``; the CPU self-test checks that the real steps of all units of a
    tile cover ``[0, k_steps)`` once, every load is in range, and the loop runs an even number of steps."""
    tile, split = divmod(unit, splits)
    k_lo = split * steps_per_split
    n = min(k_steps - k_lo, steps_per_split)
    n2 = n + (n & 1)
    return [(k % DEFAULT.stages, k_lo + min(k, n - 1), k < n) for k in range(0, n2)]


def choose_splits(tiles: int, sms: int, k_steps: int, max_splits: int = 16, min_steps: int = 32) -> int:
    """Fewest V splits whose wave quantisation is within 3% of the best over ``1..max_splits``:
    time ∝ ceil(tiles·s / sms) / s."""
    cands = [s for s in range(1, max_splits + 1) if s == 1 or k_steps // s >= min_steps]
    cost = {s: -(-tiles * s // sms) / s for s in cands}
    best = min(cost.values())
    return min(s for s in cands if cost[s] <= best * 1.03)


def plan(r: int, h: int, v: int, sms: int, cfg: GradConfig = DEFAULT, splits: int | None = None):
    """The launch: ``(tiles_m, tiles_n, k_steps, splits, steps_per_split)``, no empty split."""
    tiles_m, tiles_n = triton.cdiv(r, cfg.block_m), triton.cdiv(h, cfg.block_n)
    k_steps = triton.cdiv(v, cfg.block_k)
    if splits is None:
        splits = choose_splits(tiles_m * tiles_n, sms, k_steps)
    steps_per_split = triton.cdiv(k_steps, splits)
    return tiles_m, tiles_n, k_steps, triton.cdiv(k_steps, steps_per_split), steps_per_split


def _check(z, w, target, lse, coefs, out, dz_out):
    r, v = z.shape
    h = w.shape[1]
    assert w.shape[0] == v and z.dtype == w.dtype == torch.bfloat16
    assert out.shape == (r, h) and out.dtype in (torch.bfloat16, torch.float32)
    assert target.shape == (r,) and target.dtype == torch.int64 and target.is_contiguous()
    assert lse.shape == (r,) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert coefs.shape == (3, r) and coefs.dtype == torch.float32 and coefs.is_contiguous()
    for t in (z, w, out) + ((dz_out,) if dz_out is not None else ()):
        assert t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    if dz_out is not None:
        assert dz_out.shape == z.shape and dz_out.dtype == z.dtype


def grad_x(
    z: torch.Tensor,
    w: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    coefs: torch.Tensor,
    smoothing: bool,
    out: torch.Tensor,
    dz_out: torch.Tensor | None = None,
    cfg: GradConfig = DEFAULT,
    splits: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = dz·W`` (bf16 or fp32), dz formed in the prologue; ``dz_out`` (r, V) bf16: also store dz.
    ``coefs`` (3, r) fp32 = coef, T, E (E read only when ``smoothing``). With ``splits > 1`` (default: by
    :func:`choose_splits`) the partial products go to an fp32 workspace ``(splits, r_pad, H)`` summed here."""
    _check(z, w, target, lse, coefs, out, dz_out)
    (r, v), h = z.shape, w.shape[1]
    if r == 0:
        return out
    sms = torch.cuda.get_device_properties(z.device).multi_processor_count
    tiles_m, tiles_n, k_steps, splits, steps_per_split = plan(r, h, v, sms, cfg, splits)
    if splits > 1:
        r_pad = tiles_m * cfg.block_m
        if workspace is None or workspace.shape != (splits, r_pad, h):
            workspace = torch.empty((splits, r_pad, h), dtype=torch.float32, device=z.device)
        dst, rows_per_split = workspace.view(splits * r_pad, h), r_pad
    else:
        dst, rows_per_split = out, 0
    zd, wd, od, dd = descriptors(z, w, dst, dz_out, cfg)
    n_units = tiles_m * tiles_n * splits
    _grad_x_kernel[(n_units,)](
        zd,
        wd,
        od,
        dd,
        target,
        lse,
        coefs,
        r,
        tiles_n,
        splits,
        k_steps,
        steps_per_split,
        rows_per_split,
        bool(smoothing),
        dz_out is not None,
        cfg.stages,
        num_warps=cfg.num_warps,
    )
    if splits > 1:
        torch.sum(workspace[:, :r], dim=0, out=out) if out.dtype == torch.float32 else out.copy_(
            workspace[:, :r].sum(0)
        )
    return out
