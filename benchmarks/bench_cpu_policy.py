"""CPU, low precision: what ``acc_policy="auto"`` trades — ours ("balanced") against PyTorch's pick ("accurate"
with fp32 accumulation), PyTorch 2.13's chunked path and eager ``cross_entropy(linear(x))`` in the input dtype.

Each (shape, variant) runs in a fresh process: forward + backward three times, the best of the last two timed;
peak memory is that process's max RSS before the float64 oracle runs; errors are relative L2 against float64
(``F.cross_entropy(F.linear(...))`` on the same rounded inputs) of the loss, ``grad_input`` and ``grad_weight``.
Variants alternate within each repetition, so a busy machine slows them alike. One JSON line per run.
Benchmarks measure; they do not assert.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_policy.py                 # the README's table
    python benchmarks/bench_cpu_policy.py --shapes 2048x512x24000 --repeats 1 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("balanced", "accurate", "torch", "eager")


def run_one(n: int, h: int, c: int, dtype_name: str, variant: str) -> dict:
    import torch
    import torch.nn.functional as F

    from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, h, generator=gen, dtype=torch.float64)
    w64 = torch.randn(c, h, generator=gen, dtype=torch.float64) * (4 / h) ** 0.5
    target = torch.randint(0, c, (n,), generator=gen)
    x, w = x64.to(dtype), w64.to(dtype)
    if variant == "eager":

        def loss_fn(a, b):
            return F.cross_entropy(F.linear(a, b), target)
    elif variant == "torch":

        def loss_fn(a, b):
            return F.linear_cross_entropy(a, b, target, options=torch.nn.LinearCrossEntropyOptions())
    else:
        options = LinearCrossEntropyOptions(acc_policy=variant, acc_dtype=torch.float32)

        def loss_fn(a, b):
            return linear_cross_entropy(a, b, target, options=options)

    times = []
    for _ in range(3):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        start = time.perf_counter()
        loss = loss_fn(a, b)
        loss.backward()
        times.append(time.perf_counter() - start)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    a64, b64 = x.double().requires_grad_(), w.double().requires_grad_()
    expected = F.cross_entropy(F.linear(a64, b64), target)
    expected.backward()

    def err(actual, reference):
        return ((actual.double() - reference).norm() / reference.norm()).item()

    return dict(
        shape=f"{n}x{h}x{c}",
        dtype=dtype_name,
        variant=variant,
        seconds=min(times[1:]),
        max_rss_mb=round(rss_mb, 1),
        loss_err=err(loss.detach(), expected.detach()),
        grad_input_err=err(a.grad, a64.grad),
        grad_weight_err=err(b.grad, b64.grad),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x512x24000", "4096x1024x32000"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # N H C dtype variant: the child process
    args = parser.parse_args()
    if args.one:
        n, h, c, dtype_name, variant = args.one
        print(json.dumps(run_one(int(n), int(h), int(c), dtype_name, variant)))
        return
    for shape in args.shapes:
        n, h, c = shape.split("x")
        for _ in range(args.repeats):
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--one", n, h, c, args.dtype, variant]
                done = subprocess.run(cmd, capture_output=True, text=True)
                print(done.stdout.strip() or done.stderr.strip()[-500:], flush=True)


if __name__ == "__main__":
    main()
