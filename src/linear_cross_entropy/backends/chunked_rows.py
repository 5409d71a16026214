r"""The chunked path's row math on one block of logits that needs no vocabulary-wide combine: class-index rows
without the extras (one fused log-softmax), class-probability rows, and the chain rule of the logit transforms.

Notation as in :mod:`.chunked`. Class indices without z-loss, logit scale, soft-cap, metrics or a vocabulary
shard (the plain case, PyTorch's whole API), with ``log p = z − lse`` from one fused log-softmax::

    ℓ = (1−ε)·w_y·(−log p_y) + (ε/C)·Σ_c w_c·(−log p_c)
    dz = coef·p − t·e_y − (s·ε/C)·w,   coef = s·((1−ε)·w_y + (ε/C)·W_sum),   t = (1−ε)·s·w_y

On the CPU every pass over a block is one OpenMP parallel region, a wait for the second thread wherever another
process holds a core, so the plain case keeps them few: the log-softmax in place (one region: the row max, the
sum of exponentials and ``z − lse``), then ``exp`` and the multiply by ``coef`` in place; the target column is one
scatter of ``coef·p_y − t`` (formed per row, so it is rounded once). The arithmetic stays in the stats dtype up to
one copy into a low-precision GEMM buffer: on the CPU (torch 2.13) a multiply with a bf16 ``out=`` from fp32
operands took 57 ms and a bf16 ``scatter_`` 66 ms on a 699×24000 block, against 12 ms and 5 µs in fp32 + copy.
"""

from __future__ import annotations

import torch

from .common import LossParams, entropy_coefs, row_stats, stat_dtype

__all__ = [
    "is_plain",
    "plain_index_rows",
    "probability_rows",
    "transform_logits",
    "index_grad",
    "chain_rule",
    "shifted_exp",
    "into",
]


def is_plain(lp: LossParams) -> bool:
    """Class-index targets and none of the additions that need ``m`` and ``Σ exp(z − m)`` apart."""
    return not (lp.target_is_probs or lp.z_loss or lp.logit_scale != 1.0 or lp.logit_softcap or lp.metrics)


def plain_index_rows(
    work: torch.Tensor,  # (r, C) GEMM output; overwritten (log p, then p) when in the stats dtype
    out: torch.Tensor,  # (r, C) where dz goes: ``work`` itself, or the GEMM's low-precision buffer
    target: torch.Tensor,  # (r,) int64
    class_weight: torch.Tensor | None,  # (C,) stats dtype
    lp: LossParams,
    ce_scale: torch.Tensor | None,  # (r,) upstream share per row, or None for loss only
):
    """``(loss, lse, None, dz)`` of plain class-index rows (``dz`` in ``out``, None without ``ce_scale``).

    ``lse = z_y − log p_y`` (exact to the rounding of ``log p_y``; only the additions, which take the general path,
    need it more precisely). A target outside ``[0, C)`` that is not ignored gets NaN loss and gradient.
    """
    num_classes = work.shape[1]
    eps = lp.label_smoothing
    work = work.to(stat_dtype(work.dtype))  # low-precision accumulation: the softmax still runs in fp32
    keep = target != lp.ignore_index
    y = target.clamp(0, num_classes - 1)  # any column for ignored rows: their loss and gradient are zeroed
    bad = keep & (y != target)
    y_col = y[:, None]
    z_y = work.gather(1, y_col).squeeze(1)
    logp = torch.log_softmax(work, dim=1, out=work)  # (r, C) z − lse, in place
    logp_y = logp.gather(1, y_col).squeeze(1)
    lse = z_y - logp_y
    w_y = None if class_weight is None else class_weight[y]
    nll = -logp_y if w_y is None else -(w_y * logp_y)
    loss = nll if not eps else (1.0 - eps) * nll - (eps / num_classes) * _weighted_sum(logp, class_weight)
    loss = torch.where(keep, loss, 0.0).masked_fill_(bad, float("nan"))
    if ce_scale is None:
        return loss, lse, None, None
    s = torch.where(keep, ce_scale, 0.0).masked_fill_(bad, float("nan"))
    s_y = s if w_y is None else s * w_y
    on_target = s_y if not eps else (1.0 - eps) * s_y  # t
    coef = on_target
    if eps:
        w_sum = float(num_classes) if class_weight is None else class_weight.sum()
        coef = on_target + s * ((eps / num_classes) * w_sum)
    dz = logp.exp_().mul_(coef[:, None])  # coef·p
    at_target = coef * logp_y.exp() - on_target  # dz_y before smoothing, rounded once
    if eps:
        smooth = s * (eps / num_classes)
        dz = dz.sub_(smooth[:, None]) if class_weight is None else dz.addr_(smooth, class_weight, alpha=-1)
        at_target = at_target - (smooth if w_y is None else smooth * w_y)
    dz = into(out, dz.scatter_(1, y_col, at_target[:, None]))
    return loss, lse, None, dz


def _weighted_sum(logp: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """``Σ_c w_c·log p_c`` per row (``w`` ones without class weights)."""
    return logp.sum(dim=1) if class_weight is None else logp @ class_weight


def probability_rows(
    z: torch.Tensor,  # (r, C) logits (scaled, capped) in the stats dtype; overwritten
    m: torch.Tensor,  # (r,) row max
    target: torch.Tensor,  # (r, C) probabilities
    class_weight: torch.Tensor | None,
    lp: LossParams,
    ce_scale: torch.Tensor | None,
    z_scale: torch.Tensor | None,
    norm: torch.Tensor | None,  # (r,) ‖z‖₂ with metrics
    predicted: torch.Tensor | None,  # (r,) argmax with metrics
):
    """``(loss, lse, stats, dz)`` of class-probability rows (``dz`` in ``z``'s storage, None without
    ``ce_scale``): ``ℓ = Σ_c q_c·(lse − z_c)``, ``dz = (Σ_c q_c·s + s_z·2λ·lse)·p − s·q``."""
    sdt = m.dtype
    eps = lp.label_smoothing
    q = target.to(sdt)
    if eps:
        q = q * (1.0 - eps) + eps / z.shape[1]
    if class_weight is not None:
        q = q * class_weight
    q_sum = q.sum(dim=1)
    zq = (z.to(sdt) * q).sum(dim=1)  # Σ_c q_c z_c
    e = shifted_exp(z, m)
    sum_exp = e.sum(dim=1)
    lse = m + sum_exp.log()
    loss = q_sum * lse - zq
    stats = None
    if lp.metrics:
        e_log_e = torch.special.xlogy(e, e).sum(dim=1, dtype=sdt)
        stats = row_stats(m, sum_exp, e_log_e, norm, predicted == target.argmax(dim=1), -loss)
    if ce_scale is None:
        return loss, lse, stats, None
    coef = ce_scale * q_sum
    if lp.z_loss:
        coef = coef + z_scale * (2.0 * lp.z_loss) * lse
    return loss, lse, stats, e.mul_((coef / sum_exp)[:, None]).sub_(q * ce_scale[:, None])


def transform_logits(raw: torch.Tensor, lp: LossParams, want_grad: bool):
    """``(z, tanh)``: ``z = c·tanh(a·r/c)`` in place (the transforms that are on); ``tanh`` kept for the chain rule
    when capping with a gradient (else None)."""
    z = raw if lp.logit_scale == 1.0 else raw.mul_(lp.logit_scale)
    if not lp.logit_softcap:
        return z, None
    z = z.div_(lp.logit_softcap).tanh_()
    tanh = z.clone() if want_grad else None  # for the chain rule: 1 − tanh²
    return z.mul_(lp.logit_softcap), tanh


def index_grad(e, sum_exp, coefs, keep, in_slice, y, class_weight, eps, entropy_grad) -> torch.Tensor:
    """``dz = coef·p − t·e_y − smooth·w`` (plus the entropy term) in ``e``'s storage, from ``e = exp(z − m)``."""
    if entropy_grad is None:
        dz = e.mul_((coefs.coef / sum_exp)[:, None])  # coef·p
    else:  # coef'·p + entropy_coef·p·log p
        coef, entropy_coef = entropy_coefs(coefs.coef, keep, *entropy_grad)
        p = e.div_(sum_exp[:, None])
        dz = torch.special.xlogy(p, p).mul_(entropy_coef[:, None]).add_(p.mul_(coef[:, None]))
    on_target = torch.where(in_slice, -coefs.target, 0.0)
    dz.scatter_add_(1, y[:, None], on_target[:, None].to(dz.dtype))
    if eps:
        w = class_weight if class_weight is not None else torch.ones((), dtype=sum_exp.dtype, device=e.device)
        dz.sub_(coefs.smooth[:, None] * w)
    return dz


def chain_rule(dz: torch.Tensor, tanh: torch.Tensor | None, lp: LossParams) -> torch.Tensor:
    """``dr = dz·a·(1 − tanh²)`` in place (the factors that are on)."""
    if tanh is not None:
        dz.mul_(tanh.square_().neg_().add_(1.0))
    if lp.logit_scale != 1.0:
        dz.mul_(lp.logit_scale)
    return dz


def shifted_exp(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``exp(z − m)`` in the stats dtype: in place when ``z`` already is in it, else in a temporary."""
    if z.dtype == m.dtype:
        return z.sub_(m[:, None]).exp_()
    return (z.to(m.dtype) - m[:, None]).exp_()


def into(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` stored in ``buffer`` (its dtype), with no copy when it already is ``buffer``."""
    if value is buffer:
        return buffer
    return buffer.copy_(value)
