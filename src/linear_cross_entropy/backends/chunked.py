r"""The chunked path: pure PyTorch, any device; never more than one chunk's ``(rows, C)`` logits alive.

Notation (one loss position; K-dimensional losses repeat it for each of the K positions): ``z = x·Wᵀ + b`` the
logits of a row, ``lse = log Σ_c exp(z_c)``, ``p = exp(z − lse)``, ``ε`` the label smoothing, ``w`` the class
weights (ones when absent), ``W_sum = Σ_c w_c``, ``m = [y ≠ ignore_index]``.

Class indices ``y``::

    ℓ = m·[(1−ε)·w_y·(lse − z_y) + (ε/C)·(W_sum·lse − Σ_c w_c z_c)]
    ∂ℓ/∂z = m·[((1−ε)·w_y + (ε/C)·W_sum)·p − (1−ε)·w_y·e_y − (ε/C)·w]

Class probabilities ``P``, with ``P' = (1−ε)·P + ε/C`` and ``q = w ⊙ P'``::

    ℓ = Σ_c q_c·(lse − z_c),     ∂ℓ/∂z = (Σ_c q_c)·p − q

A row's gradient is ``s·∂ℓ/∂z`` with ``s`` the row's share of the upstream gradient (``1/Σ m·w_y`` for index
mean, ``1/(N·K)`` for probability mean, 1 for sum, the per-row upstream value for ``none``), plus the z-loss's
``s_z·2λ·lse·p`` (``s_z = m/Σ m`` for mean), and then ``grad_input = dr·W``, ``grad_weight = drᵀ·x``,
``grad_bias = Σ_rows dr``.

Logit scale ``a`` and soft-capping ``c`` act between the GEMM's ``r = x·Wᵀ + b`` and the loss:
``z = c·tanh(a·r/c)``, so ``dr = dz·a·(1 − tanh²(a·r/c))`` (``dr = a·dz`` without capping).

For the scalar reductions the gradient is linear in the (scalar) upstream gradient, so forward computes the
gradients for an upstream gradient of 1 in the same sweep as the loss, and backward only scales them — two GEMM
sweeps fewer than recomputing. ``reduction="none"`` cannot do that (the upstream gradient is per row), so its
backward recomputes the logits chunk by chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .chunked_gemm import accumulate_grads, chunk_buffers, concat_outputs, finish_grads, logits_gemm
from .chunked_rows import (
    chain_rule,
    index_grad,
    into,
    is_plain,
    plain_index_rows,
    probability_rows,
    shifted_exp,
    transform_logits,
)
from .common import (
    STATS,
    Grads,
    IndexRowSums,
    LossParams,
    ResolvedOptions,
    function_outputs,
    index_rows,
    keep_mask,
    reduce_total,
    row_scales,
    stat_dtype,
    take_saved_grads,
)
from .partials import Partials, combine_partials

if TYPE_CHECKING:
    from .partials import VocabShard

__all__ = ["linear_cross_entropy_chunked", "chunk_loss_and_grad", "forward_pass", "backward_none"]


def chunk_loss_and_grad(
    raw: torch.Tensor,  # (r, C) GEMM output (x·Wᵀ + b) in the accumulation dtype; consumed
    target: torch.Tensor,  # (r,) int64 indices or (r, C) probabilities
    class_weight: torch.Tensor | None,  # (C,) in the stats dtype
    lp: LossParams,
    ce_scale: torch.Tensor | None,  # (r,) upstream share per row (stats dtype), or None for loss only
    z_scale: torch.Tensor | None,  # (r,) the z-loss's share per row, with ce_scale
    shard: VocabShard | None = None,  # vocabulary parallel: raw holds this rank's columns (index targets only)
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (r,) H and g_H, with ce_scale (index targets)
    out: torch.Tensor | None = None,  # (r, C) where dr goes (default raw): the GEMM's buffer, in its dtype
):
    """Per-row cross entropy ``(r,)``, lse ``(r,)`` and statistics ``(r, len(STATS))`` (or None), in the stats
    dtype, and, when ``ce_scale`` is given, ``dr`` in ``out`` (else None).

    Plain class-index rows take :func:`.chunked_rows.plain_index_rows` (one fused log-softmax). Otherwise the
    softmax is formed in place (``z ← exp(z − m)``, ``m`` the row max) so a block needs no second ``(r, C)``
    temporary, and ``lse − z_y`` is taken as ``(m − z_y) + log Σ exp(z − m)``, which keeps small losses next to
    large logits exact.

    With a ``shard`` (:mod:`..distributed`), ``raw`` holds the columns ``[offset, offset + C_local)`` of a
    ``shard.num_classes`` vocabulary and ``class_weight`` their weights: every per-row statistic is first formed
    over the local columns (the max, then ``Σ exp(z − m)``, ``z_y``, ``w_y``, ``Σ w_c z_c``, ``Σ e·log e``,
    ``Σ z²``, each a sum over classes) and combined across the group by ``shard``'s all-reduces before the loss and
    ``dz`` use them; ``dz`` is then this rank's columns of the global gradient. Without a shard the combine steps
    are skipped and the arithmetic is the same.

    With ``entropy_grad`` (each row's entropy ``H`` and its upstream gradient ``g_H``), ``dr`` also carries
    ``g_H·∂H/∂z`` (:func:`.common.entropy_coefs`).
    """
    out = raw if out is None else out
    if shard is None and entropy_grad is None and is_plain(lp):
        return plain_index_rows(raw, out, target, class_weight, lp, ce_scale)
    num_classes = raw.shape[1] if shard is None else shard.num_classes
    sdt = stat_dtype(raw.dtype)
    eps = lp.label_smoothing if lp.label_smoothing > 0 else 0.0
    want_grad = ce_scale is not None
    z, tanh = transform_logits(raw, lp, want_grad)
    m = z.amax(dim=1).to(sdt)  # (r,)
    norm = predicted = None
    if lp.metrics:
        predicted = z.argmax(dim=1)
        if shard is None:
            norm = torch.linalg.vector_norm(z, dim=1, dtype=sdt)
        else:
            norm_sq = z.square().sum(dim=1, dtype=sdt)  # combined across ranks below, then its square root
            local_max = m.clone()

    if lp.target_is_probs:
        loss, lse, stats, dz = probability_rows(z, m, target, class_weight, lp, ce_scale, z_scale, norm, predicted)
        return loss, lse, stats, None if dz is None else into(out, chain_rule(dz, tanh, lp))

    keep = target != lp.ignore_index
    if shard is None:
        in_slice = keep & (target >= 0) & (target < num_classes)
        y = torch.where(in_slice, target, 0)
    else:  # the target's column when this rank holds it
        in_slice, y = shard.local_index(target)
        in_slice = in_slice & keep
    z_y = z.gather(1, y[:, None]).squeeze(1).to(sdt)
    z_sum = None
    if eps:  # Σ_c w_c z_c, for the smoothing term
        z_sum = (z.to(sdt) @ class_weight) if class_weight is not None else z.sum(dim=1, dtype=sdt)
    w_y = class_weight[y] if class_weight is not None else 1.0
    if shard is None:
        w_sum = class_weight.sum() if class_weight is not None else float(num_classes)
    else:
        w_sum = shard.class_weight_sum.to(sdt) if class_weight is not None else float(num_classes)
        z_y = torch.where(in_slice, z_y, 0.0)
        if class_weight is not None:
            w_y = torch.where(in_slice, w_y, 0.0)
        m = shard.max_(m)  # the global row max, before the shifted exponentials
    e = shifted_exp(z, m)
    sum_exp = e.sum(dim=1)
    e_log_e = torch.special.xlogy(e, e).sum(dim=1, dtype=sdt) if lp.metrics else None
    if shard is None:
        sums = IndexRowSums(
            m, sum_exp, z_y, w_y, z_sum, e_log_e, norm if lp.metrics else None, predicted if lp.metrics else None
        )
    else:  # every per-row sum over classes in one all-reduce (relative to the global max m already)
        w_y_part = w_y if class_weight is not None else None
        if lp.metrics:
            parts = Partials(local_max, sum_exp, z_y, w_y_part, z_sum, e_log_e, norm_sq, predicted + shard.offset)
        else:
            parts = Partials(m, sum_exp, z_y, w_y_part, z_sum, None, None, None)
        sums = combine_partials(parts, shard, global_max=m)
        sum_exp = sums.sum_exp  # over the whole vocabulary, for p below
    loss, lse, stats, coefs = index_rows(sums, target, w_sum, lp, num_classes, ce_scale, z_scale)
    if not want_grad:
        return loss, lse, stats, None
    dz = index_grad(e, sum_exp, coefs, keep, in_slice, y, class_weight, eps, entropy_grad)
    return loss, lse, stats, into(out, chain_rule(dz, tanh, lp))


# Logits per block of the softmax arithmetic. On the CPU 2^24 (64 MiB in fp32): every operation over a block (and
# every GEMM) is one OpenMP parallel region, which waits for a descheduled thread where other processes hold the
# cores, so blocks are large and an fp32 chunk (options.budget_chunk_rows) is one block, processed in place; a
# low-precision chunk has one block-sized fp32 twin. On a GPU 2^26, where smaller blocks make it launch-bound
# (8-row blocks at V = 128k ran 12x slower than the fused path on an H200).
_BLOCK_LOGITS = 1 << 24
_BLOCK_LOGITS_GPU = 1 << 26


def _sweep(
    x: torch.Tensor,  # (N, F)
    w: torch.Tensor,  # (C, K, F)
    b: torch.Tensor | None,  # (C, K)
    target: torch.Tensor,  # (N, K) indices or (N, C, K) probabilities
    class_weight: torch.Tensor | None,  # (C,) stats dtype
    lp: LossParams,
    ro: ResolvedOptions,
    scales: tuple[torch.Tensor, torch.Tensor] | None,  # (cross entropy, z-loss) shares (N, K), or None: loss only
    grads: Grads,
    shard: VocabShard | None = None,
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (N, K) each: H and g_H, with scales
):
    """One pass over the chunks of rows (:mod:`.chunked_gemm`): per-row losses and lse ``(N, K)``, statistics
    ``(N, K, len(STATS))`` (or None) and, with ``scales``, the three gradients. Loss rows are ``n·K + k``; the
    targets, shares and outputs are flattened in that order, and each block's outputs are concatenated once."""
    n = x.shape[0]
    c, k, _ = w.shape
    classes = c if shard is None else shard.num_classes  # vocabulary parallel: every rank's blocks are the same rows
    block = max(1, (_BLOCK_LOGITS if x.device.type == "cpu" else _BLOCK_LOGITS_GPU) // max(classes, 1))
    buffers = chunk_buffers(x, w, b, ro, None if scales is None else grads, block)
    # (N·K,) indices or (N·K, C) probabilities (a view for K = 1)
    target_rows = target.transpose(1, 2).reshape(n * k, c) if lp.target_is_probs else target.reshape(n * k)
    per_row = [target_rows, *(() if scales is None else scales), *(() if entropy_grad is None else entropy_grad)]
    per_row = [t if t is target_rows else t.reshape(n * k) for t in per_row]
    outputs = []  # (loss, lse, stats) per block
    for start in range(0, n, buffers.rows):
        x_c = x[start : start + buffers.rows].to(buffers.logits.dtype)
        z = logits_gemm(x_c, buffers)  # (r, K·C)
        z_rows = z.view(-1, c)  # (r·K, C): becomes dz in place
        for b0 in range(0, z_rows.shape[0], block):
            z_b = z_rows[b0 : b0 + block]
            work = z_b if buffers.upcast is None else buffers.upcast[: z_b.shape[0]].copy_(z_b)
            rows_b = [t[start * k + b0 : start * k + b0 + z_b.shape[0]] for t in per_row]
            t_b, s_b, s_z_b = rows_b[0], *(rows_b[1:3] if scales is not None else (None, None))
            eg_b = tuple(rows_b[3:5]) if entropy_grad is not None else None
            outputs.append(chunk_loss_and_grad(work, t_b, class_weight, lp, s_b, s_z_b, shard, eg_b, out=z_b)[:3])
        if scales is not None:
            accumulate_grads(z, x_c, start, buffers)
    gx, gw, gb = finish_grads(buffers, w, b)
    if gx is not None and shard is not None and shard.input_grad_all_reduce:
        shard.sum_(gx)  # each rank's grad_x covers its classes only
    losses, lse, stats = concat_outputs(outputs, n * k, len(STATS) if lp.metrics else None, stat_dtype(ro.acc_dtype), x)
    stats = None if stats is None else stats.view(n, k, len(STATS))
    return losses.view(n, k), lse.view(n, k), stats, (gx, gw, gb)


def forward_pass(x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, shard=None):
    """``(loss, lse, stats, saved_grads)``: for the scalar reductions ``saved_grads`` are the gradients for an
    upstream gradient of 1 (None entries where not wanted); for ``"none"`` it is None (backward recomputes)."""
    sdt = stat_dtype(ro.acc_dtype)
    cw = None if class_weight is None else class_weight.to(sdt)
    keep = keep_mask(target, lp) if lp.z_loss else None  # the z-loss's rows (reduce_total reads it for no other)
    if lp.reduction == "none":
        losses, lse, stats, _ = _sweep(x, w, b, target, cw, lp, ro, None, grads, shard)
        return reduce_total(losses, lse, keep, None, lp), lse, stats, None
    # Plain rows zero the ignored rows' shares themselves, so without class weights one share serves every row.
    uniform = shard is None and is_plain(lp)
    scales = row_scales(target, cw, lp, sdt, shard, uniform=uniform)
    wanted = (scales.ce, scales.z) if grads.any else None
    losses, lse, stats, saved = _sweep(x, w, b, target, cw, lp, ro, wanted, grads, shard)
    return reduce_total(losses, lse, keep, scales, lp), lse, stats, saved


def backward_none(
    x,
    w,
    b,
    target,
    class_weight,
    lp: LossParams,
    ro: ResolvedOptions,
    grads: Grads,
    grad_out,
    shard=None,
    entropy_grad=None,
):
    """The gradients of ``reduction="none"``: the logits recomputed chunk by chunk, each row scaled by its
    upstream gradient ``grad_out`` ``(N, K)`` (plus, given ``entropy_grad`` = ``(H, g_H)`` ``(N, K)`` each, the
    gradient of ``Σ g_H·H`` over the rows' entropies)."""
    sdt = stat_dtype(ro.acc_dtype)
    cw = None if class_weight is None else class_weight.to(sdt)
    share = grad_out.to(sdt)
    eg = None if entropy_grad is None else tuple(t.to(sdt) for t in entropy_grad)
    return _sweep(x, w, b, target, cw, lp, ro, (share, share), grads, shard, eg)[3]


class _ChunkedFunction(torch.autograd.Function):
    """Outputs: the loss (scalar, or ``(N, K)`` for ``"none"``), lse ``(N, K)`` and the statistics (or an empty
    tensor); only the loss is differentiable."""

    @staticmethod
    def forward(ctx, x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, shard=None):
        ctx.lp, ctx.ro, ctx.grads, ctx.shard = lp, ro, grads, shard
        loss, lse, stats, ctx.saved_grads = forward_pass(x, w, b, target, class_weight, lp, ro, grads, shard)
        if lp.reduction == "none":
            ctx.save_for_backward(x, w, b, target, class_weight)
        return function_outputs(ctx, loss, lse, stats)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_stats):
        if ctx.lp.reduction == "none":
            grads = backward_none(*ctx.saved_tensors, ctx.lp, ctx.ro, ctx.grads, grad_out, ctx.shard)
            return (*grads, None, None, None, None, None, None)
        in_place = not ctx.ro.allow_retain_graph
        out = tuple(
            None if g is None else (g.mul_(grad_out) if in_place else g * grad_out) for g in take_saved_grads(ctx)
        )
        return (*out, None, None, None, None, None, None)


def linear_cross_entropy_chunked(
    x: torch.Tensor,  # (N, F)
    w: torch.Tensor,  # (C, K, F)
    b: torch.Tensor | None,  # (C, K)
    target: torch.Tensor,  # (N, K) int64 indices or (N, C, K) probabilities
    class_weight: torch.Tensor | None,  # (C,)
    lp: LossParams,
    ro: ResolvedOptions,
    shard: VocabShard | None = None,
) -> torch.Tensor:
    """``(loss, lse, stats)``: loss ``(N, K)`` for ``reduction="none"``, else a scalar; lse ``(N, K)``; statistics
    ``(N, K, len(STATS))`` with ``lp.metrics`` (else empty); all in the stats dtype (the caller casts).

    With a ``shard`` (vocabulary parallel, :mod:`..distributed`): ``w``, ``b`` and ``class_weight`` are this
    rank's slices, the loss, lse and statistics those of the whole vocabulary, ``grad_input`` all-reduced over the
    group unless ``shard.input_grad_all_reduce`` is off."""
    grads = Grads.of(x, w, b)
    return _ChunkedFunction.apply(x, w, b, target, class_weight, lp, ro, grads, shard)
