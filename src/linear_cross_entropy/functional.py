"""``linear_cross_entropy``: validate → normalise shapes → resolve options → dispatch to a backend → shape output.

The one place that knows every backend. ``options=None`` runs the reference path (logits materialised, exactly
``cross_entropy(linear(...))``); an options instance runs the chunked or fused path, which give the reference's
results and errors for every argument combination.
"""

from __future__ import annotations

import warnings

import torch

from . import validate
from .backends import chunked, fused
from .backends.common import LossParams
from .backends.reference import linear_cross_entropy_reference
from .options import LinearCrossEntropyOptions, resolve

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: LinearCrossEntropyOptions | None = None,
) -> torch.Tensor:
    r"""Cross entropy of ``input @ linear_weight.T + linear_bias`` against ``target``, without holding the logits.

    Same signature, defaults, results and errors as PyTorch 2.13's ``torch.nn.functional.linear_cross_entropy``;
    ``options=None`` is that function's reference path.

    Args:
        input: ``(F,)`` or ``(N, F)`` floating point.
        linear_weight: ``(C, F)``, or ``(C, d1, ..., dK, F)`` for a K-dimensional loss (batched input only).
        target: class indices (int64 or uint8) of shape ``()``, ``(N,)`` or ``(N, d1, ..., dK)``; or class
            probabilities (floating) shaped like the logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        linear_bias: ``(C, d1, ..., dK)`` or None.
        weight: class weights ``(C,)`` or None.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        ignore_index: class index whose rows are ignored (None: -100 for index targets; must be None for
            probabilities).
        label_smoothing: in ``[0, 1]``.
        options: None for the reference path; a :class:`LinearCrossEntropyOptions` for the chunked/fused paths.

    Returns:
        A scalar for ``"mean"``/``"sum"``; ``()``, ``(N,)`` or ``(N, d1, ..., dK)`` for ``"none"``; in the dtype of
        ``input``.
    """
    shape = validate.check_call(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing
    )
    reference_kwargs = dict(
        linear_bias=linear_bias,
        weight=weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    if options is None or (not shape.batched and tuple(target.shape) == (1,)):
        # The reference's own quirk (a (1,) target for an unbatched input) is served by the reference itself.
        return linear_cross_entropy_reference(input, linear_weight, target, **reference_kwargs)

    if torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad)):
        # Gradients no backend computes: the reference differentiates probability targets (and their class
        # weights) and raises for class weights that require grad with index targets. It serves the call.
        if shape.target_is_probs:
            warnings.warn(
                "linear_cross_entropy: target or weight (class weights) requires grad, which the chunked and fused "
                "paths do not compute; using the reference path (logits materialised) for this call.",
                stacklevel=2,
            )
        return linear_cross_entropy_reference(input, linear_weight, target, **reference_kwargs)

    lp = LossParams(
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=float(label_smoothing) if label_smoothing > 0 else 0.0,
        target_is_probs=shape.target_is_probs,
    )
    if not shape.target_is_probs:
        validate.check_target_range(target, shape.num_classes, lp.ignore_index)

    x = input if shape.batched else input.unsqueeze(0)
    backend = _choose_backend(options, lp, shape, x)
    ro = resolve(
        options,
        backend=backend,
        num_rows=shape.num_rows,
        in_features=shape.in_features,
        num_classes=shape.num_classes,
        dtype=x.dtype,
        device=x.device,
    )
    if backend == "fused":  # 2-D weight, index targets: the tensors go in as they are (no views to backprop through)
        loss = fused.linear_cross_entropy_fused(
            x, linear_weight, linear_bias, target.reshape(-1).long(), weight, lp, ro
        )
    else:  # normalised to x (N, F), w (C, K, F), b (C, K), target (N, K) or (N, C, K)
        k = shape.positions
        w = linear_weight.reshape(shape.num_classes, k, shape.in_features)
        b = None if linear_bias is None else linear_bias.reshape(shape.num_classes, k)
        if shape.target_is_probs:
            t = target.reshape(shape.num_rows, shape.num_classes, k)
        else:
            t = target.reshape(shape.num_rows, k).long()
        loss = chunked.linear_cross_entropy_chunked(x, w, b, t, weight, lp, ro)

    out_dtype = torch.promote_types(input.dtype, target.dtype) if shape.target_is_probs else input.dtype
    loss = loss.to(options.loss_dtype or out_dtype)
    if reduction == "none":
        loss = loss.reshape((*input.shape[:-1], *shape.out_features))
    return loss


def _choose_backend(options: LinearCrossEntropyOptions, lp: LossParams, shape, x: torch.Tensor) -> str:
    """``"fused"`` when asked for (or ``"auto"``) and it supports the call, else ``"chunked"``.

    An explicit ``backend="fused"`` that cannot serve the call warns once per call site with the reason.
    """
    if options.backend == "chunked":
        return "chunked"
    reason = fused.unsupported_reason(x, lp, shape, explicit=options.backend == "fused")
    if reason is None:
        return "fused"
    if options.backend == "fused":
        warnings.warn(
            f"linear_cross_entropy: backend='fused' unsupported here ({reason}); using 'chunked'.", stacklevel=3
        )
    return "chunked"
