"""The fused backend's own behaviour on the CPU, its Triton kernels under ``TRITON_INTERPRET=1`` (set by conftest
when no GPU): the retain-graph rules, the loss dtype, the row kernel's padding, step rule and scale-cast, the
weight-gradient passes and the plan's decision table. What it shares with the tiled backend (results against
float64, drawn problems, NaN) is in ``test_triton_backends.py``.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import WEIGHT_GRAD_PASSES, assert_within_plain, needs_interpreter, plain_loss, rel_err, small_problem

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

pytestmark = [pytest.mark.interpreter, needs_interpreter]


def _fused(x, w, y, b=None, rows=None, **kw):
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=rows, chunking_method=None)
    return linear_cross_entropy(x, w, y, linear_bias=b, options=options, **kw)


def test_out_of_range_index_is_caught_before_the_kernel_on_cpu():
    x, w, _, _, _ = small_problem(4, 4, 11, torch.float32, seed=1)
    with pytest.raises(IndexError, match="Target 11 is out of bounds"):
        _fused(x, w, torch.tensor([0, 1, 11, 2]))


@pytest.mark.parametrize("weight_grad_pass", WEIGHT_GRAD_PASSES)
def test_retain_graph_rules(weight_grad_pass, force_weight_grad_pass):
    force_weight_grad_pass(weight_grad_pass)
    x, w, _, y, _ = small_problem(9, 4, 11, torch.float32, seed=2)
    x.requires_grad_(), w.requires_grad_()
    for rows in (None, 4):
        loss = _fused(x, w, y, rows=rows)
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
    x, w, _, y, _ = small_problem(9, 4, 11, torch.float16, seed=3)
    options = LinearCrossEntropyOptions(backend="fused", loss_dtype=torch.float32)
    loss = linear_cross_entropy(x, w, y, options=options)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(F.linear(x, w).float(), y)
    assert rel_err(loss, ref) < 1e-6


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
    x, w, b, y, _ = small_problem(13, 8, 203, torch.float32, seed=5, bias=True)

    def weight_and_bias_grads(fn, dtype):
        wr, br = w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        fn(x.to(dtype), wr, y, br, label_smoothing=0.1).backward()
        return wr.grad, br.grad

    ref = weight_and_bias_grads(plain_loss, torch.float64)
    plain = weight_and_bias_grads(plain_loss, torch.float32)
    ours = weight_and_bias_grads(lambda *a, **kw: _fused(*a, rows=5, **kw), torch.float32)
    assert_within_plain(ours, plain, ref, torch.float32, names=("grad_weight", "grad_bias"))


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
