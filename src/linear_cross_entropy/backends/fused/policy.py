"""The fused backend's plan of one call: every decision it takes for a call, made once, in :func:`make_plan`.

Nothing here imports triton or launches anything. The chunk-size rules that :func:`...options.resolve` applies
(``fused_chunk_rows``, ``fused_recomputes_weight_grad``, ``recompute_columns``) still live in :mod:`...options`,
whose module constants the test suite patches; the plan reads their results from the resolved options.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import torch

from ...options import ResolvedOptions, fp32_weight_grad_accumulation
from ..common import Grads, LossParams

__all__ = ["Mode", "FusedPlan", "make_plan", "has_out_dtype_mm"]


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
    (:func:`...options.fp32_weight_grad_accumulation`) and the rounding has to wait — ``grad_w`` across chunks (one chunk's
    single GEMM accumulates in fp32 by itself, and the vocabulary-major pass rounds each block once), ``grad_x``
    until the upstream gradient scales it (the scalar reductions' forward) — else the inputs' own dtypes."""
    n = x.shape[0]
    mode = _mode(stage, lp, ro, grads, n, sharded)
    fp32_policy = fp32_weight_grad_accumulation(ro.acc_policy, ro.acc_dtype, x.dtype)
    scaled_later = stage in ("forward", "op")
    chunked = ro.batch_chunk_size < n
    recompute = mode is Mode.RECOMPUTE
    return FusedPlan(
        mode=mode,
        chunk_rows=max(1, min(ro.batch_chunk_size, n)),
        batch_chunk_size=ro.batch_chunk_size,
        grads=Grads(grads.input, False, False) if recompute else grads,
        weight_grads=Grads(False, grads.weight, grads.bias) if recompute else Grads(False, False, False),
        fp32_logits=_fp32_logits(ro.acc_policy, x),
        grad_x_dtype=torch.float32 if fp32_policy and scaled_later else x.dtype,
        grad_w_dtype=torch.float32 if fp32_policy and chunked and not recompute else w_dtype,
        per_row=stage != "forward" or lp.reduction == "none" or lp.metrics or bool(lp.z_loss) or recompute,
        weight_grad_later=recompute and stage == "forward",
        entropy_grad=entropy_grad,
    )
