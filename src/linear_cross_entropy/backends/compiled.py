"""The backends as ``torch.library`` custom ops, for ``torch.compile``.

Dynamo cannot trace the backends' chunk loops and Triton launches into one graph, and the eager autograd
Functions keep state (the gradients forward computed) on ``ctx`` that compiled autograd does not carry. Under
``torch.compile`` the functional form therefore calls :func:`run`: one opaque op per call
(``linear_cross_entropy::forward``) with a fake kernel for shapes, whose outputs include the gradients for an
upstream gradient of 1 (the fused path's fp32 accumulators still in fp32), and an autograd formula that scales
them and rounds them once to the parameters' dtypes (``reduction="none"`` calls a second op,
``linear_cross_entropy::backward_none``, which recomputes). Compiled, the gradients are always kept out of place
(as ``allow_retain_graph=True``): compiled graphs cannot consume them in place. The settings travel as one
string key that the ops parse back into the frozen parameter objects, so the ops' schemas stay small.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import torch

from .common import STATS, Grads, LossParams, ResolvedOptions

__all__ = ["run"]


def _key(backend: str, lp: LossParams, ro: ResolvedOptions, grads: Grads) -> str:
    """The settings as one string, the custom ops' one settings argument (their schemas take no dataclass on the
    torch versions we support): the fields' values in declaration order (from the fields: a dataclass ``repr`` is
    not traceable). Self-describing, because the fake kernel runs while Dynamo traces, before any side effect;
    :func:`_settings` reads it back by each field's declared type."""
    return _SEP.join(
        [backend] + [str(getattr(obj, f.name)) for obj in (lp, ro, grads) for f in dataclasses.fields(obj)]
    )


_SEP = "|"
_SETTINGS_TYPES = (LossParams, ResolvedOptions, Grads)
_DECODE = {  # a field's type -> how its str() is read back (exact: str() of a float round-trips)
    str: str,
    int: int,
    float: float,
    bool: {"True": True, "False": False}.__getitem__,
    torch.dtype: lambda text: getattr(torch, text.removeprefix("torch.")),
}
# (class, ((field, decoder), ...)) from each field's resolved type, once: a field of a type the key cannot carry
# fails here, at import, not at the first compiled call.
_FIELD_DECODERS = tuple(
    (cls, tuple((f.name, _DECODE[typing.get_type_hints(cls)[f.name]]) for f in dataclasses.fields(cls)))
    for cls in _SETTINGS_TYPES
)


@functools.cache
def _settings(key: str) -> tuple[str, LossParams, ResolvedOptions, Grads]:
    backend, *values = key.split(_SEP)
    objects = []
    for cls, decoders in _FIELD_DECODERS:
        objects.append(cls(**{name: decode(values.pop(0)) for name, decode in decoders}))
    assert not values, key
    return (backend, *objects)


def _backend(name: str):
    if name == "fused":
        from .fused import function

        return function
    if name == "tiled":
        from .tiled import function

        return function
    from . import chunked

    return chunked


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("linear_cross_entropy::forward", mutates_args=())
def _forward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    key: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend, lp, ro, grads = _settings(key)
    module = _backend(backend)
    loss, lse, stats, saved = module.forward_pass(x, w, b, target, class_weight, lp, ro, grads)
    gx, gw, gb = saved if saved is not None else (None, None, None)
    # the fused path's fp32 accumulators stay fp32 (saved_grad_dtypes) until the formula scales them
    if backend != "fused":
        gw = None if gw is None else gw.to(w.dtype)
        gb = None if gb is None else gb.to(b.dtype)
    return (
        loss,
        lse,
        _empty(lse) if stats is None else stats,
        _empty(x) if gx is None else gx,
        _empty(w) if gw is None else gw,
        _empty(lse) if gb is None else gb,
    )


@_forward.register_fake
def _(x, w, b, target, class_weight, key):
    backend, lp, ro, grads = _settings(key)
    n = x.shape[0]
    k = w.shape[1] if backend == "chunked" else 1
    sdt = torch.float64 if ro.acc_dtype == torch.float64 else torch.float32
    scalar_grads = lp.reduction != "none" and grads.any
    loss = x.new_empty((n, k) if lp.reduction == "none" else (), dtype=sdt)
    lse = x.new_empty((n, k), dtype=sdt)
    stats = x.new_empty((n, k, len(STATS)), dtype=sdt) if lp.metrics else x.new_empty(0, dtype=sdt)
    gx_dtype, gw_dtype, gb_dtype = x.dtype, w.dtype, None if b is None else b.dtype
    if backend == "fused" and scalar_grads:
        from .fused.function import saved_grad_dtypes

        gx_dtype, gw_dtype, gb_dtype = saved_grad_dtypes(lp, ro, grads, x, w)
    gx = torch.empty_like(x, dtype=gx_dtype) if scalar_grads and grads.input else x.new_empty(0)
    gw = torch.empty_like(w, dtype=gw_dtype) if scalar_grads and grads.weight else w.new_empty(0)
    gb = torch.empty_like(b, dtype=gb_dtype) if scalar_grads and grads.bias else x.new_empty(0, dtype=sdt)
    return loss, lse, stats, gx, gw, gb


@torch.library.custom_op("linear_cross_entropy::backward_none", mutates_args=())
def _backward_none(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    grad_out: torch.Tensor,
    key: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend, lp, ro, grads = _settings(key)
    gx, gw, gb = _backend(backend).backward_none(x, w, b, target, class_weight, lp, ro, grads, grad_out)
    return (
        _empty(x) if gx is None else gx,
        _empty(w) if gw is None else gw.to(w.dtype),
        _empty(x) if gb is None else gb.to(b.dtype),
    )


@_backward_none.register_fake
def _(x, w, b, target, class_weight, grad_out, key):
    _, _, _, grads = _settings(key)
    return (
        torch.empty_like(x) if grads.input else x.new_empty(0),
        torch.empty_like(w) if grads.weight else w.new_empty(0),
        torch.empty_like(b) if grads.bias else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, w, b, target, class_weight, key = inputs
    _, _, _, gx, gw, gb = output
    ctx.key = key
    ctx.save_for_backward(x, w, b, target, class_weight, gx, gw, gb)


def _backward(ctx, grad_loss, _grad_lse, _grad_stats, _gx, _gw, _gb):
    x, w, b, target, class_weight, gx, gw, gb = ctx.saved_tensors
    _, lp, _, grads = _settings(ctx.key)
    if lp.reduction == "none":
        gx, gw, gb = _backward_none(x, w, b, target, class_weight, grad_loss, ctx.key)
    else:
        # scaled, then rounded once to the parameters' dtypes (the fused path may save fp32 accumulators)
        gx = (gx * grad_loss).to(x.dtype)
        gw = (gw * grad_loss).to(w.dtype)
        gb = gb * grad_loss if b is None else (gb * grad_loss).to(b.dtype)
    return (
        gx if grads.input else None,
        gw if grads.weight else None,
        gb if grads.bias else None,
        None,
        None,
        None,
    )


_forward.register_autograd(_backward, setup_context=_setup_context)


def run(backend: str, x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions) -> tuple:
    """``(loss, lse, stats)`` through the custom ops (the same values as the eager backends)."""
    if backend == "fused":
        from .fused.function import blas_ready

        x, w, target = blas_ready(x), blas_ready(w), target.contiguous()
    elif backend == "tiled":
        target = target.contiguous()
    key = _key(backend, lp, ro, Grads.of(x, w, b))
    loss, lse, stats = _forward(x, w, b, target, class_weight, key)[:3]
    return loss, lse, stats
