"""Fused linear + cross-entropy on a GPU: ours beside the floor and the peers, in one process.

For each shape (N×H×V, bf16 by default): the floor (three cuBLAS GEMMs on shapes padded to multiples of 128:
``x@Wᵀ``, ``dz@W``, ``dzᵀ@x``, 6·N·H·V FLOPs), eager (``F.cross_entropy((x@Wᵀ).float(), y)``), torch.compile of
eager, ours under each acc_policy, and Liger-Kernel / cut-cross-entropy when importable. Inputs as in
``shared/anchors.md``: x ~ N(0, 1), W ~ N(0, 4/H), 5% of targets ignored. Reported per method: median fwd+bwd time
(CUDA events), ×floor, peak memory beyond inputs and the two gradients, and relative L2 errors of the loss,
grad_input and grad_weight against a float64 computation. Prints a table last; writes CSV (and PNG plots with
``--plot``) under ``--out``. Benchmarks measure; they do not assert.

    python benchmarks/bench_gpu.py --shapes 8192x4096x128256 16384x2048x131072 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402

MiB = 2**20


def make_problem(n, h, v, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, h, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    w = (torch.randn(v, h, device="cuda", generator=g, dtype=torch.float32) * (2 / math.sqrt(h))).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.05] = -100
    return x, w, y


def reference_fp64(x, w, y, rows=1024):
    """Loss, grad_input, grad_weight in float64, chunked over rows to bound memory."""
    xd, wd = x.double(), w.double()
    n = x.shape[0]
    keep = y != -100
    count = keep.sum().double()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    gx = torch.empty_like(xd)
    gw = torch.zeros_like(wd)
    for s in range(0, n, rows):
        z = xd[s : s + rows] @ wd.T
        lse = torch.logsumexp(z, 1)
        yc, kc = y[s : s + rows], keep[s : s + rows]
        ys = torch.where(kc, yc, 0)
        loss += ((lse - z.gather(1, ys[:, None])[:, 0]) * kc).sum()
        p = torch.exp(z - lse[:, None])
        p[torch.arange(p.shape[0], device=p.device), ys] -= 1
        p *= (kc.double() / count)[:, None]
        gx[s : s + rows] = p @ wd
        gw += p.T @ xd[s : s + rows]
        del z, p
    return loss / count, gx, gw


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def methods(selected, policies):
    out = {}

    def eager(x, w, y):
        return F.cross_entropy((x @ w.T).float(), y)

    out["eager"] = eager
    if "compile" in selected:
        out["torch.compile"] = torch.compile(eager)
    for spec in policies:  # "policy[:acc_dtype][@rows]", e.g. "accurate:float32", "compact@256"
        spec_main, _, rows = spec.partition("@")
        pol, _, acc = spec_main.partition(":")
        opts = LinearCrossEntropyOptions(
            backend="fused",
            acc_policy=pol,
            acc_dtype=getattr(torch, acc) if acc else None,
            batch_chunk_size=int(rows) if rows else None,
        )
        out[f"ours[{spec}]"] = lambda x, w, y, o=opts: linear_cross_entropy(x, w, y, options=o)
    opts32 = LinearCrossEntropyOptions(backend="fused", loss_dtype=torch.float32)
    out["ours[auto,fp32 loss]"] = lambda x, w, y, o=opts32: linear_cross_entropy(x, w, y, options=o)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger"] = lambda x, w, y: liger_fused_linear_cross_entropy(x, w, y)
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", e)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cut-cross-entropy"] = lambda x, w, y: cce(x, w, y)
    except Exception as e:  # noqa: BLE001
        print("cut-cross-entropy unavailable:", e)
    if hasattr(F, "linear_cross_entropy"):
        opts_t = torch.nn.LinearCrossEntropyOptions()
        out["torch built-in"] = lambda x, w, y, o=opts_t: F.linear_cross_entropy(x, w, y, options=o)
    aliases = {"torch.compile": "compile"}
    return {k: v for k, v in out.items() if aliases.get(k, k.split("[")[0]) in selected}


def time_fn(step, reps, warmup=2):
    """Median device time of ``step`` between CUDA events.

    Before each timed step a ~20 ms GPU sleep is queued so that the host can enqueue the whole step while the
    device waits: the events then measure the device's work, not the Python launch latency of the first kernels
    (which a training step hides behind the previous layer's work). Every method is timed the same way.
    """
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(_SLEEP_CYCLES)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


_SLEEP_CYCLES = 40_000_000  # ~20 ms at H100 clocks: longer than the host needs to enqueue one step


def measure(fn, x, w, y, ref, reps):
    """(median ms, extra MiB, (loss, dx, dw) errors, first-call seconds) of one method's fwd+bwd."""
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()

    def step():
        xr.grad = None
        wr.grad = None
        fn(xr, wr, y).backward()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    xr.grad = wr.grad = None
    loss = fn(xr, wr, y)
    loss.backward()
    errs = (rel(loss.detach(), ref[0]), rel(xr.grad, ref[1]), rel(wr.grad, ref[2]))
    xr.grad = wr.grad = None
    loss = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    grads = xr.grad.numel() * xr.grad.element_size() + wr.grad.numel() * wr.grad.element_size()
    extra = (torch.cuda.max_memory_allocated() - base - grads) / MiB
    ms = time_fn(step, reps)
    xr.grad = wr.grad = None
    return ms, extra, errs, first


def floor_ms(n, h, v, dtype, reps):
    pad = lambda d: -(-d // 128) * 128  # noqa: E731
    n, h, v = pad(n), pad(h), pad(v)
    x = torch.randn(n, h, device="cuda", dtype=dtype)
    w = torch.randn(v, h, device="cuda", dtype=dtype)
    dz = torch.randn(n, v, device="cuda", dtype=dtype)

    def step():
        torch.mm(x, w.T, out=dz)
        torch.mm(dz, w)
        torch.mm(dz.T, x)

    return time_fn(step, reps)


def bench_shape(n, h, v, dtype, selected, policies, reps):
    rows = []
    floor = floor_ms(n, h, v, dtype, reps)
    tflops = 6 * n * h * v / floor / 1e9
    rows.append(
        dict(
            shape=f"{n}x{h}x{v}",
            method="floor (3 cuBLAS GEMMs)",
            ms=floor,
            x_floor=1.0,
            extra_mib="",
            loss_err="",
            dx_err="",
            dw_err="",
            first_call_s="",
            note=f"{tflops:.0f} TFLOP/s",
        )
    )
    x, w, y = make_problem(n, h, v, dtype)
    ref = reference_fp64(x, w, y)
    torch.cuda.empty_cache()
    for name, fn in methods(selected, policies).items():
        try:
            row = measure(fn, x, w, y, ref, reps)
        except Exception as e:  # noqa: BLE001
            print(f"{name} failed at {n}x{h}x{v}: {type(e).__name__}: {e}")
            continue
        ms, extra, errs, first = row
        rows.append(
            dict(
                shape=f"{n}x{h}x{v}",
                method=name,
                ms=ms,
                x_floor=ms / floor,
                extra_mib=extra,
                loss_err=errs[0],
                dx_err=errs[1],
                dw_err=errs[2],
                first_call_s=first,
                note="",
            )
        )
        print(
            f"  {name:24s} {ms:8.2f} ms {ms / floor:5.2f}x  {extra:8.1f} MiB  loss {errs[0]:.1e} dx {errs[1]:.1e} dw {errs[2]:.1e}  first {first:.1f}s",
            flush=True,
        )
        torch.cuda.empty_cache()
    return rows


def profile(n, h, v, dtype):
    """Device time per kernel of one fwd+bwd of ours[auto] (after a warm-up), largest first."""
    x, w, y = make_problem(n, h, v, dtype)
    x.requires_grad_(), w.requires_grad_()
    opts = LinearCrossEntropyOptions(backend="fused")
    for _ in range(2):
        x.grad = w.grad = None
        linear_cross_entropy(x, w, y, options=opts).backward()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        x.grad = w.grad = None
        linear_cross_entropy(x, w, y, options=opts).backward()
        torch.cuda.synchronize()
    print(f"profile {n}x{h}x{v}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))
    prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "."), f"trace_{n}x{h}x{v}.json"))
    for sync in (False, True):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.grad = w.grad = None
        linear_cross_entropy(x, w, y, options=opts).backward()
        if sync:
            torch.cuda.synchronize()
        print(
            f"host time of one fwd+bwd ({'with' if sync else 'without'} a final sync): {(time.perf_counter() - t0) * 1e3:.1f} ms"
        )
    del x, w, y


def kernel_sweep(rows=2048, v=128256, dtype=torch.bfloat16):
    """Time the row kernel alone on one chunk for several launch configurations (bandwidth vs one read+write)."""
    from linear_cross_entropy.backends.common import LossParams
    from linear_cross_entropy.backends.fused import launch

    logits = torch.randn(rows, v, device="cuda", dtype=dtype)
    target = torch.randint(0, v, (rows,), device="cuda")
    scale = torch.full((rows,), 1.0 / rows, device="cuda")
    loss = torch.empty(rows, device="cuda")
    lse = torch.empty(rows, device="cuda")
    lp = LossParams("mean", -100, 0.0, False)
    min_bytes = 2 * logits.numel() * logits.element_size()
    print(f"row kernel on a {rows}x{v} {dtype} chunk (one read + one write = {min_bytes / 2**20:.0f} MiB)")
    saved = (launch._MAX_BLOCK_C, launch._NUM_WARPS)
    for block in (2048, 4096, 8192):
        for warps in (4, 8, 16):
            launch._MAX_BLOCK_C, launch._NUM_WARPS = block, warps
            step = lambda: launch.cross_entropy_rows(logits, logits, None, target, None, scale, loss, lse, lp)  # noqa: E731
            ms = time_fn(step, 10)
            print(f"  BLOCK_C={block:5d} warps={warps:2d}: {ms:6.3f} ms  {min_bytes / ms / 1e6:6.0f} GB/s (read+write)")
    launch._MAX_BLOCK_C, launch._NUM_WARPS = saved


def fmt(v, spec):
    return v if isinstance(v, str) else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8192x4096x128256", "16384x2048x131072"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument(
        "--methods", nargs="+", default=["eager", "compile", "ours", "liger", "cut-cross-entropy", "torch built-in"]
    )
    ap.add_argument("--policies", nargs="+", default=["auto", "compact", "accurate:float32"])
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernels of one fwd+bwd of ours[auto]")
    ap.add_argument("--kernel-sweep", action="store_true", help="time the row kernel alone over launch configurations")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if args.kernel_sweep:
        kernel_sweep()
    if args.profile:
        for s in args.shapes:
            profile(*(int(t) for t in s.split("x")), dtype)
    rows = []
    for s in args.shapes:
        n, h, v = (int(t) for t in s.split("x"))
        print(f"{n}x{h}x{v} {args.dtype}", flush=True)
        rows += bench_shape(n, h, v, dtype, set(args.methods), args.policies, args.reps)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    if args.plot:
        from plots import plot_results  # benchmarks/plots.py

        plot_results(rows, args.out, args.tag)
    print("\n| N×H×V | method | ms | ×floor | extra MiB | loss err | dX err | dW err | first call s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['method']} | {r['ms']:.1f} | {r['x_floor']:.2f} | {fmt(r['extra_mib'], '.1f')} | "
            f"{fmt(r['loss_err'], '.1e')} | {fmt(r['dx_err'], '.1e')} | {fmt(r['dw_err'], '.1e')} | {fmt(r['first_call_s'], '.1f')} |"
        )
    print("wrote", path)


if __name__ == "__main__":
    main()
