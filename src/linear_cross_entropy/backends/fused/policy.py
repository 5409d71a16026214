"""The fused backend's policy: its chunk-size rules, and the plan of one call made once in :func:`make_plan`.

Nothing here launches anything, nor imports triton but to ask whether the Hopper GEMM runs
(:func:`uses_factored`). :func:`...options.resolve` (the one place options are
resolved) applies :func:`memory_chunk_rows` (over :func:`fused_chunk_rows`) and :func:`recomputes_weight_grad`
(over :func:`fused_recomputes_weight_grad`) for ``backend="fused"``; the plan reads their results from the
resolved options. Their measured constants are one :class:`Thresholds` object,
:data:`THRESHOLDS`, read at call time (a test replaces it whole to force either weight-gradient pass).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Literal

import torch

from ..common import Grads, LossParams, ResolvedOptions

__all__ = [
    "Thresholds",
    "THRESHOLDS",
    "fp32_weight_grad_accumulation",
    "fused_chunk_rows",
    "fused_recomputes_weight_grad",
    "recompute_columns",
    "memory_chunk_rows",
    "recomputes_weight_grad",
    "Mode",
    "FusedPlan",
    "make_plan",
    "has_out_dtype_mm",
    "uses_factored",
]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The fused policy's measured constants (benchmarks/NOTES.md)."""

    # FLOPs a cuBLAS GEMM does in the time HBM moves one byte, by input dtype: the break-even of
    # fused_recomputes_weight_grad. bf16/fp16 on an H100: ~750 TFLOP/s over ~3.1 TB/s. fp32 inputs are left out
    # (0: never recompute): their GEMMs run at a fraction of that, or TF32 only when allowed.
    gemm_flops_per_byte: Mapping[torch.dtype, int]
    recompute_column_align: int = 128  # the vocabulary-major pass's class blocks: multiples of cuBLAS's tiles
    min_rows: int = 1024  # the shortest chunk fused_chunk_rows picks (long GEMMs for small batches)
    # The factored row pass (uses_factored): where it runs, and the widest hidden sizes at which it beats the row
    # kernel on an H100 with the plain-Triton exponential GEMM (none since that GEMM went persistent in v18e:
    # 25.2-25.7 ms against the row kernel's 23.9 at 16384x896x151936; it runs where tests force it) and with the
    # Hopper Gluon one (NOTES, v16 and "The plain-Triton GEMM on the GPU").
    factored_dtypes: frozenset = frozenset({torch.bfloat16})
    factored_devices: frozenset = frozenset({"cuda"})
    factored_max_features_triton: int = 0
    factored_max_features_gluon: int = 2048
    # whether one-chunk (deferred) calls take the factored pass too, within the same limits (NOTES, "One chunk on
    # the factored pass")
    factored_one_chunk: bool = True


THRESHOLDS = Thresholds(gemm_flops_per_byte={torch.bfloat16: 240, torch.float16: 240})


def fp32_weight_grad_accumulation(acc_policy: str, acc_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the fused backend accumulates a low-precision weight gradient in fp32 across chunks (an fp32
    ``(V, H)`` scratch): ``"balanced"``/``"accurate"`` with ``acc_dtype`` fp32 and fp16/bf16 inputs."""
    return acc_policy != "compact" and acc_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)


def fused_chunk_rows(num_rows: int, in_features: int, logit_bytes: int, fp32_scratch: bool) -> int:
    """Rows per chunk of the fused backend: a power of two, as large as memory allows, or every row at once.

    GEMM efficiency wants long chunks (a chunked GEMM loop costs 1.27x the un-chunked GEMMs at 512 rows, 1.06x at
    2048 on an H100); memory wants a small ``(rows, V)`` logits buffer. The buffer is held to a quarter of the
    logits the un-chunked computation would hold in the input dtype (eager holds ~5x that), and at least
    ``THRESHOLDS.min_rows`` rows so that small batches still run long GEMMs, and never more rows than the call has.

    With ``fp32_scratch`` (low-precision weights whose gradient the policy accumulates in fp32 across chunks) the
    chunked path also holds a ``(V, H)`` fp32 scratch, 4·H bytes per class, from forward to backward, and the
    buffer may be as large as that scratch (``rows·logit_bytes <= 4·H``, ``logit_bytes`` per logit) when that is
    more than the quarter. One chunk needs no scratch: its single weight-gradient GEMM accumulates in fp32 by
    itself. So where all ``N`` rows of logits take no more than the scratch, every row goes in one chunk: less
    memory held (the logits instead of the scratch plus the chunk buffer), the three GEMMs unchunked (1.06x instead
    of 1.16x the floor at 8192x4096x128256 bf16 on an H100) and a weight gradient rounded once. Otherwise fewer,
    longer chunks accumulate into the scratch fewer times (8192x2048x128256: 1.14x in two chunks, 1.18x in four).
    """
    if fp32_scratch and num_rows * logit_bytes <= 4 * in_features:
        return max(1, num_rows)
    budget_rows = max(num_rows // 4, THRESHOLDS.min_rows)
    if fp32_scratch:
        budget_rows = max(budget_rows, 4 * in_features // logit_bytes)
    rows = 1 << (budget_rows.bit_length() - 1)
    return max(1, min(rows, num_rows))


def fused_recomputes_weight_grad(chunk_rows: int, num_rows: int, accumulated_bytes: int, dtype: torch.dtype) -> bool:
    """Whether the fused backend computes the weight gradient in a second, vocabulary-major pass instead of
    accumulating it across row chunks.

    Accumulating ``grad_W += dzᵀ·x_c`` reads and writes the ``(V, H)`` accumulator once per chunk:
    ``2·b·V·H`` bytes (``b = accumulated_bytes``, 4 for an fp32 scratch), against ``2·r·V·H`` FLOPs of GEMM work
    per ``r``-row chunk. The vocabulary-major pass instead recomputes the logits once (one more GEMM, ``2·N·H·V``
    FLOPs) and forms each block of classes' gradient in one GEMM over all rows. Per chunk that is ``2·r·H·V``
    FLOPs, so the recompute is cheaper once ``2·b·V·H / BW > 2·r·H·V / F``, i.e. ``r < b·F/BW``: below ~480 rows for
    a bf16 accumulator and ~960 for an fp32 scratch on an H100 (the measured chunk loops: 1.70x the floor at 256
    rows in bf16, 1.67x at 512 in fp32, against ~1.4x for the recompute). Its weight gradient is one GEMM per class
    block, accumulated in fp32 and rounded once, with no scratch.
    """
    flops_per_byte = THRESHOLDS.gemm_flops_per_byte.get(dtype, 0)
    return chunk_rows < num_rows and chunk_rows < flops_per_byte * accumulated_bytes


def recompute_columns(num_rows: int, chunk_rows: int, num_classes: int) -> int:
    """Classes per block of the vocabulary-major pass: its ``(N, cols)`` logits hold no more than the row pass's
    ``(rows, V)`` ones, in multiples of ``THRESHOLDS.recompute_column_align`` (128: cuBLAS's tiles), at least
    one multiple and at most ``V``."""
    align = THRESHOLDS.recompute_column_align
    cols = chunk_rows * num_classes // max(1, num_rows) // align * align
    return min(num_classes, max(align, cols))


def memory_chunk_rows(
    num_rows: int, in_features: int, acc_policy: str, acc_dtype: torch.dtype, dtype: torch.dtype, weight_grad: bool
) -> int:
    """Rows per chunk for ``chunking_method="memory"`` (the fused backend's ``"auto"``): :func:`fused_chunk_rows`
    with this call's bytes per logit (``"accurate"`` keeps fp32 logits beside the input-dtype ``dz``) and whether
    it keeps an fp32 weight-gradient scratch."""
    low = dtype in (torch.float16, torch.bfloat16)
    fp32_scratch = weight_grad and fp32_weight_grad_accumulation(acc_policy, acc_dtype, dtype)
    logit_bytes = dtype.itemsize + (4 if acc_policy == "accurate" and low else 0)
    return fused_chunk_rows(num_rows, in_features, logit_bytes, fp32_scratch)


def recomputes_weight_grad(
    chunk_rows: int, num_rows: int, acc_policy: str, acc_dtype: torch.dtype, dtype: torch.dtype
) -> bool:
    """:func:`fused_recomputes_weight_grad` for this call's accumulator: an fp32 scratch (4 bytes per element)
    where the policy accumulates in fp32, else the gradient itself in the input dtype."""
    accumulated = 4 if fp32_weight_grad_accumulation(acc_policy, acc_dtype, dtype) else dtype.itemsize
    return fused_recomputes_weight_grad(max(1, chunk_rows), num_rows, accumulated, dtype)


def has_out_dtype_mm(device: torch.device) -> bool:
    """cuBLAS GEMMs with bf16/fp16 operands and an fp32 output (``torch.mm(..., out_dtype=)``, torch >= 2.8)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype")


class Mode(enum.Enum):
    """How a call's gradients are formed (see :mod:`.function`)."""

    LOSS_ONLY = "loss only"  # no gradients (no_grad, or reduction="none" before its backward)
    DEFERRED = "one chunk deferred"  # forward keeps the logits; backward runs sweep 2 and the gradient GEMMs
    ACCUMULATED = "chunks accumulated"  # every gradient formed chunk by chunk in the row pass
    RECOMPUTE = "vocabulary-major recompute"  # grad_x in the row pass; grad_W, grad_b from the vocabulary-major pass


# Who asks for the plan: the eager Function's forward (may defer; the vocabulary-major pass waits for backward),
# the compiled op's forward (gradients complete in forward), a reduction="none" forward that may keep one chunk
# (token_log_probs), and the recomputing backward of reduction="none".
Stage = Literal["forward", "op", "none_forward", "backward"]


@dataclasses.dataclass(frozen=True)
class FusedPlan:
    """Everything the fused backend decided for one call: made by :func:`make_plan`, read by every pass."""

    mode: Mode
    chunk_rows: int  # rows per chunk of the row pass (N: one chunk)
    batch_chunk_size: int  # the resolved option (may exceed N): sizes the vocabulary-major pass's column blocks
    grads: Grads  # the gradients the row pass forms (RECOMPUTE: grad_x only; the weight pass forms the others)
    weight_grads: Grads  # RECOMPUTE: the gradients the vocabulary-major pass forms
    fp32_logits: bool  # logits leave the GEMM in fp32, dz goes to a second buffer in the input dtype
    grad_x_dtype: torch.dtype  # fp32 where the rounding waits for the upstream gradient
    grad_w_dtype: torch.dtype  # fp32 for a scratch accumulated across chunks
    per_row: bool  # keep (N,) losses and lse; else per-chunk loss sums and no lse
    weight_grad_later: bool  # RECOMPUTE: the vocabulary-major pass runs in backward
    entropy_grad: bool  # sweep 2 adds g_H·∂H/∂z (token_log_probs' backward)
    factored: bool  # the row pass runs factored (fused/factored.py) instead of logits GEMM + row kernel


def _fp32_logits(acc_policy: str, x: torch.Tensor) -> bool:
    """``"accurate"`` with low-precision inputs: logits leave the GEMM in fp32 (no rounding before the softmax) and
    ``dz`` goes to a second buffer in the input dtype (6 bytes per logit instead of 2); otherwise ``dz`` overwrites
    the logits in place."""
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    return acc_policy == "accurate" and low_precision and has_out_dtype_mm(x.device)


def _mode(stage: Stage, lp: LossParams, ro: ResolvedOptions, grads: Grads, num_rows: int, sharded: bool) -> Mode:
    one_chunk = ro.batch_chunk_size >= num_rows
    if not grads.any or (lp.reduction == "none" and stage in ("forward", "op")):
        return Mode.LOSS_ONLY
    if stage == "none_forward":
        return Mode.DEFERRED if one_chunk else Mode.LOSS_ONLY
    if stage == "forward" and one_chunk:
        return Mode.DEFERRED
    if ro.recompute_weight_grad and grads.weight and not sharded:
        return Mode.RECOMPUTE
    return Mode.ACCUMULATED


def uses_factored(
    mode: Mode, lp: LossParams, x: torch.Tensor, w_dtype: torch.dtype, *, sharded: bool, entropy_grad: bool,
    fp32_logits: bool, deferrable: bool = False,
) -> bool:  # fmt: skip
    """Whether the row pass runs factored (:mod:`.factored`: ``dz`` as a row scale times the exponential the
    logits GEMM's epilogue stores, no pass over the logits): chunks accumulated, or one chunk deferred where
    ``deferrable`` (the eager Function's forward of a scalar reduction without a retained graph: backward multiplies
    the rows' scales by the upstream gradient and runs the gradient GEMMs on ``E`` once) and without label
    smoothing (its rank-1 share of ``grad_W`` is formed for an upstream gradient of 1); unsharded, class-index
    targets (with or without label smoothing), a logit scale ``a > 0`` if any (the epilogue takes the row max of
    ``u = x·Wᵀ + b``, which is ``z = a·u``'s only for ``a > 0``), neither soft-capping, metrics nor the entropy's
    gradient, the logits not kept in fp32, 16-bit operands of one dtype (``THRESHOLDS.factored_dtypes``: bf16;
    fp16's range cannot hold ``exp(z − z_y)``), and a GEMM that beats the row kernel at this hidden size: the
    plain-Triton one up to ``THRESHOLDS.factored_max_features_triton``, the Hopper Gluon one up to
    ``factored_max_features_gluon`` (benchmarks/NOTES.md, v16). The operands' layout (TMA's rules) and the GPU
    (Hopper or newer) are checked where the operands are, in the row pass (:func:`.factored.tma_ready`)."""
    t = THRESHOLDS
    deferred = mode is Mode.DEFERRED and deferrable and t.factored_one_chunk and lp.label_smoothing == 0
    if not ((mode is Mode.ACCUMULATED or deferred) and not sharded and not entropy_grad and not fp32_logits):
        return False
    if lp.target_is_probs or lp.metrics or lp.logit_softcap or lp.logit_scale <= 0:
        return False
    if x.dtype not in t.factored_dtypes or w_dtype != x.dtype or x.device.type not in t.factored_devices:
        return False
    if x.shape[1] <= t.factored_max_features_triton:
        return True
    if x.shape[1] > t.factored_max_features_gluon:
        return False
    from .factored_gluon import runs_on  # imports triton: asked only here

    return runs_on(x)


def make_plan(
    stage: Stage,
    lp: LossParams,
    ro: ResolvedOptions,
    grads: Grads,
    x: torch.Tensor,  # (N, H)
    w_dtype: torch.dtype,
    *,
    sharded: bool = False,
    entropy_grad: bool = False,
) -> FusedPlan:
    """The plan of one fused call, from the resolved options and the call (the only place these rules live).

    The gradients' dtypes: fp32 where the policy accumulates low-precision gradients in fp32
    (:func:`fp32_weight_grad_accumulation`) and the rounding has to wait — ``grad_w`` across chunks (one chunk's
    single GEMM accumulates in fp32 by itself, and the vocabulary-major pass rounds each block once), ``grad_x``
    until the upstream gradient scales it (the scalar reductions' forward) — else the inputs' own dtypes."""
    n = x.shape[0]
    mode = _mode(stage, lp, ro, grads, n, sharded)
    fp32_policy = fp32_weight_grad_accumulation(ro.acc_policy, ro.acc_dtype, x.dtype)
    scaled_later = stage in ("forward", "op")
    chunked = ro.batch_chunk_size < n
    recompute = mode is Mode.RECOMPUTE
    fp32_logits = _fp32_logits(ro.acc_policy, x)
    # the eager Function's scalar reductions, whose backward can fold g into the factored pass's row scales once
    deferrable = stage == "forward" and lp.reduction != "none" and not ro.allow_retain_graph
    return FusedPlan(
        mode=mode,
        chunk_rows=max(1, min(ro.batch_chunk_size, n)),
        batch_chunk_size=ro.batch_chunk_size,
        grads=Grads(grads.input, False, False) if recompute else grads,
        weight_grads=Grads(False, grads.weight, grads.bias) if recompute else Grads(False, False, False),
        fp32_logits=fp32_logits,
        grad_x_dtype=torch.float32 if fp32_policy and scaled_later else x.dtype,
        grad_w_dtype=torch.float32 if fp32_policy and chunked and not recompute else w_dtype,
        per_row=stage != "forward" or lp.reduction == "none" or lp.metrics or bool(lp.z_loss) or recompute,
        weight_grad_later=recompute and stage == "forward",
        entropy_grad=entropy_grad,
        factored=uses_factored(
            mode,
            lp,
            x,
            w_dtype,
            sharded=sharded,
            entropy_grad=entropy_grad,
            fp32_logits=fp32_logits,
            deferrable=deferrable,
        ),
    )
