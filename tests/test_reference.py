"""The reference path (``options=None``) is exactly ``F.cross_entropy(F.linear(...))`` and, where PyTorch ships it,
exactly ``torch.nn.functional.linear_cross_entropy(..., options=None)``: same loss and gradients, bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICES,
    HAS_TORCH_LCE,
    assert_identical,
    assert_signature_extends,
    forward_backward,
    make_case,
    oracle_loss,
    requires_torch_lce,
)

from linear_cross_entropy import linear_cross_entropy

# name -> (N, F, C, out_features); N None is an unbatched (F,) input.
SHAPES = {
    "2d": (6, 5, 7, ()),  # input (6, 5), linear_weight (7, 5)
    "kdim": (4, 5, 7, (2, 3)),  # input (4, 5), linear_weight (7, 2, 3, 5), logits (4, 7, 2, 3)
    "unbatched": (None, 5, 7, ()),  # input (5,), linear_weight (7, 5), logits (7,)
    "empty": (0, 5, 7, ()),  # input (0, 5)
    "kdim_empty": (0, 5, 7, (2,)),  # input (0, 5), logits (0, 7, 2)
}

# (probs, class_weight, ignore_index, label_smoothing, bias); ignore_index must be None with probabilities.
LOSS_CONFIGS = [
    (probs, cw, ii, ls, bias)
    for probs, cw, ii, ls, bias in itertools.product((False, True), (False, True), (None, 2), (0.0, 0.3), (False, True))
    if not (probs and ii is not None)
]


def _id(cfg):
    probs, cw, ii, ls, bias = cfg
    return f"{'probs' if probs else 'index'}-cw{int(cw)}-ii{ii}-ls{ls}-bias{int(bias)}"


def _ours(*args, **kwargs):
    return linear_cross_entropy(*args, **kwargs, options=None)


def _torch(*args, **kwargs):
    return F.linear_cross_entropy(*args, **kwargs, options=None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cfg", LOSS_CONFIGS, ids=_id)
def test_reference_grid(cfg, shape, reduction, device, seed):
    probs, cw, ii, ls, bias = cfg
    n, f, c, out = SHAPES[shape]
    case = make_case(
        n,
        f,
        c,
        out,
        probs=probs,
        bias=bias,
        class_weight=cw,
        ignore_index=ii,
        label_smoothing=ls,
        reduction=reduction,
        device=device,
        seed=seed,
    )
    ours = forward_backward(_ours, case)
    assert_identical(ours, forward_backward(oracle_loss, case), "vs cross_entropy(linear)")
    if HAS_TORCH_LCE:
        assert_identical(ours, forward_backward(_torch, case), "vs torch linear_cross_entropy")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("shape", ["2d", "kdim", "unbatched"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_reference_noncontiguous(probs, shape, layout, device, seed):
    n, f, c, out = SHAPES[shape]
    case = make_case(
        n,
        f,
        c,
        out,
        probs=probs,
        bias=True,
        class_weight=True,
        label_smoothing=0.1,
        reduction="sum",
        layout=layout,
        device=device,
        seed=seed,
    )
    assert not case.linear_weight.is_contiguous()
    assert not case.input.is_contiguous() or (layout == "transposed" and case.input.dim() == 1)
    dense = make_case(
        n,
        f,
        c,
        out,
        probs=probs,
        bias=True,
        class_weight=True,
        label_smoothing=0.1,
        reduction="sum",
        device=device,
        seed=seed,
    )
    ours = forward_backward(_ours, case)
    assert_identical(ours, forward_backward(oracle_loss, case), "vs cross_entropy(linear)")
    # Layout changes nothing but the float summation order of the GEMMs.
    expected = forward_backward(oracle_loss, dense)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    if HAS_TORCH_LCE:
        assert_identical(ours, forward_backward(_torch, case), "vs torch linear_cross_entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_reference_low_precision_identical(dtype, probs, seed):
    """Same ops as PyTorch, so identical in every dtype, not only float64."""
    case = make_case(8, 16, 11, probs=probs, bias=True, class_weight=True, label_smoothing=0.2, dtype=dtype, seed=seed)
    ours = forward_backward(_ours, case)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert_identical(ours, forward_backward(oracle_loss, case))
    if HAS_TORCH_LCE:
        assert_identical(ours, forward_backward(_torch, case))


def test_reference_output_shapes(seed):
    """Scalar for mean/sum; ``()``, ``(N,)``, ``(N, *out_features)`` for none."""
    for n, out, expected in [(None, (), ()), (3, (), (3,)), (3, (2, 4), (3, 2, 4)), (0, (2,), (0, 2))]:
        case = make_case(n, 4, 5, out, seed=seed)
        for reduction in ("mean", "sum"):
            assert linear_cross_entropy(case.input, case.linear_weight, case.target, reduction=reduction).shape == ()
        loss = linear_cross_entropy(case.input, case.linear_weight, case.target, reduction="none")
        assert loss.shape == expected


def test_reference_default_ignore_index_is_minus_100(seed):
    """``ignore_index=None`` means -100 for class indices: those rows drop out of the loss and the mean."""
    case = make_case(10, 4, 6, ignore_frac=0.5, seed=seed)
    assert (case.target == -100).any() and (case.target != -100).any()
    keep = case.target != -100
    loss = linear_cross_entropy(case.input, case.linear_weight, case.target)
    kept = F.cross_entropy(F.linear(case.input[keep], case.linear_weight), case.target[keep])
    torch.testing.assert_close(loss, kept, rtol=1e-14, atol=0)


@requires_torch_lce
def test_reference_signature_matches_torch():
    extras = {
        "z_loss": 0.0,
        "logit_scale": 1.0,
        "logit_softcap": None,
        "return_metrics": False,
        "process_group": None,
        "input_grad_all_reduce": True,
    }
    assert_signature_extends(linear_cross_entropy, F.linear_cross_entropy, extras)
