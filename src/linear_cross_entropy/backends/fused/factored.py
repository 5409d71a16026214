"""Launchers of the factored row pass (:mod:`.factored_kernels`, the math there): check, allocate, launch.

Per chunk of rows, :func:`forward_chunk` runs the target logits, the exponential GEMM (the Hopper warp-specialised
one of :mod:`.factored_gluon` where it runs, else the plain Triton one) and the combine (with the refit), leaving
in its :class:`FactoredBuffers` ``E'`` (its target column zeroed), each row's scale ``r`` and the target column's exact
``dz_y`` (``dz = r·E' + dz_y·e_y``); :func:`gradient_gemms` then forms the chunk's shares of the gradients with
cuBLAS and one small kernel. Beside the ``(rows, V)`` buffer a chunk's working set — its partials (a few dozen a
row: :mod:`.factored_schedule`), then its ``(r, H)`` product — lives in its own, not yet written, rows of
``grad_x``, so the pass's peak stays within the row kernel's. After the last chunk, :func:`target_column_grads`
adds every row's target-column term to the weight and bias gradients in one launch. Label smoothing adds a rank-1 term to ``dz``, ``−(s·ε/C)·w`` (``w``
the class weights, or ones), kept apart as the target column is: the loss's ``Σ_c w_c z_c`` is one dot product a
row, ``grad_x`` takes one term a row, and ``grad_W`` its rank-1 share as extra rows of the first chunk's GEMM
(:func:`smoothing_terms`). A logit scale ``a > 0`` (``z = a·(x·Wᵀ + b)``) enters the kernels as one scalar: from the
combine on, ``r``, ``dz_y`` and the rank-1 coefficient are the gradient with respect to ``x·Wᵀ + b`` (times ``a``).
Nothing here reads a GPU value on the host.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..common import LossParams
from ..grid import cdiv, next_power_of_2, sm_count
from ..tma import descriptor, have_descriptors, input_precision
from . import factored_gluon
from .factored_kernels import (
    _exp_logits_kernel,
    _factored_combine_kernel,
    _input_grad_rows_kernel,
    _target_logit_kernel,
    _target_weight_grad_kernel,
)
from .factored_schedule import largest_group, slots
from .gemm import input_grad_gemm, row_padded, weight_grad_gemm
from .rows import _vector_stride

__all__ = [
    "CLAMP",
    "FactoredTiles",
    "FactoredBuffers",
    "Workspace",
    "Smoothing",
    "smoothing_terms",
    "tma_ready",
    "allocate",
    "forward_chunk",
    "combine",
    "gradient_gemms",
    "target_column_grads",
    "target_order",
]

# The window of the stored exponential, in nats above the row's target logit. A tile whose max(z − z_y) exceeds it
# is shifted by that max instead, and a row with a tile's logsumexp l_t above it is refitted. Kept rows have
# E ≤ e^50 ≈ 5e21 (bf16 holds 3e38) and S = Σ_t e^l_t ≤ V·e^50 (fp32), so r = coef/S ≥ coef·e^−62 for V ≤ 2^18
# keeps r ⊙ x a normal bf16 number for any share ≥ 1e−10 (bf16's smallest normal: 1.2e−38). A refitted row has
# p_y < e^−50 ≈ 2e−22 (a loss above 50 nats) or thereabouts.
CLAMP = 50.0
_COMBINE_BLOCK_R, _COMBINE_BLOCK_T, _COMBINE_WARPS = 16, 64, 4
# The refit's tiles (rows: the combine's block): (BLOCK_R, BLOCK_V) logits over BLOCK_H features a step. 64 × 32
# keeps the combine at 144 registers without spills for sm_90 (128 × 64: 255 and spills; compile_check.py).
_REFIT_BLOCK_V, _REFIT_BLOCK_H = 64, 32


@dataclasses.dataclass(frozen=True)
class FactoredTiles:
    """The plain-Triton exponential GEMM's tile: ``(block_m, block_n)`` logits over ``block_k`` features a step;
    ``workers`` persistent programs (``None``: two an SM, as the Gluon kernel has two workers a CTA; a second
    program is resident where registers and shared memory allow), ``group_m`` row blocks a group."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    workers: int | None = None


# 128 × 128 tiles on the GPU, as the Gluon kernel's. The interpreter's 4 workers put several tiles in a slot at the
# tests' shapes (the schedule's merging is what they check).
_GPU = FactoredTiles(128, 128, 64, 8, 3)
_INTERPRETER = FactoredTiles(16, 16, 16, 1, 1, 2, workers=4)


def _tiles(device: torch.device) -> FactoredTiles:
    return _GPU if device.type == "cuda" else _INTERPRETER


class Schedule(NamedTuple):
    """One chunk's exponential GEMM: which kernel, its tile, and its schedule (:mod:`.factored_schedule`)."""

    gluon: bool
    block_m: int
    block_n: int
    group_m: int  # the schedule's GROUP_M: a power of two dividing workers
    workers: int


def schedule(rows: int, x: torch.Tensor, num_classes: int) -> Schedule:
    """The exponential GEMM's launch for a chunk of ``rows`` rows of ``x``."""
    if factored_gluon.runs_on(x):
        workers = factored_gluon.workers(rows, num_classes, x.device)
        block_m, block_n, group_m, gluon = factored_gluon.BLOCK_M, factored_gluon.BLOCK_N, factored_gluon.GROUP_M, True
    else:
        t = _tiles(x.device)
        tiles = cdiv(rows, t.block_m) * cdiv(num_classes, t.block_n)
        most = t.workers if t.workers is not None else 2 * sm_count(x.device)
        workers, block_m, block_n, group_m, gluon = min(most, tiles), t.block_m, t.block_n, t.group_m, False
    return Schedule(gluon, block_m, block_n, largest_group(workers, group_m), workers)


def _slots(rows: int, num_classes: int, sched: Schedule) -> int:
    return slots(rows, sched.block_m, cdiv(num_classes, sched.block_n), sched.group_m, sched.workers)


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether operands move through TMA descriptors as they are: a Hopper-or-newer GPU (measured there only) or
    the interpreter, 2-D, unit last stride, 16-byte aligned base and row stride."""
    if not have_descriptors():
        return False
    for t in tensors:
        if t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


class FactoredBuffers(NamedTuple):
    """One chunk's working set: views of a :class:`Workspace` (:meth:`Workspace.chunk`)."""

    e: torch.Tensor  # (r, V) x's dtype, row-padded: E, then E' (and dz on refitted rows)
    partials: torch.Tensor  # (slots, r) fp32: each slot's l (.factored_schedule)
    # (r, H) x's dtype: r ⊙ x then E'·W over the chunk's own grad_x rows (product_in_grad_x), or E'·W then r ⊙ x
    # over the partials' storage
    product: torch.Tensor
    product_in_grad_x: bool
    shift: torch.Tensor  # (r,) fp32: the target logits
    scale: torch.Tensor  # (r,) fp32: r
    smooth_coef: torch.Tensor  # (r,) fp32: label smoothing's s·ε/C (empty without smoothing)
    target_grad: torch.Tensor  # (r,) fp32, a view of the call's (N,): dz_y
    refit: torch.Tensor  # (r,) int8
    z_sum: torch.Tensor  # (r,) fp32: Σ_c w_c·z_c (empty without label smoothing)
    extended: tuple[torch.Tensor, torch.Tensor] | None  # e and product with label smoothing's rank-1 rows below


class Workspace(NamedTuple):
    """The factored pass's buffers for one call: chunk-sized ones, and ``target_grad`` for every row (the target
    column's ``dz_y``, read after the last chunk: 4 bytes a row)."""

    e: torch.Tensor  # (rows [+ rank-1 rows], V) row-padded: the only (rows, V) buffer, as today's logits
    # flat fp32: a chunk's partials, then (dead once the combine read them) its (r, H) product; empty with grad_x
    space: torch.Tensor
    slots: int  # partials a row, at most (.factored_schedule.slots)
    features: int  # H
    grad_x: torch.Tensor | None  # (N, H): where each chunk's partials, then its product, go (its own rows), or None
    shift: torch.Tensor  # (rows,) fp32
    scale: torch.Tensor  # (rows,) fp32
    smooth_coef: torch.Tensor  # (rows,) fp32, or (0,) without label smoothing
    target_grad: torch.Tensor  # (N,) fp32
    refit: torch.Tensor  # (rows,) int8
    z_sum: torch.Tensor  # (rows,) fp32, or (0,) without label smoothing

    def chunk(self, start: int, r: int) -> FactoredBuffers:
        """Views for the ``r`` rows from ``start`` (the kernels read ``(slots, r)`` planes ``r`` rows apart)."""
        space = self.space if self.grad_x is None else self.grad_x[start : start + r].view(-1).view(torch.float32)
        partials = space[: self.slots * r].view(self.slots, r)
        target_grad = self.target_grad[start : start + r]
        extra = self.e.shape[0] - self.shift.shape[0]  # label smoothing's rank-1 rows, below the chunk's
        extended = (self.e[: r + extra], self._product(start, r + extra)) if extra else None
        return FactoredBuffers(
            self.e[:r], partials, self._product(start, r), self.grad_x is not None, self.shift[:r], self.scale[:r],
            self.smooth_coef[:r], target_grad, self.refit[:r], self.z_sum[:r], extended,
        )  # fmt: skip

    def _product(self, start: int, k: int) -> torch.Tensor:
        """``(k, H)`` in x's dtype: over ``grad_x``'s rows from ``start`` (each product row in the first bytes of
        its grad_x row, whatever grad_x's dtype: the rows kernel then reads and writes within one row), or over
        the partials' storage."""
        if self.grad_x is not None:
            return self.grad_x[start : start + k].view(self.e.dtype)[:, : self.features]
        return self.space.view(self.e.dtype)[: k * self.features].view(k, self.features)


# Label smoothing's rank-1 share of grad_W rides on the first chunk's weight-gradient GEMM as this many more rows
# (3 used: the hi/lo split below; 8 keep the reduction dimension a multiple of cuBLAS's alignment)
_RANK_ONE_ROWS = 8


class Smoothing(NamedTuple):
    """A call's label-smoothing constants (:func:`smoothing_terms`)."""

    eps: float  # ε
    weighted_w: torch.Tensor  # (H,) fp32: Σ_c w_c·W_c
    weighted_bias: torch.Tensor | None  # () fp32: Σ_c w_c·b_c, None without a bias
    weight_sum: torch.Tensor | None  # () fp32: W_sum = Σ_c w_c, None without class weights (then C)
    bias_share: torch.Tensor  # (V,) fp32: −w·Σ_n s_n·ε/C, grad_b's rank-1 share
    # (_RANK_ONE_ROWS, H) x's dtype: q = Σ_n (s_n·ε/C)·x_n split (hi, hi, lo), then zeros; the matching rows of E',
    # −w split (hi, lo, hi), wait in the workspace below the first chunk's rows. None without grad_W.
    rank_one_p: torch.Tensor | None


def smoothing_terms(
    ws: Workspace,  # with room for the rank-1 rows where grad_W is wanted: those of E' written here
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    ce_scale: torch.Tensor,  # (N,) fp32, or a stride-0 scalar: s
    lp: LossParams,
) -> Smoothing | None:
    """Label smoothing's constants for one call, or None without smoothing: the class-weighted sums over the
    vocabulary (one read of ``W``) and over the rows (one read of ``x``).

    The smoothing adds ``−(s_n·ε/C)·w`` to each row of ``dz`` (``w`` the class weights, or ones; times ``a`` with
    a logit scale), so ``grad_W`` gains the rank-1 ``−w ⊗ q`` with ``q = Σ_n (s_n·ε/C)·x_n``: instead of a pass over ``grad_W`` it is added by the
    first chunk's weight-gradient GEMM, as extra rows of its operands, ``E'`` below the chunk's rows and ``r ⊙ x``
    below its own: ``−(w_hi·q_hi + w_lo·q_hi + w_hi·q_lo)``, each factor split into 16-bit parts (16 bits of
    mantissa, the products summed in fp32 by the GEMM). ``s`` is 0 on ignored rows."""
    if lp.label_smoothing <= 0:
        return None
    (n, h), v, dtype = x.shape, w.shape[0], x.dtype
    weights = torch.ones(v, dtype=torch.float32, device=w.device) if class_weight is None else class_weight.float()
    # s·ε/C times the logit scale a: the rank-1 share of u's gradient (u = x·Wᵀ + b, z = a·u)
    smooth = torch.where(target != lp.ignore_index, ce_scale.float().expand(n), 0.0) * (
        lp.logit_scale * lp.label_smoothing / v
    )
    rank_one_e = ws.e[ws.shift.shape[0] :]  # below the first chunk: it has the workspace's rows (or all N)
    rank_one_p = None
    if rank_one_e.shape[0]:  # grad_W wanted
        q = _weighted_sum(smooth, x) if n else torch.zeros(h, dtype=torch.float32, device=x.device)
        w_hi, w_lo = _split(-weights, dtype)
        q_hi, q_lo = _split(q, dtype)
        rank_one_p = torch.zeros((_RANK_ONE_ROWS, h), dtype=dtype, device=x.device)
        rank_one_e[3:].zero_()
        for i, (e_row, p_row) in enumerate(((w_hi, q_hi), (w_lo, q_hi), (w_hi, q_lo))):
            rank_one_e[i].copy_(e_row)
            rank_one_p[i].copy_(p_row)
    return Smoothing(
        lp.label_smoothing,
        _weighted_sum(weights, w),
        None if b is None else torch.dot(weights, b.float()),
        None if class_weight is None else weights.sum(),
        -weights * smooth.sum(),
        rank_one_p,
    )


def _split(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (fp32) as ``hi + lo`` in ``dtype`` (exact to about twice ``dtype``'s mantissa)."""
    hi = t.to(dtype)
    return hi, (t - hi.float()).to(dtype)


def _weighted_sum(
    weights: torch.Tensor,  # (K,) fp32
    rows: torch.Tensor,  # (K, H)
) -> torch.Tensor:
    """``Σ_k weights_k·rows_k`` (H,) in fp32, reading ``rows`` once: the weight-gradient GEMM (fp32 output) of the
    weights split into two parts in ``rows``' dtype (16 bits of mantissa for 16-bit rows, not 8)."""
    sums = torch.empty((2, rows.shape[1]), dtype=torch.float32, device=rows.device)
    weight_grad_gemm(sums, torch.stack(_split(weights, rows.dtype), dim=1), rows, first=True)
    return sums.sum(0)


def allocate(
    rows: int,
    x: torch.Tensor,  # (N, H)
    num_classes: int,
    grad_x: torch.Tensor | None,  # (N, H), to be written chunk by chunk
    *,
    smoothing: bool,  # label smoothing
    rank_one_rows: bool,  # label smoothing with grad_W wanted
) -> Workspace:
    """The working set of ``rows``-row chunks of ``x``'s rows (with label smoothing and grad_W, room for its rank-1
    rows below a chunk's in ``E'`` and ``r ⊙ x``: :func:`smoothing_terms`). Each chunk's partials, then (dead once
    the combine has read them) its ``(r, H)`` product, go over its own rows of ``grad_x`` (not yet written) where
    those hold them: no buffer of their own."""
    (n, h), dev = x.shape, x.device
    extra = _RANK_ONE_ROWS if rank_one_rows else 0
    last = n % rows
    most = max(_slots(r, num_classes, schedule(r, x, num_classes)) for r in ((rows, last) if last else (rows,)))
    if not (
        grad_x is not None
        and grad_x.is_contiguous()
        and grad_x.element_size() >= x.element_size()
        and grad_x.shape[0] >= rows + extra  # the first chunk's rank-1 rows below its own
        and (h * grad_x.element_size()) % 4 == 0  # its rows hold whole fp32 partials ...
        and most * 4 <= h * grad_x.element_size()  # ... as many as a row has
    ):
        grad_x = None
    words = 0 if grad_x is not None else max(most * rows, cdiv((rows + extra) * h * x.element_size(), 4))
    f32 = dict(dtype=torch.float32, device=dev)
    return Workspace(
        row_padded(rows + extra, num_classes, x.dtype, dev),
        torch.empty(words, **f32),
        most,
        h,
        grad_x,
        torch.empty(rows, **f32),
        torch.empty(rows, **f32),
        torch.empty(rows if smoothing else 0, **f32),
        torch.empty(n, **f32),
        torch.empty(rows, dtype=torch.int8, device=dev),
        torch.empty(rows if smoothing else 0, **f32),
    )


def forward_chunk(
    x_c: torch.Tensor,  # (r, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (r,) int64
    class_weight: torch.Tensor | None,  # (V,)
    scales: tuple[torch.Tensor, torch.Tensor],  # (r,) fp32 each, or stride-0 scalars: s, s_z
    lp: LossParams,
    buf: FactoredBuffers,  # of r rows
    loss_out: torch.Tensor,  # (r,) fp32
    lse_out: torch.Tensor,  # (r,) fp32
    *,
    smoothing: Smoothing | None,
) -> None:
    """Per-row losses and lse, and ``dz = r·E'`` left in ``buf`` (``buf.scale``, ``buf.e``; label smoothing's
    rank-1 part apart, its coefficient in ``buf.smooth_coef``)."""
    (r, h), v = x_c.shape, w.shape[0]
    if r == 0:
        return
    sm = smoothing
    _target_logit_kernel[(r,)](
        x_c, w, b, target, buf.shift,
        None if sm is None else sm.weighted_w, None if sm is None else sm.weighted_bias,
        None if sm is None else buf.z_sum,
        v, h, x_c.stride(0), w.stride(0), lp.ignore_index, lp.logit_scale,
        BLOCK_H=_feature_block(h, x_c.device), num_warps=4,
    )  # fmt: skip
    sched = schedule(r, x_c, v)
    if sched.gluon:
        factored_gluon.exp_logits(
            x_c, w, b, buf.shift, lp.logit_scale, CLAMP, buf.e, buf.partials, sched.workers, sched.group_m
        )
    else:
        _exp_logits(x_c, w, b, buf, lp.logit_scale, sched)
    combine(x_c, w, b, target, class_weight, scales, lp, smoothing, buf, loss_out, lse_out, sched)


def combine(
    x_c: torch.Tensor,  # (r, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (r,) int64
    class_weight: torch.Tensor | None,  # (V,)
    scales: tuple[torch.Tensor, torch.Tensor],  # (r,) fp32 each, or stride-0 scalars: s, s_z
    lp: LossParams,
    smoothing: Smoothing | None,
    buf: FactoredBuffers,  # of r rows, after the exponential GEMM
    loss_out: torch.Tensor,  # (r,) fp32
    lse_out: torch.Tensor,  # (r,) fp32
    sched: Schedule,  # the exponential GEMM's, whose partials buf holds
) -> None:
    """The partials into the losses, lse, ``r``, ``dz_y`` and the rows to refit; ``E``'s target column zeroed, and
    the refitted rows' ``dz`` (their logits recomputed from ``x_c``, ``w`` and ``b``) written over ``E``."""
    (r, v), h, ce, zs = buf.e.shape, x_c.shape[1], *scales
    _factored_combine_kernel[(cdiv(r, _COMBINE_BLOCK_R),)](
        x_c, w, b, buf.partials, buf.shift, target, class_weight, ce, zs,
        None if smoothing is None else buf.z_sum, None if smoothing is None else smoothing.weight_sum,
        buf.e, loss_out, lse_out, buf.scale, buf.smooth_coef, buf.target_grad, buf.refit,
        r, buf.partials.shape[0], v, h, sched.workers,
        x_c.stride(0), w.stride(0), buf.e.stride(0), _vector_stride(ce), _vector_stride(zs),
        lp.ignore_index, lp.z_loss, 0.0 if smoothing is None else smoothing.eps, lp.logit_scale,
        HAS_Z_LOSS=lp.z_loss > 0, CLAMP=CLAMP, TILE_M=sched.block_m, TILE_N=sched.block_n, GROUP_M=sched.group_m,
        BLOCK_T=_COMBINE_BLOCK_T, BLOCK_R=_COMBINE_BLOCK_R,
        BLOCK_V=_REFIT_BLOCK_V, BLOCK_H=_REFIT_BLOCK_H, INPUT_PRECISION=input_precision(x_c.dtype),
        num_warps=_COMBINE_WARPS,
    )  # fmt: skip


def _exp_logits(x_c, w, b, buf: FactoredBuffers, logit_scale: float, sched: Schedule) -> None:
    (r, h), v = x_c.shape, w.shape[0]
    t = _tiles(x_c.device)
    _exp_logits_kernel[(sched.workers,)](
        descriptor(x_c, t.block_m, t.block_k), descriptor(w, t.block_n, t.block_k),
        descriptor(buf.e, t.block_m, t.block_n), b, buf.shift, buf.partials,
        r, v, h, logit_scale,
        CLAMP=CLAMP, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=sched.group_m,
        INPUT_PRECISION=input_precision(x_c.dtype), num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip


def gradient_gemms(
    grad_x: torch.Tensor | None,  # (N, H): this chunk's rows written
    grad_w: torch.Tensor | None,  # (V, H) the gradient or its fp32 scratch: added to unless first
    grad_b: torch.Tensor | None,  # (V,) fp32: added to
    buf: FactoredBuffers,  # of r rows, after forward_chunk
    w: torch.Tensor,  # (V, H)
    x_c: torch.Tensor,  # (r, H)
    target: torch.Tensor,  # (r,) int64
    start: int,
    *,
    smoothing: Smoothing | None,
) -> None:
    """One chunk's shares but the target column's in ``grad_W`` and ``grad_b`` (:func:`target_column_grads`; the
    first chunk adds label smoothing's rank-1 shares, :func:`smoothing_terms`):
    ``grad_x_c = r ⊙ (E'·W) + dz_y ⊙ W_y`` (the product in x's dtype: cuBLAS's fp32-output GEMM ran 1.4x its
    16-bit one on an H100; the rounding falls on the non-target part only), ``grad_W (+)= E'ᵀ·(r ⊙ x_c)``,
    ``grad_b += E'ᵀ·r``. Where the product lives in the chunk's own ``grad_x`` rows, ``r ⊙ x_c`` goes there first
    and the weight-gradient GEMM reads it before ``E'·W`` takes its place."""
    (r, h), v = x_c.shape, w.shape[0]
    if r == 0:
        return
    if grad_w is not None and (buf.product_in_grad_x or grad_x is None):
        torch.mul(x_c, buf.scale[:, None], out=buf.product)
        _weight_grad_share(grad_w, buf, start, smoothing)
    if grad_x is not None:
        input_grad_gemm(buf.e, w, buf.product)
        out = grad_x[start : start + r]
        scale_input = grad_w is not None and not buf.product_in_grad_x  # r ⊙ x over the product, for the GEMM below
        _input_grad_rows_kernel[(r,)](
            buf.product, w, x_c if scale_input else None, target, buf.scale, buf.target_grad,
            None if smoothing is None else buf.smooth_coef, None if smoothing is None else smoothing.weighted_w, out,
            v, h,
            buf.product.stride(0), w.stride(0), x_c.stride(0), out.stride(0),
            BLOCK_H=_feature_block(h, x_c.device), num_warps=4,
        )  # fmt: skip
        if scale_input:
            _weight_grad_share(grad_w, buf, start, smoothing)
    if grad_b is not None:  # E'ᵀ·r, r rounded to E's dtype (as r ⊙ x is), summed in fp32
        share = torch.empty((v, 1), dtype=torch.float32, device=w.device)
        weight_grad_gemm(share, buf.e, buf.scale.to(buf.e.dtype)[:, None], first=True)
        grad_b.add_(share[:, 0])
        if start == 0 and smoothing is not None:
            grad_b.add_(smoothing.bias_share)


def _weight_grad_share(grad_w: torch.Tensor, buf: FactoredBuffers, start: int, smoothing: Smoothing | None) -> None:
    """``grad_W (+)= E'ᵀ·(r ⊙ x_c)``, ``buf.product`` holding ``r ⊙ x_c``."""
    r = buf.e.shape[0]
    if start == 0 and smoothing is not None:  # and, below it, the rank-1 share's rows (smoothing_terms)
        e, product = buf.extended
        product[r:].copy_(smoothing.rank_one_p)
        weight_grad_gemm(grad_w, e, product, first=True)
    else:
        weight_grad_gemm(grad_w, buf.e, buf.product, first=start == 0)


def target_column_grads(
    grad_w: torch.Tensor | None,  # (V, H): added to at the target rows
    grad_b: torch.Tensor | None,  # (V,) fp32: added to
    target_grad: torch.Tensor,  # (N,) fp32: every row's dz_y (Workspace.target_grad after the last chunk)
    x: torch.Tensor,  # (N, H)
    target: torch.Tensor,  # (N,) int64
    num_classes: int,
    order: torch.Tensor | None = None,  # target_order(target), if already sorted
) -> None:
    """``grad_W[y_n] += dz_y,n·x_n`` and ``grad_b[y_n] += dz_y,n`` for every row at once, after the last chunk:
    the rows sorted by target once, one writer per class (deterministic, no atomics)."""
    n, h = x.shape
    if n == 0 or (grad_w is None and grad_b is None):
        return
    order = target_order(target) if order is None else order
    _target_weight_grad_kernel[(n,)](
        order, target, target_grad, x, grad_w, grad_b,
        n, num_classes, h,
        x.stride(0), 0 if grad_w is None else grad_w.stride(0),
        BLOCK_H=_feature_block(h, x.device), num_warps=4,
    )  # fmt: skip


def target_order(target: torch.Tensor) -> torch.Tensor:
    """The rows sorted by target, stable, (N,) int32 (4 bytes a row kept; N < 2^31): :func:`target_column_grads`'
    order. A one-chunk call sorts in forward, before ``E`` exists, so that the sort's scratch never sits beside
    it."""
    return torch.sort(target, stable=True).indices.to(torch.int32)


def _feature_block(h: int, device: torch.device) -> int:
    """The per-row kernels' block of features: up to 1024 on the GPU, 16 in the interpreter (whose tests then run
    the loops over several blocks)."""
    return min(1024 if device.type == "cuda" else 16, next_power_of_2(h))
