"""Vocabulary parallel over gloo: 2 and 3 CPU processes, every rank against the single-process result in float64.

One ``torch.multiprocessing.spawn`` per world size runs every case (spawning is the slow part); the workers collect
mismatches instead of raising at the first one, so no rank leaves the others waiting in a collective. A wall-clock
limit (and the process group's own timeout) turns a hang into a failure.

The chunked path runs in float64 (tolerance 1e-9). Under ``TRITON_INTERPRET=1`` the same workers also run the fused
path (``backend="fused"``, its Triton kernels in the interpreter) in float32, each result held to the float64 one
within plain PyTorch's error in float32 (``helpers.assert_within_plain``), with a small column block so that a row
spans several tiles. The slices are sized so that the ranks' own vocabulary sizes would give them different chunks and
softmax blocks: the chunking must follow the global vocabulary or the collectives would not match.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import INTERPRET, check_close, check_within_plain, expect_error, run_ranks

from linear_cross_entropy import LinearCrossEntropyLoss, LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.backends import chunked
from linear_cross_entropy.backends.common import Grads, LossParams
from linear_cross_entropy.distributed import VocabShard, check_backend
from linear_cross_entropy.options import ResolvedOptions

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

N, H, V = 13, 8, 37
WALL_LIMIT_S = 150.0
METRICS = ("lse", "z_loss", "max_logit", "entropy", "logit_norm", "accuracy", "log_prob")


def vocab_problem():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64)
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.2
    t = torch.randint(0, V, (N,), generator=g)
    t[::2] = (x @ w.T + b).argmax(dim=1)[::2]  # some correct predictions, for the accuracy metric
    t[3] = -100
    t[7] = 5  # ignored when ignore_index=5
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    return x, w, b, cw, t, upstream


def _cases():
    """(name, kwargs, uses_bias, uses_class_weight); extras are compared with the single-process function."""
    cases = []
    for reduction in ("mean", "sum", "none"):
        base = {"reduction": reduction}
        cases += [
            (f"{reduction}-plain", base, False, False),
            (f"{reduction}-bias", base, True, False),
            (f"{reduction}-weight", base, False, True),
            (f"{reduction}-smooth", {**base, "label_smoothing": 0.3}, False, False),
            (f"{reduction}-weight-smooth", {**base, "label_smoothing": 0.2}, True, True),
            (f"{reduction}-ignore5", {**base, "ignore_index": 5}, True, True),
            (
                f"{reduction}-extras",
                {**base, "z_loss": 0.01, "logit_scale": 0.8, "logit_softcap": 3.0, "label_smoothing": 0.1},
                True,
                True,
            ),
            (f"{reduction}-metrics", {**base, "return_metrics": True, "z_loss": 0.1}, True, False),
        ]
    cases.append(("mean-small-chunks", {"options": LinearCrossEntropyOptions(batch_chunk_size=4)}, True, True))
    cases.append(("mean-options-none", {"options": None}, True, False))
    # chunk rows from the aspect ratio and small softmax blocks: both must follow the global V on every rank
    aspect = LinearCrossEntropyOptions(chunking_method="aspect_ratio")
    cases.append(("sum-aspect-ratio", {"options": aspect, "reduction": "sum", "label_smoothing": 0.1}, True, True))
    cases.append(("none-small-blocks", {"reduction": "none", "small_blocks": True, "return_metrics": True}, True, True))
    return cases


def _fused_cases():
    """Cases for the fused path (fp32, TRITON_INTERPRET): every reduction and loss option, one chunk (the deferred
    backward) and several."""
    fused = LinearCrossEntropyOptions(backend="fused")
    cases = []
    for reduction in ("mean", "sum", "none"):
        base = {"reduction": reduction, "options": fused}
        cases += [
            (f"fused-{reduction}-bias", base, True, False),
            (
                f"fused-{reduction}-weight-smooth-ignore5",
                {**base, "label_smoothing": 0.2, "ignore_index": 5},
                True,
                True,
            ),
            (
                f"fused-{reduction}-extras",
                {**base, "z_loss": 0.01, "logit_scale": 0.8, "logit_softcap": 3.0, "label_smoothing": 0.1},
                True,
                True,
            ),
            (f"fused-{reduction}-metrics", {**base, "return_metrics": True, "z_loss": 0.1}, True, False),
        ]
    chunks = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=4)
    aspect = LinearCrossEntropyOptions(backend="fused", chunking_method="aspect_ratio")
    cases += [
        ("fused-mean-chunks-of-4", {"options": chunks, "label_smoothing": 0.1, "return_metrics": True}, True, True),
        ("fused-sum-aspect-ratio", {"options": aspect, "reduction": "sum", "z_loss": 0.01}, False, True),
        ("fused-mean-plain", {"options": fused}, False, False),
    ]
    return cases


def single_process(x, w, b, cw, t, kwargs, extras, upstream):
    """The unsharded loss and gradients in the inputs' dtype: plain PyTorch, or our reference path with extras."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    if extras:
        out = linear_cross_entropy(xr, wr, t, linear_bias=br, weight=cw, **kwargs, **extras)
    else:
        out = F.cross_entropy(F.linear(xr, wr, br), t, weight=cw, **kwargs)
    loss = out.loss if extras.get("return_metrics") else out
    (loss if loss.dim() == 0 else (loss * upstream.to(loss.dtype)).sum()).backward()
    return out, loss.detach(), xr.grad, wr.grad, None if br is None else br.grad


def _run_case(rank, group, bounds, name, kwargs, use_bias, use_cw, errors, grad_all_reduce=True):
    x, w, b, cw, t, upstream = vocab_problem()
    start, end = bounds[rank], bounds[rank + 1]
    kwargs = dict(kwargs)
    if "ignore_index" in kwargs:
        t = torch.where(t == -100, kwargs["ignore_index"], t)
    options = kwargs.pop("options", LinearCrossEntropyOptions())
    small_blocks = kwargs.pop("small_blocks", False)
    fused = options is not None and options.backend == "fused"
    metrics = kwargs.get("return_metrics", False)
    extras = {k: kwargs.pop(k) for k in ("z_loss", "logit_scale", "logit_softcap", "return_metrics") if k in kwargs}
    b = b if use_bias else None
    cw = cw if use_cw else None

    ref = single_process(x, w, b, cw, t, kwargs, extras, upstream)  # float64
    if fused:  # the fused path runs fp32 (no fp64 kernels); plain PyTorch's own fp32 error sets the tolerance
        x, w, b, cw = (None if v is None else v.float() for v in (x, w, b, cw))
        plain = single_process(x, w, b, cw, t, kwargs, extras, upstream)

    # this rank's slice
    xs = x.clone().requires_grad_()
    ws = w[start:end].clone().requires_grad_()
    bs = b[start:end].clone().requires_grad_() if use_bias else None
    before = _SHARDED_FUSED_CHUNKS[0]
    saved_block = chunked._BLOCK_LOGITS
    if small_blocks:  # softmax blocks of a few rows: one combine per block
        chunked._BLOCK_LOGITS = 2 * V
    try:
        out = linear_cross_entropy(
            xs,
            ws,
            t,
            linear_bias=bs,
            weight=cw[start:end] if use_cw else None,
            options=options,
            process_group=group,
            input_grad_all_reduce=grad_all_reduce,
            **kwargs,
            **extras,
        )
    finally:
        chunked._BLOCK_LOGITS = saved_block
    if fused and _SHARDED_FUSED_CHUNKS[0] == before:
        errors.append(f"{name}: the fused vocabulary-parallel path did not run")
    loss = out.loss if metrics else out
    (loss if loss.dim() == 0 else (loss * upstream.to(loss.dtype)).sum()).backward()
    grad_x = xs.grad
    if not grad_all_reduce:
        grad_x = grad_x.clone()
        dist.all_reduce(grad_x, group=group)
    results = (loss.detach(), grad_x, ws.grad, bs.grad if use_bias else None)
    check_results(errors, name, results, out.metrics if metrics else None, ref, plain if fused else None, start, end)


def check_results(errors, name, results, metrics, ref, plain, start=None, end=None):
    """This rank's ``results`` — ``(loss, grad_input, grad_weight, grad_bias or None)``, the weight and bias gradients
    of its classes ``[start, end)`` — and the call's ``metrics`` (None without) against :func:`single_process`'s
    float64 ``ref``: within plain PyTorch's fp32 error where ``plain`` (the fp32 single-process run: the fused path)
    is given, else equal but for the order of the sums."""
    per_class = (False, False, True, True)
    names = ("loss", "grad_input", "grad_weight", "grad_bias")
    checks = []  # (what, actual, index in ref/plain, per class)
    checks += [(what, a, i + 1, per_class[i]) for i, (what, a) in enumerate(zip(names, results)) if a is not None]
    checks += [(f"metric {field}", getattr(metrics, field), field, False) for field in METRICS if metrics is not None]
    for what, actual, key, sliced in checks:
        expected, approx = (
            None if run is None else getattr(run[0].metrics, key) if isinstance(key, str) else run[key]
            for run in (ref, plain)
        )
        if sliced:
            expected, approx = expected[start:end], None if approx is None else approx[start:end]
        if approx is not None:
            check_within_plain(errors, f"{name} {what}", actual, approx, expected)
        else:
            check_close(errors, f"{name} {what}", actual, expected)


def _error_cases(rank, group, bounds, errors):
    x, w, b, cw, t, _ = vocab_problem()
    start, end = bounds[rank], bounds[rank + 1]
    ws = w[start:end]

    def call(tt=t, ww=ws, xx=x, **kw):
        return linear_cross_entropy(xx, ww, tt, options=LinearCrossEntropyOptions(), process_group=group, **kw)

    bad = t.clone()
    bad[0] = V  # beyond the global vocabulary (but a valid index into no rank's slice)
    expect_error(errors, "target out of range", IndexError, f"Target {V}", lambda: call(bad))
    # targets that differ across ranks: caught with the debug flag
    other = t.clone()
    other[1] = (t[1] + rank) % V
    os.environ["LINEAR_CROSS_ENTROPY_DEBUG"] = "1"
    try:
        expect_error(errors, "targets differ", ValueError, "targets differ across ranks", lambda: call(other))
        call()  # identical targets pass the check
    finally:
        del os.environ["LINEAR_CROSS_ENTROPY_DEBUG"]
    # a rank with an empty slice
    empty = ws if rank else ws[:0]
    expect_error(errors, "empty slice", ValueError, "non-empty vocabulary slice", lambda: call(ww=empty))
    # ranks that disagree on the batch
    rows = N if rank else N - 1
    expect_error(errors, "batch differs", ValueError, "ranks disagree", lambda: call(t[:rows], xx=x[:rows]))
    # unsupported: probability targets, K-dimensional loss (raised before any communication)
    probs = torch.softmax(torch.randn(N, end - start, dtype=torch.float64), dim=1)
    expect_error(errors, "probabilities", NotImplementedError, "target", lambda: call(probs))
    wk = torch.randn(end - start, 2, H, dtype=torch.float64)
    tk = torch.zeros(N, 2, dtype=torch.int64)
    expect_error(errors, "K-dim", NotImplementedError, "linear_weight", lambda: call(tk, ww=wk))
    # class weights sized for the whole vocabulary are refused (each rank passes its own slice)
    expect_error(errors, "weight shape", RuntimeError, "weight tensor", lambda: call(weight=cw))
    # the group still works after every error
    _run_case(rank, group, bounds, "after-errors", {"reduction": "mean"}, True, True, errors)


def _tie_case(rank, group, bounds, errors, fused=False):
    """Classes 2 and 30 (on different ranks) have equal logits and are every row's argmax: accuracy counts the
    first maximal class, as argmax does."""
    # small integers: every GEMM (whatever its blocking on each rank) is exact, so the tie is exact everywhere
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-3, 4, (V, H), generator=g).double()
    b = torch.randint(-3, 4, (V,), generator=g).double()
    w[2] = w[30] = 10.0
    b[30] = b[2]
    x = torch.randint(-2, 3, (N, H), generator=g).double() + 10.0
    t = torch.full((N,), 30, dtype=torch.int64)
    t[::3] = 2
    start, end = bounds[rank], bounds[rank + 1]
    ref = linear_cross_entropy(x, w, t, linear_bias=b, return_metrics=True)
    if fused:  # integers are exact in fp32 too
        x, w, b = x.float(), w.float(), b.float()
        plain = linear_cross_entropy(x, w, t, linear_bias=b, return_metrics=True)
    out = linear_cross_entropy(
        x,
        w[start:end],
        t,
        linear_bias=b[start:end],
        options=LinearCrossEntropyOptions(backend="fused" if fused else "auto"),
        process_group=group,
        return_metrics=True,
    )
    assert 0 < float(ref.metrics.accuracy) < 1
    for field in METRICS:
        name = f"{'fused ' if fused else ''}ties metric {field}"
        if fused:
            check_within_plain(
                errors, name, getattr(out.metrics, field), getattr(plain.metrics, field), getattr(ref.metrics, field)
            )
        else:
            check_close(errors, name, getattr(out.metrics, field), getattr(ref.metrics, field))
    if fused:  # the tied rows' accuracy is exact: the same fp32 mean as plain PyTorch's
        check_close(errors, "fused ties accuracy", out.metrics.accuracy, plain.metrics.accuracy)


def _module_case(rank, group, bounds, errors):
    x, w, b, _, t, _ = vocab_problem()
    start, end = bounds[rank], bounds[rank + 1]
    m = LinearCrossEntropyLoss(H, end - start, bias=True, dtype=torch.float64, process_group=group)
    with torch.no_grad():
        m.linear.weight.copy_(w[start:end])
        m.linear.bias.copy_(b[start:end])
    check_close(errors, "module loss", m(x, t), F.cross_entropy(F.linear(x, w, b), t))
    assert m.process_group is group


_SHARDED_FUSED_CHUNKS = [0]  # chunks the fused vocabulary-parallel path ran in this process


def _fused_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _count_sharded_fused_chunks(launch) -> None:
    original = launch._sharded_rows

    def counting(*args, **kwargs):
        _SHARDED_FUSED_CHUNKS[0] += 1
        return original(*args, **kwargs)

    launch._sharded_rows = counting


def _worker(rank, world, sizes, errors):
    group = dist.group.WORLD
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    assert bounds[-1] == V
    for name, kwargs, use_bias, use_cw in _cases():
        _run_case(rank, group, bounds, name, kwargs, use_bias, use_cw, errors)
    _run_case(rank, group, bounds, "no-grad-all-reduce", {"reduction": "sum"}, True, True, errors, False)
    _module_case(rank, group, bounds, errors)
    _tie_case(rank, group, bounds, errors)
    if INTERPRET and _fused_available():
        from linear_cross_entropy.backends.fused import chunks, rows

        rows._MAX_BLOCK_C = 8  # several column tiles per row (slices of 7 to 25 classes)
        _count_sharded_fused_chunks(chunks)
        for name, kwargs, use_bias, use_cw in _fused_cases():
            _run_case(rank, group, bounds, name, kwargs, use_bias, use_cw, errors)
        fused = {"options": LinearCrossEntropyOptions(backend="fused"), "label_smoothing": 0.1}
        _run_case(rank, group, bounds, "fused-no-grad-all-reduce", fused, True, True, errors, False)
        chunks = {"options": LinearCrossEntropyOptions(backend="fused", batch_chunk_size=5)}
        _run_case(rank, group, bounds, "fused-chunks-no-grad-all-reduce", chunks, True, False, errors, False)
        _tie_case(rank, group, bounds, errors, fused=True)
    _error_cases(rank, group, bounds, errors)


# Uneven slices whose own sizes would give the ranks different aspect-ratio chunks (12 vs 25 classes: 8 vs 4 rows;
# 7 vs 13: 13 vs 8 rows) and different softmax blocks.
@pytest.mark.parametrize("sizes", [(25, 12), (7, 13, 17)], ids=["2ranks-25-12", "3ranks-7-13-17"])
def test_vocab_parallel_matches_single_process(sizes, tmp_path):
    run_ranks(_worker, len(sizes), (sizes,), tmp_path, WALL_LIMIT_S)


def test_check_backend_names_process_group():
    with pytest.raises(ValueError, match="process_group.*NCCL"):
        check_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="process_group.*gloo"):
        check_backend("gloo", torch.device("cuda"))
    check_backend("gloo", torch.device("cpu"))
    check_backend("nccl", torch.device("cuda"))


def test_unsupported_and_uninitialised_without_spawning():
    x = torch.randn(4, 3)
    w = torch.randn(5, 3)
    with pytest.raises(NotImplementedError, match="target"):
        linear_cross_entropy(x, w, torch.softmax(torch.randn(4, 5), 1), process_group=object())
    with pytest.raises(ValueError, match="process_group"):
        linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.int64), process_group=object())


class _Alone(VocabShard):
    """A one-rank group without torch.distributed: the collectives are identities."""

    def max_(self, t):
        return t

    def sum_(self, t):
        return t

    def min_(self, t):
        return t


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU runs)")
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fused_two_phases_match_the_single_launch(reduction, monkeypatch):
    """The sharded sweep on a one-rank "group" (sweep 1 → host combine → sweep 2, two launches) against the
    single-launch kernel: same loss, lse, statistics and gradients up to fp32 rounding, over several column tiles."""
    pytest.importorskip("triton")
    from linear_cross_entropy.backends.fused import chunks, rows
    from linear_cross_entropy.backends.fused.policy import make_plan

    monkeypatch.setattr(rows, "_MAX_BLOCK_C", 8)
    g = torch.Generator().manual_seed(3)
    n, h, v = 11, 8, 29
    x, w, b = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    cw = torch.rand(v, generator=g) + 0.2
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    lp = LossParams(reduction, -100, 0.2, False, z_loss=0.01, logit_scale=0.7, logit_softcap=3.0, metrics=True)
    ro = ResolvedOptions("fused", "balanced", torch.float32, 4, False)
    shares = (torch.rand(n, generator=g), torch.rand(n, generator=g))
    grads = Grads(True, True, True)
    shard = _Alone(group=None, offset=0, local_classes=v, num_classes=v, class_weight_sum=cw.double().sum())
    plan = make_plan("backward", lp, ro, grads, x, w.dtype, sharded=True)
    one = chunks.accumulated(x, w, b, t, cw, lp, plan, shares)
    two = chunks.accumulated(x, w, b, t, cw, lp, plan, shares, shard=shard)
    assert one[2] is not None
    keep = (t != -100)[:, None]
    # the correct/log p_y statistics of an ignored row are unused (summarize_metrics masks them)
    one_stats, two_stats = torch.where(keep, one[2], 0.0), torch.where(keep, two[2], 0.0)
    for name, a, e in zip(
        ["loss", "lse", "stats", "grad_x", "grad_w", "grad_b"],
        [*two[:2], two_stats, *two[3]],
        [*one[:2], one_stats, *one[3]],
    ):
        torch.testing.assert_close(a, e, rtol=2e-6, atol=2e-6, msg=name)
