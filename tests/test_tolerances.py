"""The tolerances of ``helpers.assert_within_plain`` can fail: plausible bugs, injected into plain PyTorch itself (so
no backend is involved), land outside the bound in every dtype the tests use."""

import pytest
import torch
import torch.nn.functional as F
from helpers import Case, forward_backward, make_case, oracle_loss, plain_loss, reference_grads, within_plain


def _with_dz(case: Case, upstream: torch.Tensor, bug):
    """``(loss, grad_input, grad_weight, grad_bias)`` of plain PyTorch (logits in the input dtype, softmax in fp32)
    with the logit gradient passed through ``bug(dz32, g)`` instead of ``(g·dz32).to(dtype)``."""
    x, w, b = case.input, case.linear_weight, case.linear_bias
    logits = F.linear(x, w, b).float().requires_grad_()
    kwargs = dict(weight=None if case.weight is None else case.weight.float(), reduction=case.reduction)
    loss = F.cross_entropy(logits, case.target, label_smoothing=case.label_smoothing, **kwargs)
    (dz,) = torch.autograd.grad(loss, logits)
    dz = bug(dz, upstream).to(x.dtype)  # (N, C)
    grad_b = None if b is None else dz.sum(0)
    return loss.to(x.dtype).detach(), dz @ w, dz.T @ x, grad_b


@pytest.mark.parametrize("shape", [(13, 8, 203), (6, 4, 9), (37, 24, 75)], ids=lambda s: "x".join(map(str, s)))
def test_a_small_error_in_dz_fails(shape):
    """A 0.05% error in ``dz`` (fp32) is far outside the bound, in every gradient; the same computation without
    it is inside."""
    case = make_case(*shape, bias=True, dtype=torch.float32, seed=sum(shape), scale=2.0, ignore_frac=0.2)
    g = torch.tensor(1.0)
    ref = reference_grads(case, upstream=g.double())
    plain = forward_backward(plain_loss, case, upstream=g)
    right = _with_dz(case, g, lambda dz, g: dz)
    assert not within_plain(right, plain, ref, torch.float32)
    wrong = _with_dz(case, g, lambda dz, g: dz * (1 + 5e-4))
    failures = within_plain(
        wrong[1:], plain[1:], ref[1:], torch.float32, names=("grad_input", "grad_weight", "grad_bias")
    )
    assert len(failures) == 3, failures


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_label_smoothing_dropped_fails(dtype, seed):
    """A plausible bug (label smoothing dropped), everything else right and computed in float64, against plain
    PyTorch in 16 bits (all in that dtype: the chunked tests' yardstick)."""
    case = make_case(64, 32, 96, bias=True, class_weight=True, label_smoothing=0.1, dtype=dtype, seed=seed, scale=1.5)
    expected = reference_grads(case)
    plain = forward_backward(oracle_loss, case)
    wrong = forward_backward(oracle_loss, Case(**{**case.__dict__, "label_smoothing": 0.0}).to(torch.float64))
    wrong = tuple(t.to(dtype) for t in wrong)
    assert within_plain(wrong, plain, expected, dtype)
