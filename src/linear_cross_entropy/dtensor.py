r"""Tensor parallel on PyTorch's own engine: ``DTensor`` arguments run the vocabulary-parallel loss by themselves.

A head sharded with ``torch.distributed.tensor`` (``parallelize_module(..., ColwiseParallel())`` on the head's
``nn.Linear``, ``distribute_tensor(W, mesh, [Shard(0)])``, FSDP2's unsharded parameter under a TP mesh) is a
``DTensor`` whose rows (the vocabulary) are split over a 1-D device mesh. :func:`to_local_call` turns such a call
into the ``process_group=`` call of :mod:`.distributed` on the local tensors and the mesh's process group, and
returns how to wrap the results back:

==================  ============================================================================================
argument            served
==================  ============================================================================================
``linear_weight``   a DTensor on a 1-D mesh, ``Shard(0)`` (vocabulary parallel: DTensor's ``torch.chunk`` split,
                    ``ceil(V/W)`` rows per rank in mesh order, the last ones fewer; every rank needs at least one)
                    or ``Replicate()`` (each rank computes the whole problem: the single-device path)
``linear_bias``     None or a DTensor of ``linear_weight``'s mesh and placement
``weight``          (class weights) None, a DTensor of ``linear_weight``'s placement, or a plain ``(C,)`` tensor
                    of the whole vocabulary, the same on every rank (a module's buffer), sliced here
``input``           a plain tensor, the same on every rank; or a DTensor on the same mesh, ``Replicate()`` or,
                    for an ``(N, F)`` input, ``Shard(0)`` (sequence parallel: rows gathered, see below)
``target``          a plain tensor of all ``N`` rows, the same on every rank; or a DTensor on the same mesh,
                    ``Replicate()`` or ``Shard(0)`` (gathered: 8 bytes per token)
==================  ============================================================================================

Anything else raises ``ValueError`` naming the argument, what it found and the placements served (e.g. ``Shard(1)``,
a 2-D mesh — under FSDP2 × TP the forward sees the parameter on the 1-D TP mesh, which is served — or a mesh whose
order differs from its process group's rank order, which would put the slices in the wrong places).

Results: the loss (and metrics) follow ``input``: a plain input gives plain tensors, as the unsharded call; a
DTensor input gives DTensors on the mesh, ``Replicate()`` for ``"mean"``/``"sum"`` (as ``loss_parallel()``'s
``cross_entropy``) and the input's row placement for ``"none"``. The gradients of DTensor arguments are DTensors
of their own placements (``linear_weight``/``linear_bias``: ``Shard(0)`` slices); a plain input's gradient is the
full all-reduced one (``input_grad_all_reduce`` as with ``process_group=``). A ``Replicate()`` input's gradient
comes back as a ``Partial()`` DTensor (this rank's vocabulary slice's share; reduced by DTensor wherever it is
next needed, as ``F.linear`` on a ``ColwiseParallel`` weight gives), so ``input_grad_all_reduce`` does not apply.

Sequence parallel (``input`` ``Shard(0)`` on rows): every logit ``x_n·w_c`` needs row ``n`` and class ``c`` on one
rank, and each rank holds ``N/W`` rows and ``V/W`` classes: either the rows travel (an all-gather, ``(W−1)/W·N·H``
elements received per rank) or the weight does (``(W−1)/W·V·H``, and its gradient back as much again). Rows are
cheaper wherever ``N < V`` (8192 tokens against 128256 classes: 16× fewer bytes), so the rows are gathered, as
PyTorch's TP recipe does before a ``ColwiseParallel`` head; each rank then runs the vocabulary-parallel loss on all
rows (12 bytes per token of statistics) and its ``(N, H)`` input-gradient share is reduce-scattered back to the
row owners (``Partial → Shard(0)``): per rank, ``(W−1)/W·N·H`` elements each way — the same bytes as the
replicated input's all-reduce (an all-reduce is a reduce-scatter plus an all-gather).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from .metrics import LinearCrossEntropyOutput, LossMetrics

try:  # torch >= 2.5 (public); 2.4 keeps DTensor under a private name
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch 2.4, or a build without distributed
    try:
        from torch.distributed._tensor import DTensor, Partial, Replicate, Shard
    except ImportError:
        DTensor = None

__all__ = ["involves_dtensor", "to_local_call", "LocalCall"]

_SERVED = (
    "linear_weight as a DTensor on a 1-D device mesh placed (Shard(0),) (vocabulary parallel) or (Replicate(),); "
    "linear_bias and weight (class weights) placed as linear_weight; input and target plain (the same on every "
    "rank) or DTensors on the same mesh placed (Replicate(),) or (Shard(0),)"
)


def involves_dtensor(*tensors: torch.Tensor | None) -> bool:
    """Whether any argument is a ``DTensor``."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


@dataclasses.dataclass(frozen=True)
class LocalCall:
    """The call on local tensors (``process_group`` None: the single-device path) and how to re-wrap its result."""

    input: torch.Tensor
    linear_weight: torch.Tensor
    target: torch.Tensor
    linear_bias: torch.Tensor | None
    weight: torch.Tensor | None
    process_group: object  # torch.distributed.ProcessGroup | None
    input_grad_all_reduce: bool
    wrap_tensor: Callable[[torch.Tensor], torch.Tensor]  # a loss or metric of the local call -> the caller's

    def wrap(self, out: torch.Tensor | LinearCrossEntropyOutput) -> torch.Tensor | LinearCrossEntropyOutput:
        """The local call's result (a loss, or ``(loss, metrics)``) as the caller gets it."""
        if isinstance(out, LinearCrossEntropyOutput):
            return LinearCrossEntropyOutput(
                self.wrap_tensor(out.loss), LossMetrics(*map(self.wrap_tensor, out.metrics))
            )
        return self.wrap_tensor(out)


def to_local_call(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    reduction: str,
    process_group,
    input_grad_all_reduce: bool,
) -> LocalCall:
    """Check the placements (ValueError naming the argument) and unwrap a call with DTensor arguments."""
    if process_group is not None:
        raise ValueError("process_group must be None when linear_weight is a DTensor: its device mesh's group is used")
    if not isinstance(linear_weight, DTensor):
        raise ValueError(
            f"linear_weight is a plain {type(linear_weight).__name__} while other arguments are DTensors; served: "
            + _SERVED
        )
    mesh = linear_weight.device_mesh
    sharded = _weight_placement(linear_weight)
    if isinstance(input, DTensor) and not input_grad_all_reduce:
        raise ValueError(
            "input_grad_all_reduce=False applies to a plain input; a DTensor input's gradient is a DTensor "
            "(Partial() for a Replicate() input, reduced where it is next needed; Shard(0) for Shard(0) rows)"
        )
    rows = _gathered(input, "input", mesh, allow_shard=input.dim() == 2)
    if isinstance(input, DTensor):
        # The sharded loss leaves this rank's vocabulary share of grad_input unreduced: a Partial() gradient.
        local_input = rows.to_local(grad_placements=[Partial()] if sharded else None)
        input_grad_all_reduce = False
    else:
        local_input = input
    local_target = _gathered(target, "target", mesh, allow_shard=True)
    if isinstance(local_target, DTensor):
        local_target = local_target.to_local()
    local_bias = None if linear_bias is None else _like_weight(linear_bias, "linear_bias", linear_weight).to_local()
    local_class_weight = _class_weight(weight, linear_weight, sharded)
    return LocalCall(
        input=local_input,
        linear_weight=linear_weight.to_local(),
        target=local_target,
        linear_bias=local_bias,
        weight=local_class_weight,
        process_group=mesh.get_group(0) if sharded else None,
        input_grad_all_reduce=input_grad_all_reduce,
        wrap_tensor=_wrapper(input, mesh, reduction),
    )


def _weight_placement(linear_weight) -> bool:
    """True for ``Shard(0)`` (vocabulary parallel), False for ``Replicate()``; ValueError otherwise."""
    mesh, placements = linear_weight.device_mesh, tuple(linear_weight.placements)
    if mesh.ndim != 1:
        raise ValueError(
            f"linear_weight is a DTensor on a {mesh.ndim}-D device mesh (placements {placements}); served: "
            f"{_SERVED}. Pass the parameter on the tensor-parallel sub-mesh (FSDP2 × TP does so in forward)."
        )
    if placements == (Replicate(),):
        return False
    if placements != (Shard(0),):
        raise ValueError(f"linear_weight is a DTensor placed {placements}; served: {_SERVED}")
    classes, world = linear_weight.shape[0], mesh.size(0)
    if -(-classes // world) * (world - 1) >= classes:
        raise ValueError(
            f"linear_weight: Shard(0) of {classes} classes over {world} ranks leaves a rank without classes "
            f"(DTensor splits as torch.chunk, {-(-classes // world)} per rank); the vocabulary-parallel loss needs "
            "every rank to hold at least one class"
        )
    # The same verdict on every rank (the mesh is global): no rank may go on to a collective the others skip.
    if mesh.mesh.tolist() != dist.get_process_group_ranks(mesh.get_group(0)):
        raise ValueError(
            f"linear_weight's device mesh {mesh.mesh.tolist()} orders its ranks differently from its process "
            "group (sorted global ranks): the vocabulary slices would be combined out of order. Build the mesh "
            "in ascending rank order (init_device_mesh does)."
        )
    return True


def _same_mesh(t, name: str, mesh) -> None:
    if t.device_mesh != mesh:
        raise ValueError(f"{name} is a DTensor on {t.device_mesh}, linear_weight on {mesh}: they must share the mesh")


def _gathered(t, name: str, mesh, allow_shard: bool):
    """A plain ``t`` as it is; a DTensor ``t`` on ``mesh`` as a ``Replicate()`` DTensor (``Shard(0)`` gathered)."""
    if not isinstance(t, DTensor):
        return t
    _same_mesh(t, name, mesh)
    placements = tuple(t.placements)
    if placements == (Replicate(),):
        return t
    if allow_shard and placements == (Shard(0),):
        return t.redistribute(mesh, [Replicate()])
    served = "(Replicate(),) or (Shard(0),) on rows" if allow_shard else "(Replicate(),)"
    raise ValueError(f"{name} is a DTensor placed {placements} of shape {tuple(t.shape)}; served: {served}")


def _like_weight(t, name: str, linear_weight):
    """``t`` checked to be a DTensor of ``linear_weight``'s mesh and placement."""
    if not isinstance(t, DTensor):
        raise ValueError(
            f"{name} is a plain tensor while linear_weight is a DTensor placed {tuple(linear_weight.placements)}; "
            f"pass {name} as a DTensor of the same placement (its gradient is this rank's slice)"
        )
    _same_mesh(t, name, linear_weight.device_mesh)
    if tuple(t.placements) != tuple(linear_weight.placements):
        raise ValueError(
            f"{name} is a DTensor placed {tuple(t.placements)}, linear_weight {tuple(linear_weight.placements)}: "
            "they must be placed alike"
        )
    return t


def _class_weight(weight, linear_weight, sharded: bool):
    """Class weights as this rank's local ``(local_C,)`` slice (a plain whole-vocabulary tensor is sliced)."""
    if weight is None:
        return None
    if isinstance(weight, DTensor):
        return _like_weight(weight, "weight", linear_weight).to_local()
    classes = linear_weight.shape[0]
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise RuntimeError(
            f"weight tensor should be defined either for all {classes} classes or no classes but got weight tensor "
            f"of shape: {list(weight.shape)}"
        )
    if not sharded:
        return weight
    per_rank = -(-classes // linear_weight.device_mesh.size(0))  # torch.chunk's split, as DTensor's Shard(0)
    start = linear_weight.device_mesh.get_coordinate()[0] * per_rank
    return weight[start : start + linear_weight.to_local().shape[0]]


def _wrapper(input, mesh, reduction: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plain results for a plain input; DTensors on ``mesh`` for a DTensor input (rows placed as the input's)."""
    if not isinstance(input, DTensor):
        return lambda result: result
    rows_sharded = reduction == "none" and tuple(input.placements) == (Shard(0),)

    def wrap(result: torch.Tensor) -> torch.Tensor:
        replicated = DTensor.from_local(result, mesh, [Replicate()], run_check=False)
        # Shard(0) from Replicate() is a local slice; its backward all-gathers the upstream gradient, which the
        # vocabulary-parallel "none" backward needs whole on every rank.
        return replicated.redistribute(mesh, [Shard(0)]) if rows_sharded else replicated

    return wrap
