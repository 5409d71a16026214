"""The fused backend's autograd Function: saves, calls launchers, no math.

Forward runs :func:`fused_sweep` once; for the scalar reductions it also produces the gradients for an upstream
gradient of 1, which backward scales (the fp32 accumulators of ``"balanced"``/``"accurate"``, when they exist, are
rounded once in that same pass). When the whole batch is one chunk, forward stops after the row kernel's first
sweep and backward runs its second with the upstream gradient ``g`` folded into each row's coefficients, then the
two gradient GEMMs: every gradient is rounded once, as eager's, and no ``(V, H)`` gradient is scaled.
``reduction="none"`` recomputes in backward with the per-row upstream gradient. With small chunks
(``ro.recompute_weight_grad``) forward forms only ``grad_x`` (and each row's ``lse`` and ``dz`` coefficients);
backward runs the vocabulary-major pass that recomputes the logits for the weight and bias gradients, with ``g``
folded into the coefficients.

Vocabulary parallel (a ``shard``, :mod:`...distributed`): the same, with the sweep combining per-row statistics over
the group; ``grad_input`` is all-reduced where it is formed (in forward, or in backward for a single chunk and for
``"none"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...options import ResolvedOptions
from ..common import Grads, LossParams, keep_mask, reduce_total, row_scales, take_saved_grads
from .launch import accumulator_dtypes, deferred_grads, fused_sweep, scale_cast, weight_grad_sweep

if TYPE_CHECKING:
    from ...distributed import VocabShard

__all__ = ["linear_cross_entropy_fused", "forward_pass", "backward_none", "blas_ready", "saved_grad_dtypes"]


def forward_pass(
    x,
    w,
    b,
    target,
    class_weight,
    lp: LossParams,
    ro: ResolvedOptions,
    grads: Grads,
    defer: bool,
    shard=None,
    weight_grad_later: bool = False,
    need_lse: bool = True,
    scaled_later: bool = True,
):
    """``(loss, lse (N, 1), stats (N, 1, 5) or None, saved)``: ``saved`` is the gradients for an upstream gradient
    of 1 (possibly still fp32 accumulators), ``(logits, lse, coefs)`` for :func:`deferred_grads` when ``defer``
    (for ``"none"`` too: the coefficients of a per-row upstream gradient of 1), else None for ``"none"``.

    With ``ro.recompute_weight_grad`` the weight and bias gradients come from the vocabulary-major pass; with
    ``weight_grad_later`` that pass is left to backward, and ``saved`` is ``(grad_x, lse, coefs)`` for it.
    Without ``need_lse`` (and without metrics or a z-loss) ``lse`` is empty ``(0, 1)`` and the scalar reductions
    hold nothing per row beyond one chunk (what the caller returns only for metrics). ``scaled_later``: the
    caller scales the gradients by the upstream gradient before rounding them (so ``grad_input`` may stay in fp32
    under the policy); off for a caller that takes them in the input dtype at once."""
    keep = keep_mask(target[:, None], lp) if lp.z_loss else None  # reduce_total reads it for the z-loss only
    if lp.reduction == "none":
        shares = None
        if defer:  # the coefficients of an upstream gradient of 1 per row; backward multiplies in each row's own
            ones = torch.ones((), dtype=torch.float32, device=x.device).expand(x.shape[0])
            shares = (ones, ones)
        losses, lse, stats, saved = fused_sweep(
            x, w, b, target, class_weight, lp, ro, shares, grads, defer, shard=shard
        )
        loss = reduce_total(losses[:, None], lse[:, None], keep, None, lp)
        saved = saved if defer else None
    else:
        cw = None if class_weight is None else class_weight.float()
        scales = row_scales(target[:, None], cw, lp, torch.float32, shard, uniform=True)
        shares = (scales.ce[:, 0], scales.z[:, 0]) if grads.any else None
        per_row = need_lse or lp.metrics or bool(lp.z_loss)
        losses, lse, stats, saved = _sweeps(
            x,
            w,
            b,
            target,
            class_weight,
            lp,
            ro,
            shares,
            grads,
            defer,
            shard,
            weight_grad_later,
            per_row,
            scaled_later=scaled_later,
        )
        loss = reduce_total(losses[:, None], None if lse is None else lse[:, None], keep, scales, lp)
    lse = losses.new_empty((0, 1)) if lse is None else lse[:, None]
    return loss, lse, None if stats is None else stats[:, None], saved


def saved_grad_dtypes(
    ro: ResolvedOptions, grads: Grads, num_rows: int, x_dtype: torch.dtype, w_dtype: torch.dtype
) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """The dtypes of the gradients :func:`forward_pass` saves for a scalar reduction without ``defer`` (and with
    ``scaled_later``): ``(grad_x, grad_w, grad_b)``, fp32 where the rounding waits for the upstream gradient."""
    gx_dtype, gw_dtype = accumulator_dtypes(ro, num_rows, x_dtype, w_dtype, scaled_later=True)
    if _recomputes(ro, grads, None):  # the vocabulary-major pass rounds each block once, in forward here
        gw_dtype = w_dtype
    return gx_dtype, gw_dtype, torch.float32


def backward_none(
    x,
    w,
    b,
    target,
    class_weight,
    lp: LossParams,
    ro: ResolvedOptions,
    grads: Grads,
    grad_out,
    shard=None,
    entropy_grad=None,
):
    """The gradients of ``reduction="none"``, recomputed with each row's upstream gradient ``grad_out`` (N, 1)
    (and, given ``entropy_grad`` = ``(H, g_H)`` ``(N,)`` fp32 each, the rows' entropies' upstream gradients)."""
    share = grad_out[:, 0].float()
    gx, gw, gb = _sweeps(
        x, w, b, target, class_weight, lp, ro, (share, share), grads, False, shard, entropy_grad=entropy_grad
    )[3]
    return gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype)


def _recomputes(ro: ResolvedOptions, grads: Grads, shard) -> bool:
    """The vocabulary-major weight-gradient pass serves unsharded calls that want the weight gradient."""
    return ro.recompute_weight_grad and grads.weight and shard is None


def _sweeps(
    x,
    w,
    b,
    target,
    class_weight,
    lp,
    ro,
    shares,
    grads,
    defer,
    shard,
    weight_grad_later=False,
    per_row=True,
    scaled_later=False,
    entropy_grad=None,
):
    """:func:`fused_sweep`, followed by :func:`weight_grad_sweep` when the weight gradient is recomputed (or its
    inputs, ``(grad_x, lse, coefs)``, in place of the gradients with ``weight_grad_later``); that pass needs every
    row's lse, so it keeps them whatever ``per_row`` says."""
    if shares is None or not _recomputes(ro, grads, shard):
        return fused_sweep(
            x,
            w,
            b,
            target,
            class_weight,
            lp,
            ro,
            shares,
            grads,
            defer,
            shard,
            per_row=per_row,
            scaled_later=scaled_later,
            entropy_grad=entropy_grad,
        )
    coefs = torch.empty((x.shape[0], 3), dtype=torch.float32, device=x.device)
    row_grads = Grads(grads.input, False, False)
    losses, lse, stats, (gx, _, _) = fused_sweep(
        x,
        w,
        b,
        target,
        class_weight,
        lp,
        ro,
        shares,
        row_grads,
        coefs_out=coefs,
        scaled_later=scaled_later,
        entropy_grad=entropy_grad,
    )
    if weight_grad_later:
        return losses, lse, stats, (gx, lse, coefs)
    gw, gb = weight_grad_sweep(x, w, b, target, class_weight, lse, coefs, lp, ro, grads, entropy_grad=entropy_grad)
    return losses, lse, stats, (gx, gw, gb)


class _FusedFunction(torch.autograd.Function):
    """Outputs: the loss (scalar, or ``(N, 1)`` for ``"none"``), lse ``(N, 1)`` (empty ``(0, 1)`` for a scalar
    reduction without metrics or z-loss: the caller reads it for the metrics only) and the statistics ``(N, 1, 5)``
    (or an empty tensor); only the loss is differentiable."""

    @staticmethod
    def forward(ctx, x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, shard=None):
        ctx.lp, ctx.ro, ctx.grads, ctx.x_dtype, ctx.w_dtype, ctx.shard = lp, ro, grads, x.dtype, w.dtype, shard
        ctx.deferred = lp.reduction != "none" and ro.batch_chunk_size >= x.shape[0] and grads.any
        ctx.recomputed = lp.reduction != "none" and not ctx.deferred and _recomputes(ro, grads, shard)
        loss, lse, stats, ctx.saved_grads = forward_pass(
            x,
            w,
            b,
            target,
            class_weight,
            lp,
            ro,
            grads,
            ctx.deferred,
            shard,
            weight_grad_later=ctx.recomputed,
            need_lse=False,  # returned for the metrics only
        )
        if lp.reduction == "none" or ctx.recomputed or ctx.deferred:
            ctx.save_for_backward(x, w, b, target, class_weight)
        stats = lse.new_empty(0) if stats is None else stats
        ctx.mark_non_differentiable(lse, stats)
        return loss, lse, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_stats):
        if ctx.lp.reduction == "none":
            grads = backward_none(*ctx.saved_tensors, ctx.lp, ctx.ro, ctx.grads, grad_out, ctx.shard)
            return (*grads, None, None, None, None, None, None)
        if ctx.deferred:
            return (*_deferred_grads(ctx, grad_out), None, None, None, None, None, None)
        if ctx.recomputed:
            return (*_recomputed_grads(ctx, grad_out), None, None, None, None, None, None)
        gx, gw, gb = take_saved_grads(ctx)
        in_place = not ctx.ro.allow_retain_graph
        if gx is not None:
            gx = scale_cast(gx, grad_out, ctx.x_dtype, out=gx if in_place and gx.dtype == ctx.x_dtype else None)
        if gw is not None:
            gw = scale_cast(gw, grad_out, ctx.w_dtype, out=gw if in_place and gw.dtype == ctx.w_dtype else None)
        if gb is not None:
            gb = gb * grad_out
        return gx, gw, gb, None, None, None, None, None, None


def _deferred_grads(ctx, grad_out):
    """The single-chunk backward: sweep 2 on the logits forward left, with ``grad_out`` folded into the rows'
    coefficients, then the two gradient GEMMs (``grad_x`` then all-reduced over a vocabulary-parallel group)."""
    logits, lse, coefs = take_saved_grads(ctx)
    x, w, b, target, class_weight = ctx.saved_tensors
    in_place = not ctx.ro.allow_retain_graph  # a second backward reads the logits again
    gx, gw, gb = deferred_grads(
        logits, lse, coefs, x, w, b, target, class_weight, ctx.lp, grad_out, ctx.grads, ctx.shard, in_place
    )
    if gx is not None and ctx.shard is not None and ctx.shard.input_grad_all_reduce:
        ctx.shard.sum_(gx)
    return gx, gw, None if gb is None else gb.to(ctx.w_dtype)


def _recomputed_grads(ctx, grad_out):
    """The vocabulary-major pass in backward, with the upstream gradient ``g`` folded into ``dz``'s per-row
    coefficients (no pass over a ``(V, H)`` gradient to scale it); ``grad_x`` from forward scaled by ``g``."""
    gx, lse, coefs = take_saved_grads(ctx)
    x, w, b, target, class_weight = ctx.saved_tensors
    if gx is not None:
        in_place = not ctx.ro.allow_retain_graph and gx.dtype == ctx.x_dtype
        gx = scale_cast(gx, grad_out, ctx.x_dtype, out=gx if in_place else None)
    gw, gb = weight_grad_sweep(x, w, b, target, class_weight, lse, coefs, ctx.lp, ctx.ro, ctx.grads, grad_out)
    return gx, gw, None if gb is None else gb.to(ctx.w_dtype)


def linear_cross_entropy_fused(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    lp: LossParams,
    ro: ResolvedOptions,
    shard: VocabShard | None = None,
) -> torch.Tensor:
    """``(loss, lse, stats)`` as the chunked backend returns them (K = 1); fp32 (the caller casts).

    With a ``shard`` (vocabulary parallel): ``w``, ``b`` and ``class_weight`` are this rank's slices; the loss, lse
    and statistics are the whole vocabulary's, ``grad_input`` is all-reduced over the group unless
    ``shard.input_grad_all_reduce`` is off."""
    x, w = blas_ready(x), blas_ready(w)
    return _FusedFunction.apply(x, w, b, target.contiguous(), class_weight, lp, ro, Grads.of(x, w, b), shard)


def blas_ready(t: torch.Tensor) -> torch.Tensor:
    """A view cuBLAS takes as it is (unit stride in one dimension), else a contiguous copy."""
    return t if (t.stride(-1) == 1 or t.stride(0) == 1) else t.contiguous()
