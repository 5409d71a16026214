"""The chunked path's GEMMs and the buffers they write, allocated once per call, and the sweep's outputs.

The K positions of a row are K loss rows: with the weight in ``(K, C, F)`` order (a copy only for K > 1), one GEMM
per chunk of ``r`` input rows gives ``(r, K·C)``, which is the ``(r·K, C)`` logits of the loss rows ``n·K + k`` as
a view; ``grad_x = dz·W`` and ``grad_W = dzᵀ·x`` are again one GEMM each per chunk, written with ``out=`` into
the call's buffers.
"""

from __future__ import annotations

import dataclasses

import torch

from ..options import ResolvedOptions
from .common import Grads, stat_dtype

__all__ = ["ChunkBuffers", "chunk_buffers", "logits_gemm", "accumulate_grads", "finish_grads", "concat_outputs"]


@dataclasses.dataclass
class ChunkBuffers:
    """What one sweep over the chunks reads and writes."""

    rows: int  # input rows per chunk
    w_rows: torch.Tensor  # (K·C, F) in the GEMM dtype
    b_rows: torch.Tensor | None  # (K·C,)
    logits: torch.Tensor  # (rows, K·C) one chunk's GEMM output, then its dz
    upcast: torch.Tensor | None  # (block, C) acc_dtype: a low-precision block's softmax arithmetic
    grad_x: torch.Tensor | None  # (N, F)
    grad_w: torch.Tensor | None  # (K·C, F) in the GEMM dtype (one chunk), else acc_dtype unless "compact"
    grad_b: torch.Tensor | None  # (K·C,) stats dtype
    product: torch.Tensor | None  # (classes, F) GEMM dtype: dzᵀ·x before it is added to an acc_dtype grad_w


def chunk_buffers(
    x: torch.Tensor,  # (N, F)
    w: torch.Tensor,  # (C, K, F)
    b: torch.Tensor | None,  # (C, K)
    ro: ResolvedOptions,
    grads: Grads | None,  # the gradients to compute, or None: loss only
    block: int,  # loss rows per block of the softmax arithmetic
) -> ChunkBuffers:
    n, f = x.shape
    c, k, _ = w.shape
    acc = ro.acc_dtype
    gemm_dtype = acc if ro.acc_policy == "accurate" and acc != x.dtype else x.dtype
    w_rows = w.to(gemm_dtype).transpose(0, 1).reshape(k * c, f)  # a view unless K > 1 or "accurate" upcasts
    b_rows = None if b is None else b.to(gemm_dtype).T.reshape(k * c)
    rows = min(ro.batch_chunk_size, max(n, 1))
    logits = torch.empty((rows, k * c), dtype=gemm_dtype, device=x.device)
    upcast = None if acc == gemm_dtype else torch.empty((min(block, rows * k), c), dtype=acc, device=x.device)
    grad_x = grad_w = grad_b = product = None
    if grads is not None and grads.input:
        grad_x = torch.empty((n, f), dtype=x.dtype, device=x.device)  # every row is written
    if grads is not None and grads.weight:
        # One chunk: its one GEMM is the whole sum (accumulated inside the GEMM). Several: the first chunk writes,
        # later ones add, in acc_dtype (a (K·C, F) scratch) unless "compact" or the dtypes agree. PyTorch's rule:
        # off CUDA, mixed-precision "compact" behaves as "balanced" (no fast low-precision addmm there).
        compact = ro.acc_policy == "compact" and (x.device.type == "cuda" or acc == w.dtype)
        dtype = gemm_dtype if rows >= n else (w.dtype if compact or acc == w.dtype else acc)
        grad_w = (torch.empty if n else torch.zeros)((k * c, f), dtype=dtype, device=x.device)
        if dtype != gemm_dtype:  # blocks of classes no larger than the logits buffer (one where r >= F)
            product = torch.empty(
                (max(1, min(k * c, logits.numel() // max(f, 1))), f), dtype=gemm_dtype, device=x.device
            )
    if grads is not None and grads.bias:
        grad_b = torch.zeros(k * c, dtype=stat_dtype(acc), device=x.device)
    return ChunkBuffers(rows, w_rows, b_rows, logits, upcast, grad_x, grad_w, grad_b, product)


def logits_gemm(x_c: torch.Tensor, buffers: ChunkBuffers) -> torch.Tensor:
    """``x_c·Wᵀ + b`` ``(r, K·C)`` into the logits buffer."""
    z = buffers.logits[: x_c.shape[0]]
    if buffers.b_rows is None:
        return torch.mm(x_c, buffers.w_rows.T, out=z)
    return torch.addmm(buffers.b_rows, x_c, buffers.w_rows.T, out=z)


def accumulate_grads(dz: torch.Tensor, x_c: torch.Tensor, start: int, buffers: ChunkBuffers) -> None:
    """One chunk's share of the gradients: ``grad_b += Σ dz``, ``grad_x[start:] = dz·W``, ``grad_W (+)= dzᵀ·x_c``."""
    if buffers.grad_b is not None:
        buffers.grad_b += dz.sum(dim=0, dtype=buffers.grad_b.dtype)
    grad_x = buffers.grad_x
    if grad_x is not None:
        rows = slice(start, start + x_c.shape[0])
        if grad_x.dtype == dz.dtype:
            torch.mm(dz, buffers.w_rows, out=grad_x[rows])
        else:
            grad_x[rows] = dz @ buffers.w_rows
    grad_w, product = buffers.grad_w, buffers.product
    if grad_w is None:
        return
    if product is None:
        if start == 0:
            torch.mm(dz.T, x_c, out=grad_w)
        else:
            grad_w.addmm_(dz.T, x_c)
        return
    for c0 in range(0, grad_w.shape[0], product.shape[0]):
        c1 = min(c0 + product.shape[0], grad_w.shape[0])
        part = torch.mm(dz[:, c0:c1].T, x_c, out=product[: c1 - c0])
        if start == 0:
            grad_w[c0:c1].copy_(part)
        else:
            grad_w[c0:c1] += part


def finish_grads(buffers: ChunkBuffers, w: torch.Tensor, b: torch.Tensor | None) -> tuple:
    """``(grad_x, grad_w, grad_b)`` in the parameters' layouts and dtypes: ``(K·C, F)`` -> ``(C, K, F)`` (one copy
    at most), ``(K·C,)`` -> ``(C, K)``."""
    c, k, f = w.shape
    grad_w, grad_b = buffers.grad_w, buffers.grad_b
    if grad_w is not None:
        grad_w = grad_w.view(k, c, f).transpose(0, 1).to(w.dtype, memory_format=torch.contiguous_format)
    if grad_b is not None:
        grad_b = grad_b.view(k, c).T.to(b.dtype, memory_format=torch.contiguous_format)
    return buffers.grad_x, grad_w, grad_b


def concat_outputs(outputs: list, rows: int, num_stats: int | None, sdt: torch.dtype, like: torch.Tensor) -> tuple:
    """The blocks' ``(loss, lse, stats)`` as ``(rows,)``, ``(rows,)``, ``(rows, num_stats)`` (stats None without
    ``num_stats``); one block's as they are, none (no rows) as empty tensors."""
    if len(outputs) == 1:
        return outputs[0]
    if not outputs:
        stats = None if num_stats is None else like.new_empty((rows, num_stats), dtype=sdt)
        return like.new_empty(rows, dtype=sdt), like.new_empty(rows, dtype=sdt), stats
    losses, lse, stats = zip(*outputs)
    return torch.cat(losses), torch.cat(lse), None if num_stats is None else torch.cat(stats)
