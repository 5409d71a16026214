"""Cost of each addition beyond PyTorch's API on the fused path (issue: each extra ≤ 3% over plain).

Forward + backward of ours (default options) at one shape, plain and with each extra, timed with
``triton.testing.do_bench`` (CUDA events, median) in one process; prints ms and the ratio to plain.

    python benchmarks/bench_extras_gpu.py --shape 8192x4096x128256
"""

import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402

VARIANTS = {
    "plain": {},
    "z_loss=1e-4": {"z_loss": 1e-4},
    "logit_scale=0.5": {"logit_scale": 0.5},
    "logit_softcap=30": {"logit_softcap": 30.0},
    "return_metrics": {"return_metrics": True},
    "all four": {"z_loss": 1e-4, "logit_scale": 0.5, "logit_softcap": 30.0, "return_metrics": True},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192x4096x128256")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    n, h, v = (int(t) for t in args.shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) * (2 / h**0.5)).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    opts = LinearCrossEntropyOptions()
    times = {}
    for name, kw in VARIANTS.items():

        def step(kw=kw):
            x.grad = w.grad = None
            out = linear_cross_entropy(x, w, y, options=opts, **kw)
            (out.loss if kw.get("return_metrics") else out).backward()

        times[name] = triton.testing.do_bench(step, warmup=100, rep=args.reps * 60, return_mode="median")
    print(f"{torch.cuda.get_device_name()}, {n}x{h}x{v} bf16, fused default options")
    print("| variant | ms | × plain |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.2f} | {ms / times['plain']:.3f} |")


if __name__ == "__main__":
    main()
