"""Which calls the Triton backends (fused and tiled: they serve the same calls) can run, without importing triton."""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_available", "unsupported_reason"]


# Looked up once (without importing triton): a lookup per call would take importlib's locks inside compiled code.
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(x: torch.Tensor, lp, shape, *, explicit: bool) -> str | None:
    """Why the fused and tiled backends cannot serve this call, or None when they can.

    On the CPU it runs only when asked for explicitly under ``TRITON_INTERPRET=1`` (the kernels' CPU tests).
    """
    if not triton_available():
        return "triton is not installed"
    if x.device.type != "cuda" and not (explicit and _interpreting() and x.device.type == "cpu"):
        return f"device {x.device.type!r} (needs CUDA)"
    if shape.target_is_probs:
        return "class-probability targets"
    if shape.out_features:
        return "K-dimensional loss"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype}"
    return None
