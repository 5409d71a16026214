"""Vocabulary parallel over gloo: 2 and 3 CPU processes, every rank against the single-process result in float64.

One ``torch.multiprocessing.spawn`` per world size runs every case (spawning is the slow part); the workers collect
mismatches instead of raising at the first one, so no rank leaves the others waiting in a collective. A wall-clock
limit (and the process group's own timeout) turns a hang into a failure.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from linear_cross_entropy import LinearCrossEntropyLoss, LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.distributed import check_backend

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

N, H, V = 13, 8, 37
WALL_LIMIT_S = 120.0
METRICS = ("lse", "z_loss", "max_logit", "entropy", "logit_norm", "accuracy", "log_prob")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
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
    return cases


def _check(errors, name, actual, expected):
    try:
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)
    except AssertionError as e:
        errors.append(f"{name}: {e}")


def _run_case(rank, group, bounds, name, kwargs, use_bias, use_cw, errors, grad_all_reduce=True):
    x, w, b, cw, t, upstream = _data()
    start, end = bounds[rank], bounds[rank + 1]
    kwargs = dict(kwargs)
    if "ignore_index" in kwargs:
        t = torch.where(t == -100, kwargs["ignore_index"], t)
    options = kwargs.pop("options", LinearCrossEntropyOptions())
    metrics = kwargs.get("return_metrics", False)
    extras = {k: kwargs.pop(k) for k in ("z_loss", "logit_scale", "logit_softcap", "return_metrics") if k in kwargs}

    def finish(out):
        loss = out.loss if metrics else out
        return loss, (loss if loss.dim() == 0 else (loss * upstream).sum())

    # single-process reference, float64
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if use_bias else None
    ref_kw = dict(linear_bias=br, weight=cw if use_cw else None, **kwargs)
    if extras:
        ref_out = linear_cross_entropy(xr, wr, t, **ref_kw, **extras)
    else:
        ref_out = F.cross_entropy(F.linear(xr, wr, br), t, **{k: v for k, v in ref_kw.items() if k != "linear_bias"})
    ref_loss, ref_scalar = finish(ref_out)
    ref_scalar.backward()

    # this rank's slice
    xs = x.clone().requires_grad_()
    ws = w[start:end].clone().requires_grad_()
    bs = b[start:end].clone().requires_grad_() if use_bias else None
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
    loss, scalar = finish(out)
    scalar.backward()
    grad_x = xs.grad
    if not grad_all_reduce:
        grad_x = grad_x.clone()
        dist.all_reduce(grad_x, group=group)
    _check(errors, f"{name} loss", loss, ref_loss.detach())
    _check(errors, f"{name} grad_input", grad_x, xr.grad)
    _check(errors, f"{name} grad_weight", ws.grad, wr.grad[start:end])
    if use_bias:
        _check(errors, f"{name} grad_bias", bs.grad, br.grad[start:end])
    if metrics:
        for field in METRICS:
            _check(errors, f"{name} metric {field}", getattr(out.metrics, field), getattr(ref_out.metrics, field))


def _expect_error(errors, name, exc_type, match, fn):
    try:
        fn()
    except exc_type as e:
        if match not in str(e):
            errors.append(f"{name}: message {str(e)!r} lacks {match!r}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"{name}: expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    else:
        errors.append(f"{name}: no error")


def _error_cases(rank, group, bounds, errors):
    x, w, b, cw, t, _ = _data()
    start, end = bounds[rank], bounds[rank + 1]
    ws = w[start:end]

    def call(tt=t, ww=ws, xx=x, **kw):
        return linear_cross_entropy(xx, ww, tt, options=LinearCrossEntropyOptions(), process_group=group, **kw)

    bad = t.clone()
    bad[0] = V  # beyond the global vocabulary (but a valid index into no rank's slice)
    _expect_error(errors, "target out of range", IndexError, f"Target {V}", lambda: call(bad))
    # targets that differ across ranks: caught with the debug flag
    other = t.clone()
    other[1] = (t[1] + rank) % V
    os.environ["LINEAR_CROSS_ENTROPY_DEBUG"] = "1"
    try:
        _expect_error(errors, "targets differ", ValueError, "targets differ across ranks", lambda: call(other))
        call()  # identical targets pass the check
    finally:
        del os.environ["LINEAR_CROSS_ENTROPY_DEBUG"]
    # a rank with an empty slice
    empty = ws if rank else ws[:0]
    _expect_error(errors, "empty slice", ValueError, "non-empty vocabulary slice", lambda: call(ww=empty))
    # ranks that disagree on the batch
    rows = N if rank else N - 1
    _expect_error(errors, "batch differs", ValueError, "ranks disagree", lambda: call(t[:rows], xx=x[:rows]))
    # unsupported: probability targets, K-dimensional loss (raised before any communication)
    probs = torch.softmax(torch.randn(N, end - start, dtype=torch.float64), dim=1)
    _expect_error(errors, "probabilities", NotImplementedError, "target", lambda: call(probs))
    wk = torch.randn(end - start, 2, H, dtype=torch.float64)
    tk = torch.zeros(N, 2, dtype=torch.int64)
    _expect_error(errors, "K-dim", NotImplementedError, "linear_weight", lambda: call(tk, ww=wk))
    # class weights sized for the whole vocabulary are refused (each rank passes its own slice)
    _expect_error(errors, "weight shape", RuntimeError, "weight tensor", lambda: call(weight=cw))
    # the group still works after every error
    _run_case(rank, group, bounds, "after-errors", {"reduction": "mean"}, True, True, errors)


def _tie_case(rank, group, bounds, errors):
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
    out = linear_cross_entropy(
        x,
        w[start:end],
        t,
        linear_bias=b[start:end],
        options=LinearCrossEntropyOptions(),
        process_group=group,
        return_metrics=True,
    )
    assert 0 < float(ref.metrics.accuracy) < 1
    for field in METRICS:
        _check(errors, f"ties metric {field}", getattr(out.metrics, field), getattr(ref.metrics, field))


def _module_case(rank, group, bounds, errors):
    x, w, b, _, t, _ = _data()
    start, end = bounds[rank], bounds[rank + 1]
    m = LinearCrossEntropyLoss(H, end - start, bias=True, dtype=torch.float64, process_group=group)
    with torch.no_grad():
        m.linear.weight.copy_(w[start:end])
        m.linear.bias.copy_(b[start:end])
    _check(errors, "module loss", m(x, t), F.cross_entropy(F.linear(x, w, b), t))
    assert m.process_group is group


def _worker(rank, world, port, sizes, out_dir):
    errors = []
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
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
        _error_cases(rank, group, bounds, errors)
    except Exception:  # noqa: BLE001
        errors.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(errors))
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(20, 17), (10, 13, 14)], ids=["2ranks-20-17", "3ranks-10-13-14"])
def test_vocab_parallel_matches_single_process(sizes, tmp_path):
    world = len(sizes)
    ctx = mp.spawn(_worker, args=(world, _free_port(), sizes, str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + WALL_LIMIT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"vocabulary-parallel workers still running after {WALL_LIMIT_S} s (hang?)")
    reports = [(tmp_path / f"rank{r}.txt").read_text() for r in range(world)]
    failures = [f"rank {r}:\n{text}" for r, text in enumerate(reports) if text]
    assert not failures, "\n\n".join(failures)


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
