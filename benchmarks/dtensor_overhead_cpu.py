"""DTensor (tensor-parallel) head against ``process_group=`` with plain tensors: bytes exchanged and CPU overhead.

    python benchmarks/dtensor_overhead_cpu.py            # 2 gloo ranks on this machine's CPU, fp32, chunked path

Every variant is the same vocabulary-parallel problem (N rows, H features, V classes, head split 2 ways, bias,
``reduction="mean"``, forward + backward), called as:

- ``process_group``: plain local slices and ``process_group=WORLD`` (the baseline);
- ``dtensor/plain``: ``linear_weight``/``linear_bias`` ``Shard(0)`` DTensors, a plain input (the HF case);
- ``dtensor/replicate``: the same with a ``Replicate()`` DTensor input (gradient returned ``Partial()``);
- ``dtensor/shard``: a ``Shard(0)`` input and target (sequence parallel: rows gathered, input gradient
  reduce-scattered).

Bytes: every collective a call issues (c10d and functional collectives, counted under a dispatch mode in one
untimed forward + backward), as the payload size of each (all-reduce: the tensor; all-gather: the gathered output;
reduce-scatter: the input), per token. Time: median wall-clock ms of ``--reps`` calls per variant after warm-ups,
variants interleaved (the slower rank's median). CPU timings on a shared machine are noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402

_COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")  # bookkeeping ops in those namespaces
# bytes each rank sends per payload byte in a ring algorithm over W ranks
_RING_FACTOR = {
    "allreduce": lambda w: 2 * (w - 1) / w,
    "gather": lambda w: (w - 1) / w,
    "scatter": lambda w: (w - 1) / w,
}


class CountBytes(TorchDispatchMode):
    """Payload bytes of every collective op dispatched while active, by op name."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in _COLLECTIVE_NAMESPACES and not func.__name__.startswith(_NOT_COLLECTIVES):
            name = func.__name__.split(".")[0]
            # all-gather: the gathered output; otherwise the input (all-reduce, reduce-scatter)
            payload = out if "gather" in name else args[0]
            tensors = payload if isinstance(payload, (list, tuple)) else [payload]
            for t in tensors:
                for u in t if isinstance(t, (list, tuple)) else [t]:
                    if isinstance(u, torch.Tensor):
                        self.bytes[name] += u.numel() * u.element_size()
        return out


def _ring_factor(op: str, world: int) -> float:
    kind = next(k for k in _RING_FACTOR if k in op.replace("_", ""))
    return _RING_FACTOR[kind](world)


def _variants(mesh, x, w, b, t, rank, world):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    per = -(-w.shape[0] // world)
    lo, hi = rank * per, min((rank + 1) * per, w.shape[0])
    options = LinearCrossEntropyOptions()
    ws, bs = distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)])
    x_rep, x_shard = distribute_tensor(x, mesh, [Replicate()]), distribute_tensor(x, mesh, [Shard(0)])
    t_shard = distribute_tensor(t, mesh, [Shard(0)])

    def leaf(v):
        return v.detach().clone().requires_grad_()

    def run(xx, ww, bb, tt, **kw):
        def prepare():  # fresh leaves, outside the timed call
            xi, wi, bi = leaf(xx), leaf(ww), leaf(bb)
            return lambda: linear_cross_entropy(xi, wi, tt, linear_bias=bi, options=options, **kw).backward()

        return prepare

    return {
        "process_group": run(x, w[lo:hi], b[lo:hi], t, process_group=dist.group.WORLD),
        "dtensor/plain": run(x, ws, bs, t),
        "dtensor/replicate": run(x_rep, ws, bs, t),
        "dtensor/shard": run(x_shard, ws, bs, t_shard),
    }


def _worker(rank, world, port, args, queue):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    results = {}
    for n, h, v in args.shapes:
        x = torch.randn(n, h, generator=g)
        w, b = torch.randn(v, h, generator=g) / h**0.5, torch.randn(v, generator=g)
        t = torch.randint(0, v, (n,), generator=g)
        variants = _variants(mesh, x, w, b, t, rank, world)
        for name, prepare in variants.items():
            step = prepare()
            with CountBytes() as counter:
                step()
            results[(n, h, v, name, "bytes")] = dict(counter.bytes)
        times = collections.defaultdict(list)
        for i in range(args.warmup + args.reps):
            for name, prepare in variants.items():  # interleaved: drift hits every variant alike
                step = prepare()
                dist.barrier()
                t0 = time.perf_counter()
                step()
                if i >= args.warmup:
                    times[name].append(1e3 * (time.perf_counter() - t0))
        for name in variants:
            results[(n, h, v, name, "ms")] = statistics.median(times[name])
    queue.put((rank, results))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["64x64x1024", "1024x512x16384"], help="NxHxV")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    args.shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world, port, args, queue), nprocs=world)
    per_rank = dict(queue.get() for _ in range(world))
    print(f"torch {torch.__version__}, {world} gloo ranks, fp32, chunked path, forward + backward, reduction=mean")
    for n, h, v in args.shapes:
        print(f"\nN×H×V = {n}×{h}×{v}")
        print(f"{'variant':<20}{'ms (slower rank)':>18}{'overhead':>10}   payload bytes per token by collective")
        base = max(per_rank[r][(n, h, v, "process_group", "ms")] for r in range(world))
        for name in ("process_group", "dtensor/plain", "dtensor/replicate", "dtensor/shard"):
            ms = max(per_rank[r][(n, h, v, name, "ms")] for r in range(world))
            counted = per_rank[0][(n, h, v, name, "bytes")]
            detail = ", ".join(f"{op} {b / n:.1f}" for op, b in sorted(counted.items()))
            sent = sum(b * _ring_factor(op, world) for op, b in counted.items()) / n
            print(f"{name:<20}{ms:>18.2f}{(ms / base - 1) * 100:>+9.1f}%   {detail}; ring: {sent:.1f} sent per rank")


if __name__ == "__main__":
    main()
