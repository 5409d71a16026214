"""``python -m linear_cross_entropy.bench`` (or ``linear-cross-entropy-bench``): fused linear + cross-entropy,
ours beside the three-GEMM floor and the peers, on whatever device is present.

For each shape N×H×V and dtype: the floor (the three GEMMs ``x@Wᵀ``, ``dz@W``, ``dzᵀ@x`` on shapes padded to
multiples of 128), eager, torch.compile of eager, ours per backend and acc_policy, Liger-Kernel,
cut-cross-entropy and QuACK (CUDA, when importable) and PyTorch's built-in ``F.linear_cross_entropy`` (torch >= 2.13).
Reported per method: median fwd+bwd time, ×floor, peak memory beyond the inputs and the two gradients, relative
L2 errors of the loss, grad_input and grad_weight against float64, and the first call's time. Prints a table;
writes ``TAG.csv`` and PNG plots (with ``matplotlib``: ``pip install -e ".[bench]"`` in a checkout) under --out.

Defaults by device:
  CUDA: shapes 8192x4096x128256 16384x2048x131072, bfloat16, backend fused with policies auto, compact,
        accurate:float32; eager, torch.compile, Liger-Kernel, cut-cross-entropy, QuACK, torch built-in; 10 reps.
  CPU:  shapes 1024x256x8192 2048x256x16384, float32, backends chunked and reference with policy auto; eager,
        torch built-in (torch.compile with --compile: compiling is slow on a CPU); 3 reps (about a minute on 2
        cores).
Timing: CUDA-event medians (a GPU sleep queued before each step so that launch latency is not timed) on CUDA,
wall-clock medians on the CPU. Memory: torch.cuda.max_memory_allocated on CUDA; the process's peak resident set
(reset before each step) on the CPU. Benchmarks measure; they do not assert.

Examples:
  python -m linear_cross_entropy.bench
  python -m linear_cross_entropy.bench --shapes 4096x1024x32000 --dtypes float32 bfloat16 --out results
  python -m linear_cross_entropy.bench --backends chunked --policies auto compact --methods ours eager
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

from . import measure, peers

GPU_DEFAULTS = dict(
    shapes=["8192x4096x128256", "16384x2048x131072"],
    dtypes=["bfloat16"],
    methods=["eager", "compile", "ours", "liger", "cut-cross-entropy", "quack", "torch built-in"],
    backends=["fused"],
    policies=["auto", "compact", "accurate:float32"],
    reps=10,
    warmup=2,
)
CPU_DEFAULTS = dict(
    shapes=["1024x256x8192", "2048x256x16384"],
    dtypes=["float32"],
    methods=["eager", "ours", "torch built-in"],
    backends=["chunked", "reference"],
    policies=["auto"],
    reps=3,
    warmup=0,  # the first-call, error and memory steps of each method already ran before the timed ones
)
DTYPES = ("bfloat16", "float16", "float32")
_METHOD_ALIASES = {"torch-built-in": "torch built-in", "builtin": "torch built-in", "torch.compile": "compile"}


def _default_prog() -> str:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script.startswith("linear-cross-entropy-bench") else "python -m linear_cross_entropy.bench"


def build_parser(prog=None, **defaults) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog or _default_prog(),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:K")
    ap.add_argument("--shapes", nargs="+", metavar="NxHxV", help="problem shapes (default: by device)")
    ap.add_argument(
        "--dtypes",
        "--dtype",
        nargs="+",
        choices=DTYPES,
        metavar="DTYPE",
        help=f"input dtypes among {', '.join(DTYPES)} (default: by device)",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        metavar="FAMILY",
        help=f"method families among {', '.join(peers.FAMILIES)} ('torch built-in' also as torch-built-in or "
        "builtin) (default: by device)",
    )
    ap.add_argument("--compile", action="store_true", help="add torch.compile of eager to the methods")
    ap.add_argument(
        "--backends",
        nargs="+",
        choices=peers.BACKENDS,
        metavar="BACKEND",
        help="our backends: fused (CUDA), tiled (CUDA, memory-minimal), chunked, reference (options=None) "
        "(default: by device)",
    )
    ap.add_argument(
        "--policies",
        nargs="+",
        metavar="SPEC",
        help='acc_policy specs "policy[:acc_dtype][@rows][+fp32-loss]" for the fused and chunked backends, e.g. '
        "auto compact accurate:float32 compact@256 compact@252+fp32-loss (default: by device)",
    )
    ap.add_argument(
        "--reps", type=int, help="timed repetitions per method; the median is reported (default: by device)"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        help="untimed steps before the timed ones (default: 2 on CUDA, 0 on the CPU, where each method has run three untimed steps already)",
    )
    ap.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", default="bench_results", help="directory for the CSV and plots (default: %(default)s)")
    ap.add_argument("--tag", help="file name stem of the CSV and plots (default: the device type)")
    ap.add_argument(
        "--plot", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots (needs matplotlib)"
    )
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    ap.add_argument("--profile", action="store_true", help="CUDA: print the kernels of one fwd+bwd of ours[auto]")
    ap.add_argument("--kernel-sweep", action="store_true", help="CUDA: time the row kernel over launch configurations")
    ap.set_defaults(**defaults)
    return ap


def _resolve(args) -> argparse.Namespace:
    """Fill the device-dependent defaults in."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    device = device if device is not None else torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        if device.index is not None:
            torch.cuda.set_device(device)  # CUDA events and the sleep go to the current device
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    args.methods = [_METHOD_ALIASES.get(m, m) for m in args.methods]
    if args.compile and "compile" not in args.methods:
        args.methods.append("compile")
    unknown = set(args.methods) - set(peers.FAMILIES)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose among {list(peers.FAMILIES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = device
    args.tag = args.tag or device.type
    try:
        args.shape_tuples = [measure.parse_shape(s) for s in args.shapes]
    except ValueError as e:
        raise SystemExit(f"--shapes: {e}") from None
    return args


def device_description(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({os.cpu_count()} cores, {threads} thread{'s' if threads > 1 else ''})"


def format_table(rows) -> str:
    """The results as a Markdown table (a dtype column when there is more than one dtype)."""
    fmt = measure.fmt
    dtypes = len({r.get("dtype") for r in rows}) > 1
    head = "| N×H×V |" + (" dtype |" if dtypes else "")
    lines = [
        head + " method | ms | ×floor | extra MiB | loss err | dX err | dW err | first call s |",
        "|---|" + ("---|" if dtypes else "") + "---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = format(r["ms"], ".1f" if r["ms"] >= 10 else ".2f")
        lines.append(
            f"| {r['shape']} |"
            + (f" {r['dtype']} |" if dtypes else "")
            + f" {r['method']} | {ms} | {r['x_floor']:.2f} | {fmt(r['extra_mib'], '.1f')} | "
            f"{fmt(r['loss_err'], '.1e')} | {fmt(r['dx_err'], '.1e')} | {fmt(r['dw_err'], '.1e')} | {fmt(r['first_call_s'], '.1f')} |"
        )
    return "\n".join(lines)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(measure.CSV_FIELDS))
        wr.writeheader()
        wr.writerows(rows)


def run(args) -> list[dict]:
    """Benchmark every (dtype, shape) of the resolved ``args``; returns the rows."""
    device = args.device
    print(device_description(device), "torch", torch.__version__, flush=True)
    for note in peers.methods(args.methods, args.policies, device, args.backends)[1]:
        print(note)
    if args.kernel_sweep or args.profile:
        if device.type != "cuda":
            print("--profile / --kernel-sweep need CUDA: skipped")
        else:
            if args.kernel_sweep:
                measure.kernel_sweep()
            if args.profile:
                for dtype_name in args.dtypes:
                    for n, h, v in args.shape_tuples:
                        measure.profile(n, h, v, getattr(torch, dtype_name))
    n_methods = len(peers.methods(args.methods, args.policies, device, args.backends)[0])
    progress = measure.Progress(len(args.dtypes) * len(args.shape_tuples) * (n_methods + 2), enabled=args.progress)
    rows = []
    try:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for n, h, v in args.shape_tuples:
                progress.write(f"{n}x{h}x{v} {dtype_name}")
                fns = peers.methods(args.methods, args.policies, device, args.backends)[0]
                rows += measure.bench_shape(n, h, v, dtype, fns, args.reps, device, args.warmup, progress)
    finally:
        progress.close()
    return rows


def main(argv=None, prog=None, **defaults) -> int:
    """Run the benchmark CLI with ``argv`` (default: ``sys.argv[1:]``); ``defaults`` override the parser's."""
    t0 = time.perf_counter()
    args = _resolve(build_parser(prog, **defaults).parse_args(argv))
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.csv")
    write_csv(rows, path)
    print()
    print(format_table(rows))
    print("wrote", path)
    if args.plot and rows:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                'plots skipped: matplotlib is not installed (pip install -e ".[bench]" in a checkout of this repository)'
            )
        else:
            from .plots import plot_results

            for p in plot_results(rows, args.out, args.tag):
                print("wrote", p)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
