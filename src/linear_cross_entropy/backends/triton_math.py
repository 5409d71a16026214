"""Triton helpers shared by the fused and tiled backends' kernels (``@triton.jit`` only; imports triton).

The logit transform every kernel applies to a raw logit ``r = x·wᵀ + b`` before the softmax: the logit scale
``a`` and the soft-cap ``c`` (Gemma 2), ``z = c·tanh(a·r / c)``, whose derivative ``a·(1 − tanh²)`` the kernels'
backward sweeps multiply into ``dz``.
"""

import triton
import triton.language as tl

__all__ = ["tanh_approx", "scale_softcap"]


@triton.jit
def tanh_approx(u):
    """tanh(u) = 1 − 2/(1 + e^{2u}): one exp and one approximate division (the row kernel is bandwidth-bound, so
    every instruction per logit shows). Saturates correctly at ±inf; near 0 its absolute error is ~1e-7, which the
    soft-cap c multiplies into an absolute logit error of ~c·1e-7."""
    return 1.0 - tl.fdiv(2.0, 1.0 + tl.exp(2.0 * u))


@triton.jit
def scale_softcap(
    raw,
    logit_scale,
    logit_softcap,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """``(z, t)``: z = c·tanh(a·r / c) (or a·r without capping) and t = tanh(a·r / c) for the chain rule."""
    z = raw
    if HAS_LOGIT_SCALE:
        z = z * logit_scale
    t = z
    if HAS_SOFTCAP:
        t = tanh_approx(z * (1.0 / logit_softcap))
        z = logit_softcap * t
    return z, t
