"""The reference path: ``cross_entropy(linear(input, W, b), target)``, logits materialised. Also the tests' oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import STATS, LossParams, keep_mask, reduce_total, row_scales

__all__ = ["linear_cross_entropy_reference", "reference_with_extras"]


def linear_cross_entropy_reference(
    input: torch.Tensor,  # (F,) or (N, F)
    linear_weight: torch.Tensor,  # (C, *out_features, F)
    target: torch.Tensor,  # (), (N,), (N, *out_features) indices, or probabilities shaped like the logits
    *,
    linear_bias: torch.Tensor | None = None,  # (C, *out_features)
    weight: torch.Tensor | None = None,  # (C,)
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Exactly PyTorch's reference: the logits ``(N, C, *out_features)`` are computed and kept."""
    num_classes, out_features, in_features = linear_weight.shape[0], linear_weight.shape[1:-1], linear_weight.shape[-1]
    flat = math.prod(out_features, start=num_classes)
    bias = None if linear_bias is None else linear_bias.reshape(flat)
    logits = F.linear(input, linear_weight.reshape(flat, in_features), bias)
    logits = logits.reshape(*input.shape[:-1], num_classes, *out_features)
    return F.cross_entropy(
        logits,
        target,
        weight=weight,
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing,
    )


def transform_logits(logits: torch.Tensor, lp: LossParams) -> torch.Tensor:
    """What the loss sees of ``r = x·Wᵀ + b``: ``z = c·tanh(a·r/c)`` (``a`` = logit scale, ``c`` = soft-cap; each
    skipped when off), differentiable, in ``logits``' dtype."""
    z = logits * lp.logit_scale if lp.logit_scale != 1.0 else logits
    if lp.logit_softcap:
        z = lp.logit_softcap * torch.tanh(z / lp.logit_softcap)
    return z


def reference_with_extras(
    x: torch.Tensor,  # (N, F)
    w: torch.Tensor,  # (C, K, F)
    b: torch.Tensor | None,  # (C, K)
    target: torch.Tensor,  # (N, K) int64 indices or (N, C, K) probabilities
    class_weight: torch.Tensor | None,  # (C,)
    lp: LossParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference path with our additions (z-loss, logit scale, soft-capping, metrics), logits materialised.

    Returns ``(loss, lse (N, K), stats (N, K, len(STATS)) or empty)`` like the other backends, computed with plain
    differentiable PyTorch ops: ``z = c·tanh(a·(x·Wᵀ + b)/c)``, ``cross_entropy(z, ...)`` per row, and the
    reductions of ``backends/common.py``.
    """
    c, k, f = w.shape
    logits = F.linear(x, w.reshape(c * k, f), None if b is None else b.reshape(c * k)).reshape(x.shape[0], c, k)
    z = transform_logits(logits, lp)
    ce = F.cross_entropy(
        z,
        target,
        weight=class_weight,
        reduction="none",
        ignore_index=lp.ignore_index,
        label_smoothing=lp.label_smoothing,
    )
    lse = torch.logsumexp(z, dim=1)
    keep = keep_mask(target, lp)
    sdt = torch.promote_types(ce.dtype, torch.float32)
    scales = (
        None
        if lp.reduction == "none"
        else row_scales(target, None if class_weight is None else class_weight.to(sdt), lp, sdt)
    )
    loss = reduce_total(ce, lse, keep, scales, lp)
    stats = lse.new_empty(0)
    if lp.metrics:
        with torch.no_grad():
            zd, lsed = z.detach().to(sdt), lse.detach().to(sdt)
            p = torch.softmax(zd, dim=1)
            predicted = zd.argmax(dim=1)
            if lp.target_is_probs:
                correct, log_prob = predicted == target.argmax(dim=1), -ce.detach().to(sdt)
            else:
                y = torch.where(keep, target, 0)
                correct = predicted == target
                log_prob = zd.gather(1, y[:, None]).squeeze(1) - lsed
            per_row = {
                "max_logit": zd.amax(dim=1),
                "entropy": -torch.special.xlogy(p, p).sum(dim=1),
                "logit_norm": torch.linalg.vector_norm(zd, dim=1),
                "accuracy": correct.to(sdt),
                "log_prob": log_prob,
            }
            stats = torch.stack([per_row[name] for name in STATS], dim=-1)
    return loss, lse.detach(), stats
