"""Per-token log-probabilities and entropies (RL), forward + backward, on the GPU: ours against the materialised
logits (eager and ``torch.compile``) and cut-cross-entropy's ``reduction="none"`` (per-token losses; it has no
entropy), all in one process.

The step: ``Σ a·log p + b·H`` (``a``, ``b`` random per row; ``b = 0`` where a method gives no entropy) and its
backward. Inputs as ``bench/measure.py``'s (x ~ N(0, 1), W ~ N(0, 4/H), 5% ignored), bf16. Per method: median ms of
device-event timings (``measure.time_fn``), ×floor (the three GEMMs, 6·N·H·V FLOPs, ``measure.floor_ms``), extra
MiB (peak allocation beyond the inputs and the two gradients), relative L2 errors of log p, H, grad_input and
grad_weight against float64 (the same objective). Benchmarks measure; they do not assert.

    python benchmarks/bench_log_probs_gpu.py --shapes 8192x4096x128256 16384x896x151936 --out results
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, token_log_probs  # noqa: E402
from linear_cross_entropy.bench.measure import make_problem, parse_shape  # noqa: E402
from linear_cross_entropy.bench.timing import MiB, floor_ms, time_fn  # noqa: E402

FIELDS = ("shape", "method", "ms", "x_floor", "extra_mib", "logp_err", "entropy_err", "dx_err", "dw_err")


def materialised(x, w, y):
    """The usual way: logits in bf16, ``log_softmax`` in fp32, gather, ``−Σ p·log p``."""
    log_p = torch.log_softmax((x @ w.T).float(), dim=-1)
    keep = y != -100
    log_probs = log_p.gather(1, torch.where(keep, y, 0)[:, None])[:, 0] * keep
    return log_probs, -(log_p.exp() * log_p).sum(-1) * keep


def methods(with_cce: bool) -> dict:
    options = LinearCrossEntropyOptions()
    out = {
        "ours, log p + H": lambda x, w, y: token_log_probs(x, w, y, return_entropy=True, options=options),
        "ours, log p": lambda x, w, y: (token_log_probs(x, w, y, options=options), None),
        "eager (materialised logits)": materialised,
        "torch.compile (materialised)": torch.compile(materialised),
        "eager, log p": lambda x, w, y: (materialised(x, w, y)[0], None),
    }
    if with_cce:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cut-cross-entropy, log p"] = lambda x, w, y: (-cce(x, w, y, reduction="none").float(), None)
    return out


def reference(x, w, y, a, b, rows=1024):
    """float64 log p, H, grad_input, grad_weight of ``Σ a·log p + b·H`` (``b`` None: no entropy term), by rows:
    ``dz = a·(e_y − p) − b·p⊙(log p + H)``."""
    xd, wd = x.double(), w.double()
    keep = y != -100
    log_probs = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    entropy = torch.zeros_like(log_probs)
    gx, gw = torch.empty_like(xd), torch.zeros_like(wd)
    for s in range(0, x.shape[0], rows):
        log_p = torch.log_softmax(xd[s : s + rows] @ wd.T, dim=-1)
        k = keep[s : s + rows]
        ys = torch.where(k, y[s : s + rows], 0)
        p = log_p.exp()
        h = -(p * log_p).sum(-1)
        log_probs[s : s + rows] = log_p.gather(1, ys[:, None])[:, 0] * k
        entropy[s : s + rows] = h * k
        dz = -p * (a[s : s + rows] * k)[:, None]
        dz[torch.arange(dz.shape[0], device=dz.device), ys] += a[s : s + rows] * k
        if b is not None:
            dz -= (b[s : s + rows] * k)[:, None] * p * (log_p + h[:, None])
        gx[s : s + rows] = dz @ wd
        gw += dz.T @ xd[s : s + rows]
        del log_p, p, dz
    return log_probs, entropy, gx, gw


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def run_method(fn, x, w, y, a, b, refs, reps):
    xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))

    def step():
        xr.grad = wr.grad = None
        log_probs, entropy = fn(xr, wr, y)
        objective = (a * log_probs).sum()
        if entropy is not None:
            objective = objective + (b * entropy).sum()
        objective.backward()
        return log_probs, entropy

    step()  # compile, autotune
    log_probs, entropy = step()
    ref = refs["H"] if entropy is not None else refs["logp"]
    errs = (
        rel(log_probs.detach(), ref[0]),
        "" if entropy is None else rel(entropy.detach(), ref[1]),
        rel(xr.grad, ref[2]),
        rel(wr.grad, ref[3]),
    )
    log_probs = entropy = None
    xr.grad = wr.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    grads = (xr.grad.numel() * xr.grad.element_size()) + (wr.grad.numel() * wr.grad.element_size())
    extra = (torch.cuda.max_memory_allocated() - base - grads) / MiB
    return time_fn(step, reps), extra, errs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8192x4096x128256", "16384x896x151936"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="h100_log_probs")
    args = ap.parse_args(argv)
    try:
        import cut_cross_entropy  # noqa: F401

        with_cce = True
    except ImportError as e:
        print(f"cut-cross-entropy unavailable: {e}")
        with_cce = False
    rows = []
    for spec in args.shapes:
        n, h, v = parse_shape(spec)
        x, w, y = make_problem(n, h, v, torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(1)
        a = torch.rand(n, device="cuda", generator=g) + 0.5
        b = (torch.rand(n, device="cuda", generator=g) - 0.5) * 0.2
        refs = {"H": reference(x, w, y, a.double(), b.double()), "logp": reference(x, w, y, a.double(), None)}
        floor = floor_ms(n, h, v, torch.bfloat16, args.reps)
        rows.append(dict(shape=spec, method="floor (3 GEMMs)", ms=floor, x_floor=1.0))
        for name, fn in methods(with_cce).items():
            try:
                ms, extra, errs = run_method(fn, x, w, y, a, b, refs, args.reps)
            except torch.OutOfMemoryError:
                rows.append(dict(shape=spec, method=name, ms="OOM"))
                torch.cuda.empty_cache()
                continue
            rows.append(
                dict(
                    shape=spec,
                    method=name,
                    ms=ms,
                    x_floor=ms / floor,
                    extra_mib=extra,
                    logp_err=errs[0],
                    entropy_err=errs[1],
                    dx_err=errs[2],
                    dw_err=errs[3],
                )
            )
            print(rows[-1], flush=True)
        del x, w, y, refs
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, fwd+bwd of Σ a·log p (+ b·H)")
    print("| N×H×V | method | ms | ×floor | extra MiB | log p err | H err | dX err | dW err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["shape"], r["method"]]
        for key, spec in (("ms", ".2f"), ("x_floor", ".2f"), ("extra_mib", ".0f")):
            value = r.get(key, "")
            cells.append(format(value, spec) if isinstance(value, float) else str(value))
        for key in ("logp_err", "entropy_err", "dx_err", "dw_err"):
            value = r.get(key, "")
            cells.append(f"{value:.1e}" if isinstance(value, float) else "")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
