"""Launchers of the softmax-fused GEMMs (:mod:`.softmax_gemm_kernels`): check, allocate, launch.

Per chunk: :func:`logits_stats` (the logits and per-tile softmax partials), :func:`combine_stats` (each row's lse,
loss and ``dz``'s coefficients from the partials, ``(r,)``-sized torch operations through
:func:`..common.index_rows`), then :func:`input_grad` and :func:`weight_grad` (or :func:`input_grad` storing ``dz``
for cuBLAS's ``dzᵀ·x``). Every operand goes through a TMA tensor descriptor (:func:`supported` says when the copy
engine's rules hold). Nothing here reads a GPU value on the host.

Covered so far: class-index targets, bias, ``ignore_index``, label smoothing without class weights, the z-loss's
gradient coefficient (:func:`supported`); the rest stays on the row kernel's path.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..common import LossParams, index_rows
from ..grid import cdiv
from ..partials import SPLITS, Partials, combine_partials
from ..tma import descriptor, have_descriptors, input_precision
from .softmax_gemm_kernels import _input_grad_kernel, _logits_stats_kernel, _weight_grad_kernel

__all__ = [
    "GemmTiles",
    "SoftmaxGemmConfig",
    "default_config",
    "supported",
    "LogitStats",
    "logits_stats",
    "combine_stats",
    "input_grad",
    "weight_grad",
]

_PLANES = 3  # m_t, s_t, Σ z per (vocabulary tile, row)


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """One kernel's tile: ``(block_m, block_n)`` of its output, ``block_k`` of its reduction per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8  # row blocks walking the column blocks together (their shared tiles stay in L2)


@dataclasses.dataclass(frozen=True)
class SoftmaxGemmConfig:
    stats: GemmTiles  # (rows, classes) tiles over features
    input_grad: GemmTiles  # (rows, features) tiles over classes
    weight_grad: GemmTiles  # (classes, features) tiles over rows


# The logits GEMM takes the tiled backend's forward tile (128×256, the largest fp32 accumulator one SM's registers
# hold at 8 warps). The gradient GEMMs recompute exp once per feature block, one exp per 2·block_n MMA FLOPs, so
# they take the widest feature blocks (64×512, two stages to fit shared memory): the compiled code predicts ~2×
# cuBLAS at 128×256 and ~1.0-1.1× at 64×512 (benchmarks/NOTES.md, v14; not yet measured on a GPU).
_GPU = SoftmaxGemmConfig(GemmTiles(128, 256, 64), GemmTiles(64, 512, 64, 8, 2), GemmTiles(64, 512, 64, 8, 2))
_INTERPRETER = SoftmaxGemmConfig(
    GemmTiles(16, 16, 16, 1, 1, 2), GemmTiles(16, 16, 16, 1, 1, 2), GemmTiles(16, 16, 16, 1, 1, 2)
)


def default_config(device: torch.device) -> SoftmaxGemmConfig:
    return _GPU if device.type == "cuda" else _INTERPRETER


def supported(lp: LossParams, class_weight: torch.Tensor | None, *tensors: torch.Tensor) -> bool:
    """Whether these kernels cover the loss and the operands meet TMA's rules: 2-D, unit last stride, 16-byte
    aligned base and row stride, 16- or 32-bit floats (the interpreter takes the same descriptors)."""
    if not have_descriptors() or lp.target_is_probs or class_weight is not None or lp.metrics:
        return False
    if lp.logit_scale != 1.0 or lp.logit_softcap > 0:
        return False
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
    return True


def _meta(tiles: GemmTiles, lp: LossParams, dtype: torch.dtype) -> dict:
    """The meta-parameters and launch options every kernel of this module takes."""
    return dict(
        HAS_SMOOTHING=lp.label_smoothing > 0,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        INPUT_PRECISION=input_precision(dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


class LogitStats(NamedTuple):
    partials: torch.Tensor  # (3, tiles, r) fp32: each vocabulary tile's row max m_t, Σ exp(z − m_t), Σ z
    z_y: torch.Tensor  # (r,) fp32 the target logits (unwritten on ignored rows)


def logits_stats(
    x: torch.Tensor,  # (r, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (r,) int64, contiguous
    z: torch.Tensor,  # (r, V) in x's dtype (a row-padded buffer): the logits, written
    lp: LossParams,
    config: SoftmaxGemmConfig | None = None,
) -> LogitStats:
    """``z = x·Wᵀ + b`` and each vocabulary tile's softmax partials (one GEMM; see the kernels' module)."""
    (r, h), v = x.shape, w.shape[0]
    t = (config or default_config(x.device)).stats
    tiles = cdiv(v, t.block_n)
    partials = torch.empty((_PLANES, tiles, r), dtype=torch.float32, device=x.device)
    z_y = torch.empty(r, dtype=torch.float32, device=x.device)
    if r == 0:
        return LogitStats(partials, z_y)
    _logits_stats_kernel[(cdiv(r, t.block_m) * tiles,)](
        descriptor(x, t.block_m, t.block_k), descriptor(w, t.block_n, t.block_k),
        descriptor(z, t.block_m, t.block_n), b, target, partials, z_y,
        r, v, h, **_meta(t, lp, x.dtype),
    )  # fmt: skip
    return LogitStats(partials, z_y)


def combine_stats(
    stats: LogitStats,
    target: torch.Tensor,  # (r,) int64
    lp: LossParams,
    num_classes: int,
    shares: tuple[torch.Tensor, torch.Tensor] | None = None,  # (r,) fp32 s, s_z; None: no coefficients
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss (r,), lse (r,), coefs (3, r) or None)`` in fp32: the tiles' partials combined as every split
    vocabulary is (:func:`..partials.combine_partials` over :data:`..partials.SPLITS`: ``M = max_t m_t``,
    ``Σ exp(z − M) = Σ_t s_t·exp(m_t − M)``), then the formulas every backend shares (:func:`..common.index_rows`)."""
    m, s, z_sum = stats.partials.unbind(0)  # (tiles, r) each
    parts = Partials(
        m=m,
        sum_exp=s,
        z_y=stats.z_y[None],  # (1, r): the one tile holding each row's target wrote it
        w_y=None,
        z_sum=z_sum if lp.label_smoothing > 0 else None,
        e_log_e=None,
        sq_sum=None,
        predicted=None,
    )
    sums = combine_partials(parts, SPLITS)
    ce, zs = (None, None) if shares is None else shares
    loss, lse, _, coefs = index_rows(sums, target, float(num_classes), lp, num_classes, ce, zs)
    return loss, lse, None if coefs is None else torch.stack(coefs)


def input_grad(
    z: torch.Tensor,  # (r, V) the logits from logits_stats
    w: torch.Tensor,  # (V, H)
    target: torch.Tensor,  # (r,) int64, contiguous
    lse: torch.Tensor,  # (r,) fp32
    coefs: torch.Tensor,  # (3, r) fp32, contiguous
    lp: LossParams,
    out: torch.Tensor,  # (r, H): grad_x, written
    dz_out: torch.Tensor | None = None,  # (r, V) in z's dtype: also store dz (for a cuBLAS dzᵀ·x)
    config: SoftmaxGemmConfig | None = None,
) -> None:
    """``out = dz·W`` with ``dz`` formed in the GEMM's prologue from each ``z`` tile."""
    (r, v), h = z.shape, w.shape[1]
    assert coefs.shape == (3, r) and coefs.is_contiguous() and lse.is_contiguous()
    if r == 0:
        return
    t = (config or default_config(z.device)).input_grad
    _input_grad_kernel[(cdiv(r, t.block_m) * cdiv(h, t.block_n),)](
        descriptor(z, t.block_m, t.block_k), descriptor(w, t.block_k, t.block_n),
        descriptor(out, t.block_m, t.block_n // 2), None if dz_out is None else descriptor(dz_out, t.block_m, t.block_k),
        target, lse, coefs, r, v, h, **_meta(t, lp, z.dtype),
    )  # fmt: skip


def weight_grad(
    z: torch.Tensor,  # (r, V) the logits from logits_stats
    x: torch.Tensor,  # (r, H)
    target: torch.Tensor,  # (r,) int64, contiguous
    lse: torch.Tensor,  # (r,) fp32
    coefs: torch.Tensor,  # (3, r) fp32, contiguous
    lp: LossParams,
    out: torch.Tensor,  # (V, H): grad_W or an fp32 scratch, written
    accumulate: bool = False,  # out += dzᵀ·x (a scratch across chunks) instead of out = dzᵀ·x
    config: SoftmaxGemmConfig | None = None,
) -> None:
    """``out (+)= dzᵀ·x`` with ``dz`` formed in the GEMM's prologue from each ``z`` tile."""
    (r, v), h = z.shape, x.shape[1]
    assert coefs.shape == (3, r) and coefs.is_contiguous() and lse.is_contiguous()
    if r == 0:
        if not accumulate:
            out.zero_()
        return
    t = (config or default_config(z.device)).weight_grad
    _weight_grad_kernel[(cdiv(v, t.block_m) * cdiv(h, t.block_n),)](
        descriptor(z, t.block_k, t.block_m), descriptor(x, t.block_k, t.block_n),
        descriptor(out, t.block_m, t.block_n // 2), target, lse, coefs, r, v, h,
        ACCUMULATE=accumulate, **_meta(t, lp, z.dtype),
    )  # fmt: skip
