r"""Vocabulary-parallel statistics: the loss of a head whose vocabulary is split across the ranks of a process group.

Rank ``r`` of ``process_group`` holds the ``r``-th contiguous slice of the vocabulary, in rank order:
``linear_weight`` rows ``[start_r, end_r)`` (slices may be uneven; every slice must hold at least one class), the
matching bias and class-weight slices; input and targets are the same on every rank and targets are global class
indices. The vocabulary is the concatenation of the slices, ``V = Σ_r local_V_r``; ``start_r = Σ_{q<r} local_V_q``.

Once per call (:func:`make_shard`): one ``all_gather`` of ``(local_V, N, F, has_bias, has_weight)`` per rank (the
offsets and the global ``V``; ranks that disagree on the shapes raise instead of hanging in a mismatched
collective), one ``all_reduce`` SUM of ``Σ w`` with class weights, and, for a scalar-reduced mean with class
weights, one ``(N,)`` all_reduce SUM of ``w_y`` (the mean's denominator).

Which path: the backend is chosen as without a group (``dispatch.choose_backend``): the fused path on CUDA for
fp16/bf16/fp32 (and explicitly under ``TRITON_INTERPRET=1`` on the CPU), else the chunked path. Chunk (and softmax
block) sizes follow the global ``V``, so every rank runs the same chunks and therefore the same collectives.

Per block of rows, on ``(rows,)`` statistics: the chunked path (:func:`..backends.chunked.chunk_loss_and_grad`; a
block is at most ``batch_chunk_size`` rows) in the stats dtype (fp32; fp64 for fp64 inputs); the fused path
(:mod:`..backends.fused.chunks`; a block is one chunk) in fp32, between its row kernel's two sweeps —
sweep 1 writes this slice's per-row partials relative to the slice's own max ``m_r``,
:func:`..backends.partials.combine_partials` rescales them by ``exp(m_r − M)`` after step 1, and sweep 2 writes
this slice's ``dz`` from the global ``lse``. This module sets the shard up; its collectives (:class:`VocabShard`)
and the combine, which the tiled backend's vocabulary splits share, live in :mod:`..backends.partials`:

1. ``all_reduce`` MAX of the row max ``m``;
2. one ``all_reduce`` SUM of a stacked ``(rows, k)`` tensor: ``Σ exp(z − m)``, the target logit ``z_y`` (a rank
   contributes only where the target is in its slice), plus ``w_y`` with class weights, ``Σ_c w_c z_c`` with label
   smoothing, and ``Σ e·log e``, ``Σ z²`` with metrics (``2 ≤ k ≤ 6``);
3. with metrics only: ``all_reduce`` MIN (int64) of the global index of the row's argmax over the ranks whose
   local max equals ``m`` (the first maximal class, as ``argmax``).

The loss, lse, statistics and ``dz``'s coefficients then follow from the combined sums by one formula for both
paths (:func:`..backends.common.index_rows`).

Bytes per token per block, both paths: ``4 + 4·k`` (fp32; ``8 + 8·k`` in fp64, chunked only), ``+ 8`` with
metrics — 12 bytes for a plain loss, at most 36 with every extra. Once per call, the full ``grad_input`` is
all-reduced (SUM): ``H·dtype_size`` bytes per token (2·H for bf16), unless ``input_grad_all_reduce=False``
(Megatron-style callers who all-reduce the input gradient of the tensor-parallel region themselves). No rank ever
gathers logits.

Every rank must make the same calls with the same arguments other than its slices (same ``input`` and
``requires_grad``, same loss settings, same upstream gradient for ``reduction="none"``): the collectives run in
the same order on every rank. For the scalar reductions the gradients and the ``grad_input`` all-reduce are
computed in forward (in backward on the fused path with a single chunk, whose gradient GEMMs are deferred); for
``"none"`` in backward, which sweeps the logits again, with their collectives.

Debugging: with ``LINEAR_CROSS_ENTROPY_DEBUG=1`` each call also compares a checksum of the targets across ranks
(all_reduce MIN and MAX; a host sync) and raises ValueError when they differ.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .backends.partials import VocabShard, combine_partials

__all__ = ["VocabShard", "make_shard", "combine_partials", "check_backend", "debug_enabled"]


def debug_enabled() -> bool:
    """``LINEAR_CROSS_ENTROPY_DEBUG`` set to a non-empty value other than ``0``."""
    return os.environ.get("LINEAR_CROSS_ENTROPY_DEBUG", "0") not in ("", "0")


def check_backend(backend: str, device: torch.device) -> None:
    """ValueError naming ``process_group`` when its backend cannot run collectives on ``device``'s tensors."""
    backend = str(backend).lower()
    if backend == "gloo" and device.type != "cpu":
        raise ValueError(
            f"process_group uses the gloo backend, which this loss supports only for CPU tensors; got tensors on "
            f"{device}. Use an NCCL group for CUDA tensors."
        )
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"process_group uses the NCCL backend, which needs CUDA tensors; got tensors on {device}. "
            "Use a gloo group for CPU tensors."
        )


def make_shard(
    process_group,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    input_grad_all_reduce: bool,
) -> VocabShard:
    """Validate the setup across the group (one all_gather; a host sync) and return this rank's :class:`VocabShard`.

    ValueError naming ``process_group`` for a group that is not a ProcessGroup, whose backend cannot use the tensors'
    device, whose ranks disagree on the input's shape or on bias/class weights being given, or where a rank holds an
    empty slice; with the debug flag, for targets that differ across ranks.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialised")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    device = input.device
    check_backend(dist.get_backend(process_group), device)
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    n = input.shape[0] if input.dim() == 2 else 1
    local_classes = linear_weight.shape[0]
    mine = torch.tensor(
        [local_classes, n, input.shape[-1], linear_bias is not None, weight is not None], dtype=torch.int64
    ).to(device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=process_group)
    table = torch.stack(every).tolist()  # (world, 5)
    sizes = [row[0] for row in table]
    if any(row[1:] != table[0][1:] for row in table):
        raise ValueError(
            "process_group: ranks disagree on (N, F, bias given, class weights given): "
            f"{[tuple(row[1:]) for row in table]}; input and targets must be the same on every rank"
        )
    if min(sizes) < 1:
        raise ValueError(
            f"process_group: every rank must hold a non-empty vocabulary slice (rank r holds the r-th slice in rank "
            f"order); local vocabulary sizes are {sizes}"
        )
    if debug_enabled():
        _check_same_targets(target, process_group)
    weight_sum = None
    if weight is not None:
        weight_sum = weight.detach().to(torch.float64).sum()
        dist.all_reduce(weight_sum, op=dist.ReduceOp.SUM, group=process_group)
    return VocabShard(
        group=process_group,
        offset=sum(sizes[:rank]),
        local_classes=local_classes,
        num_classes=sum(sizes),
        input_grad_all_reduce=input_grad_all_reduce,
        class_weight_sum=weight_sum,
    )


def _check_same_targets(target: torch.Tensor, group) -> None:
    t = target.reshape(-1).long()
    ramp = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.int64)
    checksum = torch.stack([t.sum(), (t * ramp).sum(), (t * ramp * ramp % 1_000_003).sum()])
    lo, hi = checksum.clone(), checksum.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise ValueError(
            "process_group: targets differ across ranks (LINEAR_CROSS_ENTROPY_DEBUG checksum); input and targets "
            "must be the same on every rank"
        )
