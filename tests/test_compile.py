"""torch.compile(fullgraph=True) of a model whose loss is ours: no graph breaks, same results as eager.

Under compile the backends run as one opaque ``torch.library`` custom op with a fake kernel
(``backends/compiled.py``); the chunked path is checked on the CPU (CI), the tiled path on the CPU in Triton's
interpreter (CI) and on CUDA, the fused path on CUDA.
"""

import importlib.util
import os

import pytest
import torch

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.backends import compiled

# Triton kernels run on the CPU in its interpreter (CI): the Triton backends' ops are checked there too
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=61, hidden=16, **loss_kwargs):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=True)
        self.loss_kwargs = loss_kwargs

    def forward(self, tokens, labels, options):
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        return linear_cross_entropy(
            hidden, self.head.weight, labels, linear_bias=self.head.bias, options=options, **self.loss_kwargs
        )


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


CASES = {
    "mean": dict(),
    "sum+extras+metrics": dict(
        reduction="sum", z_loss=1e-3, logit_softcap=5.0, label_smoothing=0.1, return_metrics=True
    ),
    "none": dict(reduction="none"),
}


def _device_backends():
    """(device, backend) pairs: chunked on the CPU, the Triton backends on CUDA, and the tiled backend's kernels
    on the CPU too where they run in Triton's interpreter."""
    pairs = [("cpu", "chunked")]
    if TRITON_ON_CPU:
        pairs.append(("cpu", "tiled"))
    if torch.cuda.is_available():  # "fused:recompute": the vocabulary-major weight-gradient pass, forced
        pairs += [("cuda", "fused"), ("cuda", "fused:recompute"), ("cuda", "tiled")]
    return [pytest.param(device, backend, id=f"{device}-{backend}") for device, backend in pairs]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device,backend", _device_backends())
def test_fullgraph_compile_matches_eager(case, device, backend, force_weight_grad_pass):
    backend, _, weight_grad_pass = backend.partition(":")
    if weight_grad_pass:
        force_weight_grad_pass(weight_grad_pass)
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = CASES[case]
    model = TinyLM(**kwargs).to(device)
    tokens = torch.randint(0, 61, (40,), device=device)
    labels = torch.randint(0, 61, (40,), device=device)
    labels[::7] = -100
    options = LinearCrossEntropyOptions(backend=backend, batch_chunk_size=16)

    def loss_of(out):
        loss = out.loss if kwargs.get("return_metrics") else out
        return loss.sum() if kwargs.get("reduction") == "none" else loss

    eager_out = model(tokens, labels, options)
    loss_of(eager_out).backward()
    eager_grads = _grads(model)
    model.zero_grad()

    compiled_model = torch.compile(model, fullgraph=True)  # raises on any graph break
    out = compiled_model(tokens, labels, options)
    loss_of(out).backward()
    torch.testing.assert_close(loss_of(out), loss_of(eager_out).detach())
    for got, want in zip(_grads(model), eager_grads):
        torch.testing.assert_close(got, want)
    if kwargs.get("return_metrics"):
        for got, want in zip(out.metrics, eager_out.metrics):
            torch.testing.assert_close(got, want)


def _opcheck_cases():
    """(backend, dtype): the chunked path in fp64 (a 3-D weight); the fused path, where Triton runs on the CPU, in
    fp16 in chunks, whose fp32 accumulators leave the op in fp32 (the fake kernel must say so)."""
    cases = [("chunked", torch.float64)]
    if TRITON_ON_CPU:
        cases.append(("fused", torch.float16))
    return cases


@pytest.mark.parametrize("backend,dtype", _opcheck_cases(), ids=lambda c: str(c).removeprefix("torch."))
def test_custom_op_passes_opcheck(backend, dtype):
    """Schema, fake kernel and autograd registration of the forward op agree with its real kernel."""
    from linear_cross_entropy.backends.common import Grads, LossParams
    from linear_cross_entropy.options import ResolvedOptions

    fused = backend == "fused"
    x = torch.randn(9, 5, dtype=dtype, requires_grad=True)
    w = torch.randn(*((13, 5) if fused else (13, 1, 5)), dtype=dtype, requires_grad=True)
    b = torch.randn(13, dtype=dtype, requires_grad=True) if fused else None
    t = torch.randint(0, 13, (9,) if fused else (9, 1))
    lp = LossParams("mean", -100, 0.0, False, z_loss=0.01, metrics=True)
    policy, acc_dtype = ("balanced", torch.float32) if fused else ("compact", torch.float64)
    ro = ResolvedOptions(backend, policy, acc_dtype, 4, True)
    grads = Grads(True, True, fused)
    key = compiled._key(backend, lp, ro, grads)
    assert compiled._settings(key) == (backend, lp, ro, grads)
    op = torch.ops.linear_cross_entropy.forward.default
    if fused:  # the accumulators the fake kernel promises are the ones the op returns
        assert [g.dtype for g in op(x, w, b, t, None, key)[3:]] == [torch.float32] * 3
    torch.library.opcheck(
        op,
        (x, w, b, t, None, key),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def _fused_devices():
    devices = []
    if TRITON_ON_CPU:
        devices.append("cpu")
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.mark.parametrize("device", _fused_devices())
def test_compiled_fused_path_rounds_the_gradients_once_after_scaling(device, force_weight_grad_pass):
    """16-bit inputs in chunks keep fp32 accumulators (the default policy); compiled, they leave the op in fp32 and
    are rounded once after the upstream gradient scales them, as in eager. With ``g = 1/3`` (gradient
    accumulation over three micro-batches) both give the same bits; gradients rounded in forward and scaled after
    differ from them in some elements. (The vocabulary-major weight-gradient pass of small chunks is left out:
    eager folds ``g`` into its ``dz``, which the compiled op, computing it in forward, cannot.)"""
    force_weight_grad_pass("accumulate")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    n, h, v = 40, 16, 61
    x = torch.randn(n, h, generator=gen).to(device, torch.float16)
    w = (torch.randn(v, h, generator=gen) / h**0.5).to(device, torch.float16)
    b = (torch.randn(v, generator=gen) * 0.1).to(device, torch.float16)
    y = torch.randint(0, v, (n,), generator=gen).to(device)
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=16)

    def step(x, w, b, y):
        return linear_cross_entropy(x, w, y, linear_bias=b, options=options)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        (fn(*leaves, y) / 3).backward()
        return [t.grad for t in leaves]

    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True))
    for got, want, name in zip(compiled, eager, ("input", "weight", "bias")):
        assert got.dtype == want.dtype == torch.float16, name
        assert torch.equal(got, want), name
