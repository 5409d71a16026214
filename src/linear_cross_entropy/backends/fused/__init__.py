"""The fused GPU backend: cuBLAS GEMMs with the cross-entropy arithmetic in Triton kernels between them.

``triton`` is an optional dependency: nothing here imports it until the backend runs.
"""

from __future__ import annotations

import torch

from ..support import triton_available, unsupported_reason

__all__ = ["linear_cross_entropy_fused", "unsupported_reason", "triton_available"]  # the latter two: see ..support


def linear_cross_entropy_fused(*args, **kwargs) -> torch.Tensor:
    """See :func:`.function.linear_cross_entropy_fused` (imported on first use: it needs triton)."""
    from .function import linear_cross_entropy_fused as run

    return run(*args, **kwargs)
