"""The methods the benchmark compares, each a ``fn(x, W, y) -> loss`` (mean over non-ignored rows).

- ``eager``: ``F.cross_entropy((x @ W.T).float(), y)``; ``torch.compile`` of it (family ``compile``).
- ours (family ``ours``), per backend and per acc_policy spec ``"policy[:acc_dtype][@rows]"`` (e.g. ``"auto"``,
  ``"accurate:float32"``, ``"compact@256"``): backend ``fused`` → ``ours[spec]`` (plus ``ours[auto,fp32 loss]``),
  ``tiled`` → ``ours-tiled[spec]`` (the memory-minimal backend: ``auto`` = no accumulator, ``balanced:float32`` =
  fp32 input-gradient accumulator), ``chunked`` → ``ours-chunked[spec]``, ``reference`` → ``ours[reference]`` (``options=None``: logits
  materialised).
- Liger-Kernel (``liger``), cut-cross-entropy (``cut-cross-entropy``) and QuACK (``quack``, ``quack-kernels``'
  ``chunked_linear_cross_entropy`` at its defaults: 4096-row chunks, on a compute-capability 9.0 GPU its CuTe DSL
  "scaled-exp" pipeline where ``V % 128 == 0``, its base chunked pipeline otherwise): when importable, and on CUDA
  only (Triton and CuTe DSL kernels for GPUs).
- PyTorch's built-in ``F.linear_cross_entropy`` with ``torch.nn.LinearCrossEntropyOptions()`` (``torch built-in``):
  when the installed torch has it (>= 2.13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import LinearCrossEntropyOptions, linear_cross_entropy

FAMILIES = ("eager", "compile", "ours", "liger", "cut-cross-entropy", "quack", "torch built-in")
BACKENDS = ("fused", "tiled", "chunked", "reference")


def eager(x, w, y):
    return F.cross_entropy((x @ w.T).float(), y)


def _policy_options(spec, backend):
    """``"policy[:acc_dtype][@rows][+fp32-loss]"`` → options for ``backend`` (the suffix: ``loss_dtype=float32``,
    the loss as trainers log it, which Liger-Kernel and cut-cross-entropy also return)."""
    chunked, plus, suffix = spec.partition("+")
    if plus and suffix != "fp32-loss":
        raise ValueError(f"unknown policy suffix {suffix!r} in {spec!r} (expected '+fp32-loss')")
    spec_main, _, rows = chunked.partition("@")
    pol, _, acc = spec_main.partition(":")
    return LinearCrossEntropyOptions(
        backend=backend,
        acc_policy=pol,
        acc_dtype=getattr(torch, acc) if acc else None,
        batch_chunk_size=int(rows) if rows else None,
        loss_dtype=torch.float32 if plus else None,
    )


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda x, w, y: liger_fused_linear_cross_entropy(x, w, y)


def _cut_cross_entropy():
    from cut_cross_entropy import linear_cross_entropy as cce

    return lambda x, w, y: cce(x, w, y)


def _quack():
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return lambda x, w, y: chunked_linear_cross_entropy(x, w, y)


# The peers that run on CUDA only: family -> (why skipped elsewhere, loader of their fn(x, w, y)).
_CUDA_PEERS = {
    "liger": ("Liger-Kernel needs", _liger),
    "cut-cross-entropy": ("it needs", _cut_cross_entropy),
    "quack": ("QuACK needs", _quack),
}


def methods(selected, policies, device="cuda", backends=("fused",)):
    """({name: fn}, [notes]) of the methods of the families in ``selected`` that exist here.

    ``notes`` say which selected peers are unavailable and why (for the caller to print once).
    """
    selected = set(selected)
    out, family, notes = {}, {}, []
    on_cuda = torch.device(device).type == "cuda"

    def add(name, fam, fn):
        out[name] = fn
        family[name] = fam

    add("eager", "eager", eager)
    if "compile" in selected:
        add("torch.compile", "compile", torch.compile(eager))
    for backend in backends:
        if backend == "reference":
            add("ours[reference]", "ours", lambda x, w, y: linear_cross_entropy(x, w, y))
            continue
        prefix = "ours" if backend == "fused" else f"ours-{backend}"
        for spec in policies:  # "policy[:acc_dtype][@rows][+fp32-loss]", e.g. "accurate:float32", "compact@256"
            opts = _policy_options(spec, backend)
            add(f"{prefix}[{spec}]", "ours", lambda x, w, y, o=opts: linear_cross_entropy(x, w, y, options=o))
        if backend == "fused":
            opts32 = LinearCrossEntropyOptions(backend="fused", loss_dtype=torch.float32)
            add("ours[auto,fp32 loss]", "ours", lambda x, w, y, o=opts32: linear_cross_entropy(x, w, y, options=o))
    for name, (need, load) in _CUDA_PEERS.items():
        if name not in selected:
            continue
        if not on_cuda:
            notes.append(f"{name} skipped: {need} CUDA")
            continue
        try:
            add(name, name, load())
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name} unavailable: {e}")
    if "torch built-in" in selected:
        if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
            opts_t = torch.nn.LinearCrossEntropyOptions()
            add(
                "torch built-in", "torch built-in", lambda x, w, y, o=opts_t: F.linear_cross_entropy(x, w, y, options=o)
            )
        else:
            notes.append(f"torch built-in unavailable: torch {torch.__version__} has no F.linear_cross_entropy")
    return {k: v for k, v in out.items() if family[k] in selected}, notes
