"""The fused backend's Triton kernels on the CPU under ``TRITON_INTERPRET=1`` (set by conftest when no GPU).

Small, odd shapes: V not a multiple of the block nor of 8 (the GEMMs' vocabulary split), several chunks and one
chunk (the deferred backward), every loss option. Results against float64; in fp32 and fp16 the tolerance is the
error of plain PyTorch in the same dtype (logits in that dtype, softmax in fp32), times a slack.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import WEIGHT_GRAD_PASSES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (CPU runs)"),
]
pytest.importorskip("triton")

_SLACK = 2.0
_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _problem(n, h, v, dtype, seed, bias, class_weight):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2 / h**0.5)
    b = torch.randn(v, generator=g) if bias else None
    cw = torch.rand(v, generator=g) + 0.1 if class_weight else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    y[0] = 1
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), y, cast(cw)


def _run(fn, x, w, b, y, upstream, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = fn(x, w, y, b, **kw)
    loss.backward(upstream.to(loss.dtype) if loss.dim() else upstream[0].to(loss.dtype))
    return [loss.detach(), x.grad, w.grad] + ([] if b is None else [b.grad])


def _plain(x, w, y, b, **kw):
    """Plain PyTorch: logits in the input dtype, the loss in (at least) fp32, rounded to the input dtype."""
    work = torch.promote_types(x.dtype, torch.float32)
    kw = {k: (v.to(work) if torch.is_tensor(v) else v) for k, v in kw.items()}
    return F.cross_entropy(F.linear(x, w, b).to(work), y, **kw).to(x.dtype)


def _fused(x, w, y, b, rows=None, **kw):
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=rows, chunking_method=None)
    return linear_cross_entropy(x, w, y, linear_bias=b, options=options, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "rows,weight_grad_pass",  # one chunk has a single weight-gradient GEMM either way
    [(None, "accumulate"), (5, "accumulate"), (5, "recompute")],
    ids=["one-chunk", "chunks-of-5", "chunks-of-5-recompute"],
)
@pytest.mark.parametrize("shape", [(13, 8, 203), (6, 4, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "extras",
    [{}, {"bias": True}, {"class_weight": True, "label_smoothing": 0.3}, {"bias": True, "label_smoothing": 0.1}],
    ids=["plain", "bias", "weights+smoothing", "bias+smoothing"],
)
def test_fused_matches_float64(dtype, rows, shape, reduction, extras, weight_grad_pass, force_weight_grad_pass):
    force_weight_grad_pass(weight_grad_pass)
    check_against_float64(_fused, dtype, shape, reduction, extras, seed=sum(shape) + (rows or 0), rows=rows)


def check_against_float64(ours_fn, dtype, shape, reduction, extras, seed, **ours_kw):
    """Loss and gradients of ``ours_fn`` (``fn(x, w, y, b, **kw)``) against float64, within ``_SLACK`` times plain
    PyTorch's error in ``dtype`` (plus a floor); ``extras`` may ask for a bias and class weights."""
    extras = dict(extras)
    x, w, b, y, cw = _problem(
        *shape,
        dtype,
        seed=seed,
        bias=extras.pop("bias", False),
        class_weight=extras.pop("class_weight", False),
    )
    kw = dict(reduction=reduction, weight=cw, **extras)
    # Per-row upstream gradients for "none"; g = 1/3 for the scalar reductions (gradient accumulation over three
    # micro-batches): not a power of two, so a gradient rounded before it is scaled by g and again after would
    # show here, where that second rounding is the whole error at these tiny H (2.5x plain's in fp16).
    upstream = torch.rand(shape[0]) + 0.5 if reduction == "none" else torch.full((shape[0],), 1 / 3)
    ref = _run(
        _plain,
        x.double(),
        w.double(),
        None if b is None else b.double(),
        y,
        upstream,
        **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()},
    )
    plain = _run(_plain, x, w, b, y, upstream, **kw)
    ours = _run(ours_fn, x, w, b, y, upstream, **ours_kw, **kw)
    _assert_within_plain(ours, plain, ref, dtype)


def _assert_within_plain(ours, plain, ref, dtype, summed_terms=(None, None, None, None)):
    """``[loss, grad_input, grad_weight(, grad_bias)]`` of ours no further from the float64 ``ref`` than ``_SLACK``
    times plain's error in ``dtype``, plus a floor, one ulp of the largest element (a correctly rounded result may
    still differ from plain's by one flip: on a 9-element vector that alone exceeds the slack) and, given each
    gradient's summed terms (:func:`_summed_terms`), a few roundings of them."""
    eps = torch.finfo(dtype).eps
    names = ["loss", "grad_input", "grad_weight", "grad_bias"]
    for name, o, p, r, t in zip(names, ours, plain, ref, summed_terms):
        assert o.dtype == p.dtype, name
        norm = max(r.norm().item(), 1e-30)
        one_ulp = eps * r.abs().max().item() / norm
        cancelled = 0.0 if t is None else _ROUNDINGS_PER_TERM * eps * t.norm().item() / norm
        bound = _SLACK * _rel(p, r) + _FLOOR[dtype] + one_ulp + cancelled
        assert _rel(o, r) <= bound, (name, _rel(o, r), _rel(p, r), cancelled)


# dz carries a few roundings (the logits, exp, the coefficients), each product and partial sum one more
_ROUNDINGS_PER_TERM = 4


def test_all_ignored_mean_is_nan_with_zero_gradients():
    x, w, _, _, _ = _problem(7, 4, 11, torch.float32, seed=0, bias=False, class_weight=False)
    x.requires_grad_(), w.requires_grad_()
    loss = _fused(x, w, torch.full((7,), -100), None, rows=3)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_out_of_range_index_is_caught_before_the_kernel_on_cpu():
    x, w, _, _, _ = _problem(4, 4, 11, torch.float32, seed=1, bias=False, class_weight=False)
    with pytest.raises(IndexError, match="Target 11 is out of bounds"):
        _fused(x, w, torch.tensor([0, 1, 11, 2]), None)


@pytest.mark.parametrize("weight_grad_pass", WEIGHT_GRAD_PASSES)
def test_retain_graph_rules(weight_grad_pass, force_weight_grad_pass):
    force_weight_grad_pass(weight_grad_pass)
    x, w, _, y, _ = _problem(9, 4, 11, torch.float32, seed=2, bias=False, class_weight=False)
    x.requires_grad_(), w.requires_grad_()
    for rows in (None, 4):
        loss = _fused(x, w, y, None, rows=rows)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="allow_retain_graph=True"):
            loss.backward()
        x.grad = w.grad = None
        options = LinearCrossEntropyOptions(
            backend="fused", batch_chunk_size=rows, chunking_method=None, allow_retain_graph=True
        )
        loss = linear_cross_entropy(x, w, y, options=options)
        loss.backward(retain_graph=True)
        first = x.grad.clone(), w.grad.clone()
        loss.backward()
        torch.testing.assert_close(x.grad, 2 * first[0])
        torch.testing.assert_close(w.grad, 2 * first[1])
        x.grad = w.grad = None


def test_fp32_loss_option():
    x, w, _, y, _ = _problem(9, 4, 11, torch.float16, seed=3, bias=False, class_weight=False)
    options = LinearCrossEntropyOptions(backend="fused", loss_dtype=torch.float32)
    loss = linear_cross_entropy(x, w, y, options=options)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(F.linear(x, w).float(), y)
    assert _rel(loss, ref) < 1e-6


@pytest.mark.parametrize("metrics", [False, True])
def test_row_kernel_ignores_the_padding_it_loads(metrics):
    """At an odd C the row kernel loads and stores 16-wide through the rows' padding (vectorised accesses): NaN
    there must reach neither the loss, lse, statistics nor dz, and the result must equal the unpadded launch's."""
    from linear_cross_entropy.backends.common import LossParams
    from linear_cross_entropy.backends.fused.rows import _loaded_columns, cross_entropy_rows

    r, c, padded = 5, 37, 64
    g = torch.Generator().manual_seed(7)
    values = torch.randn(r, c, generator=g) * 3
    target = torch.randint(0, c, (r,), generator=g)
    lp = LossParams("mean", -100, 0.1, False, z_loss=1e-3, metrics=metrics)
    outputs = []
    for width in (padded, c):  # a padded buffer full of NaN, and one with no room (stride C: masked accesses)
        buf = torch.full((r, width), float("nan"))[:, :c]
        buf.copy_(values)
        assert _loaded_columns(c, buf) == (48 if width == padded else c)
        loss, lse = torch.empty(r), torch.empty(r)
        stats = torch.empty(r, 5) if metrics else None
        share = torch.full((r,), 1.0 / r)
        cross_entropy_rows(buf, buf, None, target, None, (share, share), loss, lse, stats, lp)
        outputs.append([loss, lse, buf.clone()] + ([stats] if metrics else []))
    for padded_out, plain_out in zip(*outputs):
        assert torch.isfinite(padded_out).all()
        assert torch.equal(padded_out, plain_out)


@pytest.mark.parametrize(
    "num_classes,heavy,block",
    [
        (37, False, 64),  # short rows: one step
        (8192, False, 8192),
        (16384, False, 8192),
        (32000, False, 8192),
        (50257, False, 8192),
        (65536, False, 16384),
        (100000, False, 16384),
        (128256, False, 32768),
        (256000, False, 32768),
        (128256, True, 4096),  # soft-cap / metrics
    ],
)
def test_row_kernel_step_rule(num_classes, heavy, block):
    """The widest power-of-two step leaving about 3.5 steps per sweep, 8192 to 32768 columns (4096 with soft-cap or
    metrics), one warp per 1024 columns (benchmarks/NOTES.md, v11)."""
    from linear_cross_entropy.backends.fused.rows import row_kernel_block, row_kernel_warps

    assert row_kernel_block(num_classes, heavy) == block
    assert row_kernel_warps(block) == (4 if block < 2048 else max(8, block // 1024))


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_scale_cast_in_place_and_out_of_place(scale):
    """In place, an upstream gradient of exactly 1 leaves the gradient as it is (the kernel masks its accesses
    off, deciding on the device); any other scale, and every out-of-place cast, writes ``src · scale`` rounded once."""
    from linear_cross_entropy.backends.fused.rows import scale_cast

    g = torch.Generator().manual_seed(11)
    src = torch.randn(3, 4099, generator=g)
    s = torch.tensor(scale)
    out = torch.full(src.shape, float("nan"), dtype=torch.float16)  # poison: every element must be written
    scale_cast(src, s, out=out)
    assert torch.equal(out, (src * scale).to(torch.float16))
    inplace = src.to(torch.float16)
    expected = (inplace.float() * scale).to(torch.float16)
    assert scale_cast(inplace, s, out=inplace) is inplace
    assert torch.equal(inplace, expected)


@pytest.mark.parametrize("weight_grad_pass", WEIGHT_GRAD_PASSES)
def test_weight_and_bias_gradients_without_an_input_gradient(weight_grad_pass, force_weight_grad_pass):
    """A frozen input (no grad): the row pass forms no ``dz`` at all, and the weight and bias gradients still
    match float64 (both passes)."""
    force_weight_grad_pass(weight_grad_pass)
    x, w, b, y, _ = _problem(13, 8, 203, torch.float32, seed=5, bias=True, class_weight=False)

    def weight_and_bias_grads(fn, dtype):
        wr, br = w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        fn(x.to(dtype), wr, y, br, label_smoothing=0.1).backward()
        return wr.grad, br.grad

    ref = weight_and_bias_grads(_plain, torch.float64)
    plain = weight_and_bias_grads(_plain, torch.float32)
    ours = weight_and_bias_grads(lambda *a, **kw: _fused(*a, rows=5, **kw), torch.float32)
    for o, p, r in zip(ours, plain, ref):
        assert _rel(o, r) <= _SLACK * _rel(p, r) + _FLOOR[torch.float32], (_rel(o, r), _rel(p, r))


@st.composite
def _drawn_problems(draw, backend, device="cpu", sizes=(11, 9, 37), dtypes=(torch.float32, torch.float16)):
    """A problem of at most ``sizes`` = (N, H, V) with any mix of the loss options, run through a Triton backend in
    some chunking and policy; ``(dtype, tensors, loss kwargs, options, upstream)``. The tiled backend's default
    adds every tile's share into 16-bit gradients (one more rounding per tile, by design: cut-cross-entropy's
    error); in 16 bits it is drawn with fp32 accumulators."""
    n, h, v = draw(st.integers(1, sizes[0])), draw(st.integers(1, sizes[1])), draw(st.integers(2, sizes[2]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    x, w, b, y, cw = _problem(n, h, v, dtype, seed=seed, bias=draw(st.booleans()), class_weight=draw(st.booleans()))
    ignore_index = draw(st.sampled_from([-100, 0, v - 1]))
    if ignore_index != -100:  # ignore one class instead; the first row keeps a counted target
        y = torch.where(y == -100, ignore_index, y)
        y[0] = (ignore_index + 1) % v
    kw = dict(
        weight=cw,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=ignore_index,
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.7])),
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        logit_scale=draw(st.sampled_from([1.0, 0.7])),
        logit_softcap=draw(st.sampled_from([None, 2.5])),
    )
    policy, acc_dtype = draw(st.sampled_from(["auto", "balanced", "compact", "accurate"])), None
    if backend == "tiled" and dtype != torch.float32:
        policy, acc_dtype = draw(st.sampled_from(["balanced", "accurate"])), torch.float32
    options = LinearCrossEntropyOptions(
        backend=backend,
        batch_chunk_size=draw(st.one_of(st.none(), st.integers(1, n + 1))),
        chunking_method=None,
        acc_policy=policy,
        acc_dtype=acc_dtype,
        allow_retain_graph=draw(st.booleans()),
    )
    if kw["reduction"] == "none":
        upstream = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5
    else:
        upstream = torch.full((n,), draw(st.sampled_from([1.0, 1 / 3])))
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    kw["weight"] = to(cw)
    return dtype, (to(x), to(w), to(b), to(y)), kw, options, to(upstream)


def _ours_or_reference(x, w, y, b, options=None, **kw):
    return linear_cross_entropy(x, w, y, linear_bias=b, options=options, **kw)


def _summed_terms(x, w, b, y, upstream, **kw):
    """Per gradient, a float64 bound on the sum of its terms' magnitudes before they cancel: with ``s_i`` a row's
    share of the loss (upstream gradient, class weight, mean's divisor), ``dz = s·(p − t)`` (soft-cap and scale
    scale it by at most ``max(a, 1)``, the z-loss its ``p`` part by ``1 + 2λ|lse|``) has terms of magnitude
    ``m = s·(p·(1 + 2λ|lse|) + [c = y] + ε)``; the gradients sum ``m·|W|`` (grad_input), ``mᵀ·|x|`` (grad_weight)
    and ``Σ_rows m`` (grad_bias). A sum's rounding error scales with these, not with the sum: where ``p_y ≈ 1`` or
    terms of both signs cancel, a plain computation that happened to round well is no yardstick on its own."""
    x64, w64 = x.double(), w.double()
    z = F.linear(x64, w64, None if b is None else b.double()) * kw["logit_scale"]
    if kw["logit_softcap"]:
        z = kw["logit_softcap"] * torch.tanh(z / kw["logit_softcap"])
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    keep = y != kw["ignore_index"]
    y_safe = torch.where(keep, y, 0)
    cw = torch.ones(w.shape[0], dtype=torch.float64, device=w.device) if kw["weight"] is None else kw["weight"].double()
    share = torch.where(keep, cw[y_safe], 0.0) * upstream.double().abs()
    if kw["reduction"] == "mean":
        share = share / torch.where(keep, cw[y_safe], 0.0).sum()
    m = torch.exp(z - lse) * (1 + 2 * kw["z_loss"] * lse.abs()) + kw["label_smoothing"]
    m = m + F.one_hot(y_safe, w.shape[0]).double()
    m = m * (share * max(kw["logit_scale"], 1.0))[:, None]
    return [None, m @ w64.abs(), m.T @ x64.abs(), m.sum(dim=0)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fused_matches_the_reference_on_drawn_problems(data):
    check_drawn_problem("fused", data)


def check_drawn_problem(backend, data, **draw_kw):
    """Every combination of the options the Triton backends serve (z-loss, logit scale and soft-cap, smoothing,
    class weights, ignore_index, bias, reductions, chunking, policies, upstream gradients), drawn by hypothesis,
    against the reference path in float64: within ``_SLACK`` times the reference path's own error in the same
    dtype, plus a few roundings of each gradient's summed terms (tiny shapes cancel: V = 2, H = 1, p_y ≈ 1). A
    0.05% error in dz fails it."""
    dtype, (x, w, b, y), kw, options, upstream = data.draw(_drawn_problems(backend, **draw_kw))
    as64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref = _run(_ours_or_reference, x.double(), w.double(), None if b is None else b.double(), y, upstream, **as64)
    plain = _run(_ours_or_reference, x, w, b, y, upstream, **kw)
    ours = _run(_ours_or_reference, x, w, b, y, upstream, options=options, **kw)
    _assert_within_plain(ours, plain, ref, dtype, _summed_terms(x, w, b, y, upstream, **kw))


@pytest.mark.parametrize(
    "stage,reduction,rows,recompute,sharded,grads,mode",
    [
        ("forward", "mean", 8, False, False, (True, True, False), "DEFERRED"),  # one chunk
        ("forward", "mean", 3, False, False, (True, True, False), "ACCUMULATED"),
        ("forward", "sum", 3, True, False, (True, True, False), "RECOMPUTE"),
        ("forward", "sum", 3, True, True, (True, True, False), "ACCUMULATED"),  # no vocabulary-major pass sharded
        ("forward", "sum", 3, True, False, (True, False, False), "ACCUMULATED"),  # no weight gradient to recompute
        ("forward", "none", 8, False, False, (True, True, False), "LOSS_ONLY"),  # "none" recomputes in backward
        ("forward", "mean", 8, False, False, (False, False, False), "LOSS_ONLY"),
        ("op", "mean", 8, False, False, (True, True, True), "ACCUMULATED"),  # the compiled op never defers
        ("none_forward", "none", 8, False, False, (True, False, False), "DEFERRED"),
        ("none_forward", "none", 3, False, False, (True, False, False), "LOSS_ONLY"),
        ("backward", "none", 3, True, False, (False, True, True), "RECOMPUTE"),
    ],
)
def test_plan_modes(stage, reduction, rows, recompute, sharded, grads, mode):
    """The fused plan's one decision table (backends/fused/policy.py), and the fields each mode implies."""
    from linear_cross_entropy.backends.common import Grads, LossParams
    from linear_cross_entropy.backends.fused.policy import Mode, make_plan
    from linear_cross_entropy.options import ResolvedOptions

    lp = LossParams(reduction, -100, 0.0, False)
    ro = ResolvedOptions("fused", "balanced", torch.float32, rows, False, recompute_weight_grad=recompute)
    x = torch.empty(8, 4, dtype=torch.bfloat16)
    plan = make_plan(stage, lp, ro, Grads(*grads), x, torch.bfloat16, sharded=sharded)
    assert plan.mode is Mode[mode]
    assert plan.chunk_rows == min(rows, 8)
    assert plan.weight_grad_later == (mode == "RECOMPUTE" and stage == "forward")
    if mode == "RECOMPUTE":
        assert plan.grads == Grads(grads[0], False, False) and plan.weight_grads == Grads(False, *grads[1:])
        assert plan.per_row and plan.grad_w_dtype == torch.bfloat16
    # fp32 accumulation waits for the upstream gradient only where the caller scales later
    assert plan.grad_x_dtype == (torch.float32 if stage in ("forward", "op") else torch.bfloat16)
    if mode == "ACCUMULATED":  # an fp32 scratch across chunks; one chunk's single GEMM accumulates in fp32 itself
        assert plan.grad_w_dtype == (torch.float32 if rows < 8 else torch.bfloat16)
