"""``LinearCrossEntropyLoss``: PyTorch 2.13's ``torch.nn.LinearCrossEntropyLoss`` parameter layout, initialisation
(that of ``nn.Linear``), buffers, state-dict keys, ``extra_repr`` and results; ``options`` as a plain attribute."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import (
    DEVICES,
    HAS_TORCH_MODULE,
    assert_identical,
    assert_results_close,
    assert_signature_extends,
    make_case,
    oracle_loss,
    rel_err,
    upstream_grad,
)
from torch import nn

from linear_cross_entropy import LinearCrossEntropyLoss, LinearCrossEntropyOptions, linear_cross_entropy

requires_torch_module = pytest.mark.skipif(not HAS_TORCH_MODULE, reason="torch < 2.13")

CONFIGS = [
    # (in_features, num_classes, out_features, bias)
    (8, 11, (), False),
    (8, 11, (), True),
    (6, 5, (3,), True),
    (6, 5, (2, 3), False),
]


def _ids(cfg):
    f, c, out, bias = cfg
    return f"F{f}-C{c}-out{'x'.join(map(str, out)) or '0'}-bias{int(bias)}"


def _run(module, x, target, grad_seed=1234):
    """Forward + backward through a module: (loss, grad_input, grad of linear.weight, grad of linear.bias)."""
    x = x.detach().clone().requires_grad_(True)
    loss = module(x, target)
    loss.backward(upstream_grad(loss, grad_seed))
    bias = module.linear.bias
    return loss.detach(), x.grad, module.linear.weight.grad, None if bias is None else bias.grad


def _inputs(f, c, out, n=7, probs=False, ignore_index=None, seed=0):
    case = make_case(n, f, c, out, probs=probs, ignore_index=ignore_index, dtype=torch.float32, seed=seed)
    return case.input, case.target  # (N, F), (N, *out) or (N, C, *out)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_init_matches_nn_linear(cfg, seed):
    """Same seed -> the same parameters as ``nn.Linear(in_features, C·prod(out_features), bias)``."""
    f, c, out, bias = cfg
    torch.manual_seed(seed)
    ours = LinearCrossEntropyLoss(f, c, out_features=out, bias=bias)
    torch.manual_seed(seed)
    linear = nn.Linear(f, math.prod(out, start=c), bias=bias)
    assert isinstance(ours.linear, nn.Linear)
    assert ours.linear.weight.shape == (c * math.prod(out), f)
    torch.testing.assert_close(ours.linear.weight, linear.weight, rtol=0, atol=0)
    if bias:
        assert ours.linear.bias.shape == (c * math.prod(out),)
        torch.testing.assert_close(ours.linear.bias, linear.bias, rtol=0, atol=0)
    else:
        assert ours.linear.bias is None
    assert [name for name, _ in ours.named_parameters()] == ["linear.weight"] + (["linear.bias"] if bias else [])


def test_device_and_dtype(seed):
    m = LinearCrossEntropyLoss(4, 6, out_features=(2,), bias=True, dtype=torch.float64, device="cpu")
    assert m.linear.weight.dtype == torch.float64 and m.linear.bias.dtype == torch.float64
    m = LinearCrossEntropyLoss(4, 6, device="meta")
    assert m.linear.weight.device.type == "meta"


@requires_torch_module
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("class_weight", [False, True])
def test_parity_with_torch_module(cfg, class_weight, seed):
    f, c, out, bias = cfg
    weight = torch.rand(c) + 0.5 if class_weight else None
    kwargs = dict(out_features=out, bias=bias, weight=weight, ignore_index=1, label_smoothing=0.1, reduction="sum")
    torch.manual_seed(seed)
    ours = LinearCrossEntropyLoss(f, c, **kwargs)
    torch.manual_seed(seed)
    theirs = torch.nn.LinearCrossEntropyLoss(f, c, **kwargs)

    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours).replace(type(ours).__name__, "X") == repr(theirs).replace(type(theirs).__name__, "X")
    for attr in ("num_classes", "out_features", "reduction", "ignore_index", "label_smoothing", "options"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr

    x, target = _inputs(f, c, out, ignore_index=1, seed=seed)
    assert_identical(_run(ours, x, target), _run(theirs, x, target))
    # Loading one's state dict into the other works both ways.
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


@requires_torch_module
def test_constructor_signature_matches_torch():
    extras = {
        "z_loss": 0.0,
        "logit_scale": 1.0,
        "logit_softcap": None,
        "monitoring": False,
        "process_group": None,
        "input_grad_all_reduce": True,
    }
    assert_signature_extends(LinearCrossEntropyLoss.__init__, torch.nn.LinearCrossEntropyLoss.__init__, extras)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_forward_equals_functional(cfg, probs, device, seed):
    """The module is the functional form on its reshaped parameters: (C, *out, F) weight, (C, *out) bias."""
    f, c, out, bias = cfg
    m = LinearCrossEntropyLoss(f, c, out_features=out, bias=bias, label_smoothing=0.2, device=device)
    x, target = _inputs(f, c, out, probs=probs, seed=seed)
    x, target = x.to(device), target.to(device)
    w = m.linear.weight.reshape(c, *out, f)
    b = None if m.linear.bias is None else m.linear.bias.reshape(c, *out)
    # Bitwise on the CPU; on CUDA the K-dimensional cross_entropy kernels reduce with atomics (last-bit noise).
    tol = 0 if device == "cpu" else 1e-6
    expected = linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.2)
    torch.testing.assert_close(m(x, target), expected, rtol=tol, atol=tol)
    expected = oracle_loss(x, w, target, linear_bias=b, label_smoothing=0.2)
    torch.testing.assert_close(m(x, target), expected, rtol=tol, atol=tol)


def test_class_weight_is_a_buffer(seed):
    weight = torch.rand(6) + 0.5
    m = LinearCrossEntropyLoss(4, 6, weight=weight)
    assert [name for name, _ in m.named_buffers()] == ["weight"]
    assert "weight" in m.state_dict() and "weight" not in dict(m.named_parameters())
    torch.testing.assert_close(m.weight, weight, rtol=0, atol=0)
    m64 = copy.deepcopy(m).double()
    assert m64.weight.dtype == torch.float64  # buffers follow .to()/.double()
    x, target = _inputs(4, 6, (), seed=seed)
    loss = m64(x.double(), target)
    w64 = m64.linear.weight
    expected = oracle_loss(x.double(), w64, target, weight=weight.double())
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert LinearCrossEntropyLoss(4, 6).weight is None


def test_defaults():
    m = LinearCrossEntropyLoss(4, 6)
    assert (m.num_classes, m.out_features, m.reduction, m.ignore_index, m.label_smoothing, m.options) == (
        6,
        (),
        "mean",
        None,
        0.0,
        None,
    )
    assert m.linear.bias is None
    assert m.extra_repr() == (
        "in_features=4, num_classes=6, out_features=(), bias=False, reduction=mean, ignore_index=None, "
        "label_smoothing=0.0, options=None"
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_options_attribute(cfg, reduction, seed):
    """``options`` is a plain attribute: not in the state dict, settable after construction, and the chunked
    path it selects gives the reference's loss and parameter gradients."""
    f, c, out, bias = cfg
    torch.manual_seed(seed)
    opts = LinearCrossEntropyOptions(backend="chunked", batch_chunk_size=3, allow_retain_graph=True)
    m = LinearCrossEntropyLoss(
        f,
        c,
        out_features=out,
        bias=bias,
        weight=torch.rand(c, dtype=torch.float64) + 0.5,
        reduction=reduction,
        label_smoothing=0.1,
        options=opts,
        dtype=torch.float64,
    )
    assert m.options is opts
    assert "options" not in m.state_dict() and not any("options" in k for k in m.state_dict())
    assert f"options={opts}" in m.extra_repr()
    x, target = _inputs(f, c, out, n=10, seed=seed)
    x = x.double()

    chunked = _run(m, x, target)
    m.zero_grad(set_to_none=True)
    m.options = None  # a plain attribute: switch paths on the same parameters
    reference = _run(m, x, target)
    assert_results_close(chunked, reference, 1e-10)

    m.options = LinearCrossEntropyOptions(backend="chunked")
    m.zero_grad(set_to_none=True)
    assert rel_err(_run(m, x, target)[0], reference[0]) <= 1e-10


def test_module_state_dict_roundtrip_with_options(seed):
    opts = LinearCrossEntropyOptions(backend="chunked")
    a = LinearCrossEntropyLoss(5, 7, out_features=(2,), bias=True, options=opts)
    b = LinearCrossEntropyLoss(5, 7, out_features=(2,), bias=True)
    b.load_state_dict(a.state_dict())
    x, target = _inputs(5, 7, (2,), seed=seed)
    torch.testing.assert_close(a(x, target), b(x, target), rtol=1e-6, atol=1e-6)
    assert b.options is None
