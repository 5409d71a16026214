"""CPU: wall time and peak memory of forward + backward, one fresh process per run, median of several runs.

Variants: our reference path (``options=None``), our chunked path (default ``LinearCrossEntropyOptions()``), and,
when torch >= 2.13 is installed, PyTorch's own chunked path (``torch.nn.LinearCrossEntropyOptions()``) and reference.
Peak memory is the process's max RSS (inputs included, the same for every variant). Benchmarks measure; they do
not assert.

    python benchmarks/bench_cpu.py --shape 4096x1024x32000 --dtypes float32 bfloat16 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("ours reference", "ours chunked", "torch reference", "torch chunked")


def child(variant: str, dtype_name: str, n: int, h: int, c: int) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    import linear_cross_entropy as lce

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    w = (torch.randn(c, h) / h**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, c, (n,))
    y[::20] = -100
    if variant == "ours reference":
        fn = lambda: lce.linear_cross_entropy(x, w, y)  # noqa: E731
    elif variant == "ours chunked":
        fn = lambda: lce.linear_cross_entropy(x, w, y, options=lce.LinearCrossEntropyOptions())  # noqa: E731
    elif variant == "torch reference":
        fn = lambda: F.linear_cross_entropy(x, w, y)  # noqa: E731
    else:
        fn = lambda: F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions())  # noqa: E731
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"seconds": seconds, "max_rss_mb": peak / 1024, "rss_before_mb": base_rss / 1024, "loss": float(loss)}
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x1024x32000", help="N x H x C")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    n, h, c = (int(t) for t in args.shape.split("x"))
    if args.child:
        child(args.child[0], args.child[1], n, h, c)
        return

    import torch

    has_builtin = hasattr(torch.nn, "LinearCrossEntropyOptions")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, N×H×C = {n}×{h}×{c}, {args.runs} runs per variant")
    rows = []
    for dtype in args.dtypes:
        for variant in args.variants:
            if variant.startswith("torch") and not has_builtin:
                continue
            runs = []
            for _ in range(args.runs):
                out = subprocess.run(
                    [sys.executable, __file__, "--shape", args.shape, "--child", variant, dtype],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = {
                "dtype": dtype,
                "variant": variant,
                "seconds": statistics.median(r["seconds"] for r in runs),
                "max_rss_mb": statistics.median(r["max_rss_mb"] for r in runs),
                "rss_before_mb": statistics.median(r["rss_before_mb"] for r in runs),
            }
            rows.append(row)
            print(
                f"  {dtype:9s} {variant:16s} {row['seconds']:6.2f} s  max RSS {row['max_rss_mb']:6.0f} MB "
                f"(before fwd+bwd {row['rss_before_mb']:.0f} MB)",
                flush=True,
            )
    print("\n| dtype | variant | fwd+bwd s (median) | max RSS MB (median) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['variant']} | {r['seconds']:.2f} | {r['max_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
