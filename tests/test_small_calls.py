"""Small CPU calls with default options run PyTorch's own computation (logits materialised, the softmax in the input's
dtype): the rule (:func:`linear_cross_entropy.options.materializes`), results bit for bit PyTorch's, and the
behaviours that must not depend on a call's size (dtype of the loss, class-weight precision, a second backward)."""

from __future__ import annotations

import pytest
import torch
from helpers import forward_backward, make_case

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.options import _MATERIALIZE_MAX_LOGITS, materializes

CPU = torch.device("cpu")


def _chunked_function_ran(loss: torch.Tensor) -> bool:
    """Whether the chunked backend's autograd Function made ``loss`` (its node, or an output cast's input)."""
    node = loss.grad_fn
    while node is not None and "Chunked" not in type(node).__name__ and node.next_functions:
        node = node.next_functions[0][0]
    return node is not None and "Chunked" in type(node).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rule_threshold_per_element_size(dtype):
    limit = _MATERIALIZE_MAX_LOGITS[dtype.itemsize]
    options = LinearCrossEntropyOptions()
    assert materializes(options, num_logits=limit, dtype=dtype, device=CPU)
    assert not materializes(options, num_logits=limit + 1, dtype=dtype, device=CPU)
    assert not materializes(options, num_logits=1, dtype=dtype, device=torch.device("cuda"))


@pytest.mark.parametrize(
    "fields",
    [
        dict(backend="chunked"),
        dict(batch_chunk_size=4),
        dict(chunking_method=None),
        dict(chunking_method="aspect_ratio"),
        dict(acc_policy="compact"),
        dict(acc_dtype=torch.float32),
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_explicit_fields_keep_the_chunked_backend(fields):
    """Any field that picks a backend, chunks or accumulation is honoured: the call runs the chunked backend."""
    assert not materializes(LinearCrossEntropyOptions(**fields), num_logits=8, dtype=torch.float32, device=CPU)
    case = make_case(9, 4, 6, bias=True, dtype=torch.float32, seed=3)
    loss = linear_cross_entropy(
        case.input.requires_grad_(), case.linear_weight, case.target, **case.kwargs(),
        options=LinearCrossEntropyOptions(**fields),
    )  # fmt: skip
    assert _chunked_function_ran(loss)


def test_route_switches_at_the_threshold():
    """Default options: materialised up to the threshold, chunked beyond it (fp32: 2^20 logits)."""
    limit = _MATERIALIZE_MAX_LOGITS[4]
    for rows, expect_chunked in ((limit // 1024, False), (limit // 1024 + 1, True)):
        x = torch.randn(rows, 4, requires_grad=True)
        loss = linear_cross_entropy(
            x, torch.randn(1024, 4), torch.randint(0, 1024, (rows,)), options=LinearCrossEntropyOptions()
        )
        assert _chunked_function_ran(loss) == expect_chunked, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extras", ["plain", "bias+weights+smoothing", "k-dim"])
def test_small_call_is_pytorchs_computation(dtype, extras, seed):
    """Loss and every gradient bit for bit those of ``cross_entropy(linear(...))`` in the input's dtype: our
    reference path and the call as a user writes it (its precision is PyTorch's own, by construction)."""
    kw = dict(bias=True, class_weight=True, label_smoothing=0.1) if extras == "bias+weights+smoothing" else {}
    out_features = (3,) if extras == "k-dim" else ()
    case = make_case(24, 16, 40, out_features, dtype=dtype, seed=seed, reduction="sum", **kw)
    ours = forward_backward(linear_cross_entropy, case, options=LinearCrossEntropyOptions())
    reference = forward_backward(linear_cross_entropy, case, options=None)
    for name, a, b in zip(("loss", "grad_input", "grad_weight", "grad_bias"), ours, reference):
        assert (a is None and b is None) or torch.equal(a, b), name
    if not out_features:
        eager = forward_backward(_eager, case)
        for name, a, b in zip(("loss", "grad_input", "grad_weight", "grad_bias"), ours, eager):
            assert (a is None and b is None) or torch.equal(a, b), name


def _eager(input, linear_weight, target, linear_bias=None, *, ignore_index=None, **kwargs):
    """The call as a user writes it, in the input's dtype throughout."""
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    return torch.nn.functional.cross_entropy(
        logits, target, ignore_index=-100 if ignore_index is None else ignore_index, **kwargs
    )


def test_fp32_loss_or_class_weights_take_the_chunked_backend():
    """``loss_dtype=float32`` with bf16 input, or fp32 class weights with bf16 input, is not PyTorch's call: the
    chunked backend serves it, the loss in fp32 and the weights not rounded to bf16."""
    assert not materializes(
        LinearCrossEntropyOptions(loss_dtype=torch.float32), num_logits=8, dtype=torch.bfloat16, device=CPU
    )
    assert materializes(
        LinearCrossEntropyOptions(loss_dtype=torch.float32), num_logits=8, dtype=torch.float32, device=CPU
    )
    case = make_case(16, 8, 12, class_weight=True, dtype=torch.bfloat16, seed=2)
    weight = torch.rand(12, dtype=torch.float32) + 0.5 + 1e-3  # not representable in bf16
    x = case.input.clone().requires_grad_()
    for options, w in (
        (LinearCrossEntropyOptions(loss_dtype=torch.float32), weight),
        (LinearCrossEntropyOptions(), weight),
        (LinearCrossEntropyOptions(loss_dtype=torch.float32), weight.bfloat16()),
    ):
        loss = linear_cross_entropy(x, case.linear_weight, case.target, weight=w, options=options)
        assert _chunked_function_ran(loss)
        logits = torch.nn.functional.linear(case.input, case.linear_weight).float()
        expected = torch.nn.functional.cross_entropy(logits, case.target, weight=w.float())
        tolerance = 1e-6 if options.loss_dtype == torch.float32 else torch.finfo(torch.bfloat16).eps
        assert loss.float().item() == pytest.approx(expected.item(), rel=tolerance)


def test_second_backward_allowed_with_allow_retain_graph():
    """``allow_retain_graph=True``: repeated backward accumulates the same gradients, as on the chunked path."""
    case = make_case(9, 4, 6, dtype=torch.float32, seed=5)
    x = case.input.clone().requires_grad_()
    loss = linear_cross_entropy(
        x, case.linear_weight, case.target, options=LinearCrossEntropyOptions(allow_retain_graph=True)
    )
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
