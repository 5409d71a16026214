"""``LinearCrossEntropyLoss``: owns the head's parameters (flat, as ``nn.Linear``) and calls the functional form."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.loss import _WeightedLoss

from . import validate
from .functional import linear_cross_entropy
from .metrics import LossMetrics
from .options import LinearCrossEntropyOptions

__all__ = ["LinearCrossEntropyLoss"]


class LinearCrossEntropyLoss(_WeightedLoss):
    """Cross entropy of a linear layer's output, a drop-in for PyTorch 2.13's ``torch.nn.LinearCrossEntropyLoss``.

    Parameters live flat in ``self.linear = nn.Linear(in_features, C·prod(out_features), bias)`` (initialised
    exactly as that ``nn.Linear``) and are reshaped to ``(C, *out_features, F)`` in forward. ``weight`` (class
    weights, ``(C,)``) is a buffer; ``options`` is a plain attribute (None: reference path).

    Shapes: input ``(F,)`` or ``(N, F)``; target ``()``, ``(N,)``, ``(N, *out_features)`` class indices or
    probabilities shaped like the logits; output a scalar, or per element for ``reduction="none"``.
    """

    __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing"]

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: LinearCrossEntropyOptions | None = None,
        z_loss: float = 0.0,
        logit_scale: float = 1.0,
        logit_softcap: float | None = None,
        monitoring: bool = False,
        process_group: torch.distributed.ProcessGroup | None = None,
        input_grad_all_reduce: bool = True,
    ) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        validate.check_label_smoothing(label_smoothing)
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(
            in_features, math.prod(out_features, start=num_classes), bias=bias, device=device, dtype=dtype
        )
        self.options = validate.check_options(options)
        # Ours (off by default): see linear_cross_entropy. With monitoring on, forward stores the in-pass
        # LossMetrics of its last call in self.metrics (tensors; reading them is the caller's host sync).
        self.z_loss = z_loss
        self.logit_scale = logit_scale
        self.logit_softcap = logit_softcap
        self.monitoring = monitoring
        # Vocabulary parallel (see linear_cross_entropy): num_classes, the parameters and weight are this rank's
        # slice; plain attributes, passed through only when set.
        self.process_group = process_group
        self.input_grad_all_reduce = input_grad_all_reduce
        self.metrics: LossMetrics | None = None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``input`` ``(F,)``/``(N, F)`` against ``target``; see the class docstring for shapes."""
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (
            self.linear.bias.reshape((self.num_classes, *self.out_features)) if self.linear.bias is not None else None
        )
        out = linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            **self._extras(),
            **({"return_metrics": True} if self.monitoring else {}),
        )
        if self.monitoring:
            out, self.metrics = out
        return out

    def _extras(self) -> dict:
        """Our keyword arguments, only those switched on (a module that uses none calls PyTorch's signature)."""
        extras = {}
        if self.z_loss:
            extras["z_loss"] = self.z_loss
        if self.logit_scale != 1.0:
            extras["logit_scale"] = self.logit_scale
        if self.logit_softcap is not None:
            extras["logit_softcap"] = self.logit_softcap
        if self.process_group is not None:
            extras["process_group"] = self.process_group
            extras["input_grad_all_reduce"] = self.input_grad_all_reduce
        return extras

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features},"
            f" num_classes={self.num_classes},"
            f" out_features={self.out_features},"
            f" bias={self.linear.bias is not None},"
            f" reduction={self.reduction},"
            f" ignore_index={self.ignore_index},"
            f" label_smoothing={self.label_smoothing},"
            f" options={self.options}"
            + "".join(f", {k}={v}" for k, v in self._extras().items() if k != "process_group")
            + (", monitoring=True" if self.monitoring else "")
        )
