r"""Triton GEMMs with the softmax fused into them (``@triton.jit`` only; no torch calls): issue 20's first step.

Per chunk of ``r`` rows, with ``z = x_c·Wᵀ + b`` rounded to the input dtype (as eager rounds its logits), ``lse``
each row's logsumexp and ``dz = coef·p − T·[c = y] − E`` (``p = exp(z − lse)``; ``coef``, ``T``, ``E`` per row, the
upstream gradient and the reduction's share included, see :func:`..common.index_rows`)::

    _logits_stats_kernel:  z (stored)  and, per (row, vocabulary tile t), m_t = max z, s_t = Σ exp(z − m_t)
                           (+ Σ z for label smoothing), z_y from the tile holding the target
    _input_grad_kernel:    grad_x = dz·W      dz formed from each loaded z tile (a GEMM prologue); optionally the
                           programs of the first feature block also store dz for a cuBLAS dzᵀ·x
    _weight_grad_kernel:   grad_W (+)= dzᵀ·x  the same prologue on the transposed tile

The row kernel's two sweeps over ``z`` disappear: the first becomes the logits GEMM's epilogue (the launcher combines
the per-tile partials, ``lse = M + log Σ_t s_t·exp(m_t − M)``), the second the gradient GEMMs' prologue. The price
is the exponential, recomputed once per feature block of each gradient GEMM (``H / BLOCK_N`` times per logit).

Every operand moves through TMA tensor descriptors (the launcher builds them): loads past ``r``, ``V`` and ``H`` read
zeros, stores past them are dropped. So no load needs a mask: a zero logit past ``V`` meets a zero row of ``W`` in
``dz·W``, its ``dz`` lands in an output row past ``V`` in ``dzᵀ·x``, and a row past ``r`` has ``coef = T = E = 0``.
Only the statistics mask the columns past ``V`` (a zero there is not a logit).
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _grouped_tile(pid, blocks_m, blocks_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)``: GROUP_M row blocks walk the column blocks together, so that the operand tiles they share
    are read from L2 while they are in flight."""
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _logits_tile(
    x_desc, w_desc, bias_ptr, n_rows, n_classes, n_features,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``(acc, pid_n, first_row, first_col)``: this program's fp32 ``(BLOCK_M, BLOCK_N)`` tile of ``x·Wᵀ + b`` in the
    grouped order."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_classes, BLOCK_N), GROUP_M)
    acc = _logits_tile_at(
        x_desc, w_desc, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, n_classes, n_features, HAS_BIAS, BLOCK_M,
        BLOCK_N, BLOCK_K, INPUT_PRECISION,
    )  # fmt: skip
    return acc, pid_n, pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _logits_tile_at(
    x_desc, w_desc, bias_ptr, first_row, first_col, n_classes, n_features,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The fp32 ``(BLOCK_M, BLOCK_N)`` tile of ``x·Wᵀ + b`` from ``(first_row, first_col)``: the logits GEMMs' shared
    main loop (here and in :mod:`.factored_kernels`)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_features, BLOCK_K):
        a = x_desc.load([first_row, k])  # (BLOCK_M, BLOCK_K)
        b = w_desc.load([first_col, k])  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        offs_n = first_col + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < n_classes, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def _logits_stats_kernel(
    # tensor descriptors and pointers
    x_desc,  # (r, H) blocks (BLOCK_M, BLOCK_K)
    w_desc,  # (V, H) blocks (BLOCK_N, BLOCK_K)
    z_desc,  # (r, V) blocks (BLOCK_M, BLOCK_N): the logits, written
    bias_ptr,  # (V,) or None
    target_ptr,  # (r,) int64
    partials_ptr,  # (3, tiles, r) fp32: m_t, s_t, Σ z (HAS_SMOOTHING); written
    z_y_ptr,  # (r,) fp32 the target logit; written by the tile holding it (untouched on other rows)
    # dimensions
    n_rows,
    n_classes,
    n_features,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    acc, pid_n, first_row, first_col = _logits_tile(
        x_desc, w_desc, bias_ptr, n_rows, n_classes, n_features, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        INPUT_PRECISION,
    )  # fmt: skip
    blocks_n = tl.cdiv(n_classes, BLOCK_N)
    offs_m = first_row + tl.arange(0, BLOCK_M)
    offs_n = first_col + tl.arange(0, BLOCK_N)
    col_mask = offs_n < n_classes
    row_mask = offs_m < n_rows
    z_low = acc.to(z_desc.dtype)
    z_desc.store([first_row, first_col], z_low)
    # The statistics see the stored (rounded) logits, as the gradient GEMMs will. One fp32 tile stays live (the
    # accumulator's registers): two would spill at 128x256 and 8 warps. Past V no class matches a target.
    z = tl.where(col_mask[None, :], z_low.to(tl.float32), -float("inf"))
    target = tl.load(target_ptr + offs_m, mask=row_mask, other=-1)
    in_tile = (target >= first_col) & (target < first_col + BLOCK_N) & (target < n_classes)
    z_y = tl.sum(tl.where(offs_n[None, :] == target[:, None], z, 0.0), axis=1)
    partial_ptr = partials_ptr + pid_n.to(tl.int64) * n_rows + offs_m  # (tiles, r) planes: rows contiguous
    plane = blocks_n.to(tl.int64) * n_rows
    if HAS_SMOOTHING:
        tl.store(partial_ptr + 2 * plane, tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1), mask=row_mask)
    m = tl.max(z, axis=1)  # (BLOCK_M,)
    tl.store(partial_ptr, m, mask=row_mask)
    tl.store(partial_ptr + plane, tl.sum(tl.exp2((z - m[:, None]) * _LOG2E), axis=1), mask=row_mask)
    tl.store(z_y_ptr + offs_m, z_y, mask=row_mask & in_tile)


@triton.jit
def _dz_tile(z, offs_c, lse2, coef, target_coef, smooth_coef, target, HAS_SMOOTHING: tl.constexpr):
    """``dz = coef·exp(z − lse) − T·[c = y] − E`` in fp32 for a ``(rows, classes)`` tile (``lse2 = lse·log2 e``)."""
    dz = coef[:, None] * tl.exp2(z.to(tl.float32) * _LOG2E - lse2[:, None])
    dz -= tl.where(offs_c[None, :] == target[:, None], target_coef[:, None], 0.0)
    if HAS_SMOOTHING:
        dz -= smooth_coef[:, None]
    return dz


@triton.jit
def _row_coefs(lse_ptr, coef_ptr, target_ptr, offs, n_rows, HAS_SMOOTHING: tl.constexpr):
    """``(lse·log2 e, coef, T, E, y)`` of the rows ``offs`` (zeros and no target past ``r``); ``coef_ptr`` holds the
    ``(3, r)`` coefficients."""
    mask = offs < n_rows
    lse2 = tl.load(lse_ptr + offs, mask=mask, other=0.0) * _LOG2E
    coef = tl.load(coef_ptr + offs, mask=mask, other=0.0)
    target_coef = tl.load(coef_ptr + n_rows + offs, mask=mask, other=0.0)
    smooth_coef = 0.0
    if HAS_SMOOTHING:
        smooth_coef = tl.load(coef_ptr + 2 * n_rows + offs, mask=mask, other=0.0)
    target = tl.load(target_ptr + offs, mask=mask, other=-1)
    return lse2, coef, target_coef, smooth_coef, target


@triton.jit
def _store_halves(out_desc, acc, row, col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr):
    """``out[row:, col:] (+)= acc`` in two ``(BLOCK_M, BLOCK_N / 2)`` halves (``out_desc``'s block): a whole fp32
    staging tile (128 KiB at 64×512) beside the pipeline's stages would not fit one SM's shared memory."""
    left, right = acc.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()
    if ACCUMULATE:
        left += out_desc.load([row, col])
        right += out_desc.load([row, col + BLOCK_N // 2])
    out_desc.store([row, col], left.to(out_desc.dtype))
    out_desc.store([row, col + BLOCK_N // 2], right.to(out_desc.dtype))


@triton.heuristics({"STORE_DZ": lambda args: args["dz_desc"] is not None})
@triton.jit
def _input_grad_kernel(
    # tensor descriptors and pointers
    z_desc,  # (r, V) blocks (BLOCK_M, BLOCK_K): the logits
    w_desc,  # (V, H) blocks (BLOCK_K, BLOCK_N)
    out_desc,  # (r, H) blocks (BLOCK_M, BLOCK_N / 2): grad_x, written
    dz_desc,  # (r, V) blocks (BLOCK_M, BLOCK_K): dz, written by the first feature block's programs; or None
    target_ptr,  # (r,) int64
    lse_ptr,  # (r,) fp32
    coef_ptr,  # (3, r) fp32: coef, T, E
    # dimensions
    n_rows,
    n_classes,
    n_features,
    # meta-parameters
    HAS_SMOOTHING: tl.constexpr,
    STORE_DZ: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows
    BLOCK_N: tl.constexpr,  # features
    BLOCK_K: tl.constexpr,  # classes per step
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_features, BLOCK_N), GROUP_M)
    first_row = pid_m * BLOCK_M
    first_feature = pid_n * BLOCK_N
    offs_m = first_row + tl.arange(0, BLOCK_M)
    lse2, coef, target_coef, smooth_coef, target = _row_coefs(
        lse_ptr, coef_ptr, target_ptr, offs_m, n_rows, HAS_SMOOTHING
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_classes, BLOCK_K):
        z = z_desc.load([first_row, k])  # (BLOCK_M, BLOCK_K)
        offs_c = k + tl.arange(0, BLOCK_K)
        dz = _dz_tile(z, offs_c, lse2, coef, target_coef, smooth_coef, target, HAS_SMOOTHING).to(z.dtype)
        if STORE_DZ:
            if pid_n == 0:
                dz_desc.store([first_row, k], dz)
        w = w_desc.load([k, first_feature])  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(dz, w, acc, input_precision=INPUT_PRECISION)
    _store_halves(out_desc, acc, first_row, first_feature, BLOCK_M, BLOCK_N, False)


@triton.jit
def _weight_grad_kernel(
    # tensor descriptors and pointers
    z_desc,  # (r, V) blocks (BLOCK_K, BLOCK_M): the logits
    x_desc,  # (r, H) blocks (BLOCK_K, BLOCK_N)
    out_desc,  # (V, H) blocks (BLOCK_M, BLOCK_N / 2): grad_W or the fp32 scratch, written (added to under ACCUMULATE)
    target_ptr,  # (r,) int64
    lse_ptr,  # (r,) fp32
    coef_ptr,  # (3, r) fp32: coef, T, E
    # dimensions
    n_rows,
    n_classes,
    n_features,
    # meta-parameters
    HAS_SMOOTHING: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # classes
    BLOCK_N: tl.constexpr,  # features
    BLOCK_K: tl.constexpr,  # rows per step
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(n_classes, BLOCK_M), tl.cdiv(n_features, BLOCK_N), GROUP_M)
    first_col = pid_m * BLOCK_M
    first_feature = pid_n * BLOCK_N
    offs_c = first_col + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_rows, BLOCK_K):
        offs_r = k + tl.arange(0, BLOCK_K)
        lse2, coef, target_coef, smooth_coef, target = _row_coefs(
            lse_ptr, coef_ptr, target_ptr, offs_r, n_rows, HAS_SMOOTHING
        )
        z = z_desc.load([k, first_col])  # (BLOCK_K, BLOCK_M)
        dz = _dz_tile(z, offs_c, lse2, coef, target_coef, smooth_coef, target, HAS_SMOOTHING).to(z.dtype)
        x = x_desc.load([k, first_feature])  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(dz.T, x, acc, input_precision=INPUT_PRECISION)
    _store_halves(out_desc, acc, first_col, first_feature, BLOCK_M, BLOCK_N, ACCUMULATE)
