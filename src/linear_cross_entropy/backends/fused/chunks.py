"""The fused backend's row pass: per chunk of rows, the logits GEMM, the row kernel, the gradient GEMMs.

Per chunk of ``plan.chunk_rows`` rows, one cuBLAS GEMM writes the logits into a reused row-padded buffer, one
launch of the row kernel turns them into per-row losses (and, where the plan forms gradients, ``dz`` in place), and
two cuBLAS GEMMs consume ``dz``. One public function per :class:`.policy.Mode`, each with one return type.

With a ``shard`` (:mod:`...distributed`) each chunk runs the row kernel's two sweeps as two launches around the
combine over the group: sweep 1 writes this slice's per-row partials, :func:`..partials.combine_partials`
turns them into sums over the whole vocabulary (one all-reduce MAX, one stacked SUM, a MIN with metrics, all on
``(rows,)`` vectors), :func:`..common.index_rows` into the loss, lse, statistics and ``dz``'s coefficients, and
sweep 2 writes this slice's ``dz``. Nothing here reads a GPU value on the host (CUDA-graph capturable).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..common import Grads, LossParams, index_rows
from ..grid import cdiv
from ..partials import Partials, VocabShard, combine_partials
from . import factored
from .gemm import input_grad_gemm, logits_buffers, logits_gemm, weight_grad_gemm
from .policy import FusedPlan, Mode
from .rows import PARTIALS, cross_entropy_grad, cross_entropy_partials, cross_entropy_rows

__all__ = [
    "Gradients",
    "DeferredSaved",
    "FactoredSaved",
    "RecomputeSaved",
    "Pass",
    "loss_only",
    "deferred",
    "factored_deferred_grads",
    "accumulated",
    "recompute",
]

Scales = tuple[torch.Tensor, torch.Tensor]  # (N,) fp32 each: the cross-entropy and z-loss shares s, s_z
EntropyGrad = tuple[torch.Tensor, torch.Tensor]  # (N,) fp32 each: the rows' entropies H and their gradients g_H


class Gradients(NamedTuple):
    input: torch.Tensor | None  # (N, H) in plan.grad_x_dtype
    weight: torch.Tensor | None  # (V, H) in plan.grad_w_dtype
    bias: torch.Tensor | None  # (V,) fp32


class DeferredSaved(NamedTuple):
    """What a single chunk keeps for backward (:func:`.vocab_major.deferred_grads`)."""

    logits: torch.Tensor  # (N, V) as the GEMM wrote them (a row-padded buffer)
    lse: torch.Tensor  # (N,) fp32
    coefs: torch.Tensor  # (N, 3) fp32 dz's coefficients for an upstream gradient of 1


class FactoredSaved(NamedTuple):
    """What a single factored chunk keeps for backward (:func:`factored_deferred_grads`)."""

    buffers: factored.FactoredBuffers  # E' (its target column zeroed), r and dz_y for an upstream gradient of 1
    # (N, H) in x's dtype, allocated in forward: its rows held the chunk's partials and will hold its product
    # (factored.allocate); None without grad_x
    grad_x: torch.Tensor | None
    order: torch.Tensor | None  # (N,) int32 factored.target_order, None without grad_W and grad_b


class RecomputeSaved(NamedTuple):
    """What the vocabulary-major pass needs (:func:`.vocab_major.weight_grad_pass`), and ``grad_x``."""

    grad_x: torch.Tensor | None  # (N, H)
    lse: torch.Tensor  # (N,) fp32
    coefs: torch.Tensor  # (N, 3) fp32


class Pass(NamedTuple):
    losses: torch.Tensor  # (N,) fp32, or each chunk's sum (num_chunks,) without plan.per_row
    lse: torch.Tensor | None  # (N,) fp32; None without plan.per_row
    stats: torch.Tensor | None  # (N, 5) fp32 with lp.metrics
    # None, Gradients, DeferredSaved, FactoredSaved or RecomputeSaved: fixed by the function (and plan) that returns it
    saved: object


def loss_only(x, w, b, target, class_weight, lp: LossParams, plan: FusedPlan, shard=None) -> Pass:
    """Losses, lse and statistics; no gradient, nothing saved."""
    losses, lse, stats, _ = _row_pass(x, w, b, target, class_weight, lp, plan, None, shard)
    return Pass(losses, lse if plan.per_row else None, stats, None)


def deferred(x, w, b, target, class_weight, lp, plan: FusedPlan, scales: Scales, shard=None) -> Pass:
    """One chunk: sweep 1 only, keeping the logits, each row's lse and ``dz``'s coefficients for backward; or, on
    the factored pass, the chunk's forward keeping ``E'`` and its rows' scales (:class:`FactoredSaved`)."""
    assert plan.mode is Mode.DEFERRED and plan.chunk_rows >= x.shape[0]
    if plan.factored and shard is None and factored.tma_ready(x, w):
        return _factored_deferred(x, w, b, target, class_weight, lp, plan, scales)
    coefs = torch.empty((x.shape[0], 3), dtype=torch.float32, device=x.device)
    losses, lse, stats, logits = _row_pass(x, w, b, target, class_weight, lp, plan, scales, shard, coefs)
    # one chunk: lse holds every row whatever plan.per_row says
    return Pass(losses, lse if plan.per_row else None, stats, DeferredSaved(logits[: x.shape[0]], lse, coefs))


def accumulated(
    x, w, b, target, class_weight, lp, plan: FusedPlan, scales: Scales, shard=None, entropy_grad=None
) -> Pass:
    """Every gradient the plan asks for, formed chunk by chunk (``grad_x`` all-reduced over a group unless
    ``shard.input_grad_all_reduce`` is off)."""
    assert plan.mode is Mode.ACCUMULATED
    grads = _allocate_grads(x, w, plan)
    losses, lse, stats, _ = _row_pass(x, w, b, target, class_weight, lp, plan, scales, shard, None, grads, entropy_grad)
    if grads.weight is not None and x.shape[0] == 0:
        grads.weight.zero_()
    if grads.input is not None and shard is not None and shard.input_grad_all_reduce:
        shard.sum_(grads.input)  # each rank's grad_x covers its classes only
    return Pass(losses, lse if plan.per_row else None, stats, grads)


def recompute(x, w, b, target, class_weight, lp, plan: FusedPlan, scales: Scales, entropy_grad=None) -> Pass:
    """The row pass of :attr:`Mode.RECOMPUTE` (unsharded): ``grad_x`` and what the vocabulary-major pass needs
    (every row's lse and ``dz``'s coefficients)."""
    assert plan.mode is Mode.RECOMPUTE and plan.per_row
    coefs = torch.empty((x.shape[0], 3), dtype=torch.float32, device=x.device)
    grads = _allocate_grads(x, w, plan) if plan.grads.input else None  # without grad_x, sweep 2 waits
    entropy_grad = entropy_grad if grads is not None else None
    losses, lse, stats, _ = _row_pass(x, w, b, target, class_weight, lp, plan, scales, None, coefs, grads, entropy_grad)
    return Pass(losses, lse, stats, RecomputeSaved(None if grads is None else grads.input, lse, coefs))


def _factored_deferred(x, w, b, target, class_weight, lp, plan: FusedPlan, scales: Scales) -> Pass:
    """The factored forward of one chunk of every row, ``grad_x`` allocated now in x's dtype (the upstream
    gradient is folded into the rows' scales before anything is rounded into it) for the workspace to ride in."""
    n = x.shape[0]
    order = factored.target_order(target) if plan.grads.weight or plan.grads.bias else None  # before E
    grad_x = torch.empty_like(x) if plan.grads.input else None
    ws = factored.allocate(n, x, w.shape[0], grad_x, smoothing=False, rank_one_rows=False)
    buf = ws.chunk(0, n)
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    factored.forward_chunk(x, w, b, target, class_weight, scales, lp, buf, losses, lse, smoothing=None)
    if not plan.per_row:  # as the row pass returns them: the chunk's sum
        losses = losses.sum(dim=0, keepdim=True)
    return Pass(losses, lse if plan.per_row else None, None, FactoredSaved(buf, grad_x, order))


def factored_deferred_grads(
    saved: FactoredSaved,
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    target: torch.Tensor,  # (N,) int64
    grad_out: torch.Tensor,  # () the upstream gradient g
    grads: Grads,
) -> Gradients:
    """The single factored chunk's gradients for ``g``: the rows' scales ``r`` and target-column terms ``dz_y``
    times ``g`` (``dz`` is linear in them; in place: the plan keeps no graph for a second backward), then the
    gradient GEMMs on ``E'`` and the target column, each gradient rounded once into the inputs' dtypes (``grad_b``
    fp32)."""
    buf = saved.buffers
    g = grad_out.float()
    buf.scale.mul_(g)
    buf.target_grad.mul_(g)
    grad_w = torch.empty_like(w) if grads.weight else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if grads.bias else None
    factored.gradient_gemms(saved.grad_x, grad_w, grad_b, buf, w, x, target, 0, smoothing=None)
    factored.target_column_grads(grad_w, grad_b, buf.target_grad, x, target, w.shape[0], saved.order)
    return Gradients(saved.grad_x, grad_w, grad_b)


def _allocate_grads(x: torch.Tensor, w: torch.Tensor, plan: FusedPlan) -> Gradients:
    (n, h), v = x.shape, w.shape[0]
    grads = plan.grads
    return Gradients(
        torch.empty((n, h), dtype=plan.grad_x_dtype, device=x.device) if grads.input else None,
        torch.empty((v, h), dtype=plan.grad_w_dtype, device=x.device) if grads.weight else None,
        torch.zeros(v, dtype=torch.float32, device=x.device) if grads.bias else None,
    )


def _row_pass(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H) (this rank's slice with a shard)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    lp: LossParams,
    plan: FusedPlan,
    scales: Scales | None,  # None: loss only
    shard: VocabShard | None,
    coefs_out: torch.Tensor | None = None,  # (N, 3) fp32: also write dz's coefficients
    grads: Gradients | None = None,  # where the gradients go (None: sweep 2 does not run)
    entropy_grad: EntropyGrad | None = None,  # unsharded, with grads
):
    """The chunk loop. ``(losses, lse, stats, logits)``: per-row losses (each chunk's sum without
    ``plan.per_row``), the lse buffer (``(N,)``, or one chunk's rows without ``plan.per_row``), the statistics and
    the logits buffer (``(rows, V)``)."""
    assert entropy_grad is None or (shard is None and grads is not None)
    assert plan.per_row or not lp.metrics
    n, rows = x.shape[0], plan.chunk_rows
    out_rows = n if plan.per_row else rows
    losses = torch.empty(out_rows, dtype=torch.float32, device=x.device)
    lse = torch.empty(out_rows, dtype=torch.float32, device=x.device)
    loss_sums = None if plan.per_row else torch.empty(cdiv(n, rows), dtype=torch.float32, device=x.device)
    stats = torch.empty((n, 5), dtype=torch.float32, device=x.device) if lp.metrics else None
    # the factored pass (.factored) replaces the logits GEMM, the row kernel and the gradient GEMMs chunk by chunk
    fact = None
    if plan.factored and grads is not None and factored.tma_ready(x, w):
        smoothed = lp.label_smoothing > 0
        fact = factored.allocate(
            min(rows, n),
            x,
            w.shape[0],
            grads.input,
            smoothing=smoothed,
            rank_one_rows=smoothed and grads.weight is not None,
        )
        smoothing = factored.smoothing_terms(fact, x, w, b, target, class_weight, scales[0], lp)
        logits_all = grad_all = None
    else:
        logits_all, grad_all = logits_buffers(rows, w.shape[0], x, plan.fp32_logits, grads is not None)
    sharded = None if shard is None else _ShardedBuffers.make(rows, lp, class_weight, shard, x.device)
    for chunk, start in enumerate(range(0, n, rows)):
        stop = min(start + rows, n)
        r = stop - start
        row_out = slice(start, stop) if plan.per_row else slice(0, r)  # where this chunk's losses and lse go
        scales_c = None if scales is None else (scales[0][start:stop], scales[1][start:stop])
        if fact is not None:
            buf = fact.chunk(start, r)
            factored.forward_chunk(
                x[start:stop], w, b, target[start:stop], class_weight, scales_c, lp, buf, losses[row_out],
                lse[row_out], smoothing=smoothing,
            )  # fmt: skip
        else:
            logits, grad = logits_all[:r], None if grads is None else grad_all[:r]
            logits_gemm(x[start:stop], w, logits, torch.float32 if plan.fp32_logits else None)
            outs = _ChunkOutputs(
                losses[row_out],
                lse[row_out],
                None if stats is None else stats[start:stop],
                None if coefs_out is None else coefs_out[start:stop],
            )
            if sharded is None:
                entropy_c = None if entropy_grad is None else (entropy_grad[0][start:stop], entropy_grad[1][start:stop])
                _unsharded_rows(logits, grad, b, target[start:stop], class_weight, scales_c, outs, lp, entropy_c)
            else:
                _sharded_rows(logits, grad, b, target[start:stop], class_weight, scales_c, outs, lp, shard, sharded, r)
        if loss_sums is not None:
            torch.sum(losses[:r], dim=0, out=loss_sums[chunk])
        if fact is not None:
            factored.gradient_gemms(
                grads.input, grads.weight, grads.bias, buf, w, x[start:stop], target[start:stop], start,
                smoothing=smoothing,
            )  # fmt: skip
        elif grads is not None:
            _gradient_gemms(grads, grad, w, x[start:stop], start)
    if fact is not None:  # the (rows, V) buffer freed first: the sort's temporaries may take its place
        target_grad, fact, buf = fact.target_grad, None, None
        factored.target_column_grads(grads.weight, grads.bias, target_grad, x, target, w.shape[0])
    return (losses if loss_sums is None else loss_sums), lse, stats, logits_all


class _ChunkOutputs(NamedTuple):
    losses: torch.Tensor  # (r,) fp32
    lse: torch.Tensor  # (r,) fp32
    stats: torch.Tensor | None  # (r, 5) fp32
    coefs: torch.Tensor | None  # (r, 3) fp32


class _ShardedBuffers(NamedTuple):
    partials: torch.Tensor  # (rows, len(PARTIALS)) fp32
    argmax: torch.Tensor | None  # (rows,) int64, with metrics
    class_weight_sum: torch.Tensor | float  # Σ w_c over the whole vocabulary

    @staticmethod
    def make(rows, lp: LossParams, class_weight, shard: VocabShard, device) -> _ShardedBuffers:
        return _ShardedBuffers(
            torch.empty((rows, len(PARTIALS)), dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.int64, device=device) if lp.metrics else None,
            shard.class_weight_sum.float() if class_weight is not None else float(shard.num_classes),
        )


def _gradient_gemms(grads: Gradients, dz: torch.Tensor, w: torch.Tensor, x_c: torch.Tensor, start: int) -> None:
    """One chunk's shares of the gradients: ``grad_x_c = dz·W``, ``grad_W (+)= dzᵀ·x_c``, ``grad_b += Σ dz``."""
    if grads.input is not None:
        input_grad_gemm(dz, w, grads.input[start : start + x_c.shape[0]])
    if grads.weight is not None:
        weight_grad_gemm(grads.weight, dz, x_c, first=start == 0)
    if grads.bias is not None:
        grads.bias.add_(dz.sum(dim=0, dtype=torch.float32))


def _unsharded_rows(logits, grad, bias, target, class_weight, scales, outs: _ChunkOutputs, lp, entropy_grad) -> None:
    cross_entropy_rows(
        logits, grad, bias, target, class_weight, scales, outs.losses, outs.lse, outs.stats, lp, outs.coefs,
        entropy_grad,
    )  # fmt: skip


def _sharded_rows(
    logits, grad, bias, target, class_weight, scales, outs: _ChunkOutputs, lp, shard, buffers: _ShardedBuffers, r
) -> None:
    """One chunk of a vocabulary-parallel pass: sweep 1 on this slice → combine over the group → sweep 2 (or,
    with ``outs.coefs`` and no ``grad``, dz's coefficients for a later sweep 2)."""
    offset, total = shard.offset, shard.num_classes
    partials = buffers.partials[:r]
    argmax = None if buffers.argmax is None else buffers.argmax[:r]
    cross_entropy_partials(logits, bias, target, class_weight, partials, argmax, lp, offset, total)
    cols = dict(zip(PARTIALS, partials.unbind(1)))
    m, sum_exp = cols["m"], cols["sum_exp"]
    parts = Partials(
        m,
        sum_exp,
        cols["z_y"],
        cols["w_y"] if class_weight is not None else None,
        cols["z_sum"] if lp.label_smoothing > 0 else None,
        cols["exp_z_sum"] - m * sum_exp if lp.metrics else None,  # Σ e·z → Σ e·log e = Σ e·(z − m)
        cols["sq_sum"] if lp.metrics else None,
        argmax,
    )
    sums = combine_partials(parts, shard)
    ce_scale, z_scale = (None, None) if scales is None else scales
    loss, lse, stats, coefs = index_rows(sums, target, buffers.class_weight_sum, lp, total, ce_scale, z_scale)
    outs.losses.copy_(loss)
    outs.lse.copy_(lse)
    if outs.stats is not None:
        outs.stats.copy_(stats)
    if grad is not None or outs.coefs is not None:
        coefs = torch.stack(coefs, dim=1, out=outs.coefs)  # (r, 3)
    if grad is not None:
        cross_entropy_grad(logits, grad, bias, target, class_weight, outs.lse, coefs, lp, offset, total)
