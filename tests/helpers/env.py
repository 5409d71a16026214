"""Where the tests run: CUDA, Triton and its interpreter, PyTorch's own op; device parameters that skip where they
cannot run."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
# conftest sets TRITON_INTERPRET=1 without a GPU: the Triton backends' kernels then run in Triton's interpreter
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# found, not imported: the spawned workers of the multi-process tests import this module, most of them never triton
HAS_TRITON = importlib.util.find_spec("triton") is not None
# PyTorch >= 2.13 ships the op we are a drop-in for; older versions (e.g. the GPU machine's 2.11) do not.
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
HAS_TORCH_MODULE = hasattr(torch.nn, "LinearCrossEntropyLoss")
requires_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.13 has no F.linear_cross_entropy")

# "cpu" always, "cuda" only where a device exists (never hard-wired).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else [])

needs_interpreter = pytest.mark.skipif(not (INTERPRET and HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")

# a module of GPU-only tests: ``pytestmark = gpu_only`` (collected everywhere, skipped without CUDA)
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")]


def backend_devices(*backends: str) -> list:
    """``(backend, device)`` parameters, each marked and skipped where it cannot run: the chunked backend on the CPU
    and CUDA, the Triton backends in Triton's CPU interpreter (id ``fused-interpreter``; CI) and on CUDA."""
    params = []
    for backend in backends:
        if backend == "chunked":
            params.append(pytest.param(backend, "cpu", id="chunked-cpu"))
        else:
            marks = [pytest.mark.interpreter, needs_interpreter]
            params.append(pytest.param(backend, "cpu", marks=marks, id=f"{backend}-interpreter"))
        marks = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA, triton")]
        params.append(pytest.param(backend, "cuda", marks=marks, id=f"{backend}-cuda"))
    return params


WEIGHT_GRAD_PASSES = ("accumulate", "recompute")  # the fused backend's two ways (fixture force_weight_grad_pass)
