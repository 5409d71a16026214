"""The tiled backend's Triton kernels on the CPU under ``TRITON_INTERPRET=1`` (set by conftest when no GPU).

Small, odd shapes against float64 (N and V not multiples of the 16-wide interpreter tiles, V below one tile; H
either a multiple of them, where the kernels load without masks, or not);
the tolerance is the error of plain PyTorch in the same dtype times a slack (helpers from test_fused_kernels).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fused_kernels import _plain, _problem, _rel, _run, check_against_float64, check_drawn_problem

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.backends.common import LossParams

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (CPU runs)"),
]
pytest.importorskip("triton")
from linear_cross_entropy.backends.tiled.launch import partial_stats  # noqa: E402 (needs triton)


def _tiled(x, w, y, b, policy="auto", **kw):
    options = LinearCrossEntropyOptions(backend="tiled", acc_policy=policy)
    return linear_cross_entropy(x, w, y, linear_bias=b, options=options, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 24, 75), (37, 32, 75), (6, 20, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "extras",
    [{}, {"bias": True}, {"class_weight": True, "label_smoothing": 0.3}, {"bias": True, "label_smoothing": 0.1}],
    ids=["plain", "bias", "weights+smoothing", "bias+smoothing"],
)
def test_tiled_matches_float64(dtype, shape, reduction, extras):
    check_against_float64(_tiled, dtype, shape, reduction, extras, seed=sum(shape))


@pytest.mark.parametrize("policy", ["compact", "balanced", "accurate"])
def test_accumulation_policies(policy):
    check_against_float64(_tiled, torch.float16, (37, 24, 75), "mean", {"bias": True}, seed=5, policy=policy)


@pytest.mark.parametrize("features", [18, 32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extras_and_metrics_match_the_reference(reduction, features):
    x, w, b, y, _ = _problem(29, features, 53, torch.float32, seed=7, bias=True, class_weight=False)
    kw = dict(reduction=reduction, z_loss=1e-2, logit_scale=0.7, logit_softcap=3.0, return_metrics=True)
    upstream = torch.rand(29) + 0.5
    got = []
    for options, cast in [(LinearCrossEntropyOptions(backend="tiled"), torch.float32), (None, torch.float64)]:
        xs, ws, bs = (t.detach().to(cast).requires_grad_() for t in (x, w, b))
        out = linear_cross_entropy(xs, ws, y, linear_bias=bs, options=options, **kw)
        out.loss.backward(upstream.to(cast) if reduction == "none" else None)
        got.append([out.loss, xs.grad, ws.grad, bs.grad, *out.metrics])
    for i, (o, r) in enumerate(zip(*got)):
        assert _rel(o, r) <= 1e-5, (i, _rel(o, r))


def test_repeated_backward_and_no_grad():
    x, w, _, y, _ = _problem(9, 20, 40, torch.float32, seed=2, bias=False, class_weight=False)
    x.requires_grad_()
    loss = _tiled(x, w, y, None)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # nothing is consumed: backward recomputes from O(N) row statistics
    torch.testing.assert_close(x.grad, 2 * first)
    with torch.no_grad():
        assert _tiled(x, w, y, None).grad_fn is None


def test_strided_views_need_no_copy():
    x, w, _, y, _ = _problem(11, 40, 30, torch.float32, seed=3, bias=False, class_weight=False)
    xt = x.T.contiguous().T.requires_grad_()  # column-major
    wide = torch.zeros(w.shape[0], 2 * w.shape[1])
    wide[:, ::2] = w
    wv = wide[:, ::2].requires_grad_()  # every other column of a wider matrix
    loss = _tiled(xt, wv, y, None)
    loss.backward()
    ref = _run(_plain, x.double(), w.double(), None, y, torch.ones(11))
    assert _rel(loss, ref[0]) < 1e-6 and _rel(xt.grad, ref[1]) < 1e-6 and _rel(wv.grad, ref[2]) < 1e-6


def test_sparse_backward_skips_tiles_within_its_bound():
    """Peaky logits (a trained head's regime): tiles whose probabilities are all below eps are skipped. The
    gradient change is bounded by the skipped entries, each below s·eps·(chain factor 1 here)."""
    g = torch.Generator().manual_seed(4)
    n, h, v = 32, 16, 96
    x = torch.randn(n, h, generator=g)
    y = torch.randint(0, 16, (n,), generator=g)  # targets in the first tile only
    w = torch.randn(v, h, generator=g) * 0.1
    w[:16] += 3.0 * torch.randn(16, h, generator=g)  # classes of the first tile dominate
    grads = []
    for eps in (0.0, 1e-2):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        options = LinearCrossEntropyOptions(backend="tiled", sparse_backward_eps=eps)
        linear_cross_entropy(xs, ws, y, options=options, reduction="sum").backward()
        grads.append((xs.grad, ws.grad))
    ref = _run(_plain, x.double(), w.double(), None, y, torch.ones(n), reduction="sum")
    assert _rel(grads[0][0], ref[1]) < 1e-6 and _rel(grads[0][1], ref[2]) < 1e-6  # eps = 0 is exact
    p = F.softmax(x.double() @ w.double().T, dim=1)
    skipped = torch.zeros_like(p, dtype=torch.bool)
    for r in range(0, n, 16):
        for c in range(0, v, 16):
            tile = p[r : r + 16, c : c + 16]
            holds = ((y[r : r + 16, None] >= c) & (y[r : r + 16, None] < c + 16)).any()
            skipped[r : r + 16, c : c + 16] = bool(tile.max() < 1e-2) and not bool(holds)
    assert skipped.any(), "the test's logits must leave tiles to skip"
    dz_skipped = torch.where(skipped, p, 0.0)
    for got, exact, other in ((grads[1][0], ref[1], w.double()), (grads[1][1], ref[2], x.double())):
        change = (got.double() - exact).norm()
        bound = (dz_skipped if other is w.double() else dz_skipped.T).norm() * torch.linalg.matrix_norm(other, 2)
        assert 0 < change <= bound * 1.01 + 1e-6, (change, bound)


def test_sparse_backward_eps_is_validated():
    with pytest.raises(ValueError, match="sparse_backward_eps"):
        LinearCrossEntropyOptions(backend="fused", sparse_backward_eps=1e-3)
    with pytest.raises(ValueError, match="sparse_backward_eps"):
        LinearCrossEntropyOptions(backend="tiled", sparse_backward_eps=-1.0)


@pytest.mark.parametrize("features", [24, 32])
def test_tma_forward_matches_pointer_forward(features):
    """The forward's TMA loads (the GPU default for 16-bit operands, never picked on the CPU) zero-fill past N, V and
    H where the pointer loads clamp and mask: every per-split statistic must come out bit-equal."""
    x, w, b, y, cw = _problem(37, features, 75, torch.float16, seed=3, bias=True, class_weight=True)
    lp = LossParams("mean", -100, 0.2, False, logit_scale=0.8, logit_softcap=4.0, metrics=True)
    tma, pointers = (partial_stats(x, w, b, y, cw, lp, use_tma=use) for use in (True, False))
    assert torch.isfinite(pointers).all()
    assert torch.equal(tma, pointers)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tiled_matches_the_reference_on_drawn_problems(data):
    check_drawn_problem("tiled", data)
