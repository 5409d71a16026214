"""What the two Triton backends (``fused``, ``tiled``) share, tested on both, in Triton's CPU interpreter (CI, set by
conftest without a GPU) and on CUDA: results against float64 within plain PyTorch's error in the same dtype
(``helpers.assert_within_plain``), every loss option drawn by hypothesis, NaN and out-of-range targets,
all-ignored batches. Each backend's own behaviour is in ``test_fused_kernels.py`` / ``test_tiled_kernels.py`` (CPU)
and ``test_fused_gpu.py`` / ``test_triton_gpu.py`` (large GPU problems).

Interpreter shapes are small and odd: V not a multiple of the 16-wide tiles nor of 8 (the fused GEMMs' vocabulary
split), V below one tile, H a multiple of the tiles (loads without masks) or not, one chunk (the fused deferred
backward) and several.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_within_plain,
    backend_devices,
    forward_backward,
    make_case,
    needs_interpreter,
    plain_loss,
    reference_grads,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

TRITON = ("fused", "tiled")

# (backend, options, shape) of the float64 grid: the fused backend in one chunk and in chunks of 5 with either
# weight-gradient pass (one chunk has a single weight-gradient GEMM either way); the tiled backend's shapes straddle
# its 16-wide tiles.
GRID = [
    pytest.param("fused", dict(rows=rows, weight_grad_pass=wgp), shape, id=f"fused-{name}-{'x'.join(map(str, shape))}")
    for rows, wgp, name in [
        (None, "accumulate", "one-chunk"),
        (5, "accumulate", "chunks-of-5"),
        (5, "recompute", "chunks-of-5-recompute"),
    ]
    for shape in [(13, 8, 203), (6, 4, 9)]
] + [
    pytest.param("tiled", {}, shape, id=f"tiled-{'x'.join(map(str, shape))}")
    for shape in [(37, 24, 75), (37, 32, 75), (6, 20, 9)]
]
EXTRAS = {
    "plain": {},
    "bias": {"bias": True},
    "weights+smoothing": {"class_weight": True, "label_smoothing": 0.3},
    "bias+smoothing": {"bias": True, "label_smoothing": 0.1},
}


def triton_options(backend, rows=None, policy="auto"):
    """The options of one configuration: the fused backend's chunk rows, the tiled backend's policy."""
    if backend == "fused":
        return LinearCrossEntropyOptions(backend="fused", batch_chunk_size=rows, chunking_method=None)
    return LinearCrossEntropyOptions(backend="tiled", acc_policy=policy)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("backend,config,shape", GRID)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extras", EXTRAS.values(), ids=EXTRAS.keys())
def test_matches_float64(backend, config, shape, dtype, reduction, extras, force_weight_grad_pass):
    config = dict(config)
    if "weight_grad_pass" in config:
        force_weight_grad_pass(config.pop("weight_grad_pass"))
    check_against_float64(
        backend, dtype, shape, reduction, extras, seed=sum(shape) + (config.get("rows") or 0), **config
    )


def check_against_float64(backend, dtype, shape, reduction, extras, seed, **config):
    """Loss and gradients of the backend in ``dtype`` against float64, as :func:`helpers.assert_within_plain`; the
    yardstick is plain PyTorch (logits in ``dtype``, softmax in fp32). ``extras`` may ask for a bias, class weights
    and smoothing."""
    case = make_case(*shape, reduction=reduction, dtype=dtype, seed=seed, scale=2.0, ignore_frac=0.2, **extras)
    # Per-row upstream gradients for "none"; g = 1/3 for the scalar reductions (gradient accumulation over three
    # micro-batches): not a power of two, so a gradient rounded before it is scaled by g and again after would
    # show here, where that second rounding is the whole error at these tiny H (2.5x plain's in fp16).
    g = torch.Generator().manual_seed(seed)
    upstream = torch.rand(shape[0], generator=g) + 0.5 if reduction == "none" else torch.tensor(1 / 3)
    ref = reference_grads(case, upstream=upstream.double())
    plain = forward_backward(plain_loss, case, upstream=upstream)
    ours = forward_backward(linear_cross_entropy, case, upstream=upstream, options=triton_options(backend, **config))
    assert_within_plain(ours, plain, ref, dtype)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("policy", ["compact", "balanced", "accurate"])
def test_tiled_accumulation_policies(policy):
    check_against_float64("tiled", torch.float16, (37, 24, 75), "mean", {"bias": True}, seed=5, policy=policy)


# --------------------------------------------------------------------------------------------------------------
# Every loss option, drawn

DRAWN = {  # per device: the largest (N, H, V) and the dtypes (the interpreter's tl.dot is broken in bf16)
    "cpu": ((11, 9, 37), (torch.float32, torch.float16)),
    "cuda": ((300, 160, 3000), (torch.float32, torch.float16, torch.bfloat16)),
}


@st.composite
def drawn_problems(draw, backend, device):
    """A problem of at most ``DRAWN[device]``'s sizes with any mix of the loss options, run through a Triton
    backend in some chunking and policy: ``(dtype, case, extras, options, upstream)``. The tiled backend's default
    adds every tile's share into 16-bit gradients (one more rounding per tile, by design: cut-cross-entropy's
    error); in 16 bits it is drawn with fp32 accumulators."""
    sizes, dtypes = DRAWN[device]
    n, h, v = draw(st.integers(1, sizes[0])), draw(st.integers(1, sizes[1])), draw(st.integers(2, sizes[2]))
    dtype = draw(st.sampled_from(dtypes))
    ignore_index = draw(st.sampled_from([-100, 0, v - 1]))
    case = make_case(
        n,
        h,
        v,
        bias=draw(st.booleans()),
        class_weight=draw(st.booleans()),
        ignore_index=ignore_index,
        ignore_frac=0.2,
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.7])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        dtype=dtype,
        device=device,
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=2.0,
    )
    case.target[0] = (ignore_index + 1) % v  # the first row counts: a mean over no row is NaN (tested below)
    extras = dict(
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        logit_scale=draw(st.sampled_from([1.0, 0.7])),
        logit_softcap=draw(st.sampled_from([None, 2.5])),
    )
    policy, acc_dtype = draw(st.sampled_from(["auto", "balanced", "compact", "accurate"])), None
    if backend == "tiled" and dtype != torch.float32:
        policy, acc_dtype = draw(st.sampled_from(["balanced", "accurate"])), torch.float32
    options = LinearCrossEntropyOptions(
        backend=backend,
        batch_chunk_size=draw(st.one_of(st.none(), st.integers(1, n + 1))),
        chunking_method=None,
        acc_policy=policy,
        acc_dtype=acc_dtype,
        allow_retain_graph=draw(st.booleans()),
    )
    if case.reduction == "none":
        upstream = torch.rand(n, generator=torch.Generator().manual_seed(n + h + v)) + 0.5
    else:
        upstream = torch.tensor(draw(st.sampled_from([1.0, 1 / 3])))
    return dtype, case, extras, options, upstream.to(device)


def summed_terms(case, upstream, z_loss, logit_scale, logit_softcap):
    """Per result, a float64 bound on the sum of its terms' magnitudes before they cancel: with ``s_i`` a row's
    share of the loss (upstream gradient, class weight, mean's divisor), ``dz = s·(p − t)`` (soft-cap and scale
    scale it by at most ``max(a, 1)``, the z-loss its ``p`` part by ``1 + 2λ|lse|``) has terms of magnitude
    ``m = s·(p·(1 + 2λ|lse|) + [c = y] + ε)``; the gradients sum ``m·|W|`` (grad_input), ``mᵀ·|x|`` (grad_weight)
    and ``Σ_rows m`` (grad_bias). A sum's rounding error scales with these, not with the sum: where ``p_y ≈ 1`` or
    terms of both signs cancel, a plain computation that happened to round well is no yardstick on its own."""
    c64 = case.to(torch.float64)
    x, w, y = c64.input, c64.linear_weight, case.target
    z = F.linear(x, w, c64.linear_bias) * logit_scale
    if logit_softcap:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    keep = y != (-100 if case.ignore_index is None else case.ignore_index)
    y_safe = torch.where(keep, y, 0)
    cw = torch.ones(w.shape[0], dtype=torch.float64, device=w.device) if c64.weight is None else c64.weight
    share = torch.where(keep, cw[y_safe], 0.0) * upstream.double().abs()
    if case.reduction == "mean":
        share = share / torch.where(keep, cw[y_safe], 0.0).sum()
    m = torch.exp(z - lse) * (1 + 2 * z_loss * lse.abs()) + case.label_smoothing
    m = m + F.one_hot(y_safe, w.shape[0]).double()
    m = m * (share * max(logit_scale, 1.0))[:, None]
    return [None, m @ w.abs(), m.T @ x.abs(), m.sum(dim=0)]


@pytest.mark.parametrize("backend,device", backend_devices(*TRITON))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_the_reference_on_drawn_problems(backend, device, data):
    """Every combination of the options the Triton backends serve (z-loss, logit scale and soft-cap, smoothing,
    class weights, ignore_index, bias, reductions, chunking, policies, upstream gradients), drawn by hypothesis,
    against the reference path in float64: within the reference path's own error in the same dtype, as
    :func:`helpers.assert_within_plain`, plus a few roundings of each gradient's summed terms (tiny shapes cancel:
    V = 2, H = 1, p_y ≈ 1). A 0.05% error in dz fails it."""
    dtype, case, extras, options, upstream = data.draw(drawn_problems(backend, device))
    ref = forward_backward(linear_cross_entropy, case.to(torch.float64), upstream=upstream.double(), **extras)
    plain = forward_backward(linear_cross_entropy, case, upstream=upstream, **extras)
    ours = forward_backward(linear_cross_entropy, case, upstream=upstream, options=options, **extras)
    assert_within_plain(ours, plain, ref, dtype, summed_terms=summed_terms(case, upstream, **extras))


# --------------------------------------------------------------------------------------------------------------
# NaN and edge cases, without a host sync: the CPU interpreter's problems are small, CUDA's take the TMA loads

SMALL = {"cpu": ((13, 8, 37), torch.float32), "cuda": ((64, 32, 300), torch.bfloat16)}


def small_case(device, shape=None, **kw):
    (n, h, v), dtype = SMALL[device]
    return make_case(*(shape or (n, h, v)), dtype=dtype, device=device, scale=2.0, **kw)


@pytest.mark.parametrize("backend,device", backend_devices(*TRITON))
@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_reaches_the_loss(backend, device, where):
    case = small_case(device, shape=(256, 64, 3000) if device == "cuda" else None, seed=2, ignore_frac=0.05)
    (case.input if where == "input" else case.linear_weight)[3, 5] = float("nan")
    loss = linear_cross_entropy(
        case.input, case.linear_weight, case.target, options=LinearCrossEntropyOptions(backend=backend)
    )
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend,device", backend_devices("chunked", *TRITON))
def test_out_of_range_target_is_nan(backend, device, monkeypatch):
    """Off the CPU a range check would be a host-device sync: the backends mark such a row NaN instead (its loss and
    its input gradient), leaving the others as they are. On the CPU the marking serves targets that cannot be read
    (vmap, subclasses); it is forced here by declaring the target unreadable."""
    from linear_cross_entropy import validate

    monkeypatch.setattr(validate, "_holds_values", lambda target: False)
    case = small_case(device, seed=3, ignore_frac=0.0)
    bad = 5
    case.target[bad] = case.linear_weight.shape[0]
    options = LinearCrossEntropyOptions(backend=backend)
    losses = linear_cross_entropy(case.input, case.linear_weight, case.target, reduction="none", options=options)
    assert losses[bad].isnan() and not losses[torch.arange(len(losses)) != bad].isnan().any()
    x = case.input.clone().requires_grad_()
    loss = linear_cross_entropy(x, case.linear_weight, case.target, options=options)
    loss.backward()
    assert loss.isnan() and x.grad[bad].isnan().all()
    assert x.grad[torch.arange(len(x)) != bad].isfinite().all()


@pytest.mark.parametrize("backend,device", backend_devices(*TRITON))
def test_all_ignored_mean_is_nan_with_zero_gradients(backend, device):
    case = small_case(device, seed=0, ignore_frac=1.0)
    x, w = case.input.clone().requires_grad_(), case.linear_weight.clone().requires_grad_()
    options = LinearCrossEntropyOptions(backend=backend, batch_chunk_size=3)
    loss = linear_cross_entropy(x, w, case.target, options=options)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0
