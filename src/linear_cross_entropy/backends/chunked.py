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

from .common import (
    STATS,
    Grads,
    IndexRowSums,
    LossParams,
    ResolvedOptions,
    entropy_coefs,
    function_outputs,
    index_rows,
    keep_mask,
    reduce_total,
    row_scales,
    row_stats,
    stat_dtype,
    take_saved_grads,
)
from .partials import Partials, combine_partials

if TYPE_CHECKING:
    from .partials import VocabShard

__all__ = ["linear_cross_entropy_chunked", "chunk_loss_and_grad", "forward_pass", "backward_none"]


def chunk_loss_and_grad(
    raw: torch.Tensor,  # (r, C) GEMM output (x·Wᵀ + b) in the accumulation dtype; consumed (dr afterwards)
    target: torch.Tensor,  # (r,) int64 indices or (r, C) probabilities
    class_weight: torch.Tensor | None,  # (C,) in the stats dtype
    lp: LossParams,
    ce_scale: torch.Tensor | None,  # (r,) upstream share per row (stats dtype), or None for loss only
    z_scale: torch.Tensor | None,  # (r,) the z-loss's share per row, with ce_scale
    shard: VocabShard | None = None,  # vocabulary parallel: raw holds this rank's columns (index targets only)
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (r,) H and g_H, with ce_scale (index targets)
):
    """Per-row cross entropy ``(r,)``, lse ``(r,)`` and statistics ``(r, len(STATS))`` (or None), in the stats
    dtype, and, when ``ce_scale`` is given, ``dr`` in ``raw``'s storage (else None).

    The softmax is formed in place (``z ← exp(z − m)``, ``m`` the row max) so a block needs no second ``(r, C)``
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
    num_classes = raw.shape[1] if shard is None else shard.num_classes
    sdt = stat_dtype(raw.dtype)
    eps = lp.label_smoothing if lp.label_smoothing > 0 else 0.0
    want_grad = ce_scale is not None
    z = raw if lp.logit_scale == 1.0 else raw.mul_(lp.logit_scale)
    tanh = None
    if lp.logit_softcap:
        z = z.div_(lp.logit_softcap).tanh_()
        tanh = z.clone() if want_grad else None  # for the chain rule: 1 − tanh²
        z = z.mul_(lp.logit_softcap)
    m = z.amax(dim=1).to(sdt)  # (r,)
    if lp.metrics:
        predicted = z.argmax(dim=1)
        if shard is None:
            norm = torch.linalg.vector_norm(z, dim=1, dtype=sdt)
        else:
            norm_sq = z.square().sum(dim=1, dtype=sdt)  # combined across ranks below, then its square root
            local_max = m.clone()

    if lp.target_is_probs:
        q = target.to(sdt)
        if eps:
            q = q * (1.0 - eps) + eps / num_classes
        if class_weight is not None:
            q = q * class_weight
        q_sum = q.sum(dim=1)
        zq = (z.to(sdt) * q).sum(dim=1)  # Σ_c q_c z_c
        e = _shifted_exp(z, m)
        sum_exp = e.sum(dim=1)
        lse = m + sum_exp.log()
        loss = q_sum * lse - zq
        stats = None
        if lp.metrics:
            e_log_e = torch.special.xlogy(e, e).sum(dim=1, dtype=sdt)
            stats = row_stats(m, sum_exp, e_log_e, norm, predicted == target.argmax(dim=1), -loss)
        if not want_grad:
            return loss, lse, stats, None
        coef = ce_scale * q_sum
        if lp.z_loss:
            coef = coef + z_scale * (2.0 * lp.z_loss) * lse
        dz = e.mul_((coef / sum_exp)[:, None]).sub_(q * ce_scale[:, None])  # (Σq·s + s_z·2λ·lse)·p − s·q
        return loss, lse, stats, _into(raw, _chain_rule(dz, tanh, lp))

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
    e = _shifted_exp(z, m)
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
    if entropy_grad is None:
        dz = e.mul_((coefs.coef / sum_exp)[:, None])  # coef·p
    else:  # coef'·p + entropy_coef·p·log p
        coef, entropy_coef = entropy_coefs(coefs.coef, keep, *entropy_grad)
        p = e.div_(sum_exp[:, None])
        dz = torch.special.xlogy(p, p).mul_(entropy_coef[:, None]).add_(p.mul_(coef[:, None]))
    on_target = torch.where(in_slice, -coefs.target, 0.0)
    dz.scatter_add_(1, y[:, None], on_target[:, None].to(dz.dtype))
    if eps:
        w = class_weight if class_weight is not None else torch.ones((), dtype=sdt, device=z.device)
        dz.sub_(coefs.smooth[:, None] * w)
    return loss, lse, stats, _into(raw, _chain_rule(dz, tanh, lp))


def _chain_rule(dz: torch.Tensor, tanh: torch.Tensor | None, lp: LossParams) -> torch.Tensor:
    """``dr = dz·a·(1 − tanh²)`` in place (the factors that are on)."""
    if tanh is not None:
        dz.mul_(tanh.square_().neg_().add_(1.0))
    if lp.logit_scale != 1.0:
        dz.mul_(lp.logit_scale)
    return dz


def _shifted_exp(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``exp(z − m)`` in the stats dtype: in place when ``z`` already is in it, else in a temporary."""
    if z.dtype == m.dtype:
        return z.sub_(m[:, None]).exp_()
    return (z.to(m.dtype) - m[:, None]).exp_()


def _into(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` stored in ``buffer``'s dtype, reusing ``buffer`` when the dtypes differ."""
    if value is buffer:
        return buffer
    return buffer.copy_(value)


# Logits per block of the softmax arithmetic. On the CPU 2^24 (64 MiB in fp32): every operation over a block (and
# every GEMM) is one OpenMP parallel region, and where another process holds a core each region can wait a
# scheduler time slice for its second thread, so a call's regions must be few: blocks are large and an fp32 chunk
# (at most 64 MiB, options.budget_chunk_rows) is one block, processed in place. On a GPU 2^26, where smaller blocks
# make it launch-bound (8-row blocks at V = 128k ran 12x slower than the fused path on an H200). Either way a
# low-precision chunk never has a chunk-sized fp32 twin beyond one block.
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
    """One pass over the chunks of rows: per-row losses and lse ``(N, K)``, statistics ``(N, K, len(STATS))`` (or
    None) and, with ``scales``, the three gradients.

    The K positions of a row are K loss rows: with the weight in ``(K, C, F)`` order (a copy only for K > 1), one
    GEMM per chunk of ``r`` input rows gives ``(r, K·C)``, which is the ``(r·K, C)`` logits of the loss rows
    ``n·K + k`` as a view; the targets, shares and outputs are flattened in that order, and the gradients
    ``grad_x = dz·W`` and ``grad_W = dzᵀ·x`` are again one GEMM each per chunk. Per chunk the GEMMs write into
    buffers allocated once per call.
    """
    n, f = x.shape
    c, k, _ = w.shape
    kc = k * c
    acc, sdt = ro.acc_dtype, stat_dtype(ro.acc_dtype)
    accurate = ro.acc_policy == "accurate" and acc != x.dtype
    gemm_dtype = acc if accurate else x.dtype
    w_rows = w.to(gemm_dtype).transpose(0, 1).reshape(kc, f)  # (K·C, F): a view unless K > 1 or "accurate" upcasts
    b_rows = None if b is None else b.to(gemm_dtype).T.reshape(kc)
    if lp.target_is_probs:
        target_rows = target.transpose(1, 2).reshape(n * k, c)  # (N·K, C): a view for K = 1
    else:
        target_rows = target.reshape(n * k)
    scale_rows = None if scales is None else tuple(s.reshape(n * k) for s in scales)
    entropy_rows = None if entropy_grad is None else tuple(t.reshape(n * k) for t in entropy_grad)
    losses = torch.empty(n * k, dtype=sdt, device=x.device)
    lse = torch.empty(n * k, dtype=sdt, device=x.device)
    stats = torch.empty((n * k, len(STATS)), dtype=sdt, device=x.device) if lp.metrics else None
    want = scales is not None
    grad_x = torch.empty((n, f), dtype=x.dtype, device=x.device) if want and grads.input else None  # every row set
    # The weight gradient accumulates across chunks: in acc_dtype (a (K·C, F) scratch) unless "compact" or the
    # dtypes agree, in which case it accumulates in place in the parameter's dtype.
    # PyTorch's rule: off CUDA, mixed-precision "compact" behaves as "balanced" (no fast low-precision addmm there).
    compact = ro.acc_policy == "compact" and (x.device.type == "cuda" or acc == w.dtype)
    wgrad_dtype = w.dtype if (compact or acc == w.dtype) else acc
    if ro.batch_chunk_size >= n:  # one chunk: its one GEMM is the whole sum (accumulated inside the GEMM)
        wgrad_dtype = gemm_dtype
    # The first chunk writes the weight gradient, later chunks add to it (zeros only when there is no chunk).
    grad_w = None
    if want and grads.weight:
        grad_w = (torch.empty if n else torch.zeros)((kc, f), dtype=wgrad_dtype, device=x.device)
    grad_b = torch.zeros(kc, dtype=sdt, device=x.device) if want and grads.bias else None

    rows = min(ro.batch_chunk_size, max(n, 1))  # input rows per chunk
    # Vocabulary parallel: blocks sized by the global V, so that every rank's blocks (and collectives) are the same
    # rows.
    block_classes = c if shard is None else shard.num_classes
    block = max(1, (_BLOCK_LOGITS if x.device.type == "cpu" else _BLOCK_LOGITS_GPU) // max(block_classes, 1))
    logits = torch.empty((rows, kc), dtype=gemm_dtype, device=x.device)  # one chunk's GEMM output, then dz
    # A low-precision GEMM output is upcast a block at a time into this buffer (the softmax runs in acc_dtype).
    upcast = None if acc == gemm_dtype else torch.empty((min(block, rows * k), c), dtype=acc, device=x.device)
    # The low-precision product dzᵀ·x, added into an acc_dtype weight-gradient scratch, in blocks of classes no
    # larger than the logits buffer (one block where the chunk has at least F rows).
    product = None
    if grad_w is not None and grad_w.dtype != gemm_dtype:
        product = torch.empty((max(1, min(kc, logits.numel() // max(f, 1))), f), dtype=gemm_dtype, device=x.device)

    for start in range(0, n, rows):
        stop = min(start + rows, n)
        x_c = x[start:stop].to(gemm_dtype)
        z = logits[: stop - start]  # (r, K·C)
        if b_rows is None:
            torch.mm(x_c, w_rows.T, out=z)
        else:
            torch.addmm(b_rows, x_c, w_rows.T, out=z)
        z_rows = z.view(-1, c)  # (r·K, C): becomes dz in place
        for b0 in range(0, z_rows.shape[0], block):
            b1 = min(b0 + block, z_rows.shape[0])
            z_b = z_rows[b0:b1]
            work = z_b if upcast is None else upcast[: b1 - b0].copy_(z_b)
            rows_b = slice(start * k + b0, start * k + b1)
            s_b = None if scale_rows is None else scale_rows[0][rows_b]
            s_z_b = None if scale_rows is None else scale_rows[1][rows_b]
            eg_b = None if entropy_rows is None else tuple(t[rows_b] for t in entropy_rows)
            loss_b, lse_b, stats_b, dz_b = chunk_loss_and_grad(
                work, target_rows[rows_b], class_weight, lp, s_b, s_z_b, shard, eg_b
            )
            losses[rows_b] = loss_b
            lse[rows_b] = lse_b
            if stats is not None:
                stats[rows_b] = stats_b
            if dz_b is not None and dz_b.data_ptr() != z_b.data_ptr():
                z_b.copy_(dz_b)
        if not want:
            continue
        dz = z
        if grad_b is not None:
            grad_b += dz.sum(dim=0, dtype=sdt)
        if grad_x is not None:
            if grad_x.dtype == gemm_dtype:
                torch.mm(dz, w_rows, out=grad_x[start:stop])
            else:
                grad_x[start:stop] = dz @ w_rows
        if grad_w is not None:
            if product is None:
                if start == 0:
                    torch.mm(dz.T, x_c, out=grad_w)
                else:
                    grad_w.addmm_(dz.T, x_c)
            else:
                for c0 in range(0, kc, product.shape[0]):
                    c1 = min(c0 + product.shape[0], kc)
                    part = torch.mm(dz[:, c0:c1].T, x_c, out=product[: c1 - c0])
                    if start == 0:
                        grad_w[c0:c1].copy_(part)
                    else:
                        grad_w[c0:c1] += part
    if grad_x is not None and shard is not None and shard.input_grad_all_reduce:
        shard.sum_(grad_x)  # each rank's grad_x covers its classes only
    if grad_w is not None:  # (K·C, F) -> (C, K, F), one copy at most
        grad_w = grad_w.view(k, c, f).transpose(0, 1).to(w.dtype, memory_format=torch.contiguous_format)
    if grad_b is not None:
        grad_b = grad_b.view(k, c).T.to(b.dtype, memory_format=torch.contiguous_format)
    stats = None if stats is None else stats.view(n, k, len(STATS))
    return losses.view(n, k), lse.view(n, k), stats, (grad_x, grad_w, grad_b)


def forward_pass(x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: Grads, shard=None):
    """``(loss, lse, stats, saved_grads)``: for the scalar reductions ``saved_grads`` are the gradients for an
    upstream gradient of 1 (None entries where not wanted); for ``"none"`` it is None (backward recomputes)."""
    sdt = stat_dtype(ro.acc_dtype)
    cw = None if class_weight is None else class_weight.to(sdt)
    keep = keep_mask(target, lp)
    if lp.reduction == "none":
        losses, lse, stats, _ = _sweep(x, w, b, target, cw, lp, ro, None, grads, shard)
        return reduce_total(losses, lse, keep, None, lp), lse, stats, None
    scales = row_scales(target, cw, lp, sdt, shard)
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
