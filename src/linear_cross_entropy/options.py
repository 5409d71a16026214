"""``LinearCrossEntropyOptions``: the fields, their validation, and the one place that resolves them.

PyTorch 2.13's five fields keep PyTorch's validation messages and resolution rules; ``backend`` is ours.
:func:`resolve` turns an options instance plus the shapes of one call into a :class:`ResolvedOptions`
(no ``"auto"`` and no ``None`` left), which is all a backend ever sees.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch

from .backends.common import ResolvedOptions
from .backends.fused.policy import memory_chunk_rows, recomputes_weight_grad
from .backends.grid import cdiv, next_power_of_2

__all__ = ["LinearCrossEntropyOptions", "ResolvedOptions", "resolve", "materializes"]

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
#   accuracy); the fused backend sizes its chunks itself ("memory", ``backends.fused.policy.fused_chunk_rows``):
#   one chunk where all the logits fit in the size of that scratch, else chunks of a quarter of the rows or of the
#   scratch's size, whichever is longer.
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
      logits (:func:`.backends.fused.policy.fused_recomputes_weight_grad`) get it from a vocabulary-major pass
      instead: eager's accuracy under every ``acc_policy``, no scratch, the same buffer size.
    - ``chunking_method``: ``"auto"``, ``None`` or ``"aspect_ratio[:k]"`` (chunk rows
      ``min(next_pow2(ceil(N / ceil(C / F))) // k, N)``).
    - ``acc_policy``: ``"accurate"`` (everything in ``acc_dtype``), ``"balanced"`` (GEMMs in the input dtype,
      softmax and an ``(C, F)`` weight-gradient scratch in ``acc_dtype``), ``"compact"`` (no scratch: the weight
      gradient accumulates chunk by chunk into the input-dtype gradient) or ``"auto"``.
    - ``acc_dtype``: ``None`` (fp32 for fp16/bf16 inputs under ``acc_policy="auto"``, else the input dtype) or one
      of fp16, bf16, fp32, fp64.

    Ours: ``backend`` is ``"auto"`` (the fused GPU path when it supports the call, else the chunked path; on the
    CPU, a call small enough that chunking costs more than it saves runs PyTorch's own computation when every
    other field is left at its default, see :func:`materializes`),
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
    target = cdiv(num_rows, cdiv(num_classes, in_features))
    return min(next_power_of_2(target) // factor, num_rows)


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


# CPU calls with default options whose logits are no more than this many elements (keyed by the input's element
# size) run PyTorch's own computation instead of the chunked backend: F.linear, then F.cross_entropy in the input's
# dtype, the logits materialised. Below these sizes the chunked backend's fixed cost (~0.5 ms of validation,
# resolution and ~40 more small ATen calls) and, for 16-bit input, its softmax in fp32 (an upcast copy, a second
# exp pass and a copy back, against PyTorch's bf16 log-softmax and its backward) outweigh what its fewer passes
# save. Measured on the 2-core CI machine, bf16, chunked ÷ reference, idle / one core busy (benchmarks/NOTES.md,
# "issue 21, fourth pass"): 4M logits 1.12 / 1.26, 8M 1.16 / 1.35, 16M 1.02 / 1.08, 32M 1.01 / 0.98, 49M 0.95 /
# 0.93; fp32 near 2M (1M: 6.5–7.0 vs 7.3–7.8 ms; 2M: 12.9 vs 12.3 ms). Peak memory stays below PyTorch 2.13's
# chunked path (bf16 at 32M logits: +193 MB against its +357 MB; fp32 at 1M logits: ~12 MB, against the ~108 MB
# its path takes already at 64×32×1000).
_MATERIALIZE_MAX_LOGITS = {2: 1 << 25, 4: 1 << 20, 8: 1 << 20}


def materializes(
    options: LinearCrossEntropyOptions, *, num_logits: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether a call with ``num_logits`` logits in total runs PyTorch's own computation (the logits materialised,
    the softmax in the input's dtype: the results of ``cross_entropy(linear(...))`` bit for bit) instead of the
    chunked backend: on the CPU, with every field that picks a backend, chunks, accumulation or the loss's dtype
    left at ``"auto"``/None, and logits no more than :data:`_MATERIALIZE_MAX_LOGITS`. An explicit
    ``backend="chunked"``, ``batch_chunk_size``, ``chunking_method``, ``acc_policy``, ``acc_dtype`` or a
    ``loss_dtype`` other than the input's always runs the chunked backend (softmax in at least fp32)."""
    defaults = (
        options.backend == "auto"
        and options.batch_chunk_size is None
        and options.chunking_method == "auto"
        and options.acc_policy == "auto"
        and options.acc_dtype is None
        and options.loss_dtype in (None, dtype)
    )
    return defaults and device.type == "cpu" and num_logits <= _MATERIALIZE_MAX_LOGITS.get(dtype.itemsize, 0)


def _auto_choices(options: LinearCrossEntropyOptions, backend: str, device: torch.device, dtype: torch.dtype):
    """``(acc_policy, chunking_method)`` with ``"auto"`` replaced by the backend's pick (an explicit
    ``batch_chunk_size`` turns an ``"auto"`` chunking method into None: no automatic chunking)."""
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
    return acc_policy, chunking_method


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
    acc_policy, chunking_method = _auto_choices(options, backend, device, dtype)
    if options.acc_dtype is not None:
        acc_dtype = options.acc_dtype
    else:
        auto_acc = _auto_acc_dtype(dtype, device) if options.acc_policy == "auto" else None
        acc_dtype = auto_acc if auto_acc is not None else dtype

    rows = num_rows if options.batch_chunk_size is None else min(options.batch_chunk_size, num_rows)
    if chunking_method == "memory":
        rows = memory_chunk_rows(num_rows, in_features, acc_policy, acc_dtype, dtype, weight_grad)
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
    recompute = (
        backend == "fused" and weight_grad and recomputes_weight_grad(rows, num_rows, acc_policy, acc_dtype, dtype)
    )

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
