"""The tiled backend on a CUDA device: results against float64, no host syncs, CUDA-graph capture (NaN propagation:
test_fused_gpu, parametrised over both backends).

Yardsticks (helpers from test_fused_gpu): eager in the same dtype for every result that the tiled backend
accumulates in fp32 (the loss; grad_input with an fp32 accumulator; grad_weight with one). Where it accumulates
into the gradient itself (bf16/fp16 atomics: one rounding per logit tile), the yardstick is eager with that same
accumulation — its gradient summed tile by tile in the input dtype — so the bound still fails for a wrong kernel.
Atomics make the summation order vary: results are compared within tolerances, never bit for bit.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F
from test_fused_gpu import _eager, _ours, _problem, _rel, _run, assert_within_eager, sync_free_graph_run

from linear_cross_entropy import LinearCrossEntropyOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

_TILE = 128  # the GPU tile (launch.py): the accumulated yardsticks sum tile by tile


def _eager_tile_sums(x, w, b, y, **kw):
    """Eager's ``grad_input`` and ``grad_weight`` summed tile by tile (over classes / rows) in the input dtype."""
    logits = F.linear(x, w, b).float().requires_grad_()
    kw = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss = F.cross_entropy(logits, y, **kw)
    (dz,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
    dz = dz.to(x.dtype)
    gx = sum(dz[:, c : c + _TILE] @ w[c : c + _TILE] for c in range(0, w.shape[0], _TILE))
    gw = sum(dz[r : r + _TILE].T @ x[r : r + _TILE] for r in range(0, x.shape[0], _TILE))
    return gx, gw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 256, 4096), (1000, 192, 50257), (333, 72, 1000), (1, 128, 32000)])
@pytest.mark.parametrize("policy", ["auto", "balanced", "accurate"])
@pytest.mark.parametrize(
    "extras",
    [{}, {"label_smoothing": 0.1, "class_weight": True, "bias": True}, {"reduction": "sum"}, {"reduction": "none"}],
)
def test_matches_float64(dtype, shape, policy, extras):
    extras = dict(extras)
    x, w, b, y = _problem(*shape, dtype, seed=zlib.crc32(repr((shape, dtype)).encode()), bias=extras.pop("bias", False))
    if extras.pop("class_weight", False):
        extras["weight"] = torch.rand(shape[2], device="cuda").to(dtype)
    as64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in extras.items()}
    ref = _run(_eager, x.double(), w.double(), None if b is None else b.double(), y, **as64)
    eager = _run(_eager, x, w, b, y, **extras)
    acc = torch.float32 if policy != "auto" else None
    opts = LinearCrossEntropyOptions(backend="tiled", acc_policy=policy, acc_dtype=acc)
    ours = _run(_ours, x, w, b, y, options=opts, **extras)
    if dtype != torch.float32:
        gx, gw = _eager_tile_sums(x, w, b, y, **extras)
        if policy == "auto":
            eager[1] = gx
        if policy != "accurate":
            eager[2] = gw
    assert_within_eager(ours, eager, ref, dtype)


def test_no_host_sync_and_cuda_graph():
    opts = LinearCrossEntropyOptions(backend="tiled", acc_policy="balanced", acc_dtype=torch.float32)
    _, captured, fresh = sync_free_graph_run(opts)
    torch.testing.assert_close(captured[0], fresh[0])
    for got, want in zip(captured[1:], fresh[1:]):
        assert _rel(got, want) < 1e-2


def test_out_of_range_target_gives_nan_without_a_sync():
    x, w, _, y = _problem(64, 32, 300, torch.bfloat16, seed=3)
    y[5] = 300
    x.requires_grad_()
    loss = _ours(x, w, y, None, options=LinearCrossEntropyOptions(backend="tiled"))
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(x.grad[5]).all()
