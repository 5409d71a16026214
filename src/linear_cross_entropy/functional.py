"""``linear_cross_entropy``: validate → normalise shapes → resolve options → dispatch to a backend → shape output.

The one place that knows every backend. ``options=None`` runs the reference path (logits materialised, exactly
``cross_entropy(linear(...))``); an options instance runs the chunked or fused path, which give the reference's
results and errors for every argument combination.
"""

from __future__ import annotations

import contextlib

import torch

from . import dispatch, distributed, dtensor, validate
from .backends.common import LossParams, backward_once, keep_mask, summarize_metrics
from .backends.reference import linear_cross_entropy_reference, reference_with_extras
from .metrics import LinearCrossEntropyOutput, LossMetrics
from .options import LinearCrossEntropyOptions, materializes

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
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    return_metrics: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
    input_grad_all_reduce: bool = True,
) -> torch.Tensor | LinearCrossEntropyOutput:
    r"""Cross entropy of ``input @ linear_weight.T + linear_bias`` against ``target``, without holding the logits.

    Same signature, defaults, results and errors as PyTorch 2.13's ``torch.nn.functional.linear_cross_entropy``;
    ``options=None`` is that function's reference path. The keyword arguments after ``options`` are ours and
    default to off (a call that uses none of them is exactly PyTorch's).

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
        z_loss: ``λ >= 0``: adds ``λ·lse²`` per row that takes part, reduced like the loss (the mean divides by the
            number of such rows); gradient ``2λ·lse·softmax``.
        logit_scale: ``a``: the loss sees ``a·(x·Wᵀ + b)`` (temperature, muP output multiplier).
        logit_softcap: ``c > 0`` or None: the loss sees ``c·tanh(z/c)`` (Gemma 2), after the scale.
        return_metrics: also return :class:`LossMetrics` computed in the same pass (see :mod:`.metrics`).
        process_group: vocabulary parallel (see :mod:`.distributed`): rank ``r`` of this
            ``torch.distributed.ProcessGroup`` holds the ``r``-th contiguous slice of the vocabulary (in rank order;
            uneven slices allowed) — its rows of ``linear_weight``, of ``linear_bias`` and of ``weight`` (class
            weights, shape ``(local_C,)``) — while ``input`` and ``target`` (global class indices in
            ``[0, Σ local_C)``) are the same on every rank. Every rank returns the loss (and metrics) of the whole
            vocabulary and its own slices of the weight and bias gradients. The backend is chosen as without a
            group (the fused path on CUDA for fp16/bf16/fp32, else the chunked path); ``options=None`` runs as
            ``LinearCrossEntropyOptions()`` (the reference path cannot shard). Index targets and a 2-D
            ``linear_weight`` only (NotImplementedError otherwise). None: not sharded.
        input_grad_all_reduce: with ``process_group``, all-reduce (SUM) ``grad_input`` over the group so every rank
            gets the full input gradient (default). Megatron-style callers that all-reduce the input gradient of
            the tensor-parallel region themselves pass False and get this rank's partial sum.

    Returns:
        A scalar for ``"mean"``/``"sum"``; ``()``, ``(N,)`` or ``(N, d1, ..., dK)`` for ``"none"``; in the dtype of
        ``input`` (fp32 under autocast, as ``cross_entropy``; ``options.loss_dtype`` when set). With
        ``return_metrics``, a :class:`LinearCrossEntropyOutput` ``(loss, metrics)``.
    """
    options = validate.check_options(options)
    if dtensor.involves_dtensor(input, linear_weight, target, linear_bias, weight):
        # Tensor parallel (see .dtensor): the same call on the local tensors, vocabulary-parallel over the mesh.
        local = dtensor.to_local_call(
            input, linear_weight, target, linear_bias, weight, reduction, process_group, input_grad_all_reduce
        )
        return local.wrap(
            linear_cross_entropy(
                local.input, local.linear_weight, local.target, linear_bias=local.linear_bias, weight=local.weight,
                reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
                z_loss=z_loss, logit_scale=logit_scale, logit_softcap=logit_softcap, return_metrics=return_metrics,
                process_group=local.process_group, input_grad_all_reduce=local.input_grad_all_reduce,
            )
        )  # fmt: skip
    shape = validate.check_call(
        input,
        linear_weight,
        target,
        linear_bias,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        any_float_class_weight=options is not None or process_group is not None,
    )
    validate.check_extras(z_loss, logit_scale, logit_softcap)
    reference_weight, weight = _class_weights(weight, input)
    shard = None
    if process_group is not None:
        shard = _vocab_shard(
            process_group, input_grad_all_reduce, shape, input, linear_weight, target, linear_bias, weight
        )
        if options is None:  # the reference path cannot shard: the fused (CUDA) or chunked path serves the call
            options = LinearCrossEntropyOptions()
    extras = bool(z_loss) or logit_scale != 1.0 or logit_softcap is not None or return_metrics
    reference_kwargs = dict(
        linear_bias=linear_bias,
        weight=reference_weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    if shard is None and not extras and (options is None or (not shape.batched and tuple(target.shape) == (1,))):
        # The reference's own quirk (a (1,) target for an unbatched input) is served by the reference itself.
        return linear_cross_entropy_reference(input, linear_weight, target, **reference_kwargs)
    if shard is None and not extras and _materializes(options, shape, input, weight):
        # Small CPU call with default options: PyTorch's own computation, bit for bit (its out-of-range targets
        # raise PyTorch's own IndexError).
        loss = linear_cross_entropy_reference(input, linear_weight, target, **reference_kwargs)
        return loss if options.allow_retain_graph else backward_once(loss)

    lp = _loss_params(
        shape, reduction, ignore_index, label_smoothing, z_loss, logit_scale, logit_softcap, return_metrics
    )
    if options is not None and not extras and _target_needs_grad(target, weight, shape):
        return linear_cross_entropy_reference(input, linear_weight, target, **reference_kwargs)
    if not shape.target_is_probs and options is not None:
        num_classes = shape.num_classes if shard is None else shard.num_classes
        validate.check_target_range(target, num_classes, lp.ignore_index)

    loss, lse, stats, t = _compute(options, lp, shape, input, linear_weight, linear_bias, target, weight, shard)
    return _output(loss, lse, stats, t, lp, input.shape[:-1], shape.out_features)


def _materializes(options, shape, input, weight) -> bool:
    """A small CPU call with default options and index targets: PyTorch's own computation beats chunking
    (:func:`.options.materializes`). Only where it is exactly PyTorch's call: not with class weights in another
    dtype (the backends keep them in the loss's precision), not under autocast (the backends' path casts),
    torch.compile or a torch.func transform (the custom op's path: one graph, and NaN for a class index that cannot
    be checked eagerly)."""
    if options is None or shape.target_is_probs or dispatch.autocast_enabled(input.device.type):
        return False
    if weight is not None and weight.dtype != input.dtype:
        return False
    if torch.compiler.is_compiling() or dispatch.under_functorch():
        return False
    num_logits = shape.num_rows * shape.num_classes * shape.positions
    return materializes(options, num_logits=num_logits, dtype=input.dtype, device=input.device)


def _class_weights(weight, input):
    """``(for the reference, for the backends)``: class weights of another floating dtype (the options path only,
    as PyTorch's chunked path) go to the backends in the precision the loss accumulates in (fp32, fp64 for fp64
    input), and to the reference in the input's dtype, the only one it takes."""
    if weight is None or weight.dtype == input.dtype:
        return weight, weight
    return weight.to(input.dtype), weight.to(torch.promote_types(input.dtype, torch.float32))


def _target_needs_grad(target, weight, shape) -> bool:
    """Whether the call asks for gradients no backend computes: the reference differentiates probability targets
    (and their class weights, with a warning here) and raises for class weights that require grad with index
    targets; it serves such calls."""
    if not torch.is_grad_enabled() or not (target.requires_grad or (weight is not None and weight.requires_grad)):
        return False
    if shape.target_is_probs:
        dispatch.warn(
            "linear_cross_entropy: target or weight (class weights) requires grad, which the chunked and fused "
            "paths do not compute; using the reference path (logits materialised) for this call."
        )
    return True


def _compute(options, lp: LossParams, shape, input, linear_weight, linear_bias, target, weight, shard):
    """``(loss in the output dtype, lse, stats, target as (N, K) or (N, C, K))`` from the reference with our
    additions (``options=None``) or a backend, under autocast as ``cross_entropy(linear(x))`` would be."""
    out_dtype = torch.promote_types(input.dtype, target.dtype) if shape.target_is_probs else input.dtype
    device_type = input.device.type
    autocasting = options is not None and dispatch.autocast_enabled(device_type)
    if autocasting:
        # As cross_entropy(linear(x)) under autocast: the GEMMs in the autocast dtype, the loss and its reductions
        # in fp32, gradients in the parameters' own dtypes (autograd casts them back through these casts).
        cast = torch.get_autocast_dtype(device_type)
        input, linear_weight = input.to(cast), linear_weight.to(cast)
        linear_bias = None if linear_bias is None else linear_bias.to(cast)
        out_dtype = torch.float32

    x = input if shape.batched else input.unsqueeze(0)
    k = shape.positions
    if shape.target_is_probs:
        t = target.reshape(shape.num_rows, shape.num_classes, k)
    else:
        t = target.reshape(shape.num_rows, k).long()
    with torch.autocast(device_type, enabled=False) if autocasting else contextlib.nullcontext():
        if options is None:  # the reference path with our additions
            loss, lse, stats = reference_with_extras(
                x, *dispatch.per_position(shape, linear_weight, linear_bias), t, weight, lp
            )
        else:
            loss, lse, stats = dispatch.run_backend(options, lp, shape, x, linear_weight, linear_bias, t, weight, shard)
    if options is not None and options.loss_dtype is not None:
        out_dtype = options.loss_dtype
    return loss.to(out_dtype), lse, stats, t


def _loss_params(shape, reduction, ignore_index, label_smoothing, z_loss, logit_scale, logit_softcap, metrics):
    """The loss's settings resolved (no None), as every backend reads them."""
    return LossParams(
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=float(label_smoothing) if label_smoothing > 0 else 0.0,
        target_is_probs=shape.target_is_probs,
        z_loss=float(z_loss),
        logit_scale=float(logit_scale),
        logit_softcap=float(logit_softcap or 0.0),
        metrics=metrics,
    )


def _output(loss, lse, stats, t, lp: LossParams, batch_shape, out_features):
    """The loss shaped as the reference's (``"none"``: the input's batch shape and the K positions), and the
    metrics from the per-row statistics when asked for."""
    if lp.reduction == "none":
        loss = loss.reshape((*batch_shape, *out_features))
    if not lp.metrics:
        return loss
    keep = keep_mask(t, lp)
    sdt = torch.promote_types(lse.dtype, torch.float32)
    metrics = summarize_metrics(stats.reshape(*lse.shape, -1).to(sdt), lse.to(sdt), keep, lp)
    if lp.reduction == "none":
        metrics = {name: value.reshape(loss.shape) for name, value in metrics.items()}
    return LinearCrossEntropyOutput(loss, LossMetrics(**metrics))


def _vocab_shard(process_group, input_grad_all_reduce, shape, input, linear_weight, target, linear_bias, weight):
    """This rank's :class:`.distributed.VocabShard`, after the checks that need no communication."""
    if shape.target_is_probs:
        raise NotImplementedError("linear_cross_entropy: process_group with class-probability targets (target)")
    if shape.out_features:
        raise NotImplementedError(
            "linear_cross_entropy: process_group with a K-dimensional loss (linear_weight of dimension "
            f"{linear_weight.dim()}); only a 2-D linear_weight is supported"
        )
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("linear_cross_entropy: process_group with weight (class weights) requiring grad")
    if torch.compiler.is_compiling():
        raise NotImplementedError("linear_cross_entropy: process_group under torch.compile")
    if dispatch.under_functorch():
        raise NotImplementedError("linear_cross_entropy: process_group under a torch.func transform (vmap, grad)")
    return distributed.make_shard(
        process_group, input, linear_weight, target, linear_bias, weight, input_grad_all_reduce
    )
