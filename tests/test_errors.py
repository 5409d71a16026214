"""Bad input: every case under "Errors" in SPEC.md, on every path (``options=None``, ``backend="chunked"``,
``backend="auto"``). The exception type is the reference's (PyTorch 2.13's ``F.linear_cross_entropy(options=None)``
where installed, and ``F.cross_entropy(F.linear(...))`` where that composition is defined); the message starts with
PyTorch 2.13's own (what users' tests match) and names the argument. Also: the options and ``label_smoothing``
checks, the second-backward error, the fallback warning's location, class weights of another dtype on the options
path, and the target-range check under ``vmap`` and tensor subclasses."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICES,
    HAS_TORCH_LCE,
    HAS_TORCH_MODULE,
    assert_identical,
    forward_backward,
    make_case,
    oracle_loss,
    reference_grads,
    rel_err,
)

from linear_cross_entropy import LinearCrossEntropyLoss, LinearCrossEntropyOptions, linear_cross_entropy

N, FEAT, C = 4, 3, 5


@dataclasses.dataclass
class ErrorCase:
    name: str
    build: Callable  # (device) -> (input, linear_weight, target, kwargs)
    expected: type[Exception]
    match: str  # PyTorch's message, where it has one; ours also names the argument
    composable: bool  # F.cross_entropy(F.linear(...)) raises it too (the check is not linear_cross_entropy's own)
    cpu_only: bool = False
    composable_on_cpu_only: bool = False  # CUDA's cross_entropy is more permissive; we raise on every device


def _t(device, *shape, dtype=torch.float64):
    return torch.randn(shape, dtype=dtype, device=device)


def _idx(device, *shape, high=C):
    return torch.randint(0, high, shape, device=device)


CASES = [
    ErrorCase(
        "input_3d",
        lambda d: (_t(d, 2, N, FEAT), _t(d, C, FEAT), _idx(d, 2, N), {}),
        RuntimeError,
        r"input with dimensionality 1 or 2, got 3",
        composable=False,
    ),
    ErrorCase(
        "input_0d",
        lambda d: (_t(d), _t(d, C, FEAT), _idx(d, N), {}),
        RuntimeError,
        r"input with dimensionality 1 or 2, got 0",
        composable=False,
    ),
    ErrorCase(
        "linear_weight_1d",
        lambda d: (_t(d, N, FEAT), _t(d, FEAT), _idx(d, N), {}),
        RuntimeError,
        r"linear_weight with dimensionality at least 2",
        composable=False,
    ),
    ErrorCase(
        "in_features_mismatch",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT + 1), _idx(d, N), {}),
        RuntimeError,
        r"in_features",
        composable=True,
    ),
    ErrorCase(
        "bias_shape",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"linear_bias": _t(d, C - 1)}),
        RuntimeError,
        r"linear_bias shape",
        composable=True,
    ),
    ErrorCase(
        "bias_shape_kdim",
        lambda d: (_t(d, N, FEAT), _t(d, C, 2, FEAT), _idx(d, N, 2), {"linear_bias": _t(d, C)}),
        RuntimeError,
        r"linear_bias shape \(5, 2\)",
        composable=False,
    ),
    ErrorCase(
        "kdim_unbatched",
        lambda d: (_t(d, FEAT), _t(d, C, 2, FEAT), _idx(d, 2), {}),
        RuntimeError,
        r"linear_weight shape .* requires batched input",
        composable=False,
    ),
    ErrorCase(
        "ignore_index_with_probabilities",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _t(d, N, C).softmax(1), {"ignore_index": 1}),
        RuntimeError,
        r"ignore_index cannot be specified",
        composable=False,
    ),
    ErrorCase(
        "ignore_index_minus_100_with_probabilities",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _t(d, N, C).softmax(1), {"ignore_index": -100}),
        RuntimeError,
        r"ignore_index cannot be specified",
        composable=False,
    ),
    ErrorCase(
        "target_int32",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N).int(), {}),
        RuntimeError,
        r"target dtype",
        composable=True,
        composable_on_cpu_only=True,
    ),
    ErrorCase(
        "target_float_not_prob_shaped",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N).double(), {}),
        RuntimeError,
        r"expected target dtype to be Long or Byte, but got Double",
        composable=True,
        composable_on_cpu_only=True,
    ),
    ErrorCase(
        "integer_probabilities",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N, C, high=2), {}),
        RuntimeError,
        r"Expected floating point type for target with class probabilities, got Long",
        composable=True,
    ),
    ErrorCase(
        "integer_probabilities_unbatched",
        lambda d: (_t(d, FEAT), _t(d, C, FEAT), _idx(d, C, high=2), {}),
        RuntimeError,
        r"floating point type for target",
        composable=True,
    ),
    ErrorCase(
        "class_index_too_large",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), torch.tensor([0, 1, C, 2], device=d), {}),
        IndexError,
        rf"Target {C} is out of bounds",
        composable=True,
        cpu_only=True,
    ),
    ErrorCase(
        "class_index_negative",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), torch.tensor([0, -2, 1, 2], device=d), {}),
        IndexError,
        r"Target -2 is out of bounds",
        composable=True,
        cpu_only=True,
    ),
    ErrorCase(
        "class_index_kdim_out_of_range",
        lambda d: (_t(d, N, FEAT), _t(d, C, 2, FEAT), torch.full((N, 2), C + 3, device=d), {}),
        IndexError,
        rf"Target {C + 3} is out of bounds",
        composable=True,
        cpu_only=True,
    ),
    ErrorCase(
        "batch_size_mismatch",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N - 1), {}),
        ValueError,
        r"input batch_size \(4\) to match target batch_size \(3\)",
        composable=True,
    ),
    ErrorCase(
        "batch_size_mismatch_kdim",
        lambda d: (_t(d, N, FEAT), _t(d, C, 2, FEAT), _idx(d, N + 1, 2), {}),
        ValueError,
        r"batch_size",
        composable=True,
    ),
    ErrorCase(
        "label_smoothing_above_1",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"label_smoothing": 1.5}),
        RuntimeError,
        r"label_smoothing must be between 0.0 and 1.0",
        composable=True,
    ),
    ErrorCase(
        "label_smoothing_above_1_probabilities",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _t(d, N, C).softmax(1), {"label_smoothing": 1.01}),
        RuntimeError,
        r"label_smoothing",
        composable=True,
    ),
    ErrorCase(
        "unknown_reduction",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"reduction": "avg"}),
        ValueError,
        r"avg is not a valid value for reduction",
        composable=True,
    ),
    ErrorCase(
        "class_weight_size",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"weight": _t(d, C + 1).abs()}),
        RuntimeError,
        r"weight tensor should be defined either for all 5 classes",
        composable=True,
    ),
    ErrorCase(
        "class_weight_2d",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"weight": _t(d, 1, C).abs()}),
        RuntimeError,
        r"weight tensor",
        composable=True,
    ),
    ErrorCase(
        "dtype_mismatch_linear_weight",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT, dtype=torch.float32), _idx(d, N), {}),
        RuntimeError,
        r"^expected m1 and m2 to have the same dtype, but got: double != float\. .*linear_weight dtype",
        composable=True,
    ),
    ErrorCase(
        "dtype_mismatch_linear_bias",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"linear_bias": _t(d, C, dtype=torch.float32)}),
        RuntimeError,
        r"^self and mat2 must have the same dtype, but got Float and Double\. .*linear_bias dtype",
        composable=True,
    ),
    ErrorCase(
        "class_weight_integer",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"weight": _idx(d, C)}),
        RuntimeError,
        r"^expected scalar type Double but found Long\. .*weight \(class weights\)",
        composable=True,
    ),
]

PATHS = {
    "reference": None,
    "chunked": LinearCrossEntropyOptions(backend="chunked"),
    "auto": LinearCrossEntropyOptions(),
}


def _raised(fn) -> type[Exception] | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare the exact type
        return type(e)
    return None


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_error(case: ErrorCase, device, path):
    if case.cpu_only and device != "cpu":
        pytest.skip("on an accelerator the reference raises a device-side assert")
    x, w, t, kwargs = case.build(device)
    options = PATHS[path]
    with pytest.raises(Exception, match=case.match) as info:
        linear_cross_entropy(x, w, t, **kwargs, options=options)
    assert type(info.value) is case.expected, f"{type(info.value).__name__}: {info.value}"

    if HAS_TORCH_LCE:  # the reference path of PyTorch 2.13: its type, and its message as the start of ours
        with pytest.raises(Exception) as theirs:
            F.linear_cross_entropy(x, w, t, **kwargs, options=None)
        assert type(theirs.value) is case.expected, f"torch raises {theirs.value!r}"
        assert str(info.value).startswith(str(theirs.value)), f"ours {info.value}, torch's {theirs.value}"
    if case.composable and (device == "cpu" or not case.composable_on_cpu_only):
        assert _raised(lambda: oracle_loss(x, w, t, **kwargs)) is case.expected


@pytest.mark.parametrize("path", list(PATHS))
def test_error_with_requires_grad(path):
    """Checks run before any work, also when autograd is recording."""
    x = torch.randn(N, FEAT, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, FEAT, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="batch_size"):
        linear_cross_entropy(x, w, torch.randint(0, C, (N + 2,)), options=PATHS[path])
    with pytest.raises(IndexError, match="out of bounds"):
        linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 99]), options=PATHS[path])
    assert x.grad is None and w.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("path", list(PATHS))
def test_device_mismatch(path):
    x = torch.randn(N, FEAT, device="cuda")
    w = torch.randn(C, FEAT)
    with pytest.raises(RuntimeError):
        linear_cross_entropy(x, w, torch.randint(0, C, (N,), device="cuda"), options=PATHS[path])


# --------------------------------------------------------------------------------------------------------------
# Module constructor


MODULE_CASES = [
    ("class_weight_too_long", dict(weight=torch.ones(C + 1)), r"weight shape"),
    ("class_weight_2d", dict(weight=torch.ones(1, C)), r"weight shape"),
    ("label_smoothing_negative", dict(label_smoothing=-0.1), r"label_smoothing"),
    ("label_smoothing_above_1", dict(label_smoothing=1.5), r"label_smoothing"),
]


@pytest.mark.parametrize("name,kwargs,match", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_constructor_errors(name, kwargs, match):
    with pytest.raises(RuntimeError, match=match) as info:
        LinearCrossEntropyLoss(FEAT, C, **kwargs)
    assert type(info.value) is RuntimeError
    if HAS_TORCH_MODULE:
        with pytest.raises(RuntimeError) as theirs:
            torch.nn.LinearCrossEntropyLoss(FEAT, C, **kwargs)
        assert type(theirs.value) is RuntimeError
        assert str(theirs.value) == str(info.value)


@pytest.mark.parametrize("label_smoothing", [0.0, 1.0])
def test_module_constructor_accepts_bounds(label_smoothing):
    LinearCrossEntropyLoss(FEAT, C, label_smoothing=label_smoothing, weight=torch.ones(C))


# --------------------------------------------------------------------------------------------------------------
# Arguments checked before any work: options, label_smoothing


@pytest.mark.parametrize("options", [{"backend": "chunked"}, "chunked", LinearCrossEntropyOptions])
def test_options_of_another_type(options):
    x, w, t = _t("cpu", N, FEAT), _t("cpu", C, FEAT), _idx("cpu", N)
    pattern = r"options must be None or a LinearCrossEntropyOptions, got " + type(options).__name__
    with pytest.raises(TypeError, match=pattern + (r" \(build one with" if isinstance(options, dict) else "")):
        linear_cross_entropy(x, w, t, options=options)
    with pytest.raises(TypeError, match=pattern):
        LinearCrossEntropyLoss(FEAT, C, options=options)


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.13 has no LinearCrossEntropyOptions")
def test_torch_options_taken_as_ours(seed):
    """PyTorch's own options instance (a call written for ``F.linear_cross_entropy``) runs as ours with its five
    fields."""
    case = make_case(9, 4, 6, bias=True, class_weight=True, seed=seed)
    fields = dict(batch_chunk_size=4, acc_policy="compact", allow_retain_graph=True)
    theirs = forward_backward(linear_cross_entropy, case, options=torch.nn.LinearCrossEntropyOptions(**fields))
    assert_identical(theirs, forward_backward(linear_cross_entropy, case, options=LinearCrossEntropyOptions(**fields)))
    module = LinearCrossEntropyLoss(FEAT, C, options=torch.nn.LinearCrossEntropyOptions(**fields))
    assert module.options == LinearCrossEntropyOptions(**fields)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_label_smoothing_nan(probs, path):
    """NaN passes every range comparison and would give a NaN loss (as in PyTorch): a ValueError naming it."""
    x, w = _t("cpu", N, FEAT), _t("cpu", C, FEAT)
    t = _t("cpu", N, C).softmax(1) if probs else _idx("cpu", N)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0\.0, 1\.0\], got nan"):
        linear_cross_entropy(x, w, t, label_smoothing=float("nan"), options=PATHS[path])
    with pytest.raises(ValueError, match=r"label_smoothing"):
        LinearCrossEntropyLoss(FEAT, C, label_smoothing=float("nan"))


# --------------------------------------------------------------------------------------------------------------
# Backward and warnings

RETAIN_GRAPH = (
    r"^linear_cross_entropy chunked backward called twice; retain_graph=True / double backward are not supported\."  # noqa: E501 - PyTorch's message
)


@pytest.mark.parametrize("path", ["chunked", "auto"])
def test_second_backward_message(path):
    x, w = _t("cpu", N, FEAT).requires_grad_(), _t("cpu", C, FEAT).requires_grad_()
    loss = linear_cross_entropy(x, w, _idx("cpu", N), options=PATHS[path])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=RETAIN_GRAPH + r" .*allow_retain_graph=True") as ours:
        loss.backward()
    if HAS_TORCH_LCE:  # PyTorch's chunked path's own words, as the start of ours
        loss = F.linear_cross_entropy(x, w, _idx("cpu", N), options=torch.nn.LinearCrossEntropyOptions())
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=RETAIN_GRAPH) as theirs:
            loss.backward()
        assert str(ours.value).startswith(str(theirs.value))


def test_fallback_warning_points_at_the_callers_line():
    """The UserWarning of a backend that cannot serve the call names the user's file, through the functional form
    and through the module (torch.nn.Module's frames in between)."""
    x, t = _t("cpu", N, FEAT), _t("cpu", N, C).softmax(1)  # probability targets: the fused backend falls back
    options = LinearCrossEntropyOptions(backend="fused")
    with pytest.warns(UserWarning, match="backend='fused' unsupported here") as record:
        linear_cross_entropy(x, _t("cpu", C, FEAT), t, options=options)
        LinearCrossEntropyLoss(FEAT, C, dtype=torch.float64, options=options)(x, t)
    assert [w.filename for w in record] == [__file__, __file__], [(w.filename, w.lineno) for w in record]


# --------------------------------------------------------------------------------------------------------------
# Class weights of another floating dtype: refused by the reference (as PyTorch's), used in fp32 by the options
# path (as PyTorch's chunked path takes them)


@pytest.mark.parametrize("device", DEVICES)
def test_class_weight_dtype_refused_by_the_reference(device):
    x, w, t = _t(device, N, FEAT), _t(device, C, FEAT), _idx(device, N)
    with pytest.raises(
        RuntimeError, match=r"^expected scalar type Double but found Float\. .*weight \(class weights\)"
    ):
        linear_cross_entropy(x, w, t, weight=_t(device, C, dtype=torch.float32).abs())


def _bf16_with_fp32_class_weights(reduction, device, seed):
    """A bf16 case and fp32 class weights halfway between two bf16 values (rounding them moves each by 0.4%)."""
    case = make_case(48, 16, 40, bias=True, class_weight=True, reduction=reduction, device=device, seed=seed)
    low = case.to(torch.bfloat16)
    return low, low.weight.float() * (1 + 2**-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["chunked", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_input_fp32_class_weights(reduction, path, device, seed):
    """bf16 input with fp32 class weights on the options path: within twice plain PyTorch's bf16 error (plus one
    rounding) of float64 with the fp32 weights, gradients in bf16; PyTorch 2.13's chunked path takes the same call
    and lands as close."""
    low, cw = _bf16_with_fp32_class_weights(reduction, device, seed)
    expected = reference_grads(dataclasses.replace(low, weight=cw.double()))
    plain = forward_backward(oracle_loss, dataclasses.replace(low, weight=cw.to(torch.bfloat16)))
    ours = forward_backward(
        linear_cross_entropy, dataclasses.replace(low, weight=cw), options=LinearCrossEntropyOptions(backend=path)
    )
    eps = torch.finfo(torch.bfloat16).eps
    for name, a, p, e in zip(("loss", "grad_input", "grad_weight", "grad_bias"), ours, plain, expected):
        assert a.dtype == torch.bfloat16, name
        assert rel_err(a, e) <= 2 * rel_err(p, e) + eps, f"{name}: {rel_err(a, e):.3g} vs plain {rel_err(p, e):.3g}"
    if HAS_TORCH_LCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its fallback warnings
            theirs = F.linear_cross_entropy(
                low.input,
                low.linear_weight,
                low.target,
                **{**low.kwargs(), "weight": cw},
                options=torch.nn.LinearCrossEntropyOptions(),
            )
        assert rel_err(theirs, expected[0]) <= 2 * rel_err(plain[0], expected[0]) + eps
        assert rel_err(ours[0], theirs) <= 2 * rel_err(plain[0], expected[0]) + eps


@pytest.mark.parametrize("path", ["chunked", "auto"])
def test_bf16_input_class_weights_used_in_fp32(path, seed):
    """The fp32 loss (``loss_dtype``) of a sum is the fp32 weights' value, several times closer to it than to the
    value with the weights rounded to bf16 (which the bf16 logits' rounding alone cannot mask: 4e-5 vs 2e-3)."""
    low, cw = _bf16_with_fp32_class_weights("sum", "cpu", seed)
    options = LinearCrossEntropyOptions(backend=path, loss_dtype=torch.float32)
    loss = linear_cross_entropy(
        low.input, low.linear_weight, low.target, **{**low.kwargs(), "weight": cw}, options=options
    )
    fp32_weights = reference_grads(dataclasses.replace(low, weight=cw.double()))[0]
    bf16_weights = reference_grads(dataclasses.replace(low, weight=cw.to(torch.bfloat16).double()))[0]
    assert 8 * rel_err(loss, fp32_weights) < rel_err(loss, bf16_weights)


@pytest.mark.parametrize(
    "input_dtype,weight_dtype",
    [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float32, torch.bfloat16)],
)
def test_class_weights_in_the_accumulation_dtype(input_dtype, weight_dtype, seed):
    """Other pairs: the weights enter in fp32, or fp64 for fp64 input — the same result as weights converted so by
    the caller."""
    case = make_case(9, 4, 6, bias=True, class_weight=True, dtype=input_dtype, seed=seed)
    cw = case.weight.to(weight_dtype)
    options = LinearCrossEntropyOptions(backend="chunked")
    assert_identical(
        forward_backward(linear_cross_entropy, dataclasses.replace(case, weight=cw), options=options),
        forward_backward(
            linear_cross_entropy,
            dataclasses.replace(case, weight=cw.to(torch.promote_types(input_dtype, torch.float32))),
            options=options,
        ),
    )


# --------------------------------------------------------------------------------------------------------------
# The CPU target-range check reads values; where the target cannot be read (vmap, tensor subclasses) the backends'
# NaN marking signals a class index out of range instead


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vmap_over_targets(reduction, seed):
    """``torch.func.vmap`` over a batch of targets equals the loop over them; an out-of-range index inside the
    batch gives NaN in its entry (``"none"``: its row) and leaves the others as they are."""
    case = make_case(6, 4, 7, bias=True, class_weight=True, seed=seed)
    targets = torch.stack([make_case(6, 4, 7, seed=seed + i).target for i in range(3)])  # (3, N)
    options = LinearCrossEntropyOptions()

    def loss(t):
        return linear_cross_entropy(
            case.input, case.linear_weight, t, **{**case.kwargs(), "reduction": reduction}, options=options
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch's "no batching rule" performance note
        batched = torch.func.vmap(loss)(targets)
        loop = torch.stack([loss(t) for t in targets])
        assert_identical((batched,), (loop,))
        assert (
            rel_err(
                loop,
                torch.stack(
                    [
                        oracle_loss(case.input, case.linear_weight, t, **{**case.kwargs(), "reduction": reduction})
                        for t in targets
                    ]
                ),
            )
            <= 1e-12
        )
        bad = targets.clone()
        bad[1, 2] = 7
        out = torch.func.vmap(loss)(bad)
    if reduction == "none":
        assert out[1, 2].isnan() and not out[1, [0, 1, 3, 4, 5]].isnan().any()
    else:
        assert out[1].isnan()
    assert torch.equal(out[[0, 2]], batched[[0, 2]])
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):  # outside vmap: the reference's error
        loss(bad[1])


def test_target_subclass_composite_compliance(seed):
    """PyTorch's composite-compliance check (every tensor a wrapper subclass whose values cannot decide a branch)
    passes on the options path, and a subclass target with an out-of-range index gets the NaN marking."""
    composite_compliance = pytest.importorskip("torch.testing._internal.composite_compliance")
    case = make_case(6, 4, 7, seed=seed, ignore_frac=0.0)

    def op(x, w, t):
        return linear_cross_entropy(x, w, t, reduction="none", options=LinearCrossEntropyOptions(backend="chunked"))

    composite_compliance.check_with_mode(
        op, (case.input, case.linear_weight, case.target), {}, lambda a, e: torch.testing.assert_close(a, e)
    )
    cct, mode = composite_compliance.generate_cct_and_mode()
    bad = case.target.clone()
    bad[3] = -2
    with mode:
        out = op(cct(case.input, mode), cct(case.linear_weight, mode), cct(bad, mode)).elem
    assert out[3].isnan() and not out[[0, 1, 2, 4, 5]].isnan().any()
