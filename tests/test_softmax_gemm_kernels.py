"""The softmax-fused GEMMs (``backends/fused/softmax_gemm*.py``) against float64.

On the CPU they run under ``TRITON_INTERPRET=1`` (set by conftest when no GPU) in fp32 and fp16 on tiny shapes: V
not a multiple of the tile, rows not a multiple of the tile, ignored targets, bias, label smoothing. The tolerance
is plain PyTorch's error in the same dtype (logits in that dtype, softmax in fp32, gradients back through GEMMs in
that dtype) times a slack, so a wrong term fails. The ``gpu`` variants run bf16 at bigger shapes with the GPU tiles.
"""

import pytest
import torch
import torch.nn.functional as F

from linear_cross_entropy.backends.common import LossParams

pytest.importorskip("triton")
from helpers.compare import plain_bound, rel_err  # noqa: E402
from helpers.env import gpu_only, needs_interpreter  # noqa: E402

from linear_cross_entropy.backends.fused import softmax_gemm as sg  # noqa: E402
from linear_cross_entropy.backends.fused.gemm import row_padded  # noqa: E402


def interpreter(test):
    """Marked ``interpreter`` (CI's selection) and skipped where the kernels would not run in the interpreter."""
    return pytest.mark.interpreter(needs_interpreter(test))


def _problem(r, h, v, dtype, device, seed, bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2 / h**0.5)
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (r,), generator=g)
    y[torch.rand(r, generator=g) < 0.2] = -100
    share = (torch.rand(r, generator=g) + 0.5).to(torch.bfloat16).float()  # exact in every dtype
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), y.to(device), share.to(device)


def _plain(x, w, b, y, share, eps, work_dtype):
    """Per-row losses, dz, grad_x, grad_W: logits in ``x``'s dtype, the softmax in ``work_dtype``, the gradient
    GEMMs back in ``x``'s dtype (eager's rounding); float64 inputs give the oracle."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    z = F.linear(x, w, b)
    z.retain_grad()
    loss = F.cross_entropy(z.to(work_dtype), y, reduction="none", label_smoothing=eps)
    loss.backward(share.to(loss.dtype))
    return {"loss": loss.detach(), "z": z.detach(), "dz": z.grad, "grad_x": x.grad, "grad_w": w.grad}


def _ours(x, w, b, y, share, eps, config=None, chunks=1):
    """The same through the fused GEMMs; ``chunks`` > 1 accumulates grad_W in an fp32 scratch chunk by chunk."""
    (r, h), v = x.shape, w.shape[0]
    lp = LossParams("none", -100, eps, False)
    z = row_padded(r, v, x.dtype, x.device).fill_(float("nan"))  # poisoned: every logit must be written
    dz = row_padded(r, v, x.dtype, x.device).fill_(float("nan"))
    stats = sg.logits_stats(x, w, b, y, z, lp, config)
    loss, lse, coefs = sg.combine_stats(stats, y, lp, v, (share, share))
    grad_x = torch.full((r, h), float("nan"), dtype=x.dtype, device=x.device)
    sg.input_grad(z, w, y, lse, coefs, lp, grad_x, dz, config)
    grad_w = torch.full((v, h), float("nan"), dtype=torch.float32 if chunks > 1 else x.dtype, device=x.device)
    bounds = [r * i // chunks for i in range(chunks + 1)]
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = slice(start, stop)
        sg.weight_grad(
            z[rows], x[rows], y[rows], lse[rows], coefs[:, rows].contiguous(), lp, grad_w, i > 0, config
        )  # fmt: skip
    return {"loss": loss, "z": z, "dz": dz, "grad_x": grad_x, "grad_w": grad_w}


def _check(r, h, v, dtype, device, bias, eps, seed, config=None, chunks=1):
    x, w, b, y, share = _problem(r, h, v, dtype, device, seed, bias)
    x64, w64, b64 = (None if t is None else t.double() for t in (x, w, b))
    exact = _plain(x64, w64, b64, y, share.double(), eps, torch.float64)
    plain = _plain(x, w, b, y, share, eps, torch.float32)
    ours = _ours(x, w, b, y, share, eps, config, chunks)
    for name in ("z", "loss", "dz", "grad_x", "grad_w"):
        assert not ours[name].isnan().any(), f"{name}: NaN (unwritten?)"
        tol = plain_bound(plain[name], exact[name], dtype, large=device == "cuda", is_loss=name == "loss")
        err = rel_err(ours[name], exact[name])
        assert err <= tol, (
            f"{name}: relative error {err:.3g} > {tol:.3g} (plain {rel_err(plain[name], exact[name]):.3g})"
        )


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 24, 75), (16, 32, 48)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("extras", [(False, 0.0), (True, 0.0), (True, 0.2)], ids=["plain", "bias", "bias+smoothing"])
def test_softmax_gemms_match_float64(dtype, shape, extras):
    bias, eps = extras
    _check(*shape, dtype, "cpu", bias, eps, seed=sum(shape) + int(bias) + int(eps * 10))


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_grad_accumulates_over_chunks(dtype):
    """Three chunks added into an fp32 scratch (``accumulate``), the first one written over NaNs."""
    _check(37, 24, 75, dtype, "cpu", True, 0.1, seed=5, chunks=3)


@interpreter
def test_tolerance_can_fail():
    """A wrong coefficient (the target term dropped) must exceed the tolerance the checks use."""
    x, w, b, y, share = _problem(37, 24, 75, torch.float32, "cpu", 1, True)
    lp = LossParams("none", -100, 0.0, False)
    z = row_padded(37, 75, x.dtype, x.device)
    loss, lse, coefs = sg.combine_stats(sg.logits_stats(x, w, b, y, z, lp), y, lp, 75, (share, share))
    coefs[1] = 0.0
    grad_x = torch.empty_like(x)
    sg.input_grad(z, w, y, lse, coefs, lp, grad_x)
    exact = _plain(x.double(), w.double(), b.double(), y, share.double(), 0.0, torch.float64)
    plain = _plain(x, w, b, y, share, 0.0, torch.float32)
    assert rel_err(grad_x, exact["grad_x"]) > plain_bound(plain["grad_x"], exact["grad_x"], x.dtype)


def test_supported_declines_what_the_kernels_do_not_cover():
    lp = LossParams("mean", -100, 0.0, False)
    t = torch.zeros(4, 8)
    assert sg.supported(lp, None, t)
    assert not sg.supported(lp, torch.ones(8), t)  # class weights
    assert not sg.supported(LossParams("mean", -100, 0.0, False, logit_softcap=30.0), None, t)
    assert not sg.supported(lp, None, torch.zeros(4, 7)[:, :5])  # row stride not 16-byte aligned


@pytest.mark.parametrize("shape", [(1000, 256, 5003), (512, 768, 8192)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("extras", [(False, 0.0), (True, 0.1)], ids=["plain", "bias+smoothing"])
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu_only, id="cuda")])
def test_softmax_gemms_gpu_bf16(shape, extras, _):
    _check(*shape, torch.bfloat16, "cuda", *extras, seed=sum(shape), chunks=2)
