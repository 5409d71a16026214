r"""Launchers of the tiled backend: check, allocate, choose the tiles, launch (see kernels.py for the algorithm).

Between the two kernels the launcher combines the forward's per-split statistics into each row's sums over the
vocabulary and hands them to :func:`..common.index_rows` (the loss, ``lse``, metrics and the backward's per-row
coefficients ``dz = A·p − T·e_y − E·w``, shared with the chunked and vocabulary-parallel paths), all with
``(N,)``-sized torch operations (no host syncs).

Tile sizes are fixed per device type, not tuned per call (no autotuning, so the first call only compiles): the
largest logit tiles whose fp32 accumulator fits in registers at 8 warps (128×256 forward with ≥ 8 vocabulary
splits per row block, 256×128 backward: fewer rows per tile means more weight-gradient traffic),
``BLOCK_K = BLOCK_H = 64``, measured against the alternatives by ``benchmarks/tiled_sweep.py``. The forward loads
16-bit operands through TMA tensor descriptors where the copy engine's alignment rules hold (:func:`can_use_tma`;
−7% on an H100); otherwise, and always in the backward (where TMA measured slower), the kernels load clamped
row/class indices without masks, and ``EVEN_K``/``EVEN_H`` (the feature count divides the block) drop the feature
masks too. The CPU interpreter uses 16-wide tiles and pointer loads (its tests also force the TMA path).
"""

from __future__ import annotations

import dataclasses

import torch

from ..common import Grads, LossParams, index_rows
from ..grid import cdiv, sm_count
from ..partials import SPLITS, Partials, combine_partials
from ..tma import can_use_tma, descriptor, input_precision
from .kernels import _partial_stats_kernel, _tiled_backward_kernel

__all__ = ["TileConfig", "tile_configs", "partial_stats", "combine_splits", "tiled_backward"]

_PARTIALS = 7  # m, Σe^{z−m}, z_y, Σw·z, Σe^{z−m}·z, Σz², argmax


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of one kernel on one device type."""

    block_m: int  # rows per logit tile
    block_n: int  # classes per logit tile
    block_k: int  # features per step of the logit (re)computation
    num_warps: int
    num_stages: int
    block_h: int = 64  # backward: features per step of the gradient products
    group_m: int = 8  # backward: row blocks that walk the vocabulary together (their W tiles stay in L2)
    min_splits: int = 16  # forward: vocabulary splits per row block (more when rows are few, to fill the SMs)


# Measured on an H100 at 8192x4096x128256 bf16 (benchmarks/tiled_sweep.py, benchmarks/NOTES.md). With 4-byte
# operands (fp32 inputs) or 4-byte atomics (fp32 accumulators) a 3-stage pipeline of these tiles exceeds the
# 227 KiB of shared memory per SM: those calls take smaller tiles and/or run 2 stages.
_GPU_FORWARD = TileConfig(128, 256, 64, num_warps=8, num_stages=3, min_splits=8)
_GPU_BACKWARD = TileConfig(256, 128, 64, num_warps=8, num_stages=3, block_h=64, group_m=8)
_INTERPRETER = (TileConfig(16, 16, 16, 1, 1, min_splits=2), TileConfig(16, 16, 16, 1, 1, block_h=16, group_m=2))


def tile_configs(device: torch.device, dtype: torch.dtype, fp32_atomics: bool) -> tuple[TileConfig, TileConfig]:
    """``(forward, backward)`` configurations for inputs of ``dtype`` (and fp32 gradient accumulators)."""
    if device.type != "cuda":
        return _INTERPRETER
    forward, backward = _GPU_FORWARD, _GPU_BACKWARD
    if dtype == torch.float32:  # the fp32 dz tile alone is 128 KiB at 256x128: quarter tiles
        forward = dataclasses.replace(forward, block_n=128, block_k=32)
        backward = dataclasses.replace(backward, block_m=128, block_k=32, block_h=32, num_stages=2)
    elif fp32_atomics:
        backward = dataclasses.replace(backward, num_stages=2)
    return forward, backward


def _multiprocessors(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 2


def _flags(lp: LossParams) -> dict:
    """The switches the loss settings give (the kernels' heuristics derive the rest from their None pointers)."""
    return dict(
        HAS_SMOOTHING=lp.label_smoothing > 0,
        HAS_LOGIT_SCALE=lp.logit_scale != 1.0,
        HAS_SOFTCAP=lp.logit_softcap > 0,
    )


def partial_stats(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64, contiguous
    class_weight: torch.Tensor | None,  # (V,)
    lp: LossParams,
    cfg: TileConfig | None = None,
    use_tma: bool | None = None,
) -> torch.Tensor:
    """``(splits, 7, N)`` fp32 per-split row statistics (see kernels.py); ``cfg`` and ``use_tma`` override the
    rules (sweeps, and the tests that run the TMA path in the interpreter)."""
    (n, h), v = x.shape, w.shape[0]
    use_tma = can_use_tma(x, w) if use_tma is None else use_tma
    cfg = cfg or tile_configs(x.device, x.dtype, False)[0]
    row_blocks = cdiv(n, cfg.block_m)
    tiles = cdiv(v, cfg.block_n)
    # at least two programs per SM in all, with at least min_splits per row block (see the kernel's grid order)
    wanted = max(cfg.min_splits, cdiv(2 * _multiprocessors(x.device), max(row_blocks, 1)))
    tiles_per_split = cdiv(tiles, min(tiles, wanted))
    splits = cdiv(tiles, tiles_per_split)
    partials = torch.empty((splits, _PARTIALS, n), dtype=torch.float32, device=x.device)
    if n == 0:
        return partials
    descriptors = (
        (descriptor(x, cfg.block_m, cfg.block_k), descriptor(w, cfg.block_n, cfg.block_k)) if use_tma else (x, w)
    )
    _partial_stats_kernel[(splits, row_blocks)](
        x, w, *descriptors, b, target, class_weight, partials,
        n, v, h, tiles_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        lp.logit_scale, lp.logit_softcap or 1.0,
        **_flags(lp),
        METRICS=lp.metrics,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=h % cfg.block_k == 0, USE_TMA=use_tma,
        INPUT_PRECISION=input_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return partials


def combine_splits(
    partials: torch.Tensor,  # (splits, 7, N) from partial_stats
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    lp: LossParams,
    num_classes: int,  # V
    shares: tuple[torch.Tensor, torch.Tensor] | None,  # (N,) fp32 s, s_z; None: no gradient coefficients
) -> tuple:
    """``(loss (N,), lse (N,), stats (N, 5) or None, coefs (3, N) or None)`` in fp32.

    The splits are combined as vocabulary-parallel ranks are, by :func:`..partials.combine_partials` over the
    leading dimension; the loss and coefficients then come from :func:`..common.index_rows`, the formulas every
    backend shares.
    """
    m, s, z_y, z_sum, pz, sq, arg = partials.unbind(1)  # each (splits, N)
    metrics = lp.metrics
    parts = Partials(
        m,
        s,
        z_y,
        None,
        z_sum if lp.label_smoothing > 0 else None,
        pz - m * s if metrics else None,  # Σ e·z → Σ e·log e = Σ e·(z − m)
        sq if metrics else None,
        arg.long() if metrics else None,
    )
    sums = combine_partials(parts, SPLITS)
    if class_weight is None:
        w_sum = float(num_classes)
    else:  # the target's weight from the whole vector (the splits wrote none)
        cw = class_weight.float()
        keep = target != lp.ignore_index
        y = torch.where(keep & (target >= 0) & (target < num_classes), target, 0)
        sums, w_sum = sums._replace(w_y=cw[y]), cw.sum()
    ce, z = shares if shares is not None else (None, None)
    loss, lse, stats, coefs = index_rows(sums, target, w_sum, lp, num_classes, ce, z)
    return loss, lse, stats, None if coefs is None else torch.stack(coefs)


def tiled_backward(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64, contiguous
    class_weight: torch.Tensor | None,  # (V,)
    lse: torch.Tensor,  # (N,) fp32
    coefs: torch.Tensor,  # (3, N) fp32, upstream gradient included
    lp: LossParams,
    grads: Grads,
    fp32_grad_input: bool,
    fp32_grad_weight: bool,
    sparse_eps: float,
    cfg: TileConfig | None = None,
) -> tuple:
    """``(grad_x, grad_w, grad_b)`` (None where not wanted) in the parameters' dtypes."""
    (n, h), v = x.shape, w.shape[0]
    low = x.dtype in (torch.float16, torch.bfloat16)
    cfg = cfg or tile_configs(x.device, x.dtype, low and (fp32_grad_input or fp32_grad_weight))[1]
    gx = gw = gb = None
    if grads.input:
        gx = torch.zeros((n, h), dtype=torch.float32 if fp32_grad_input and low else x.dtype, device=x.device)
    if grads.weight:
        gw = torch.zeros((v, h), dtype=torch.float32 if fp32_grad_weight and low else w.dtype, device=x.device)
    if grads.bias:
        gb = torch.zeros(v, dtype=torch.float32, device=x.device)
    sparse = sparse_eps > 0 and lp.label_smoothing == 0  # smoothing puts ε/C·w_c into every entry: nothing to skip
    if n and grads.any:
        grid = (cdiv(n, cfg.block_m) * cdiv(v, cfg.block_n),)
        _tiled_backward_kernel[grid](
            x, w, b, target, class_weight, lse, coefs, gx, gw, gb,
            n, v, h,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            0 if gx is None else gx.stride(0), 0 if gw is None else gw.stride(0),
            lp.logit_scale, lp.logit_softcap or 1.0, float(sparse_eps),
            **_flags(lp),
            SPARSE=sparse,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h,
            GROUP_M=cfg.group_m, EVEN_K=h % cfg.block_k == 0, EVEN_H=h % cfg.block_h == 0,
            INPUT_PRECISION=input_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return (
        None if gx is None else gx.to(x.dtype),
        None if gw is None else gw.to(w.dtype),
        None if gb is None else gb.to(b.dtype),
    )
