"""CPU: forward + backward time, idle and with one core held busy, and peak memory, peers side by side.

Variants: our reference path (``options=None``), our chunked path (default ``LinearCrossEntropyOptions()``) and,
with torch >= 2.13, PyTorch's own reference and chunked path (``torch.nn.LinearCrossEntropyOptions()``).

- Time: one fresh process per (shape, dtype, state) runs the variants interleaved, a warm-up round then ``runs``
  rounds (by size: the smallest shapes many; the largest one and no warm-up, its first-call costs lost in
  seconds of work), and reports each variant's median, so a change in
  the machine's load touches every variant alike. "busy": another process spins on one core (``while True:
  pass``) for that whole process, as a shared CI runner or a laptop running something else would; idle and busy
  come from the same run. PyTorch's chunked path runs ~10x slower than the others; above ``--slow-limit``
  (N·H·C) it is timed only by its memory process (idle, first call).
- Memory: one fresh process per (shape, dtype, variant), idle, one call: "extra" is the peak RSS minus the RSS
  just before the call (inputs included in both, so the same for every variant).

Shapes are ``NxHxC`` (input ``(N, H)``, weight ``(C, H)``) or ``NxHxCxK`` (a K-dimensional loss: weight
``(C, K, H)``, logits ``(N, C, K)``, target ``(N, K)``). Every 20th target is ignored. A CSV of every number goes
to ``bench_results/cpu/`` (ignored by git); the table comes last. Benchmarks measure; they do not assert.

    python benchmarks/bench_cpu.py            # issue 21's grid, fp32 and bf16, idle and busy (~7-8 min, 2 idle cores)
    python benchmarks/bench_cpu.py --shapes 4096x1024x32000 --dtypes bfloat16 --states busy
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("ours reference", "ours chunked", "torch reference", "torch chunked")
SHAPES = ("64x32x1000", "512x256x8000", "2048x512x24000", "4096x1024x32000")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``(N, H, C, K)`` from ``NxHxC`` (K = 1, a plain 2-D loss) or ``NxHxCxK``."""
    dims = [int(t) for t in text.split("x")]
    if len(dims) not in (3, 4):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NxHxC or NxHxCxK")
    return (*dims, 1)[:4] if len(dims) == 3 else tuple(dims)


def default_runs(shape: str) -> int:
    """Timed rounds by the work per call (6·N·H·C·K FLOPs): many where a call takes a millisecond, one where it
    takes seconds."""
    n, h, c, k = parse_shape(shape)
    flops = 6 * n * h * c * k
    return 50 if flops < 1e8 else 10 if flops < 1e10 else 3 if flops < 3e11 else 1


def _problem(dtype_name: str, shape: str):
    import torch

    n, h, c, k = parse_shape(shape)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight_shape = (c, h) if len(shape.split("x")) == 3 else (c, k, h)
    w = (torch.randn(weight_shape) / h**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, c, (n,) if len(weight_shape) == 2 else (n, k))
    y.view(-1)[::20] = -100
    return x, w, y


def _calls(variants: list[str]) -> dict:
    """``variant -> (function, options)``."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    import linear_cross_entropy as lce

    table = {
        "ours reference": (lce.linear_cross_entropy, None),
        "ours chunked": (lce.linear_cross_entropy, lce.LinearCrossEntropyOptions()),
        "torch reference": (getattr(F, "linear_cross_entropy", None), None),
        "torch chunked": (
            getattr(F, "linear_cross_entropy", None),
            getattr(torch.nn, "LinearCrossEntropyOptions", None),
        ),
    }
    return {v: (table[v][0], table[v][1]() if v == "torch chunked" else table[v][1]) for v in variants}


def _step(call, x, w, y) -> float:
    """One forward + backward: seconds."""
    fn, options = call
    x.grad = w.grad = None
    start = time.perf_counter()
    fn(x, w, y, options=options).backward()
    return time.perf_counter() - start


def child_time(variants: list[str], dtype_name: str, shape: str, runs: int) -> None:
    """Interleaved rounds: a warm-up round (unless ``runs`` is 1), then ``runs``; one JSON line of seconds per
    variant."""
    x, w, y = _problem(dtype_name, shape)
    calls = _calls(variants)
    for variant in variants if runs > 1 else ():  # one round only where a call takes seconds: first-call costs vanish
        _step(calls[variant], x, w, y)
    seconds = {v: [] for v in variants}
    for _ in range(runs):
        for variant in variants:
            seconds[variant].append(_step(calls[variant], x, w, y))
    print(json.dumps(seconds))


def child_memory(variant: str, dtype_name: str, shape: str) -> None:
    """One call: its seconds, peak RSS and the RSS before it (MB)."""
    x, w, y = _problem(dtype_name, shape)
    call = _calls([variant])[variant]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = _step(call, x, w, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "max_rss_mb": peak / 1024, "rss_before_mb": before / 1024}))


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


def _run_child(args: list[str], timeout: float | None):
    """The child's last JSON line, or None when it ran past ``timeout``."""
    try:
        out = subprocess.run(
            [sys.executable, __file__, *args], check=True, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(shape: str, dtype: str, states: list[str], variants: list[str], args) -> list[dict]:
    """Every row of one (shape, dtype): memory (idle, one process per variant), then time per state."""
    n, h, c, k = parse_shape(shape)
    slow = n * h * c * k > args.slow_limit
    rows = []
    for variant in variants:
        result = _run_child(["--memory", variant, dtype, shape], args.timeout)
        row = dict(shape=shape, dtype=dtype, variant=variant, state="memory", load=os.getloadavg()[0])
        if result is not None:
            row.update(extra_mb=result["max_rss_mb"] - result["rss_before_mb"], first_call_ms=result["seconds"] * 1e3)
        rows.append(row)
        _report(row)
    timed = [v for v in variants if not (slow and v == "torch chunked")]
    runs = args.runs or default_runs(shape)
    for state in states:
        with core_held(state == "busy"):
            result = _run_child(["--time", ",".join(timed), dtype, shape, str(runs)], args.timeout)
        for variant in timed:
            row = dict(shape=shape, dtype=dtype, variant=variant, state=state, load=os.getloadavg()[0], runs=runs)
            if result is not None:
                row["ms"] = statistics.median(result[variant]) * 1e3
            rows.append(row)
            _report(row)
    return rows


def _report(row: dict) -> None:
    value = (
        f"{row['ms']:10.1f} ms (median of {row['runs']})"
        if "ms" in row
        else f"+{row['extra_mb']:.0f} MB, first call {row['first_call_ms']:.1f} ms"
        if "extra_mb" in row
        else "over the timeout"
    )
    print(f"  {row['shape']:16s} {row['dtype']:9s} {row['state']:6s} {row['variant']:16s} {value}", flush=True)


def print_table(rows: list[dict], variants: list[str]) -> None:
    """Markdown: one line per (shape, dtype, variant): idle and busy ms, busy/idle, extra MB; and per (shape,
    dtype) our chunked path against our reference path."""
    get = {(r["shape"], r["dtype"], r["variant"], r["state"]): r for r in rows}

    def cell(shape, dtype, variant, state, key):
        return get.get((shape, dtype, variant, state), {}).get(key)

    print("\n| N×H×C[×K] | dtype | variant | idle ms | busy ms | busy / idle | extra MB |")
    print("|---|---|---|---|---|---|---|")
    for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        for variant in variants:
            idle = cell(shape, dtype, variant, "idle", "ms")
            if idle is None:  # the slow peer: its one (idle) memory call's time
                idle_text = cell(shape, dtype, variant, "memory", "first_call_ms")
                idle = idle_text
                idle_text = "—" if idle_text is None else f"{idle_text:.1f} (1st call)"
            else:
                idle_text = f"{idle:.1f}"
            busy = cell(shape, dtype, variant, "busy", "ms")
            ratio = f"{busy / idle:.2f}" if busy is not None and idle else "—"
            extra = cell(shape, dtype, variant, "memory", "extra_mb")
            print(
                f"| {shape} | {dtype} | {variant} | {idle_text} | {'—' if busy is None else f'{busy:.1f}'} | "
                f"{ratio} | {'—' if extra is None else f'{extra:.0f}'} |"
            )
    print("\nOurs chunked ÷ ours reference (time; < 1 is faster), and busy/idle of each (chunked's no worse: ≤ 1):")
    for shape, dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
        t = {
            (v, s): cell(shape, dtype, v, s, "ms") for v in ("ours chunked", "ours reference") for s in ("idle", "busy")
        }
        parts = []
        for s in ("idle", "busy"):
            if t[("ours chunked", s)] and t[("ours reference", s)]:
                parts.append(f"{s} {t[('ours chunked', s)] / t[('ours reference', s)]:.2f}")
        if all(t.values()):
            slow_c = t[("ours chunked", "busy")] / t[("ours chunked", "idle")]
            slow_r = t[("ours reference", "busy")] / t[("ours reference", "idle")]
            parts.append(f"busy/idle chunked {slow_c:.2f} vs reference {slow_r:.2f} ({slow_c / slow_r:.2f})")
        print(f"  {shape} {dtype}: " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NxHxC or NxHxCxK (K-dimensional)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--states", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    ap.add_argument("--runs", type=int, default=0, help="timed rounds per process (0: by size, see default_runs)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--slow-limit", type=float, default=1e10, help="N·H·C above which torch chunked is not timed")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per process; a slower one is reported")
    ap.add_argument("--out", default=os.path.join("bench_results", "cpu"), help="folder of the CSV")
    ap.add_argument("--time", nargs=4, metavar=("VARIANTS", "DTYPE", "SHAPE", "RUNS"), help=argparse.SUPPRESS)
    ap.add_argument("--memory", nargs=3, metavar=("VARIANT", "DTYPE", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time:
        return child_time(args.time[0].split(","), args.time[1], args.time[2], int(args.time[3]))
    if args.memory:
        return child_memory(*args.memory)
    for shape in args.shapes:
        parse_shape(shape)

    import torch

    has_builtin = hasattr(torch.nn, "LinearCrossEntropyOptions")
    variants = [v for v in args.variants if has_builtin or not v.startswith("torch")]
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"load average before {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = [
        row
        for shape in args.shapes
        for dtype in args.dtypes
        for row in measure(shape, dtype, args.states, variants, args)
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, time.strftime("bench_cpu_%Y%m%d_%H%M%S.csv"))
    with open(path, "w", newline="") as f:
        fields = ["shape", "dtype", "variant", "state", "ms", "runs", "extra_mb", "first_call_ms", "load"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"load average after {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s; CSV: {path}")
    print_table(rows, variants)


if __name__ == "__main__":
    main()
