"""The fused GPU backend: cuBLAS GEMMs with the cross-entropy arithmetic in Triton kernels between them."""

from __future__ import annotations

import os

import torch

from .function import linear_cross_entropy_fused

__all__ = ["linear_cross_entropy_fused", "unsupported_reason", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(x: torch.Tensor, lp, shape) -> str | None:
    """Why the fused backend cannot serve this call, or None when it can."""
    if not triton_available():
        return "triton is not installed"
    if x.device.type != "cuda" and not (_interpreting() and x.device.type == "cpu"):
        return f"device {x.device.type!r} (needs CUDA)"
    if shape.target_is_probs:
        return "class-probability targets"
    if shape.out_features:
        return "K-dimensional loss"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype}"
    return None
