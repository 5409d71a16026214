"""Launchers of the fused backend: check, allocate, pick the grid, launch — cuBLAS GEMMs and the Triton kernels.

:func:`fused_sweep` is the chunk loop: per chunk of rows, one cuBLAS GEMM writes the logits into a reused buffer,
one Triton kernel turns them into per-row losses and (when gradients are wanted) ``dz`` in place, and two cuBLAS
GEMMs consume ``dz``. :func:`weight_grad_sweep` is the vocabulary-major pass that small chunks use for the weight
gradient instead of accumulating it (:func:`...options.fused_recomputes_weight_grad`). Nothing here reads a GPU
value on the host, so the loops can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

from ...distributed import VocabShard, combine_partials
from ...options import ResolvedOptions, fp32_weight_grad_accumulation, recompute_columns
from ..common import Grads, LossParams, index_rows
from .kernels import _cross_entropy_rows_kernel, _scale_cast_kernel

__all__ = [
    "fused_sweep",
    "weight_grad_sweep",
    "deferred_grads",
    "cross_entropy_rows",
    "cross_entropy_partials",
    "cross_entropy_grad",
    "scale_cast",
]

# Logits rows start on 128-byte boundaries whatever V is: cuBLAS keeps its fast kernels only for aligned leading
# dimensions (an odd V such as 50257 would otherwise cost a multiple of the floor).
_ROW_ALIGN_BYTES = 128
# Columns a program of the row kernel handles per step, and one warp per 1024 of them (32 values per lane), 8 to 32
# warps. The plain kernel is bandwidth-bound, and more loads in flight per row raise its bandwidth: on an H100, in a
# real step, 32768 columns × 32 warps took the row kernel from 4.41 to 4.14 ms at 16384×2048×131072 (4 chunks) and
# from 9.07 to 8.40 ms at 32768×4096×128256 in 1024-row chunks, against 4096 × 8. With soft-capping or metrics each
# logit costs more ALU work and registers, and the wide step lost (5.15 → 6.49 ms, 5.97 → 6.13 ms): those keep
# 4096-column steps (benchmarks/NOTES.md, v10). Shorter rows want narrower steps: the fastest of 8192 × 8,
# 16384 × 16 and 32768 × 32 was the widest leaving a sweep about 3.5 steps (2·C/7 columns or more) at every C
# from 16384 to 256000 (v11: 32000 and 50257 → 8192, 65536–100000 → 16384, 128256 and up → 32768; 32768 columns
# at C = 32000 took 0.27 ms per 4096 rows against 0.20).
_MAX_BLOCK_C = 32768
_MIN_BLOCK_C = 8192
_MAX_BLOCK_C_HEAVY = 4096
_COLUMNS_PER_WARP = 1024
_MIN_WARPS, _MAX_WARPS = 8, 32
_SCALE_CAST_BLOCK = 4096


def _padded(n: int, dtype: torch.dtype) -> int:
    per = max(1, _ROW_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-n // per) * per


def _has_out_dtype_mm(device: torch.device) -> bool:
    """cuBLAS GEMMs with bf16/fp16 operands and an fp32 output (``torch.mm(..., out_dtype=)``, torch >= 2.8)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype")


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


def logits_gemm(x_c: torch.Tensor, w: torch.Tensor, out: torch.Tensor, out_dtype: torch.dtype | None = None) -> None:
    """``out = x_c · Wᵀ`` (``(r, H)·(H, V)``), vocabulary part by part."""
    for part in _vocab_parts(w.shape[0]):
        if out_dtype is None:
            torch.mm(x_c, w[part].T, out=out[:, part])
        else:
            torch.mm(x_c, w[part].T, out_dtype=out_dtype, out=out[:, part])


def input_grad_gemm(dz: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = dz · W`` (``(r, V)·(V, H)``), summed over the vocabulary parts.

    The parts split the GEMM's reduction dimension. The small tail goes first; the aligned bulk's GEMM then adds it
    as its ``C`` operand, which cuBLAS adds in fp32 before its one rounding. So the only extra rounding is the
    tail's own (a few dozen classes' share of the sum, against eager's single GEMM), with no fp32 ``(r, H)``
    temporary.
    """
    for i, part in enumerate(_vocab_parts(w.shape[0])[::-1]):  # tail first
        _gemm_into(out, dz[:, part], w[part], accumulate=i > 0)
    return out


def weight_grad_gemm(grad_w: torch.Tensor, dz: torch.Tensor, x_c: torch.Tensor, *, first: bool) -> None:
    """``grad_w (+)= dzᵀ · x_c`` (``(V, r)·(r, H)``), rows of ``grad_w`` part by part (fp32 scratch or not)."""
    for part in _vocab_parts(grad_w.shape[0]):
        _gemm_into(grad_w[part], dz[:, part].T, x_c, accumulate=not first)


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
    grad_out: torch.Tensor,  # () the upstream gradient g
    grads: Grads,
    shard: VocabShard | None = None,
    in_place: bool = True,  # dz may overwrite the logits (no second backward)
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (N,) fp32 each: H and g_H (see kernels.py)
) -> tuple:
    """The gradients of a single-chunk call, all formed in backward: sweep 2 writes ``dz`` with ``g`` folded into
    each row's coefficients, so ``dz = bf16(g·∂ℓ/∂z)`` is rounded once as eager rounds it, then ``grad_x = dz·W``,
    ``grad_W = dzᵀ·x`` and ``grad_b = Σ_rows dz``, each rounded once whatever ``g`` is. ``grad_out`` may also be
    ``(N, 1)``: a per-row upstream gradient (``reduction="none"``, the coefficients being linear in it)."""
    n, v = logits.shape
    offset, total = (0, v) if shard is None else (shard.offset, shard.num_classes)
    if in_place and logits.dtype == x.dtype:
        dz = logits
    else:
        dz = _row_padded(n, v, x.dtype, x.device)
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
) -> None:
    """Per-row loss, logsumexp (and statistics); with ``grad``, ``dr`` (see kernels.py for the math): both sweeps
    in one launch. With ``coefs_out``, also each row's coefficients of ``dz`` for :func:`weight_grad_sweep`."""
    assert coefs_out is None or (scales is not None and coefs_out.stride() == (3, 1))
    row_scale, z_scale = (loss_out, loss_out) if scales is None else scales  # unread without COMPUTE_GRAD
    _launch_rows(
        logits,
        grad,
        bias,
        target,
        class_weight,
        lp,
        phase=0,
        loss=loss_out,
        lse=lse_out,
        stats=stats_out,
        row_scale=row_scale,
        z_scale=z_scale,
        coefs=coefs_out,
        entropy_grad=entropy_grad,
    )


# The per-row partials of PHASE 1, by column of the (r, 7) buffer (see the kernel's docstring).
PARTIALS = ("m", "sum_exp", "z_y", "w_y", "z_sum", "exp_z_sum", "sq_sum")


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
) -> None:
    """Sweep 1 over a vocabulary slice ``[class_offset, class_offset + C_local)``: per-row partial sums (columns
    :data:`PARTIALS`, relative to the slice's own row max) and, with metrics, the slice's first argmax."""
    assert partials_out.stride() == (len(PARTIALS), 1)
    _launch_rows(
        logits,
        None,
        bias,
        target,
        class_weight,
        lp,
        phase=1,
        partials=partials_out,
        argmax=argmax_out,
        class_offset=class_offset,
        total_classes=total_classes,
        metrics=argmax_out is not None,
    )


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
) -> None:
    """Sweep 2 over a vocabulary slice: ``dr`` from the row's global ``lse`` and gradient coefficients (plus the
    entropy's term given each row's entropy and its upstream gradient)."""
    assert coefs.stride() == (3, 1) and lse.stride() == (1,)
    _launch_rows(
        logits,
        grad,
        bias,
        target,
        class_weight,
        lp,
        phase=2,
        lse=lse,
        coefs=coefs,
        class_offset=class_offset,
        total_classes=total_classes,
        entropy_grad=entropy_grad,
    )


def _launch_rows(
    logits,
    grad,
    bias,
    target,
    class_weight,
    lp: LossParams,
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
    metrics: bool | None = None,
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """One launch of the row kernel, one program per row; pointers a phase does not read stand in as ``logits``.

    ``logits`` and ``grad`` are views of this module's row-padded buffers (:func:`_padded`): the columns past ``C``
    up to the row stride are scratch, which the kernel may read and overwrite (see :func:`_loaded_columns`).
    """
    rows, num_classes = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1 and (grad is None or grad.stride(1) == 1)
    assert stats is None or stats.stride() == (5, 1)
    metrics = (stats is not None) if metrics is None else metrics
    heavy = lp.logit_softcap > 0 or metrics
    block_c = row_kernel_block(num_classes, heavy)
    loaded = _loaded_columns(num_classes, logits, grad)
    unused = logits
    row_scale = unused if row_scale is None else row_scale
    z_scale = unused if z_scale is None else z_scale
    assert entropy_grad is None or (grad is not None and all(t.stride() == (1,) for t in entropy_grad))
    entropy, entropy_share = (unused, unused) if entropy_grad is None else entropy_grad
    _cross_entropy_rows_kernel[(rows,)](
        logits,
        logits if grad is None else grad,
        unused if bias is None else bias,
        target,
        unused if class_weight is None else class_weight,
        row_scale,
        z_scale,
        unused if loss is None else loss,
        unused if lse is None else lse,
        unused if stats is None else stats,
        unused if partials is None else partials,
        unused if argmax is None else argmax,
        unused if coefs is None else coefs,
        entropy,
        entropy_share,
        num_classes,
        loaded,
        num_classes if total_classes is None else total_classes,
        logits.stride(0),
        logits.stride(0) if grad is None else grad.stride(0),
        row_scale.stride(0) if row_scale.dim() == 1 else 0,
        z_scale.stride(0) if z_scale.dim() == 1 else 0,
        class_offset,
        lp.ignore_index,
        lp.label_smoothing,
        lp.logit_scale,
        lp.logit_softcap or 1.0,
        lp.z_loss,
        HAS_BIAS=bias is not None,
        HAS_CLASS_WEIGHT=class_weight is not None,
        HAS_SMOOTHING=lp.label_smoothing > 0,
        HAS_LOGIT_SCALE=lp.logit_scale != 1.0,
        HAS_SOFTCAP=lp.logit_softcap > 0,
        HAS_Z_LOSS=phase == 0 and lp.z_loss > 0,  # PHASE 2 reads it folded into coef
        METRICS=metrics,
        COMPUTE_GRAD=grad is not None,
        STORE_COEFS=phase == 0 and coefs is not None,
        PHASE=phase,
        ENTROPY_GRAD=entropy_grad is not None,
        BLOCK_C=block_c,
        num_warps=row_kernel_warps(block_c),
    )


def row_kernel_block(num_classes: int, heavy: bool) -> int:
    """Columns per step of the row kernel over rows of ``num_classes`` (``heavy``: soft-capping or metrics)."""
    widest = _MAX_BLOCK_C_HEAVY
    if not heavy:
        about_3_5_steps = 1 << max(0, (2 * num_classes // 7).bit_length() - 1)  # the largest power of two <= 2C/7
        widest = min(_MAX_BLOCK_C, max(_MIN_BLOCK_C, about_3_5_steps))
    return min(widest, triton.next_power_of_2(num_classes))


def row_kernel_warps(block_c: int) -> int:
    """Warps per program of the row kernel for a ``block_c``-column step (4 for small vocabularies)."""
    if block_c < 2048:
        return 4
    return min(_MAX_WARPS, max(_MIN_WARPS, block_c // _COLUMNS_PER_WARP))


def _loaded_columns(num_classes: int, *buffers: torch.Tensor | None) -> int:
    """The columns the row kernel loads and stores: ``C`` rounded up to 16 where every buffer's rows have room.

    Triton vectorises a masked load or store only when it can prove the mask constant over the vector, i.e. when
    the bound is a multiple of 16. An odd ``C`` (50257) would otherwise halve the kernel's bandwidth with 2-byte
    accesses; the extra columns come from the rows' padding (their values are masked out of the math, and what the
    kernel stores there is never read).
    """
    wide = -(-num_classes // 16) * 16
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
        grid = (triton.cdiv(numel, _SCALE_CAST_BLOCK),)
        in_place = out.data_ptr() == src.data_ptr() and out.dtype == src.dtype
        _scale_cast_kernel[grid](src, scale, out, numel, IN_PLACE=in_place, BLOCK=_SCALE_CAST_BLOCK, num_warps=4)
    return out


def _fp32_logits(ro: ResolvedOptions, x: torch.Tensor) -> bool:
    """``"accurate"`` with low-precision inputs: logits leave the GEMM in fp32 (no rounding before the softmax) and
    ``dz`` goes to a second buffer in the input dtype (6 bytes per logit instead of 2); otherwise ``dz`` overwrites
    the logits in place."""
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    return ro.acc_policy == "accurate" and low_precision and _has_out_dtype_mm(x.device)


def _logits_buffers(rows: int, cols: int, x: torch.Tensor, fp32_logits: bool, want_grads: bool):
    """``(logits, grad)``: ``(rows, cols)`` views of row-padded buffers (:func:`_padded`), one buffer unless
    ``fp32_logits`` with gradients."""
    logits = _row_padded(rows, cols, torch.float32 if fp32_logits else x.dtype, x.device)
    if not (fp32_logits and want_grads):
        return logits, logits
    return logits, _row_padded(rows, cols, x.dtype, x.device)


def _row_padded(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``(rows, cols)`` view of a buffer whose rows start on 128-byte boundaries (:func:`_padded`)."""
    return torch.empty((rows, _padded(cols, dtype)), dtype=dtype, device=device)[:, :cols]


def accumulator_dtypes(
    ro: ResolvedOptions, num_rows: int, x_dtype: torch.dtype, w_dtype: torch.dtype, scaled_later: bool
) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes :func:`fused_sweep` forms ``grad_x`` and ``grad_w`` in (the one rule its callers, the compiled
    op's fake kernel among them, read): fp32 where the policy accumulates low-precision gradients in fp32
    (:func:`...options.fp32_weight_grad_accumulation`) and the rounding has to wait — ``grad_w`` across chunks
    (one chunk's single GEMM accumulates in fp32 itself), ``grad_x`` until the upstream gradient scales it
    (``scaled_later``) — else the inputs' own dtypes."""
    fp32_policy = fp32_weight_grad_accumulation(ro.acc_policy, ro.acc_dtype, x_dtype)
    chunked = ro.batch_chunk_size < num_rows
    return (
        torch.float32 if fp32_policy and scaled_later else x_dtype,
        torch.float32 if fp32_policy and chunked else w_dtype,
    )


def fused_sweep(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    lp: LossParams,
    ro: ResolvedOptions,
    scales: tuple[torch.Tensor, torch.Tensor]
    | None,  # (N,) fp32 shares s, s_z of the upstream gradient; None: loss only
    grads: Grads,  # which gradients to compute (with scales)
    defer: bool = False,
    shard: VocabShard | None = None,  # vocabulary parallel: w, b, class_weight are this rank's slices
    coefs_out: torch.Tensor | None = None,  # (N, 3) fp32, with scales: dz's coefficients for weight_grad_sweep
    per_row: bool = True,
    scaled_later: bool = False,  # the caller scales the gradients by the upstream gradient (scalar reductions)
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (N,) fp32 each: H and g_H, with scales
):
    """Per-row losses ``(N,)``, lse ``(N,)`` and statistics ``(N, 5)`` (fp32) and, with ``scales``, the gradients.

    Without ``per_row`` (no metrics) nothing per row outlives its chunk: ``losses`` are then each chunk's sum
    ``(num_chunks,)`` and ``lse`` is None.

    Returns ``(losses, lse, stats, (grad_x, grad_w, grad_b))`` (``stats`` None without ``lp.metrics``).
    ``grad_w`` is fp32 when the policy keeps an fp32 scratch (``"balanced"``/``"accurate"`` with low-precision
    weights, over more than one chunk), and so is ``grad_x`` under that policy when ``scaled_later``: the caller
    rounds them once, when it scales them (rounding them here and again after scaling by a ``g`` that is not a
    power of two, e.g. ``loss / 3`` for gradient accumulation, gave 1.6–1.9× eager's error at the headline shapes).
    With ``defer`` (one chunk only) sweep 2 and the gradient GEMMs are left to the caller
    (:func:`deferred_grads`): the last item is then ``(logits, lse, coefs)``, the ``(N, V)`` logits as the GEMM
    wrote them, each row's logsumexp ``(N,)`` and dz's coefficients ``(N, 3)`` for an upstream gradient of 1.

    With a ``shard`` (:mod:`...distributed`) each chunk runs the row kernel's two sweeps as two launches around the
    combine over the group: sweep 1 writes this slice's per-row partials, :func:`...distributed.combine_partials`
    turns them into sums over the whole vocabulary (one all-reduce MAX, one stacked SUM, a MIN with metrics, all
    on ``(rows,)`` vectors), :func:`..common.index_rows` into the loss, lse, statistics and ``dz``'s coefficients,
    and sweep 2 writes this slice's ``dz``. The losses, lse and statistics are the whole vocabulary's;
    ``grad_x`` is all-reduced once at the end (unless ``shard.input_grad_all_reduce`` is off or ``defer``).

    ``coefs_out`` (unsharded): the row kernel also writes each row's coefficients of ``dz``, which
    :func:`weight_grad_sweep` needs (with ``lse``) to form ``dz`` again over blocks of classes.

    ``entropy_grad`` (unsharded, not deferred): ``dz`` also carries each row's ``g_H·∂H/∂z`` (see kernels.py).
    """
    assert coefs_out is None or shard is None
    assert entropy_grad is None or (shard is None and not defer)
    assert per_row or not lp.metrics
    n, h = x.shape
    v = w.shape[0]
    device, dtype = x.device, x.dtype
    rows = max(1, min(ro.batch_chunk_size, n))
    losses = torch.empty(n if per_row else rows, dtype=torch.float32, device=device)
    lse = torch.empty(n if per_row else rows, dtype=torch.float32, device=device)
    loss_sums = None if per_row else torch.empty(-(-n // rows), dtype=torch.float32, device=device)
    stats = torch.empty((n, 5), dtype=torch.float32, device=device) if lp.metrics else None
    want_grads = scales is not None and grads.any
    assert not defer or rows == n, "deferred gradient GEMMs need a single chunk"
    fp32_logits = _fp32_logits(ro, x)
    logits_all, grad_all = _logits_buffers(rows, v, x, fp32_logits, want_grads and not defer)

    if want_grads and defer:
        grads = Grads(False, False, False)  # the caller runs sweep 2 and the gradient GEMMs
        coefs_out = torch.empty((n, 3), dtype=torch.float32, device=device)
    x_dtype, w_dtype = accumulator_dtypes(ro, n, dtype, w.dtype, scaled_later)
    grad_x = None
    if want_grads and grads.input:
        grad_x = torch.empty((n, h), dtype=x_dtype, device=device)
    grad_w = None
    if want_grads and grads.weight:
        grad_w = torch.empty((v, h), dtype=w_dtype, device=device)
    grad_b = torch.zeros(v, dtype=torch.float32, device=device) if want_grads and grads.bias else None
    if shard is not None:
        partials_all = torch.empty((rows, len(PARTIALS)), dtype=torch.float32, device=device)
        argmax_all = torch.empty(rows, dtype=torch.int64, device=device) if lp.metrics else None
        w_sum = shard.class_weight_sum.float() if class_weight is not None else float(shard.num_classes)

    for chunk, start in enumerate(range(0, n, rows)):
        stop = min(start + rows, n)
        r = stop - start
        x_c = x[start:stop]
        row_out = slice(start, stop) if per_row else slice(0, r)  # where this chunk's losses and lse go
        logits = logits_all[:r]
        logits_gemm(x_c, w, logits, torch.float32 if fp32_logits else None)
        grad = grad_all[:r] if want_grads and not defer else None
        scales_c = None if scales is None else (scales[0][start:stop], scales[1][start:stop])
        if shard is None:
            cross_entropy_rows(
                logits,
                grad,
                b,
                target[start:stop],
                class_weight,
                scales_c,
                losses[row_out],
                lse[row_out],
                None if stats is None else stats[start:stop],
                lp,
                None if coefs_out is None else coefs_out[start:stop],
                None if entropy_grad is None or grad is None else tuple(t[start:stop] for t in entropy_grad),
            )
        else:
            _sharded_rows(
                logits,
                grad,
                b,
                target[start:stop],
                class_weight,
                scales_c if want_grads else None,
                losses[row_out],
                lse[row_out],
                None if stats is None else stats[start:stop],
                lp,
                shard,
                w_sum,
                partials_all[:r],
                None if argmax_all is None else argmax_all[:r],
                None if coefs_out is None else coefs_out[start:stop],
            )
        if loss_sums is not None:
            torch.sum(losses[:r], dim=0, out=loss_sums[chunk])
        if not want_grads:
            continue
        if grad_x is not None:
            input_grad_gemm(grad, w, grad_x[start:stop])
        if grad_w is not None:
            weight_grad_gemm(grad_w, grad, x_c, first=start == 0)
        if grad_b is not None:
            grad_b += grad.sum(dim=0, dtype=torch.float32)
    if grad_w is not None and n == 0:
        grad_w.zero_()
    if grad_x is not None and shard is not None and shard.input_grad_all_reduce:
        shard.sum_(grad_x)  # each rank's grad_x covers its classes only
    if want_grads and defer:
        saved = (logits_all[:n], lse, coefs_out)  # one chunk: lse holds every row whatever per_row says
    else:
        saved = (grad_x, grad_w, grad_b)
    if not per_row:
        losses, lse = loss_sums, None
    return losses, lse, stats, saved


def weight_grad_sweep(
    x: torch.Tensor,  # (N, H)
    w: torch.Tensor,  # (V, H)
    b: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    class_weight: torch.Tensor | None,  # (V,)
    lse: torch.Tensor,  # (N,) fp32, from fused_sweep
    coefs: torch.Tensor,  # (N, 3) fp32, from fused_sweep's coefs_out (times the upstream gradient, if any)
    lp: LossParams,
    ro: ResolvedOptions,
    grads: Grads,  # .weight / .bias: which of the two to form
    scale: torch.Tensor | None = None,  # () the upstream gradient, folded into the coefficients
    entropy_grad: tuple[torch.Tensor, torch.Tensor] | None = None,  # (N,) fp32 each: H and g_H
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_w, grad_b)`` from a vocabulary-major pass that recomputes the logits (``ro.recompute_weight_grad``).

    Per block of ``cols`` classes (:func:`...options.recompute_columns`: the same buffer size as the row pass's):
    one cuBLAS GEMM writes the block's logits ``x·W_blockᵀ`` for all ``N`` rows, the row kernel's ``PHASE`` 2 turns
    them into ``dz`` in place from each row's ``lse`` and coefficients, and ``grad_W_block = dzᵀ·x`` is one GEMM
    over every row: accumulated in fp32 by cuBLAS and rounded once into the gradient, with no scratch and no
    accumulation across chunks. ``grad_b_block`` is ``dz``'s column sum.
    """
    n = x.shape[0]
    v = w.shape[0]
    if scale is not None:
        coefs = coefs * scale.float()
    cols = recompute_columns(n, ro.batch_chunk_size, v)
    logits_all, grad_all = _logits_buffers(n, cols, x, _fp32_logits(ro, x), want_grads=True)
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device) if grads.weight else None
    grad_b = torch.empty(v, dtype=torch.float32, device=x.device) if grads.bias else None
    for start in range(0, v if n else 0, cols):
        part = slice(start, min(start + cols, v))
        width = part.stop - part.start
        logits, grad = logits_all[:, :width], grad_all[:, :width]
        logits_gemm(x, w[part], logits, torch.float32 if logits.dtype != x.dtype else None)
        cross_entropy_grad(
            logits,
            grad,
            None if b is None else b[part],
            target,
            None if class_weight is None else class_weight[part],
            lse,
            coefs,
            lp,
            class_offset=part.start,
            total_classes=v,
            entropy_grad=entropy_grad,
        )
        if grad_w is not None:
            weight_grad_gemm(grad_w[part], grad, x, first=True)
        if grad_b is not None:
            torch.sum(grad, dim=0, dtype=torch.float32, out=grad_b[part])
    if n == 0:
        for g in (grad_w, grad_b):
            if g is not None:
                g.zero_()
    return grad_w, grad_b


def _sharded_rows(
    logits,
    grad,
    bias,
    target,
    class_weight,
    scales,
    loss_out,
    lse_out,
    stats_out,
    lp: LossParams,
    shard: VocabShard,
    w_sum,
    partials,
    argmax,
    coefs_out=None,
) -> None:
    """One chunk of a vocabulary-parallel sweep: sweep 1 on this slice → combine over the group → sweep 2 (or,
    with ``coefs_out`` and no ``grad``, dz's coefficients for a later sweep 2)."""
    offset, total = shard.offset, shard.num_classes
    cross_entropy_partials(logits, bias, target, class_weight, partials, argmax, lp, offset, total)
    cols = dict(zip(PARTIALS, partials.unbind(1)))
    sums = combine_partials(
        shard,
        cols["m"],
        cols["sum_exp"],
        cols["z_y"],
        cols["w_y"] if class_weight is not None else None,
        cols["z_sum"] if lp.label_smoothing > 0 else None,
        cols["exp_z_sum"] if lp.metrics else None,
        cols["sq_sum"] if lp.metrics else None,
        argmax,
    )
    ce_scale, z_scale = (None, None) if scales is None else scales
    loss, lse, stats, coefs = index_rows(sums, target, w_sum, lp, total, ce_scale, z_scale)
    loss_out.copy_(loss)
    lse_out.copy_(lse)
    if stats_out is not None:
        stats_out.copy_(stats)
    if grad is not None or coefs_out is not None:
        coefs = torch.stack(coefs, dim=1, out=coefs_out)  # (r, 3)
    if grad is not None:
        cross_entropy_grad(logits, grad, bias, target, class_weight, lse_out, coefs, lp, offset, total)


def _gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out (+)= a·b`` with the products summed in fp32 and rounded once to ``out``'s dtype: an fp32 ``out`` (a
    scratch, or a gradient the upstream gradient scales later) takes cuBLAS's fp32 output for 16-bit operands."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif _has_out_dtype_mm(a.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif accumulate:  # no fp32-output GEMM on this device (CPU interpreter runs): the same sums, upcast operands
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
