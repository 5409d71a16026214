r"""Triton kernels of the factored row pass (``@triton.jit`` only; no torch calls): issue 20, v16.

The idea. For a row with target ``y``, ``lse`` its logsumexp, ``coef`` and ``T`` its gradient coefficients (the
upstream gradient's share ``s``, the class weight ``w_y`` and the z-loss folded in: :func:`..common.index_rows`)::

    dz_v = coef·exp(z_v − lse) − T·[v = y]

Pick any per-row shift ``c`` known *before* the logits GEMM and write ``E_v = exp(z_v − c)``, except at the target
column, which is kept apart exactly. Then, with ``r = coef·exp(c − lse)`` and ``E'`` = ``E`` with ``E'_y = 0``::

    dz = r·E' + dz_y·e_y,     dz_y = coef·exp(c − lse) − T   (fp32)

so ``dz`` is a per-row scale times a matrix the logits GEMM's epilogue writes, plus one exact value per row. The
gradient GEMMs take the scale outside: ``grad_x = r ⊙ (E'·W) + dz_y ⊙ W_y`` and ``grad_W = E'ᵀ·(r ⊙ x)`` plus
``dz_y·x_n`` added at row ``y_n``; cuBLAS runs them on ``E'`` as it stands. No pass over the ``(rows, V)`` logits
remains: the row kernel's two sweeps (a read, then a read and a write of every logit) are gone, and the epilogue's
one exponential per logit replaces them. The target column apart is what keeps eager's accuracy: with a confident
prediction ``dz_y = coef·(p_y − 1)`` is a difference that rounded ``E_y`` and ``r ⊙ x`` would spoil, and it is the
largest entry of its row.

The shift is the target logit ``c = z_y`` (one dot product per row, :func:`_target_logit_kernel`), so that
``lse − c`` is the row's loss. The stored values stay in range as long as no logit exceeds the target logit by
more than ``CLAMP`` nats (``E ≤ e^CLAMP``; ``r ⊙ x`` stays a normal number); a tile holding such a logit is shifted
by its own maximum instead, which keeps the combined ``lse`` exact, and its row is
*refitted*: the combine recomputes that row's logits (:func:`_refit_rows`) and writes ``dz`` itself, with ``r = 1``.

Kernels, in the order a chunk runs them:

- :func:`_target_logit_kernel`: ``c_n = a·(x_n·W_y + b_y)`` (0 on ignored rows and out-of-range targets).
- :func:`_exp_logits_kernel`: ``E = exp(a·(x·Wᵀ + b) − c − o)`` through TMA descriptors, and per vocabulary tile
  and row ``l_t = o + log Σ_tile E``, the tile's logsumexp relative to ``c`` (``o`` 0, or the tile's ``max(z − c)``
  where that exceeds ``CLAMP``), summed (``l = log Σ exp(l_t)``) over the tiles of one *slot* before it is stored:
  a persistent worker handles each slot's tiles back to back (:mod:`.factored_schedule`), so a row has a few dozen
  partials, not one a tile. (A Hopper warp-specialised version of this GEMM is :mod:`.factored_gluon`.)
- :func:`_factored_combine_kernel`: ``lse = c + L + log Σ_s exp(l_s − L)`` (``L = max_s l_s``), the loss
  ``w_y·(lse − c)``, ``r``, ``dz_y`` (``E_y`` zeroed), and the refitted rows' ``dz`` (:func:`_refit_rows`).
- after cuBLAS's ``E'·W``: :func:`_input_grad_rows_kernel` (``grad_x``; either in place, the product having been
  written in the chunk's own ``grad_x`` rows after cuBLAS's ``E'ᵀ·(r ⊙ x)`` read ``r ⊙ x`` there, or with
  ``r ⊙ x`` written where ``E'·W`` was, for that GEMM to read next);
- once, after the last chunk: :func:`_target_weight_grad_kernel` (every row's ``dz_y·x`` added at its target's row
  of ``grad_W``, summed per class over the rows sorted by target).

Label smoothing ``ε`` (class weights ``w``, or ones; ``W_sum = Σ_c w_c``) adds to each kept row of ``dz`` the
rank-1 term ``−(s·ε/C)·w`` and changes ``coef`` and ``T`` (:func:`..common.index_rows`); the term is kept apart as
the target column is: the loss needs ``Σ_c w_c z_c = x·(Σ_c w_c W_c) + Σ_c w_c b_c``, one more dot product in
:func:`_target_logit_kernel`; ``grad_x`` gains ``−(s·ε/C)·Σ_c w_c W_c`` in :func:`_input_grad_rows_kernel`;
``grad_W`` gains ``−w ⊗ Σ_n (s_n·ε/C)·x_n``, added by the first chunk's weight-gradient GEMM as extra rows of its
operands (:func:`.factored.smoothing_terms`). A refitted row's ``dz`` is written without it, for the same reason.

A logit scale ``a > 0`` (``z = a·u``, ``u = x·Wᵀ + b``; the temperature ``1/a`` of RL objectives) costs nothing a
logit: the epilogue's FMA multiplies ``u`` by ``a·log2(e)`` instead of ``log2(e)`` (the row max taken on ``u`` is
``z``'s for ``a > 0``), the target logit and ``Σ_c w_c z_c`` are times ``a``, and since ``dℓ/du = a·dℓ/dz`` the
combine stores ``coef``, ``T`` and the smoothing coefficient times ``a``: ``r``, ``dz_y`` and every term after them
are then ``u``'s gradient, which the GEMMs take as before. (``a ≤ 0`` reverses the row max: the row kernel.)
"""

import triton
import triton.language as tl

from .factored_schedule import group_size_jit, tile_schedule_jit
from .softmax_gemm_kernels import _logits_tile_at

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_SMOOTHING": lambda args: args["z_sum_ptr"] is not None,
    }
)
@triton.jit
def _target_logit_kernel(
    # pointers
    x_ptr,  # (r, H)
    w_ptr,  # (V, H)
    bias_ptr,  # (V,) or None
    target_ptr,  # (r,) int64
    shift_ptr,  # (r,) fp32: z_y, 0 where the target is ignored or out of range; written
    weighted_w_ptr,  # (H,) fp32 Σ_c w_c·W_c (read with HAS_SMOOTHING)
    weighted_bias_ptr,  # () fp32 Σ_c w_c·b_c (read with HAS_SMOOTHING and HAS_BIAS)
    z_sum_ptr,  # (r,) fp32: Σ_c w_c·z_c = a·(x·(Σ_c w_c·W_c) + Σ_c w_c·b_c); written, or None (no smoothing)
    # dimensions
    n_classes,
    n_features,
    # strides
    stride_x_row,
    stride_w_row,
    # scalars
    ignore_index,
    logit_scale,  # a > 0
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per row: the target logit ``z_y = a·(x·W_y + b_y)`` and, for label smoothing, the row's
    class-weighted logit sum ``Σ_c w_c·z_c`` as one dot product with the precomputed ``Σ_c w_c·W_c``."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(target_ptr + row)
    has_class = (y != ignore_index) & (y >= 0) & (y < n_classes)
    y = tl.where(has_class, y, 0)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    acc_sum = tl.zeros((BLOCK_H,), tl.float32)
    for k in range(0, n_features, BLOCK_H):
        offs_h = k + tl.arange(0, BLOCK_H)
        mask = offs_h < n_features
        a = tl.load(x_ptr + row * stride_x_row + offs_h, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(w_ptr + y * stride_w_row + offs_h, mask=mask, other=0.0).to(tl.float32)
        acc += a * b
        if HAS_SMOOTHING:
            acc_sum += a * tl.load(weighted_w_ptr + offs_h, mask=mask, other=0.0)
    z_y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y).to(tl.float32)
    tl.store(shift_ptr + row, tl.where(has_class, logit_scale * z_y, 0.0))
    if HAS_SMOOTHING:
        z_sum = tl.sum(acc_sum, axis=0)
        if HAS_BIAS:
            z_sum += tl.load(weighted_bias_ptr)
        tl.store(z_sum_ptr + row, logit_scale * z_sum)


@triton.jit
def _exp_tile(acc, shift, offs_n, n_classes, logit_scale, CLAMP: tl.constexpr):
    """``(E, o, Σ)`` of one ``(rows, classes)`` fp32 tile of ``u = x·Wᵀ + b``, the logits ``z = a·u`` (``a > 0``):
    ``E = exp(z − c − o)`` (0 past ``V``) with ``o`` per row 0, or ``max(z − c)`` where that exceeds ``CLAMP``, and
    per row ``o`` (base 2) and ``Σ_tile E``. In base-2 units, the row max taken on ``u`` (``a > 0`` keeps the order)
    and ``o`` folded into the row's shift ``s = c·log2(e) + o``: one FMA a logit before the exponential,
    ``E = exp2(u·a·log2(e) − s)``."""
    acc = tl.where((offs_n < n_classes)[None, :], acc, -float("inf"))
    to_log2 = logit_scale * _LOG2E
    base = shift * _LOG2E
    tile_max = tl.max(acc, axis=1) * to_log2 - base
    offset = tl.where(tile_max > CLAMP * _LOG2E, tile_max, 0.0)
    e = tl.exp2(acc * to_log2 - (base + offset)[:, None])
    return e, offset, tl.sum(e, axis=1)


@triton.jit
def _add_partial(run_offset, run_sum, offset, tile_sum):
    """A slot's running ``(o, Σ)`` (base 2: the partial is ``o + log2 Σ``) with one more tile's added; ``o`` stays 0
    unless a tile was shifted by its own max (``o ≥ 0`` always, so a fresh slot starts from ``(0, 0)``)."""
    new_offset = tl.maximum(run_offset, offset)
    return new_offset, run_sum * tl.exp2(run_offset - new_offset) + tile_sum * tl.exp2(offset - new_offset)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def _exp_logits_kernel(
    # tensor descriptors and pointers
    x_desc,  # (r, H) blocks (BLOCK_M, BLOCK_K)
    w_desc,  # (V, H) blocks (BLOCK_N, BLOCK_K)
    e_desc,  # (r, V) blocks (BLOCK_M, BLOCK_N): E, written
    bias_ptr,  # (V,) or None
    shift_ptr,  # (r,) fp32
    partials_ptr,  # (slots, r) fp32: a slot's l = log Σ over its tiles' exp(l_t); written
    # dimensions
    n_rows,
    n_classes,
    n_features,
    # scalars
    logit_scale,  # a > 0
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """A persistent worker per program (:mod:`.factored_schedule`): its tiles in the schedule's order, each slot's
    partial summed over the slot's tiles in registers and stored after the last."""
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(n_classes, BLOCK_N)
    workers = tl.num_programs(0)
    run_offset = tl.zeros((BLOCK_M,), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    for tile in range(tl.program_id(0), tiles_m * tiles_n, workers):
        pid_m, pid_n, slot, last = tile_schedule_jit(tile, tiles_m, tiles_n, GROUP_M, workers)
        first_row = pid_m * BLOCK_M
        first_col = pid_n * BLOCK_N
        acc = _logits_tile_at(
            x_desc, w_desc, bias_ptr, first_row, first_col, n_classes, n_features, HAS_BIAS, BLOCK_M, BLOCK_N,
            BLOCK_K, INPUT_PRECISION,
        )  # fmt: skip
        offs_m = first_row + tl.arange(0, BLOCK_M)
        row_mask = offs_m < n_rows
        shift = tl.load(shift_ptr + offs_m, mask=row_mask, other=0.0)
        e, offset, tile_sum = _exp_tile(acc, shift, first_col + tl.arange(0, BLOCK_N), n_classes, logit_scale, CLAMP)
        e_desc.store([first_row, first_col], e.to(e_desc.dtype))
        run_offset, run_sum = _add_partial(run_offset, run_sum, offset, tile_sum)
        if last:  # the slot's logsumexp relative to c ((slots, r): rows contiguous), then a fresh slot
            partial = (run_offset + tl.log2(run_sum)) * _LN2
            tl.store(partials_ptr + slot.to(tl.int64) * n_rows + offs_m, partial, mask=row_mask)
        run_offset = tl.where(last, 0.0, run_offset)
        run_sum = tl.where(last, 0.0, run_sum)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_CLASS_WEIGHT": lambda args: args["class_weight_ptr"] is not None,
        "HAS_SMOOTHING": lambda args: args["z_sum_ptr"] is not None,
    }
)
@triton.jit
def _factored_combine_kernel(
    # pointers
    x_ptr,  # (r, H): read by the refit only
    w_ptr,  # (V, H): read by the refit only
    bias_ptr,  # (V,) or None: read by the refit only
    partials_ptr,  # (slots, r) fp32: each slot's l (the exponential GEMM's schedule: .factored_schedule)
    shift_ptr,  # (r,) fp32: c
    target_ptr,  # (r,) int64
    class_weight_ptr,  # (V,) or None
    ce_scale_ptr,  # (r,) or a scalar (stride 0): s, the cross-entropy share of the upstream gradient
    z_scale_ptr,  # (r,) or a scalar (stride 0): s_z, the z-loss share (read with HAS_Z_LOSS)
    z_sum_ptr,  # (r,) fp32 Σ_c w_c·z_c, or None (no label smoothing)
    weight_sum_ptr,  # () fp32 W_sum = Σ_c w_c (read with HAS_SMOOTHING and HAS_CLASS_WEIGHT; else C)
    e_ptr,  # (r, V): E; its target column set to 0 (rows that keep a scale), dz written over refitted rows
    loss_ptr,  # (r,) fp32; written
    lse_ptr,  # (r,) fp32; written
    scale_ptr,  # (r,) fp32: r (1 on refitted rows); written
    smooth_coef_ptr,  # (r,) fp32: label smoothing's coefficient s·ε/C (times a); written with HAS_SMOOTHING
    target_grad_ptr,  # (r,) fp32: dz_y (0 on refitted rows); written
    refit_ptr,  # (r,) int8: 1 where the row's dz was recomputed; written
    # dimensions
    n_rows,
    n_slots,  # the partials' planes (the most any row has)
    n_classes,
    n_features,
    n_workers,  # the exponential GEMM's workers W
    # strides
    stride_x_row,
    stride_w_row,
    stride_e_row,
    stride_ce,
    stride_zs,
    # scalars
    ignore_index,
    z_loss,
    label_smoothing,
    logit_scale,  # a > 0
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    CLAMP: tl.constexpr,
    TILE_M: tl.constexpr,  # the exponential GEMM's tile and group (its schedule)
    TILE_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One program per ``BLOCK_R`` rows: one read of their partials (``min(W/g, tiles)`` a row, ``g`` the row's
    group in the exponential GEMM's schedule), ``L = max_t l_t`` and ``S = Σ_t exp(l_t − L)`` kept online (``S``
    rescaled by ``exp(L_old − L_new)`` as ``L`` grows), then per row::

        lse = c + L + log S,   ℓ = w_y·(L + log S)   (lse − z_y with z_y = c),
        coef = s·w_y (+ 2λ·s_z·lse),   T = s·w_y,   r = coef·exp(c − lse),   dz_y = coef·exp(c − lse) − T

    With label smoothing ``ε`` (:func:`..common.index_rows`' math): ``ℓ = (1−ε)·w_y·(lse − z_y) + (ε/C)·(W_sum·lse −
    Σ_c w_c z_c)``, ``coef = s·((1−ε)·w_y + (ε/C)·W_sum)``, ``T = (1−ε)·s·w_y``, and the rank-1 part of ``dz``,
    ``−(s·ε/C)·w``, left to the callers (its coefficient stored): it needs no pass over ``E``.

    The target column's ``dz_y`` is kept exact in fp32 (the gradient GEMMs' callers add ``dz_y·W_y`` and
    ``dz_y·x`` themselves) and ``E_y`` is set to 0: with a confident prediction ``dz_y = coef·(p_y − 1)`` is
    a difference the GEMMs must not form from rounded terms. A row is refitted where ``L > CLAMP`` (a tile may have
    been shifted by its own max: ``E`` is not ``exp(z − c)`` there); its scale is then 1, its ``dz_y`` 0, and the
    same program writes its ``dz`` over ``E`` (:func:`_refit_rows`) — one launch a chunk less than a kernel of
    its own, whose host cost would be paid for a refit that almost never happens. Ignored rows: loss 0, scale 0.
    Out-of-range targets: NaN loss and scale (NaN gradients). With a logit scale ``a`` (``z = a·u``,
    ``u = x·Wᵀ + b``) everything above is in ``z``; ``coef``, ``T`` and the smoothing coefficient are stored times
    ``a``, so that ``r``, ``dz_y`` and the rank-1 term are ``u``'s gradient, which the GEMMs take."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    offs_t = tl.arange(0, BLOCK_T)
    tiles_m = tl.cdiv(n_rows, TILE_M)
    row_slots = tl.minimum(n_workers // group_size_jit(rows // TILE_M, tiles_m, GROUP_M), tl.cdiv(n_classes, TILE_N))
    # L starts finite (−3e38): a row whose every exponential underflowed (only an ignored row) gets S = 0, no NaN
    big_l = tl.full([BLOCK_R], -3.0e38, tl.float32)
    big_s = tl.zeros([BLOCK_R], tl.float32)
    for t0 in range(0, n_slots, BLOCK_T):
        t = t0 + offs_t
        mask = (t[:, None] < row_slots[None, :]) & row_mask[None, :]
        l_t = tl.load(partials_ptr + t.to(tl.int64)[:, None] * n_rows + rows[None, :], mask=mask, other=-float("inf"))
        new_l = tl.maximum(big_l, tl.max(l_t, axis=0))
        big_s = big_s * tl.exp2((big_l - new_l) * _LOG2E) + tl.sum(tl.exp2((l_t - new_l[None, :]) * _LOG2E), axis=0)
        big_l = new_l

    shift = tl.load(shift_ptr + rows, mask=row_mask, other=0.0)
    y = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    keep = y != ignore_index
    bad = keep & ((y < 0) | (y >= n_classes))
    has_class = keep & (bad == 0)
    y = tl.where(has_class, y, 0)
    w_y = 1.0
    if HAS_CLASS_WEIGHT:
        w_y = tl.load(class_weight_ptr + y, mask=row_mask & has_class, other=0.0).to(tl.float32)
    nan = float("nan")
    loss_rel = big_l + tl.log(big_s)  # lse − c
    # an ignored row whose every exponential underflowed has S = 0: its lse (which nothing reads) is left finite
    lse = tl.where(big_s > 0.0, shift + loss_rel, shift)
    s = tl.load(ce_scale_ptr + rows * stride_ce, mask=row_mask, other=0.0)
    s = tl.where(bad, nan, tl.where(keep, s, 0.0))
    if HAS_SMOOTHING:
        eps = label_smoothing
        weight_sum = n_classes * 1.0
        if HAS_CLASS_WEIGHT:
            weight_sum = tl.load(weight_sum_ptr)
        z_sum = tl.load(z_sum_ptr + rows, mask=row_mask, other=0.0)
        row_loss = (1.0 - eps) * w_y * loss_rel + (eps / n_classes) * (weight_sum * lse - z_sum)
        target_coef = (1.0 - eps) * s * w_y
        coef = s * ((1.0 - eps) * w_y + (eps / n_classes) * weight_sum)
        tl.store(smooth_coef_ptr + rows, logit_scale * s * (eps / n_classes), mask=row_mask)
    else:
        row_loss = w_y * loss_rel
        target_coef = s * w_y
        coef = target_coef
    loss = tl.where(bad, nan, tl.where(keep, row_loss, 0.0))
    if HAS_Z_LOSS:  # d(λ·lse²)/dz = 2λ·lse·p
        s_z = tl.load(z_scale_ptr + rows * stride_zs, mask=row_mask, other=0.0)
        coef += tl.where(keep, s_z, 0.0) * 2.0 * z_loss * lse
    # from here on the coefficients of dz with respect to u = x·Wᵀ + b: dℓ/du = a·dℓ/dz
    coef *= logit_scale
    target_coef *= logit_scale
    # 0 where coef is (an ignored row's S may underflow to 0: no 0·inf)
    scale = tl.where(coef != 0.0, coef * tl.exp2(-loss_rel * _LOG2E), coef)
    # a slot holding a tile shifted by its own max has l ≥ that max − c > CLAMP; one without, l ≤ CLAMP + log(its
    # classes): those between are refitted too (harmless, and as rare: a loss above CLAMP − log V nats or so)
    refit = has_class & (big_l > CLAMP)
    kept_scale = row_mask & has_class & (refit == 0)
    tl.store(e_ptr + rows.to(tl.int64) * stride_e_row + y, tl.zeros_like(scale).to(e_ptr.dtype.element_ty),
             mask=kept_scale)  # fmt: skip
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(scale_ptr + rows, tl.where(refit, 1.0, scale), mask=row_mask)
    tl.store(target_grad_ptr + rows, tl.where(kept_scale, scale - target_coef, 0.0), mask=row_mask)
    tl.store(refit_ptr + rows, refit.to(tl.int8), mask=row_mask)
    if tl.max(refit.to(tl.int32), axis=0) != 0:  # the common case skips it: one reduction a program
        _refit_rows(
            x_ptr, w_ptr, bias_ptr, e_ptr, rows, refit, y, coef, target_coef, n_classes, n_features, stride_x_row,
            stride_w_row, stride_e_row, logit_scale, HAS_BIAS, BLOCK_R, BLOCK_V, BLOCK_H, INPUT_PRECISION,
        )  # fmt: skip


@triton.heuristics(
    {
        "SCALE_INPUT": lambda args: args["x_ptr"] is not None,
        "HAS_SMOOTHING": lambda args: args["smooth_ptr"] is not None,
    }
)
@triton.jit
def _input_grad_rows_kernel(
    # pointers
    product_ptr,  # (r, H): E'·W; then r ⊙ x written over it (with x_ptr)
    w_ptr,  # (V, H)
    x_ptr,  # (r, H) or None
    target_ptr,  # (r,) int64
    scale_ptr,  # (r,) fp32: r
    target_grad_ptr,  # (r,) fp32: dz_y
    smooth_ptr,  # (r,) fp32: label smoothing's s·ε/C, or None
    weighted_w_ptr,  # (H,) fp32 Σ_c w_c·W_c (read with HAS_SMOOTHING)
    out_ptr,  # (r, H) grad_x rows; written
    # dimensions
    n_classes,
    n_features,
    # strides
    stride_product_row,
    stride_w_row,
    stride_x_row,
    stride_out_row,
    # meta-parameters
    SCALE_INPUT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``grad_x_n = r_n·(E'·W)_n + dz_y·W_y`` (``− (s·ε/C)·Σ_c w_c·W_c`` with label smoothing), rounded once to
    ``out``'s dtype (one program per row); with ``x``, the weight gradient's operand ``r_n·x_n`` then goes where the
    row's product was (each block is read before it is written, and no program reads another's row). The product
    row may lie in the first bytes of the row's own ``out`` row (a wider ``out``): the blocks run last to first, so
    that block ``k``'s store (bytes ``[k, k + B)·|out|``) only covers product elements ``≥ k·|out|/|product|``,
    already read."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    dz_y = tl.load(target_grad_ptr + row)
    smooth = 0.0
    if HAS_SMOOTHING:
        smooth = tl.load(smooth_ptr + row)
    y = tl.load(target_ptr + row)
    y = tl.where((dz_y != 0.0) & (y >= 0) & (y < n_classes), y, 0)
    n_blocks = tl.cdiv(n_features, BLOCK_H)
    for i in range(n_blocks):
        offs_h = (n_blocks - 1 - i) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs_h < n_features
        product = product_ptr + row * stride_product_row + offs_h
        g = scale * tl.load(product, mask=mask, other=0.0).to(tl.float32)
        g += dz_y * tl.load(w_ptr + y * stride_w_row + offs_h, mask=mask, other=0.0).to(tl.float32)  # row 0: dz_y = 0
        if HAS_SMOOTHING:
            g -= smooth * tl.load(weighted_w_ptr + offs_h, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_out_row + offs_h, g.to(out_ptr.dtype.element_ty), mask=mask)
        if SCALE_INPUT:
            xs = scale * tl.load(x_ptr + row * stride_x_row + offs_h, mask=mask, other=0.0).to(tl.float32)
            tl.store(product, xs.to(product_ptr.dtype.element_ty), mask=mask)


@triton.heuristics(
    {
        "HAS_WEIGHT_GRAD": lambda args: args["weight_grad_ptr"] is not None,
        "HAS_BIAS_GRAD": lambda args: args["bias_grad_ptr"] is not None,
    }
)
@triton.jit
def _target_weight_grad_kernel(
    # pointers
    order_ptr,  # (r,) int32: the rows sorted by target (stable)
    target_ptr,  # (r,) int64: the targets, in row order
    target_grad_ptr,  # (r,) fp32: dz_y
    x_ptr,  # (r, H)
    weight_grad_ptr,  # (V, H) or None: added to at the target rows
    bias_grad_ptr,  # (V,) fp32 or None: added to
    # dimensions
    n_rows,
    n_classes,
    n_features,
    # strides
    stride_x_row,
    stride_wg_row,
    # meta-parameters
    HAS_WEIGHT_GRAD: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``grad_W[v] += Σ_{n: y_n = v} dz_y,n·x_n`` (and ``grad_b[v] += Σ dz_y,n``): the program at the first
    sorted position of each class sums that class's rows in sorted order and adds once — one writer per class,
    no atomics, the same sums every run."""
    i = tl.program_id(0)
    y = tl.load(target_ptr + tl.load(order_ptr + i))
    prev = tl.load(target_ptr + tl.load(order_ptr + tl.maximum(i - 1, 0)))
    if ((i > 0) & (prev == y)) | (y < 0) | (y >= n_classes):
        return
    for k in range(0, n_features, BLOCK_H):
        offs_h = k + tl.arange(0, BLOCK_H)
        mask = offs_h < n_features
        acc = tl.zeros((BLOCK_H,), tl.float32)
        bias = 0.0
        j = i
        same = True
        while same:
            row = tl.load(order_ptr + j).to(tl.int64)
            dz_y = tl.load(target_grad_ptr + row)
            acc += dz_y * tl.load(x_ptr + row * stride_x_row + offs_h, mask=mask, other=0.0).to(tl.float32)
            bias += dz_y
            j += 1
            same = j < n_rows
            if same:
                same = tl.load(target_ptr + tl.load(order_ptr + j)) == y
        if HAS_WEIGHT_GRAD:
            wg_ptr = weight_grad_ptr + y * stride_wg_row + offs_h
            g = tl.load(wg_ptr, mask=mask, other=0.0).to(tl.float32) + acc
            tl.store(wg_ptr, g.to(weight_grad_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS_GRAD:
            if k == 0:
                tl.store(bias_grad_ptr + y, tl.load(bias_grad_ptr + y) + bias)


@triton.jit
def _scaled_logits_tile(x_ptr, w_ptr, bias_ptr, rows64, refit, offs_v, n_classes, n_features, stride_x_row,
                        stride_w_row, logit_scale, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``z = a·(x·Wᵀ + b)`` of the refitted rows among ``rows64`` over the classes ``offs_v`` (−inf past V)."""
    acc = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    for k in range(0, n_features, BLOCK_H):
        offs_h = k + tl.arange(0, BLOCK_H)
        h_mask = offs_h < n_features
        a = tl.load(
            x_ptr + rows64[:, None] * stride_x_row + offs_h[None, :], mask=refit[:, None] & h_mask[None, :], other=0.0
        )
        b = tl.load(
            w_ptr + offs_v.to(tl.int64)[:, None] * stride_w_row + offs_h[None, :],
            mask=(offs_v < n_classes)[:, None] & h_mask[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=offs_v < n_classes, other=0.0).to(tl.float32)[None, :]
    return tl.where((offs_v < n_classes)[None, :], logit_scale * acc, -float("inf"))


@triton.jit
def _refit_rows(x_ptr, w_ptr, bias_ptr, e_ptr, offs_r, refit, y, coef, target_coef, n_classes, n_features,
                stride_x_row, stride_w_row, stride_e_row, logit_scale, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """``dz = coef·exp(z − lse) − T·[v = y]`` (``z = a·u``; ``coef`` and ``T`` already times ``a``) of the rows
    ``offs_r`` flagged in ``refit``, written over their rows of ``E``, their logits recomputed tile by tile, twice:
    the first sweep takes each row's max ``m`` and ``Σ exp(z − m)`` online, the second writes
    ``exp((z − m) − log Σ)``. (The combine's ``lse`` would do for one sweep, but a refitted row's logits are large
    — its loss exceeds ``CLAMP`` nats — and ``z − lse`` formed from two rounded large numbers loses the digits
    eager's ``z − m`` keeps.)"""
    rows64 = offs_r.to(tl.int64)
    row_max = tl.full([BLOCK_R], -3.0e38, tl.float32)  # finite: the rows not refitted stay NaN-free
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    log2_sum = tl.zeros([BLOCK_R], tl.float32)
    for sweep in tl.static_range(2):  # 0: each row's max and sum; 1: dz
        if sweep == 1:
            log2_sum = tl.log2(row_sum)
        for v0 in range(0, n_classes, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            z = _scaled_logits_tile(
                x_ptr, w_ptr, bias_ptr, rows64, refit, offs_v, n_classes, n_features, stride_x_row, stride_w_row,
                logit_scale, HAS_BIAS, BLOCK_R, BLOCK_V, BLOCK_H, INPUT_PRECISION,
            )  # fmt: skip
            if sweep == 0:
                new_max = tl.maximum(row_max, tl.max(z, axis=1))
                row_sum = row_sum * tl.exp2((row_max - new_max) * _LOG2E) + tl.sum(
                    tl.exp2((z - new_max[:, None]) * _LOG2E), axis=1
                )
                row_max = new_max
            else:
                dz = coef[:, None] * tl.exp2((z - row_max[:, None]) * _LOG2E - log2_sum[:, None])
                dz -= tl.where(offs_v[None, :] == y[:, None], target_coef[:, None], 0.0)
                mask = refit[:, None] & (offs_v < n_classes)[None, :]
                e_out = e_ptr + rows64[:, None] * stride_e_row + offs_v[None, :]
                tl.store(e_out, dz.to(e_ptr.dtype.element_ty), mask=mask)
