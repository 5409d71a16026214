"""pytest's hooks and fixtures: the GPU skip, ``--force-factored`` (and its fixture twin), ``--without-gluon``,
the per-test seed, the fused weight-gradient pass, hypothesis' profiles. The helpers tests import (problem builder,
oracle, runner, tolerances) are in the package ``helpers``."""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined: without a GPU, the Triton backends' kernels run in its
    # interpreter (tests/test_triton_backends.py and the per-backend kernel tests). backend="auto" never picks them
    # on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import DEVICES, HAS_CUDA  # noqa: E402 (reads TRITON_INTERPRET)


def pytest_addoption(parser):
    parser.addoption(
        "--force-factored",
        action="store_true",
        help="run every fp32/bf16/fp64 fused call the factored row pass can take on it (CPU interpreter and CUDA, any "
        "hidden size): the whole suite as a check of that pass; only the tests of the default thresholds then fail",
    )
    parser.addoption(
        "--without-gluon",
        action="store_true",
        help="the factored row pass with its plain-Triton exponential GEMM on the GPU too, as with a Triton other than "
        "the Gluon kernel's (3.6): the GPU tests as a check of that fallback (the CPU runs it anyway)",
    )


def _forced_factored(thresholds, *dtypes: torch.dtype):
    """``thresholds`` with the factored row pass for fp32, bf16 and ``dtypes`` on the CPU (interpreter) and CUDA, at
    any hidden size."""
    return dataclasses.replace(
        thresholds,
        factored_dtypes=frozenset({torch.float32, torch.bfloat16, *dtypes}),
        factored_devices=frozenset({"cpu", "cuda"}),
        factored_max_features_triton=1 << 20,
        factored_max_features_gluon=1 << 20,
        factored_one_chunk=True,
    )


def pytest_configure(config):
    if config.getoption("--force-factored"):
        from linear_cross_entropy.backends.fused import policy

        policy.THRESHOLDS = _forced_factored(policy.THRESHOLDS, torch.float64)
    if config.getoption("--without-gluon"):
        from linear_cross_entropy.backends.fused import factored_gluon, policy

        factored_gluon.runs_on = lambda x: False
        t = policy.THRESHOLDS  # the plain-Triton GEMM takes every call the Gluon one would
        policy.THRESHOLDS = dataclasses.replace(t, factored_max_features_triton=t.factored_max_features_gluon)


@pytest.fixture
def force_factored(monkeypatch):
    """The factored pass for fp32 and bf16 on the CPU (interpreter) and CUDA, at any hidden size."""
    from linear_cross_entropy.backends.fused import policy

    monkeypatch.setattr(policy, "THRESHOLDS", _forced_factored(policy.THRESHOLDS))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip without CUDA."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def seed(request) -> int:
    """A fresh, reproducible seed per test (derived from the test id, parameters included)."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _global_seed(seed):
    """The global RNG is seeded per test too (module initialisation, ``torch.randn`` without a generator)."""
    torch.manual_seed(seed)


@pytest.fixture
def force_weight_grad_pass(monkeypatch):
    """A setter that forces one of the fused backend's two ways to the weight gradient of a chunked call, whatever
    the chunk size and dtype: ``"accumulate"`` (``grad_W += dzᵀ·x_c`` chunk by chunk) or ``"recompute"`` (the
    vocabulary-major pass, in blocks of 8 classes so that small test vocabularies span several blocks and a ragged
    last one)."""
    from linear_cross_entropy.backends.fused import policy

    def force(mode: str) -> None:
        if mode == "accumulate":
            thresholds = dataclasses.replace(policy.THRESHOLDS, gemm_flops_per_byte={})
        else:
            assert mode == "recompute", mode
            every = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            flops = dict.fromkeys(every, 1 << 40)
            thresholds = dataclasses.replace(policy.THRESHOLDS, gemm_flops_per_byte=flops, recompute_column_align=8)
        monkeypatch.setattr(policy, "THRESHOLDS", thresholds)

    return force


# --------------------------------------------------------------------------------------------------------------
# Hypothesis: deterministic by default (CI must be reproducible); HYPOTHESIS_PROFILE=explore for fresh examples.

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "default",
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    settings.register_profile(
        "explore",
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis-based tests skip themselves
    pass
