r"""``token_log_probs``: per-token ``log p(target)`` and entropy, with gradients, without holding the logits.

What reinforcement learning on LLMs (PPO, GRPO, DPO, KTO) needs from the output head: for sampled tokens ``y``,
``log p_y`` per token and often the entropy ``H`` of each position's distribution, both differentiable. Per row,
with ``z`` the logits (``z = c·tanh(a·r/c)`` of ``r = x·Wᵀ + b`` with logit scale ``a`` and soft-cap ``c``, as in
:func:`~linear_cross_entropy.linear_cross_entropy`), ``lse = log Σ_c exp(z_c)`` and ``p = exp(z − lse)``::

    log p_y = z_y − lse                      = −ℓ   (ℓ the cross entropy of reduction="none")
    H       = −Σ_c p_c·log p_c  = lse − Σ_c p_c·z_c

Gradients. ``∂ log p_y/∂z = e_y − p``. For the entropy, ``∂lse/∂z_j = p_j`` and ``∂p_c/∂z_j = p_c(δ_cj − p_j)``
give ``∂(Σ_c p_c z_c)/∂z_j = p_j + p_j z_j − p_j Σ_c p_c z_c``, so::

    ∂H/∂z_j = p_j − (p_j + p_j z_j − p_j Σ p·z) = −p_j·(z_j − Σ p·z) = −p_j·(log p_j + H)

With per-row upstream gradients ``(g_l, g_H)`` one backward forms::

    ∂(g_l·log p_y + g_H·H)/∂z = g_l·(e_y − p) − g_H·p⊙(log p + H)
                              = s·(p − e_y) + p·(−g_H·H) + (−g_H)·p⊙log p,     s = −g_l

i.e. the cross entropy's ``dz = coef·p − target_coef·e_y`` with the row share ``s = −g_l``, ``coef`` lowered by
``g_H·H`` and one more per-row coefficient ``−g_H`` on ``p·log p`` (:func:`.backends.common.entropy_coefs`; the fused
row kernel's ``ENTROPY_GRAD``), then chained through soft-cap and scale as every ``dz`` is: ``dr = dz·a·(1 − tanh²)``.

Forward is the cross entropy's ``reduction="none"`` pass with the in-pass statistics (the entropy comes from
``Σ p·z``, already summed for the metrics); backward is its ``reduction="none"`` backward with the entropy's term:
on the fused path with one chunk (``N ≤ 2H`` in bf16 by default) the logits forward computed are kept and backward
runs only the second sweep and the two gradient GEMMs; in chunks backward recomputes the logits chunk by chunk.

Ignored positions (``target == ignore_index``) give ``log p = 0`` and ``H = 0`` with no gradient to anything.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import validate
from .backends import chunked
from .backends.common import Grads, LossParams, take_saved_grads
from .backends.reference import transform_logits
from .dispatch import choose_backend, resolve_for
from .options import LinearCrossEntropyOptions

__all__ = ["token_log_probs"]


def token_log_probs(
    input: torch.Tensor,  # (*, H)
    weight: torch.Tensor,  # (V, H)
    target: torch.Tensor,  # (*) int64 class indices
    *,
    linear_bias: torch.Tensor | None = None,  # (V,)
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    options: LinearCrossEntropyOptions | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""``log_softmax(z)[target]`` per token (and the entropy of ``softmax(z)``), ``z = softcap(logit_scale·(input ·
    weightᵀ + linear_bias))``, differentiable with respect to ``input``, ``weight`` and ``linear_bias``.

    Args:
        input: ``(*, H)`` hidden states (any leading shape, e.g. ``(B, T, H)``), fp16/bf16/fp32/fp64.
        weight: ``(V, H)`` the output head, same dtype and device as ``input``.
        target: ``(*)`` int64 (or uint8) class indices, ``input``'s leading shape; ``ignore_index`` marks
            positions that give 0 (log-prob and entropy) and no gradient.
        linear_bias: ``(V,)`` or None.
        logit_scale: ``a`` (temperature ``T``: ``a = 1/T``).
        logit_softcap: ``c > 0`` or None: ``z = c·tanh(a·r/c)`` (Gemma 2/3), after the scale.
        ignore_index: see ``target``.
        return_entropy: also return each position's entropy ``−Σ p·log p``, with its gradient.
        options: None: the logits are materialised (``log_softmax`` of them; the reference). A
            :class:`LinearCrossEntropyOptions`: the chunked or fused backend, chosen as for
            :func:`~linear_cross_entropy.linear_cross_entropy` (``backend="tiled"`` runs the fused path, with a
            warning). Only the backend, chunking and accumulation fields apply (``loss_dtype`` does not).

    Returns:
        ``log_probs`` ``(*)``, or ``(log_probs, entropy)`` with ``return_entropy``: fp32 for fp16/bf16/fp32 inputs
        (a ratio ``exp(log p − log p_old)`` needs more than bf16's 8 bits), fp64 for fp64.
    """
    if input.dim() < 1:
        raise RuntimeError("token_log_probs: expected input of shape (*, H), got a 0-dimensional tensor")
    if weight.dim() != 2:
        raise RuntimeError(f"token_log_probs: expected weight of shape (V, H), got shape {tuple(weight.shape)}")
    if target.is_floating_point() or tuple(target.shape) != tuple(input.shape[:-1]):
        raise RuntimeError(
            f"token_log_probs: expected target of class indices with input's leading shape {tuple(input.shape[:-1])}, "
            f"got {'floating ' if target.is_floating_point() else ''}shape {tuple(target.shape)}"
        )
    if not isinstance(ignore_index, int):
        raise TypeError(f"token_log_probs: ignore_index must be an int, got {type(ignore_index).__name__}")
    x, t = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    shape = validate.check_call(x, weight, t, linear_bias, None, "none", ignore_index, 0.0)
    validate.check_extras(0.0, logit_scale, logit_softcap)
    validate.check_target_range(t, shape.num_classes, ignore_index)
    t = t.long()
    lp = LossParams(
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=0.0,
        target_is_probs=False,
        logit_scale=float(logit_scale),
        logit_softcap=float(logit_softcap or 0.0),
        metrics=return_entropy,  # the entropy is one of the in-pass statistics
    )
    if options is None:
        log_probs, entropy = _materialised(x, weight, linear_bias, t, lp)
    else:
        backend = choose_backend(options, lp, shape, x)
        if backend == "tiled":
            warnings.warn(
                "token_log_probs: backend='tiled' has no per-token path; using 'fused'.",
                stacklevel=2,
            )
            backend = "fused"
        ro = resolve_for(options, backend, shape, x, weight, shape.num_classes)
        if backend == "fused":
            from .backends.fused.function import blas_ready

            x, weight = blas_ready(x), blas_ready(weight)
        grads = Grads.of(x, weight, linear_bias)
        log_probs, entropy = _TokenLogProbs.apply(x, weight, linear_bias, t.contiguous(), lp, ro, backend, grads)
    log_probs = log_probs.reshape(target.shape)
    return (log_probs, entropy.reshape(target.shape)) if return_entropy else log_probs


def _materialised(x, w, b, t, lp: LossParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: the ``(N, V)`` logits in the input's dtype, ``log_softmax`` in (at least) fp32, autograd."""
    z = transform_logits(F.linear(x, w, b).to(torch.promote_types(x.dtype, torch.float32)), lp)
    log_p = torch.log_softmax(z, dim=-1)
    keep = t != lp.ignore_index
    log_probs = torch.where(keep, log_p.gather(1, torch.where(keep, t, 0)[:, None])[:, 0], 0.0)
    if not lp.metrics:
        return log_probs, None
    return log_probs, torch.where(keep, -(log_p.exp() * log_p).sum(dim=-1), 0.0)


class _TokenLogProbs(torch.autograd.Function):
    """Outputs ``(log_probs (N,), entropy (N,) or empty)``, both differentiable: the chunked or fused backend's
    ``reduction="none"`` forward (with its statistics for the entropy) and its backward with the upstream gradient
    ``−g_l`` per row and the entropy's ``(H, g_H)``."""

    @staticmethod
    def forward(ctx, x, w, b, target, lp: LossParams, ro, backend: str, grads: Grads):
        ctx.set_materialize_grads(False)
        ctx.lp, ctx.ro, ctx.backend, ctx.grads, ctx.w_dtype = lp, ro, backend, grads, w.dtype
        # The fused path keeps one chunk's logits for backward, whose second sweep then needs no recomputation.
        ctx.deferred = backend == "fused" and grads.any and ro.batch_chunk_size >= x.shape[0]
        if backend == "fused":
            from .backends.fused.function import forward_none

            loss, _, stats, ctx.saved_grads = forward_none(x, w, b, target, None, lp, ro, grads, ctx.deferred)
        else:
            loss, _, stats, _ = chunked.forward_pass(
                x, w[:, None], None if b is None else b[:, None], target[:, None], None, lp, ro, grads
            )
        keep = target != lp.ignore_index
        log_probs = torch.where(keep, -loss[:, 0], 0.0)
        entropy = torch.where(keep, stats[:, 0, 1], 0.0) if lp.metrics else log_probs.new_empty(0)
        ctx.save_for_backward(x, w, b, target, entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        x, w, b, target, entropy = ctx.saved_tensors
        if grad_log_probs is None:  # only the entropy is used
            share = torch.zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        else:
            share = -grad_log_probs  # the cross entropy's row share: log p = −ℓ
        entropy_grad = None if grad_entropy is None or not ctx.lp.metrics else (entropy, grad_entropy)
        lp = LossParams(
            reduction="none",
            ignore_index=ctx.lp.ignore_index,
            label_smoothing=0.0,
            target_is_probs=False,
            logit_scale=ctx.lp.logit_scale,
            logit_softcap=ctx.lp.logit_softcap,
        )
        if ctx.backend == "fused":
            from .backends.fused import function as fused
            from .backends.fused.vocab_major import deferred_grads

            if entropy_grad is not None:
                entropy_grad = tuple(t.float().contiguous() for t in entropy_grad)
            if ctx.deferred:
                logits, lse, coefs = take_saved_grads(ctx)
                gx, gw, gb = deferred_grads(
                    logits,
                    lse,
                    coefs,
                    x,
                    w,
                    b,
                    target,
                    None,
                    lp,
                    share[:, None],
                    ctx.grads,
                    in_place=not ctx.ro.allow_retain_graph,
                    entropy_grad=entropy_grad,
                )
                gb = None if gb is None else gb.to(ctx.w_dtype)
            else:
                gx, gw, gb = fused.backward_none(
                    x, w, b, target, None, lp, ctx.ro, ctx.grads, share[:, None], entropy_grad=entropy_grad
                )
        else:
            entropy_grad = None if entropy_grad is None else tuple(t[:, None] for t in entropy_grad)
            gx, gw, gb = chunked.backward_none(
                x,
                w[:, None],
                None if b is None else b[:, None],
                target[:, None],
                None,
                lp,
                ctx.ro,
                ctx.grads,
                share[:, None],
                entropy_grad=entropy_grad,
            )
            gw = None if gw is None else gw[:, 0]
            gb = None if gb is None else gb[:, 0]
        return gx, gw, gb, None, None, None, None, None
