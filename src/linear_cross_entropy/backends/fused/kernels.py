r"""Triton kernels of the fused backend (``@triton.jit`` only; no torch calls).

The fused backend keeps cuBLAS for the three GEMMs and puts all cross-entropy arithmetic in one pass between them.
Per chunk of ``r`` rows, with ``z = x_c·Wᵀ`` the chunk's logits (written by cuBLAS into a reused buffer)::

    _cross_entropy_rows_kernel:   z + b  →  lse, ℓ (per row)  and  dz = s·∂ℓ/∂z  (into the buffer, in place)

(with logit scale ``a`` and soft-capping ``c`` the loss sees ``c·tanh(a·(x·Wᵀ + b)/c)`` and the written gradient
carries the chain rule's ``a·(1 − tanh²)``; the z-loss adds ``s_z·2λ·lse·p``).

then ``grad_x_c = dz·W`` and ``grad_W += dzᵀ·x_c`` read ``dz`` straight from the buffer. With ``z = x·Wᵀ + b``,
``lse = log Σ_c exp(z_c)``, ``p = exp(z − lse)``, label smoothing ``ε``, class weights ``w`` (``W_sum = Σ_c w_c``),
``m = [y ≠ ignore_index]`` and ``s`` the row's share of the upstream gradient::

    ℓ      = m·[(1−ε)·w_y·(lse − z_y) + (ε/C)·(W_sum·lse − Σ_c w_c·z_c)]
    ∂ℓ/∂z  = m·[((1−ε)·w_y + (ε/C)·W_sum)·p − (1−ε)·w_y·e_y − (ε/C)·w]

One program owns one row and reads it twice: an online max / sum-exp sweep (with the target logit and, for
smoothing, the weighted logit sum), then a sweep that writes ``dz``. Measured on an H100 (benchmarks/NOTES.md), one
program per row runs at ~3.2 TB/s counting both reads and the write; a persistent grid sized to keep the rows in
flight inside L2 (so that the second read would hit it) ran 1.1–1.9× slower: too few loads in flight. Instead the
first sweep's loads ask L2 to keep the row (``evict_last``) and the second sweep's loads and stores mark it done
(``evict_first``), so that more of the second read hits L2 while the rows in flight still fill the GPU.
Rows whose target is outside ``[0, C)`` (and not ignored) get a NaN loss and NaN gradients instead of a host check.

Vocabulary parallel (a rank holds the columns ``[class_offset, class_offset + C_local)`` of a ``C``-class head): the
same kernel runs its two sweeps as two launches (``PHASE`` 1 and 2) with the ranks' per-row partial sums combined
between them on the host (``chunks.py``); the unsharded call is ``class_offset = 0``, ``C_local = C``.
"""

import triton
import triton.language as tl

from ..triton_math import scale_softcap


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_CLASS_WEIGHT": lambda args: args["class_weight_ptr"] is not None,
        "METRICS": lambda args: args["stats_ptr"] is not None or args["argmax_ptr"] is not None,
        "COMPUTE_GRAD": lambda args: args["grad_ptr"] is not None,
        "STORE_COEFS": lambda args: args["PHASE"] == 0 and args["coef_ptr"] is not None,
        "ENTROPY_GRAD": lambda args: args["entropy_ptr"] is not None,
    }
)
@triton.jit
def _cross_entropy_rows_kernel(
    # pointers (None where a launch has no such tensor: the heuristics above turn that into the HAS_* switches)
    logits_ptr,  # (r, C) GEMM output r = x·Wᵀ without bias; read
    grad_ptr,  # (r, C) dr; written (may alias logits_ptr); None: loss only
    bias_ptr,  # (C,) or None
    target_ptr,  # (r,) int64, global class indices
    class_weight_ptr,  # (C,) or None
    row_scale_ptr,  # (r,) or a scalar (stride 0): s, the cross-entropy share of the upstream gradient per row
    z_scale_ptr,  # (r,) or a scalar (stride 0): s_z, the z-loss share
    loss_ptr,  # (r,) fp32 per-row cross entropy; written
    lse_ptr,  # (r,) fp32 per-row logsumexp; written (PHASE 0), read (PHASE 2)
    stats_ptr,  # (r, 5) fp32 max logit, entropy, logit norm, correct, log p_y; written with METRICS
    partial_ptr,  # (r, 7) fp32 per-row partial sums over this slice's columns; written (PHASE 1)
    argmax_ptr,  # (r,) int64 global index of the slice's first maximal class; written (PHASE 1 with METRICS)
    coef_ptr,  # (r, 3) fp32 coef, target_coef, smooth_coef of dz; read (PHASE 2), written (PHASE 0, STORE_COEFS)
    entropy_ptr,  # (r,) fp32 the rows' entropies H (0 where ignored); read with ENTROPY_GRAD
    entropy_grad_ptr,  # (r,) fp32 g_H, the upstream gradient of each row's entropy; read with ENTROPY_GRAD
    # dimensions
    n_classes,  # C_local: the columns of logits this launch sees
    n_loaded,  # >= C_local: columns loaded and stored (the rest up to it are the rows' padding: masked out of the math)
    total_classes,  # C: the whole vocabulary (n_classes when not sharded)
    # strides
    stride_logits_row,
    stride_grad_row,
    stride_row_scale,
    stride_z_scale,
    # scalars
    class_offset,  # the global index of column 0 (0 when not sharded)
    ignore_index,
    label_smoothing,
    logit_scale,
    logit_softcap,
    z_loss,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    METRICS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,  # sweep 2 runs (always with PHASE 2, never with PHASE 1)
    STORE_COEFS: tl.constexpr,  # PHASE 0 also writes dz's coefficients, for a later PHASE 2 over other columns
    PHASE: tl.constexpr,  # 0: both sweeps; 1: sweep 1 → partials; 2: sweep 2 from the global statistics
    ENTROPY_GRAD: tl.constexpr,  # sweep 2 adds g_H·∂H/∂z (PHASE 0 or 2, with COMPUTE_GRAD)
    BLOCK_C: tl.constexpr,
):
    """``PHASE`` 0 (unsharded): both sweeps in one launch, as the module docstring says. A vocabulary-parallel
    call splits them around the host's combine over the ranks (see ``chunks.py``):

    - ``PHASE`` 1: sweep 1 over this slice's columns only, and its per-row partials (``m_r`` the slice's max)::

          [m_r, Σ exp(z − m_r), z_y, w_y, Σ w_c·z_c, Σ exp(z − m_r)·z, Σ z²]

      with ``z_y``, ``w_y`` 0 where the target is not in ``[class_offset, class_offset + C_local)``; with METRICS
      also the slice's first argmax as a global index.
    - ``PHASE`` 2: sweep 2 only, given the row's global ``lse`` and ``dz = coef·p − target_coef·e_y −
      smooth_coef·w`` (``p = exp(z − lse)``), the target column tested on the local index ``y − class_offset``.

    The vocabulary-major weight-gradient pass (``vocab_major.py``) reuses ``PHASE`` 2 on column blocks of
    an unsharded head: ``PHASE`` 0 with ``STORE_COEFS`` leaves each row's three coefficients for it.

    ``ENTROPY_GRAD`` (per-token entropies with gradients, :mod:`linear_cross_entropy.log_probs`): with ``g_H`` the
    row's upstream gradient of its entropy ``H = lse − Σ p·z``, ``∂(g_H·H)/∂z = −g_H·p⊙(log p + H)``, so sweep 2
    writes ``dz = p·(coef − g_H·H − g_H·log p) − target_coef·e_y − smooth_coef·w`` (``log p = z − lse``): one more
    per-row coefficient, no extra pass. The stored coefficients (``STORE_COEFS``) leave the entropy out; ``PHASE``
    2 adds it from the same two per-row inputs.
    """
    # One program per row; the row index is int64 because row · stride overflows int32 past 2^31 logits.
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    logits_row_ptr = logits_ptr + row * stride_logits_row

    target = tl.load(target_ptr + row)
    keep = target != ignore_index
    in_range = (target >= 0) & (target < total_classes)
    bad = keep & (in_range == 0)
    y = target - class_offset  # the target's local column
    in_slice = keep & (y >= 0) & (y < n_classes)
    y = tl.where(in_slice, y, 0)
    eps = label_smoothing
    nan = float("nan")

    if PHASE != 2:
        # Sweep 1: running max m and sum-exp s (scalars, rescaled per tile); Σ w_c·z_c and Σ w_c for smoothing;
        # for the metrics Σ exp(z − m)·(z − m) (moved to each new max and rescaled like s), Σ z² and the first argmax.
        # Relative to the max, the entropy log s − Σ p·(z − m) cancels no lse against Σ p·z (4.6x plain fp32's error
        # at 13×8×203 when taken as lse − Σ p·z).
        m = -float("inf")
        s = 0.0
        z_sum = 0.0
        w_sum = 0.0
        pz = 0.0
        sq = 0.0
        best = -float("inf")
        arg = 0
        for start in range(0, n_classes, BLOCK_C):
            cols = start + offs_c
            mask = cols < n_classes
            r = tl.load(logits_row_ptr + cols, mask=cols < n_loaded, other=0.0, eviction_policy="evict_last")
            r = r.to(tl.float32)
            if HAS_BIAS:
                r += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z, _ = scale_softcap(r, logit_scale, logit_softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
            z = tl.where(mask, z, -float("inf"))  # select: the padding may hold anything, NaN included
            tile_max = tl.max(z, axis=0)
            m_new = tl.maximum(m, tile_max)
            rescale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            if METRICS:  # moved to m_new: Σ e'·(z − m_new) = rescale·(Σ e·(z − m) + (m − m_new)·Σ e)
                pz = (pz + tl.where(s > 0, (m - m_new) * s, 0.0)) * rescale
                pz += tl.sum(tl.where(mask, e * (z - m_new), 0.0), axis=0)
                sq += tl.sum(tl.where(mask, z * z, 0.0), axis=0)
                tile_arg = start + tl.argmax(z, axis=0)
                arg = tl.where(tile_max > best, tile_arg, arg)
                best = tl.maximum(best, tile_max)
            s = s * rescale + tl.sum(e, axis=0)
            m = m_new
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    w = tl.load(class_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    z_sum += tl.sum(tl.where(mask, w * z, 0.0), axis=0)
                    w_sum += tl.sum(w, axis=0)
                else:
                    z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        if HAS_SMOOTHING and not HAS_CLASS_WEIGHT:
            w_sum = total_classes * 1.0

        r_y = tl.load(logits_row_ptr + y).to(tl.float32)
        if HAS_BIAS:
            r_y += tl.load(bias_ptr + y).to(tl.float32)
        z_y, _ = scale_softcap(r_y, logit_scale, logit_softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
        if HAS_CLASS_WEIGHT:
            w_y = tl.load(class_weight_ptr + y).to(tl.float32)
        else:
            w_y = 1.0

        if PHASE == 1:
            partial_row_ptr = partial_ptr + row * 7
            tl.store(partial_row_ptr + 0, m)
            tl.store(partial_row_ptr + 1, s)
            tl.store(partial_row_ptr + 2, tl.where(in_slice, z_y, 0.0))
            tl.store(partial_row_ptr + 3, tl.where(in_slice, w_y, 0.0))
            tl.store(partial_row_ptr + 4, z_sum)
            tl.store(partial_row_ptr + 5, pz + m * s)  # Σ exp(z − m_r)·z
            tl.store(partial_row_ptr + 6, sq)
            if METRICS:
                tl.store(argmax_ptr + row, arg.to(tl.int64) + class_offset)
        else:
            log_s = tl.log(s)
            lse = m + log_s
            loss = (1.0 - eps) * w_y * ((m - z_y) + log_s)
            if HAS_SMOOTHING:
                loss += (eps / total_classes) * (w_sum * lse - z_sum)
            loss = tl.where(keep, loss, 0.0)
            loss = tl.where(bad, nan, loss)
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, lse)
            if METRICS:
                stats_row_ptr = stats_ptr + row * 5
                tl.store(stats_row_ptr + 0, m)
                tl.store(stats_row_ptr + 1, log_s - pz / s)  # entropy = log s − Σ p·(z − m)
                tl.store(stats_row_ptr + 2, tl.sqrt(sq))
                tl.store(stats_row_ptr + 3, tl.where(arg == target, 1.0, 0.0))
                tl.store(stats_row_ptr + 4, z_y - lse)

            if COMPUTE_GRAD or STORE_COEFS:
                row_scale = tl.load(row_scale_ptr + row * stride_row_scale).to(tl.float32)
                row_scale = tl.where(keep, row_scale, 0.0)
                row_scale = tl.where(bad, nan, row_scale)
                coef = row_scale * (1.0 - eps) * w_y
                if HAS_SMOOTHING:
                    coef += row_scale * (eps / total_classes) * w_sum
                if HAS_Z_LOSS:  # d(λ·lse²)/dz = 2λ·lse·p
                    z_scale = tl.load(z_scale_ptr + row * stride_z_scale).to(tl.float32)
                    coef += tl.where(keep, z_scale, 0.0) * 2.0 * z_loss * lse
                target_coef = row_scale * (1.0 - eps) * w_y
                smooth_coef = row_scale * (eps / total_classes)
                if STORE_COEFS:
                    tl.store(coef_ptr + row * 3 + 0, coef)
                    tl.store(coef_ptr + row * 3 + 1, target_coef)
                    tl.store(coef_ptr + row * 3 + 2, smooth_coef)
    else:  # the global statistics the host combined
        lse = tl.load(lse_ptr + row)
        coef = tl.load(coef_ptr + row * 3 + 0)
        target_coef = tl.load(coef_ptr + row * 3 + 1)
        smooth_coef = tl.load(coef_ptr + row * 3 + 2)

    if COMPUTE_GRAD:  # PHASE 0 with gradients, or PHASE 2
        # Sweep 2: dz = coef·p − target_coef·e_y − smooth_coef·w, then dr = dz·a·(1 − tanh²), written over the
        # logits just read. The target column is this slice's only where the target lies in it.
        if ENTROPY_GRAD:  # −g_H·p⊙(log p + H): −g_H·H joins coef, −g_H multiplies p·log p
            entropy_coef = tl.where(keep, -tl.load(entropy_grad_ptr + row).to(tl.float32), 0.0)
            coef += entropy_coef * tl.load(entropy_ptr + row).to(tl.float32)
        y_col = tl.where(in_slice, y, -1)
        grad_row_ptr = grad_ptr + row * stride_grad_row
        for start in range(0, n_classes, BLOCK_C):
            cols = start + offs_c
            mask = cols < n_classes
            wide = cols < n_loaded
            r = tl.load(logits_row_ptr + cols, mask=wide, other=0.0, eviction_policy="evict_first")
            r = r.to(tl.float32)
            if HAS_BIAS:
                r += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z, t = scale_softcap(r, logit_scale, logit_softcap, HAS_LOGIT_SCALE, HAS_SOFTCAP)
            if ENTROPY_GRAD:
                log_p = z - lse
                dz = tl.exp(log_p) * (coef + entropy_coef * log_p)
            else:
                dz = coef * tl.exp(z - lse)
            dz -= tl.where(cols == y_col, target_coef, 0.0)
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    dz -= smooth_coef * tl.load(class_weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    dz -= smooth_coef
            if HAS_SOFTCAP:
                dz *= 1.0 - t * t
            if HAS_LOGIT_SCALE:
                dz *= logit_scale
            tl.store(grad_row_ptr + cols, dz.to(grad_ptr.dtype.element_ty), mask=wide, eviction_policy="evict_first")


@triton.jit
def _scale_cast_kernel(
    # pointers
    src_ptr,  # (numel,) e.g. the fp32 weight-gradient scratch
    scale_ptr,  # () upstream gradient
    dst_ptr,  # (numel,) e.g. the gradient in the parameter's dtype; written (may be src_ptr)
    # dimensions
    numel,
    # meta-parameters
    IN_PLACE: tl.constexpr,  # dst is src: nothing to do where scale == 1
    BLOCK: tl.constexpr,
):
    """``dst = src · scale`` rounded once to dst's dtype: a gradient scaled by the upstream gradient in one pass
    (the weight gradient leaving its fp32 scratch, or a gradient scaled in place).

    In place, an upstream gradient of exactly 1 (``loss.backward()`` of a mean or sum) masks every access off, so
    the launch moves no bytes: the test runs on the device, with no host sync."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr).to(tl.float32)
    limit = numel
    if IN_PLACE:
        limit = tl.where(scale != 1.0, numel, 0)
    mask = offs < limit
    value = tl.load(src_ptr + offs, mask=mask, other=0.0) * scale
    tl.store(dst_ptr + offs, value.to(dst_ptr.dtype.element_ty), mask=mask)
