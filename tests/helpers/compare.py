"""The error metric, the tolerances against float64 and the result comparisons."""

from __future__ import annotations

import inspect
import math

import torch

RESULTS = ("loss", "grad_input", "grad_weight", "grad_bias")

# --------------------------------------------------------------------------------------------------------------
# Tolerances: ours against float64 within a multiple of plain PyTorch's own error in the same dtype
#
#   rel_err(ours, ref) <= SLACK[dtype] · rel_err(plain, ref) + FLOOR[dtype] + one ulp (+ roundings of summed terms)
#
# SLACK = 2 for every dtype: the CPU problems are tiny (H, V of 4 to 300), where plain's error is a handful of
#   roundings and one rounding more or fewer moves it by tens of percent; a 0.05% error in dz (fp32) or label
#   smoothing dropped (16 bits) fails it (test_tolerances.py).
# FLOOR: for results that plain happens to round almost exactly. 16-bit: a tenth of one rounding to the dtype
#   (the result's rounding dominates plain's error there); fp32: eight roundings of an fp32 accumulator (ours and
#   plain sum the GEMMs and the softmax in different orders, a few units apart, and plain's own error can be below).
# One ulp of the largest element: a correctly rounded result may still sit one flip from plain's, which on a
#   9-element vector alone exceeds the slack.
#
# LARGE_SLACK, LARGE_FLOOR (``large=True``): GPU problems of thousands of rows and classes against eager in the same
#   dtype. Plain's error there is a mean over millions of roundings, stable from run to run, so 1.25x suffices and
#   a 25% worse kernel fails; the floors (fp32 as above; about eps/100 in 16 bits) only guard exact results, and the
#   loss may always be one rounding to the dtype off (eager rounds it once from fp32).

EPS = {dtype: torch.finfo(dtype).eps for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
SLACK = {torch.float32: 2.0, torch.float16: 2.0, torch.bfloat16: 2.0}
FLOOR = {
    torch.float32: 8 * EPS[torch.float32],
    torch.float16: EPS[torch.float16] / 10,
    torch.bfloat16: EPS[torch.bfloat16] / 10,
}
LARGE_SLACK = {torch.float32: 1.25, torch.float16: 1.25, torch.bfloat16: 1.25}
LARGE_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
ROUNDINGS_PER_TERM = 4  # dz carries a few roundings (the logits, exp, the coefficients), each product and sum one more


def plain_bound(plain, ref, dtype, *, summed_terms=None, large=False, is_loss=False) -> float:
    """The largest relative error of ours against the float64 ``ref`` that the rule above allows, given plain's
    result in ``dtype``. ``summed_terms``: a float64 bound on the magnitudes of the terms the result sums before
    they cancel, whose few roundings it also allows (tiny shapes cancel)."""
    plain_err = rel_err(plain, ref)
    if large:
        bound = LARGE_SLACK[dtype] * plain_err + LARGE_FLOOR[dtype]
        return max(bound, EPS[dtype]) if is_loss else bound
    norm = max(ref.norm().item(), 1e-30)
    one_ulp = EPS[dtype] * ref.abs().max().item() / norm
    cancelled = 0.0 if summed_terms is None else ROUNDINGS_PER_TERM * EPS[dtype] * summed_terms.norm().item() / norm
    return SLACK[dtype] * plain_err + FLOOR[dtype] + one_ulp + cancelled


def within_plain(ours, plain, ref, dtype, *, names=RESULTS, summed_terms=None, large=False) -> list[str]:
    """The results (tuples in ``names``' order; ``None`` entries skipped) of ours beyond :func:`plain_bound`, as
    messages (empty: all within). ``summed_terms``: per result, as :func:`plain_bound` takes it, or None."""
    failures = []
    terms = summed_terms or (None,) * len(names)
    for name, o, p, r, t in zip(names, ours, plain, ref, terms):
        if r is None:
            assert o is None and p is None, name
            continue
        assert o.dtype == p.dtype, (name, o.dtype, p.dtype)
        err = rel_err(o, r)
        bound = plain_bound(p, r, dtype, summed_terms=t, large=large, is_loss=name == "loss")
        if not err <= bound:  # NaN fails too
            failures.append(f"{name}: relative error {err:.3g} > bound {bound:.3g} (plain {rel_err(p, r):.3g})")
    return failures


def assert_within_plain(ours, plain, ref, dtype, **kw) -> None:
    """:func:`within_plain`, raising on any result out of bounds."""
    failures = within_plain(ours, plain, ref, dtype, **kw)
    assert not failures, f"{dtype}: " + "; ".join(failures)


def rel_err(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """Relative L2 error ``‖actual − expected‖ / ‖expected‖`` in float64 (absolute when ``expected`` is 0), on
    ``actual``'s device.

    NaNs must sit at the same positions in both (else ``inf``); they are excluded from the norm. Shapes must match.
    """
    if actual is None or expected is None:
        assert actual is None and expected is None, "one of the tensors is None"
        return 0.0
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        return math.inf
    a, e = a[~nan_a], e[~nan_e]
    if not (a.isfinite().all() and e.isfinite().all()):
        return 0.0 if torch.equal(a, e) else math.inf
    num = (a - e).norm().item()
    den = e.norm().item()
    return num / den if den > 0 else num


def assert_results_close(actual, expected, tol: float, what: str = ""):
    """``actual``/``expected`` are ``(loss, grad_input, grad_weight, grad_bias)`` tuples; each within ``tol``."""
    for name, a, e in zip(RESULTS, actual, expected):
        err = rel_err(a, e)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol:.3g}"


def assert_identical(actual, expected, what: str = ""):
    """Bitwise equality of result tuples (NaN == NaN)."""
    for name, a, e in zip(RESULTS, actual, expected):
        if a is None or e is None:
            assert a is None and e is None, f"{what} {name}: one is None"
            continue
        # CUDA's cross_entropy reductions (atomics in the K-dimensional and weighted kernels) are not
        # run-to-run deterministic: two identical calls may differ in the last bits there.
        tol = 0 if a.device.type == "cpu" else 1e-12
        torch.testing.assert_close(
            a, e, rtol=tol, atol=tol, equal_nan=True, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


def assert_signature_extends(ours, theirs, extras: dict) -> None:
    """PyTorch's parameters first, in order, kinds and defaults; ours after them, keyword-only, with ``extras``
    (name → default, the value that switches the addition off)."""
    ours, theirs = inspect.signature(ours), inspect.signature(theirs)
    assert list(ours.parameters) == list(theirs.parameters) + list(extras)
    for name, default in extras.items():
        assert ours.parameters[name].kind == inspect.Parameter.KEYWORD_ONLY, name
        assert ours.parameters[name].default == default, name
    for name, q in theirs.parameters.items():
        assert ours.parameters[name].kind == q.kind, name
        assert ours.parameters[name].default == q.default, name
