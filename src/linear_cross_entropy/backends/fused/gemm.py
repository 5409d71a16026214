"""The fused backend's cuBLAS side: row-padded logits buffers and the three GEMMs, vocabulary part by part."""

from __future__ import annotations

import torch

from ..grid import cdiv
from .policy import has_out_dtype_mm

__all__ = ["row_padded", "logits_buffers", "logits_gemm", "input_grad_gemm", "weight_grad_gemm"]

# Logits rows start on 128-byte boundaries whatever V is: cuBLAS keeps its fast kernels only for aligned leading
# dimensions (an odd V such as 50257 would otherwise cost a multiple of the floor).
_ROW_ALIGN_BYTES = 128


def _padded(n: int, dtype: torch.dtype) -> int:
    per = max(1, _ROW_ALIGN_BYTES // dtype.itemsize)
    return cdiv(n, per) * per


def row_padded(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``(rows, cols)`` view of a buffer whose rows start on 128-byte boundaries."""
    return torch.empty((rows, _padded(cols, dtype)), dtype=dtype, device=device)[:, :cols]


def logits_buffers(rows: int, cols: int, x: torch.Tensor, fp32_logits: bool, want_grads: bool):
    """``(logits, grad)``: ``(rows, cols)`` views of row-padded buffers, one buffer (``dz`` written over the logits)
    unless ``fp32_logits`` with gradients."""
    logits = row_padded(rows, cols, torch.float32 if fp32_logits else x.dtype, x.device)
    if not (fp32_logits and want_grads):
        return logits, logits
    return logits, row_padded(rows, cols, x.dtype, x.device)


def _vocab_parts(v: int) -> list[slice]:
    """Vocabulary ranges for the GEMMs: an aligned bulk and a small tail when ``V`` is not a multiple of 8.

    cuBLAS falls off its fast kernels for a GEMM dimension that breaks 16-byte alignment (V = 50257 ran 5x the
    floor on an H100 for every method); the bulk ``[0, V − V mod 128)`` keeps them and the tail costs a few tiny
    GEMMs. No padded copy of the weight is made.
    """
    if v % 8 == 0:
        return [slice(0, v)]
    bulk = v - v % 128
    return [part for part in (slice(0, bulk), slice(bulk, v)) if part.stop > part.start]


def logits_gemm(
    x_c: torch.Tensor,  # (r, H)
    w: torch.Tensor,  # (V, H)
    out: torch.Tensor,  # (r, V)
    out_dtype: torch.dtype | None = None,
) -> None:
    """``out = x_c · Wᵀ``, vocabulary part by part."""
    for part in _vocab_parts(w.shape[0]):
        if out_dtype is None:
            torch.mm(x_c, w[part].T, out=out[:, part])
        else:
            torch.mm(x_c, w[part].T, out_dtype=out_dtype, out=out[:, part])


def input_grad_gemm(
    dz: torch.Tensor,  # (r, V)
    w: torch.Tensor,  # (V, H)
    out: torch.Tensor,  # (r, H)
) -> torch.Tensor:
    """``out = dz · W``, summed over the vocabulary parts.

    The parts split the GEMM's reduction dimension. The small tail goes first; the aligned bulk's GEMM then adds it
    as its ``C`` operand, which cuBLAS adds in fp32 before its one rounding. So the only extra rounding is the
    tail's own (a few dozen classes' share of the sum, against eager's single GEMM), with no fp32 ``(r, H)``
    temporary.
    """
    for i, part in enumerate(_vocab_parts(w.shape[0])[::-1]):  # tail first
        _gemm_into(out, dz[:, part], w[part], accumulate=i > 0)
    return out


def weight_grad_gemm(
    grad_w: torch.Tensor,  # (V, H) fp32 scratch or the gradient itself
    dz: torch.Tensor,  # (r, V)
    x_c: torch.Tensor,  # (r, H)
    *,
    first: bool,
) -> None:
    """``grad_w (+)= dzᵀ · x_c``, rows of ``grad_w`` part by part."""
    for part in _vocab_parts(grad_w.shape[0]):
        _gemm_into(grad_w[part], dz[:, part].T, x_c, accumulate=not first)


def _gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out (+)= a·b`` with the products summed in fp32 and rounded once to ``out``'s dtype: an fp32 ``out`` (a
    scratch, or a gradient the upstream gradient scales later) takes cuBLAS's fp32 output for 16-bit operands."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif has_out_dtype_mm(a.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif accumulate:  # no fp32-output GEMM on this device (CPU interpreter runs): the same sums, upcast operands
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
