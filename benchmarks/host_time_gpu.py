"""Host time of one fused call (forward + backward) against its device time, and where the host time goes.

A call is host-bound when the Python side takes longer to queue its launches than the GPU takes to run them: then
a plain training loop waits on the host however fast the kernels are. Per shape this prints

- the device time (``triton.testing.do_bench``: CUDA events, median);
- the host time: the wall time of ``--calls`` calls queued behind a GPU sleep long enough that no launch waits for
  the GPU (median of 5 such windows);
- with ``--profile``, cProfile's heaviest functions over those calls (again behind a sleep), by own time.

    python benchmarks/host_time_gpu.py --shapes 8192x768x50257 16384x896x151936 --profile
"""

import argparse
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
from linear_cross_entropy import linear_cross_entropy  # noqa: E402

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


def _measure(spec, calls, profile):
    n, h, v = map(int, spec.split("x"))
    x, w, y = _inputs(n, h, v)

    def step():
        x.grad = w.grad = None
        linear_cross_entropy(x, w, y).backward()

    device_ms = triton.testing.do_bench(step, warmup=50, rep=500, return_mode="median")
    host_ms = 1e3 * statistics.median(_host_window(step, calls) for _ in range(5)) / calls
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
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    rows = [_measure(spec, args.calls, args.profile) for spec in args.shapes]
    print(f"{'shape':>20} {'device ms':>10} {'host ms':>8} {'host/device':>11}")
    for spec, d, hst in rows:
        print(f"{spec:>20} {d:10.3f} {hst:8.3f} {hst / d:11.2f}")


if __name__ == "__main__":
    main()
