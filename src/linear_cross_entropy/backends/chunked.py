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
mean, ``1/(N·K)`` for probability mean, 1 for sum, the per-row upstream value for ``none``), and then
``grad_input = dz·W``, ``grad_weight = dzᵀ·x``, ``grad_bias = Σ_rows dz``.

For the scalar reductions the gradient is linear in the (scalar) upstream gradient, so forward computes the
gradients for an upstream gradient of 1 in the same sweep as the loss, and backward only scales them — two GEMM
sweeps fewer than recomputing. ``reduction="none"`` cannot do that (the upstream gradient is per row), so its
backward recomputes the logits chunk by chunk.
"""

from __future__ import annotations

import dataclasses

import torch

from ..options import ResolvedOptions
from .common import LossParams, reduce_total, row_scale_for_reduction, stat_dtype, take_saved_grads

__all__ = ["linear_cross_entropy_chunked", "chunk_loss_and_grad"]


def chunk_loss_and_grad(
    z: torch.Tensor,  # (r, C) logits in the accumulation dtype; consumed (holds softmax, then dz, afterwards)
    target: torch.Tensor,  # (r,) int64 indices or (r, C) probabilities
    class_weight: torch.Tensor | None,  # (C,) in the stats dtype
    lp: LossParams,
    row_scale: torch.Tensor | None,  # (r,) upstream share per row (stats dtype), or None for loss only
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss ``(r,)`` in the stats dtype and, when ``row_scale`` is given, ``dz`` (in ``z``'s storage).

    The softmax is formed in place (``z ← exp(z − m)``, ``m`` the row max) so a chunk needs no second ``(r, C)``
    temporary, and ``lse − z_y`` is taken as ``(m − z_y) + log Σ exp(z − m)``, which keeps small losses next to
    large logits exact.
    """
    num_classes = z.shape[1]
    sdt = stat_dtype(z.dtype)
    eps = lp.label_smoothing if lp.label_smoothing > 0 else 0.0
    m = z.amax(dim=1).to(sdt)  # (r,)
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
        loss = q_sum * (m + sum_exp.log()) - zq
        if row_scale is None:
            return loss, None
        dz = e.div_(sum_exp[:, None])
        dz.mul_((row_scale * q_sum)[:, None]).sub_(q * row_scale[:, None])
        return loss, _into(z, dz)

    keep = target != lp.ignore_index
    in_range = (target >= 0) & (target < num_classes)
    y = torch.where(keep & in_range, target, 0)
    z_y = z.gather(1, y[:, None]).squeeze(1).to(sdt)
    if eps:  # Σ_c w_c z_c, for the smoothing term
        z_sum = (z.to(sdt) @ class_weight) if class_weight is not None else z.sum(dim=1, dtype=sdt)
    w_y = class_weight[y] if class_weight is not None else torch.ones_like(m)
    w_sum = class_weight.sum() if class_weight is not None else float(num_classes)
    e = _shifted_exp(z, m)
    sum_exp = e.sum(dim=1)
    log_sum_exp = sum_exp.log()
    loss = (1.0 - eps) * w_y * ((m - z_y) + log_sum_exp)
    if eps:
        loss = loss + (eps / num_classes) * (w_sum * (m + log_sum_exp) - z_sum)
    bad = keep & ~in_range  # reachable only off the CPU, where the range check would sync
    loss = torch.where(keep, loss, 0.0).masked_fill_(bad, float("nan"))
    if row_scale is None:
        return loss, None
    s = torch.where(keep, row_scale, 0.0).masked_fill_(bad, float("nan"))
    coef = s * ((1.0 - eps) * w_y + (eps / num_classes) * w_sum)
    dz = e.mul_((coef / sum_exp)[:, None])  # coef · p
    dz.scatter_add_(1, y[:, None], (-(1.0 - eps) * s * w_y)[:, None].to(dz.dtype))
    if eps:
        w = class_weight if class_weight is not None else torch.ones((), dtype=sdt, device=z.device)
        dz.sub_((s * (eps / num_classes))[:, None] * w)
    return loss, _into(z, dz)


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


@dataclasses.dataclass(frozen=True)
class _Grads:
    input: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.input or self.weight or self.bias


_BLOCK_LOGITS = 1 << 20


def _sweep(
    x: torch.Tensor,  # (N, F)
    w: torch.Tensor,  # (C, K, F)
    b: torch.Tensor | None,  # (C, K)
    target: torch.Tensor,  # (N, K) indices or (N, C, K) probabilities
    class_weight: torch.Tensor | None,  # (C,) stats dtype
    lp: LossParams,
    ro: ResolvedOptions,
    row_scale: torch.Tensor | None,  # (N, K) stats dtype, or None for loss only
    grads: _Grads,
):
    """One pass over (position, chunk): per-row losses ``(N, K)`` and, with ``row_scale``, the three gradients."""
    n, f = x.shape
    c, k, _ = w.shape
    acc, sdt = ro.acc_dtype, stat_dtype(ro.acc_dtype)
    accurate = ro.acc_policy == "accurate" and acc != x.dtype
    gemm_dtype = acc if accurate else x.dtype
    w_gemm = w.to(gemm_dtype)  # no copy unless "accurate" upcasts
    b_gemm = None if b is None else b.to(gemm_dtype)
    losses = torch.empty((n, k), dtype=sdt, device=x.device)
    want = row_scale is not None
    grad_x = torch.zeros((n, f), dtype=x.dtype, device=x.device) if want and grads.input else None  # (N, F)
    # The weight gradient accumulates across chunks: in acc_dtype (a (C, K, F) scratch) unless "compact" or the
    # dtypes agree, in which case it accumulates in place in the parameter's dtype.
    # PyTorch's rule: off CUDA, mixed-precision "compact" behaves as "balanced" (no fast low-precision addmm there).
    compact = ro.acc_policy == "compact" and (x.device.type == "cuda" or acc == w.dtype)
    wgrad_dtype = w.dtype if (compact or acc == w.dtype) else acc
    grad_w = torch.zeros((c, k, f), dtype=wgrad_dtype, device=x.device) if want and grads.weight else None
    grad_b = torch.zeros((c, k), dtype=sdt, device=x.device) if want and grads.bias else None
    rows = ro.batch_chunk_size
    # The softmax arithmetic walks a chunk in blocks of ~2^20 logits: its fp32 temporaries then stay in cache
    # and a low-precision chunk never has an fp32 twin of its own size.
    block = max(1, _BLOCK_LOGITS // max(c, 1))
    for pos in range(k):
        w_k = w_gemm[:, pos, :]  # (C, F), strided view for K > 1
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            x_c = x[start:stop].to(gemm_dtype)
            if b_gemm is None:
                z = x_c @ w_k.T  # (r, C) in the GEMM dtype; becomes dz in place
            else:
                z = torch.addmm(b_gemm[:, pos], x_c, w_k.T)
            for b0 in range(0, stop - start, block):
                b1 = min(b0 + block, stop - start)
                z_b = z[b0:b1].to(acc)  # a view when the GEMM ran in acc_dtype
                t_b = (
                    target[start + b0 : start + b1, :, pos]
                    if lp.target_is_probs
                    else target[start + b0 : start + b1, pos]
                )
                s_b = None if row_scale is None else row_scale[start + b0 : start + b1, pos]
                loss_b, dz_b = chunk_loss_and_grad(z_b, t_b, class_weight, lp, s_b)
                losses[start + b0 : start + b1, pos] = loss_b
                if dz_b is not None and dz_b.data_ptr() != z.data_ptr() + b0 * z.stride(0) * z.element_size():
                    z[b0:b1] = dz_b
            if row_scale is None:
                continue
            dz = z
            if grad_b is not None:
                grad_b[:, pos] += dz.sum(dim=0, dtype=sdt)
            if grad_x is not None:
                if k == 1 and grad_x.dtype == gemm_dtype:
                    torch.mm(dz, w_k, out=grad_x[start:stop])
                else:
                    grad_x[start:stop] += (dz @ w_k).to(x.dtype)
            if grad_w is not None:
                if grad_w.dtype == gemm_dtype:
                    grad_w[:, pos].addmm_(dz.T, x_c)
                else:  # low-precision product into the acc_dtype scratch, a cache-sized block of classes at a time
                    for c0 in range(0, c, block):
                        grad_w[c0 : c0 + block, pos] += dz[:, c0 : c0 + block].T @ x_c
    out = (
        grad_x,
        None if grad_w is None else grad_w.to(w.dtype),
        None if grad_b is None else grad_b.to(b.dtype),
    )
    return losses, out


class _ChunkedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, target, class_weight, lp: LossParams, ro: ResolvedOptions, grads: _Grads):
        sdt = stat_dtype(ro.acc_dtype)
        cw = None if class_weight is None else class_weight.to(sdt)
        k = w.shape[1]
        ctx.lp, ctx.ro, ctx.grads = lp, ro, grads
        if lp.reduction == "none":
            losses, _ = _sweep(x, w, b, target, cw, lp, ro, None, grads)
            ctx.save_for_backward(x, w, b, target, cw)
            return losses
        scale, denom = row_scale_for_reduction(target, cw, lp, k, sdt)
        losses, ctx.saved_grads = _sweep(x, w, b, target, cw, lp, ro, scale if grads.any else None, grads)
        return reduce_total(losses.sum(), denom, lp)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.lp.reduction == "none":
            x, w, b, target, cw = ctx.saved_tensors
            row_scale = grad_out.to(stat_dtype(ctx.ro.acc_dtype))
            _, (gx, gw, gb) = _sweep(x, w, b, target, cw, ctx.lp, ctx.ro, row_scale, ctx.grads)
            return gx, gw, gb, None, None, None, None, None
        in_place = not ctx.ro.allow_retain_graph
        out = tuple(
            None if g is None else (g.mul_(grad_out) if in_place else g * grad_out) for g in take_saved_grads(ctx)
        )
        return (*out, None, None, None, None, None)


def linear_cross_entropy_chunked(
    x: torch.Tensor,  # (N, F)
    w: torch.Tensor,  # (C, K, F)
    b: torch.Tensor | None,  # (C, K)
    target: torch.Tensor,  # (N, K) int64 indices or (N, C, K) probabilities
    class_weight: torch.Tensor | None,  # (C,)
    lp: LossParams,
    ro: ResolvedOptions,
) -> torch.Tensor:
    """Loss ``(N, K)`` for ``reduction="none"``, else a scalar, in the stats dtype (the caller casts)."""
    grad_mode = torch.is_grad_enabled()
    grads = _Grads(
        input=grad_mode and x.requires_grad,
        weight=grad_mode and w.requires_grad,
        bias=grad_mode and b is not None and b.requires_grad,
    )
    return _ChunkedFunction.apply(x, w, b, target, class_weight, lp, ro, grads)
