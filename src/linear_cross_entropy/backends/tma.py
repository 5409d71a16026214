"""Host-side TMA tensor descriptors for the Triton backends (the tiled kernels and the softmax-fused GEMMs).

A descriptor hands a kernel a 2-D tensor together with the block shape it loads and stores through the Hopper
copy engine: loads past the tensor's edge read zeros and stores past it are dropped, so those kernels need no masks.
"""

from __future__ import annotations

import torch

try:  # Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

__all__ = ["TensorDescriptor", "have_descriptors", "can_use_tma", "descriptor", "input_precision"]


def have_descriptors() -> bool:
    """Whether this Triton builds host-side tensor descriptors at all."""
    return TensorDescriptor is not None


def can_use_tma(*tensors: torch.Tensor) -> bool:
    """Whether 2-D operands can move through TMA tensor descriptors: a Hopper-or-newer GPU, 16-bit elements (fp32
    inputs keep smaller pointer-loaded tiles), unit feature stride, 16-byte aligned base and row stride (the copy
    engine's rules)."""
    if TensorDescriptor is None:
        return False
    for t in tensors:
        if not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9 or t.element_size() != 2:
            return False
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    """``t`` (2-D) as a descriptor of ``(block_rows, block_cols)`` blocks."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, block_cols])


def input_precision(dtype: torch.dtype) -> str:
    """fp32 operands go through TF32 only when the user allowed it for matmuls, as cuBLAS would."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
