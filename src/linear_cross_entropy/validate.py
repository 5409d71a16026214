"""Every input check of ``linear_cross_entropy``, with the reference path's exception types.

The reference (``options=None``) is ``cross_entropy(linear(input, W, b).reshape(logits_shape), target, ...)``; these
checks raise what it raises before any backend runs, so every backend fails the same way: the same type, and
PyTorch 2.13's own message first (what users' tests match), followed by ours where it names the argument that
PyTorch's leaves unnamed. :func:`check_call` returns what the checks learned about the call.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .options import TORCH_FIELDS, LinearCrossEntropyOptions

__all__ = [
    "CallShape",
    "check_call",
    "check_extras",
    "check_label_smoothing",
    "check_options",
    "check_target_range",
    "REDUCTIONS",
]

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
    *,
    any_float_class_weight: bool = False,
) -> CallShape:
    """Raise the reference's exception for bad input; return the call's shape description.

    ``any_float_class_weight``: the call runs on the options path, which takes class weights (``weight``) of any
    floating dtype (as PyTorch's chunked path does; the reference requires the input's dtype).
    """
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
        if tensor is not None:
            _check_operand(name, tensor, input)
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"expected a floating-point input, got {input.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    check_label_smoothing(label_smoothing)
    if label_smoothing > 1.0:  # negative values act as 0, as in the reference
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if weight is not None:
        _check_class_weight(weight, input, num_classes, any_float_class_weight)
    if target.device != input.device:
        raise RuntimeError(f"expected target on the device of input ({input.device}), got {target.device}")

    if target_is_probs:
        if not target.dtype.is_floating_point:
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got {_scalar_name(target.dtype)}"
            )
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


def _check_operand(name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    """``linear_weight`` / ``linear_bias`` on the input's device and in its dtype (PyTorch's GEMM words first)."""
    if tensor.device != input.device:
        raise RuntimeError(f"expected {name} on the device of input ({input.device}), got {tensor.device}")
    if tensor.dtype != input.dtype:
        # PyTorch's words come from the GEMM that meets the mismatch: mm for the weight, addmm for the bias.
        torch_words = (
            f"expected m1 and m2 to have the same dtype, but got: {_cpp_name(input.dtype)} != {_cpp_name(tensor.dtype)}"
            if name == "linear_weight"
            else f"self and mat2 must have the same dtype, but got {_scalar_name(tensor.dtype)} and "
            f"{_scalar_name(input.dtype)}"
        )
        raise RuntimeError(
            f"{torch_words}. Expected {name} dtype to match input dtype ({input.dtype}), got {tensor.dtype}"
        )


def _check_class_weight(weight: torch.Tensor, input: torch.Tensor, num_classes: int, any_float: bool) -> None:
    """Class weights of size C, floating (the input's dtype unless ``any_float``), on the input's device."""
    if tuple(weight.shape) != (num_classes,):
        raise RuntimeError(
            f"weight tensor should be defined either for all {num_classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    if not weight.dtype.is_floating_point or (weight.dtype != input.dtype and not any_float):
        raise RuntimeError(
            f"expected scalar type {_scalar_name(input.dtype)} but found {_scalar_name(weight.dtype)}. Expected "
            f"weight (class weights) of dtype {input.dtype}"
            + (" or another floating dtype" if any_float else "")
            + f", got {weight.dtype}"
        )
    if weight.device != input.device:
        raise RuntimeError(
            f"expected weight (class weights) on the device of input ({input.device}), got {weight.device}"
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
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_scalar_name(target.dtype)}")


def _scalar_name(dtype: torch.dtype) -> str:
    """PyTorch's ScalarType name of ``dtype`` (``Double``, ``Long``, ``BFloat16``), as its C++ messages spell it."""
    return torch.empty(0, dtype=dtype).type().rpartition(".")[2].removesuffix("Tensor")


def _cpp_name(dtype: torch.dtype) -> str:
    """The C++ type name of ``dtype`` in PyTorch's messages (``double``, ``float``, ``c10::BFloat16``)."""
    return {torch.float64: "double", torch.float32: "float"}.get(dtype) or f"c10::{_scalar_name(dtype)}"


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise the reference's IndexError for a class index outside [0, C) that is not ``ignore_index``.

    Only for CPU tensors: on an accelerator this check would be a host-device sync, so there the backends mark
    such rows with a NaN loss instead (the reference raises a device-side assert). The same marking serves a target
    whose values cannot decide a Python branch (:func:`_holds_values`).
    """
    if target.device.type != "cpu" or target.numel() == 0 or not _holds_values(target):
        return  # the NaN marking in the backends takes over
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


def _holds_values(target: torch.Tensor) -> bool:
    """Whether Python can branch on ``target``'s values: not while compiling, not for a tensor subclass (fake,
    functional, composite-compliance and other wrapper tensors), not for a functorch-wrapped tensor (a ``vmap``
    batch or a ``grad`` level), none of which may take part in data-dependent control flow."""
    return not (
        torch.compiler.is_compiling()
        or type(target) is not torch.Tensor
        or torch._C._functorch.is_functorch_wrapped_tensor(target)
    )


def check_label_smoothing(label_smoothing: float) -> None:
    """ValueError for a NaN ``label_smoothing``, which the reference would turn into a NaN loss (NaN compares
    false with everything, so it slips through range checks)."""
    if math.isnan(label_smoothing):
        raise ValueError(f"label_smoothing must be a number in [0.0, 1.0], got {label_smoothing!r}")


def check_options(options):
    """``options`` as a :class:`.LinearCrossEntropyOptions` or None; PyTorch's own ``LinearCrossEntropyOptions``
    (torch >= 2.13) is taken as ours with the same five fields. TypeError for anything else."""
    if options is None or isinstance(options, LinearCrossEntropyOptions):
        return options
    torch_options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if torch_options is not None and isinstance(options, torch_options):
        return LinearCrossEntropyOptions(**{name: getattr(options, name) for name in TORCH_FIELDS})
    hint = " (build one with LinearCrossEntropyOptions(**options))" if isinstance(options, dict) else ""
    raise TypeError(f"options must be None or a LinearCrossEntropyOptions, got {type(options).__name__}{hint}")
