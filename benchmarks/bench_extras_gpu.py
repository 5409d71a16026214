"""Cost of each addition beyond plain cross-entropy on the fused path (issue: each extra ≤ 3% over plain).

Forward + backward of ours (default options) per shape, plain and with each extra, timed with
``triton.testing.do_bench`` (CUDA events, median) in one process; prints ms, the ratio to plain and the peak memory
beyond the inputs and the two gradients. Label smoothing is timed twice where the factored row pass takes it (bf16
on Hopper, H ≤ 2048, several chunks): as dispatched, and on the row kernel (the factored pass switched off through
``policy.THRESHOLDS``), which is what every smoothed call ran before issue 20's v18; so is a logit scale (what
such calls ran before v18c).

    python benchmarks/bench_extras_gpu.py --shapes 8192x4096x128256 16384x896x151936
"""

import argparse
import dataclasses
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from linear_cross_entropy.backends.fused import policy  # noqa: E402

VARIANTS = {
    "plain": {},
    "z_loss=1e-4": {"z_loss": 1e-4},
    "logit_scale=0.5": {"logit_scale": 0.5},
    "logit_softcap=30": {"logit_softcap": 30.0},
    "return_metrics": {"return_metrics": True},
    "all four": {"z_loss": 1e-4, "logit_scale": 0.5, "logit_softcap": 30.0, "return_metrics": True},
    "label_smoothing=0.1": {"label_smoothing": 0.1},
    "label_smoothing=0.1, class weights": {"label_smoothing": 0.1, "weight": "random"},
}
ROW_KERNEL = " (row kernel)"
# the variants the factored row pass takes (with plain, z-loss): timed on the row kernel too
FACTORED_EXTRAS = ("logit_scale=0.5", "label_smoothing=0.1", "label_smoothing=0.1, class weights")


def _time(step, reps, leaves):
    for t in leaves:  # the previous step's gradients out of the baseline
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(step, warmup=100, rep=reps * 60, return_mode="median"), extra


def _shape(n, h, v, reps):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) * (2 / h**0.5)).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.05] = -100
    cw = torch.rand(v, device="cuda", generator=g) + 0.5
    opts = LinearCrossEntropyOptions()
    # the two gradients as the step leaves them (bf16): what the memory column leaves out, as the main benchmark
    grads_mib = (x.numel() + w.numel()) * 2 / 2**20
    rows = {}
    default = policy.THRESHOLDS
    for name, kw in VARIANTS.items():
        kw = {k: (cw if k == "weight" else a) for k, a in kw.items()}

        def step(kw=kw):
            x.grad = w.grad = None
            out = linear_cross_entropy(x, w, y, options=opts, **kw)
            (out.loss if kw.get("return_metrics") else out).backward()

        ms, extra = _time(step, reps, (x, w))
        rows[name] = (ms, extra - grads_mib)
        if name in FACTORED_EXTRAS:
            policy.THRESHOLDS = dataclasses.replace(default, factored_dtypes=frozenset())
            try:
                ms, extra = _time(step, reps, (x, w))
            finally:
                policy.THRESHOLDS = default
            rows[name + ROW_KERNEL] = (ms, extra - grads_mib)
    print(f"\n{torch.cuda.get_device_name()}, {n}x{h}x{v} bf16, fused default options, 5% ignored targets")
    print("| variant | ms | × plain | extra MiB |\n|---|---|---|---|")
    for name, (ms, extra) in rows.items():
        print(f"| {name} | {ms:.2f} | {ms / rows['plain'][0]:.3f} | {extra:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8192x4096x128256"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    for shape in args.shapes:
        _shape(*(int(t) for t in shape.split("x")), args.reps)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
