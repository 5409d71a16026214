"""Launchers of the fused backend's Triton kernels: check, allocate, pick the launch configuration, launch.

:func:`cross_entropy_rows` (both sweeps of the row kernel in one launch), :func:`cross_entropy_partials` and
:func:`cross_entropy_grad` (sweep 1 and sweep 2 alone, for the vocabulary-parallel and vocabulary-major passes),
:func:`scale_cast`. Each row-kernel launcher takes an optional :class:`RowLaunch` (columns per step and warps);
by default :func:`row_launch` picks it. Nothing here reads a GPU value on the host.
"""

from __future__ import annotations

import dataclasses

import torch

from ..common import LossParams
from ..grid import cdiv, next_power_of_2
from .kernels import _cross_entropy_rows_kernel, _scale_cast_kernel

__all__ = [
    "RowLaunch",
    "row_launch",
    "row_kernel_block",
    "row_kernel_warps",
    "cross_entropy_rows",
    "cross_entropy_partials",
    "cross_entropy_grad",
    "scale_cast",
    "PARTIALS",
]

# Columns a program of the row kernel handles per step, and one warp per 1024 of them (32 values per lane), 8 to 32
# warps. The plain kernel is bandwidth-bound, and more loads in flight per row raise its bandwidth; with soft-capping
# or metrics ("heavy") each logit costs more ALU work and registers, and the wide step loses: those keep 4096-column
# steps. Shorter rows want narrower steps: the widest step leaving a sweep about 3.5 steps (2·C/7 columns or more)
# was the fastest at every C measured (the measurements: benchmarks/NOTES.md, "row kernel launch configuration").
_MAX_BLOCK_C = 32768
_MIN_BLOCK_C = 8192
_MAX_BLOCK_C_HEAVY = 4096
_COLUMNS_PER_WARP = 1024
_MIN_WARPS, _MAX_WARPS = 8, 32
_SCALE_CAST_BLOCK = 4096

# The per-row partials of PHASE 1, by column of the (r, 7) buffer (see the kernel's docstring).
PARTIALS = ("m", "sum_exp", "z_y", "w_y", "z_sum", "exp_z_sum", "sq_sum")


@dataclasses.dataclass(frozen=True)
class RowLaunch:
    """The row kernel's launch configuration: columns per step and warps per program (one program per row)."""

    block_c: int
    num_warps: int


def row_kernel_block(num_classes: int, heavy: bool) -> int:
    """Columns per step of the row kernel over rows of ``num_classes`` (``heavy``: soft-capping or metrics)."""
    widest = _MAX_BLOCK_C_HEAVY
    if not heavy:
        about_3_5_steps = 1 << max(0, (2 * num_classes // 7).bit_length() - 1)  # the largest power of two <= 2C/7
        widest = min(_MAX_BLOCK_C, max(_MIN_BLOCK_C, about_3_5_steps))
    return min(widest, next_power_of_2(num_classes))


def row_kernel_warps(block_c: int) -> int:
    """Warps per program of the row kernel for a ``block_c``-column step (4 for small vocabularies)."""
    if block_c < 2048:
        return 4
    return min(_MAX_WARPS, max(_MIN_WARPS, block_c // _COLUMNS_PER_WARP))


def row_launch(num_classes: int, heavy: bool) -> RowLaunch:
    """The default :class:`RowLaunch` for rows of ``num_classes``."""
    block_c = row_kernel_block(num_classes, heavy)
    return RowLaunch(block_c, row_kernel_warps(block_c))


def cross_entropy_rows(
    logits: torch.Tensor,  # (r, C), row stride s >= C, unit column stride
    grad: torch.Tensor | None,  # (r, C) dr destination (may share storage with logits), or None for loss only
    bias: torch.Tensor | None,  # (C,)
    target: torch.Tensor,  # (r,) int64
    class_weight: torch.Tensor | None,  # (C,)
    scales: tuple[torch.Tensor, torch.Tensor] | None,  # (r,) fp32 cross-entropy and z-loss shares s, s_z
    loss_out: torch.Tensor,  # (r,) fp32
    lse_out: torch.Tensor,  # (r,) fp32
    stats_out: torch.Tensor | None,  # (r, 5) fp32, with lp.metrics
    lp: LossParams,
    coefs_out: torch.Tensor | None = None,  # (r, 3) fp32 dz's coefficients (common.GradCoefs), with scales
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (r,) fp32 each: H and g_H, with grad
    config: RowLaunch | None = None,
) -> None:
    """Per-row loss, logsumexp (and statistics); with ``grad``, ``dr`` (see kernels.py for the math): both sweeps
    in one launch. With ``coefs_out``, also each row's coefficients of ``dz`` for a later sweep 2."""
    assert coefs_out is None or (scales is not None and coefs_out.stride() == (3, 1))
    assert stats_out is None or stats_out.stride() == (5, 1)
    row_scale, z_scale = (None, None) if scales is None else scales
    _launch_rows(
        logits, grad, bias, target, class_weight, lp, config, phase=0, loss=loss_out, lse=lse_out,
        stats=stats_out, row_scale=row_scale, z_scale=z_scale, coefs=coefs_out, entropy_grad=entropy_grad,
    )  # fmt: skip


def cross_entropy_partials(
    logits: torch.Tensor,  # (r, C_local)
    bias: torch.Tensor | None,  # (C_local,)
    target: torch.Tensor,  # (r,) int64 global class indices
    class_weight: torch.Tensor | None,  # (C_local,)
    partials_out: torch.Tensor,  # (r, len(PARTIALS)) fp32, contiguous
    argmax_out: torch.Tensor | None,  # (r,) int64, with lp.metrics
    lp: LossParams,
    class_offset: int,
    total_classes: int,
    config: RowLaunch | None = None,
) -> None:
    """Sweep 1 over a vocabulary slice ``[class_offset, class_offset + C_local)``: per-row partial sums (columns
    :data:`PARTIALS`, relative to the slice's own row max) and, with metrics, the slice's first argmax."""
    assert partials_out.stride() == (len(PARTIALS), 1)
    _launch_rows(
        logits, None, bias, target, class_weight, lp, config, phase=1, partials=partials_out, argmax=argmax_out,
        class_offset=class_offset, total_classes=total_classes,
    )  # fmt: skip


def cross_entropy_grad(
    logits: torch.Tensor,  # (r, C_local)
    grad: torch.Tensor,  # (r, C_local) dr destination (may share storage with logits)
    bias: torch.Tensor | None,  # (C_local,)
    target: torch.Tensor,  # (r,) int64 global class indices
    class_weight: torch.Tensor | None,  # (C_local,)
    lse: torch.Tensor,  # (r,) fp32 global logsumexp
    coefs: torch.Tensor,  # (r, 3) fp32 coef, target_coef, smooth_coef (common.GradCoefs), contiguous
    lp: LossParams,
    class_offset: int,
    total_classes: int,
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (r,) fp32 each: H and g_H
    config: RowLaunch | None = None,
) -> None:
    """Sweep 2 over a vocabulary slice: ``dr`` from the row's global ``lse`` and gradient coefficients (plus the
    entropy's term given each row's entropy and its upstream gradient)."""
    assert coefs.stride() == (3, 1) and lse.stride() == (1,)
    _launch_rows(
        logits, grad, bias, target, class_weight, lp, config, phase=2, lse=lse, coefs=coefs,
        class_offset=class_offset, total_classes=total_classes, entropy_grad=entropy_grad,
    )  # fmt: skip


def _launch_rows(
    logits: torch.Tensor,  # (r, C_local), a view of a row-padded buffer (gemm.row_padded)
    grad: torch.Tensor | None,  # (r, C_local)
    bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    lp: LossParams,
    config: RowLaunch | None,
    *,
    phase: int,
    loss=None,
    lse=None,
    stats=None,
    row_scale=None,
    z_scale=None,
    partials=None,
    argmax=None,
    coefs=None,
    class_offset: int = 0,
    total_classes: int | None = None,
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """One launch of the row kernel, one program per row; the kernel's heuristics turn the ``None`` pointers into
    its ``HAS_*`` switches. The columns past ``C`` up to the row stride are scratch, which the kernel may read and
    overwrite (see :func:`_loaded_columns`)."""
    rows, num_classes = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1 and (grad is None or grad.stride(1) == 1)
    assert entropy_grad is None or (grad is not None and all(t.stride() == (1,) for t in entropy_grad))
    if config is None:
        config = row_launch(num_classes, heavy=lp.logit_softcap > 0 or stats is not None or argmax is not None)
    entropy, entropy_share = (None, None) if entropy_grad is None else entropy_grad
    _cross_entropy_rows_kernel[(rows,)](
        logits, grad, bias, target, class_weight, row_scale, z_scale, loss, lse, stats, partials, argmax, coefs,
        entropy, entropy_share,
        num_classes, _loaded_columns(num_classes, logits, grad),
        num_classes if total_classes is None else total_classes,
        logits.stride(0), 0 if grad is None else grad.stride(0), _vector_stride(row_scale), _vector_stride(z_scale),
        class_offset, lp.ignore_index, lp.label_smoothing, lp.logit_scale, lp.logit_softcap or 1.0, lp.z_loss,
        HAS_SMOOTHING=lp.label_smoothing > 0,
        HAS_LOGIT_SCALE=lp.logit_scale != 1.0,
        HAS_SOFTCAP=lp.logit_softcap > 0,
        HAS_Z_LOSS=phase == 0 and lp.z_loss > 0,  # PHASE 2 reads it folded into coef
        PHASE=phase,
        BLOCK_C=config.block_c,
        num_warps=config.num_warps,
    )  # fmt: skip


def _vector_stride(t: torch.Tensor | None) -> int:
    """A per-row scale's stride: 0 for a broadcast scalar (or none)."""
    return t.stride(0) if t is not None and t.dim() == 1 else 0


def _loaded_columns(num_classes: int, *buffers: torch.Tensor | None) -> int:
    """The columns the row kernel loads and stores: ``C`` rounded up to 16 where every buffer's rows have room.

    Triton vectorises a masked load or store only when it can prove the mask constant over the vector, i.e. when
    the bound is a multiple of 16. An odd ``C`` (50257) would otherwise halve the kernel's bandwidth with 2-byte
    accesses; the extra columns come from the rows' padding (their values are masked out of the math, and what the
    kernel stores there is never read).
    """
    wide = cdiv(num_classes, 16) * 16
    for t in buffers:
        if t is None:
            continue
        last_row_end = t.storage_offset() + (t.shape[0] - 1) * t.stride(0) + wide
        if t.stride(0) < wide or last_row_end * t.element_size() > t.untyped_storage().nbytes():
            return num_classes
    return wide


def scale_cast(
    src: torch.Tensor,  # any shape, contiguous
    scale: torch.Tensor,  # () the upstream gradient, on src's device
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,  # contiguous, src's shape; may be src itself
) -> torch.Tensor:
    """``src · scale`` rounded once to ``dtype`` (default: src's), in one vectorised pass, into ``out`` (new when
    None). PyTorch's own ``t * scale`` with a 0-dim CUDA ``scale`` of another dtype takes a non-vectorised
    broadcasting kernel, ~3x slower over a ``(V, H)`` gradient; a non-contiguous ``src`` still goes that way."""
    dtype = src.dtype if dtype is None else dtype
    if out is None:
        out = torch.empty(src.shape, dtype=dtype, device=src.device)
    if not (src.is_contiguous() and out.is_contiguous()):
        return torch.mul(src, scale, out=out)
    numel = src.numel()
    if numel:
        grid = (cdiv(numel, _SCALE_CAST_BLOCK),)
        in_place = out.data_ptr() == src.data_ptr() and out.dtype == src.dtype
        _scale_cast_kernel[grid](src, scale, out, numel, IN_PLACE=in_place, BLOCK=_SCALE_CAST_BLOCK, num_warps=4)
    return out
