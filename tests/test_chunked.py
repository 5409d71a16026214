"""The chunked path (``options=LinearCrossEntropyOptions(backend="chunked", ...)``) against the float64 oracle
``F.cross_entropy(F.linear(...))``: every argument combination, every chunk size and policy, low precision, edge
cases, and autograd behaviour (gradcheck, repeated backward, no_grad)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICES,
    Case,
    assert_identical,
    assert_results_close,
    assert_within_plain,
    forward_backward,
    leaf,
    make_case,
    noncontiguous,
    oracle_loss,
    reference_grads,
    rel_err,
    requires_torch_lce,
    upstream_grad,
)

import linear_cross_entropy.backends.chunked as chunked_mod
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.options import resolve

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FLOAT64_TOL = 1e-10


def chunked(**kwargs) -> LinearCrossEntropyOptions:
    return LinearCrossEntropyOptions(backend="chunked", **kwargs)


# --------------------------------------------------------------------------------------------------------------
# float64: the whole argument grid, drawn at random


@st.composite
def grid_cases(draw):
    """A random call (small shapes) and options: every argument the API has, in every combination."""
    kind = draw(st.sampled_from(["2d", "kdim", "unbatched"]))
    n = None if kind == "unbatched" else draw(st.integers(0, 9))
    f = draw(st.integers(1, 6))
    c = draw(st.integers(1, 9))
    out = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)) if kind == "kdim" else ()
    probs = draw(st.booleans())
    if probs:
        ignore_index, ignore_frac = None, 0.0
    else:
        # None (-100), a real class, or values no class has (simply ignored, like the reference does).
        ignore_index = draw(st.sampled_from([None, "class", c + 3, -7, 1000]))
        if ignore_index == "class":
            ignore_index = draw(st.integers(0, c - 1))
        ignore_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    case = make_case(
        n,
        f,
        c,
        out,
        probs=probs,
        bias=draw(st.booleans()),
        class_weight=draw(st.booleans()),
        ignore_index=ignore_index,
        ignore_frac=ignore_frac,
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.6, 1.0, -0.3])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        layout=layout,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if probs and draw(st.booleans()):
        # The reference does not require a distribution: any real "probabilities" (negative ones included).
        factors = (torch.arange(case.target.numel(), dtype=torch.float64) % 7 - 3.5).reshape(case.target.shape)
        case.target = noncontiguous(case.target * factors, layout)
    rows = 1 if n is None else n
    batch_chunk_size = draw(st.one_of(st.none(), st.integers(1, rows + 2)))
    if batch_chunk_size is None:
        chunking_method = draw(st.sampled_from(["auto", None, "aspect_ratio", "aspect_ratio:3"]))
    else:
        chunking_method = draw(st.sampled_from(["auto", None]))  # an explicit size disables "auto"
    options = LinearCrossEntropyOptions(
        backend=draw(st.sampled_from(["chunked", "auto"])),
        batch_chunk_size=batch_chunk_size,
        chunking_method=chunking_method,
        acc_policy=draw(st.sampled_from(["auto", "accurate", "balanced", "compact"])),
        allow_retain_graph=draw(st.booleans()),
    )
    return case, options


@settings(max_examples=1000)
@given(grid_cases())
def test_chunked_matches_oracle_float64(drawn):
    case, options = drawn
    expected = reference_grads(case)
    actual = forward_backward(linear_cross_entropy, case, options=options)
    assert_results_close(actual, expected, FLOAT64_TOL)
    for got, leaf_tensor in zip(actual[1:], (case.input, case.linear_weight, case.linear_bias)):
        if leaf_tensor is not None:
            assert got.dtype == leaf_tensor.dtype and got.shape == leaf_tensor.shape
    assert actual[0].dtype == expected[0].dtype


@pytest.mark.parametrize("scale", [30.0, 1000.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_peaked_logits(probs, reduction, scale, seed):
    """Logits in the hundreds/thousands: nearly one-hot softmaxes, no overflow, still the reference's values.

    (The relative error is taken over all rows: a single row whose loss is tiny next to its logits, e.g. 4e-8
    against logits of 30, is ill-conditioned — any two float64 algorithms differ there by ~eps·|z|/loss.)"""
    # input (32, 8), linear_weight (16, 8)
    case = make_case(
        32,
        8,
        16,
        probs=probs,
        bias=True,
        class_weight=True,
        label_smoothing=0.1,
        reduction=reduction,
        seed=seed,
        scale=scale,
    )
    actual = forward_backward(linear_cross_entropy, case, options=chunked(batch_chunk_size=5))
    assert all(t.isfinite().all() for t in actual)
    assert_results_close(actual, reference_grads(case), FLOAT64_TOL)


@pytest.mark.parametrize("ignore_index", [None, 3, 255])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("class_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uint8_targets(reduction, class_weight, label_smoothing, ignore_index, seed):
    """Byte class indices are accepted like int64 ones (ignore_index compared by value)."""
    if reduction == "mean" and class_weight and label_smoothing:
        pytest.skip("the reference itself fails here (gather() needs int64 indices): nothing to match")
    case = make_case(
        12,
        4,
        6,
        bias=True,
        class_weight=class_weight,
        ignore_index=ignore_index,
        ignore_frac=0.3,
        label_smoothing=label_smoothing,
        reduction=reduction,
        seed=seed,
    )
    case.target = case.target.clamp(0, 255).to(torch.uint8)  # -100 cannot be a byte: nothing ignored then
    actual = forward_backward(linear_cross_entropy, case, options=chunked(batch_chunk_size=5))
    assert_results_close(actual, reference_grads(case), FLOAT64_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probs", "kdim"])
def test_chunk_size_invariance(kind, reduction, device, seed):
    """Any chunk size (1 row, uneven splits, larger than N, the aspect-ratio picks) gives the same results."""
    # input (37, 8), linear_weight (13, *out, 8)
    out = (2, 3) if kind == "kdim" else ()
    case = make_case(
        37,
        8,
        13,
        out,
        probs=kind == "probs",
        bias=True,
        class_weight=True,
        ignore_index=None if kind == "probs" else 3,
        label_smoothing=0.15,
        reduction=reduction,
        device=device,
        seed=seed,
    )
    expected = reference_grads(case)
    first = None
    variants = [dict(batch_chunk_size=s) for s in (1, 2, 5, 16, 36, 37, 1000)]
    variants += [dict(chunking_method=m) for m in ("aspect_ratio", "aspect_ratio:4", None)]
    for variant in variants:
        actual = forward_backward(linear_cross_entropy, case, options=chunked(**variant))
        assert_results_close(actual, expected, FLOAT64_TOL, str(variant))
        if first is None:
            first = actual
        else:
            assert_results_close(actual, first, 1e-13, f"{variant} vs batch_chunk_size=1")


def test_chunks_bound_the_logits(monkeypatch, seed):
    """No block of logits has more loss rows than a resolved chunk's input rows hold (K per input row: the positions
    of a K-dimensional loss are rows of the chunk's one GEMM), and every loss row is covered once."""
    seen = []
    original = chunked_mod.chunk_loss_and_grad

    def spy(z, *args, **kwargs):
        seen.append(tuple(z.shape))
        return original(z, *args, **kwargs)

    monkeypatch.setattr(chunked_mod, "chunk_loss_and_grad", spy)
    n, f, c, out = 50, 4, 64, (3,)
    case = make_case(n, f, c, out, seed=seed)
    for options in (chunked(batch_chunk_size=7), chunked(chunking_method="aspect_ratio:2")):
        seen.clear()
        rows = resolve(
            options,
            backend="chunked",
            num_rows=n,
            in_features=f,
            num_classes=c * math.prod(out),
            dtype=case.input.dtype,
            device=case.input.device,
        ).batch_chunk_size
        assert rows < n
        forward_backward(linear_cross_entropy, case, options=options)
        assert seen, "chunk_loss_and_grad was not called"
        assert all(r <= rows * math.prod(out) and cc == c for r, cc in seen), (rows, seen)
        assert sum(r for r, _ in seen) == n * math.prod(out)  # scalar reduction: one sweep in forward


def test_k_dimensional_positions_are_rows_of_one_gemm(monkeypatch, seed):
    """A K-dimensional loss whose logits fit in one chunk runs as one block of ``N·K`` loss rows: one GEMM for the
    logits and one per gradient, as the 2-D problem of ``N·K`` rows would (no loop over positions)."""
    seen, gemms = [], []
    original_block, original_mm = chunked_mod.chunk_loss_and_grad, torch.mm

    def spy_block(z, *args, **kwargs):
        seen.append(tuple(z.shape))
        return original_block(z, *args, **kwargs)

    def spy_mm(*args, **kwargs):
        gemms.append(tuple(args[0].shape))
        return original_mm(*args, **kwargs)

    monkeypatch.setattr(chunked_mod, "chunk_loss_and_grad", spy_block)
    monkeypatch.setattr(chunked_mod.torch, "mm", spy_mm)
    n, f, c, out = 6, 4, 5, (4, 3)
    case = make_case(n, f, c, out, seed=seed)
    actual = forward_backward(linear_cross_entropy, case, options=chunked())
    assert seen == [(n * math.prod(out), c)]
    assert len(gemms) == 3  # logits, grad_input, grad_weight (no bias: each one torch.mm)
    assert_results_close(actual, reference_grads(case), FLOAT64_TOL)


def _budget_rows(n, f, c, dtype, weight_grad=True):
    return resolve(
        LinearCrossEntropyOptions(),
        backend="chunked",
        num_rows=n,
        in_features=f,
        num_classes=c,
        dtype=dtype,
        device=torch.device("cpu"),
        weight_grad=weight_grad,
    ).batch_chunk_size


def test_cpu_budget_one_chunk_where_chunking_would_add_a_scratch():
    """Low precision: one chunk where its logits take no more than chunking would (64 MiB of logits plus the
    (C, F) fp32 weight-gradient scratch and the product buffer); fp32 and loss-only calls keep 64 MiB chunks."""
    assert _budget_rows(2048, 512, 24000, torch.bfloat16) == 2048  # 98 MB <= 64 MiB + 49 MB + 25 MB
    assert _budget_rows(4096, 1024, 32000, torch.bfloat16) == 4096  # 262 MB <= 64 MiB + 131 MB + 64 MiB
    assert _budget_rows(8192, 1024, 32000, torch.bfloat16) == 1024  # 524 MB: chunks of <= 64 MiB
    assert _budget_rows(2048, 512, 24000, torch.bfloat16, weight_grad=False) == 1024  # no scratch to save
    assert _budget_rows(2048, 512, 24000, torch.float32) == 512  # the weight gradient accumulates in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras", [{}, {"class_weight": True}, {"class_weight": True, "label_smoothing": 0.3}])
def test_plain_rows_match_the_general_rows(monkeypatch, dtype, extras, seed):
    """Plain class-index rows (one log-softmax per block) against the m/Σexp route that the additions take: the
    same values to a few roundings of the stats dtype, over several chunks, with a low-precision GEMM buffer."""
    monkeypatch.setattr(chunked_mod, "is_plain", lambda lp: False)
    case = make_case(40, 6, 33, bias=True, seed=seed, **extras).to(dtype)
    options = chunked(batch_chunk_size=16)
    general = forward_backward(linear_cross_entropy, case, options=options)
    monkeypatch.undo()
    plain = forward_backward(linear_cross_entropy, case, options=options)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_results_close(plain, general, tol, str(dtype))


def test_out_of_range_target_marked_nan_in_every_block(monkeypatch, seed):
    """Where the range check cannot run (a tensor subclass), a class outside [0, C) gives a NaN loss row and NaN
    gradient rows, in any block; the other rows are the oracle's. Several blocks: their outputs are concatenated
    (no in-place writes into a preallocated loss, which PyTorch's composite-compliance check refuses)."""
    composite_compliance = pytest.importorskip("torch.testing._internal.composite_compliance")
    monkeypatch.setattr(chunked_mod, "_BLOCK_LOGITS", 3 * 7)  # 3 loss rows per block
    case = make_case(8, 4, 7, seed=seed, ignore_frac=0.0)

    def op(x, w, t):
        return linear_cross_entropy(x, w, t, reduction="none", options=chunked())

    composite_compliance.check_with_mode(
        op, (case.input, case.linear_weight, case.target), {}, lambda a, e: torch.testing.assert_close(a, e)
    )
    cct, mode = composite_compliance.generate_cct_and_mode()
    bad = case.target.clone()
    bad[4] = 9
    with mode:
        out = op(cct(case.input, mode), cct(case.linear_weight, mode), cct(bad, mode)).elem
    assert out[4].isnan() and not out[[0, 1, 2, 3, 5, 6, 7]].isnan().any()


def test_backend_auto_is_chunked_on_cpu(seed):
    case = make_case(9, 5, 7, bias=True, class_weight=True, label_smoothing=0.2, seed=seed)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        c = case.to(dtype)
        assert_identical(
            forward_backward(linear_cross_entropy, c, options=LinearCrossEntropyOptions(batch_chunk_size=4)),
            forward_backward(linear_cross_entropy, c, options=chunked(batch_chunk_size=4)),
            str(dtype),
        )


@requires_torch_lce
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("class_weight", [False, True])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch_chunk_size", [None, 4])
def test_chunked_matches_torch_chunked(reduction, class_weight, ignore_index, bias, batch_chunk_size, seed):
    """Where PyTorch's own chunked path serves the call (int64 indices, no smoothing, no K-dim), we agree with it."""
    case = make_case(
        13, 6, 11, bias=bias, class_weight=class_weight, ignore_index=ignore_index, reduction=reduction, seed=seed
    )
    assert (case.target != (-100 if ignore_index is None else ignore_index)).any()
    theirs = forward_backward(
        F.linear_cross_entropy, case, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=batch_chunk_size)
    )
    ours = forward_backward(linear_cross_entropy, case, options=chunked(batch_chunk_size=batch_chunk_size))
    assert_results_close(ours, theirs, 1e-12)


# --------------------------------------------------------------------------------------------------------------
# Lower precision: our error against float64 within plain PyTorch's in the same dtype (helpers.assert_within_plain)

LOW_PRECISION = [
    # dtype, input scale (logits' spread; float16 stays smaller: plain PyTorch's smoothed loss sums C·N terms in
    # float16 and overflows otherwise)
    (torch.float32, 3.0),
    (torch.bfloat16, 3.0),
    (torch.float16, 1.5),
]


def _policy_id(policy) -> str:
    acc_policy, acc_dtype = policy
    return f"{acc_policy}-{'default' if acc_dtype is None else str(acc_dtype).removeprefix('torch.')}"


POLICIES = [  # (acc_policy, acc_dtype)
    ("auto", None),
    ("accurate", torch.float32),
    ("balanced", torch.float32),
    ("compact", torch.float32),
    ("balanced", None),  # acc_dtype resolves to the input dtype
]


def _assert_within_plain_torch(case: Case, options) -> None:
    """Ours within :func:`helpers.assert_within_plain` of plain PyTorch in the case's dtype (logits, softmax and
    loss all in it), which must itself err (a zero baseline would make the bound a bare floor)."""
    expected = reference_grads(case)  # float64 on the rounded inputs
    plain = forward_backward(oracle_loss, case)  # PyTorch in the case's dtype
    ours = forward_backward(linear_cross_entropy, case, options=options)
    torch_errs = [rel_err(a, e) for a, e in zip(plain, expected)]
    assert all(math.isfinite(e) and e > 0 for e in torch_errs), f"degenerate baseline {torch_errs}"
    assert_within_plain(ours, plain, expected, case.input.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", POLICIES, ids=_policy_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("dtype,scale", LOW_PRECISION, ids=["float32", "bfloat16", "float16"])
def test_low_precision_vs_plain_torch(dtype, scale, probs, reduction, policy, device, seed):
    acc_policy, acc_dtype = policy
    if dtype == torch.float32 and acc_dtype == torch.float32 and acc_policy != "accurate":
        pytest.skip("same as acc_dtype=None for float32 input")
    # input (64, 32), linear_weight (96, 32): 6 chunks of 12 rows (the last one short).
    case = make_case(
        64,
        32,
        96,
        probs=probs,
        bias=True,
        class_weight=True,
        label_smoothing=0.1,
        reduction=reduction,
        dtype=dtype,
        device=device,
        seed=seed,
        scale=scale,
    )
    _assert_within_plain_torch(case, chunked(batch_chunk_size=12, acc_policy=acc_policy, acc_dtype=acc_dtype))


@pytest.mark.parametrize(
    "policy", [("auto", None), ("accurate", torch.float32), ("balanced", torch.float32)], ids=_policy_id
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_many_chunks_fp32_scratch(dtype, policy, seed):
    """With an fp32 weight-gradient scratch, 1024 chunks of 4 rows are as accurate as one GEMM (accumulating the
    chunks' products in the input dtype instead is 5-15x plain PyTorch's error here)."""
    acc_policy, acc_dtype = policy
    # input (4096, 32), linear_weight (96, 32); "sum" keeps float16's gradient entries well inside its range.
    case = make_case(4096, 32, 96, bias=True, class_weight=True, reduction="sum", dtype=dtype, seed=seed, scale=3.0)
    _assert_within_plain_torch(case, chunked(batch_chunk_size=4, acc_policy=acc_policy, acc_dtype=acc_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_dtype_probability_target(dtype, seed):
    """Probabilities in another float dtype than the input: the reference's output dtype and value."""
    case = make_case(10, 6, 7, probs=True, bias=True, reduction="none", dtype=dtype, seed=seed)
    target = case.target.to(torch.float64)  # (N, C) in float64, input in `dtype`
    ref = linear_cross_entropy(case.input, case.linear_weight, target, linear_bias=case.linear_bias, reduction="none")
    ours = linear_cross_entropy(
        case.input,
        case.linear_weight,
        target,
        linear_bias=case.linear_bias,
        reduction="none",
        options=chunked(batch_chunk_size=3),
    )
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)


# --------------------------------------------------------------------------------------------------------------
# Edge cases that must match the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignore_index", [None, 0, 1000, -7])
@pytest.mark.parametrize("kind", ["2d", "kdim", "unbatched"])
def test_all_ignored(kind, ignore_index, device, seed):
    """mean → NaN loss with exactly zero gradients; sum → 0; none → zeros (PyTorch's chunked path gives NaN
    gradients for mean; the reference, which we follow, gives zeros)."""
    n, out = (None, ()) if kind == "unbatched" else (8, (2,) if kind == "kdim" else ())
    for reduction in ("mean", "sum", "none"):
        case = make_case(
            n,
            5,
            6,
            out,
            bias=True,
            class_weight=True,
            ignore_index=ignore_index,
            ignore_frac=1.0,
            label_smoothing=0.2,
            reduction=reduction,
            device=device,
            seed=seed,
        )
        assert (case.target == (-100 if ignore_index is None else ignore_index)).all()
        loss, gx, gw, gb = forward_backward(linear_cross_entropy, case, options=chunked(batch_chunk_size=3))
        if reduction == "mean":
            assert loss.isnan()
        else:
            assert torch.count_nonzero(loss) == 0
        for g in (gx, gw, gb):
            assert torch.count_nonzero(g) == 0, reduction
        assert_results_close((loss, gx, gw, gb), reference_grads(case), 0.0, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out", [(), (2, 3)], ids=["2d", "kdim"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_empty_batch(probs, out, device, seed):
    """N = 0: mean NaN, sum 0, none empty; gradients of the right shapes, zero."""
    for reduction in ("mean", "sum", "none"):
        case = make_case(
            0, 5, 6, out, probs=probs, bias=True, class_weight=True, reduction=reduction, device=device, seed=seed
        )
        loss, gx, gw, gb = forward_backward(linear_cross_entropy, case, options=chunked())
        if reduction == "mean":
            assert loss.shape == () and loss.isnan()
        elif reduction == "sum":
            assert loss.shape == () and loss == 0
        else:
            assert loss.shape == (0, *out)
        assert gx.shape == (0, 5)
        assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
        assert_results_close((loss, gx, gw, gb), reference_grads(case), 0.0, reduction)


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_label_smoothing_is_zero(probs, reduction, seed):
    case = make_case(11, 5, 7, probs=probs, bias=True, class_weight=True, reduction=reduction, seed=seed)
    negative = Case(**{**case.__dict__, "label_smoothing": -0.4})
    ours = forward_backward(linear_cross_entropy, negative, options=chunked(batch_chunk_size=4))
    assert_identical(ours, forward_backward(linear_cross_entropy, case, options=chunked(batch_chunk_size=4)))
    assert_results_close(ours, reference_grads(negative), FLOAT64_TOL)


@pytest.mark.parametrize("ignore_index", [7, 1000, -1, -7])
def test_out_of_range_ignore_index(ignore_index, seed):
    """An ignore_index no class has: targets equal to it are ignored, the rest count as usual."""
    case = make_case(
        20,
        5,
        7,
        bias=True,
        class_weight=True,
        ignore_index=ignore_index,
        ignore_frac=0.4,
        label_smoothing=0.1,
        seed=seed,
    )
    keep = case.target != ignore_index
    assert keep.any() and not keep.all()
    ours = forward_backward(linear_cross_entropy, case, options=chunked(batch_chunk_size=6))
    assert_results_close(ours, reference_grads(case), FLOAT64_TOL)
    kept = Case(**{**case.__dict__, "input": case.input[keep], "target": case.target[keep], "ignore_index": None})
    torch.testing.assert_close(ours[0], reference_grads(kept)[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_class_weights_of_all_targets(reduction, label_smoothing, seed):
    """Every target's class weighs 0: mean divides by 0 → the reference's NaN (also with smoothing), same NaNs in
    the gradients."""
    case = make_case(
        6,
        4,
        5,
        bias=True,
        class_weight=True,
        ignore_frac=0.0,
        label_smoothing=label_smoothing,
        reduction=reduction,
        seed=seed,
    )
    case.weight[case.target.unique()] = 0.0
    assert (case.weight != 0).any()
    ours = forward_backward(linear_cross_entropy, case, options=chunked(batch_chunk_size=4))
    assert_results_close(ours, reference_grads(case), FLOAT64_TOL)


def test_unbatched_with_one_element_target(seed):
    """The reference accepts a (1,) target for an unbatched (F,) input in forward; so do we on every path."""
    case = make_case(None, 5, 7, bias=True, seed=seed)
    target = case.target.clamp(min=0).reshape(1)  # (1,)
    c = case.to(torch.float64)
    expected = oracle_loss(c.input, c.linear_weight, target, linear_bias=c.linear_bias)
    for options in (None, chunked(), LinearCrossEntropyOptions()):
        loss = linear_cross_entropy(
            case.input, case.linear_weight, target, linear_bias=case.linear_bias, options=options
        )
        assert loss.shape == expected.shape
        assert rel_err(loss, expected) <= FLOAT64_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_batch_size_mismatch(device, seed):
    case = make_case(6, 4, 5, device=device, seed=seed)
    with pytest.raises(ValueError, match="batch_size"):
        linear_cross_entropy(case.input, case.linear_weight, case.target[:5], options=chunked())


# --------------------------------------------------------------------------------------------------------------
# Autograd


PATHS = [None, "chunked", "auto"]


def _options(path, **kwargs):
    return None if path is None else LinearCrossEntropyOptions(backend=path, batch_chunk_size=2, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, ids=["reference", "chunked", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probs", "kdim"])
def test_gradcheck(kind, reduction, path, device, seed):
    out = (2,) if kind == "kdim" else ()
    case = make_case(
        5,
        3,
        4,
        out,
        probs=kind == "probs",
        bias=True,
        class_weight=True,
        ignore_index=None if kind == "probs" else 1,
        ignore_frac=0.2,
        label_smoothing=0.1,
        reduction=reduction,
        device=device,
        seed=seed,
    )
    options = _options(path, allow_retain_graph=True)

    def fn(x, w, b):
        return linear_cross_entropy(
            x,
            w,
            case.target,
            linear_bias=b,
            weight=case.weight,
            reduction=reduction,
            ignore_index=case.ignore_index,
            label_smoothing=0.1,
            options=options,
        )

    inputs = (leaf(case.input), leaf(case.linear_weight), leaf(case.linear_bias))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["chunked", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_repeated_backward_with_allow_retain_graph(reduction, path, device, seed):
    """First backward equals the oracle; a second one (same upstream gradient) accumulates exactly twice that."""
    case = make_case(
        9, 4, 6, bias=True, class_weight=True, label_smoothing=0.1, reduction=reduction, device=device, seed=seed
    )
    x, w, b = leaf(case.input), leaf(case.linear_weight), leaf(case.linear_bias)
    options = LinearCrossEntropyOptions(backend=path, batch_chunk_size=4, allow_retain_graph=True)
    loss = linear_cross_entropy(x, w, case.target, **{**case.kwargs(), "linear_bias": b}, options=options)
    g = upstream_grad(loss)
    loss.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    assert_results_close((loss.detach(), *first), reference_grads(case), FLOAT64_TOL)
    loss.backward(g)
    for t, f1 in zip((x, w, b), first):
        torch.testing.assert_close(t.grad, 2 * f1, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["chunked", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward_without_allow_retain_graph_raises(reduction, path, device, seed):
    case = make_case(9, 4, 6, bias=True, reduction=reduction, device=device, seed=seed)
    x, w, b = leaf(case.input), leaf(case.linear_weight), leaf(case.linear_bias)
    loss = linear_cross_entropy(
        x, w, case.target, linear_bias=b, reduction=reduction, options=LinearCrossEntropyOptions(backend=path)
    )
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    assert_results_close((loss.detach(), *first), _unit_upstream_oracle(case), FLOAT64_TOL)
    with pytest.raises(RuntimeError, match="allow_retain_graph"):
        loss.backward()


def _unit_upstream_oracle(case: Case):
    """Oracle gradients for ``loss.backward()`` (upstream gradient 1)."""
    c = case.to(torch.float64)
    x, w, b = leaf(c.input), leaf(c.linear_weight), None if c.linear_bias is None else leaf(c.linear_bias)
    loss = oracle_loss(x, w, c.target, **{**c.kwargs(), "linear_bias": b})
    loss.backward()
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def test_reduction_none_backward_twice_without_allow_retain_graph(seed):
    """reduction="none" recomputes in backward: repeated backward needs no option."""
    case = make_case(9, 4, 6, bias=True, reduction="none", seed=seed)
    x, w, b = leaf(case.input), leaf(case.linear_weight), leaf(case.linear_bias)
    loss = linear_cross_entropy(x, w, case.target, linear_bias=b, reduction="none", options=chunked())
    g = upstream_grad(loss)
    loss.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    loss.backward(g)
    for t, f1 in zip((x, w, b), first):
        torch.testing.assert_close(t.grad, 2 * f1, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_grad_returns_the_loss(reduction, device, seed):
    case = make_case(
        10, 4, 6, bias=True, class_weight=True, label_smoothing=0.1, reduction=reduction, device=device, seed=seed
    )
    x, w, b = leaf(case.input), leaf(case.linear_weight), leaf(case.linear_bias)
    with torch.no_grad():
        loss = linear_cross_entropy(
            x, w, case.target, **{**case.kwargs(), "linear_bias": b}, options=chunked(batch_chunk_size=3)
        )
    assert not loss.requires_grad
    expected = oracle_loss(
        *(t.to(torch.float64) for t in (case.input, case.linear_weight)), case.target, **case.to(torch.float64).kwargs()
    )
    assert rel_err(loss, expected) <= FLOAT64_TOL


@pytest.mark.parametrize("which", ["input", "linear_weight", "linear_bias", "none"])
def test_partial_requires_grad(which, seed):
    """Only the tensors that require grad get gradients, and those are right."""
    case = make_case(10, 4, 6, bias=True, class_weight=True, label_smoothing=0.1, seed=seed)
    x = case.input.clone().requires_grad_(which == "input")
    w = case.linear_weight.clone().requires_grad_(which == "linear_weight")
    b = case.linear_bias.clone().requires_grad_(which == "linear_bias")
    loss = linear_cross_entropy(
        x, w, case.target, **{**case.kwargs(), "linear_bias": b}, options=chunked(batch_chunk_size=3)
    )
    expected = _unit_upstream_oracle(case)
    assert rel_err(loss.detach(), expected[0]) <= FLOAT64_TOL
    if which == "none":
        assert not loss.requires_grad
        return
    loss.backward()
    for t, name, e in zip((x, w, b), ("input", "linear_weight", "linear_bias"), expected[1:]):
        if name == which:
            assert rel_err(t.grad, e) <= FLOAT64_TOL
        else:
            assert t.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("out", [(), (2,)], ids=["2d", "kdim"])
@pytest.mark.parametrize("wants", ["target", "weight", "both"])
def test_gradients_of_probability_target_and_class_weight(wants, out, reduction, seed):
    """The reference differentiates probability targets (and, with them, class weights); the chunked path serves
    such a call the reference's way, with one UserWarning, rather than drop those gradients."""
    case = make_case(
        7, 4, 6, out, probs=True, bias=True, class_weight=True, label_smoothing=0.1, reduction=reduction, seed=seed
    )

    def run(options):
        t = leaf(case.target) if wants in ("target", "both") else case.target
        cw = leaf(case.weight) if wants in ("weight", "both") else case.weight
        x = leaf(case.input)
        loss = linear_cross_entropy(
            x,
            case.linear_weight,
            t,
            linear_bias=case.linear_bias,
            weight=cw,
            reduction=reduction,
            label_smoothing=0.1,
            options=options,
        )
        loss.backward(upstream_grad(loss))
        return loss.detach(), x.grad, t.grad, cw.grad

    expected = run(None)
    with pytest.warns(UserWarning, match="target or weight") as record:
        actual = run(chunked(batch_chunk_size=3))
    assert len(record) == 1
    for a, e in zip(actual, expected):
        assert rel_err(a, e) <= FLOAT64_TOL


@pytest.mark.parametrize("path", PATHS, ids=["reference", "chunked", "auto"])
def test_class_weight_requiring_grad_with_index_targets_raises(path, seed):
    """As in the reference: nll_loss is not differentiable with respect to the class weights."""
    case = make_case(7, 4, 6, class_weight=True, seed=seed)
    with pytest.raises(RuntimeError, match="weight"):
        linear_cross_entropy(
            leaf(case.input), case.linear_weight, case.target, weight=leaf(case.weight), options=_options(path)
        )
