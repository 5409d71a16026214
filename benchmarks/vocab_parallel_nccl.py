"""Vocabulary-parallel loss over NCCL on 2 GPUs: correctness against one process, then timing.

    NCCL_NVLS_ENABLE=0 python benchmarks/vocab_parallel_nccl.py

Each rank holds a contiguous, uneven slice of the head. Correctness, every rank's loss, metrics, weight/bias
gradient slices and full input gradient against the single-process computation of the whole head in float64:

- the fused path in fp32 (TF32 off; the fused kernels have no fp64), held to twice plain PyTorch's own fp32 error
  plus 1e-6 (relative norm errors, as tests/test_distributed.py), in one chunk and in several, with every loss
  option; the script checks that the fused vocabulary-parallel sweep actually ran;
- the chunked path in float64 (max relative error printed; ~1e-15 expected).

Timing (bf16, N×H×V = 8192×4096×128256, forward + backward, CUDA events, median of 10 after 2 warm-ups; the
slowest rank's median for the 2-rank runs): 2 ranks fused (V/2 each), 2 ranks chunked (V/2 each, 2048-row chunks),
1 rank fused and 1 rank chunked with the whole head. Exits non-zero when a correctness check fails.

``--dtensor``: also time the fused 2-rank run with the head as a ``Shard(0)`` DTensor on a 1-D mesh (no
``process_group=``; :mod:`linear_cross_entropy.dtensor`). On CUDA every timed row also prints the larger rank's
peak allocated memory.

``--cpu``: the same logic on 2 CPU processes with gloo and the fused kernels in Triton's interpreter, at small
shapes (a dry run of this script without GPUs; its timings mean nothing).
"""

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from linear_cross_entropy.backends import fused as fused_backend  # noqa: E402

SLACK, FLOOR = 2.0, 1e-6
METRICS = ("lse", "z_loss", "max_logit", "entropy", "logit_norm", "accuracy", "log_prob")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write per line: the ranks' lines do not interleave
    sys.stdout.flush()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _timer(dev):
    if dev.type == "cuda":

        def run(step):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)

        return run

    def run(step):
        t0 = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - t0)

    return run


def _time(step, dev, reps=10, warmup=2):
    """Median milliseconds of ``step`` (warm-ups first: Triton compiles, cuBLAS picks its kernels)."""
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    timer = _timer(dev)
    return statistics.median(timer(step) for _ in range(reps))


def _single(x, w, b, cw, y, kw, upstream):
    """Loss, metrics and gradients of the whole head in one process (our reference path: plain PyTorch ops)."""
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    out = linear_cross_entropy(xr, wr, y, linear_bias=br, weight=cw, return_metrics=True, **kw)
    loss = out.loss
    (loss if loss.dim() == 0 else (loss * upstream.to(loss.dtype)).sum()).backward()
    return loss.detach(), out.metrics, xr.grad, wr.grad, br.grad


def _sharded(x, w, b, cw, y, kw, upstream, lo, hi, options):
    xs, ws, bs = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
    out = linear_cross_entropy(
        xs,
        ws,
        y,
        linear_bias=bs,
        weight=cw[lo:hi],
        options=options,
        process_group=dist.group.WORLD,
        return_metrics=True,
        **kw,
    )
    loss = out.loss
    (loss if loss.dim() == 0 else (loss * upstream.to(loss.dtype)).sum()).backward()
    return loss.detach(), out.metrics, xs.grad, ws.grad, bs.grad


def _fields(result, lo, hi):
    loss, metrics, gx, gw, gb = result
    out = {"loss": loss, "grad_input": gx, "grad_weight": gw, "grad_bias": gb}
    if lo is not None:
        out["grad_weight"], out["grad_bias"] = gw[lo:hi], gb[lo:hi]
    out.update({f"metric {f}": getattr(metrics, f) for f in METRICS})
    return out


def check(rank, dev, cpu):
    """Correctness on uneven slices; returns the number of failed comparisons on this rank."""
    g = torch.Generator().manual_seed(0)  # on the CPU: the same data on every rank
    n, h, v = (45, 16, 301) if cpu else (96, 64, 1001)
    bounds = [0, 130 if cpu else 450, v]
    lo, hi = bounds[rank], bounds[rank + 1]
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (2 / h**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.2
    y = torch.randint(0, v, (n,), generator=g)
    y[::9] = -100
    upstream = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    x, w, b, cw, y, upstream = (t.to(dev) for t in (x, w, b, cw, y, upstream))
    cases = [
        ("mean smoothing", {"label_smoothing": 0.1}, None),
        ("sum extras", {"reduction": "sum", "z_loss": 1e-3, "logit_scale": 0.8, "logit_softcap": 5.0}, None),
        ("none smoothing z-loss", {"reduction": "none", "label_smoothing": 0.2, "z_loss": 1e-3}, None),
        ("mean 4 chunks", {"label_smoothing": 0.1, "logit_softcap": 5.0}, -(-n // 4)),
    ]
    failures = 0
    # the fused path, fp32, against float64 within twice plain PyTorch's fp32 error
    from linear_cross_entropy.backends.fused import chunks as launch

    ran = [0]
    original = launch._sharded_rows

    def counting(*args, **kwargs):
        ran[0] += 1
        return original(*args, **kwargs)

    launch._sharded_rows = counting
    f32 = [t.float() if t.is_floating_point() else t for t in (x, w, b, cw)]
    for name, kw, rows in cases:
        options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=rows, chunking_method=None)
        ref = _fields(_single(x, w, b, cw, y, kw, upstream), lo, hi)
        plain = _fields(_single(*f32, y, kw, upstream), lo, hi)
        before = ran[0]
        ours = _fields(_sharded(*f32, y, kw, upstream, lo, hi, options), None, None)
        worst, worst_field = 0.0, ""
        bad = []
        for field, r in ref.items():
            err, bound = _rel(ours[field], r), SLACK * _rel(plain[field], r) + FLOOR
            if err / bound > worst:
                worst, worst_field = err / bound, field
            if not err <= bound:
                bad.append(f"{field} {err:.1e} > {bound:.1e}")
        if ran[0] == before:
            bad.append("the fused vocabulary-parallel path did not run")
        failures += len(bad)
        status = "ok" if not bad else "FAIL: " + "; ".join(bad)
        _say(f"rank {rank} fused fp32 [{name}]: worst error/bound {worst:.2f} ({worst_field}) {status}")
    launch._sharded_rows = original
    # the chunked path, float64
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3}
    ref = _fields(_single(x, w, b, cw, y, kw, upstream), lo, hi)
    ours = _fields(
        _sharded(x, w, b, cw, y, kw, upstream, lo, hi, LinearCrossEntropyOptions(backend="chunked")), None, None
    )
    worst = max(_rel(ours[f], r) for f, r in ref.items())
    failures += worst > 1e-12
    _say(f"rank {rank} chunked float64: max relative error {worst:.1e} {'ok' if worst <= 1e-12 else 'FAIL'}")
    return failures


def timing(rank, world, dev, cpu, dtensor=False):
    n, h, v = (64, 32, 1000) if cpu else (8192, 4096, 128256)
    dtype = torch.float32 if cpu else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(n, h, device=dev, dtype=dtype, generator=g)
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    dist.broadcast(x, 0)  # every rank the same input and targets
    dist.broadcast(y, 0)
    x.requires_grad_()
    w_full = (torch.randn(v, h, device=dev, generator=g) * (2 / h**0.5)).to(dtype)
    dist.broadcast(w_full, 0)
    half = v // world
    lo, hi = rank * half, (v if rank == world - 1 else (rank + 1) * half)
    w = w_full[lo:hi].clone().requires_grad_()
    rows = {} if cpu else {"batch_chunk_size": 2048}

    def sharded(backend, **opts):
        def step():
            x.grad = w.grad = None
            options = LinearCrossEntropyOptions(backend=backend, **opts)
            linear_cross_entropy(x, w, y, options=options, process_group=dist.group.WORLD).backward()

        return step

    steps = [("2 ranks fused (V/2 each)", sharded("fused")), ("2 ranks chunked (V/2 each)", sharded("chunked", **rows))]
    if dtensor:  # the same head as a Shard(0) DTensor on a 1-D mesh: no process_group argument
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh(dev.type, (world,))
        assert hi - lo == -(-v // world) or rank == world - 1, "DTensor's Shard(0) split differs from these slices"
        w_dt = DTensor.from_local(w.detach(), mesh, [Shard(0)], run_check=False, shape=(v, h), stride=(h, 1))
        w_dt.requires_grad_()

        def dtensor_step():
            x.grad = w_dt.grad = None
            linear_cross_entropy(x, w_dt, y, options=LinearCrossEntropyOptions(backend="fused")).backward()

        steps.append(("2 ranks fused, DTensor head", dtensor_step))
    results, peaks = {}, {}
    for label, step in steps:
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ms = torch.tensor([_time(step, dev)], dtype=torch.float64, device=dev)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank's median
        results[label] = ms.item()
        if dev.type == "cuda":  # the larger rank's peak allocation, inputs included
            peak = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**20], dtype=torch.float64, device=dev)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            peaks[label] = peak.item()
    dist.barrier()
    if rank == 0:
        wf = w_full.requires_grad_()

        def whole(backend, **opts):
            def step():
                x.grad = wf.grad = None
                linear_cross_entropy(x, wf, y, options=LinearCrossEntropyOptions(backend=backend, **opts)).backward()

            return step

        for label, step in (
            ("1 rank fused (whole V)", whole("fused")),
            ("1 rank chunked (whole V)", whole("chunked", **rows)),
        ):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            results[label] = _time(step, dev)
            if dev.type == "cuda":
                peaks[label] = torch.cuda.max_memory_allocated(dev) / 2**20
        print(f"\n{n}x{h}x{v} {str(dtype).removeprefix('torch.')}, forward + backward, median ms:", flush=True)
        for label, ms in results.items():
            peak = f"  peak {peaks[label]:8.0f} MiB" if label in peaks else ""
            print(f"  {label:<28} {ms:8.2f}{peak}", flush=True)
    dist.barrier()


def worker(rank, world, port, cpu, status_dir, dtensor=False):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if cpu:
        dev = torch.device("cpu")
        backend = "gloo"
    else:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        backend = "nccl"
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check compares with plain fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        failures = check(rank, dev, cpu)
        timing(rank, world, dev, cpu, dtensor)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(status_dir, f"rank{rank}"), "w") as f:
        f.write(str(failures))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run: gloo, CPU, Triton interpreter, small shapes")
    parser.add_argument("--dtensor", action="store_true", help="also time the head as a Shard(0) DTensor")
    args = parser.parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # inherited by the workers before they import triton
    elif torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs (or --cpu for a dry run)")
    if not fused_backend.triton_available():
        sys.exit("needs triton (the fused backend)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile

    with tempfile.TemporaryDirectory() as status_dir:
        mp.spawn(worker, args=(2, port, args.cpu, status_dir, args.dtensor), nprocs=2, join=True)
        failures = sum(int(open(os.path.join(status_dir, f"rank{r}")).read()) for r in range(2))
    print(f"\ncorrectness: {'all checks passed' if not failures else f'{failures} FAILED'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
