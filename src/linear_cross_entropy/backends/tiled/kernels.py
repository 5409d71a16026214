r"""Triton kernels of the tiled (memory-minimal) backend (``@triton.jit`` only; no torch calls).

No ``(rows, V)`` buffer exists: every logit lives only as a ``(BLOCK_M, BLOCK_N)`` tile in registers, recomputed
from ``x`` and ``W`` whenever it is needed. With ``r = x·Wᵀ + b``, the loss's logits ``z = c·tanh(a·r/c)`` (scale
``a``, soft-cap ``c``; ``z = a·r`` uncapped) and ``lse = log Σ_c exp(z_c)``:

Forward, :func:`_partial_stats_kernel`, grid ``(vocabulary splits, row blocks)``. A program owns ``BLOCK_M`` rows
and a contiguous range of vocabulary tiles; per tile it forms ``r`` with ``tl.dot`` over ``H`` and folds it into
running per-row statistics (online softmax: ``m ← max(m, max_c z)``, ``s ← s·e^{m_old − m} + Σ e^{z − m}``), the
target logit ``z_y`` (the one tile holding ``y`` contributes it), ``Σ_c w_c z_c`` for label smoothing and, for the
metrics, ``Σ e^{z − m}·z`` (rescaled like ``s``), ``Σ z²`` and the first argmax. Each split writes its partial
statistics; the launcher combines the splits (``M = max m``, ``S = Σ s·e^{m − M}``, ``lse = M + log S``).

Backward, :func:`_tiled_backward_kernel`, one program per ``(BLOCK_M, BLOCK_N)`` tile. It recomputes ``r``, then
``dz = A·p − T·[c = y] − E·w_c`` with ``p = exp(z − lse)`` and per-row coefficients ``A, T, E`` that already hold
the upstream gradient and the reduction's share (see :mod:`.launch`), and the chain rule
``dr = dz·a·(1 − tanh²)``. The tile's contributions to both input gradients are then formed ``BLOCK_H`` features at
a time and added with atomics::

    grad_x[rows, h]  += dr · W[cols, h]          (BLOCK_M, BLOCK_N)·(BLOCK_N, BLOCK_H)
    grad_W[cols, h]  += drᵀ · x[rows, h]         (BLOCK_N, BLOCK_M)·(BLOCK_M, BLOCK_H)
    grad_b[cols]     += Σ_rows dr

Every program walks the feature blocks starting at a different one, so that tiles of one row (or column) block
running side by side do not add into the same addresses at the same time. The accumulators are either the
gradients themselves (in the input's dtype: each tile's partial sum is rounded once more) or fp32 buffers.

Sparse backward (``SPARSE``): a tile whose probabilities are all below ``sparse_eps`` and that holds no row's
target contributes ``|dz| < A·sparse_eps`` per entry; its two products and atomics are skipped (the recompute is
not). Rows whose target is outside ``[0, C)`` (and not ignored) carry NaN coefficients from the launcher.
"""

import triton
import triton.language as tl

from ..triton_math import scale_softcap


@triton.jit
def _logit_tile(
    # pointers and tensor descriptors (TMA)
    x_ptr,
    w_ptr,
    x_desc,
    w_desc,
    bias_ptr,
    # the tile: its first row and class (descriptor loads); its row and class indices clamped into range
    first_row,
    first_col,
    load_rows,
    load_cols,
    # dimensions
    n_features,
    # strides
    stride_x_row,
    stride_x_col,
    stride_w_row,
    stride_w_col,
    # scalars
    logit_scale,
    logit_softcap,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``(z, tanh)`` of the ``(BLOCK_M, BLOCK_N)`` tile: ``r = x[rows]·W[cols]ᵀ (+ b)`` in fp32, then scale/cap.

    With ``USE_TMA`` the operands come through tensor descriptors, whose loads fill rows past ``N``, classes past
    ``V`` and features past ``H`` with zeros. Otherwise rows past ``N`` and classes past ``V`` arrive clamped to the
    last one (finite copies); only a feature count that ``BLOCK_K`` does not divide (``EVEN_K`` false) needs load
    masks. Either way the callers mask the logits past ``N`` and ``V`` out.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for k in range(0, n_features, BLOCK_K):
            a = x_desc.load([first_row, k])  # (BLOCK_M, BLOCK_K)
            b = w_desc.load([first_col, k])  # (BLOCK_N, BLOCK_K)
            acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        x_tile_ptr = x_ptr + load_rows[:, None] * stride_x_row + offs_k[None, :] * stride_x_col
        w_tile_ptr = w_ptr + load_cols[None, :] * stride_w_row + offs_k[:, None] * stride_w_col
        for k in range(0, n_features, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_tile_ptr)  # (BLOCK_M, BLOCK_K)
                b = tl.load(w_tile_ptr)  # (BLOCK_K, BLOCK_N)
            else:
                k_mask = (k + offs_k) < n_features
                a = tl.load(x_tile_ptr, mask=k_mask[None, :], other=0.0)
                b = tl.load(w_tile_ptr, mask=k_mask[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            x_tile_ptr += BLOCK_K * stride_x_col
            w_tile_ptr += BLOCK_K * stride_w_col
    if HAS_BIAS:
        acc += tl.load(bias_ptr + load_cols).to(tl.float32)[None, :]
    return scale_softcap(acc, logit_scale, logit_softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)


@triton.jit
def _load_targets(target_ptr, offs_m, row_mask, n_classes):
    """The rows' class indices as int32 (V < 2^31), compared against int32 class offsets in the epilogues. Rows
    past N and targets outside ``[0, V)`` (an ignore_index of −100 among them) become −1 and match no class (the
    launcher makes an out-of-range row's loss and coefficients NaN, and an ignored row's zero)."""
    target = tl.load(target_ptr + offs_m, mask=row_mask, other=-1)
    return tl.where((target >= 0) & (target < n_classes), target, -1).to(tl.int32)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_CLASS_WEIGHT": lambda args: args["class_weight_ptr"] is not None,
    }
)
@triton.jit
def _partial_stats_kernel(
    # pointers and tensor descriptors
    x_ptr,  # (N, H)
    w_ptr,  # (V, H)
    x_desc,  # (N, H) blocks (BLOCK_M, BLOCK_K); x_ptr when not USE_TMA
    w_desc,  # (V, H) blocks (BLOCK_N, BLOCK_K); w_ptr when not USE_TMA
    bias_ptr,  # (V,)
    target_ptr,  # (N,) int64
    class_weight_ptr,  # (V,)
    partials_ptr,  # (splits, 7, N) fp32: m, Σe^{z−m}, z_y, Σw·z, Σe^{z−m}·z, Σz², argmax; written
    # dimensions
    n_rows,
    n_classes,
    n_features,
    tiles_per_split,
    # strides
    stride_x_row,
    stride_x_col,
    stride_w_row,
    stride_w_col,
    # scalars
    logit_scale,
    logit_softcap,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    METRICS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_TMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Splits vary fastest: the programs running at once share a few row blocks of x and walk W side by side, so
    # both working sets stay in L2 (with row blocks fastest, every SM streams its own x block from HBM).
    split = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < n_rows
    load_rows = tl.minimum(offs_m, n_rows - 1)
    target = _load_targets(target_ptr, offs_m, row_mask, n_classes)

    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    z_y = tl.zeros((BLOCK_M,), tl.float32)
    z_sum = tl.zeros((BLOCK_M,), tl.float32)
    pz = tl.zeros((BLOCK_M,), tl.float32)
    sq = tl.zeros((BLOCK_M,), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int64)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(n_classes, BLOCK_N))
    # With TMA loads the tile loop and _logit_tile's feature loop are software-pipelined as one (flatten): the
    # next tile's first loads are in flight during this tile's softmax epilogue (measured: benchmarks/NOTES.md,
    # tiled backend). Pointer loads run 1.8x slower flattened, so they keep the nested pipeline.
    for tile in tl.range(first_tile, last_tile, flatten=USE_TMA):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = offs_n < n_classes
        z, _ = _logit_tile(
            x_ptr, w_ptr, x_desc, w_desc, bias_ptr,
            pid_m * BLOCK_M, tile * BLOCK_N, load_rows, tl.minimum(offs_n, n_classes - 1).to(tl.int64), n_features,
            stride_x_row, stride_x_col, stride_w_row, stride_w_col, logit_scale, logit_softcap,
            HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_TMA, INPUT_PRECISION,
        )  # fmt: skip
        valid = col_mask[None, :]
        z_masked = tl.where(valid, z, -float("inf"))  # past V, z is a finite copy of class V − 1: no 0·inf
        tile_max = tl.max(z_masked, axis=1)
        m_new = tl.maximum(m, tile_max)
        rescale = tl.exp(m - m_new)
        e = tl.exp(z_masked - m_new[:, None])
        s = s * rescale + tl.sum(e, axis=1)
        z_y += tl.sum(tl.where(offs_n[None, :] == target[:, None], z, 0.0), axis=1)
        if HAS_SMOOTHING:
            if HAS_CLASS_WEIGHT:
                w = tl.load(class_weight_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)
                z_sum += tl.sum(tl.where(valid, z * w[None, :], 0.0), axis=1)
            else:
                z_sum += tl.sum(tl.where(valid, z, 0.0), axis=1)
        if METRICS:
            pz = pz * rescale + tl.sum(tl.where(valid, e * z, 0.0), axis=1)
            sq += tl.sum(tl.where(valid, z * z, 0.0), axis=1)
            tile_arg = tile * BLOCK_N + tl.argmax(z_masked, axis=1).to(tl.int64)
            arg = tl.where(tile_max > m, tile_arg, arg)  # strictly greater: the first maximal class wins
        m = m_new

    out_ptr = partials_ptr + split.to(tl.int64) * 7 * n_rows + offs_m
    tl.store(out_ptr, m, mask=row_mask)
    tl.store(out_ptr + n_rows, s, mask=row_mask)
    tl.store(out_ptr + 2 * n_rows, z_y, mask=row_mask)
    tl.store(out_ptr + 3 * n_rows, z_sum, mask=row_mask)
    tl.store(out_ptr + 4 * n_rows, pz, mask=row_mask)
    tl.store(out_ptr + 5 * n_rows, sq, mask=row_mask)
    tl.store(out_ptr + 6 * n_rows, arg.to(tl.float32), mask=row_mask)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_CLASS_WEIGHT": lambda args: args["class_weight_ptr"] is not None,
        "GRAD_X": lambda args: args["grad_x_ptr"] is not None,
        "GRAD_W": lambda args: args["grad_w_ptr"] is not None,
        "GRAD_B": lambda args: args["grad_b_ptr"] is not None,
    }
)
@triton.jit
def _tiled_backward_kernel(
    # pointers
    x_ptr,  # (N, H)
    w_ptr,  # (V, H)
    bias_ptr,  # (V,)
    target_ptr,  # (N,) int64
    class_weight_ptr,  # (V,)
    lse_ptr,  # (N,) fp32
    coef_ptr,  # (3, N) fp32: A (·p), T (at the target), E (·w_c), upstream gradient included
    grad_x_ptr,  # (N, H) accumulator, zero-initialised
    grad_w_ptr,  # (V, H) accumulator, zero-initialised
    grad_b_ptr,  # (V,) fp32 accumulator, zero-initialised
    # dimensions
    n_rows,
    n_classes,
    n_features,
    # strides
    stride_x_row,
    stride_x_col,
    stride_w_row,
    stride_w_col,
    stride_grad_x_row,
    stride_grad_w_row,
    # scalars
    logit_scale,
    logit_softcap,
    sparse_eps,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GRAD_X: tl.constexpr,
    GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks walk the vocabulary together, so the W tiles they share stay in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    blocks_n = tl.cdiv(n_classes, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # class indices in int32 (V < 2^31), pointer offsets in int64
    row_mask = offs_m < n_rows
    col_mask = offs_n < n_classes
    load_rows = tl.minimum(offs_m, n_rows - 1)
    load_cols = tl.minimum(offs_n, n_classes - 1).to(tl.int64)
    # pointer loads: TMA loads measured slower here (with the products' tiles in flight, the kernel spills)
    z, t = _logit_tile(
        x_ptr, w_ptr, x_ptr, w_ptr, bias_ptr, 0, 0, load_rows, load_cols, n_features,
        stride_x_row, stride_x_col, stride_w_row, stride_w_col, logit_scale, logit_softcap,
        HAS_BIAS, HAS_LOGIT_SCALE, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False, INPUT_PRECISION,
    )  # fmt: skip
    lse = tl.load(lse_ptr + offs_m, mask=row_mask, other=0.0)
    coef_p = tl.load(coef_ptr + offs_m, mask=row_mask, other=0.0)
    coef_target = tl.load(coef_ptr + n_rows + offs_m, mask=row_mask, other=0.0)
    target = _load_targets(target_ptr, offs_m, row_mask, n_classes)
    # the clamped copies past N and V get dz = 0 (their exp(z − 0) may overflow: select, never multiply)
    valid = row_mask[:, None] & col_mask[None, :]
    p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
    on_target = offs_n[None, :] == target[:, None]
    dz = coef_p[:, None] * p - tl.where(on_target, coef_target[:, None], 0.0)
    if HAS_SMOOTHING:
        coef_smooth = tl.load(coef_ptr + 2 * n_rows + offs_m, mask=row_mask, other=0.0)
        if HAS_CLASS_WEIGHT:
            w_c = tl.load(class_weight_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)
        else:
            w_c = tl.where(col_mask, 1.0, 0.0)
        dz -= coef_smooth[:, None] * w_c[None, :]
    if HAS_SOFTCAP:
        dz *= 1.0 - t * t
    if HAS_LOGIT_SCALE:
        dz *= logit_scale

    needed = True
    if SPARSE:
        # rows past N and ignored rows have zero coefficients: their targets do not keep a tile
        holds_target = tl.sum(tl.sum(tl.where(on_target & (coef_target[:, None] != 0.0), 1, 0), axis=1), axis=0)
        needed = (tl.max(tl.max(p, axis=1), axis=0) >= sparse_eps) | (holds_target > 0)
    if GRAD_B:
        tl.atomic_add(grad_b_ptr + offs_n, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    if GRAD_X or GRAD_W:
        if needed:
            dz_low = dz.to(x_ptr.dtype.element_ty)
            blocks_h = tl.cdiv(n_features, BLOCK_H)
            offs_bh = tl.arange(0, BLOCK_H)
            for step in range(0, blocks_h):
                # start at a different feature block per tile: fewer tiles add into one address at once
                h = ((step + pid_m + pid_n) % blocks_h) * BLOCK_H
                offs_h = h + offs_bh
                # The clamped copies' dz is zero, so their products are zero: loading the copies and adding those
                # zeros into rows N − 1 / class V − 1 is exact, and only a partial feature block needs masks.
                h_mask = True if EVEN_H else (offs_h < n_features)[None, :]
                if GRAD_X:
                    w_tile = tl.load(
                        w_ptr + load_cols[:, None] * stride_w_row + offs_h[None, :] * stride_w_col,
                        mask=h_mask,
                        other=0.0,
                    )  # (BLOCK_N, BLOCK_H)
                    part = tl.dot(dz_low, w_tile, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_H)
                    tl.atomic_add(
                        grad_x_ptr + load_rows[:, None] * stride_grad_x_row + offs_h[None, :],
                        part.to(grad_x_ptr.dtype.element_ty),
                        mask=h_mask,
                        sem="relaxed",
                    )
                if GRAD_W:
                    x_tile = tl.load(
                        x_ptr + load_rows[:, None] * stride_x_row + offs_h[None, :] * stride_x_col,
                        mask=h_mask,
                        other=0.0,
                    )  # (BLOCK_M, BLOCK_H)
                    part = tl.dot(tl.trans(dz_low), x_tile, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_H)
                    tl.atomic_add(
                        grad_w_ptr + load_cols[:, None] * stride_grad_w_row + offs_h[None, :],
                        part.to(grad_w_ptr.dtype.element_ty),
                        mask=h_mask,
                        sem="relaxed",
                    )
