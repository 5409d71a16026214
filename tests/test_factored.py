"""The fused backend's factored row pass (``backends/fused/factored*.py``) against float64 and plain PyTorch.

On the CPU its Triton kernels run in the interpreter (fp32: the interpreter's bf16 ``tl.dot`` is unusable), the path
forced by ``THRESHOLDS`` (the default takes it for bf16 on CUDA only). The cases: rows in several chunks with a
ragged last one, V not a multiple of the tile, ignored rows, bias, class weights, the z-loss, every reduction, and
rows whose largest logit exceeds the target logit by more than the window (refitted). The ``gpu`` tests run bf16 at
sizes with thousands of classes against eager in bf16 (the Gluon GEMM where it runs). The plan's decision table
is checked without running anything. (The ``force_factored`` fixture is conftest's.)
"""

import dataclasses

import pytest
import torch
from helpers import (
    assert_within_plain,
    count_calls,
    extras_oracle,
    leaf,
    oracle_loss,
    plain_loss,
    small_problem,
    upstream_grad,
)
from helpers.env import HAS_CUDA, HAS_TRITON, needs_interpreter

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy
from linear_cross_entropy.backends.common import LossParams
from linear_cross_entropy.backends.fused import policy

pytest.importorskip("triton")


def _spy(monkeypatch):
    """One entry per factored chunk run, the number of rows it refitted (so that a test fails if the path silently
    was not taken)."""
    from linear_cross_entropy.backends.fused import factored

    calls = []
    real = factored.forward_chunk

    def spy(*args, **kw):
        real(*args, **kw)
        calls.append(int(args[7].refit.sum()))  # args[7]: the chunk's FactoredBuffers

    monkeypatch.setattr(factored, "forward_chunk", spy)
    return calls


def _run(x, w, y, b=None, cw=None, rows=None, reduction="mean", **kw):
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=rows, chunking_method=None)
    xl, wl = leaf(x), leaf(w)
    bl = None if b is None else leaf(b)
    loss = linear_cross_entropy(xl, wl, y, linear_bias=bl, weight=cw, reduction=reduction, options=options, **kw)
    loss.backward(upstream_grad(loss))
    return loss.detach(), xl.grad, wl.grad, None if bl is None else bl.grad


def _reference(fn, x, w, y, b, cw, reduction, **kw):
    xl, wl = leaf(x), leaf(w)
    bl = None if b is None else leaf(b)
    loss = fn(xl, wl, y, linear_bias=bl, weight=cw, reduction=reduction, **kw)
    loss.backward(upstream_grad(loss))
    return loss.detach(), xl.grad, wl.grad, None if bl is None else bl.grad


def _z_loss_loss(x, w, y, *, linear_bias, weight, reduction, z_loss):
    """:func:`helpers.extras_oracle`'s loss with ``_reference``'s call (cross entropy + λ·lse² over kept rows)."""
    return extras_oracle(x, w, y, b=linear_bias, cw=weight, reduction=reduction, z_loss=z_loss)[0]


CASES = [  # (n, h, v, rows, bias, class_weight, reduction)
    (37, 16, 203, 16, False, False, "mean"),
    (40, 32, 150, 16, True, False, "sum"),
    (33, 16, 97, 8, False, True, "mean"),
    (24, 16, 64, 16, True, True, "none"),
]


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("n, h, v, rows, bias, class_weight, reduction", CASES)
def test_factored_matches_float64(force_factored, monkeypatch, n, h, v, rows, bias, class_weight, reduction):
    calls = _spy(monkeypatch)
    x, w, b, y, cw = small_problem(n, h, v, torch.float32, seed=n + v, bias=bias, class_weight=class_weight)
    ours = _run(x, w, y, b, cw, rows, reduction)
    assert calls, "the factored pass did not run"
    ref = _reference(oracle_loss, x.double(), w.double(), y, None if b is None else b.double(),
                     None if cw is None else cw.double(), reduction)  # fmt: skip
    plain = _reference(plain_loss, x, w, y, b, cw, reduction)
    assert_within_plain(ours, plain, ref, torch.float32)


@pytest.mark.parametrize("group_m", [1, 2, 4, 8])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 6, 8, 12, 30, 264])
def test_schedule_gives_each_slot_one_worker(group_m, workers):
    """The exponential GEMM's schedule (factored_schedule): every tile once; each (row block, slot) pair handled by
    one worker, back to back in its stream, its last tile flagged; the slots a row has (what the combine reads) all
    written and within the allocation — for ragged row-block counts (remainder groups) and few or many classes."""
    from linear_cross_entropy.backends.fused.factored_schedule import group_size, largest_group, slots, tile_schedule

    g = largest_group(workers, group_m)
    for tiles_m in range(1, 20):
        for tiles_n in (1, 2, 7, 33, 40):
            total, seen, owner = tiles_m * tiles_n, set(), {}
            for worker in range(min(workers, total)):
                for tile in range(worker, total, workers):
                    m, n, slot, last = tile_schedule(tile, tiles_m, tiles_n, g, workers)
                    assert 0 <= m < tiles_m and 0 <= n < tiles_n and (m, n) not in seen
                    seen.add((m, n))
                    assert owner.get((m, slot), (worker, False)) == (worker, False), "a slot split between workers"
                    owner[(m, slot)] = (worker, bool(last))
            assert len(seen) == total
            assert all(closed for _, closed in owner.values())
            row_slots = {m: min(workers // group_size(m, tiles_m, g), tiles_n) for m in range(tiles_m)}
            assert set(owner) == {(m, s) for m, k in row_slots.items() for s in range(k)}
            assert max(row_slots.values()) <= slots(tiles_m * 16, 16, tiles_n, g, workers)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("grad_x", [True, False])
def test_the_product_rides_in_grad_x(force_factored, monkeypatch, grad_x):
    """Each chunk's partials, then its (r, H) product, go over its own rows of grad_x (no buffer beside the
    (rows, V) one); without grad_x they share one, the partials fewer than one a tile."""
    from linear_cross_entropy.backends.fused import factored

    spaces = []
    real = factored.allocate

    def spy(rows, x, num_classes, gx, **kw):
        ws = real(rows, x, num_classes, gx, **kw)
        spaces.append((ws.grad_x is not None, ws.space.numel(), ws.slots * rows, rows * x.shape[1]))
        return ws

    monkeypatch.setattr(factored, "allocate", spy)
    x, w, b, y, _ = small_problem(70, 32, 230, torch.float32, seed=21, bias=True)
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=32, chunking_method=None)
    xl, wl = (leaf(x) if grad_x else x), leaf(w)
    linear_cross_entropy(xl, wl, y, linear_bias=b, options=options, label_smoothing=0.1).backward()
    ((in_grad_x, numel, partials, product),) = spaces
    assert in_grad_x == grad_x
    assert numel == 0 if grad_x else numel >= max(partials, product)
    assert partials < 32 * -(-230 // 16)  # fewer than one partial per 16-class tile
    xr, wr = x.double().requires_grad_(grad_x), w.double().requires_grad_()
    oracle_loss(xr, wr, y, linear_bias=b.double(), label_smoothing=0.1).backward()
    px, pw = leaf(x), leaf(w)
    plain_loss(px, pw, y, linear_bias=b, label_smoothing=0.1).backward()
    ours = (wl.grad,) + ((xl.grad,) if grad_x else ())
    assert_within_plain(ours, (pw.grad, px.grad), (wr.grad, xr.grad), torch.float32, names=("grad_w", "grad_x"))


@pytest.mark.interpreter
@needs_interpreter
def test_factored_z_loss(force_factored, monkeypatch):
    calls = _spy(monkeypatch)
    x, w, b, y, _ = small_problem(30, 16, 120, torch.float32, seed=5)
    ours = _run(x, w, y, rows=16, z_loss=1e-2)
    assert calls
    ref = _reference(_z_loss_loss, x.double(), w.double(), y, None, None, "mean", z_loss=1e-2)
    plain = _reference(_z_loss_loss, x, w, y, None, None, "mean", z_loss=1e-2)
    assert_within_plain(ours, plain, ref, torch.float32)


@pytest.mark.interpreter
@needs_interpreter
def test_rows_beyond_the_window_are_refitted(force_factored, monkeypatch):
    """Rows whose largest logit is > CLAMP nats above the target logit (losses of hundreds of nats) take the refit:
    their loss and gradients still match float64, and the other rows are untouched by it."""
    refits = _spy(monkeypatch)
    x, w, b, y, _ = small_problem(32, 16, 150, torch.float32, seed=9, bias=True)
    x[[3, 20]] *= 150.0  # logits of ~±300: the window (50 nats) exceeded on both rows
    y[[3, 20]] = torch.tensor([0, 1])
    ours = _run(x, w, y, b, rows=16)
    assert sum(refits) >= 2, refits
    ref = _reference(oracle_loss, x.double(), w.double(), y, b.double(), None, "mean")
    plain = _reference(plain_loss, x, w, y, b, None, "mean")
    assert_within_plain(ours, plain, ref, torch.float32)


@pytest.mark.interpreter
@needs_interpreter
def test_targets_repeated_across_chunks(force_factored, monkeypatch):
    """Every class the target of rows in several chunks (the target column's weight and bias gradients are added
    once a call, summed per class over rows of every chunk): with bias and class weights, against float64."""
    calls = _spy(monkeypatch)
    x, w, b, _, cw = small_problem(70, 16, 40, torch.float32, seed=13, bias=True, class_weight=True)
    y = torch.arange(70) % 7  # 7 classes, each the target of 10 rows spread over the 5 chunks
    y[[4, 33]] = -100
    ours = _run(x, w, y, b, cw, rows=16)
    assert len(calls) == 5
    ref = _reference(oracle_loss, x.double(), w.double(), y, b.double(), cw.double(), "mean")
    plain = _reference(plain_loss, x, w, y, b, cw, "mean")
    assert_within_plain(ours, plain, ref, torch.float32)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize(
    "bias, class_weight, reduction, z_loss",
    [(False, False, "mean", 0.0), (True, True, "mean", 0.0), (True, False, "sum", 0.0), (False, False, "mean", 1e-2),
     (False, True, "none", 0.0)],
)  # fmt: skip
def test_label_smoothing(force_factored, monkeypatch, bias, class_weight, reduction, z_loss):
    """Label smoothing's rank-1 term beside the factoring (``grad_x −= (s·ε/C)·Σ_c w_c W_c``, ``grad_W −= w ⊗
    Σ_n (s_n·ε/C)·x_n``, the loss's ``Σ_c w_c z_c`` one dot product a row), with class weights, bias, the z-loss
    and a refitted row, against float64."""
    calls = _spy(monkeypatch)
    x, w, b, y, cw = small_problem(45, 16, 130, torch.float32, seed=31, bias=bias, class_weight=class_weight)
    x[7] *= 150.0  # beyond the window: refitted (its dz written whole, the rank-1 term still apart)
    y[7] = 3
    kw = dict(label_smoothing=0.1) | (dict(z_loss=z_loss) if z_loss else {})
    ours = _run(x, w, y, b, cw, rows=16, reduction=reduction, **kw)
    assert len(calls) == 3 and sum(calls) >= 1, calls

    def oracle(x, w, y, *, linear_bias, weight, reduction):  # the materialised logits' loss
        return extras_oracle(x, w, y, b=linear_bias, cw=weight, reduction=reduction, ls=0.1, z_loss=z_loss)[0]

    ref = _reference(oracle, x.double(), w.double(), y, None if b is None else b.double(),
                     None if cw is None else cw.double(), reduction)  # fmt: skip
    plain = _reference(oracle, x, w, y, b, cw, reduction)
    assert_within_plain(ours, plain, ref, torch.float32)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize(
    "logit_scale, bias, class_weight, label_smoothing, z_loss, reduction",
    [(0.5, False, False, 0.0, 0.0, "mean"), (2.5, True, True, 0.0, 0.0, "mean"), (0.7, True, False, 0.1, 1e-2, "sum"),
     (1.8, False, True, 0.1, 0.0, "mean"), (0.8, True, False, 0.0, 0.0, "none")],
)  # fmt: skip
def test_logit_scale(force_factored, monkeypatch, logit_scale, bias, class_weight, label_smoothing, z_loss, reduction):
    """``z = a·(x·Wᵀ + b)`` (an RL objective's temperature ``1/a``; its per-token losses, ``"none"``, take the
    factored pass in backward): ``a`` in the exponential's FMA, the target logit and the smoothing sum, the
    coefficients times ``a`` (the gradient of ``u = x·Wᵀ + b``); with label smoothing, the z-loss and a refitted
    row, against float64."""
    calls = _spy(monkeypatch)
    x, w, b, y, cw = small_problem(45, 16, 130, torch.float32, seed=41, bias=bias, class_weight=class_weight)
    x[9] *= 150.0 / logit_scale  # beyond the window after scaling: refitted
    y[9] = 5
    kw = dict(logit_scale=logit_scale, label_smoothing=label_smoothing, z_loss=z_loss)
    ours = _run(x, w, y, b, cw, rows=16, reduction=reduction, **kw)
    assert len(calls) == 3 and sum(calls) >= 1, calls

    def oracle(x, w, y, *, linear_bias, weight, reduction):
        return extras_oracle(
            x, w, y, b=linear_bias, cw=weight, reduction=reduction, ls=label_smoothing, z_loss=z_loss, scale=logit_scale
        )[0]

    ref = _reference(oracle, x.double(), w.double(), y, None if b is None else b.double(),
                     None if cw is None else cw.double(), reduction)  # fmt: skip
    plain = _reference(oracle, x, w, y, b, cw, reduction)
    assert_within_plain(ours, plain, ref, torch.float32)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize(
    "bias, class_weight, reduction, extras",
    [
        (False, False, "mean", {}),
        (True, True, "sum", {}),
        (True, False, "mean", dict(z_loss=1e-2)),
        (False, True, "mean", dict(logit_scale=0.7)),
    ],
)
def test_one_chunk_deferred(force_factored, monkeypatch, bias, class_weight, reduction, extras):
    """Every row in one chunk (eager forward, scalar reduction): forward keeps ``E'`` and the rows' scales,
    backward multiplies them by the upstream gradient and runs the gradient GEMMs once (no fp32 scratch, nothing
    scaled after rounding). A refitted row among them."""
    from linear_cross_entropy.backends.fused import chunks

    calls = _spy(monkeypatch)
    backwards = count_calls(monkeypatch, chunks, "factored_deferred_grads")
    x, w, b, y, cw = small_problem(37, 16, 203, torch.float32, seed=21, bias=bias, class_weight=class_weight)
    x[5] *= 150.0  # beyond the window: refitted
    y[5] = 0
    ours = _run(x, w, y, b, cw, None, reduction, **extras)
    assert calls == [1] and backwards == [1], (calls, backwards)
    oracle = _z_loss_loss if "z_loss" in extras else _scaled_oracle(oracle_loss, extras)
    plain_fn = _z_loss_loss if "z_loss" in extras else _scaled_oracle(plain_loss, extras)
    kw = {"z_loss": extras["z_loss"]} if "z_loss" in extras else {}
    ref = _reference(oracle, x.double(), w.double(), y, None if b is None else b.double(),
                     None if cw is None else cw.double(), reduction, **kw)  # fmt: skip
    plain = _reference(plain_fn, x, w, y, b, cw, reduction, **kw)
    assert_within_plain(ours, plain, ref, torch.float32)


def _scaled_oracle(fn, extras):
    """``fn`` with ``extras``' logit scale (``z = a·(x·Wᵀ + b)``: ``a·W`` and ``a·b`` give the same logits)."""
    a = extras.get("logit_scale", 1.0)

    def scaled(x, w, y, *, linear_bias, weight, reduction):
        b = None if linear_bias is None else a * linear_bias
        return fn(x, a * w, y, linear_bias=b, weight=weight, reduction=reduction)

    return scaled


def _plan(x, lp=None, w_dtype=None, mode=policy.Mode.ACCUMULATED, **kw):
    lp = lp or LossParams("mean", -100, 0.0, False)
    return policy.uses_factored(
        mode, lp, x, w_dtype or x.dtype, **({"sharded": False, "entropy_grad": False, "fp32_logits": False} | kw)
    )


def test_the_decision_table(force_factored):
    """Which calls the factored pass takes (forced for the CPU): what it does not implement stays on the row
    kernel, whatever the device."""
    x = torch.empty(4, 8)
    base = LossParams("mean", -100, 0.0, False)
    assert _plan(x)
    assert _plan(x, dataclasses.replace(base, label_smoothing=0.1))  # a rank-1 term beside the factoring
    assert _plan(x, dataclasses.replace(base, logit_scale=0.5))  # one scalar in the kernels
    assert not _plan(x.half())  # fp16's range cannot hold exp(z − z_y)
    assert not _plan(x, w_dtype=torch.bfloat16)
    # a scale ≤ 0 reverses (or flattens) the row max the exponential GEMM's window is taken on
    for change in (dict(logit_softcap=30.0), dict(logit_scale=-1.0), dict(logit_scale=0.0), dict(metrics=True)):
        assert not _plan(x, dataclasses.replace(base, **change)), change
    assert not _plan(x, sharded=True)
    assert not _plan(x, entropy_grad=True)
    assert not _plan(x, fp32_logits=True)
    # one chunk: only where backward can fold the upstream gradient into the row scales, and without smoothing
    assert not _plan(x, mode=policy.Mode.DEFERRED)
    assert _plan(x, mode=policy.Mode.DEFERRED, deferrable=True)
    assert not _plan(x, dataclasses.replace(base, label_smoothing=0.1), mode=policy.Mode.DEFERRED, deferrable=True)


@pytest.mark.parametrize("reduction, retain, stage, factored", [
    ("mean", False, "forward", True),
    ("sum", False, "forward", True),
    ("mean", True, "forward", False),  # a second backward would find the scales multiplied
    ("none", False, "none_forward", False),  # token_log_probs' deferral: a per-row upstream gradient, the logits kept
])  # fmt: skip
def test_one_chunk_plans(force_factored, reduction, retain, stage, factored):
    """Which one-chunk plans take the factored pass."""
    from linear_cross_entropy.backends.common import Grads
    from linear_cross_entropy.options import resolve

    x = torch.empty(8, 16)
    opts = LinearCrossEntropyOptions(backend="fused", allow_retain_graph=retain)
    ro = resolve(opts, backend="fused", num_rows=8, in_features=16, num_classes=50, dtype=x.dtype, device=x.device)
    lp = LossParams(reduction, -100, 0.0, False)
    plan = policy.make_plan(stage, lp, ro, Grads(True, True, False), x, x.dtype)
    assert plan.mode is policy.Mode.DEFERRED
    assert plan.factored is factored


def test_default_thresholds_keep_the_cpu_on_the_row_kernel():
    assert not _plan(torch.empty(4, 8, dtype=torch.bfloat16))  # factored_devices: CUDA only
    assert not _plan(torch.empty(4, 8))  # factored_dtypes: bf16 only


@pytest.mark.parametrize("gluon", [False, True])
def test_default_thresholds_take_the_factored_pass_only_with_the_gluon_gemm(monkeypatch, gluon):
    """On a device the factored pass serves, at a hidden size both GEMMs cover: only the Hopper Gluon GEMM beats
    the row kernel (the plain-Triton one measured slower on an H100: NOTES, "The plain-Triton GEMM on the GPU")."""
    from linear_cross_entropy.backends.fused import factored_gluon

    here = dataclasses.replace(policy.THRESHOLDS, factored_devices=frozenset({"cpu"}))
    monkeypatch.setattr(policy, "THRESHOLDS", here)
    monkeypatch.setattr(factored_gluon, "runs_on", lambda x: gluon)
    for h in (768, 896, 2048):
        assert _plan(torch.empty(4, h, dtype=torch.bfloat16)) is gluon, h
        one_chunk = _plan(torch.empty(4, h, dtype=torch.bfloat16), mode=policy.Mode.DEFERRED, deferrable=True)
        assert one_chunk is gluon, h  # NOTES, "One chunk on the factored pass"
    assert not _plan(torch.empty(4, 4096, dtype=torch.bfloat16))  # above the Gluon GEMM's measured win


# ------------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize(
    "n, h, v, rows", [(3072, 256, 8000, 1024), (2500, 512, 50257, 1024), (2048, 2048, 32000, 1024)]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("label_smoothing, logit_scale", [(0.0, 1.0), (0.1, 1.0), (0.0, 0.6), (0.1, 1.7)])
def test_factored_bf16_gpu(monkeypatch, n, h, v, rows, bias, label_smoothing, logit_scale):
    """bf16 against eager bf16 (the large-problem tolerance): the Gluon GEMM where it runs, at H above the
    plain-Triton threshold too, with and without label smoothing and a logit scale. Chunks of 1024 rows or more:
    shorter ones take the vocabulary-major pass."""
    from helpers import cuda_problem

    big = dict(factored_max_features_triton=1 << 20, factored_max_features_gluon=1 << 20)
    monkeypatch.setattr(policy, "THRESHOLDS", dataclasses.replace(policy.THRESHOLDS, **big))
    calls = _spy(monkeypatch)
    x, w, b, y = cuda_problem(n, h, v, torch.bfloat16, seed=h, bias=bias)
    kw = dict(label_smoothing=label_smoothing, logit_scale=logit_scale)
    ours = _run(x, w, y, b, rows=rows, **kw)
    assert calls
    _within_eager_bf16(ours, x, w, y, b, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("n, h, v", [(4096, 1024, 32000), (2500, 768, 50257)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("logit_scale", [1.0, 0.6])
def test_factored_one_chunk_bf16_gpu(monkeypatch, n, h, v, bias, logit_scale):
    """Every row in one chunk (deferred: the upstream gradient folded into the rows' scales in backward, each
    gradient rounded once) against eager bf16, the Gluon GEMM where it runs."""
    from helpers import cuda_problem

    from linear_cross_entropy.backends.fused import chunks

    big = dict(factored_max_features_triton=1 << 20, factored_max_features_gluon=1 << 20)
    monkeypatch.setattr(policy, "THRESHOLDS", dataclasses.replace(policy.THRESHOLDS, **big))
    calls = _spy(monkeypatch)
    backwards = count_calls(monkeypatch, chunks, "factored_deferred_grads")
    x, w, b, y = cuda_problem(n, h, v, torch.bfloat16, seed=h + 1, bias=bias)
    ours = _run(x, w, y, b, logit_scale=logit_scale)
    assert calls == [0] and backwards == [1], (calls, backwards)
    _within_eager_bf16(ours, x, w, y, b, logit_scale=logit_scale)


def _within_eager_bf16(ours, x, w, y, b, logit_scale=1.0, label_smoothing=0.0):
    """``ours`` (loss and gradients) within the large-problem tolerance of eager bf16's error against float64."""

    def scaled(x, w, y, *, linear_bias, weight, reduction):  # z = a·logits, the logits in x's dtype, CE in ≥ fp32
        logits = torch.nn.functional.linear(x, w, linear_bias).to(torch.promote_types(x.dtype, torch.float32))
        ce = torch.nn.functional.cross_entropy(logits * logit_scale, y, label_smoothing=label_smoothing)
        return ce.to(x.dtype)

    ref = _reference(scaled, x.double(), w.double(), y, None if b is None else b.double(), None, "mean")
    plain = _reference(scaled, x, w, y, b, None, "mean")
    assert_within_plain(ours, plain, ref, torch.bfloat16, large=True)


@pytest.mark.interpreter
@needs_interpreter
@pytest.mark.parametrize("wants", ["input", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_one_gradient_wanted(force_factored, monkeypatch, wants, label_smoothing):
    """Only grad_input or only grad_weight asked for (the other operand frozen): the pass forms just that one (with
    label smoothing, its rank-1 rows only where grad_weight is wanted)."""
    calls = _spy(monkeypatch)
    x, w, b, y, _ = small_problem(40, 16, 130, torch.float32, seed=11, bias=True)
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=16, chunking_method=None)
    xl = leaf(x) if wants == "input" else x
    wl = leaf(w) if wants == "weight" else w
    ls = dict(label_smoothing=label_smoothing)
    loss = linear_cross_entropy(xl, wl, y, linear_bias=b, options=options, **ls)
    loss.backward()
    assert calls
    xr, wr = x.double().requires_grad_(wants == "input"), w.double().requires_grad_(wants == "weight")
    oracle_loss(xr, wr, y, linear_bias=b.double(), **ls).backward()
    ours, ref = (xl.grad, xr.grad) if wants == "input" else (wl.grad, wr.grad)
    plain_x, plain_w = leaf(x), leaf(w)
    plain_loss(plain_x, plain_w, y, linear_bias=b, **ls).backward()
    plain = plain_x.grad if wants == "input" else plain_w.grad
    assert_within_plain((ours,), (plain,), (ref,), torch.float32, names=("grad",))


@pytest.mark.interpreter
@needs_interpreter
def test_a_chunk_of_ignored_rows(force_factored, monkeypatch):
    """A whole chunk of ignored rows (scale 0, no target column) between others."""
    calls = _spy(monkeypatch)
    x, w, b, y, _ = small_problem(48, 16, 100, torch.float32, seed=12)
    y[16:32] = -100
    ours = _run(x, w, y, rows=16)
    assert len(calls) == 3
    ref = _reference(oracle_loss, x.double(), w.double(), y, None, None, "mean")
    plain = _reference(plain_loss, x, w, y, None, None, "mean")
    assert_within_plain(ours, plain, ref, torch.float32)
