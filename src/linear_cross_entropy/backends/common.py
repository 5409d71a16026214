"""What every backend shares: the loss's settings, the reduction's per-row gradient shares, saved-gradient use."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["LossParams", "stat_dtype", "row_scale_for_reduction", "reduce_total", "take_saved_grads"]


@dataclasses.dataclass(frozen=True)
class LossParams:
    """The loss's own settings, resolved (no None): what the math of every backend needs."""

    reduction: str  # "none" | "mean" | "sum"
    ignore_index: int
    label_smoothing: float  # >= 0 (negative values behave as 0, as in the reference)
    target_is_probs: bool


def stat_dtype(acc_dtype: torch.dtype) -> torch.dtype:
    """Reductions (lse, loss sums) run in at least fp32 whatever the buffers' dtype."""
    return torch.float64 if acc_dtype == torch.float64 else torch.float32


def row_scale_for_reduction(
    target, class_weight, lp: LossParams, k: int, sdt
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For the scalar reductions: the per-row share of an upstream gradient of 1, and the mean's denominator."""
    if lp.target_is_probs:
        n = target.shape[0]
        denom = torch.tensor(float(n * k), dtype=sdt, device=target.device)
        scale = torch.ones((n, k), dtype=sdt, device=target.device)
    else:
        keep = target != lp.ignore_index
        if class_weight is None:
            w_y = keep.to(sdt)
        else:
            y = torch.where(keep & (target >= 0) & (target < class_weight.shape[0]), target, 0)
            w_y = torch.where(keep, class_weight[y], 0.0)
        denom = w_y.sum()
        scale = keep.to(sdt)
    if lp.reduction == "mean":
        # Rows that take part get 1/denominator (inf, hence NaN gradients, when the weights sum to 0, as in the
        # reference); ignored rows get exactly 0, so an all-ignored batch has zero gradients and a NaN loss.
        scale = scale / denom
    return scale, denom


def reduce_total(total: torch.Tensor, denom: torch.Tensor, lp: LossParams) -> torch.Tensor:
    """The scalar loss from the sum of per-row losses: ``total`` for sum, ``total / denom`` for mean.

    The reference divides its NLL and smoothing terms by the denominator separately, so index targets whose class
    weights sum to 0 give 0/0 = NaN, also where smoothing makes ``total`` non-zero (``total / 0`` would be inf).
    """
    if lp.reduction != "mean":
        return total
    if lp.target_is_probs:
        return total / denom
    return (total / denom).masked_fill(denom == 0, float("nan"))


def take_saved_grads(ctx) -> tuple:
    """The gradients forward computed for an upstream gradient of 1; consumed unless ``allow_retain_graph``."""
    saved = ctx.saved_grads
    if saved is None:
        raise RuntimeError(
            "linear_cross_entropy: backward through the chunked/fused loss a second time; its gradients were "
            "computed in forward and consumed by the first backward. Pass "
            "LinearCrossEntropyOptions(allow_retain_graph=True) to keep them for repeated backward."
        )
    if not ctx.ro.allow_retain_graph:
        ctx.saved_grads = None
    return saved
