"""Small CPU calls with default options run the reference computation (logits materialised, softmax in fp32):
the rule (:func:`linear_cross_entropy.options.materializes`), the precision the route keeps, and the behaviours
that must not depend on a call's size (dtype of the loss, class-weight precision, a second backward)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_within_plain, forward_backward, make_case, plain_loss, reference_grads, rel_err

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
def test_small_call_precision(dtype, extras, seed):
    """Within plain PyTorch's bound (softmax in fp32) against float64, and as close to the chunked backend's results
    as plain is to float64 (the same roundings: logits and dz in the input dtype, the softmax in fp32)."""
    kw = dict(bias=True, class_weight=True, label_smoothing=0.1) if extras == "bias+weights+smoothing" else {}
    out_features = (3,) if extras == "k-dim" else ()
    case = make_case(24, 16, 40, out_features, dtype=dtype, seed=seed, reduction="sum", **kw)
    ours = forward_backward(linear_cross_entropy, case, options=LinearCrossEntropyOptions())
    chunked = forward_backward(linear_cross_entropy, case, options=LinearCrossEntropyOptions(backend="chunked"))
    ref = reference_grads(case)
    if not out_features:
        plain = forward_backward(plain_loss, case)
        assert_within_plain(ours, plain, ref, dtype)
    for name, a, b, r in zip(("loss", "grad_input", "grad_weight", "grad_bias"), ours, chunked, ref):
        if r is not None:
            assert rel_err(a, r) <= 2 * rel_err(b, r) + 4 * torch.finfo(dtype).eps, name


def test_loss_dtype_and_fp32_class_weights_on_the_small_route():
    """``loss_dtype=float32`` returns the fp32 value; fp32 class weights with bf16 input are not rounded to bf16."""
    case = make_case(16, 8, 12, class_weight=True, dtype=torch.bfloat16, seed=2)
    weight = torch.rand(12, dtype=torch.float32) + 0.5 + 1e-3  # not representable in bf16
    options = LinearCrossEntropyOptions(loss_dtype=torch.float32)
    loss = linear_cross_entropy(case.input, case.linear_weight, case.target, weight=weight, options=options)
    assert loss.dtype == torch.float32
    logits = torch.nn.functional.linear(case.input, case.linear_weight).float()
    expected = torch.nn.functional.cross_entropy(logits, case.target, weight=weight)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


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
