"""The fused backend on a CUDA device: results against float64, no host syncs, CUDA-graph capture, NaN propagation.

Tolerances come from the plain PyTorch computation in the same dtype (eager: logits in the input dtype, softmax in
fp32): ours may not be worse than ``_SLACK`` times that error, plus a floor for errors that are exactly 0.
"""

import gc
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import WEIGHT_GRAD_PASSES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fused_kernels import _rel, check_drawn_problem

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
triton = pytest.importorskip("triton")

_SLACK = 1.25
_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}


def _problem(n, h, v, dtype, seed, bias=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, h, device="cuda", generator=g) * (2 / h**0.5)).to(dtype)
    b = torch.randn(v, device="cuda", generator=g).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.05] = -100
    y[0] = 0  # never all ignored: that case (NaN loss) has its own tests
    return x, w, b, y


def _run(fn, x, w, b, y, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = fn(x, w, y, b, **kw)
    loss.backward(torch.ones_like(loss) if loss.dim() else None)
    return [loss.detach(), x.grad, w.grad] + ([] if b is None else [b.grad])


def _eager_weight_grad_accumulated(x, w, b, y, rows, **kw):
    """Eager's weight gradient, with dzᵀ·x summed chunk by chunk in the input dtype."""
    logits = F.linear(x, w, b).float().requires_grad_()
    kw = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss = F.cross_entropy(logits, y, **kw)
    (dz,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
    dz = dz.to(x.dtype)
    acc = None
    for s in range(0, x.shape[0], rows):
        part = dz[s : s + rows].T @ x[s : s + rows]
        acc = part if acc is None else acc + part
    return acc


def _ours(x, w, y, b, **kw):
    return linear_cross_entropy(x, w, y, linear_bias=b, **kw)


def _eager(x, w, y, b, options=None, **kw):
    logits = F.linear(x, w, b).to(torch.promote_types(x.dtype, torch.float32))
    kw = {k: (v.to(logits.dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
    return F.cross_entropy(logits, y, **kw).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 256, 4096), (1000, 192, 50257), (333, 64, 1000), (1, 128, 32000)])
@pytest.mark.parametrize("policy", ["auto", "compact", "accurate"])
@pytest.mark.parametrize(
    "extras",
    [{}, {"label_smoothing": 0.1, "class_weight": True, "bias": True}, {"reduction": "sum"}, {"reduction": "none"}],
)
@pytest.mark.parametrize("weight_grad_pass", WEIGHT_GRAD_PASSES)
def test_matches_float64(dtype, shape, policy, extras, weight_grad_pass, force_weight_grad_pass):
    rows = 256
    if shape[0] <= rows and weight_grad_pass != "accumulate":
        pytest.skip("one chunk has a single weight-gradient GEMM either way")
    force_weight_grad_pass(weight_grad_pass)
    extras = dict(extras)
    seed = zlib.crc32(repr((shape, dtype)).encode())  # the same problem in every process (str hashes are salted)
    x, w, b, y = _problem(*shape, dtype, seed=seed, bias=extras.pop("bias", False))
    if extras.pop("class_weight", False):
        extras["weight"] = torch.rand(shape[2], device="cuda").to(dtype)
    ref = _run(
        _eager,
        x.double(),
        w.double(),
        None if b is None else b.double(),
        y,
        **{k: (v.double() if torch.is_tensor(v) else v) for k, v in extras.items()},
    )
    eager = _run(_eager, x, w, b, y, **extras)
    opts = LinearCrossEntropyOptions(backend="fused", acc_policy=policy, batch_chunk_size=rows)
    ours = _run(_ours, x, w, b, y, options=opts, **extras)
    if policy != "auto" and dtype != torch.float32 and weight_grad_pass == "accumulate":
        # An explicit policy without acc_dtype resolves to the input dtype (PyTorch's rule): the weight gradient
        # then accumulates chunk by chunk in bf16/fp16. The yardstick is eager doing that same accumulation.
        eager[2] = _eager_weight_grad_accumulated(x, w, b, y, rows, **extras)
    assert_within_eager(ours, eager, ref, dtype)


def assert_within_eager(ours, eager, ref, dtype):
    """``[loss, dx, dw(, db)]`` of ours no further from the float64 ``ref`` than ``_SLACK`` times eager's error in
    ``dtype`` (plus a floor), the loss also within one rounding to ``dtype`` (eager rounds once to it)."""
    for name, o, e, r in zip(["loss", "dx", "dw", "db"], ours, eager, ref):
        assert o.dtype == e.dtype
        bound = _SLACK * _rel(e, r) + _FLOOR[dtype]
        if name == "loss":
            bound = max(bound, torch.finfo(dtype).eps)
        assert _rel(o, r) <= bound, (name, _rel(o, r), _rel(e, r))


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
    """Loss, dx and dw of a bf16 run against eager's, as :func:`assert_within_eager`."""
    ref = _run(_eager, x.double(), w.double(), None, y)
    eager = _run(_eager, x, w, None, y)
    assert_within_eager(ours, eager, ref, torch.bfloat16)


@pytest.mark.parametrize("n,h,v", [(4096, 2048, 8192), (4500, 2304, 4099)])  # the second: odd V (two parts)
def test_default_trades_the_scratch_for_one_chunk(n, h, v):
    """Where all the logits take no more than the fp32 weight-gradient scratch (N·2 <= 4·H bytes per class), the
    default runs one chunk: a peak no higher than the chunked path's (its buffer plus that scratch) but for the 16
    bytes per row it keeps for backward's sweep (lse and dz's three coefficients), and gradients as exact as
    eager's."""
    x, w, b, y = _problem(n, h, v, torch.bfloat16, seed=5)
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
    x, w, b, y = _problem(n, h, v, torch.bfloat16, seed=8)

    def eager_times_g(x, w, y, b):
        loss = F.cross_entropy(F.linear(x, w, b).to(torch.promote_types(x.dtype, torch.float32)), y)
        return (loss if loss_dtype is not None else loss.to(x.dtype)) * g

    def ours_times_g(x, w, y, b):
        return _ours(x, w, y, b, options=LinearCrossEntropyOptions(backend="fused", loss_dtype=loss_dtype)) * g

    ref = _run(eager_times_g, x.double(), w.double(), None, y)
    eager = _run(eager_times_g, x, w, None, y)
    ours = _run(ours_times_g, x, w, None, y)
    assert_within_eager(ours, eager, ref, torch.bfloat16)


def test_one_chunk_past_int32_indexing():
    """More than 2^31 logits in one chunk, where ``row · stride`` overflows int32: the rows on both sides of that
    boundary get their own loss (a forward-only call) and input gradient (the deferred backward), as good as eager's
    against float64. 4.3 GB of bf16 logits."""
    n, h, v = 16400, 64, 131072
    first_past = -(-(2**31) // v)  # the first row whose logits start past 2^31 elements
    assert first_past < n
    x, w, _, y = _problem(n, h, v, torch.bfloat16, seed=9)
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
        bound = max(_SLACK * _rel(e, r) + _FLOOR[torch.bfloat16], torch.finfo(torch.bfloat16).eps)
        assert _rel(o, r) <= bound, (name, _rel(o, r), _rel(e, r))


@pytest.mark.parametrize("policy", ["compact", "auto"])
def test_small_chunks_recompute_the_weight_gradient(policy):
    """Below the rule's break-even (256-row chunks) the weight gradient comes from the vocabulary-major pass: the
    peak holds only the (rows, V) logits buffer (its (N, cols) blocks are no larger, and there is no fp32 scratch
    even for "auto"), and the weight gradient is eager's, not a chunk-by-chunk bf16 sum."""
    n, h, v, rows = 4096, 1024, 32000, 256
    x, w, b, y = _problem(n, h, v, torch.bfloat16, seed=6)
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
    x, w, b, y = _problem(n, h, v, torch.bfloat16, seed=7)
    opts = LinearCrossEntropyOptions(backend="fused", acc_policy="compact", batch_chunk_size=rows)
    extra, _ = _peak_and_results(x, w, y, opts, reduction=reduction)
    buffer = rows * (-(-v // 64) * 64) * 2
    # 13 bytes per row (keep mask, shares, losses, lse) would be 832 KiB here
    assert extra <= buffer + (128 << 10), (extra, buffer)


@pytest.mark.parametrize("weight_grad_pass", WEIGHT_GRAD_PASSES)
def test_no_host_sync_and_cuda_graph(weight_grad_pass, force_weight_grad_pass):
    force_weight_grad_pass(weight_grad_pass)
    expected, captured, fresh = sync_free_graph_run(LinearCrossEntropyOptions(backend="fused", batch_chunk_size=256))
    assert all(torch.equal(a, c) for a, c in zip(captured, fresh))
    assert not torch.equal(expected[1], captured[2])


def sync_free_graph_run(opts):
    """Forward + backward under ``set_sync_debug_mode("error")`` (a host sync raises), then captured in a CUDA graph
    and replayed with new targets. Returns ``(expected, captured, fresh)``: the gradients ``[grad_x, grad_w,
    grad_b]`` of the eager run before the capture, and ``[loss, grad_x, grad_w, grad_b]`` of the replay and of an
    eager run on the new targets. (No tensor of an earlier graph may be freed while capturing: none is kept.)"""
    x, w, b, y = _problem(1024, 256, 8192, torch.bfloat16, seed=1, bias=True)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    _ours(x, w, y, b, options=opts).backward()  # compile the kernels outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in (x, w, b):
            p.grad = None
        _ours(x, w, y, b, options=opts).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = [x.grad.clone(), w.grad.clone(), b.grad.clone()]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for p in (x, w, b):
                p.grad = None
            _ours(x, w, y, b, options=opts).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for p in (x, w, b):
        p.grad = None
    with torch.cuda.graph(graph):
        loss = _ours(x, w, y, b, options=opts)
        loss.backward()
    y.copy_(torch.randint(0, 8192, y.shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    fresh = _run(_ours, x, w, b, y, options=opts)
    return expected, [loss.detach(), x.grad, w.grad, b.grad], fresh


@pytest.mark.parametrize("backend", ["fused", "tiled"])
@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_reaches_the_loss(where, backend):
    x, w, b, y = _problem(256, 64, 3000, torch.bfloat16, seed=2)
    (x if where == "input" else w)[3, 5] = float("nan")
    loss = _ours(x, w, y, None, options=LinearCrossEntropyOptions(backend=backend))
    assert torch.isnan(loss)


def test_no_grad_computes_only_the_loss():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountGemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.gemms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.gemms += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm)
            return func(*args, **(kwargs or {}))

    x, w, b, y = _problem(2048, 256, 16384, torch.bfloat16, seed=3)
    x.requires_grad_(), w.requires_grad_()
    opts = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=512)
    with torch.no_grad(), CountGemms() as counter:
        loss = _ours(x, w, y, None, options=opts)
    assert loss.grad_fn is None
    assert counter.gemms == 2048 // 512  # the logits GEMM of each chunk, no gradient GEMMs
    ref = _eager(x.double(), w.double(), y, None)
    assert _rel(loss, ref) <= torch.finfo(torch.bfloat16).eps


def test_auto_picks_fused_on_cuda():
    x, w, b, y = _problem(64, 32, 100, torch.bfloat16, seed=4)
    from linear_cross_entropy.backends.common import LossParams
    from linear_cross_entropy.dispatch import choose_backend as _choose_backend
    from linear_cross_entropy.validate import check_call

    shape = check_call(x, w, y, None, None, "mean", None, 0.0)
    lp = LossParams("mean", -100, 0.0, False)
    assert _choose_backend(LinearCrossEntropyOptions(), lp, shape, x) == "fused"
    assert _choose_backend(LinearCrossEntropyOptions(), lp, shape, x.cpu()) == "chunked"


@pytest.mark.parametrize("backend", ["fused", "tiled"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_the_reference_on_drawn_problems(backend, data):
    """The CPU property test (``test_fused_kernels.check_drawn_problem``) on the GPU's kernels (TMA where aligned,
    bf16 too): up to 300 rows, 160 features, 3000 classes."""
    check_drawn_problem(
        backend, data, device="cuda", sizes=(300, 160, 3000), dtypes=(torch.float32, torch.float16, torch.bfloat16)
    )
