"""The fused backend's backward-side passes: the single chunk's deferred gradients and the vocabulary-major pass.

:func:`deferred_grads` (:attr:`.policy.Mode.DEFERRED`): sweep 2 on the logits forward kept, with the upstream
gradient folded into each row's coefficients, then the gradient GEMMs. :func:`weight_grad_pass`
(:attr:`.policy.Mode.RECOMPUTE`): per block of classes, recompute the logits for every row, sweep 2, one GEMM.
"""

from __future__ import annotations

import torch

from ..common import Grads, LossParams
from .gemm import input_grad_gemm, logits_buffers, logits_gemm, row_padded, weight_grad_gemm
from .policy import recompute_columns
from .rows import cross_entropy_grad

__all__ = ["deferred_grads", "weight_grad_pass"]


def deferred_grads(
    logits: torch.Tensor,  # (N, C) the single chunk's logits, as forward left them (row-padded buffer)
    lse: torch.Tensor,  # (N,) fp32
    coefs: torch.Tensor,  # (N, 3) fp32 dz's coefficients for an upstream gradient of 1
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (C, H)
    b: torch.Tensor | None,  # (C,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (C,)
    lp: LossParams,
    grad_out: torch.Tensor,  # () the upstream gradient g, or (N, 1) one per row
    grads: Grads,
    shard=None,  # VocabShard: w, b, class_weight are this rank's slices
    in_place: bool = True,  # dz may overwrite the logits (no second backward)
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (N,) fp32 each: H and g_H (see kernels.py)
) -> tuple:
    """``(grad_x, grad_w, grad_b)`` of a single-chunk call, all formed in backward: sweep 2 writes ``dz`` with
    ``g`` folded into each row's coefficients, so ``dz = bf16(g·∂ℓ/∂z)`` is rounded once as eager rounds it, then
    ``grad_x = dz·W``, ``grad_W = dzᵀ·x`` and ``grad_b = Σ_rows dz``, each rounded once whatever ``g`` is. A
    per-row ``grad_out`` (``reduction="none"``) works the same, the coefficients being linear in it."""
    n, v = logits.shape
    offset, total = (0, v) if shard is None else (shard.offset, shard.num_classes)
    dz = logits if in_place and logits.dtype == x.dtype else row_padded(n, v, x.dtype, x.device)
    cross_entropy_grad(
        logits, dz, b, target, class_weight, lse, coefs * grad_out.float(), lp, offset, total, entropy_grad
    )
    gx = gw = gb = None
    if grads.input:
        gx = input_grad_gemm(dz, w, torch.empty(x.shape, dtype=x.dtype, device=x.device))
    if grads.weight:
        gw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        weight_grad_gemm(gw, dz, x, first=True)
    if grads.bias:
        gb = dz.sum(dim=0, dtype=torch.float32)
    return gx, gw, gb


def weight_grad_pass(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    lse: torch.Tensor,  # (N,) fp32, from the row pass
    coefs: torch.Tensor,  # (N, 3) fp32, from the row pass (for an upstream gradient of 1, or per row)
    lp: LossParams,
    plan,  # FusedPlan: chunk_rows sizes the blocks, weight_grads says which gradients, fp32_logits the buffer
    scale: torch.Tensor | None = None,  # () the upstream gradient, folded into the coefficients
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (N,) fp32 each: H and g_H
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_w, grad_b)`` from a vocabulary-major pass that recomputes the logits.

    Per block of ``cols`` classes (:func:`.policy.recompute_columns`: the same buffer size as the row pass's): one
    cuBLAS GEMM writes the block's logits ``x·W_blockᵀ`` for all ``N`` rows, the row kernel's ``PHASE`` 2 turns
    them into ``dz`` in place from each row's ``lse`` and coefficients, and ``grad_W_block = dzᵀ·x`` is one GEMM
    over every row: accumulated in fp32 by cuBLAS and rounded once into the gradient, with no scratch and no
    accumulation across chunks. ``grad_b_block`` is ``dz``'s column sum.
    """
    n, v = x.shape[0], w.shape[0]
    if scale is not None:
        coefs = coefs * scale.float()
    cols = recompute_columns(n, plan.batch_chunk_size, v)
    logits_all, grad_all = logits_buffers(n, cols, x, plan.fp32_logits, want_grads=True)
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device) if plan.weight_grads.weight else None
    grad_b = torch.empty(v, dtype=torch.float32, device=x.device) if plan.weight_grads.bias else None
    for start in range(0, v if n else 0, cols):
        part = slice(start, min(start + cols, v))
        width = part.stop - part.start
        logits, grad = logits_all[:, :width], grad_all[:, :width]
        logits_gemm(x, w[part], logits, torch.float32 if plan.fp32_logits else None)
        bias = None if b is None else b[part]
        weight = None if class_weight is None else class_weight[part]
        cross_entropy_grad(logits, grad, bias, target, weight, lse, coefs, lp, part.start, v, entropy_grad)
        if grad_w is not None:
            weight_grad_gemm(grad_w[part], grad, x, first=True)
        if grad_b is not None:
            torch.sum(grad, dim=0, dtype=torch.float32, out=grad_b[part])
    if n == 0:
        for g in (grad_w, grad_b):
            if g is not None:
                g.zero_()
    return grad_w, grad_b
