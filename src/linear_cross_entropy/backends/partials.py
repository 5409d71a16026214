r"""Per-row partial sums over a part of the vocabulary, and the ONE combine that turns them into sums over all of it.

A *part* is a contiguous slice of the classes: a vocabulary split of the tiled backend's forward kernel (combined
over the splits, a leading dimension, by :data:`SPLITS`), or a rank's slice under vocabulary parallel (combined over
the ranks by a :class:`VocabShard`'s all-reduces). Each part reports, per row, its sums relative to its own row max
(:class:`Partials`); :func:`combine_partials` then takes, in this order::

    M = max_parts m                                     (max)
    ρ = exp(m − M), e' = exp(z − m), e = ρ·e' = exp(z − M)
    Σ e = Σ_parts ρ·Σ e',  Σ e·log e = Σ_parts ρ·(Σ e'·log e' + (m − M)·Σ e')
                                                        (rescale; then every sum in one stacked sum over the parts)
    the first maximal class                             (the lowest index among the parts whose m equals M)

and the loss, lse, statistics and ``dz``'s coefficients follow from the combined :class:`..common.IndexRowSums` by
one formula for every path (:func:`..common.index_rows`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

from .common import IndexRowSums

__all__ = ["Partials", "Combine", "SPLITS", "VocabShard", "combine_partials"]


class Partials(NamedTuple):
    """One part's per-row sums over its classes, each relative to the part's own row max ``m``; shaped ``(rows,)``
    (a rank's slice) or ``(parts, rows)`` (the splits of one launch)."""

    m: torch.Tensor  # the max over the part's classes
    sum_exp: torch.Tensor  # Σ exp(z − m)
    z_y: torch.Tensor  # the target logit where the target is in the part, else 0
    w_y: torch.Tensor | None  # the target's class weight where in the part, else 0; None: no class weights
    z_sum: torch.Tensor | None  # Σ w_c·z_c, with label smoothing
    e_log_e: torch.Tensor | None  # Σ e·log e with e = exp(z − m), with metrics
    sq_sum: torch.Tensor | None  # Σ z², with metrics
    predicted: torch.Tensor | None  # int64 global index of the part's first maximal class, with metrics


class Combine(Protocol):
    """Reductions over the parts: in place over ranks (:class:`VocabShard`) or over a leading dimension (:data:`SPLITS`)."""

    def max_(self, t: torch.Tensor) -> torch.Tensor: ...

    def sum_rows_(self, parts: list[torch.Tensor | None]) -> list[torch.Tensor | None]: ...

    def first_argmax_(self, predicted: torch.Tensor, local_max: torch.Tensor, m: torch.Tensor) -> torch.Tensor: ...


class _Splits:
    """The parts along dimension 0 of ``(parts, rows)`` tensors (one launch's vocabulary splits)."""

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return t.amax(dim=0)

    def sum_rows_(self, parts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [None if p is None else p.sum(dim=0) for p in parts]

    def first_argmax_(self, predicted: torch.Tensor, local_max: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.where(local_max == m, predicted, torch.iinfo(torch.int64).max).amin(dim=0)


SPLITS = _Splits()


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[offset, offset + local_classes)`` of a ``num_classes`` vocabulary, and the collectives
    that combine per-row statistics over the group (in place, via ``torch.distributed.all_reduce``)."""

    group: object  # torch.distributed.ProcessGroup
    offset: int
    local_classes: int
    num_classes: int  # the global vocabulary size V
    input_grad_all_reduce: bool = True
    class_weight_sum: torch.Tensor | None = None  # () fp64: Σ_c w_c over the whole vocabulary, with class weights

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t

    def sum_rows_(self, parts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The ``(rows,)`` tensors of ``parts`` summed over the group in ONE all-reduce (stacked ``(rows, k)``);
        None entries are skipped and come back as None."""
        given = [i for i, p in enumerate(parts) if p is not None]
        combined = self.sum_(torch.stack([parts[i] for i in given], dim=1)).unbind(1)
        out: list[torch.Tensor | None] = [None] * len(parts)
        for i, value in zip(given, combined):
            out[i] = value
        return out

    def first_argmax_(self, predicted: torch.Tensor, local_max: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The global index of the first maximal class (as ``argmax``): the lowest of the ranks' ``predicted``
        (this rank's first argmax, as a global index) among the ranks whose ``local_max`` equals the global max
        ``m`` (one all-reduce MIN, int64)."""
        candidate = torch.where(local_max == m, predicted, torch.iinfo(torch.int64).max)
        return self.min_(candidate)

    def local_index(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_slice, y_local)``: where a global target lies in this slice, and its local column (0 elsewhere)."""
        in_slice = (target >= self.offset) & (target < self.offset + self.local_classes)
        return in_slice, torch.where(in_slice, target - self.offset, 0)


def combine_partials(parts: Partials, over: Combine, global_max: torch.Tensor | None = None) -> IndexRowSums:
    """The parts' sums as sums over the whole vocabulary (``(rows,)`` each, in the parts' dtype).

    ``global_max``: a caller that took the max over the parts before its exponentials (the chunked path, which
    knows ``M`` before it forms ``exp(z − M)``) passes it; its sums are then relative to ``M`` already and need no
    rescaling, and ``parts.m`` is only each part's own max (for the first argmax)."""
    sum_exp, e_log_e = parts.sum_exp, parts.e_log_e
    if global_max is None:
        m = over.max_(parts.m.clone(memory_format=torch.contiguous_format))
        shift = parts.m - m  # log ρ = m_part − M, <= 0
        rescale = torch.exp(shift)
        if e_log_e is not None:  # e = ρ·e': Σ e·log e = ρ·(Σ e'·log e' + log ρ·Σ e')
            e_log_e = (e_log_e + shift * sum_exp) * rescale
        sum_exp = sum_exp * rescale
    else:
        m = global_max
    sum_exp, z_y, w_y, z_sum, e_log_e, sq_sum = over.sum_rows_(
        [sum_exp, parts.z_y, parts.w_y, parts.z_sum, e_log_e, parts.sq_sum]
    )
    return IndexRowSums(
        m=m,
        sum_exp=sum_exp,
        z_y=z_y,
        w_y=1.0 if w_y is None else w_y,
        z_sum=z_sum,
        e_log_e=e_log_e,
        norm=None if sq_sum is None else sq_sum.sqrt(),
        predicted=None if parts.predicted is None else over.first_argmax_(parts.predicted, parts.m, m),
    )
