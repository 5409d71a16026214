"""Our additions beyond PyTorch's API: z-loss, logit scale, soft-capping, in-pass metrics, autocast.

Each is checked on every path — the reference (``options=None``), chunked, and fused (Triton's interpreter on the
CPU, real kernels on CUDA) — against an independent float64 oracle written here with plain PyTorch ops.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import extras_oracle

from linear_cross_entropy import LinearCrossEntropyOptions, LinearCrossEntropyOutput, linear_cross_entropy

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
FUSED_HERE = HAS_TRITON and (INTERPRETING or torch.cuda.is_available())
PATHS = {
    "reference": None,
    "chunked": LinearCrossEntropyOptions(backend="chunked", batch_chunk_size=3),
    "fused": LinearCrossEntropyOptions(backend="fused", batch_chunk_size=3),
    "fused-recompute": LinearCrossEntropyOptions(backend="fused", batch_chunk_size=3),  # weight_grad_sweep forced
}
METRIC_NAMES = ("lse", "z_loss", "max_logit", "entropy", "logit_norm", "accuracy", "log_prob")


def _skip_unsupported(path, probs=False):
    if path.startswith("fused") and not FUSED_HERE:
        pytest.skip("fused backend needs CUDA or TRITON_INTERPRET=1 with triton")
    if path.startswith("fused") and probs:
        pytest.skip("the fused backend serves class-index targets (probabilities fall back to chunked)")


def _device(path):
    return "cuda" if path.startswith("fused") and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "extras",
    [
        dict(z_loss=1e-2),
        dict(scale=0.7),
        dict(cap=3.0),
        dict(z_loss=0.1, scale=1.5, cap=2.0),
        dict(z_loss=0.05, cap=2.5, ls=0.2, class_weight=True, bias=True),
        dict(z_loss=0.05, scale=1.3, probs=True, ls=0.1),
    ],
    ids=["zloss", "scale", "softcap", "all-three", "with-smoothing-weights-bias", "probabilities"],
)
def test_extras_match_float64_oracle(path, reduction, extras, force_weight_grad_pass):
    extras = dict(extras)
    probs = extras.pop("probs", False)
    _skip_unsupported(path, probs)
    if path == "fused-recompute":
        force_weight_grad_pass("recompute")
    dtype = torch.float32 if path.startswith("fused") else torch.float64
    device = _device(path)
    g = torch.Generator().manual_seed(7)
    n, f, c = 11, 6, 37
    x = torch.randn(n, f, generator=g, dtype=torch.float64) * 2
    w = torch.randn(c, f, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64) if extras.pop("bias", False) else None
    cw = torch.rand(c, generator=g, dtype=torch.float64) + 0.2 if extras.pop("class_weight", False) else None
    if probs:
        t = torch.randn(n, c, generator=g, dtype=torch.float64).softmax(1)
    else:
        t = torch.randint(0, c, (n,), generator=g)
        t[[2, 5]] = -100
    ls = extras.pop("ls", 0.0)
    kw = dict(z_loss=extras.get("z_loss", 0.0), logit_scale=extras.get("scale", 1.0), logit_softcap=extras.get("cap"))
    upstream = (
        torch.rand(n, generator=g, dtype=torch.float64) + 0.5
        if reduction == "none"
        else torch.tensor(0.8, dtype=torch.float64)
    )

    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    bo = None if b is None else b.clone().requires_grad_()
    ref_loss, ref_metrics = extras_oracle(xo, wo, t, b=bo, cw=cw, reduction=reduction, ls=ls, **extras)
    ref_loss.backward(upstream)

    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
    xs, ws = cast(x).requires_grad_(), cast(w).requires_grad_()
    bs = None if b is None else cast(b).requires_grad_()
    tt = t.to(device) if not probs else cast(t)
    out = linear_cross_entropy(
        xs,
        ws,
        tt,
        linear_bias=bs,
        weight=cast(cw),
        reduction=reduction,
        label_smoothing=ls,
        options=PATHS[path],
        return_metrics=True,
        **kw,
    )
    assert isinstance(out, LinearCrossEntropyOutput)
    out.loss.backward(cast(upstream))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.loss.double().cpu(), ref_loss.detach(), rtol=tol, atol=tol)
    for got, want in ((xs.grad, xo.grad), (ws.grad, wo.grad)) + (((bs.grad, bo.grad),) if b is not None else ()):
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
    for name in METRIC_NAMES:
        got = getattr(out.metrics, name)
        assert not got.requires_grad, name
        torch.testing.assert_close(got.double().cpu(), ref_metrics[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("path", ["reference", "chunked"])
def test_extras_k_dimensional(path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5, 2), generator=g)
    out = linear_cross_entropy(
        x, w, t, options=PATHS[path], z_loss=0.1, logit_softcap=2.0, reduction="none", return_metrics=True
    )
    logits = torch.einsum("nf,ckf->nck", x, w)
    z = 2.0 * torch.tanh(logits / 2.0)
    lse = torch.logsumexp(z, dim=1)
    expected = F.cross_entropy(z, t, reduction="none") + 0.1 * lse**2
    torch.testing.assert_close(out.loss, expected)
    assert out.metrics.entropy.shape == (5, 2)
    torch.testing.assert_close(out.metrics.lse, lse.detach())


@pytest.mark.parametrize("path", list(PATHS))
def test_gradcheck_with_extras(path):
    _skip_unsupported(path)
    if path.startswith("fused"):
        pytest.skip("fused runs in fp16/bf16/fp32 only; its float64-oracle check is above")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 8, 2])
    options = (
        None
        if PATHS[path] is None
        else LinearCrossEntropyOptions(backend="chunked", batch_chunk_size=2, allow_retain_graph=True)
    )
    for reduction in ("mean", "none"):

        def fn(x, w, b, reduction=reduction):
            return linear_cross_entropy(
                x,
                w,
                t,
                linear_bias=b,
                reduction=reduction,
                z_loss=0.2,
                logit_scale=1.7,
                logit_softcap=1.5,
                label_smoothing=0.1,
                options=options,
            )

        assert torch.autograd.gradcheck(fn, (x, w, b))


def test_rl_per_token_log_probs_and_entropy():
    """reduction="none" + metrics: per-token log p(token) and entropy without materialising the logits."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(16, 8, generator=g, dtype=torch.float64)
    head = torch.randn(50, 8, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 50, (16,), generator=g)
    out = linear_cross_entropy(
        hidden,
        head,
        tokens,
        reduction="none",
        return_metrics=True,
        options=LinearCrossEntropyOptions(batch_chunk_size=4),
    )
    logp = torch.log_softmax(hidden @ head.T, dim=1)
    torch.testing.assert_close(out.metrics.log_prob, logp.gather(1, tokens[:, None])[:, 0])
    torch.testing.assert_close(out.metrics.entropy, -(logp.exp() * logp).sum(1))
    torch.testing.assert_close(out.loss, -out.metrics.log_prob)


def test_extras_off_is_exactly_pytorch():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    t = torch.randint(0, 9, (6,), generator=g)
    plain = linear_cross_entropy(x, w, t)
    explicit = linear_cross_entropy(x, w, t, z_loss=0.0, logit_scale=1.0, logit_softcap=None, return_metrics=False)
    assert torch.equal(plain, explicit) and torch.equal(plain, F.cross_entropy(x @ w.T, t))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(z_loss=-1e-4), "z_loss"),
        (dict(z_loss=float("nan")), "z_loss"),
        (dict(z_loss=float("inf")), "z_loss"),
        (dict(logit_softcap=0.0), "logit_softcap"),
        (dict(logit_softcap=-3.0), "logit_softcap"),
        (dict(logit_scale=float("inf")), "logit_scale"),
        (dict(logit_scale=float("nan")), "logit_scale"),
    ],
)
@pytest.mark.parametrize("path", ["reference", "chunked"])
def test_bad_extras_raise_value_error(kwargs, match, path):
    x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(x, w, t, options=PATHS[path], **kwargs)


def test_metrics_under_no_grad_and_inference():
    x, w, t = torch.randn(8, 4), torch.randn(10, 4), torch.randint(0, 10, (8,))
    with torch.no_grad():
        out = linear_cross_entropy(x, w, t, options=LinearCrossEntropyOptions(), return_metrics=True)
    assert out.loss.grad_fn is None
    ref = linear_cross_entropy(x, w, t, return_metrics=True)
    for name in METRIC_NAMES:
        torch.testing.assert_close(getattr(out.metrics, name), getattr(ref.metrics, name))


@pytest.mark.parametrize("path", ["chunked", "reference"])
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_cpu_bf16_matches_reference_under_autocast(path, bias):
    """fp32 inputs and weights under CPU bf16 autocast: matmul in bf16, loss in fp32, gradients in fp32."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(12, 16, generator=g, requires_grad=True)
    w = (torch.randn(40, 16, generator=g) / 4).requires_grad_()
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 40, (12,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(x, w, b), t)
    gx, gw = torch.autograd.grad(expected, (x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, linear_bias=b, options=PATHS[path])
    ox, ow = torch.autograd.grad(loss, (x, w))
    assert loss.dtype == expected.dtype == torch.float32
    assert ox.dtype == ow.dtype == torch.float32
    # Both compute the logits in bf16 and the rest in fp32: the difference is the bf16 rounding of the logits'
    # summation order (cross_entropy's vs ours), well inside one bf16 ulp of the values.
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(loss, expected, rtol=eps, atol=0)
    torch.testing.assert_close(ox, gx, rtol=2 * eps, atol=eps * gx.abs().max().item())
    torch.testing.assert_close(ow, gw, rtol=2 * eps, atol=eps * gw.abs().max().item())


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_autocast_cuda_matches_reference_under_autocast(dtype, path):
    g = torch.Generator(device="cuda").manual_seed(17)
    x = torch.randn(256, 64, device="cuda", generator=g, requires_grad=True)
    w = (torch.randn(1000, 64, device="cuda", generator=g) / 8).requires_grad_()
    t = torch.randint(0, 1000, (256,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=dtype):
        expected = F.cross_entropy(F.linear(x, w), t)
        loss = linear_cross_entropy(x, w, t, options=PATHS[path])
    gx, gw = torch.autograd.grad(expected, (x, w))
    ox, ow = torch.autograd.grad(loss, (x, w))
    assert loss.dtype == torch.float32 and ox.dtype == ow.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss, expected, rtol=eps, atol=0)
    torch.testing.assert_close(ow, gw, rtol=4 * eps, atol=2 * eps * gw.abs().max().item())
    torch.testing.assert_close(ox, gx, rtol=4 * eps, atol=2 * eps * gx.abs().max().item())


@cuda_only
@pytest.mark.gpu
def test_grad_scaler_fp16_scales_exactly_and_skips_inf_steps():
    g = torch.Generator(device="cuda").manual_seed(19)
    head = torch.nn.Linear(64, 3000, bias=False, device="cuda")
    x = torch.randn(512, 64, device="cuda", generator=g)
    t = torch.randint(0, 3000, (512,), device="cuda", generator=g)
    opts = LinearCrossEntropyOptions(backend="fused")
    with torch.autocast("cuda", dtype=torch.float16):
        plain = linear_cross_entropy(x, head.weight, t, options=opts)
    (by_hand,) = torch.autograd.grad(plain * 2.0**12, head.weight)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = linear_cross_entropy(x, head.weight, t, options=opts)
    scaler.scale(loss).backward()
    assert torch.equal(head.weight.grad, by_hand)  # the scaled backward is exactly the backward of the scaled loss
    with torch.autocast("cuda", dtype=torch.float16):
        eager = F.cross_entropy(F.linear(x, head.weight), t)
    (eager_grad,) = torch.autograd.grad(eager * 2.0**12, head.weight)
    eps = torch.finfo(torch.float16).eps
    torch.testing.assert_close(by_hand, eager_grad, rtol=4 * eps, atol=2 * eps * eager_grad.abs().max().item())
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    before = head.weight.detach().clone()
    head.weight.grad = None
    bad = x.clone()
    bad[3, 7] = float("inf")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = linear_cross_entropy(bad, head.weight, t, options=opts)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(head.weight.detach(), before)  # the inf/NaN step was skipped
    assert scaler.get_scale() < 2.0**12


def test_module_extras_and_monitoring():
    from linear_cross_entropy import LinearCrossEntropyLoss

    torch.manual_seed(23)
    head = LinearCrossEntropyLoss(
        8,
        30,
        bias=True,
        z_loss=1e-2,
        logit_softcap=4.0,
        monitoring=True,
        options=LinearCrossEntropyOptions(batch_chunk_size=5),
    )
    x, t = torch.randn(12, 8), torch.randint(0, 30, (12,))
    loss = head(x, t)
    expected = linear_cross_entropy(
        x, head.linear.weight, t, linear_bias=head.linear.bias, z_loss=1e-2, logit_softcap=4.0, return_metrics=True
    )
    torch.testing.assert_close(loss, expected.loss)
    for got, want in zip(head.metrics, expected.metrics):
        torch.testing.assert_close(got, want)
    assert "z_loss=0.01" in repr(head) and "monitoring=True" in repr(head)
    plain = LinearCrossEntropyLoss(8, 30)
    assert plain.metrics is None and "z_loss" not in repr(plain)
    plain(x, t)
    assert plain.metrics is None  # monitoring off: nothing collected
