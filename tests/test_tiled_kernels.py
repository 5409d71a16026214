"""The tiled backend's own behaviour on the CPU, its Triton kernels under ``TRITON_INTERPRET=1`` (set by conftest
when no GPU): the accumulation policies, extras and metrics, repeated backward, strided views, the sparse backward,
TMA loads against pointer loads. What it shares with the fused backend (results against float64, drawn problems,
NaN) is in ``test_triton_backends.py``.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, needs_interpreter, reference_grads, rel_err, small_problem

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.backends.common import LossParams

pytestmark = [pytest.mark.interpreter, needs_interpreter]


def _tiled(x, w, y, b=None, policy="auto", **kw):
    options = LinearCrossEntropyOptions(backend="tiled", acc_policy=policy)
    return linear_cross_entropy(x, w, y, linear_bias=b, options=options, **kw)


@pytest.mark.parametrize("features", [18, 32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_extras_and_metrics_match_the_reference(reduction, features):
    x, w, b, y, _ = small_problem(29, features, 53, torch.float32, seed=7, bias=True)
    kw = dict(reduction=reduction, z_loss=1e-2, logit_scale=0.7, logit_softcap=3.0, return_metrics=True)
    upstream = torch.rand(29) + 0.5
    got = []
    for options, cast in [(LinearCrossEntropyOptions(backend="tiled"), torch.float32), (None, torch.float64)]:
        xs, ws, bs = (t.detach().to(cast).requires_grad_() for t in (x, w, b))
        out = linear_cross_entropy(xs, ws, y, linear_bias=bs, options=options, **kw)
        out.loss.backward(upstream.to(cast) if reduction == "none" else None)
        got.append([out.loss, xs.grad, ws.grad, bs.grad, *out.metrics])
    for i, (o, r) in enumerate(zip(*got)):
        assert rel_err(o, r) <= 1e-5, (i, rel_err(o, r))


def test_repeated_backward_and_no_grad():
    x, w, _, y, _ = small_problem(9, 20, 40, torch.float32, seed=2)
    x.requires_grad_()
    loss = _tiled(x, w, y)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # nothing is consumed: backward recomputes from O(N) row statistics
    torch.testing.assert_close(x.grad, 2 * first)
    with torch.no_grad():
        assert _tiled(x, w, y).grad_fn is None


def test_strided_views_need_no_copy():
    x, w, _, y, _ = small_problem(11, 40, 30, torch.float32, seed=3)
    xt = x.T.contiguous().T.requires_grad_()  # column-major
    wide = torch.zeros(w.shape[0], 2 * w.shape[1])
    wide[:, ::2] = w
    wv = wide[:, ::2].requires_grad_()  # every other column of a wider matrix
    loss = _tiled(xt, wv, y)
    loss.backward()
    ref = reference_grads(Case(x, w, y), upstream=torch.tensor(1.0))
    assert rel_err(loss, ref[0]) < 1e-6 and rel_err(xt.grad, ref[1]) < 1e-6 and rel_err(wv.grad, ref[2]) < 1e-6


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
    ref = reference_grads(Case(x, w, y, reduction="sum"), upstream=torch.tensor(1.0))
    assert rel_err(grads[0][0], ref[1]) < 1e-6 and rel_err(grads[0][1], ref[2]) < 1e-6  # eps = 0 is exact
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
    x, w, b, y, cw = small_problem(37, features, 75, torch.float16, seed=3, bias=True, class_weight=True)
    lp = LossParams("mean", -100, 0.2, False, logit_scale=0.8, logit_softcap=4.0, metrics=True)
    from linear_cross_entropy.backends.tiled.launch import partial_stats

    tma, pointers = (partial_stats(x, w, b, y, cw, lp, use_tma=use) for use in (True, False))
    assert torch.isfinite(pointers).all()
    assert torch.equal(tma, pointers)
