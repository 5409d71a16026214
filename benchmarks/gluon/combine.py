r"""The Gluon stats GEMM's per-(128-class tile, row) partials → each row's loss, lse and ``dz``'s coefficients, in
exactly the format the fused backend's sweep-2-only row kernel (``rows.cross_entropy_grad``) reads: ``lse (r,)``
fp32 and ``coefs (r, 3)`` fp32 contiguous (``coef, target_coef, smooth_coef``, :class:`common.GradCoefs`), as
``chunks._sharded_rows`` builds them after ``cross_entropy_partials`` and the all-reduce.

Two ways, the same math (``partials.combine_partials`` over the tiles, then ``common.index_rows``)::

    M = max_t m_t,  S = Σ_t s_t·exp(m_t − M),  lse = M + log S
    ℓ = keep·[(1−ε)·((M − z_y) + log S) + (ε/C)·(C·lse − Σ_t Σz_t)]
    coef = s·((1−ε) + (ε/C)·C) (+ s_z·2λ·lse),  target_coef = (1−ε)·s,  smooth_coef = s·ε/C   (s = 0 if ignored)

- :func:`combine_torch`: the library's own functions (``combine_partials`` over ``SPLITS``, ``index_rows``, one
  ``stack`` into ``(r, 3)``): ~20 small torch launches, several passes over the ``(tiles, r)`` planes.
- :func:`combine_triton`: one launch of :func:`_combine_kernel`, one read of the planes (online max / rescaled sum
  over blocks of tiles, ``BLOCK_R`` rows a program, rows contiguous in the planes).

Index targets, no class weights, no metrics, no logit scale / soft-cap (what the stats GEMM covers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linear_cross_entropy.backends.common import LossParams, index_rows
from linear_cross_entropy.backends.partials import SPLITS, Partials, combine_partials

__all__ = ["combine_torch", "combine_triton"]


def _check(partials, z_y, target, lp: LossParams, coefs_out):
    _, tiles, r = partials.shape
    assert partials.shape[0] == 3 and partials.is_contiguous() and partials.dtype == torch.float32
    assert z_y.shape == (r,) and target.shape == (r,) and target.is_contiguous()
    assert coefs_out.shape == (r, 3) and coefs_out.stride() == (3, 1)
    assert not lp.target_is_probs and not lp.metrics and lp.logit_scale == 1.0 and not lp.logit_softcap


def combine_torch(partials, z_y, target, lp: LossParams, num_classes: int, shares, loss_out, lse_out, coefs_out):
    """``partials (3, tiles, r)``, ``z_y (r,)`` (unwritten on ignored rows) → ``loss_out``, ``lse_out`` (r,) and
    ``coefs_out`` (r, 3), through the library's combine (as ``chunks._sharded_rows``)."""
    _check(partials, z_y, target, lp, coefs_out)
    m, s, z_sum = partials.unbind(0)  # (tiles, r) each
    parts = Partials(m, s, z_y[None], None, z_sum if lp.label_smoothing > 0 else None, None, None, None)
    sums = combine_partials(parts, SPLITS)
    loss, lse, _, coefs = index_rows(sums, target, float(num_classes), lp, num_classes, shares[0], shares[1])
    loss_out.copy_(loss)
    lse_out.copy_(lse)
    torch.stack(coefs, dim=1, out=coefs_out)


@triton.jit
def _combine_kernel(
    partials_ptr,  # (3, tiles, r) fp32: m_t, s_t, Σz_t
    z_y_ptr,  # (r,) fp32 (read where the target is a class)
    target_ptr,  # (r,) int64
    ce_scale_ptr,  # (r,) or stride 0: s
    z_scale_ptr,  # (r,) or stride 0: s_z (read with HAS_Z_LOSS)
    loss_ptr,  # (r,) fp32, written
    lse_ptr,  # (r,) fp32, written
    coefs_ptr,  # (r, 3) fp32, written
    n_rows,
    n_tiles,
    plane,  # tiles·r: the distance between the planes
    stride_ce,
    stride_zs,
    num_classes,
    ignore_index,
    one_minus_eps,  # (1 − ε)·w_y with w_y = 1
    eps_over_c,  # ε/C
    w_sum,  # C (as a float)
    coef_base,  # (1 − ε) + (ε/C)·C, as index_rows forms it on the host
    two_z_loss,  # 2λ
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    offs_t = tl.arange(0, BLOCK_T)
    big_m = tl.full([BLOCK_R], -float("inf"), tl.float32)
    big_s = tl.zeros([BLOCK_R], tl.float32)
    z_sum = tl.zeros([BLOCK_R], tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + offs_t
        mask = (t < n_tiles)[:, None] & row_mask[None, :]
        offs = t.to(tl.int64)[:, None] * n_rows + rows[None, :]
        m_t = tl.load(partials_ptr + offs, mask=mask, other=-float("inf"))
        s_t = tl.load(partials_ptr + plane + offs, mask=mask, other=0.0)
        m_new = tl.maximum(big_m, tl.max(m_t, axis=0))  # finite on real rows from the first block on
        big_s = big_s * tl.exp(big_m - m_new) + tl.sum(s_t * tl.exp(m_t - m_new[None, :]), axis=0)
        big_m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.load(partials_ptr + 2 * plane + offs, mask=mask, other=0.0), axis=0)

    target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    keep = target != ignore_index
    bad = keep & ((target < 0) | (target >= num_classes))
    z_y = tl.load(z_y_ptr + rows, mask=row_mask & keep & (bad == 0), other=0.0)
    log_s = tl.log(big_s)
    lse = big_m + log_s
    loss = one_minus_eps * ((big_m - z_y) + log_s)
    if HAS_SMOOTHING:
        loss += eps_over_c * (w_sum * lse - z_sum)
    nan = float("nan")
    loss = tl.where(bad, nan, tl.where(keep, loss, 0.0))
    s = tl.load(ce_scale_ptr + rows * stride_ce, mask=row_mask, other=0.0)
    s = tl.where(bad, nan, tl.where(keep, s, 0.0))
    coef = s * coef_base
    if HAS_Z_LOSS:
        s_z = tl.load(z_scale_ptr + rows * stride_zs, mask=row_mask, other=0.0)
        coef += tl.where(keep, s_z, 0.0) * two_z_loss * lse
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(coefs_ptr + rows * 3 + 0, coef, mask=row_mask)
    tl.store(coefs_ptr + rows * 3 + 1, one_minus_eps * s, mask=row_mask)
    tl.store(coefs_ptr + rows * 3 + 2, s * eps_over_c, mask=row_mask)


def combine_meta(lp: LossParams, num_classes: int) -> dict:
    """The scalar arguments of :func:`_combine_kernel`, formed on the host as ``index_rows`` forms them."""
    eps = lp.label_smoothing if lp.label_smoothing > 0 else 0.0
    return dict(
        one_minus_eps=(1.0 - eps) * 1.0, eps_over_c=eps / num_classes, w_sum=float(num_classes),
        coef_base=(1.0 - eps) * 1.0 + (eps / num_classes) * float(num_classes), two_z_loss=2.0 * lp.z_loss,
        HAS_SMOOTHING=eps > 0, HAS_Z_LOSS=lp.z_loss > 0,
    )  # fmt: skip


def combine_triton(
    partials,
    z_y,
    target,
    lp: LossParams,
    num_classes: int,
    shares,
    loss_out,
    lse_out,
    coefs_out,
    block_r: int = 16,
    block_t: int = 64,
    num_warps: int = 4,
):
    """As :func:`combine_torch`, in one launch (``cdiv(r, block_r)`` programs)."""
    _check(partials, z_y, target, lp, coefs_out)
    _, tiles, r = partials.shape
    if r == 0:
        return
    ce, zs = shares
    assert ce.dim() == 1 and zs.dim() == 1 and lse_out.stride() == (1,) and loss_out.stride() == (1,)
    _combine_kernel[(triton.cdiv(r, block_r),)](
        partials, z_y, target, ce, zs, loss_out, lse_out, coefs_out, r, tiles, tiles * r, ce.stride(0),
        zs.stride(0),
        num_classes, lp.ignore_index, **combine_meta(lp, num_classes), BLOCK_T=block_t, BLOCK_R=block_r,
        num_warps=num_warps,
    )  # fmt: skip
