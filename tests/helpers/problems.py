"""Problems and their runs: the builder, the float64 oracle, plain PyTorch's yardstick, the forward+backward runner.

Shapes (``N`` rows, ``F`` in_features, ``C`` classes, ``out_features = (d1, ..., dK)``):
``input`` ``(N, F)`` or ``(F,)``; ``linear_weight`` ``(C, *out_features, F)``; ``linear_bias`` ``(C, *out_features)``;
index ``target`` ``(N, *out_features)`` / ``()``; probability ``target`` ``(N, C, *out_features)`` / ``(C,)``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Case:
    """One call's tensors and loss settings (tensors are leaves without ``requires_grad``)."""

    input: torch.Tensor  # (N, F) or (F,)
    linear_weight: torch.Tensor  # (C, *out_features, F)
    target: torch.Tensor  # (N, *out_features) int64, or (N, C, *out_features) probabilities
    linear_bias: torch.Tensor | None = None  # (C, *out_features)
    weight: torch.Tensor | None = None  # (C,)
    reduction: str = "mean"
    ignore_index: int | None = None
    label_smoothing: float = 0.0

    def kwargs(self) -> dict:
        return dict(
            linear_bias=self.linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )

    def to(self, dtype: torch.dtype) -> Case:
        """The same case with floating tensors (input, weights, bias, class weights, probabilities) cast."""

        def cast(t):
            return None if t is None or not t.is_floating_point() else t.to(dtype)

        return dataclasses.replace(
            self,
            input=cast(self.input),
            linear_weight=cast(self.linear_weight),
            linear_bias=cast(self.linear_bias),
            weight=cast(self.weight),
            target=cast(self.target) if self.target.is_floating_point() else self.target,
        )


def noncontiguous(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another layout: ``"transposed"`` (storage of the reversed dims, viewed back: dense but
    not contiguous) or ``"strided"`` (every other element of a twice-as-long last dimension)."""
    if layout == "contiguous" or t.dim() == 0:
        return t
    if layout == "transposed":
        dims = list(range(t.dim()))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    if layout == "strided":
        return torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]
    raise ValueError(layout)


def make_case(
    n: int | None,  # None: unbatched (F,) input
    f: int,
    c: int,
    out_features: tuple[int, ...] = (),
    *,
    probs: bool = False,
    bias: bool = False,
    class_weight: bool = False,
    ignore_index: int | None = None,
    ignore_frac: float = 0.25,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    layout: str = "contiguous",
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    scale: float = 1.0,
) -> Case:
    """Random, never-zero inputs from a private generator (independent of the global seed).

    Index targets have about ``ignore_frac`` of their positions set to the effective ignore index (-100 when
    ``ignore_index`` is None); probability targets are random softmaxes. ``scale`` multiplies the input (the
    logits' spread: about ``scale`` standard deviations).
    """
    gen = torch.Generator().manual_seed(seed)
    batch = () if n is None else (n,)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    x = randn(*batch, f) * scale  # (N, F)
    w = randn(c, *out_features, f) / math.sqrt(f)  # (C, *out_features, F)
    b = randn(c, *out_features) if bias else None  # (C, *out_features)
    cw = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5 if class_weight else None  # (C,)
    if probs:
        t = randn(*batch, c, *out_features).mul(2).softmax(dim=len(batch))  # (N, C, *out_features)
    else:
        t = torch.randint(0, c, (*batch, *out_features), generator=gen)  # (N, *out_features)
        ignored = torch.rand(t.shape, generator=gen) < ignore_frac
        t = torch.where(ignored, -100 if ignore_index is None else ignore_index, t)
    tensors = [x, w, t, b, cw]
    tensors = [
        None if v is None else v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for v in tensors
    ]
    tensors = [None if v is None else noncontiguous(v, layout) for v in tensors]
    return Case(
        input=tensors[0],
        linear_weight=tensors[1],
        target=tensors[2],
        linear_bias=tensors[3],
        weight=tensors[4],
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def small_problem(n, h, v, dtype, seed, bias=False, class_weight=False):
    """:func:`make_case`'s tensors ``(x, w, b, y, cw)`` for tests that call the function themselves (2-D, logits
    of about 2 standard deviations, 20% of the rows ignored)."""
    c = make_case(n, h, v, bias=bias, class_weight=class_weight, dtype=dtype, seed=seed, scale=2.0, ignore_frac=0.2)
    return c.input, c.linear_weight, c.linear_bias, c.target, c.weight


def cuda_problem(n, h, v, dtype, seed, bias=False):
    """A large 2-D problem ``(x, w, b, y)`` drawn on the CUDA device by its own generator (5% of the rows ignored,
    the first one counted): the GPU tests' weights reach 8.6M elements, too many to draw in float64 on the host
    for every case."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, h, device="cuda", generator=g) * (2 / h**0.5)).to(dtype)
    b = torch.randn(v, device="cuda", generator=g).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.05] = -100
    y[0] = 0  # never all ignored: that case (NaN loss) has its own tests
    return x, w, b, y


# --------------------------------------------------------------------------------------------------------------
# Oracle, plain yardstick and runner


def oracle_loss(
    input,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=None,
    label_smoothing=0.0,
):
    """PyTorch's own ``cross_entropy(linear(...))`` with the logits reshaped to ``(N, C, *out_features)``, all in
    the inputs' dtype (float64 copies: the oracle)."""
    c, out_features, f = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    flat = math.prod(out_features, start=c)
    bias = None if linear_bias is None else linear_bias.reshape(flat)
    logits = F.linear(input, linear_weight.reshape(flat, f), bias)  # (N, C·K) or (C,)
    logits = logits.reshape(*input.shape[:-1], c, *out_features)  # (N, C, *out_features)
    return F.cross_entropy(
        logits,
        target,
        weight=weight,
        reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing,
    )


def extras_oracle(x, w, t, *, b=None, cw=None, reduction="mean", ii=-100, ls=0.0, z_loss=0.0, scale=1.0, cap=None):
    """Loss and metrics of ``z = cap·tanh(scale·(x·Wᵀ + b)/cap)`` from the materialised logits (N, C)."""
    z = F.linear(x, w, b) * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    probs = t.is_floating_point()
    kw = dict(weight=cw, label_smoothing=ls) if probs else dict(weight=cw, label_smoothing=ls, ignore_index=ii)
    ce = F.cross_entropy(z, t, reduction="none", **kw)
    lse = torch.logsumexp(z, dim=1)
    keep = torch.ones_like(lse, dtype=torch.bool) if probs else t != ii
    zrow = z_loss * lse**2 * keep
    if reduction == "none":
        loss = ce + zrow
    elif reduction == "sum":
        loss = ce.sum() + zrow.sum()
    else:
        loss = F.cross_entropy(z, t, reduction="mean", **kw) + zrow.sum() / keep.sum()
    logp = torch.log_softmax(z, dim=1)
    y = t.argmax(1) if probs else torch.where(keep, t, 0)
    rows = {
        "lse": lse,
        "z_loss": z_loss * lse**2,
        "max_logit": z.amax(1),
        "entropy": -(logp.exp() * logp).sum(1),
        "logit_norm": z.norm(dim=1),
        "accuracy": (z.argmax(1) == y).double(),
        "log_prob": -ce if probs else logp.gather(1, y[:, None])[:, 0],
    }
    if reduction == "none":
        metrics = {k: (v * keep if k in ("z_loss", "accuracy", "log_prob") else v) for k, v in rows.items()}
    else:
        metrics = {k: (v * keep).sum() / keep.sum() for k, v in rows.items()}
    return loss, {k: v.detach() for k, v in metrics.items()}


def plain_loss(input, linear_weight, target, linear_bias=None, *, options=None, ignore_index=None, **kwargs):
    """Plain PyTorch as a training loop writes it (2-D weight): the logits in the input dtype, the loss in (at
    least) fp32, rounded to the input dtype. ``options`` is ignored (the same call as ours)."""
    work = torch.promote_types(input.dtype, torch.float32)
    kwargs = {k: (v.to(work) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    logits = F.linear(input, linear_weight, linear_bias).to(work)  # (N, C)
    ignore_index = -100 if ignore_index is None else ignore_index
    return F.cross_entropy(logits, target, ignore_index=ignore_index, **kwargs).to(input.dtype)


def upstream_grad(loss: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    """A random, never-small upstream gradient shaped like ``loss`` (same values for equal seeds and shapes).

    The values are rounded to bfloat16, hence exact in every floating dtype: the float64 oracle and a
    low-precision run see the very same upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    sign = torch.randint(0, 2, loss.shape, generator=gen).to(torch.float64) * 2 - 1
    values = (mag * sign).to(torch.bfloat16)
    return values.to(device=loss.device, dtype=loss.dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with ``requires_grad`` holding ``t``'s values in ``t``'s strides (non-contiguity kept)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t.detach()).requires_grad_(True)


def forward_backward(fn, case: Case, *, grad_seed: int = 1234, upstream: torch.Tensor | None = None, **extra):
    """Run ``fn(input, linear_weight, target, **case.kwargs(), **extra)`` and backward with ``upstream`` (default:
    :func:`upstream_grad`, cast to the loss' dtype). Returns ``(loss, grad_input, grad_weight, grad_bias)``, all
    detached (grad_bias None without bias)."""
    x = leaf(case.input)
    w = leaf(case.linear_weight)
    b = None if case.linear_bias is None else leaf(case.linear_bias)
    kwargs = case.kwargs()
    kwargs["linear_bias"] = b
    loss = fn(x, w, case.target, **kwargs, **extra)
    if upstream is None:
        upstream = upstream_grad(loss, grad_seed)
    loss.backward(upstream.to(device=loss.device, dtype=loss.dtype).expand_as(loss))
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def reference_grads(case: Case, *, grad_seed: int = 1234, upstream: torch.Tensor | None = None):
    """The float64 oracle: ``F.cross_entropy(F.linear(...))`` on float64 copies of ``case``; returns
    ``(loss, grad_input, grad_weight, grad_bias)`` in float64."""
    return forward_backward(oracle_loss, case.to(torch.float64), grad_seed=grad_seed, upstream=upstream)


def count_calls(monkeypatch, module, name: str) -> list:
    """``module.name`` wrapped for the test: the returned list gains an entry per call (so that a test fails if a
    path it means to check silently was not taken)."""
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls
