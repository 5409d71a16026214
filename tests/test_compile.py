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
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        pairs.append(("cpu", "tiled"))
    if torch.cuda.is_available():  # "fused:recompute": the vocabulary-major weight-gradient pass, forced
        pairs += [("cuda", "fused"), ("cuda", "fused:recompute"), ("cuda", "tiled")]
    return pairs


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device,backend", _device_backends(), ids="-".join)
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


def test_custom_op_passes_opcheck():
    """Schema, fake kernel and autograd registration of the forward op agree with its real kernel."""
    from linear_cross_entropy.backends.common import Grads, LossParams
    from linear_cross_entropy.options import ResolvedOptions

    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 1, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (9, 1))
    lp = LossParams("mean", -100, 0.0, False, z_loss=0.01, metrics=True)
    ro = ResolvedOptions("chunked", "compact", torch.float64, 4, True)
    key = compiled._key("chunked", lp, ro, Grads(True, True, False))
    assert compiled._settings(key) == ("chunked", lp, ro, Grads(True, True, False))
    torch.library.opcheck(
        torch.ops.linear_cross_entropy.forward.default,
        (x, w, None, t, None, key),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
