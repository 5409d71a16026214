"""The GPU scripts' shared driver (``check_and_time.py``, ``chain_bench.py``, ``check_grad.py``,
``check_grad_pingpong.py``): each step runs as a worker subprocess of the calling script with a time limit, so a
deadlocked or crashed kernel costs one step, not the device call; workers report through ``@@RESULT`` lines."""

import json
import os
import subprocess
import sys
import time

RESULT = "@@RESULT "


def result(d: dict) -> None:
    """Worker side: one result for the driver."""
    print(RESULT + json.dumps(d), flush=True)


def run_step(script: str, args: list[str], limit: float, label: str | None = None) -> tuple[list[dict], str]:
    """Driver side: run ``script`` with ``args`` (killed after ``limit`` seconds), echo its output, return
    ``(results, status)``."""
    label = label or " ".join(args)
    t0 = time.time()
    try:
        cp = subprocess.run(
            [sys.executable, os.path.abspath(script), *args], capture_output=True, text=True, timeout=limit
        )
        out, err, status = cp.stdout, cp.stderr, f"exit {cp.returncode}"
    except subprocess.TimeoutExpired as e:  # the child was SIGKILLed (its CUDA context and kernels with it)
        out, err, status = _text(e.stdout), _text(e.stderr), f"TIMEOUT after {limit} s (deadlock? killed)"
    results = []
    for line in out.splitlines():
        if line.startswith(RESULT):
            results.append(json.loads(line[len(RESULT) :]))
        else:
            print(line)
    if status != "exit 0":
        print(f"  [{label}] {status}; stderr tail:\n    " + "\n    ".join(err.strip().splitlines()[-12:]))
    print(f"  [{label}] {status}, {time.time() - t0:.0f} s", flush=True)
    return results, status


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def device_line() -> str:
    """The GPU, torch and Triton versions, read in a subprocess (the driver itself never touches CUDA)."""
    code = (
        "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', "
        "triton.__version__)"
    )
    info = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return info.stdout.strip() or info.stderr.strip()[-500:]


def time_gemm(name: str, shape, fn, width: int = 36) -> None:
    """Worker side: ``fn``'s ``do_bench`` median (NaN if it raises), printed with the TFLOP/s of a
    ``shape = (m, k, n)`` GEMM and reported as a ``time`` result."""
    import triton.testing

    try:
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001 - reported, the other variants go on
        txt = str(e).strip().splitlines()
        print(f"  {name} {shape}: failed: {type(e).__name__}: {txt[-1][:200] if txt else ''}", flush=True)
        ms = float("nan")
    m, k, n = shape
    print(f"  {name:{width}s} {m}x{k}x{n}: {ms:.3f} ms ({2 * m * k * n / ms / 1e9:.0f} TFLOP/s)", flush=True)
    result(dict(kind="time", variant=name, shape=list(shape), ms=ms))


def ratio_table(results: list[dict], shapes, base: str) -> None:
    """Markdown: one row per timed variant, ms and the ratio to the ``base`` variant at each shape."""
    times = [r for r in results if r["kind"] == "time"]
    lookup = {(r["variant"], tuple(r["shape"])): r["ms"] for r in times}
    shapes = [tuple(s) for s in shapes]
    print("\n| variant | " + " | ".join(f"{m}x{k}x{n} ms (× cuBLAS)" for m, k, n in shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for variant in dict.fromkeys(r["variant"] for r in times):
        cells = []
        for s in shapes:
            ms, ref = lookup.get((variant, s)), lookup.get((base, s))
            cells.append("—" if ms is None else (f"{ms:.3f} ({ms / ref:.2f}×)" if ref and ref == ref else f"{ms:.3f}"))
        print(f"| {variant} | " + " | ".join(cells) + " |")


def chunk_table(times: dict, shapes, rows) -> None:
    """Markdown: per-chunk times of the chain scripts (``chain_bench.py``, ``exp_chain.py``). ``times[shape]`` holds
    ``rows``, ``chunks`` and ``t`` (a name → ms dict with the ``floor``); ``rows`` lists ``(label, key)``, a key
    being a name in ``t`` or a function of ``t``. Each cell: ms and × the chunk floor ("—" where missing)."""
    print(
        "\n| per chunk: ms (× chunk floor) | "
        + " | ".join(f"{s}, {times[s]['rows']} rows ({times[s]['chunks']} chunks)" if s in times else s for s in shapes)
        + " |"
    )
    print("|---" * (len(shapes) + 1) + "|")
    for label, key in rows:
        cells = []
        for s in shapes:
            try:
                t = times[s]["t"]
                ms = key(t) if callable(key) else t[key]
                cells.append(f"{ms:.3f} ({ms / t['floor']:.3f}×)")
            except KeyError:
                cells.append("—")
        print(f"| {label} | " + " | ".join(cells) + " |")
