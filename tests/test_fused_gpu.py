"""The fused backend's own behaviour on a CUDA device: peak memory of its chunk modes, the single chunk's folded
upstream gradient, more than 2^31 logits in one chunk, GEMM counts under ``no_grad``, the backend ``auto`` picks.
(Results against float64 and the CUDA-graph capture of both Triton backends: ``test_triton_gpu.py``; NaN and drawn
problems: ``test_triton_backends.py``.)

Tolerances: ``helpers.assert_within_plain(..., large=True)`` against eager in the same dtype.
"""

import gc

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    EPS,
    LARGE_FLOOR,
    LARGE_SLACK,
    Case,
    assert_within_plain,
    cuda_problem,
    forward_backward,
    gpu_only,
    plain_loss,
    rel_err,
)

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

pytestmark = gpu_only

ONE = torch.tensor(1.0)  # the upstream gradient of these tests


def _ours(x, w, y, b, **kw):
    return linear_cross_entropy(x, w, y, linear_bias=b, **kw)


def _peak_and_results(x, w, y, opts, **kw):
    """Ours forward + backward: ``(peak allocation beyond the inputs and the two gradients, [loss, dx, dw])``."""
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _ours(xr, wr, y, None, options=opts, **kw).backward()  # warm-up: kernels compiled outside the measurement
    xr.grad = wr.grad = None
    # earlier tests' garbage freed inside the measurement would lower its peak, and blocks reused from their cached
    # segments are counted whole: start from an empty cache
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = _ours(xr, wr, y, None, options=opts, **kw)
    loss.backward()
    torch.cuda.synchronize()
    grads = xr.grad.nbytes + wr.grad.nbytes
    return torch.cuda.max_memory_allocated() - base - grads, [loss.detach(), xr.grad, wr.grad]


def _assert_as_exact_as_eager(ours, x, w, y):
    """Loss, dx and dw of a bf16 run against eager's, as :func:`helpers.assert_within_plain` (large)."""
    case = Case(x, w, y)
    ref = forward_backward(plain_loss, case.to(torch.float64), upstream=ONE)
    eager = forward_backward(plain_loss, case, upstream=ONE)
    assert_within_plain(ours, eager, ref, torch.bfloat16, large=True)


@pytest.mark.parametrize("n,h,v", [(4096, 2048, 8192), (4500, 2304, 4099)])  # the second: odd V (two parts)
def test_default_trades_the_scratch_for_one_chunk(n, h, v):
    """Where all the logits take no more than the fp32 weight-gradient scratch (N·2 <= 4·H bytes per class), the
    default runs one chunk: a peak no higher than the chunked path's (its buffer plus that scratch) but for at most
    16 bytes per row kept for backward (the row kernel's lse and dz's three coefficients; the factored pass's target
    logit, scale, dz_y, refit flag and target order: 17 bytes, of which the chunked pass also keeps dz_y), and
    gradients as exact as eager's."""
    x, w, b, y = cuda_problem(n, h, v, torch.bfloat16, seed=5)
    one_chunk, ours = _peak_and_results(x, w, y, LinearCrossEntropyOptions(backend="fused"))
    chunked, _ = _peak_and_results(x, w, y, LinearCrossEntropyOptions(backend="fused", batch_chunk_size=1024))
    assert one_chunk <= chunked + 16 * n, (one_chunk, chunked)
    # the bf16 logits (dz, rows padded to 128 bytes) and no (N, H) temporary; the caching allocator rounds each
    # large block up to 2 MiB
    assert one_chunk <= n * (-(-v // 64) * 64) * 2 + (6 << 20), one_chunk
    _assert_as_exact_as_eager(ours, x, w, y)


@pytest.mark.parametrize("g", [1 / 3, 0.1])
@pytest.mark.parametrize("loss_dtype", [None, torch.float32])
def test_one_chunk_folds_any_upstream_gradient_like_eager(g, loss_dtype):
    """``(loss * g).backward()`` with g not a power of two (gradient accumulation): the single-chunk path forms
    ``dz`` in backward with g folded in, rounded once as eager rounds ``g·∂ℓ/∂z``. Rounding ``dz`` for g = 1 first
    and scaling afterwards measured 1.6x eager's error at 8192x4096x128256. A bf16 loss also rounds g itself, for
    eager as for ours; ``loss_dtype=torch.float32`` keeps it exact."""
    n, h, v = 2048, 1024, 8192
    x, w, b, y = cuda_problem(n, h, v, torch.bfloat16, seed=8)

    def eager_times_g(x, w, y, **defaults):
        loss = F.cross_entropy(F.linear(x, w).to(torch.promote_types(x.dtype, torch.float32)), y)
        return (loss if loss_dtype is not None else loss.to(x.dtype)) * g

    def ours_times_g(x, w, y, **defaults):
        return _ours(x, w, y, None, options=LinearCrossEntropyOptions(backend="fused", loss_dtype=loss_dtype)) * g

    case = Case(x, w, y)
    ref = forward_backward(eager_times_g, case.to(torch.float64), upstream=ONE)
    eager = forward_backward(eager_times_g, case, upstream=ONE)
    ours = forward_backward(ours_times_g, case, upstream=ONE)
    assert_within_plain(ours, eager, ref, torch.bfloat16, large=True)


def test_one_chunk_past_int32_indexing():
    """More than 2^31 logits in one chunk, where ``row · stride`` overflows int32: the rows on both sides of that
    boundary get their own loss (a forward-only call) and input gradient (the deferred backward), as good as eager's
    against float64. 4.3 GB of bf16 logits."""
    n, h, v = 16400, 64, 131072
    first_past = -(-(2**31) // v)  # the first row whose logits start past 2^31 elements
    assert first_past < n
    x, w, _, y = cuda_problem(n, h, v, torch.bfloat16, seed=9)
    y[first_past - 4 : first_past + 4] = torch.arange(v - 8, v, device="cuda")  # targets near the rows' ends
    opts = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=n)
    rows = slice(first_past - 8, n)
    with torch.no_grad():
        losses = linear_cross_entropy(x, w, y, reduction="none", options=opts)[rows]
    xr = x.detach().clone().requires_grad_()
    linear_cross_entropy(xr, w, y, reduction="sum", options=opts).backward()
    dx = xr.grad[rows]

    def tail(x_rows, w):  # the same rows alone: per-row losses and (sum reduction) input gradients
        x_rows = x_rows.detach().clone().requires_grad_()
        logits = F.linear(x_rows, w).to(torch.promote_types(x_rows.dtype, torch.float32))
        loss = F.cross_entropy(logits, y[rows], reduction="none")
        loss.sum().backward()
        return loss.detach().to(x_rows.dtype), x_rows.grad

    ref, eager = tail(x[rows].double(), w.double()), tail(x[rows], w)
    for name, o, e, r in zip(("loss", "dx"), (losses, dx), eager, ref):
        keep = y[rows] != -100
        o, e, r = o[keep], e[keep], r[keep]
        # one rounding to bf16 allowed for both (eager's per-row values are each rounded once)
        bound = max(LARGE_SLACK[torch.bfloat16] * rel_err(e, r) + LARGE_FLOOR[torch.bfloat16], EPS[torch.bfloat16])
        assert rel_err(o, r) <= bound, (name, rel_err(o, r), rel_err(e, r))


@pytest.mark.parametrize("policy", ["compact", "auto"])
def test_small_chunks_recompute_the_weight_gradient(policy):
    """Below the rule's break-even (256-row chunks) the weight gradient comes from the vocabulary-major pass: the
    peak holds only the (rows, V) logits buffer (its (N, cols) blocks are no larger, and there is no fp32 scratch
    even for "auto"), and the weight gradient is eager's, not a chunk-by-chunk bf16 sum."""
    n, h, v, rows = 4096, 1024, 32000, 256
    x, w, b, y = cuda_problem(n, h, v, torch.bfloat16, seed=6)
    opts = LinearCrossEntropyOptions(backend="fused", acc_policy=policy, batch_chunk_size=rows)
    extra, ours = _peak_and_results(x, w, y, opts)
    # the bf16 buffer (rows padded to 128 bytes), per-row vectors, the caching allocator's 2 MiB rounding
    assert extra <= rows * (-(-v // 64) * 64) * 2 + n * 64 + (4 << 20), extra
    _assert_as_exact_as_eager(ours, x, w, y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunks_hold_nothing_per_row(reduction):
    """The scalar reductions keep no (N,) vector through the chunk loop (shares are one value, losses are summed per
    chunk, lse is kept only for metrics): with many more rows than a chunk, the peak is the chunk's buffer."""
    n, h, v, rows = 65536, 64, 4096, 512
    x, w, b, y = cuda_problem(n, h, v, torch.bfloat16, seed=7)
    opts = LinearCrossEntropyOptions(backend="fused", acc_policy="compact", batch_chunk_size=rows)
    extra, _ = _peak_and_results(x, w, y, opts, reduction=reduction)
    buffer = rows * (-(-v // 64) * 64) * 2
    # the factored pass's working set beside it: each row's dz_y (4 bytes), added to grad_W after the last chunk (a
    # chunk's partials, then its (rows, H) product, ride in its own rows of grad_x)
    buffer += n * 4
    # 13 bytes per row (keep mask, shares, losses, lse) would be 832 KiB here
    assert extra <= buffer + (128 << 10), (extra, buffer)


def test_no_grad_computes_only_the_loss():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountGemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.gemms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.gemms += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
            return func(*args, **(kwargs or {}))

    x, w, b, y = cuda_problem(2048, 256, 16384, torch.bfloat16, seed=3)
    x.requires_grad_(), w.requires_grad_()
    opts = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=512)
    with torch.no_grad(), CountGemms() as counter:
        loss = _ours(x, w, y, None, options=opts)
    assert loss.grad_fn is None
    assert counter.gemms == 2048 // 512  # the logits GEMM of each chunk, no gradient GEMMs
    ref = plain_loss(x.double(), w.double(), y)
    assert rel_err(loss, ref) <= EPS[torch.bfloat16]


def test_auto_picks_fused_on_cuda():
    x, w, b, y = cuda_problem(64, 32, 100, torch.bfloat16, seed=4)
    from linear_cross_entropy.backends.common import LossParams
    from linear_cross_entropy.dispatch import choose_backend as _choose_backend
    from linear_cross_entropy.validate import check_call

    shape = check_call(x, w, y, None, None, "mean", None, 0.0)
    lp = LossParams("mean", -100, 0.0, False)
    assert _choose_backend(LinearCrossEntropyOptions(), lp, shape, x) == "fused"
    assert _choose_backend(LinearCrossEntropyOptions(), lp, shape, x.cpu()) == "chunked"
