"""What every backend shares: the loss's settings, the reductions (loss, z-loss, metrics), saved-gradient use.

Per row (one loss position) every backend produces the cross-entropy term ``ℓ``, the logsumexp ``lse`` and, with
metrics, five statistics; everything a reduction adds on top of those is computed here, once:

- loss: ``reduce(ℓ) + λ·reduce_z(lse²)`` — the z-loss ``λ·lse²`` counts the rows that take part (targets not
  ignored), and its mean divides by their number (the cross-entropy mean divides by ``Σ w_y``);
- the per-row shares ``s`` (cross entropy) and ``s_z`` (z-loss) of an upstream gradient of 1, which the backends
  fold into ``dz = s·∂ℓ/∂z + s_z·2λ·lse·p``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

__all__ = [
    "Grads",
    "LossParams",
    "ResolvedOptions",
    "RowScales",
    "STATS",
    "stat_dtype",
    "keep_mask",
    "row_scales",
    "reduce_total",
    "IndexRowSums",
    "GradCoefs",
    "entropy_coefs",
    "index_rows",
    "row_stats",
    "summarize_metrics",
    "take_saved_grads",
    "function_outputs",
]

# The per-row statistics a backend writes when metrics are requested, in this order.
STATS = ("max_logit", "entropy", "logit_norm", "accuracy", "log_prob")


@dataclasses.dataclass(frozen=True)
class Grads:
    """Which gradients autograd will ask for."""

    input: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.input or self.weight or self.bias

    @staticmethod
    def of(x, w, b) -> Grads:
        """The gradients autograd will ask for (none under ``no_grad``)."""
        on = torch.is_grad_enabled()
        return Grads(on and x.requires_grad, on and w.requires_grad, on and b is not None and b.requires_grad)


@dataclasses.dataclass(frozen=True)
class LossParams:
    """The loss's own settings, resolved (no None): what the math of every backend needs."""

    reduction: str  # "none" | "mean" | "sum"
    ignore_index: int
    label_smoothing: float  # >= 0 (negative values behave as 0, as in the reference)
    target_is_probs: bool
    z_loss: float = 0.0  # λ of λ·lse²
    logit_scale: float = 1.0  # z = softcap(s·(x·Wᵀ + b))
    logit_softcap: float = 0.0  # c of c·tanh(u/c); 0 = off
    metrics: bool = False  # write the STATS per row


@dataclasses.dataclass(frozen=True)
class ResolvedOptions:
    """Concrete settings for one call, what a backend receives: made by :func:`..options.resolve`, the one place
    options are resolved (here, below the backends, so that they need not import the options module)."""

    backend: str  # "chunked", "fused" or "tiled"
    acc_policy: str  # "accurate" | "balanced" | "compact"
    acc_dtype: torch.dtype
    batch_chunk_size: int  # rows per chunk, >= 1
    allow_retain_graph: bool
    sparse_backward_eps: float = 0.0
    recompute_weight_grad: bool = False  # fused: the weight gradient from a vocabulary-major pass (fused/policy.py)


class RowScales(NamedTuple):
    ce: torch.Tensor  # (N, K) share of the upstream gradient in the cross-entropy term
    z: torch.Tensor  # (N, K) share in the z-loss term (without a z-loss: ``ce`` itself, never read)
    ce_denominator: torch.Tensor  # () what the cross-entropy mean divides by
    z_denominator: torch.Tensor  # () what the z-loss mean divides by


def stat_dtype(acc_dtype: torch.dtype) -> torch.dtype:
    """Reductions (lse, loss sums) run in at least fp32 whatever the buffers' dtype."""
    return torch.float64 if acc_dtype == torch.float64 else torch.float32


def keep_mask(target: torch.Tensor, lp: LossParams) -> torch.Tensor:
    """(N, K) bool: the rows that take part (index targets not equal to ignore_index; every probability row)."""
    if lp.target_is_probs:
        return torch.ones((target.shape[0], target.shape[-1]), dtype=torch.bool, device=target.device)
    return target != lp.ignore_index


def row_scales(target, class_weight, lp: LossParams, sdt, shard=None, uniform: bool = False) -> RowScales:
    """For the scalar reductions: each row's share of an upstream gradient of 1, and the means' denominators.

    ``target`` is ``(N, K)`` indices or ``(N, C, K)`` probabilities; ``class_weight`` ``(C,)`` in ``sdt`` or None
    (with a vocabulary ``shard``, this rank's slice: ``w_y`` is then all-reduced over the group).

    ``uniform`` (index targets, no class weights): every row that takes part has the same share, so ``ce`` and
    ``z`` are that one value expanded over ``(N, K)`` (stride 0, no per-row memory) — ignored rows included, which
    the caller zeroes itself (the fused kernels do, from the targets).
    """
    if uniform and class_weight is None and not lp.target_is_probs:
        count = (target != lp.ignore_index).sum(dtype=sdt)
        share = 1.0 / count if lp.reduction == "mean" else torch.ones((), dtype=sdt, device=target.device)
        share = share.expand(target.shape)
        return RowScales(share, share, count, count)
    keep = keep_mask(target, lp)
    keep_f = keep.to(sdt)
    if lp.target_is_probs:
        ce_denom = torch.tensor(float(keep.numel()), dtype=sdt, device=target.device)
        w_y = keep_f
    elif class_weight is None:
        w_y = keep_f
        ce_denom = w_y.sum()
    elif shard is None:
        y = torch.where(keep & (target >= 0) & (target < class_weight.shape[0]), target, 0)
        w_y = torch.where(keep, class_weight[y], 0.0)
        ce_denom = w_y.sum()
    else:
        in_slice, y = shard.local_index(target)
        w_y = shard.sum_(torch.where(keep & in_slice, class_weight[y], 0.0))
        ce_denom = w_y.sum()
    z_denom = keep_f.sum()
    if lp.reduction == "mean":
        # Rows that take part get 1/denominator (inf, hence NaN gradients, when the weights sum to 0, as in the
        # reference); ignored rows get exactly 0, so an all-ignored batch has zero gradients and a NaN loss.
        ce = keep_f / ce_denom
        return RowScales(ce, keep_f / z_denom if lp.z_loss else ce, ce_denom, z_denom)
    return RowScales(keep_f, keep_f, ce_denom, z_denom)


def reduce_total(
    losses: torch.Tensor,  # (N, K) cross-entropy term per row
    lse: torch.Tensor,  # (N, K)
    keep: torch.Tensor,  # (N, K) bool
    scales: RowScales | None,  # None for reduction "none"
    lp: LossParams,
) -> torch.Tensor:
    """The loss: per row for ``"none"``, else the sum or the mean, with the z-loss added when ``λ > 0``.

    The reference divides its NLL and smoothing terms by the denominator separately, so index targets whose class
    weights sum to 0 give 0/0 = NaN, also where smoothing makes the total non-zero (``total / 0`` would be inf).
    """
    z_rows = lp.z_loss * lse.square() * keep if lp.z_loss else None
    if lp.reduction == "none":
        return losses if z_rows is None else losses + z_rows
    total = losses.sum()
    if lp.reduction == "mean":
        total = total / scales.ce_denominator
        if not lp.target_is_probs:
            total = total.masked_fill(scales.ce_denominator == 0, float("nan"))
    if z_rows is not None:
        z_total = z_rows.sum()
        total = total + (z_total / scales.z_denominator if lp.reduction == "mean" else z_total)
    return total


class IndexRowSums(NamedTuple):
    """Per-row sums over the whole vocabulary for class-index targets, ``(rows,)`` each in the stats dtype: what
    the loss, its gradient coefficients and the metrics of a row need (see :func:`index_rows`). The chunked path
    forms them from a block of logits; vocabulary-parallel paths combine them over the ranks first
    (:mod:`.partials`)."""

    m: torch.Tensor  # the row max
    sum_exp: torch.Tensor  # Σ_c exp(z_c − m)
    z_y: torch.Tensor  # the target logit (any finite value on ignored rows)
    w_y: torch.Tensor | float  # the target's class weight (1.0 without class weights)
    z_sum: torch.Tensor | None  # Σ_c w_c·z_c, with label smoothing
    e_log_e: torch.Tensor | None  # Σ_c e_c·log e_c with e = exp(z − m), with metrics
    norm: torch.Tensor | None  # ‖z‖₂, with metrics
    predicted: torch.Tensor | None  # int64 index of the first maximal class, with metrics


class GradCoefs(NamedTuple):
    """A row's ``dz = coef·p − target·e_y − smooth·w`` (``(rows,)`` each; ``w`` the class weights, ones without)."""

    coef: torch.Tensor  # s·((1−ε)·w_y + (ε/C)·W_sum) + s_z·2λ·lse
    target: torch.Tensor  # (1−ε)·s·w_y
    smooth: torch.Tensor  # s·ε/C


def index_rows(
    sums: IndexRowSums,
    target: torch.Tensor,  # (rows,) int64 global class indices
    w_sum: torch.Tensor | float,  # W_sum = Σ_c w_c over the whole vocabulary (C without class weights)
    lp: LossParams,
    num_classes: int,  # C, the whole vocabulary
    ce_scale: torch.Tensor | None = None,  # (rows,) s, or None: no gradient coefficients
    z_scale: torch.Tensor | None = None,  # (rows,) s_z, with ce_scale
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, GradCoefs | None]:
    """``(loss, lse, stats, coefs)`` of class-index rows from their sums over the vocabulary::

        lse = m + log Σ exp(z − m)
        ℓ   = keep·[(1−ε)·w_y·((m − z_y) + log Σ exp(z − m)) + (ε/C)·(W_sum·lse − Σ_c w_c z_c)]

    (``lse − z_y`` taken as ``(m − z_y) + log Σ exp(z − m)`` keeps small losses next to large logits exact). Rows
    whose target is outside ``[0, C)`` and not ignored get NaN loss and NaN coefficients (no host check). ``stats``
    (with ``lp.metrics``) as :func:`row_stats`; ``coefs`` (with ``ce_scale``) as :class:`GradCoefs`, ``s`` and
    ``s_z`` zeroed on ignored rows.
    """
    eps = lp.label_smoothing if lp.label_smoothing > 0 else 0.0
    keep = target != lp.ignore_index
    bad = keep & ~((target >= 0) & (target < num_classes))  # reachable only where the range check would sync
    m, sum_exp, z_y, w_y = sums.m, sums.sum_exp, sums.z_y, sums.w_y
    log_sum_exp = sum_exp.log()
    lse = m + log_sum_exp
    loss = (1.0 - eps) * w_y * ((m - z_y) + log_sum_exp)
    if eps:
        loss = loss + (eps / num_classes) * (w_sum * lse - sums.z_sum)
    loss = torch.where(keep, loss, 0.0).masked_fill_(bad, float("nan"))
    stats = None
    if lp.metrics:
        stats = row_stats(m, sum_exp, sums.e_log_e, sums.norm, sums.predicted == target, z_y - lse)
    if ce_scale is None:
        return loss, lse, stats, None
    s = torch.where(keep, ce_scale, 0.0).masked_fill_(bad, float("nan"))
    coef = s * ((1.0 - eps) * w_y + (eps / num_classes) * w_sum)
    if lp.z_loss:  # d(λ·lse²)/dz = 2λ·lse·p
        coef = coef + torch.where(keep, z_scale, 0.0) * (2.0 * lp.z_loss) * lse
    return loss, lse, stats, GradCoefs(coef, (1.0 - eps) * s * w_y, s * (eps / num_classes))


def entropy_coefs(
    coef: torch.Tensor,  # (rows,) GradCoefs.coef
    keep: torch.Tensor,  # (rows,) bool
    entropy: torch.Tensor,  # (rows,) H = −Σ p·log p (any finite value where not kept)
    entropy_share: torch.Tensor,  # (rows,) g_H, the upstream gradient of each row's entropy
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coef', entropy_coef)`` with ``dz = coef'·p + entropy_coef·p·log p − ...`` adding ``g_H·∂H/∂z``:

        ∂H/∂z = −p ⊙ (log p + H)   ⇒   coef' = coef − g_H·H,   entropy_coef = −g_H

    (0 on the rows that do not take part)."""
    g = torch.where(keep, entropy_share, 0.0)
    return coef - g * torch.where(keep, entropy, 0.0), -g


def row_stats(m, sum_exp, e_log_e, norm, correct, log_prob) -> torch.Tensor:
    """``(rows, len(STATS))``: the max logit, the entropy ``−Σ p log p = log Σe − Σ e·log e / Σe`` (``p = e/Σe``,
    ``e = exp(z − m)``), the logit norm, whether the argmax is the target, and ``log p_y``."""
    entropy = sum_exp.log() - e_log_e / sum_exp
    return torch.stack([m, entropy, norm, correct.to(m.dtype), log_prob], dim=1)


def summarize_metrics(stats: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor, lp: LossParams) -> dict:
    """The metrics as tensors: per row for ``"none"``, else means over the rows that take part.

    ``stats`` is ``(N, K, len(STATS))``; the z value is the logsumexp, the z-loss term ``λ·lse²``.
    """
    fields = {name: stats[..., i] for i, name in enumerate(STATS)}
    fields["lse"] = lse
    fields["z_loss"] = lp.z_loss * lse.square()
    if lp.reduction == "none":
        return {
            k: torch.where(keep, v, 0.0) if k in ("accuracy", "log_prob", "z_loss") else v for k, v in fields.items()
        }
    count = keep.sum()
    return {k: torch.where(keep, v, 0.0).sum() / count for k, v in fields.items()}


SECOND_BACKWARD = (  # PyTorch's message first (what users' tests match), then why and what to do
    "linear_cross_entropy chunked backward called twice; retain_graph=True / double backward are not supported. "
    "Its gradients were computed in forward and consumed by the first backward: pass "
    "LinearCrossEntropyOptions(allow_retain_graph=True) to keep them for repeated backward."
)


def take_saved_grads(ctx) -> tuple:
    """The gradients forward computed for an upstream gradient of 1; consumed unless ``allow_retain_graph``."""
    saved = ctx.saved_grads
    if saved is None:
        raise RuntimeError(SECOND_BACKWARD)
    if not ctx.ro.allow_retain_graph:
        ctx.saved_grads = None
    return saved


def backward_once(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` whose graph raises :data:`SECOND_BACKWARD` on a second backward, as the chunked path's does without
    ``allow_retain_graph``: for a loss computed by plain autograd ops (the small calls of :mod:`..functional`), so
    that whether a second backward works does not depend on the call's size."""
    if loss.grad_fn is None:
        return loss
    calls = 0

    def count(grad_outputs):
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError(SECOND_BACKWARD)

    loss.grad_fn.register_prehook(count)
    return loss


def function_outputs(ctx, loss: torch.Tensor, lse: torch.Tensor, stats: torch.Tensor | None) -> tuple:
    """An autograd Function's ``(loss, lse, stats)``: ``stats`` an empty tensor when there are none (a Function's
    outputs are tensors), ``lse`` and ``stats`` marked non-differentiable (only the loss carries a gradient)."""
    stats = lse.new_empty(0) if stats is None else stats
    ctx.mark_non_differentiable(lse, stats)
    return loss, lse, stats
