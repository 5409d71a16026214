"""Shared helpers: input builders, the float64 oracle, forward+backward runner, error metric, device list.

The oracle is PyTorch itself — ``F.cross_entropy(F.linear(...))`` on float64 copies of the inputs — never this
package, so every path of ours is checked against something it does not share code with.

Shapes (``N`` rows, ``F`` in_features, ``C`` classes, ``out_features = (d1, ..., dK)``):
``input`` ``(N, F)`` or ``(F,)``; ``linear_weight`` ``(C, *out_features, F)``; ``linear_bias`` ``(C, *out_features)``;
index ``target`` ``(N, *out_features)`` / ``()``; probability ``target`` ``(N, C, *out_features)`` / ``(C,)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads this when a kernel is defined: without a GPU, the fused backend's kernels run in its
    # interpreter (tests/test_fused_kernels.py). backend="auto" never picks them on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# PyTorch >= 2.13 ships the op we are a drop-in for; older versions (e.g. the GPU machine's 2.11) do not.
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
HAS_TORCH_MODULE = hasattr(torch.nn, "LinearCrossEntropyLoss")

# "cpu" always, "cuda" only where a device exists (never hard-wired).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else [])

requires_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.13 has no F.linear_cross_entropy")


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


WEIGHT_GRAD_PASSES = ("accumulate", "recompute")


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
# Inputs


@dataclasses.dataclass
class Case:
    """One call's tensors and loss settings (tensors are leaves without ``requires_grad``)."""

    input: torch.Tensor  # (N, F) or (F,)
    linear_weight: torch.Tensor  # (C, *out_features, F)
    target: torch.Tensor  # (N, *out_features) int64, or (N, C, *out_features) probabilities
    linear_bias: torch.Tensor | None = None  # (C, *out_features)
    weight: torch.Tensor | None = None  # (C,)
    reduction: str = "mean"
    ignore_index: int | None = None
    label_smoothing: float = 0.0

    def kwargs(self) -> dict:
        return dict(
            linear_bias=self.linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    def to(self, dtype: torch.dtype) -> Case:
        """The same case with floating tensors (input, weights, bias, class weights, probabilities) cast."""

        def cast(t):
            return None if t is None or not t.is_floating_point() else t.to(dtype)

        return dataclasses.replace(
            self,
            input=cast(self.input),
            linear_weight=cast(self.linear_weight),
            linear_bias=cast(self.linear_bias),
            weight=cast(self.weight),
            target=cast(self.target) if self.target.is_floating_point() else self.target,
        )


def noncontiguous(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another layout: ``"transposed"`` (storage of the reversed dims, viewed back: dense but
    not contiguous) or ``"strided"`` (every other element of a twice-as-long last dimension)."""
    if layout == "contiguous" or t.dim() == 0:
        return t
    if layout == "transposed":
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    if layout == "strided":
        return torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]
    raise ValueError(layout)


def make_case(
    n: int | None,  # None: unbatched (F,) input
    f: int,
    c: int,
    out_features: tuple[int, ...] = (),
    *,
    probs: bool = False,
    bias: bool = False,
    class_weight: bool = False,
    ignore_index: int | None = None,
    ignore_frac: float = 0.25,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    layout: str = "contiguous",
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    scale: float = 1.0,
) -> Case:
    """Random, never-zero inputs from a private generator (independent of the global seed).

    Index targets have about ``ignore_frac`` of their positions set to the effective ignore index (-100 when
    ``ignore_index`` is None); probability targets are random softmaxes.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = () if n is None else (n,)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    x = randn(*batch, f) * scale  # (N, F)
    w = randn(c, *out_features, f) / math.sqrt(f)  # (C, *out_features, F)
    b = randn(c, *out_features) if bias else None  # (C, *out_features)
    cw = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5 if class_weight else None  # (C,)
    if probs:
        t = randn(*batch, c, *out_features).mul(2).softmax(dim=len(batch))  # (N, C, *out_features)
    else:
        t = torch.randint(0, c, (*batch, *out_features), generator=gen)  # (N, *out_features)
        ignored = torch.rand(t.shape, generator=gen) < ignore_frac
        t = torch.where(ignored, -100 if ignore_index is None else ignore_index, t)
    tensors = [x, w, t, b, cw]
    tensors = [
        None if v is None else v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for v in tensors
    ]
    tensors = [None if v is None else noncontiguous(v, layout) for v in tensors]
    return Case(
        input=tensors[0],
        linear_weight=tensors[1],
        target=tensors[2],
        linear_bias=tensors[3],
        weight=tensors[4],
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


# --------------------------------------------------------------------------------------------------------------
# Oracle and runner


def oracle_loss(
    input,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
):
    """PyTorch's own ``cross_entropy(linear(...))`` with the logits reshaped to ``(N, C, *out_features)``."""
    c, out_features, f = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    flat = math.prod(out_features, start=c)
    bias = None if linear_bias is None else linear_bias.reshape(flat)
    logits = F.linear(input, linear_weight.reshape(flat, f), bias)  # (N, C·K) or (C,)
    logits = logits.reshape(*input.shape[:-1], c, *out_features)  # (N, C, *out_features)
    return F.cross_entropy(
        logits,
        target,
        weight=weight,
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing,
    )


def upstream_grad(loss: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    """A random, never-small upstream gradient shaped like ``loss`` (same values for equal seeds and shapes).

    The values are rounded to bfloat16, hence exact in every floating dtype: the float64 oracle and a
    low-precision run see the very same upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.randint(0, 2, loss.shape, generator=gen).to(torch.float64) * 2 - 1
    values = (mag * sign).to(torch.bfloat16)
    return values.to(device=loss.device, dtype=loss.dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with ``requires_grad`` holding ``t``'s values in ``t``'s strides (non-contiguity kept)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t.detach()).requires_grad_(True)


def forward_backward(fn, case: Case, *, grad_seed: int = 1234, **extra):
    """Run ``fn(input, linear_weight, target, **case.kwargs(), **extra)`` and backward with a random upstream
    gradient. Returns ``(loss, grad_input, grad_weight, grad_bias)``, all detached (grad_bias None without bias)."""
    x = leaf(case.input)
    w = leaf(case.linear_weight)
    b = None if case.linear_bias is None else leaf(case.linear_bias)
    kwargs = case.kwargs()
    kwargs["linear_bias"] = b
    loss = fn(x, w, case.target, **kwargs, **extra)
    loss.backward(upstream_grad(loss, grad_seed))
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def reference_grads(case: Case, *, grad_seed: int = 1234):
    """The float64 oracle: ``F.cross_entropy(F.linear(...))`` on float64 copies of ``case``; returns
    ``(loss, grad_input, grad_weight, grad_bias)`` in float64."""
    return forward_backward(oracle_loss, case.to(torch.float64), grad_seed=grad_seed)


def rel_err(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """Relative L2 error ``‖actual − expected‖ / ‖expected‖`` in float64 (absolute when ``expected`` is 0).

    NaNs must sit at the same positions in both (else ``inf``); they are excluded from the norm. Shapes must match.
    """
    if actual is None or expected is None:
        assert actual is None and expected is None, "one of the tensors is None"
        return 0.0
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        return math.inf
    a, e = a[~nan_a], e[~nan_e]
    if not (a.isfinite().all() and e.isfinite().all()):
        return 0.0 if torch.equal(a, e) else math.inf
    num = (a - e).norm().item()
    den = e.norm().item()
    return num / den if den > 0 else num


def assert_results_close(actual, expected, tol: float, what: str = ""):
    """``actual``/``expected`` are ``(loss, grad_input, grad_weight, grad_bias)`` tuples; each within ``tol``."""
    for name, a, e in zip(("loss", "grad_input", "grad_weight", "grad_bias"), actual, expected):
        err = rel_err(a, e)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol:.3g}"


def assert_identical(actual, expected, what: str = ""):
    """Bitwise equality of result tuples (NaN == NaN)."""
    for name, a, e in zip(("loss", "grad_input", "grad_weight", "grad_bias"), actual, expected):
        if a is None or e is None:
            assert a is None and e is None, f"{what} {name}: one is None"
            continue
        # CUDA's cross_entropy reductions (atomics in the K-dimensional and weighted kernels) are not
        # run-to-run deterministic: two identical calls may differ in the last bits there.
        tol = 0 if a.device.type == "cpu" else 1e-12
        torch.testing.assert_close(
            a, e, rtol=tol, atol=tol, equal_nan=True, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


# --------------------------------------------------------------------------------------------------------------
# Multi-process tests (gloo on the CPU)


def free_port() -> int:
    """A TCP port on localhost that is free now (for ``init_process_group``'s ``tcp://`` rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(body, world: int, args: tuple, out_dir, limit_s: float) -> None:
    """Run ``body(rank, world, *args, errors)`` in ``world`` spawned processes joined in a gloo process group.

    ``body`` appends the mismatches it finds to ``errors`` (a list of strings) instead of raising at the first, so
    that no rank leaves the others waiting in a collective; an exception is recorded too. Each rank writes its list
    to ``out_dir/rank{rank}.txt``. Fails the test on any entry, or when the processes still run after ``limit_s``
    seconds (a hang; the process group's own timeout is 60 s), terminating them."""
    import pathlib
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(_rank_main, args=(body, world, free_port(), args, str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{world} worker processes still running after {limit_s} s (hang?)")
    reports = [(pathlib.Path(out_dir) / f"rank{r}.txt").read_text() for r in range(world)]
    failures = [f"rank {r}:\n{text}" for r, text in enumerate(reports) if text]
    assert not failures, "\n\n".join(failures)


def _rank_main(rank, body, world, port, args, out_dir):
    import datetime
    import traceback

    import torch.distributed as dist

    errors = []
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        body(rank, world, *args, errors)
    except Exception:  # noqa: BLE001
        errors.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(errors))
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Hypothesis: deterministic by default (CI must be reproducible); HYPOTHESIS_PROFILE=explore for fresh examples.

try:
    import os

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


def assert_signature_extends(ours, theirs, extras: dict) -> None:
    """PyTorch's parameters first, in order, kinds and defaults; ours after them, keyword-only, with ``extras``
    (name → default, the value that switches the addition off)."""
    import inspect

    ours, theirs = inspect.signature(ours), inspect.signature(theirs)
    assert list(ours.parameters) == list(theirs.parameters) + list(extras)
    for name, default in extras.items():
        assert ours.parameters[name].kind == inspect.Parameter.KEYWORD_ONLY, name
        assert ours.parameters[name].default == default, name
    for name, q in theirs.parameters.items():
        assert ours.parameters[name].kind == q.kind, name
        assert ours.parameters[name].default == q.default, name
