"""Problem construction, the float64 reference, and one shape's rows of the benchmark.

Inputs as in ``shared/anchors.md``: x ~ N(0, 1), W ~ N(0, 4/H), 5% of targets ignored (``-100``).

Per method, one forward + backward (``fn(x, W, y).backward()``) is measured (:mod:`.timing`: time, extra memory,
the GEMM floor); **errors** are relative L2 errors of the loss, ``grad_input`` and ``grad_weight`` against a
float64 computation (:func:`reference_fp64`).

Benchmarks measure; they do not assert.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

from .. import LinearCrossEntropyOptions, linear_cross_entropy
from .timing import MiB, cpu_memory, empty_cache, floor_ms, is_cuda, occupy_device, synchronize, time_fn

CSV_FIELDS = (
    "shape",
    "method",
    "ms",
    "x_floor",
    "extra_mib",
    "loss_err",
    "dx_err",
    "dw_err",
    "first_call_s",
    "note",
    "dtype",
    "device",
)


def parse_shape(spec: str) -> tuple[int, int, int]:
    """``"NxHxV"`` → ``(N, H, V)``."""
    parts = spec.lower().replace("×", "x").split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape must be NxHxV with positive integers, got {spec!r}")
    n, h, v = (int(p) for p in parts)
    return n, h, v


def make_problem(n, h, v, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, h, device=device, generator=g, dtype=torch.float32).to(dtype)
    w = (torch.randn(v, h, device=device, generator=g, dtype=torch.float32) * (2 / math.sqrt(h))).to(dtype)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[torch.rand(n, device=device, generator=g) < 0.05] = -100
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


def measure(fn, x, w, y, ref, reps, warmup=2):
    """(median ms, extra MiB, (loss, dx, dw) errors, first-call seconds) of one method's fwd+bwd.

    The extra MiB is ``""`` where the device's peak memory cannot be measured.
    """
    device = x.device
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()

    def step():
        xr.grad = None
        wr.grad = None
        fn(xr, wr, y).backward()

    synchronize(device)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    xr.grad = wr.grad = None
    loss = fn(xr, wr, y)
    loss.backward()
    errs = (rel(loss.detach(), ref[0]), rel(xr.grad, ref[1]), rel(wr.grad, ref[2]))
    xr.grad = wr.grad = None
    loss = None
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = cpu_memory().start()
        step()
        peak = cpu_memory().peak()
    grads = xr.grad.numel() * xr.grad.element_size() + wr.grad.numel() * wr.grad.element_size()
    extra = (peak - base - grads) / MiB if base is not None else ""
    ms = time_fn(step, reps, warmup, device)
    xr.grad = wr.grad = None
    return ms, extra, errs, first


class Progress:
    """A progress bar: ``tqdm`` when it is installed, else one line per step on stderr. ``write`` prints a line."""

    def __init__(self, total, enabled=True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        self._t0 = time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False, file=sys.stderr)
            except Exception:  # noqa: BLE001  (no tqdm, or one that cannot start: the plain lines serve)
                self._bar = None

    def start(self, label):
        """Announce the step about to run."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(label, refresh=True)
        else:
            elapsed = time.perf_counter() - self._t0
            print(f"[{self.done + 1}/{self.total} {elapsed:6.1f}s] {label}", file=sys.stderr, flush=True)

    def advance(self):
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def write(self, msg):
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(msg, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _floor_label(device) -> str:
    return "floor (3 cuBLAS GEMMs)" if is_cuda(device) else "floor (3 GEMMs)"


def bench_shape(n, h, v, dtype, methods, reps, device="cuda", warmup=2, progress=None):
    """Rows (dicts with :data:`CSV_FIELDS`) of the floor and of each of ``methods`` ({name: fn}) at one shape."""
    progress = progress if progress is not None else Progress(0, enabled=False)
    dtype_name = str(dtype).removeprefix("torch.")
    device_type = torch.device(device).type
    common = dict(dtype=dtype_name, device=device_type)
    rows = []
    progress.start(f"{n}x{h}x{v} {dtype_name}: floor")
    floor = floor_ms(n, h, v, dtype, reps, max(warmup, 1), device)  # a method's untimed steps are its warm-up
    progress.advance()
    tflops = 6 * n * h * v / floor / 1e9
    rate = f"{tflops:.0f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.0f} GFLOP/s"
    rows.append(
        dict(
            shape=f"{n}x{h}x{v}",
            method=_floor_label(device),
            ms=floor,
            x_floor=1.0,
            extra_mib="",
            loss_err="",
            dx_err="",
            dw_err="",
            first_call_s="",
            note=rate,
            **common,
        )
    )
    progress.start(f"{n}x{h}x{v} {dtype_name}: float64 reference")
    x, w, y = make_problem(n, h, v, dtype, device=device)
    ref = reference_fp64(x, w, y)
    empty_cache(device)
    progress.advance()
    for name, fn in methods.items():
        progress.start(f"{n}x{h}x{v} {dtype_name}: {name}")
        try:
            row = measure(fn, x, w, y, ref, reps, warmup)
        except Exception as e:  # noqa: BLE001
            progress.write(f"{name} failed at {n}x{h}x{v}: {type(e).__name__}: {e}")
            progress.advance()
            continue
        progress.advance()
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
                **common,
            )
        )
        progress.write(
            f"  {name:24s} {ms:8.2f} ms {ms / floor:5.2f}x  {fmt(extra, '8.1f')} MiB  loss {errs[0]:.1e} dx {errs[1]:.1e} dw {errs[2]:.1e}  first {first:.1f}s",
        )
        empty_cache(device)
    return rows


def profile(n, h, v, dtype):
    """Device time per kernel of one fwd+bwd of ours[auto] (after a warm-up), largest first. CUDA only."""
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
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))
    prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "."), f"trace_{n}x{h}x{v}.json"))
    # The host's share: enqueueing fwd+bwd while the GPU is busy with a queued sleep, so that no call waits on the
    # device (a step whose host time exceeds its device time is launch-bound unless earlier work hides it).
    reps, host = 5, []
    for _ in range(3):
        torch.cuda.synchronize()
        occupy_device(10)
        t0 = time.perf_counter()
        for _ in range(reps):
            x.grad = w.grad = None
            linear_cross_entropy(x, w, y, options=opts).backward()
        host.append((time.perf_counter() - t0) * 1e3 / reps)
    torch.cuda.synchronize()
    print(
        f"host time of one fwd+bwd (enqueued behind a GPU sleep, median of 3 × {reps}): {statistics.median(host):.2f} ms"
    )
    del x, w, y


def kernel_sweep(rows=2048, v=128256, dtype=torch.bfloat16):
    """Time the row kernel alone on one chunk for several launch configurations (bandwidth vs one read+write).

    CUDA only."""
    from ..backends.common import LossParams
    from ..backends.fused import rows as launch

    logits = torch.randn(rows, v, device="cuda", dtype=dtype)
    target = torch.randint(0, v, (rows,), device="cuda")
    scale = torch.full((rows,), 1.0 / rows, device="cuda")
    loss = torch.empty(rows, device="cuda")
    lse = torch.empty(rows, device="cuda")
    lp = LossParams("mean", -100, 0.0, False)
    min_bytes = 2 * logits.numel() * logits.element_size()
    print(f"row kernel on a {rows}x{v} {dtype} chunk (one read + one write = {min_bytes / 2**20:.0f} MiB)")
    for block in (4096, 8192, 16384, 32768):  # the plain kernel's configurations (no soft-cap, no metrics)
        for warps in (8, 16, 32):
            config = launch.RowLaunch(block, warps)
            step = lambda config=config: launch.cross_entropy_rows(  # noqa: E731
                logits, logits, None, target, None, (scale, scale), loss, lse, None, lp, config=config
            )
            ms = time_fn(step, 10)
            print(f"  BLOCK_C={block:5d} warps={warps:2d}: {ms:6.3f} ms  {min_bytes / ms / 1e6:6.0f} GB/s (read+write)")


def fmt(v, spec):
    return v if isinstance(v, str) else format(v, spec)
