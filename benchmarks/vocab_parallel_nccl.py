"""Vocabulary-parallel loss over NCCL on 2 GPUs: correctness against one process, then timing.

    NCCL_NVLS_ENABLE=0 python benchmarks/vocab_parallel_nccl.py

Each rank holds a contiguous, uneven slice of the head. Correctness: float64, every rank's loss, weight/bias
gradient slices and the full input gradient against the single-process computation of the whole head. Timing
(bf16, 8192×4096×128256, CUDA events, median): two ranks each with half the vocabulary vs one rank with all of it.
With a process group the fused path is not implemented yet, so the sharded runs use the chunked path; the
single-rank fused time is printed for comparison.
"""

import os
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402


def _time(step, reps=5):
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def worker(rank, world, port):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    # correctness, float64, uneven slices
    g = torch.Generator(device=dev).manual_seed(0)
    n, h, v = 96, 32, 1001
    bounds = [0, 450, v]
    x = torch.randn(n, h, device=dev, dtype=torch.float64, generator=g)
    w = torch.randn(v, h, device=dev, dtype=torch.float64, generator=g)
    b = torch.randn(v, device=dev, dtype=torch.float64, generator=g)
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[::9] = -100
    ref_x, ref_w, ref_b = (t.clone().requires_grad_() for t in (x, w, b))
    ref = F.cross_entropy(F.linear(ref_x, ref_w, ref_b), y, label_smoothing=0.1)
    ref.backward()
    lo, hi = bounds[rank], bounds[rank + 1]
    xs, ws, bs = x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
    loss = linear_cross_entropy(
        xs,
        ws,
        y,
        linear_bias=bs,
        label_smoothing=0.1,
        options=LinearCrossEntropyOptions(),
        process_group=dist.group.WORLD,
    )
    loss.backward()
    errs = [
        ((a - r).abs().max() / r.abs().max()).item()
        for a, r in ((loss, ref), (xs.grad, ref_x.grad), (ws.grad, ref_w.grad[lo:hi]), (bs.grad, ref_b.grad[lo:hi]))
    ]
    print(
        f"rank {rank}: float64 max rel err loss {errs[0]:.1e} grad_input {errs[1]:.1e} "
        f"grad_weight slice {errs[2]:.1e} grad_bias slice {errs[3]:.1e}",
        flush=True,
    )
    # timing, bf16
    n, h, v = 8192, 4096, 128256
    x = torch.randn(n, h, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    w_full = (torch.randn(v, h, device=dev, generator=g) * (2 / h**0.5)).bfloat16()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    half = v // 2
    w = w_full[rank * half : (rank + 1) * half].clone().requires_grad_()
    opts = LinearCrossEntropyOptions(batch_chunk_size=2048)

    def sharded():
        x.grad = w.grad = None
        linear_cross_entropy(x, w, y, options=opts, process_group=dist.group.WORLD).backward()

    ms = _time(sharded)
    if rank == 0:
        wf = w_full.requires_grad_()

        def whole(backend):
            def step():
                x.grad = wf.grad = None
                linear_cross_entropy(x, wf, y, options=LinearCrossEntropyOptions(backend=backend)).backward()

            return step

        one_chunked = _time(whole("chunked"))
        one_fused = _time(whole("fused"))
        print(
            f"8192x4096x128256 bf16: 2 ranks (chunked, V/2 each) {ms:.1f} ms; 1 rank chunked {one_chunked:.1f} ms; "
            f"1 rank fused {one_fused:.1f} ms",
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port), nprocs=2, join=True)
