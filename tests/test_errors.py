"""Bad input: every case under "Errors" in SPEC.md, on every path (``options=None``, ``backend="chunked"``,
``backend="auto"``). The exception type is the reference's (PyTorch 2.13's ``F.linear_cross_entropy(options=None)``
where installed, and ``F.cross_entropy(F.linear(...))`` where that composition is defined); our message names the
argument."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, HAS_TORCH_LCE, HAS_TORCH_MODULE, oracle_loss

from linear_cross_entropy import LinearCrossEntropyLoss, LinearCrossEntropyOptions, linear_cross_entropy

N, FEAT, C = 4, 3, 5


@dataclasses.dataclass
class ErrorCase:
    name: str
    build: Callable  # (device) -> (input, linear_weight, target, kwargs)
    expected: type[Exception]
    match: str  # our message names the argument
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
        r"target",
        composable=True,
        composable_on_cpu_only=True,
    ),
    ErrorCase(
        "integer_probabilities",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N, C, high=2), {}),
        RuntimeError,
        r"floating point type for target",
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
        r"linear_weight dtype",
        composable=True,
    ),
    ErrorCase(
        "dtype_mismatch_linear_bias",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"linear_bias": _t(d, C, dtype=torch.float32)}),
        RuntimeError,
        r"linear_bias dtype",
        composable=True,
    ),
    ErrorCase(
        "dtype_mismatch_class_weight",
        lambda d: (_t(d, N, FEAT), _t(d, C, FEAT), _idx(d, N), {"weight": _t(d, C, dtype=torch.float32)}),
        RuntimeError,
        r"weight",
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

    if HAS_TORCH_LCE:  # the reference path of PyTorch 2.13
        kw = dict(kwargs)
        theirs = _raised(lambda: F.linear_cross_entropy(x, w, t, **kw, options=None))
        assert theirs is case.expected, f"torch raises {theirs}"
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
