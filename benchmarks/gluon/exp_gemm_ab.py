r"""Interleaved A/B timings of the factored pass's exponential GEMM against cuBLAS's logits GEMM, on the GPU machine.

    cd /work/main && PYTHONPATH=src python benchmarks/gluon/exp_gemm_ab.py [--baseline FILE] [--rounds 5]

Back-to-back ``do_bench`` loops of one kernel drift with the GPU's power state (one run measured the same kernel
1.0 and 1.2× apart minutes later), so each variant is timed in short windows, round-robin, ``--rounds`` times, and
the median over rounds is reported; ``nvidia-smi`` samples the SM clock and the board power meanwhile, and each
variant's mean clock and power over its windows is printed beside its time. Variants per chunk shape: cuBLAS
``x·Wᵀ`` (bf16 out, split as the library splits it where V is not a multiple of 8), the library's Gluon
exponential GEMM (``factored_gluon.exp_logits``) with 4 and 5 pipeline stages, and, with ``--baseline FILE``,
another copy of ``factored_gluon.py`` (e.g. the previous commit's) at 4 stages, first checked against the
library's on the same inputs (E in bf16 ulps, partials absolute).

``--input-grad`` times cuBLAS's ``E·W`` instead, on operands of the same shape and layout holding different data:
the exponential as the library stores it (shift = the target logit), the same shifted by 8 more nats (every value
below 1), the same scaled per row into ``dz``'s magnitudes (``E·r``, the softmax over N), and ``randn``: under the
GPU's power cap a GEMM's speed depends on its operands' bits.
"""

import argparse
import datetime
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
from linear_cross_entropy.backends.fused import factored, factored_gluon  # noqa: E402
from linear_cross_entropy.backends.fused.gemm import logits_gemm  # noqa: E402

SHAPES = ["4096x896x151936", "4096x1536x151936", "4096x2048x128256", "2048x768x50257"]


def _problem(r, h, v):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(r, h, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=g) * (2 / h**0.5)).bfloat16()
    y = torch.randint(0, v, (r,), device="cuda", generator=g)
    shift = (x.float() * w[y].float()).sum(1)  # the target logits
    return x, w, shift


def _outputs(r, v, x):
    e = factored.row_padded(r, v, x.dtype, x.device)
    partials = torch.empty((triton.cdiv(v, factored_gluon.BLOCK_N), r), dtype=torch.float32, device=x.device)
    return e, partials


def _with_stages(module, stages):
    def run(x, w, shift, e, partials):
        module._STAGES = stages
        sched = factored.schedule(x.shape[0], x, w.shape[0])
        module.exp_logits(x, w, None, shift, 1.0, factored.CLAMP, e, partials, sched.workers, sched.group_m)

    return run


def _check(baseline, x, w, shift, v):
    r = x.shape[0]
    e0, p0 = _outputs(r, v, x)
    e1, p1 = _outputs(r, v, x)
    _with_stages(factored_gluon, 4)(x, w, shift, e0, p0)
    _with_stages(baseline, 4)(x, w, shift, e1, p1)
    torch.cuda.synchronize()
    a, b = e0.float(), e1.float()
    ulp = torch.where(b != 0, (a - b).abs() / (b.abs() * 2.0**-8), (a - b).abs())
    print(
        f"  check vs baseline: E > 1 ulp apart {(ulp > 1).float().mean().item():.1e} of entries, max {ulp.max().item():.1f} "
        f"ulp; partials max |Δ| {(p0 - p1).abs().max().item():.1e}",
        flush=True,
    )


def _round_robin(shape, variants, args, windows, times):
    """Each variant warmed, then ``args.rounds`` rounds of one ``do_bench`` window each, in turn: their times and
    (start, end) wall-clock windows go into ``times`` and ``windows`` under ``(shape, name)``."""
    for fn in variants.values():  # compile and warm
        fn()
    torch.cuda.synchronize()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.time()
            ms = triton.testing.do_bench(fn, warmup=5, rep=args.window_ms, return_mode="median")
            windows.setdefault((shape, name), []).append((t0, time.time()))
            times.setdefault((shape, name), []).append(ms)


def _time_shape(shape, baseline, args, windows, times):
    """``args.rounds`` round-robin windows of every variant at one chunk shape, into ``windows`` and ``times``."""
    r, h, v = (int(s) for s in shape.split("x"))
    x, w, shift = _problem(r, h, v)
    e, partials = _outputs(r, v, x)
    z = factored.row_padded(r, v, x.dtype, x.device)
    variants = {
        "cuBLAS x·Wᵀ": lambda: logits_gemm(x, w, z),  # the library's: V in an aligned bulk and a tail
        "Gluon exp, 4 stages": lambda: _with_stages(factored_gluon, 4)(x, w, shift, e, partials),
        "Gluon exp, 5 stages": lambda: _with_stages(factored_gluon, 5)(x, w, shift, e, partials),
    }
    if baseline is not None:
        _check(baseline, x, w, shift, v)
        variants["baseline Gluon exp, 4 stages"] = lambda: _with_stages(baseline, 4)(x, w, shift, e, partials)
    _round_robin(shape, variants, args, windows, times)


def _time_input_grad(shape, args, windows, times):
    """``--input-grad``: cuBLAS ``E·W`` on the data variants of the module docstring, round-robin."""
    r, h, v = (int(s) for s in shape.split("x"))
    x, w, shift = _problem(r, h, v)
    data = {}
    for name, c in (("E = exp(z − z_y)", shift), ("E·e^-8 (exp(z − z_y − 8))", shift + 8.0)):
        e, partials = _outputs(r, v, x)
        _with_stages(factored_gluon, 4)(x, w, c, e, partials)
        data[name] = e
    e = data["E = exp(z − z_y)"]
    dz = factored.row_padded(r, v, x.dtype, x.device)
    dz.copy_(e.float() / e.float().sum(1, keepdim=True) / r)  # softmax / N: dz's magnitudes
    data["E·r (dz's magnitudes)"] = dz
    rnd = factored.row_padded(r, v, x.dtype, x.device)
    rnd.copy_(torch.randn(r, v, device=x.device))
    data["randn"] = rnd
    out = torch.empty((r, h), dtype=x.dtype, device=x.device)
    variants = {name: (lambda d=d: factored.input_grad_gemm(d, w, out)) for name, d in data.items()}
    _round_robin(shape, variants, args, windows, times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--baseline", help="another factored_gluon.py to time beside the library's")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window-ms", type=float, default=40.0)
    ap.add_argument("--input-grad", action="store_true", help="time cuBLAS E·W on different data instead")
    args = ap.parse_args()
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_gluon", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    log = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "20"],
        stdout=log, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    samples = []  # (time, clock MHz, power W), read back at the end
    windows = {}  # (shape, variant) -> [(t0, t1)]
    times = {}
    t_start = time.time()
    try:
        for shape in args.shapes:
            if args.input_grad:
                _time_input_grad(shape, args, windows, times)
            else:
                _time_shape(shape, baseline, args, windows, times)
            torch.cuda.empty_cache()
    finally:
        smi.terminate()
        smi.wait()
    log.seek(0)
    for line in log.read().splitlines():
        try:
            stamp, clock, power = (f.strip() for f in line.split(","))
            t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, float(clock), float(power)))
        except ValueError:
            continue
    print(f"{len(samples)} nvidia-smi samples over {time.time() - t_start:.0f} s")
    print("\n| shape | variant | median ms | rounds (ms) | × the first | mean SM MHz | mean W |")
    print("|---|---|---|---|---|---|---|")
    for (shape, name), ms in times.items():
        base = statistics.median(next(t for (s, _), t in times.items() if s == shape))
        inside = [s for s in samples if any(t0 <= s[0] <= t1 for t0, t1 in windows[(shape, name)])]
        clock = statistics.mean(s[1] for s in inside) if inside else float("nan")
        power = statistics.mean(s[2] for s in inside) if inside else float("nan")
        med = statistics.median(ms)
        rounds = " ".join(f"{m:.3f}" for m in ms)
        print(f"| {shape} | {name} | {med:.3f} | {rounds} | {med / base:.3f} | {clock:.0f} | {power:.0f} |")


if __name__ == "__main__":
    main()
