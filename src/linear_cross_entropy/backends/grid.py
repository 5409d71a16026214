"""Host-side integer helpers for launch grids and block sizes.

Plain Python on purpose: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions (also callable
inside kernels) whose host call unwraps every argument first, a few microseconds each, and a chunked fused call
makes about thirty of them (benchmarks/NOTES.md, "Host time of a factored call").
"""

from __future__ import annotations

import functools

import torch

__all__ = ["cdiv", "next_power_of_2", "sm_count"]


def cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉`` for ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``≥ n`` (1 for ``n ≤ 1``)."""
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (a persistent kernel's programs), read once a device."""
    return torch.cuda.get_device_properties(device).multi_processor_count
