"""Run one call on a backend: choose it (with the fallback warning), resolve the options on it, dispatch.

Between :mod:`.functional` (and :mod:`.log_probs`) above and the backends below: the one place that knows how a
backend is picked and called, eagerly or as the custom op under ``torch.compile`` / ``torch.func``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .backends import chunked, compiled, fused, support, tiled
from .backends.common import LossParams
from .options import LinearCrossEntropyOptions, ResolvedOptions, resolve

__all__ = [
    "choose_backend",
    "resolve_for",
    "run_backend",
    "per_position",
    "autocast_enabled",
    "under_functorch",
    "warn",
]


def run_backend(options, lp, shape, x, linear_weight, linear_bias, t, weight, shard=None):
    """Resolve the options on the chosen backend and run it: ``(loss, lse (N, K), stats)``."""
    backend = choose_backend(options, lp, shape, x)
    if shard is not None and backend not in ("fused", "chunked"):
        backend = "fused"  # vocabulary parallel: the fused path shards; it serves the same calls as the others
    # logits per input row: C·K (a K-dimensional loss's positions are rows of one GEMM on the chunked path);
    # vocabulary parallel: chunk sizes from the global V, so that every rank runs the same chunks (collectives)
    num_classes = shape.num_classes * shape.positions if shard is None else shard.num_classes
    ro = resolve_for(options, backend, shape, x, linear_weight, num_classes)
    if backend in ("fused", "tiled"):  # 2-D weight, index targets: the tensors go in as they are
        w, b, t = linear_weight, linear_bias, t[:, 0]
        run = fused.linear_cross_entropy_fused if backend == "fused" else tiled.linear_cross_entropy_tiled
    else:  # normalised to x (N, F), w (C, K, F), b (C, K), target (N, K) or (N, C, K)
        w, b = per_position(shape, linear_weight, linear_bias)
        run = chunked.linear_cross_entropy_chunked
    if torch.compiler.is_compiling() or under_functorch():
        # One opaque custom op with a fake kernel (backends/compiled.py). Under torch.func.vmap it runs once per
        # batch entry (functorch's fallback for ops without a batching rule); the autograd Functions could not run.
        return compiled.run(backend, x, w, b, t, weight, lp, ro)
    if shard is not None:
        return run(x, w, b, t, weight, lp, ro, shard)
    return run(x, w, b, t, weight, lp, ro)


def resolve_for(options, backend: str, shape, x, linear_weight, num_classes: int) -> ResolvedOptions:
    """The options resolved for this call on ``backend`` (``num_classes``: logits per input row)."""
    return resolve(
        options,
        backend=backend,
        num_rows=shape.num_rows,
        in_features=shape.in_features,
        num_classes=num_classes,
        dtype=x.dtype,
        device=x.device,
        weight_grad=torch.is_grad_enabled() and linear_weight.requires_grad,
    )


def per_position(shape, linear_weight, linear_bias):
    """``linear_weight`` as ``(C, K, F)`` and ``linear_bias`` as ``(C, K)``, K = prod(out_features) (views)."""
    k = shape.positions
    w = linear_weight.reshape(shape.num_classes, k, shape.in_features)
    return w, None if linear_bias is None else linear_bias.reshape(shape.num_classes, k)


def autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 without the device argument
        return device_type == "cuda" and torch.is_autocast_enabled()


def choose_backend(options: LinearCrossEntropyOptions, lp: LossParams, shape, x: torch.Tensor) -> str:
    """``"fused"`` for ``"auto"`` or ``"fused"``, ``"tiled"`` for ``"tiled"``, when it supports the call (both
    serve the same calls), else ``"chunked"``.

    An explicit ``backend="fused"``/``"tiled"`` that cannot serve the call warns once per call site with the reason.
    """
    if options.backend == "chunked":
        return "chunked"
    reason = support.unsupported_reason(x, lp, shape, explicit=options.backend in ("fused", "tiled"))
    if reason is None:
        return "fused" if options.backend == "auto" else options.backend
    if options.backend != "auto":
        warn(f"linear_cross_entropy: backend={options.backend!r} unsupported here ({reason}); using 'chunked'.")
    return "chunked"


def under_functorch() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__package__], torch))


def warn(message: str) -> None:
    """A UserWarning attributed to the user's line: the first caller outside this package and torch (module calls
    pass through torch.nn.Module's frames), so that the default filter shows it once per call site."""
    level, frame = 2, sys._getframe(1)  # level 2: warn's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
