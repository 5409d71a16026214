"""``LinearCrossEntropyOptions``: the fields, their validation, and the one place that resolves them.

PyTorch 2.13's five fields keep PyTorch's validation messages and resolution rules; ``backend`` is ours.
:func:`resolve` turns an options instance plus the shapes of one call into a :class:`ResolvedOptions`
(no ``"auto"`` and no ``None`` left), which is all a backend ever sees.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch

__all__ = ["LinearCrossEntropyOptions", "ResolvedOptions", "resolve"]

TORCH_FIELDS = ("allow_retain_graph", "batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype")
ACC_POLICIES = ("auto", "accurate", "balanced", "compact")
BACKENDS = ("auto", "chunked", "fused", "tiled")
_ACC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _AutoDefault(NamedTuple):
    acc_policy: str
    chunking_method: str


# Picks for "auto", keyed by (backend, device type, input dtype). Why each one:
# - chunked/cpu: "balanced" keeps the GEMMs in bf16/fp16 (native on the CPU; PyTorch's "accurate" upcasts them and
#   runs ~3x slower) while the softmax and the weight-gradient scratch stay in fp32; chunks are sized by
#   "budget" (``budget_chunk_rows``): PyTorch's aspect ratio gives 128-row chunks at 4096×1024×32000, whose
#   small-K weight-gradient GEMMs ran 1.3x (fp32) to 1.5x (bf16) slower than 512–1024-row chunks on 2 cores.
# - chunked/cuda/low precision: PyTorch's own pick.
# - fused: "balanced" accumulates the weight gradient in an fp32 scratch (bf16 accumulation across chunks loses
#   accuracy); the fused backend sizes its chunks itself ("memory"), see ``fused_chunk_rows``: one chunk where
#   all the logits fit in the size of that scratch, else chunks of a quarter of the rows or of the scratch's
#   size, whichever is longer.
_AUTO_DEFAULTS: dict[tuple[str, str, torch.dtype], _AutoDefault] = {
    ("chunked", "cpu", torch.bfloat16): _AutoDefault("balanced", "budget"),
    ("chunked", "cpu", torch.float16): _AutoDefault("balanced", "budget"),
    ("chunked", "cpu", torch.float32): _AutoDefault("compact", "budget"),
    ("chunked", "cpu", torch.float64): _AutoDefault("compact", "budget"),
    ("chunked", "cuda", torch.bfloat16): _AutoDefault("compact", "aspect_ratio:2"),
    ("chunked", "cuda", torch.float16): _AutoDefault("compact", "aspect_ratio:2"),
}
_AUTO_FALLBACK = _AutoDefault("compact", "aspect_ratio:2")
_FUSED_AUTO = _AutoDefault("balanced", "memory")
# - tiled: the backend exists for memory, so "auto" keeps no accumulator beyond the gradients themselves; it has no
#   chunks (None: every row in one launch).
_TILED_AUTO = _AutoDefault("compact", None)


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """Opt-in to the chunked / fused implementations of :func:`linear_cross_entropy`.

    The five PyTorch fields behave as in ``torch.nn.LinearCrossEntropyOptions`` (PyTorch 2.13):

    - ``allow_retain_graph``: ``False`` lets backward consume the gradients computed during forward (a second
      backward raises ``RuntimeError``); ``True`` keeps them for repeated backward at one gradient-sized copy.
    - ``batch_chunk_size``: rows per chunk; an explicit value disables automatic chunking. On the fused backend,
      chunks small enough that accumulating the weight gradient across them would cost more than recomputing the
      logits (:func:`fused_recomputes_weight_grad`) get it from a vocabulary-major pass instead: eager's accuracy
      under every ``acc_policy``, no scratch, the same buffer size.
    - ``chunking_method``: ``"auto"``, ``None`` or ``"aspect_ratio[:k]"`` (chunk rows
      ``min(next_pow2(ceil(N / ceil(C / F))) // k, N)``).
    - ``acc_policy``: ``"accurate"`` (everything in ``acc_dtype``), ``"balanced"`` (GEMMs in the input dtype,
      softmax and an ``(C, F)`` weight-gradient scratch in ``acc_dtype``), ``"compact"`` (no scratch: the weight
      gradient accumulates chunk by chunk into the input-dtype gradient) or ``"auto"``.
    - ``acc_dtype``: ``None`` (fp32 for fp16/bf16 inputs under ``acc_policy="auto"``, else the input dtype) or one
      of fp16, bf16, fp32, fp64.

    Ours: ``backend`` is ``"auto"`` (the fused GPU path when it supports the call, else the chunked path),
    ``"chunked"`` (pure PyTorch, any device), ``"fused"`` (Triton kernels between cuBLAS GEMMs; needs CUDA and
    ``triton``, else falls back to ``"chunked"`` with a warning) or ``"tiled"`` (memory-minimal: Triton kernels that
    hold logits only as register tiles and add gradients with atomics; never picked by ``"auto"``). On
    ``"tiled"``, ``acc_policy`` picks the gradient accumulators: ``"compact"`` (the ``"auto"`` pick) adds into the
    gradients themselves, ``"balanced"`` keeps an fp32 ``(N, F)`` input-gradient accumulator and ``"accurate"``
    also an fp32 ``(C, F)`` weight-gradient one (each only with ``acc_dtype`` fp32 and fp16/bf16 inputs);
    ``batch_chunk_size`` does not apply (no chunks). ``sparse_backward_eps`` (``"tiled"`` only; 0 = exact, the
    default): skip the backward products of a logit tile whose probabilities are all below it and that holds no
    row's target (a gradient error of at most ``eps`` per skipped logit and row share; off with label
    smoothing). ``loss_dtype``: None returns the loss in the
    input's dtype, as PyTorch does (one rounding of an fp32-accumulated value); ``torch.float32`` returns the fp32
    value itself (what trainers log).
    """

    allow_retain_graph: bool = False
    batch_chunk_size: int | None = None
    chunking_method: str | None = "auto"
    acc_policy: Literal["accurate", "balanced", "compact", "auto"] = "auto"
    acc_dtype: torch.dtype | None = None
    backend: Literal["auto", "chunked", "fused", "tiled"] = "auto"
    loss_dtype: torch.dtype | None = None
    sparse_backward_eps: float = 0.0

    def __post_init__(self):
        # PyTorch's messages first (what users' tests match), then the accepted values.
        if self.acc_policy not in ACC_POLICIES:
            raise ValueError(f"invalid acc_policy: {self.acc_policy!r}; expected one of {ACC_POLICIES}")
        if self.chunking_method is not None and self.chunking_method != "auto":
            if not isinstance(self.chunking_method, str) or _aspect_ratio_factor(self.chunking_method) is None:
                raise ValueError(
                    f"invalid chunking_method: {self.chunking_method!r}; expected 'auto', None, 'aspect_ratio' or "
                    "'aspect_ratio:k' with an integer k > 0"
                )
        if not (
            self.batch_chunk_size is None or (isinstance(self.batch_chunk_size, int) and self.batch_chunk_size > 0)
        ):
            raise ValueError(f"batch_chunk_size must be positive int or None, got {self.batch_chunk_size!r}")
        if self.acc_dtype is not None and self.acc_dtype not in _ACC_DTYPES:
            raise ValueError(
                f"acc_dtype must be one of {{None, torch.float16, torch.bfloat16, torch.float32, torch.float64}}, "
                f"got {self.acc_dtype!r}. Pass acc_dtype=None to let the op pick automatically."
            )
        if self.loss_dtype not in (None, torch.float32):
            raise ValueError(
                f"loss_dtype must be None (the input's dtype, as PyTorch) or torch.float32, got {self.loss_dtype!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"invalid backend: {self.backend!r}; expected one of {BACKENDS}")
        eps = self.sparse_backward_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < 1.0:
            raise ValueError(f"sparse_backward_eps must be a float in [0, 1), got {eps!r}")
        if eps and self.backend != "tiled":
            raise ValueError(
                f"sparse_backward_eps applies to backend='tiled' only (got backend={self.backend!r}); the other "
                "backends compute exact gradients"
            )


@dataclasses.dataclass(frozen=True)
class ResolvedOptions:
    """Concrete settings for one call: what a backend receives."""

    backend: str  # "chunked", "fused" or "tiled"
    acc_policy: str  # "accurate" | "balanced" | "compact"
    acc_dtype: torch.dtype
    batch_chunk_size: int  # rows per chunk, >= 1
    allow_retain_graph: bool
    sparse_backward_eps: float = 0.0
    recompute_weight_grad: bool = False  # fused: the weight gradient from a vocabulary-major pass (see below)


def _aspect_ratio_factor(method: str) -> int | None:
    """``k`` of ``"aspect_ratio[:k]"``, or None when ``method`` is not of that form."""
    name, sep, factor = method.partition(":")
    if not sep:
        factor = "1"
    if name == "aspect_ratio" and factor.isdigit() and int(factor) > 0:
        return int(factor)
    return None


def aspect_ratio_chunk_rows(num_rows: int, in_features: int, num_classes: int, factor: int) -> int:
    """PyTorch's rule: a chunk's ``(rows, C)`` logits match the ``(N, F)`` input in size, divided by ``factor``."""
    target = -(-num_rows // -(-num_classes // in_features))
    return min((1 << max(target - 1, 0).bit_length()) // factor, num_rows)


def fp32_weight_grad_accumulation(acc_policy: str, acc_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the fused backend accumulates a low-precision weight gradient in fp32 across chunks (an fp32
    ``(V, H)`` scratch): ``"balanced"``/``"accurate"`` with ``acc_dtype`` fp32 and fp16/bf16 inputs."""
    return acc_policy != "compact" and acc_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)


def fused_chunk_rows(num_rows: int, in_features: int, logit_bytes: int, fp32_scratch: bool) -> int:
    """Rows per chunk of the fused backend: a power of two, as large as memory allows, or every row at once.

    GEMM efficiency wants long chunks (a chunked GEMM loop costs 1.27x the un-chunked GEMMs at 512 rows, 1.06x at
    2048 on an H100); memory wants a small ``(rows, V)`` logits buffer. The buffer is held to a quarter of the
    logits the un-chunked computation would hold in the input dtype (eager holds ~5x that), and at least
    ``_MIN_FUSED_ROWS`` rows so that small batches still run long GEMMs, and never more rows than the call has.

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
    budget_rows = max(num_rows // 4, _MIN_FUSED_ROWS)
    if fp32_scratch:
        budget_rows = max(budget_rows, 4 * in_features // logit_bytes)
    rows = 1 << (budget_rows.bit_length() - 1)
    return max(1, min(rows, num_rows))


_MIN_FUSED_ROWS = 1024
# FLOPs a cuBLAS GEMM does in the time HBM moves one byte, by input dtype: the break-even of
# fused_recomputes_weight_grad. bf16/fp16 on an H100: ~750 TFLOP/s over ~3.1 TB/s (benchmarks/NOTES.md). fp32
# inputs are left out (0: never recompute): their GEMMs run at a fraction of that, or TF32 only when allowed.
_GEMM_FLOPS_PER_BYTE = {torch.bfloat16: 240, torch.float16: 240}
_RECOMPUTE_COLUMN_ALIGN = 128


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
    return chunk_rows < num_rows and chunk_rows < _GEMM_FLOPS_PER_BYTE.get(dtype, 0) * accumulated_bytes


def recompute_columns(num_rows: int, chunk_rows: int, num_classes: int) -> int:
    """Classes per block of the vocabulary-major pass: its ``(N, cols)`` logits hold no more than the row pass's
    ``(rows, V)`` ones, in multiples of 128 (cuBLAS's tiles), at least 128 and at most ``V``."""
    cols = chunk_rows * num_classes // max(1, num_rows) // _RECOMPUTE_COLUMN_ALIGN * _RECOMPUTE_COLUMN_ALIGN
    return min(num_classes, max(_RECOMPUTE_COLUMN_ALIGN, cols))


_CHUNK_BUDGET_BYTES = 64 << 20


def budget_chunk_rows(num_rows: int, num_classes: int, element_size: int, scratch_bytes: int = 0) -> int:
    """Rows per chunk of the chunked backend on the CPU: every row where the call's ``(N, C)`` GEMM output fits in
    64 MiB plus ``scratch_bytes`` (what chunking would allocate besides its buffer: the fp32 weight-gradient scratch
    of a low-precision call and its product buffer; one chunk needs neither, its one GEMM accumulates the whole
    sum); else the largest power of two whose ``(rows, C)`` output fits in 64 MiB (at least one row)."""
    if num_rows * num_classes * element_size <= _CHUNK_BUDGET_BYTES + scratch_bytes:
        return max(1, num_rows)
    rows = max(1, _CHUNK_BUDGET_BYTES // max(1, num_classes * element_size))
    return max(1, min(1 << (rows.bit_length() - 1), num_rows))


def _auto_acc_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """fp32 for fp16/bf16 input where mixed-precision GEMMs exist (CUDA SM 7.0+/8.0+, CPU), else None."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.float32 if major >= (8 if dtype == torch.bfloat16 else 7) else None
    if device.type == "cpu":
        return torch.float32
    return None


def resolve(
    options: LinearCrossEntropyOptions,
    *,
    backend: str,
    num_rows: int,
    in_features: int,
    num_classes: int,
    dtype: torch.dtype,
    device: torch.device,
    weight_grad: bool = True,
) -> ResolvedOptions:
    """Resolve ``"auto"`` and ``None`` fields for one call on the already chosen ``backend`` (``weight_grad``: the
    call will compute a weight gradient, which decides whether the fused backend would keep an fp32 scratch).

    Rules (PyTorch's): an explicit ``batch_chunk_size`` disables automatic chunking; a ``batch_chunk_size`` that
    disagrees with an explicit ``chunking_method`` raises ``ValueError``; ``acc_dtype=None`` becomes fp32 for
    fp16/bf16 input only under ``acc_policy="auto"``.
    """
    acc_policy, chunking_method = options.acc_policy, options.chunking_method
    if chunking_method == "auto" and options.batch_chunk_size is not None:
        chunking_method = None
    if acc_policy == "auto" or chunking_method == "auto":
        if backend == "fused":
            auto = _FUSED_AUTO
        elif backend == "tiled":
            auto = _TILED_AUTO
        else:
            auto = _AUTO_DEFAULTS.get((backend, device.type, dtype), _AUTO_FALLBACK)
        acc_policy = auto.acc_policy if acc_policy == "auto" else acc_policy
        chunking_method = auto.chunking_method if chunking_method == "auto" else chunking_method

    if options.acc_dtype is not None:
        acc_dtype = options.acc_dtype
    else:
        auto_acc = _auto_acc_dtype(dtype, device) if options.acc_policy == "auto" else None
        acc_dtype = auto_acc if auto_acc is not None else dtype

    rows = num_rows if options.batch_chunk_size is None else min(options.batch_chunk_size, num_rows)
    if chunking_method == "memory":
        low = dtype in (torch.float16, torch.bfloat16)
        fp32_scratch = weight_grad and fp32_weight_grad_accumulation(acc_policy, acc_dtype, dtype)
        # "accurate" keeps fp32 logits beside the input-dtype dz (see the fused launcher)
        logit_bytes = dtype.itemsize + (4 if acc_policy == "accurate" and low else 0)
        rows = fused_chunk_rows(num_rows, in_features, logit_bytes, fp32_scratch)
    elif chunking_method == "budget":
        gemm_dtype = acc_dtype if acc_policy == "accurate" else dtype
        scratch = 0
        if weight_grad and acc_dtype.itemsize > gemm_dtype.itemsize:  # acc_dtype scratch + GEMM-dtype product
            scratch = (
                num_classes * in_features * acc_dtype.itemsize
                + min(num_classes * in_features, _CHUNK_BUDGET_BYTES // gemm_dtype.itemsize) * gemm_dtype.itemsize
            )
        rows = budget_chunk_rows(num_rows, num_classes, gemm_dtype.itemsize, scratch)
    elif chunking_method is not None:
        rows = aspect_ratio_chunk_rows(num_rows, in_features, num_classes, _aspect_ratio_factor(chunking_method))
        if options.batch_chunk_size is not None and options.batch_chunk_size != rows:
            raise ValueError(
                f"batch_chunk_size (={options.batch_chunk_size}) and chunking_method ('{chunking_method}') give "
                f"different chunk sizes ({options.batch_chunk_size} vs {rows}); pass only one."
            )

    recompute = False
    if backend == "fused" and weight_grad:
        accumulated = 4 if fp32_weight_grad_accumulation(acc_policy, acc_dtype, dtype) else dtype.itemsize
        recompute = fused_recomputes_weight_grad(max(1, rows), num_rows, accumulated, dtype)

    if acc_dtype != dtype and not (dtype in (torch.float16, torch.bfloat16) and acc_dtype == torch.float32):
        raise RuntimeError(
            "linear_cross_entropy supports float32 acc_dtype with float16/bfloat16 inputs, "
            f"but got {acc_dtype} acc_dtype and {dtype} inputs."
        )
    return ResolvedOptions(
        backend=backend,
        acc_policy=acc_policy,
        acc_dtype=acc_dtype,
        batch_chunk_size=max(1, rows),
        allow_retain_graph=options.allow_retain_graph,
        sparse_backward_eps=float(options.sparse_backward_eps),
        recompute_weight_grad=recompute,
    )
