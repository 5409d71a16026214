"""Host time of one fused call (forward + backward) against its device time, and where the host time goes.

A call is host-bound when the Python side takes longer to queue its launches than the GPU takes to run them: then
a plain training loop waits on the host however fast the kernels are. Per shape this prints

- the device time (``triton.testing.do_bench``: CUDA events, median);
- the host time: the wall time of ``--calls`` calls queued behind a GPU sleep long enough that no launch waits for
  the GPU (median of 5 such windows);
- with ``--pieces``, the host time of each launcher and step of the call, measured by wrapping them in timers
  (no profiler: a wrapper adds about a microsecond), nested pieces included in their callers, per call;
- with ``--profile``, cProfile's heaviest functions over those calls (again behind a sleep), by own time.

    python benchmarks/host_time_gpu.py --shapes 8192x768x50257 16384x896x151936 --pieces
"""

import argparse
import collections
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from linear_cross_entropy.backends.fused import chunks, factored, factored_gluon, function  # noqa: E402

# cycles of torch.cuda._sleep a call's window gets: ~20 ms at the H100's ~1.7 GHz, several times any call's host time
_SLEEP_CYCLES_PER_CALL = 35_000_000


def _inputs(n, h, v):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) * (2 / h**0.5)).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.05] = -100
    return x, w, y


def _host_window(step, calls):
    """Wall seconds to queue ``calls`` steps while the GPU sleeps (the queue never blocks the host)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(_SLEEP_CYCLES_PER_CALL * calls)
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed


# (module, attribute): the launchers and steps a factored call runs, timed where the caller looks them up
_PIECES = [
    (function, "make_plan"),
    (function, "row_scales"),
    (function, "reduce_total"),
    (function, "scale_cast"),
    (chunks, "accumulated"),
    (factored, "allocate"),
    (factored, "forward_chunk"),
    (factored, "gradient_gemms"),
    (factored, "target_column_grads"),
    (factored, "_target_logit_kernel"),
    (factored_gluon, "exp_logits"),
    (factored, "_factored_combine_kernel"),
    (factored, "input_grad_gemm"),
    (factored, "_input_grad_rows_kernel"),
    (factored, "weight_grad_gemm"),
    (factored, "_target_weight_grad_kernel"),
]


def _timer(name, fn, totals):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0

    return timed


class _TimedKernel:
    """A jitted kernel whose ``kernel[grid](...)`` launches are timed."""

    def __init__(self, name, kernel, totals):
        self.name, self.kernel, self.totals = name, kernel, totals

    def __getitem__(self, grid):
        return _timer(self.name, self.kernel[grid], self.totals)


@contextlib.contextmanager
def _timed_pieces(totals):
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in _PIECES]
    try:
        for mod, attr, fn in saved:
            name = f"{mod.__name__.rsplit('.', 1)[-1]}.{attr}"
            wrapped = _TimedKernel(name, fn, totals) if hasattr(fn, "__getitem__") else _timer(name, fn, totals)
            setattr(mod, attr, wrapped)
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def _pieces(step, calls):
    """Per piece, microseconds of host time a call (median window of 5)."""
    windows = []
    for _ in range(5):
        totals = collections.defaultdict(float)
        with _timed_pieces(totals):
            elapsed = _host_window(step, calls)
        totals["whole call (forward + backward)"] = elapsed
        windows.append(totals)
    return {k: 1e6 * statistics.median(w[k] for w in windows) / calls for k in windows[0]}


def _measure(spec, calls, profile, pieces):
    n, h, v = map(int, spec.split("x"))
    x, w, y = _inputs(n, h, v)
    options = LinearCrossEntropyOptions()  # the library's defaults (without options: PyTorch's reference path)

    def step():
        x.grad = w.grad = None
        linear_cross_entropy(x, w, y, options=options).backward()

    device_ms = triton.testing.do_bench(step, warmup=50, rep=500, return_mode="median")
    host_ms = 1e3 * statistics.median(_host_window(step, calls) for _ in range(5)) / calls
    if pieces:
        print(f"== {spec}: host microseconds a call, nested pieces included in their callers")
        for name, us in sorted(_pieces(step, calls).items(), key=lambda kv: -kv[1]):
            print(f"{name:>40} {us:9.1f}")
    if profile:
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        torch.cuda._sleep(_SLEEP_CYCLES_PER_CALL * calls * 3)  # cProfile slows the host ~2x
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(45)
        print(f"== {spec}: cProfile over {calls} calls\n{out.getvalue()}")
    return spec, device_ms, host_ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8192x768x50257", "16384x896x151936"])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--pieces", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    rows = [_measure(spec, args.calls, args.profile, args.pieces) for spec in args.shapes]
    print(f"{'shape':>20} {'device ms':>10} {'host ms':>8} {'host/device':>11}")
    for spec, d, hst in rows:
        print(f"{spec:>20} {d:10.3f} {hst:8.3f} {hst / d:11.2f}")


if __name__ == "__main__":
    main()
