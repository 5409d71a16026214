"""Both Triton backends on large CUDA problems: results against float64 in bf16/fp16/fp32, no host syncs, CUDA-graph
capture. (What also runs in the CPU interpreter — drawn problems, NaN, out-of-range targets — is in
``test_triton_backends.py``; the fused backend's memory and indexing tests in ``test_fused_gpu.py``.)

The yardstick is eager PyTorch in the same dtype (logits in the input dtype, softmax in fp32), the tolerance
``helpers.assert_within_plain(..., large=True)``. Where a backend accumulates a gradient in the input dtype by
design (an explicit policy without ``acc_dtype``: the fused weight gradient chunk by chunk; the tiled backend's
atomics, one rounding per logit tile), the yardstick is eager doing that same accumulation, so the bound still fails
for a wrong kernel. The tiled backend's atomics make the summation order vary: results are compared within
tolerances, never bit for bit.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    WEIGHT_GRAD_PASSES,
    Case,
    assert_within_plain,
    count_calls,
    cuda_problem,
    forward_backward,
    gpu_only,
    plain_loss,
    rel_err,
)

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

pytestmark = gpu_only

ONE = torch.tensor(1.0)  # the upstream gradient of these tests
ROWS = 256  # the fused backend's chunk rows here
TILE = 128  # the tiled backend's GPU tile (launch.py): its accumulated yardsticks sum tile by tile

# (backend, policy, weight-gradient pass, shape): the fused backend in chunks of 256 rows with either weight-gradient
# pass; the tiled backend with an fp32 accumulator for an explicit policy
CONFIGS = [
    pytest.param("fused", policy, wgp, shape, id=f"fused-{policy}-{wgp}-{'x'.join(map(str, shape))}")
    for policy in ("auto", "compact", "accurate")
    for wgp in WEIGHT_GRAD_PASSES
    for shape in [(512, 256, 4096), (1000, 192, 50257), (333, 64, 1000), (1, 128, 32000)]
] + [
    pytest.param("tiled", policy, None, shape, id=f"tiled-{policy}-{'x'.join(map(str, shape))}")
    for policy in ("auto", "balanced", "accurate")
    for shape in [(512, 256, 4096), (1000, 192, 50257), (333, 72, 1000), (1, 128, 32000)]
]
EXTRAS = {
    "plain": {},
    "smoothing+weights+bias": {"label_smoothing": 0.1, "class_weight": True, "bias": True},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


def _options(backend, policy):
    if backend == "fused":
        return LinearCrossEntropyOptions(backend="fused", acc_policy=policy, batch_chunk_size=ROWS)
    acc = torch.float32 if policy != "auto" else None
    return LinearCrossEntropyOptions(backend="tiled", acc_policy=policy, acc_dtype=acc)


def _dz(case: Case) -> torch.Tensor:
    """Eager's logit gradient (upstream 1) rounded to the input dtype."""
    logits = F.linear(case.input, case.linear_weight, case.linear_bias).float().requires_grad_()
    weight = None if case.weight is None else case.weight.float()
    kwargs = dict(weight=weight, reduction=case.reduction, label_smoothing=case.label_smoothing)
    loss = F.cross_entropy(logits, case.target, **kwargs)
    (dz,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
    return dz.to(case.input.dtype)


def _summed_in_blocks(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """``a @ b`` summed block by block over the inner dimension in the inputs' dtype."""
    acc = None
    for s in range(0, a.shape[1], block):
        part = a[:, s : s + block] @ b[s : s + block]
        acc = part if acc is None else acc + part
    return acc


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bfloat16", "float16", "float32"]
)
@pytest.mark.parametrize("backend,policy,weight_grad_pass,shape", CONFIGS)
@pytest.mark.parametrize("extras", EXTRAS.values(), ids=EXTRAS.keys())
def test_large_problems_match_float64(backend, policy, weight_grad_pass, shape, dtype, extras, force_weight_grad_pass):
    if backend == "fused":
        if shape[0] <= ROWS and weight_grad_pass != "accumulate":
            pytest.skip("one chunk has a single weight-gradient GEMM either way")
        force_weight_grad_pass(weight_grad_pass)
    extras = dict(extras)
    seed = zlib.crc32(repr((shape, dtype)).encode())  # the same problem in every process (str hashes are salted)
    x, w, b, y = cuda_problem(*shape, dtype, seed=seed, bias=extras.pop("bias", False))
    if extras.pop("class_weight", False):
        extras["weight"] = torch.rand(shape[2], device="cuda").to(dtype)
    case = Case(x, w, y, linear_bias=b, **extras)
    ref = forward_backward(plain_loss, case.to(torch.float64), upstream=ONE)
    eager = list(forward_backward(plain_loss, case, upstream=ONE))
    ours = forward_backward(linear_cross_entropy, case, upstream=ONE, options=_options(backend, policy))
    if dtype != torch.float32 and backend == "fused" and policy != "auto" and weight_grad_pass == "accumulate":
        # An explicit policy without acc_dtype resolves to the input dtype (PyTorch's rule): the weight gradient
        # then accumulates chunk by chunk in bf16/fp16.
        eager[2] = _summed_in_blocks(_dz(case).T, x, ROWS)
    if dtype != torch.float32 and backend == "tiled":
        dz = _dz(case)
        if policy == "auto":  # grad_input accumulated over class tiles, grad_weight over row tiles, in the dtype
            eager[1] = _summed_in_blocks(dz, w, TILE)
        if policy != "accurate":
            eager[2] = _summed_in_blocks(dz.T, x, TILE)
    assert_within_plain(ours, eager, ref, dtype, large=True)


@pytest.mark.parametrize("backend", ["fused", "tiled"])
@pytest.mark.parametrize("weight_grad_pass", WEIGHT_GRAD_PASSES)
def test_no_host_sync_and_cuda_graph(backend, weight_grad_pass, force_weight_grad_pass):
    """Forward and backward under ``set_sync_debug_mode("error")``, then captured in a CUDA graph and replayed with new
    targets: the replay equals a fresh run on them (bit for bit for the fused backend; within the atomics'
    reordering for the tiled one) and differs from the first run."""
    if backend == "fused":
        force_weight_grad_pass(weight_grad_pass)
        opts = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=256)
    elif weight_grad_pass != "accumulate":
        pytest.skip("the tiled backend has one weight-gradient pass")
    else:
        opts = LinearCrossEntropyOptions(backend="tiled", acc_policy="balanced", acc_dtype=torch.float32)
    expected, captured, fresh = sync_free_graph_run(opts)
    if backend == "fused":
        assert all(torch.equal(a, c) for a, c in zip(captured, fresh))
    else:
        torch.testing.assert_close(captured[0], fresh[0])
        for got, want in zip(captured[1:], fresh[1:]):
            assert rel_err(got, want) < 1e-2
    assert not torch.equal(expected[1], captured[2])


def test_one_chunk_factored_pass_has_no_host_sync_and_captures(monkeypatch):
    """One chunk on the fused backend's default (the factored pass where its Gluon GEMM runs: forward keeps ``E'``
    and the rows' scales, backward multiplies them by ``g`` on the device): no host sync, and a CUDA graph replay
    equal to a fresh run bit for bit."""
    from linear_cross_entropy.backends.fused import chunks, factored_gluon

    backwards = count_calls(monkeypatch, chunks, "factored_deferred_grads")
    expected, captured, fresh = sync_free_graph_run(LinearCrossEntropyOptions(backend="fused"))
    assert all(torch.equal(a, c) for a, c in zip(captured, fresh))
    assert not torch.equal(expected[1], captured[2])
    gluon = factored_gluon.runs_on(torch.empty(1, 256, dtype=torch.bfloat16, device="cuda"))
    assert bool(backwards) == gluon, (len(backwards), gluon)


def _ours(x, w, y, b, opts):
    return linear_cross_entropy(x, w, y, linear_bias=b, options=opts)


def sync_free_graph_run(opts):
    """Forward + backward under ``set_sync_debug_mode("error")`` (a host sync raises), then captured in a CUDA graph
    and replayed with new targets. Returns ``(expected, captured, fresh)``: the gradients ``[grad_x, grad_w,
    grad_b]`` of the eager run before the capture, and ``[loss, grad_x, grad_w, grad_b]`` of the replay and of an
    eager run on the new targets. (No tensor of an earlier graph may be freed while capturing: none is kept.)"""
    x, w, b, y = cuda_problem(1024, 256, 8192, torch.bfloat16, seed=1, bias=True)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    _ours(x, w, y, b, opts).backward()  # compile the kernels outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p in (x, w, b):
            p.grad = None
        _ours(x, w, y, b, opts).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = [x.grad.clone(), w.grad.clone(), b.grad.clone()]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for p in (x, w, b):
                p.grad = None
            _ours(x, w, y, b, opts).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for p in (x, w, b):
        p.grad = None
    with torch.cuda.graph(graph):
        loss = _ours(x, w, y, b, opts)
        loss.backward()
    y.copy_(torch.randint(0, 8192, y.shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    fresh = forward_backward(linear_cross_entropy, Case(x, w, y, linear_bias=b), upstream=ONE, options=opts)
    return expected, [loss.detach(), x.grad, w.grad, b.grad], fresh
