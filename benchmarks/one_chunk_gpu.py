r"""One-chunk fused calls on the factored pass against the row kernel, on the GPU machine.

    cd /work/main && python benchmarks/one_chunk_gpu.py [--shapes NxHxV[@rows] ...] [--reps 10] [--csv FILE]

A fused call whose rows all fit one chunk (``fused_chunk_rows``: up to about ``2·H`` rows by default, any ``N``
with ``batch_chunk_size >= N``) runs deferred: forward keeps the chunk's matrix, backward forms every gradient once
with the upstream gradient folded in (no fp32 scratch). This times it on the factored pass (forward keeps ``E'``
and the rows' scales) and on the row kernel (``policy.THRESHOLDS.factored_one_chunk`` off for that method's calls
only), with the floor, in one process (``bench.measure.bench_shape``: medians of device-event timings, extra
memory, errors against float64). ``@rows`` sets ``batch_chunk_size`` (an opt-in one chunk); without it the
default's own chunking applies. No assertion: a benchmark.
"""

import argparse
import contextlib
import csv
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from linear_cross_entropy.backends.fused import policy  # noqa: E402
from linear_cross_entropy.bench.measure import CSV_FIELDS, bench_shape, parse_shape  # noqa: E402

SHAPES = [
    "4096x2048x128256",  # Llama-3.2-1B, one 4096-token sequence: one chunk by default
    "2048x1536x151936",  # Qwen2.5-1.5B: one chunk by default
    "1024x896x151936",  # Qwen2.5-0.5B: one chunk by default
    "8192x768x50257@8192",  # GPT-2 small, one chunk asked for (785 MiB, torch.compile's memory)
    "8192x2048x128256@8192",
    "16384x896x151936@16384",
]


@contextlib.contextmanager
def _row_kernel():
    """One-chunk calls on the row kernel (``THRESHOLDS.factored_one_chunk`` off) for the calls inside."""
    saved = policy.THRESHOLDS
    policy.THRESHOLDS = dataclasses.replace(saved, factored_one_chunk=False)
    try:
        yield
    finally:
        policy.THRESHOLDS = saved


def _methods(rows):
    opts = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=rows)

    def ours(x, w, y):
        return linear_cross_entropy(x, w, y, options=opts)

    def row_kernel(x, w, y):
        with _row_kernel():
            loss = linear_cross_entropy(x, w, y, options=opts)
        return loss  # the plan (and so the backward's path) is fixed in forward

    return {"ours, factored one chunk": ours, "ours, row kernel one chunk": row_kernel}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--csv", help="write the rows here")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    table = []
    for spec in args.shapes:
        shape, _, rows = spec.partition("@")
        n, h, v = parse_shape(shape)
        for row in bench_shape(n, h, v, torch.bfloat16, _methods(int(rows) if rows else None), args.reps):
            table.append(dict(row, shape=spec))
        torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(table)
    print("\n| N×H×V[@rows] | method | ms | ×floor | extra MiB | loss err | dX err | dW err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        extra = f"{r['extra_mib']:.1f}" if r["extra_mib"] != "" else ""
        errs = " | ".join(f"{r[k]:.1e}" if r[k] != "" else "" for k in ("loss_err", "dx_err", "dw_err"))
        print(f"| {r['shape']} | {r['method']} | {r['ms']:.3f} | {r['x_floor']:.3f} | {extra} | {errs} |")


if __name__ == "__main__":
    main()
