"""The reference path: ``cross_entropy(linear(input, W, b), target)``, logits materialised. Also the tests' oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy_reference"]


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
