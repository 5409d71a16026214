"""Every input check of ``linear_cross_entropy``, with the reference path's exception types.

The reference (``options=None``) is ``cross_entropy(linear(input, W, b).reshape(logits_shape), target, ...)``; these
checks raise what it raises (same type, same or clearer message naming the argument) before any backend runs, so
every backend fails the same way. :func:`check_call` returns what the checks learned about the call.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["CallShape", "check_call", "check_extras", "check_target_range", "REDUCTIONS"]

REDUCTIONS = ("none", "mean", "sum")


@dataclasses.dataclass(frozen=True)
class CallShape:
    """What the checks establish about one call."""

    batched: bool  # input is (N, F) rather than (F,)
    num_rows: int  # N (1 when unbatched)
    in_features: int  # F
    num_classes: int  # C
    out_features: tuple[int, ...]  # (d1, ..., dK) of a K-dimensional loss, () otherwise
    target_is_probs: bool  # target holds class probabilities shaped like the logits

    @property
    def positions(self) -> int:
        """K = prod(out_features): loss positions per row."""
        return math.prod(self.out_features)


def check_call(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    reduction: str,
    ignore_index: int | None,
    label_smoothing: float,
) -> CallShape:
    """Raise the reference's exception for bad input; return the call's shape description."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    batched = input.dim() == 2
    if out_features and not batched:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}"
        )
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    target_is_probs = tuple(target.shape) == logits_shape
    if target_is_probs and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")

    for name, tensor in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if tensor is None:
            continue
        if tensor.device != input.device:
            raise RuntimeError(f"expected {name} on the device of input ({input.device}), got {tensor.device}")
        if tensor.dtype != input.dtype:
            raise RuntimeError(f"expected {name} dtype to match input dtype ({input.dtype}), got {tensor.dtype}")
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"expected a floating-point input, got {input.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if weight is not None:
        if tuple(weight.shape) != (num_classes,):
            raise RuntimeError(
                f"weight tensor should be defined either for all {num_classes} classes or no classes "
                f"but got weight tensor of shape: {list(weight.shape)}"
            )
        if weight.dtype != input.dtype:
            raise RuntimeError(f"expected weight (class weights) dtype {input.dtype}, got {weight.dtype}")
        if weight.device != input.device:
            raise RuntimeError(
                f"expected weight (class weights) on the device of input ({input.device}), got {weight.device}"
            )
    if target.device != input.device:
        raise RuntimeError(f"expected target on the device of input ({input.device}), got {target.device}")

    if target_is_probs:
        if not target.dtype.is_floating_point:
            raise RuntimeError(f"Expected floating point type for target with class probabilities, got {target.dtype}")
    else:
        _check_index_target(target, input, out_features)
    return CallShape(
        batched=batched,
        num_rows=input.shape[0] if batched else 1,
        in_features=in_features,
        num_classes=num_classes,
        out_features=out_features,
        target_is_probs=target_is_probs,
    )


def _check_index_target(target: torch.Tensor, input: torch.Tensor, out_features: tuple[int, ...]) -> None:
    expected = (*input.shape[:-1], *out_features)
    if input.dim() == 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
        )
    # An unbatched input with a (1,) target is accepted by the reference; it is routed there.
    if tuple(target.shape) != expected and not (input.dim() == 1 and tuple(target.shape) == (1,)):
        raise RuntimeError(
            f"expected target of class indices with shape {expected} (or class probabilities with the logits' shape "
            f"{(*input.shape[:-1], '(C)', *out_features)}), got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        dtype_name = {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.bool: "Bool"}.get(
            target.dtype, str(target.dtype).replace("torch.", "").capitalize()
        )
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {dtype_name}")


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise the reference's IndexError for a class index outside [0, C) that is not ``ignore_index``.

    Only for CPU tensors: on an accelerator this check would be a host-device sync, so there the backends mark
    such rows with a NaN loss instead (the reference raises a device-side assert).
    """
    if target.device.type != "cpu" or target.numel() == 0 or torch.compiler.is_compiling():
        return  # compiled graphs cannot branch on tensor values: the NaN marking in the backends takes over
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def check_extras(z_loss: float, logit_scale: float, logit_softcap: float | None) -> None:
    """ValueError naming the argument for a z-loss, logit scale or soft-cap outside its domain."""
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale!r}")
    if logit_softcap is not None and not (math.isfinite(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
