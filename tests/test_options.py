"""``LinearCrossEntropyOptions``: fields and defaults, validation (PyTorch's messages), the frozen dataclass, and the
resolution rules of ``linear_cross_entropy.options.resolve`` (auto per device/dtype, explicit batch_chunk_size,
aspect_ratio[:k], acc_dtype None), compared with PyTorch 2.13's own class where it is installed."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch
from helpers import assert_identical, forward_backward, make_case

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.options import resolve

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HAS_TORCH_OPTIONS = hasattr(torch.nn, "LinearCrossEntropyOptions")
requires_torch_options = pytest.mark.skipif(not HAS_TORCH_OPTIONS, reason="torch < 2.13")
TORCH_FIELDS = ("allow_retain_graph", "batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype")
LOW = (torch.float16, torch.bfloat16)


def _raises(cls, **kwargs) -> str | None:
    """The ValueError message of constructing ``cls(**kwargs)``, or None when it is accepted."""
    try:
        cls(**kwargs)
    except ValueError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------------------------------
# Fields, defaults, frozen dataclass


def test_fields_and_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(LinearCrossEntropyOptions)}
    assert list(fields)[:5] == list(TORCH_FIELDS)
    assert fields["allow_retain_graph"] is False
    assert fields["batch_chunk_size"] is None
    assert fields["chunking_method"] == "auto"
    assert fields["acc_policy"] == "auto"
    assert fields["acc_dtype"] is None
    # Ours, off by default.
    assert fields["backend"] == "auto"
    assert fields.get("loss_dtype") is None


@requires_torch_options
def test_fields_match_torch():
    theirs = {f.name: f.default for f in dataclasses.fields(torch.nn.LinearCrossEntropyOptions)}
    ours = {f.name: f.default for f in dataclasses.fields(LinearCrossEntropyOptions)}
    assert list(theirs) == list(TORCH_FIELDS)
    assert {name: ours[name] for name in theirs} == theirs
    # Positional construction in PyTorch's field order gives the same settings.
    args = (True, 64, None, "balanced", torch.float32)
    for name, value in zip(TORCH_FIELDS, args):
        assert (
            getattr(LinearCrossEntropyOptions(*args), name)
            == getattr(torch.nn.LinearCrossEntropyOptions(*args), name)
            == value
        )


def test_frozen():
    opts = LinearCrossEntropyOptions(batch_chunk_size=8)
    for name, value in [("batch_chunk_size", 4), ("acc_policy", "compact"), ("backend", "chunked")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(opts, name, value)
    assert opts.batch_chunk_size == 8
    assert opts == LinearCrossEntropyOptions(batch_chunk_size=8)
    assert hash(opts) == hash(LinearCrossEntropyOptions(batch_chunk_size=8))
    assert opts != LinearCrossEntropyOptions(batch_chunk_size=4)
    assert dataclasses.replace(opts, acc_policy="compact").acc_policy == "compact"
    with pytest.raises(ValueError, match="acc_policy"):  # replace re-validates
        dataclasses.replace(opts, acc_policy="fast")


# --------------------------------------------------------------------------------------------------------------
# Validation

INVALID = [
    # (field, value, message pattern)
    ("acc_policy", "fast", r"invalid acc_policy: 'fast'"),
    ("acc_policy", "AUTO", r"invalid acc_policy"),
    ("acc_policy", "", r"invalid acc_policy"),
    ("acc_policy", None, r"invalid acc_policy: None"),
    ("chunking_method", "aspect_ratio:0", r"invalid chunking_method: 'aspect_ratio:0'"),
    ("chunking_method", "aspect_ratio:-2", r"invalid chunking_method"),
    ("chunking_method", "aspect_ratio:x", r"invalid chunking_method"),
    ("chunking_method", "aspect_ratio:", r"invalid chunking_method"),
    ("chunking_method", "aspect_ratio:1.5", r"invalid chunking_method"),
    ("chunking_method", "aspect", r"invalid chunking_method"),
    ("chunking_method", "memory", r"invalid chunking_method"),
    ("chunking_method", "", r"invalid chunking_method"),
    ("batch_chunk_size", 0, r"batch_chunk_size must be positive int or None, got 0"),
    ("batch_chunk_size", -3, r"batch_chunk_size must be positive int or None"),
    ("batch_chunk_size", 1.5, r"batch_chunk_size must be positive int or None"),
    ("batch_chunk_size", "4", r"batch_chunk_size must be positive int or None"),
    ("acc_dtype", torch.int32, r"acc_dtype must be one of"),
    ("acc_dtype", torch.complex64, r"acc_dtype must be one of"),
    ("acc_dtype", "float32", r"acc_dtype must be one of .*Pass acc_dtype=None"),
]
OURS_INVALID = [
    ("backend", "triton", r"invalid backend: 'triton'"),
    ("backend", None, r"invalid backend"),
    ("loss_dtype", torch.int64, r"loss_dtype must be None \(the input's dtype, as PyTorch\) or torch.float32"),
    ("loss_dtype", torch.bfloat16, r"loss_dtype must be None .* or torch.float32, got torch.bfloat16"),
    ("loss_dtype", torch.float64, r"loss_dtype"),
    ("loss_dtype", "float32", r"loss_dtype"),
]


@pytest.mark.parametrize("field,value,pattern", INVALID + OURS_INVALID, ids=lambda v: repr(v)[:24])
def test_invalid_values_raise_value_error(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        LinearCrossEntropyOptions(**{field: value})


@requires_torch_options
@pytest.mark.parametrize("field,value,pattern", INVALID, ids=lambda v: repr(v)[:24])
def test_invalid_values_same_message_as_torch(field, value, pattern):
    """PyTorch's message starts ours (what users' tests match); ours may go on with the accepted values."""
    theirs = _raises(torch.nn.LinearCrossEntropyOptions, **{field: value})
    assert theirs is not None
    assert _raises(LinearCrossEntropyOptions, **{field: value}).startswith(theirs)


@pytest.mark.parametrize(
    "field,value,valid",
    [
        ("acc_policy", "acurate", r"; expected one of \('auto', 'accurate', 'balanced', 'compact'\)$"),
        ("chunking_method", "aspect", r"; expected 'auto', None, 'aspect_ratio' or 'aspect_ratio:k' with an integer"),
        ("chunking_method", 3, r"invalid chunking_method: 3; expected"),
    ],
)
def test_invalid_values_list_the_valid_ones(field, value, valid):
    with pytest.raises(ValueError, match=valid):
        LinearCrossEntropyOptions(**{field: value})


VALID = [
    ("chunking_method", None),
    ("chunking_method", "auto"),
    ("chunking_method", "aspect_ratio"),
    ("chunking_method", "aspect_ratio:1"),
    ("chunking_method", "aspect_ratio:16"),
    ("chunking_method", "aspect_ratio:01"),
    ("batch_chunk_size", 1),
    ("batch_chunk_size", 4096),
    ("acc_policy", "accurate"),
    ("acc_policy", "balanced"),
    ("acc_policy", "compact"),
    ("acc_dtype", torch.float16),
    ("acc_dtype", torch.bfloat16),
    ("acc_dtype", torch.float32),
    ("acc_dtype", torch.float64),
    ("allow_retain_graph", True),
]
OURS_VALID = [("loss_dtype", None), ("loss_dtype", torch.float32)]


@pytest.mark.parametrize("field,value", VALID, ids=lambda v: repr(v)[:24])
def test_valid_values_accepted(field, value):
    assert getattr(LinearCrossEntropyOptions(**{field: value}), field) == value
    if HAS_TORCH_OPTIONS:
        torch.nn.LinearCrossEntropyOptions(**{field: value})


@pytest.mark.parametrize("field,value", OURS_VALID, ids=lambda v: repr(v)[:24])
def test_valid_values_of_our_fields_accepted(field, value):
    assert getattr(LinearCrossEntropyOptions(**{field: value}), field) == value


@pytest.mark.parametrize("backend", ["auto", "chunked", "fused"])
def test_backend_values(backend):
    assert LinearCrossEntropyOptions(backend=backend).backend == backend


@requires_torch_options
@settings(max_examples=300)
@given(
    st.one_of(
        st.text(alphabet="aspect_ratio:0123456789-+ x.", max_size=16),
        st.builds(lambda k: f"aspect_ratio:{k}", st.text(alphabet="0123456789-+x ", max_size=4)),
    )
)
def test_chunking_method_validation_agrees_with_torch(method):
    ours = _raises(LinearCrossEntropyOptions, chunking_method=method)
    theirs = _raises(torch.nn.LinearCrossEntropyOptions, chunking_method=method)
    assert (ours is None) == (theirs is None)
    assert ours is None or ours.startswith(theirs)


# --------------------------------------------------------------------------------------------------------------
# Resolution


def _resolve(options, n=1024, f=64, c=1000, dtype=torch.float32, device="cpu", backend="chunked"):
    return resolve(
        options, backend=backend, num_rows=n, in_features=f, num_classes=c, dtype=dtype, device=torch.device(device)
    )


def aspect_ratio_rows(n: int, f: int, c: int, k: int) -> int:
    """The documented rule, written independently: ``min(next_pow2(ceil(N / ceil(C / F))) // k, N)``."""
    target = math.ceil(n / math.ceil(c / f))
    next_pow2 = 1
    while next_pow2 < target:
        next_pow2 *= 2
    return min(next_pow2 // k, n)


@pytest.mark.parametrize(
    "n,f,c,k,expected",
    [
        (4096, 1024, 32000, 1, 128),  # ceil(32000/1024) = 32; 4096/32 = 128
        (4096, 1024, 32000, 2, 64),
        (1000, 64, 1000, 1, 64),  # ceil(1000/64) = 16; ceil(1000/16) = 63 -> 64
        (10, 100, 50, 1, 10),  # C < F: one chunk, capped at N
        (5, 3, 1000, 1, 1),
        (5, 3, 1000, 4, 0),  # 1 // 4 = 0: resolve() makes it at least 1
    ],
)
def test_aspect_ratio_formula_examples(n, f, c, k, expected):
    assert aspect_ratio_rows(n, f, c, k) == expected
    method = "aspect_ratio" if k == 1 else f"aspect_ratio:{k}"
    rows = _resolve(LinearCrossEntropyOptions(chunking_method=method), n=n, f=f, c=c).batch_chunk_size
    assert rows == max(1, expected)


@settings(max_examples=300)
@given(st.integers(1, 10**6), st.integers(1, 8192), st.integers(1, 300_000), st.integers(1, 64))
def test_aspect_ratio_formula(n, f, c, k):
    rows = _resolve(LinearCrossEntropyOptions(chunking_method=f"aspect_ratio:{k}"), n=n, f=f, c=c).batch_chunk_size
    assert rows == max(1, aspect_ratio_rows(n, f, c, k))
    assert 1 <= rows <= n
    if HAS_TORCH_OPTIONS:
        theirs = torch.nn.LinearCrossEntropyOptions()._compute_batch_chunk_size(n, f, c, f"aspect_ratio:{k}")
        assert rows == max(1, theirs)


@pytest.mark.parametrize(
    "device,dtype,policy,method",
    [
        # Ours on the CPU: chunks of at most 64 MiB of GEMM output ("budget"), and in low precision "balanced",
        # which keeps the GEMMs native (PyTorch's "accurate" upcasts them).
        ("cpu", torch.float32, "compact", "budget"),
        ("cpu", torch.float64, "compact", "budget"),
        ("cpu", torch.bfloat16, "balanced", "budget"),
        ("cpu", torch.float16, "balanced", "budget"),
        ("cuda", torch.bfloat16, "compact", "aspect_ratio:2"),
        ("cuda", torch.float16, "compact", "aspect_ratio:2"),
        ("cuda", torch.float32, "compact", "aspect_ratio:2"),
        ("meta", torch.bfloat16, "compact", "aspect_ratio:2"),  # unlisted pairs: the fallback
    ],
)
def test_auto_per_device_and_dtype(device, dtype, policy, method):
    n, f, c = 4096, 256, 32000
    ro = _resolve(LinearCrossEntropyOptions(), n=n, f=f, c=c, dtype=dtype, device=device)
    assert ro.acc_policy == policy
    if method == "budget":  # the largest power of two of rows whose (rows, C) GEMM output fits in 64 MiB
        expected = {torch.float32: 512, torch.float64: 256, torch.bfloat16: 1024, torch.float16: 1024}[dtype]
        assert ro.batch_chunk_size == expected
    else:
        k = int(method.partition(":")[2] or 1)
        assert ro.batch_chunk_size == aspect_ratio_rows(n, f, c, k)
    assert ro.backend == "chunked" and ro.allow_retain_graph is False


def _fused_rows(n, h, dtype=torch.bfloat16, weight_grad=True, **options):
    ro = resolve(
        LinearCrossEntropyOptions(backend="fused", **options),
        backend="fused",
        num_rows=n,
        in_features=h,
        num_classes=128256,
        dtype=dtype,
        device=torch.device("cpu"),  # bf16/fp16 with acc_dtype=None resolve to fp32 here, as on CUDA
        weight_grad=weight_grad,
    )
    return ro.batch_chunk_size


def _quarter(n):
    """The fused backend's chunk rule without the scratch exception: a quarter of the rows (at least 1024) rounded
    down to a power of two, never more than N."""
    rows = 1
    while rows * 2 <= max(n // 4, 1024):
        rows *= 2
    return min(rows, n)


@pytest.mark.parametrize(
    "n,h,options,dtype,weight_grad,rows",
    [
        # default (fp32 weight-gradient scratch): one chunk while N·2 bytes of bf16 logits <= the scratch's 4·H,
        # else the larger of the quarter and the rows whose logits fit in the scratch (2·H in bf16)
        (8192, 4096, {}, torch.bfloat16, True, 8192),
        (4096, 4096, {}, torch.float16, True, 4096),
        (8193, 4096, {}, torch.bfloat16, True, 8192),
        (8192, 2048, {}, torch.bfloat16, True, 4096),
        (16384, 2048, {}, torch.bfloat16, True, 4096),
        (16384, 4096, {}, torch.bfloat16, True, 8192),
        (32768, 4096, {}, torch.bfloat16, True, 8192),
        (65536, 4096, {}, torch.bfloat16, True, 16384),
        (8192, 768, {}, torch.bfloat16, True, 2048),
        # "accurate" holds 6 bytes per logit (fp32 logits beside the bf16 dz): 4·4096/6 = 2730 rows
        (2730, 4096, {"acc_policy": "accurate", "acc_dtype": torch.float32}, torch.bfloat16, True, 2730),
        (2731, 4096, {"acc_policy": "accurate", "acc_dtype": torch.float32}, torch.bfloat16, True, 2048),
        # no scratch to trade: the quarter (compact accumulation, fp32 weights, no weight gradient)
        (8192, 4096, {"acc_policy": "compact"}, torch.bfloat16, True, 2048),
        (8192, 4096, {}, torch.float32, True, 2048),
        (8192, 4096, {}, torch.bfloat16, False, 2048),
    ],
)
def test_fused_chunk_rows(n, h, options, dtype, weight_grad, rows):
    assert _fused_rows(n, h, dtype, weight_grad, **options) == rows


@pytest.mark.parametrize("n", [1, 5, 1000, 1024, 1025, 4096, 10_000, 100_000])
def test_fused_chunk_rows_quarter_rule(n):
    rows = _fused_rows(n, 8, acc_policy="compact")
    assert rows == _quarter(n) and 1 <= rows <= n
    assert _fused_rows(n, 8, batch_chunk_size=3) == min(3, n)  # an explicit size wins


def _recomputes(n, rows, dtype=torch.bfloat16, weight_grad=True, backend="fused", **options):
    ro = resolve(
        LinearCrossEntropyOptions(backend=backend, batch_chunk_size=rows, **options),
        backend=backend,
        num_rows=n,
        in_features=4096,
        num_classes=128256,
        dtype=dtype,
        device=torch.device("cpu"),
        weight_grad=weight_grad,
    )
    return ro.recompute_weight_grad


@pytest.mark.parametrize(
    "rows,options,recompute",
    [
        # a bf16 accumulator (2 bytes): the break-even is 240·2 = 480 rows
        (256, {"acc_policy": "compact"}, True),
        (479, {"acc_policy": "compact"}, True),
        (480, {"acc_policy": "compact"}, False),
        (1024, {"acc_policy": "compact"}, False),
        # an fp32 scratch (4 bytes, the default's): 960 rows
        (512, {}, True),
        (959, {}, True),
        (960, {}, False),
        (512, {"acc_policy": "accurate", "acc_dtype": torch.float32}, True),
        (1024, {}, False),
    ],
)
def test_weight_grad_recompute_rule(rows, options, recompute):
    """The weight gradient comes from the vocabulary-major pass where accumulating it across chunks would move
    more bytes than one more GEMM's FLOPs take (``rows < 240·b``)."""
    assert _recomputes(32768, rows, **options) == recompute


def test_weight_grad_recompute_only_where_it_applies():
    assert not _recomputes(256, 256)  # one chunk: a single weight-gradient GEMM already
    assert not _recomputes(32768, 256, weight_grad=False)  # no weight gradient to form
    assert not _recomputes(32768, 256, dtype=torch.float32)  # fp32 GEMMs: not worth a recompute
    assert not _recomputes(32768, 256, backend="chunked")
    assert not _recomputes(32768, None)  # the default chunks (>= 1024 rows or one chunk)


@pytest.mark.parametrize(
    "n,rows,v,cols",
    [
        (8192, 256, 128256, 3968),  # 256·128256/8192 = 4008 → 31·128
        (4096, 128, 128256, 3968),
        (16384, 2048, 131072, 16384),
        (100_000, 1, 32000, 128),  # at least 128 classes
        (1000, 500, 100, 100),  # at most V
    ],
)
def test_recompute_columns(n, rows, v, cols):
    from linear_cross_entropy.backends.fused.policy import recompute_columns

    got = recompute_columns(n, rows, v)
    assert got == cols
    assert got == v or got % 128 == 0
    assert got == min(v, 128) or n * got <= rows * v  # no more logits than the row pass's buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("size", [1, 7, 100, 5000])
def test_explicit_batch_chunk_size_disables_auto_chunking(size, dtype):
    n = 1000
    ro = _resolve(LinearCrossEntropyOptions(batch_chunk_size=size), n=n, dtype=dtype)
    assert ro.batch_chunk_size == min(size, n)
    ro = _resolve(LinearCrossEntropyOptions(batch_chunk_size=size, chunking_method=None), n=n, dtype=dtype)
    assert ro.batch_chunk_size == min(size, n)


def test_no_chunking_method_means_one_chunk():
    assert _resolve(LinearCrossEntropyOptions(chunking_method=None), n=777).batch_chunk_size == 777
    assert _resolve(LinearCrossEntropyOptions(chunking_method=None), n=0).batch_chunk_size == 1


def test_disagreeing_batch_chunk_size_and_method():
    n, f, c = 1000, 64, 1000  # aspect_ratio -> 64 rows
    assert (
        _resolve(
            LinearCrossEntropyOptions(batch_chunk_size=64, chunking_method="aspect_ratio"), n=n, f=f, c=c
        ).batch_chunk_size
        == 64
    )
    with pytest.raises(ValueError, match=r"batch_chunk_size \(=32\) and chunking_method \('aspect_ratio'\)"):
        _resolve(LinearCrossEntropyOptions(batch_chunk_size=32, chunking_method="aspect_ratio"), n=n, f=f, c=c)


@pytest.mark.parametrize("backend", ["chunked", "auto"])
def test_disagreeing_batch_chunk_size_raises_at_call_time(backend, seed):
    case = make_case(40, 4, 64, seed=seed)  # aspect_ratio:2 -> ceil(64/4) = 16; 40/16 -> 4 -> 2 rows
    options = LinearCrossEntropyOptions(backend=backend, batch_chunk_size=3, chunking_method="aspect_ratio:2")
    with pytest.raises(ValueError, match="batch_chunk_size"):
        linear_cross_entropy(case.input, case.linear_weight, case.target, options=options)
    agreeing = LinearCrossEntropyOptions(backend=backend, batch_chunk_size=2, chunking_method="aspect_ratio:2")
    linear_cross_entropy(case.input, case.linear_weight, case.target, options=agreeing)


@pytest.mark.parametrize(
    "policy,acc_dtype,dtype,expected",
    [
        ("auto", None, torch.bfloat16, torch.float32),
        ("auto", None, torch.float16, torch.float32),
        ("auto", None, torch.float32, torch.float32),
        ("auto", None, torch.float64, torch.float64),
        # Only "auto" upcasts: an explicit policy with acc_dtype=None keeps the input dtype.
        ("accurate", None, torch.bfloat16, torch.bfloat16),
        ("balanced", None, torch.float16, torch.float16),
        ("compact", None, torch.bfloat16, torch.bfloat16),
        ("compact", torch.float32, torch.bfloat16, torch.float32),
        ("accurate", torch.float32, torch.float16, torch.float32),
        ("auto", torch.float64, torch.float64, torch.float64),
    ],
)
def test_acc_dtype_resolution(policy, acc_dtype, dtype, expected):
    ro = _resolve(LinearCrossEntropyOptions(acc_policy=policy, acc_dtype=acc_dtype), dtype=dtype)
    assert ro.acc_dtype == expected
    assert ro.acc_policy == (policy if policy != "auto" else ro.acc_policy)


def test_acc_dtype_on_a_device_without_mixed_precision():
    """acc_dtype=None stays the input dtype where no mixed-precision GEMM exists (no CUDA here, or 'meta')."""
    ro = _resolve(LinearCrossEntropyOptions(), dtype=torch.bfloat16, device="meta")
    assert ro.acc_dtype == torch.bfloat16
    if not torch.cuda.is_available():
        assert _resolve(LinearCrossEntropyOptions(), dtype=torch.bfloat16, device="cuda").acc_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "acc_dtype,dtype",
    [
        (torch.float16, torch.float32),
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float16),
    ],
)
def test_unsupported_acc_dtype_raises(acc_dtype, dtype, seed):
    """Mixed precision means fp16/bf16 input with fp32 accumulation; anything else is PyTorch's RuntimeError."""
    with pytest.raises(RuntimeError, match="acc_dtype"):
        _resolve(LinearCrossEntropyOptions(acc_dtype=acc_dtype), dtype=dtype)
    case = make_case(6, 4, 5, dtype=dtype, seed=seed)
    with pytest.raises(RuntimeError, match="acc_dtype"):
        linear_cross_entropy(
            case.input,
            case.linear_weight,
            case.target,
            options=LinearCrossEntropyOptions(backend="chunked", acc_dtype=acc_dtype),
        )


@requires_torch_options
@settings(max_examples=300)
@given(
    n=st.integers(1, 5000),
    f=st.integers(1, 512),
    c=st.integers(2, 50_000),
    device=st.sampled_from(["cpu", "cuda", "meta"]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    acc_policy=st.sampled_from(["auto", "accurate", "balanced", "compact"]),
    chunking_method=st.sampled_from(["auto", None, "aspect_ratio", "aspect_ratio:2", "aspect_ratio:8"]),
    batch_chunk_size=st.one_of(st.none(), st.integers(1, 6000), st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128])),
    acc_dtype=st.sampled_from([None, torch.float32]),
    allow_retain_graph=st.booleans(),
)
def test_resolution_agrees_with_torch(
    n, f, c, device, dtype, acc_policy, chunking_method, batch_chunk_size, acc_dtype, allow_retain_graph
):
    """Chunk size, acc_dtype, acc_policy and errors as PyTorch's ``_adjust``, except our CPU low-precision "auto"
    policy ("balanced" where PyTorch picks "accurate")."""
    kwargs = dict(
        allow_retain_graph=allow_retain_graph,
        batch_chunk_size=batch_chunk_size,
        chunking_method=chunking_method,
        acc_policy=acc_policy,
        acc_dtype=acc_dtype,
    )
    dev = torch.device(device)
    try:
        theirs = torch.nn.LinearCrossEntropyOptions(**kwargs)._adjust(n, f, c, dtype, dev)
    except ValueError as e:
        with pytest.raises(ValueError) as info:
            _resolve(LinearCrossEntropyOptions(**kwargs), n=n, f=f, c=c, dtype=dtype, device=device)
        assert str(info.value) == str(e)
        return
    try:
        ours = _resolve(LinearCrossEntropyOptions(**kwargs), n=n, f=f, c=c, dtype=dtype, device=device)
    except RuntimeError:  # acc_dtype combinations PyTorch rejects later, in the op itself
        assert theirs.acc_dtype != dtype and not (dtype in LOW and theirs.acc_dtype == torch.float32)
        return
    if not (device == "cpu" and chunking_method == "auto" and batch_chunk_size is None):  # ours: "budget"
        assert ours.batch_chunk_size == theirs.batch_chunk_size
    assert ours.acc_dtype == theirs.acc_dtype
    assert ours.allow_retain_graph == theirs.allow_retain_graph
    if acc_policy == "auto" and device == "cpu" and dtype in LOW:
        assert (ours.acc_policy, theirs.acc_policy) == ("balanced", "accurate")
    else:
        assert ours.acc_policy == theirs.acc_policy


# --------------------------------------------------------------------------------------------------------------
# Our fields


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter serves 'fused' on the CPU")
def test_fused_on_cpu_falls_back_with_one_warning(seed):
    """A backend that cannot serve the call falls back with one UserWarning naming why — same results."""
    case = make_case(9, 4, 6, bias=True, seed=seed)
    with pytest.warns(UserWarning, match="fused") as record:
        fused = forward_backward(
            linear_cross_entropy, case, options=LinearCrossEntropyOptions(backend="fused", batch_chunk_size=4)
        )
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    assert "cpu" in str(record[0].message).lower()
    chunked = forward_backward(
        linear_cross_entropy, case, options=LinearCrossEntropyOptions(backend="chunked", batch_chunk_size=4)
    )
    assert_identical(fused, chunked)


@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_no_warning_when_the_backend_serves_the_call(backend, seed):
    case = make_case(9, 4, 6, out_features=(2,), probs=True, bias=True, label_smoothing=0.1, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward_backward(linear_cross_entropy, case, options=LinearCrossEntropyOptions(backend=backend))


def test_defaults_of_our_fields_change_nothing(seed):
    """A call that uses none of our additions is exactly the default chunked call."""
    case = make_case(9, 4, 6, bias=True, class_weight=True, seed=seed)
    ours = LinearCrossEntropyOptions(**{name: getattr(LinearCrossEntropyOptions(), name) for name in TORCH_FIELDS})
    assert ours == LinearCrossEntropyOptions()
    assert_identical(
        forward_backward(linear_cross_entropy, case, options=ours),
        forward_backward(linear_cross_entropy, case, options=LinearCrossEntropyOptions()),
    )
