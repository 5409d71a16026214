"""The tiled (memory-minimal) backend: Triton kernels that never hold more than a tile of logits.

``backend="tiled"`` in :class:`~linear_cross_entropy.LinearCrossEntropyOptions`. The forward keeps ``O(N)`` row
statistics; the backward recomputes each ``(128, 128)`` logit tile and adds its share of both gradients with
atomics. It serves the calls the fused backend serves (see :func:`..support.unsupported_reason`); ``triton`` is
imported only when it runs.
"""

from __future__ import annotations

__all__ = ["linear_cross_entropy_tiled"]


def linear_cross_entropy_tiled(*args, **kwargs):
    """See :func:`.function.linear_cross_entropy_tiled` (imported on first use: it needs triton)."""
    from .function import linear_cross_entropy_tiled as run

    return run(*args, **kwargs)
