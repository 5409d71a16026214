"""The fused backend's autograd Function and its entry points: make the plan, run its mode, no math.

The plan (:func:`.policy.make_plan`) picks one of four modes (:class:`.policy.Mode`):

- ``DEFERRED`` (the whole batch one chunk): forward stops after the row kernel's first sweep; backward runs its
  second with the upstream gradient ``g`` folded into each row's coefficients, then the two gradient GEMMs: every
  gradient is rounded once, as eager's, and no ``(V, H)`` gradient is scaled. On the factored pass forward keeps
  ``E'`` and each row's scale instead, and backward multiplies the scales by ``g`` before the gradient GEMMs.
- ``ACCUMULATED`` (chunks): forward forms the gradients for an upstream gradient of 1, which backward scales (the
  fp32 accumulators of ``"balanced"``/``"accurate"``, when they exist, are rounded once in that same pass).
- ``RECOMPUTE`` (small chunks, ``ro.recompute_weight_grad``): forward forms only ``grad_x`` (and each row's ``lse``
  and ``dz`` coefficients); the vocabulary-major pass recomputes the logits for the weight and bias gradients, in
  backward with ``g`` folded into the coefficients.
- ``LOSS_ONLY``: no gradients; ``reduction="none"`` recomputes in backward with the per-row upstream gradient.

Vocabulary parallel (a ``shard``, :mod:`...distributed`): the same, with the row pass combining per-row statistics
over the group; ``grad_input`` is all-reduced where it is formed (in forward, or in backward for a single chunk and
for ``"none"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..common import (
    Grads,
    LossParams,
    ResolvedOptions,
    function_outputs,
    keep_mask,
    reduce_total,
    row_scales,
    take_saved_grads,
)
from . import chunks
from .policy import FusedPlan, Mode, make_plan
from .rows import scale_cast
from .vocab_major import deferred_grads, weight_grad_pass

if TYPE_CHECKING:
    from ..partials import VocabShard

__all__ = [
    "linear_cross_entropy_fused",
    "forward_pass",
    "forward_none",
    "backward_none",
    "blas_ready",
    "saved_grad_dtypes",
    "deferred_grads",
]


def forward_pass(x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, shard=None):
    """The backends' protocol (:mod:`..compiled`): ``(loss, lse (N, 1), stats (N, 1, 5) or None, saved)``, with
    ``saved`` the gradients for an upstream gradient of 1 (the fp32 accumulators still fp32,
    :func:`saved_grad_dtypes`), None for ``"none"``."""
    plan = make_plan("op", lp, ro, grads, x, w.dtype, sharded=shard is not None)
    return _forward(x, w, b, target, class_weight, lp, plan, shard)


def forward_none(x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, defer: bool):
    """``reduction="none"``'s forward (:mod:`...log_probs`): with ``defer`` (one chunk, gradients wanted)
    ``saved`` is :class:`.chunks.DeferredSaved` for :func:`deferred_grads`, else None."""
    assert lp.reduction == "none"
    plan = make_plan("none_forward" if defer else "op", lp, ro, grads, x, w.dtype)
    return _forward(x, w, b, target, class_weight, lp, plan, None)


def saved_grad_dtypes(lp: LossParams, ro: ResolvedOptions, grads: Grads, x, w) -> tuple[torch.dtype, ...]:
    """The dtypes of the gradients :func:`forward_pass` saves for a scalar reduction: ``(grad_x, grad_w,
    grad_b)``, fp32 where the rounding waits for the upstream gradient (the compiled op's fake kernel reads it)."""
    plan = make_plan("op", lp, ro, grads, x, w.dtype)
    return plan.grad_x_dtype, plan.grad_w_dtype, torch.float32


def backward_none(
    x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, grad_out, shard=None,
    entropy_grad=None,
):  # fmt: skip
    """The gradients of ``reduction="none"``, recomputed with each row's upstream gradient ``grad_out`` (N, 1)
    (and, given ``entropy_grad`` = ``(H, g_H)`` ``(N,)`` fp32 each, the rows' entropies' upstream gradients)."""
    plan = make_plan("backward", lp, ro, grads, x, w.dtype, sharded=shard is not None, entropy_grad=bool(entropy_grad))
    if plan.mode is Mode.LOSS_ONLY:
        return None, None, None
    share = grad_out[:, 0].float()
    gx, gw, gb = _run(x, w, b, target, class_weight, lp, plan, (share, share), shard, entropy_grad).saved
    return gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype)


def _forward(x, w, b, target, class_weight, lp: LossParams, plan: FusedPlan, shard):
    """The loss and the plan's saved tensors (see :func:`forward_pass`)."""
    keep = keep_mask(target[:, None], lp) if lp.z_loss else None  # reduce_total reads it for the z-loss only
    scales = shares = None
    if lp.reduction != "none":
        cw = None if class_weight is None else class_weight.float()
        scales = row_scales(target[:, None], cw, lp, torch.float32, shard, uniform=True)
        shares = (scales.ce[:, 0], scales.z[:, 0])
    elif plan.mode is Mode.DEFERRED:  # the coefficients of an upstream gradient of 1 per row; backward multiplies
        ones = torch.ones((), dtype=torch.float32, device=x.device).expand(x.shape[0])
        shares = (ones, ones)
    losses, lse, stats, saved = _run(x, w, b, target, class_weight, lp, plan, shares, shard)
    loss = reduce_total(losses[:, None], None if lse is None else lse[:, None], keep, scales, lp)
    lse = losses.new_empty((0, 1)) if lse is None else lse[:, None]
    return loss, lse, None if stats is None else stats[:, None], saved


def _run(x, w, b, target, class_weight, lp, plan: FusedPlan, shares, shard, entropy_grad=None) -> chunks.Pass:
    """The plan's mode (:attr:`Mode.RECOMPUTE` with the vocabulary-major pass now unless it waits for backward)."""
    if plan.mode is Mode.LOSS_ONLY:
        return chunks.loss_only(x, w, b, target, class_weight, lp, plan, shard)
    if plan.mode is Mode.DEFERRED:
        return chunks.deferred(x, w, b, target, class_weight, lp, plan, shares, shard)
    if plan.mode is Mode.ACCUMULATED:
        return chunks.accumulated(x, w, b, target, class_weight, lp, plan, shares, shard, entropy_grad)
    rows = chunks.recompute(x, w, b, target, class_weight, lp, plan, shares, entropy_grad)
    if plan.weight_grad_later:
        return rows
    gx, lse, coefs = rows.saved
    gw, gb = weight_grad_pass(x, w, b, target, class_weight, lse, coefs, lp, plan, entropy_grad=entropy_grad)
    return rows._replace(saved=chunks.Gradients(gx, gw, gb))


class _FusedFunction(torch.autograd.Function):
    """Outputs: the loss (scalar, or ``(N, 1)`` for ``"none"``), lse ``(N, 1)`` (empty ``(0, 1)`` for a scalar
    reduction without metrics or z-loss: the caller reads it for the metrics only) and the statistics ``(N, 1, 5)``
    (or an empty tensor); only the loss is differentiable."""

    @staticmethod
    def forward(ctx, x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, shard=None):
        plan = make_plan("forward", lp, ro, grads, x, w.dtype, sharded=shard is not None)
        ctx.lp, ctx.ro, ctx.grads, ctx.plan, ctx.shard = lp, ro, grads, plan, shard
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        loss, lse, stats, ctx.saved_grads = _forward(x, w, b, target, class_weight, lp, plan, shard)
        if lp.reduction == "none" or plan.mode in (Mode.DEFERRED, Mode.RECOMPUTE):
            ctx.save_for_backward(x, w, b, target, class_weight)
        return function_outputs(ctx, loss, lse, stats)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_stats):
        if ctx.lp.reduction == "none":
            grads = backward_none(*ctx.saved_tensors, ctx.lp, ctx.ro, ctx.grads, grad_out, ctx.shard)
        elif ctx.plan.mode is Mode.DEFERRED:
            grads = _deferred_backward(ctx, grad_out)
        elif ctx.plan.mode is Mode.RECOMPUTE:
            grads = _recompute_backward(ctx, grad_out)
        else:
            grads = _accumulated_backward(ctx, grad_out)
        return (*grads, None, None, None, None, None, None)


def _accumulated_backward(ctx, grad_out):
    """The gradients forward formed for an upstream gradient of 1, scaled by ``g`` and rounded once."""
    gx, gw, gb = take_saved_grads(ctx)
    in_place = not ctx.ro.allow_retain_graph
    if gx is not None:
        gx = scale_cast(gx, grad_out, ctx.x_dtype, out=gx if in_place and gx.dtype == ctx.x_dtype else None)
    if gw is not None:
        gw = scale_cast(gw, grad_out, ctx.w_dtype, out=gw if in_place and gw.dtype == ctx.w_dtype else None)
    if gb is not None:
        gb = gb * grad_out
    return gx, gw, gb


def _deferred_backward(ctx, grad_out):
    """The single-chunk backward: sweep 2 on the logits forward left, with ``grad_out`` folded into the rows'
    coefficients, then the two gradient GEMMs (``grad_x`` then all-reduced over a vocabulary-parallel group); on
    the factored pass, ``grad_out`` folded into the rows' scales, then the gradient GEMMs on ``E'``."""
    saved = take_saved_grads(ctx)
    x, w, b, target, class_weight = ctx.saved_tensors
    if isinstance(saved, chunks.FactoredSaved):
        gx, gw, gb = chunks.factored_deferred_grads(saved, x, w, target, grad_out, ctx.grads)
        return gx, gw, None if gb is None else gb.to(ctx.w_dtype)
    logits, lse, coefs = saved
    in_place = not ctx.ro.allow_retain_graph  # a second backward reads the logits again
    gx, gw, gb = deferred_grads(
        logits, lse, coefs, x, w, b, target, class_weight, ctx.lp, grad_out, ctx.grads, ctx.shard, in_place
    )
    if gx is not None and ctx.shard is not None and ctx.shard.input_grad_all_reduce:
        ctx.shard.sum_(gx)
    return gx, gw, None if gb is None else gb.to(ctx.w_dtype)


def _recompute_backward(ctx, grad_out):
    """The vocabulary-major pass in backward, with the upstream gradient ``g`` folded into ``dz``'s per-row
    coefficients (no pass over a ``(V, H)`` gradient to scale it); ``grad_x`` from forward scaled by ``g``."""
    gx, lse, coefs = take_saved_grads(ctx)
    x, w, b, target, class_weight = ctx.saved_tensors
    if gx is not None:
        in_place = not ctx.ro.allow_retain_graph and gx.dtype == ctx.x_dtype
        gx = scale_cast(gx, grad_out, ctx.x_dtype, out=gx if in_place else None)
    gw, gb = weight_grad_pass(x, w, b, target, class_weight, lse, coefs, ctx.lp, ctx.plan, grad_out)
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
