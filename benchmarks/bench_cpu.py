"""CPU: wall time and peak memory of forward + backward, idle and with one core held busy, peers side by side.

Variants: our reference path (``options=None``), our chunked path (default ``LinearCrossEntropyOptions()``), and,
when torch >= 2.13 is installed, PyTorch's own chunked path (``torch.nn.LinearCrossEntropyOptions()``) and
reference. Each (shape, dtype, variant, state) runs in a fresh process: one warm-up call, then the median of
``--runs`` timed calls; peak memory is that process's max RSS (inputs included, the same for every variant) and
"extra" is the peak minus the RSS just before the first call. "busy": another process spins on one core
(``while True: pass``) for the whole measurement, as a shared CI runner or a laptop running something else would;
it is started before and killed after each busy group, so idle and busy numbers come from the same run.

Shapes are ``NxHxC`` (input ``(N, H)``, weight ``(C, H)``) or ``NxHxCxK`` (a K-dimensional loss: weight
``(C, K, H)``, logits ``(N, C, K)``, target ``(N, K)``; PyTorch's chunked path serves it with its reference).
Benchmarks measure; they do not assert.

    python benchmarks/bench_cpu.py                                   # the default shapes, fp32 and bf16, both states
    python benchmarks/bench_cpu.py --shapes 4096x1024x32000 --states busy --variants "ours chunked"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("ours reference", "ours chunked", "torch reference", "torch chunked")
SHAPES = ("64x32x1000", "512x256x8000", "2048x512x24000", "4096x1024x32000", "8x5x4x6", "256x64x100x32")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``(N, H, C, K)`` from ``NxHxC`` (K = 1, a plain 2-D loss) or ``NxHxCxK``."""
    dims = [int(t) for t in text.split("x")]
    if len(dims) not in (3, 4):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NxHxC or NxHxCxK")
    return (*dims, 1)[:4] if len(dims) == 3 else tuple(dims)


def child(variant: str, dtype_name: str, shape: str, runs: int) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    import linear_cross_entropy as lce

    n, h, c, k = parse_shape(shape)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight_shape = (c, h) if len(shape.split("x")) == 3 else (c, k, h)
    w = (torch.randn(weight_shape) / h**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, c, (n,) if len(weight_shape) == 2 else (n, k))
    y.view(-1)[::20] = -100
    if variant == "ours reference":
        options, fn = None, lce.linear_cross_entropy
    elif variant == "ours chunked":
        options, fn = lce.LinearCrossEntropyOptions(), lce.linear_cross_entropy
    elif variant == "torch reference":
        options, fn = None, F.linear_cross_entropy
    else:
        options, fn = torch.nn.LinearCrossEntropyOptions(), F.linear_cross_entropy

    def step() -> float:
        x.grad = w.grad = None
        t0 = time.perf_counter()
        fn(x, w, y, options=options).backward()
        return time.perf_counter() - t0

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    first = step()  # warm-up: first-call allocations and one-time set-up
    seconds = [step() for _ in range(runs)] or [first]  # --runs 0: the first call's time (memory only)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "max_rss_mb": peak / 1024, "rss_before_mb": base_rss / 1024}))


@contextlib.contextmanager
def core_held(busy: bool):
    """A process spinning on one core while the block runs (when ``busy``)."""
    if not busy:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NxHxC or NxHxCxK (K-dimensional)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--states", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    ap.add_argument(
        "--runs", type=int, default=3, help="timed calls per process (after one warm-up call; 0: time the first call)"
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per process; a slower one is reported as such")
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "DTYPE", "SHAPE", "RUNS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    for shape in args.shapes:
        parse_shape(shape)

    import torch

    has_builtin = hasattr(torch.nn, "LinearCrossEntropyOptions")
    variants = [v for v in args.variants if has_builtin or not v.startswith("torch")]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"load average before {os.getloadavg()[0]:.2f}; {args.runs} timed calls per process (median)",
        flush=True,
    )
    rows = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            for state in args.states:
                with core_held(state == "busy"):
                    for variant in variants:
                        command = [sys.executable, __file__, "--child", variant, dtype, shape, str(args.runs)]
                        try:
                            out = subprocess.run(
                                command, check=True, capture_output=True, text=True, timeout=args.timeout
                            )
                        except subprocess.TimeoutExpired:
                            print(
                                f"  {shape:16s} {dtype:9s} {state:4s} {variant:16s} over {args.timeout:.0f} s",
                                flush=True,
                            )
                            continue
                        result = json.loads(out.stdout.strip().splitlines()[-1])
                        row = {
                            "shape": shape,
                            "dtype": dtype,
                            "state": state,
                            "variant": variant,
                            "seconds": statistics.median(result["seconds"]),
                            "max_rss_mb": result["max_rss_mb"],
                            "extra_mb": result["max_rss_mb"] - result["rss_before_mb"],
                        }
                        rows.append(row)
                        print(
                            f"  {shape:16s} {dtype:9s} {state:4s} {variant:16s} {row['seconds'] * 1e3:9.1f} ms  "
                            f"max RSS {row['max_rss_mb']:6.0f} MB (+{row['extra_mb']:.0f})  "
                            f"[{' '.join(f'{s * 1e3:.1f}' for s in result['seconds'])}]",
                            flush=True,
                        )
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print_table(rows, variants)


def print_table(rows: list[dict], variants: list[str]) -> None:
    """Markdown: one line per (shape, dtype, variant), idle and busy side by side, busy/idle ratio."""
    states = sorted({r["state"] for r in rows}, key=["idle", "busy"].index)
    head = " | ".join(f"{s} ms | {s} extra MB" for s in states)
    print(f"\n| N×H×C[×K] | dtype | variant | {head} |" + (" busy / idle |" if len(states) == 2 else ""))
    print("|---" * (3 + 2 * len(states) + (len(states) == 2)) + "|")
    index = {(r["shape"], r["dtype"], r["variant"], r["state"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows):
            for variant in variants:
                got = [index.get((shape, dtype, variant, s)) for s in states]
                if None in got:
                    continue
                cells = " | ".join(f"{r['seconds'] * 1e3:.1f} | {r['extra_mb']:.0f}" for r in got)
                ratio = f" {got[1]['seconds'] / got[0]['seconds']:.2f} |" if len(got) == 2 else ""
                print(f"| {shape} | {dtype} | {variant} | {cells} |{ratio}")


if __name__ == "__main__":
    main()
