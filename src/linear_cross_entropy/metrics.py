"""The named results of ``linear_cross_entropy(..., return_metrics=True)``."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["LossMetrics", "LinearCrossEntropyOutput"]


class LossMetrics(NamedTuple):
    """Statistics of the logits ``z`` (after logit scale and soft-capping), computed in the loss's own pass.

    For ``reduction="mean"``/``"sum"`` each is the mean over the rows that take part (targets not ignored); for
    ``"none"`` each is per row, shaped like the loss (``accuracy``, ``log_prob`` and ``z_loss`` are 0 where the
    target is ignored). All are detached tensors in at least fp32; reading them is the caller's only host sync.
    """

    lse: torch.Tensor  # the z value: logsumexp(z)
    z_loss: torch.Tensor  # λ·lse², the z-loss term (0 when z_loss=0)
    max_logit: torch.Tensor  # max_c z_c
    entropy: torch.Tensor  # −Σ_c p_c log p_c of the softmax
    logit_norm: torch.Tensor  # ‖z‖₂ over the classes
    accuracy: torch.Tensor  # [argmax_c z_c == target] (probability targets: their argmax)
    log_prob: torch.Tensor  # log p_target (probability targets: −cross entropy)


class LinearCrossEntropyOutput(NamedTuple):
    """``(loss, metrics)``: the loss exactly as without metrics, and its :class:`LossMetrics`."""

    loss: torch.Tensor
    metrics: LossMetrics
