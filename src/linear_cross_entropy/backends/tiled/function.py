"""The tiled backend's autograd Function: saves, calls launchers, no math.

Forward runs the statistics kernel only and keeps ``O(N)`` per row: ``lse`` and the backward's coefficients for an
upstream gradient of 1. Backward scales the coefficients by the upstream gradient (a scalar, or one value per row
for ``reduction="none"``) and runs the backward kernel, which recomputes the logit tiles: every reduction
backpropagates the same way, and nothing is consumed, so repeated backward works whatever ``allow_retain_graph``.
"""

from __future__ import annotations

import torch

from ..common import Grads, LossParams, ResolvedOptions, function_outputs, keep_mask, reduce_total, row_scales
from .launch import combine_splits, partial_stats, tiled_backward

__all__ = ["linear_cross_entropy_tiled", "forward_pass", "backward_none"]


def _loss_and_coefficients(x, w, b, target, class_weight, lp: LossParams, want_coefs: bool):
    """``(loss, lse (N,), stats (N, 5) or None, coefs (3, N) or None)``, coefficients for an upstream 1."""
    keep = keep_mask(target[:, None], lp)
    scales = None
    if lp.reduction != "none":
        cw = None if class_weight is None else class_weight.float()
        scales = row_scales(target[:, None], cw, lp, torch.float32)
    shares = None
    if want_coefs:  # "none": a share of 1 per row (index_rows zeroes ignored rows); backward multiplies
        ones = torch.ones(target.shape, dtype=torch.float32, device=target.device)
        shares = (ones, ones) if scales is None else (scales.ce[:, 0], scales.z[:, 0])
    partials = partial_stats(x, w, b, target, class_weight, lp)
    losses, lse, stats, coefs = combine_splits(partials, target, class_weight, lp, w.shape[0], shares)
    loss = reduce_total(losses[:, None], lse[:, None], keep, scales, lp)
    return loss, lse, stats, coefs


def _gradients(x, w, b, target, class_weight, lse, coefs, lp, ro: ResolvedOptions, grads: Grads):
    low_fp32 = ro.acc_dtype == torch.float32
    return tiled_backward(
        x, w, b, target, class_weight, lse, coefs, lp, grads,
        fp32_grad_input=low_fp32 and ro.acc_policy in ("balanced", "accurate"),
        fp32_grad_weight=low_fp32 and ro.acc_policy == "accurate",
        sparse_eps=ro.sparse_backward_eps,
    )  # fmt: skip


def forward_pass(x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, shard=None):
    """The backends' protocol (backends/compiled.py): ``(loss, lse (N, 1), stats (N, 1, 5) or None, saved)``
    with ``saved`` the gradients for an upstream gradient of 1 (None for ``"none"``); no vocabulary parallel."""
    assert shard is None, "the tiled backend has no vocabulary-parallel path"
    scalar = lp.reduction != "none" and grads.any
    loss, lse, stats, coefs = _loss_and_coefficients(x, w, b, target, class_weight, lp, scalar)
    saved = _gradients(x, w, b, target, class_weight, lse, coefs, lp, ro, grads) if scalar else None
    return loss, lse[:, None], None if stats is None else stats[:, None], saved


def backward_none(
    x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, grad_out, shard=None,
    entropy_grad=None,
):  # fmt: skip
    """The gradients of ``reduction="none"`` for the per-row upstream gradient ``grad_out`` (N, 1) (the backends'
    protocol; no vocabulary parallel, no entropy gradient)."""
    assert shard is None and entropy_grad is None, "the tiled backend serves neither"
    _, lse, _, coefs = _loss_and_coefficients(x, w, b, target, class_weight, lp, True)
    return _gradients(x, w, b, target, class_weight, lse, coefs * grad_out[:, 0].float(), lp, ro, grads)


class _TiledFunction(torch.autograd.Function):
    """Outputs: the loss (scalar, or ``(N, 1)`` for ``"none"``), lse ``(N, 1)`` and the statistics ``(N, 1, 5)``
    (or an empty tensor); only the loss is differentiable."""

    @staticmethod
    def forward(ctx, x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads):
        ctx.lp, ctx.ro, ctx.grads = lp, ro, grads
        loss, lse, stats, coefs = _loss_and_coefficients(x, w, b, target, class_weight, lp, grads.any)
        if grads.any:
            ctx.save_for_backward(x, w, b, target, class_weight, lse, coefs)
        return function_outputs(ctx, loss, lse[:, None], None if stats is None else stats[:, None])

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_stats):
        x, w, b, target, class_weight, lse, coefs = ctx.saved_tensors
        upstream = grad_out[:, 0] if ctx.lp.reduction == "none" else grad_out
        grads = _gradients(x, w, b, target, class_weight, lse, coefs * upstream.float(), ctx.lp, ctx.ro, ctx.grads)
        return (*grads, None, None, None, None, None)


def linear_cross_entropy_tiled(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    lp: LossParams,
    ro: ResolvedOptions,
) -> tuple:
    """``(loss, lse, stats)`` as the chunked backend returns them (K = 1); fp32 (the caller casts)."""
    return _TiledFunction.apply(x, w, b, target.contiguous(), class_weight, lp, ro, Grads.of(x, w, b))
