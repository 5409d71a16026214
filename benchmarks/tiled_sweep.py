"""The tiled backend's kernels over launch configurations, forward and backward timed apart, beside the floor.

    python benchmarks/tiled_sweep.py [--shape 8192x4096x128256]

Times the forward (statistics kernel + the combine of its splits) and the backward kernel (compact accumulation:
atomics into the bf16 gradients) of ``backend="tiled"`` for each configuration, median of CUDA events, and the
three-GEMM floor (6·N·H·V FLOPs through cuBLAS). A GEMM-equivalent is a third of the floor: the forward does one
(the logits), the backward three (recompute, ``dz·W``, ``dzᵀ·x``). Benchmarks measure; they do not assert.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy.backends.common import Grads, LossParams  # noqa: E402
from linear_cross_entropy.backends.tiled.launch import (  # noqa: E402
    TileConfig,
    combine_splits,
    partial_stats,
    tiled_backward,
)
from linear_cross_entropy.bench.measure import make_problem, parse_shape  # noqa: E402
from linear_cross_entropy.bench.timing import floor_ms, time_fn  # noqa: E402

# TileConfig(block_m, block_n, block_k, num_warps, num_stages, block_h=, group_m=, min_splits=)
# (configuration, TMA loads)
FORWARD = [
    (TileConfig(128, 256, 64, 8, 3, min_splits=8), False),
    (TileConfig(128, 256, 64, 8, 3, min_splits=8), True),
    (TileConfig(128, 256, 64, 8, 4, min_splits=8), True),
    (TileConfig(128, 256, 64, 8, 3, min_splits=16), True),
    (TileConfig(256, 128, 64, 8, 3, min_splits=4), True),
]
BACKWARD = [
    (TileConfig(256, 128, 64, 8, 3, block_h=64, group_m=8), False),
    (TileConfig(256, 128, 64, 8, 3, block_h=64, group_m=16), False),
]


def _short(cfg):
    return (
        f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} "
        f"h{cfg.block_h} g{cfg.group_m} splits>={cfg.min_splits}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8192x4096x128256")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n, h, v = parse_shape(args.shape)
    dtype = torch.bfloat16
    x, w, y = make_problem(n, h, v, dtype)
    floor = floor_ms(n, h, v, dtype, 5)
    lp = LossParams("mean", -100, 0.0, False)
    grads = Grads(True, True, False)
    print(f"{n}x{h}x{v} bf16  floor {floor:.2f} ms (GEMM-equivalent {floor / 3:.2f} ms)", flush=True)
    gemm = floor / 3

    def forward(cfg=None, tma=None):
        return combine_splits(partial_stats(x, w, None, y, None, lp, cfg, tma), y, None, lp, v, None)[1]

    lse = forward()
    share = (y != -100).float() / (y != -100).sum()
    coefs = combine_splits(partial_stats(x, w, None, y, None, lp), y, None, lp, v, (share, share))[3]
    best = {}
    for phase, configs in (("forward", FORWARD), ("backward", BACKWARD)):
        for cfg, tma in configs:
            label = _short(cfg) + (" TMA" if tma else "")
            if phase == "forward":
                step = lambda cfg=cfg, tma=tma: forward(cfg, tma)  # noqa: E731
            else:
                step = lambda cfg=cfg: tiled_backward(  # noqa: E731
                    x, w, None, y, None, lse, coefs, lp, grads, False, False, 0.0, cfg
                )
            try:
                ms = time_fn(step, args.reps, warmup=1)
            except Exception as e:  # noqa: BLE001 (a configuration that does not compile or fit is reported)
                print(phase, label, "failed:", type(e).__name__, str(e).splitlines()[0][:100], flush=True)
                continue
            print(f"{phase:8s} {label:46s} {ms:7.2f} ms  {ms / gemm:.2f} GEMM-equivalents", flush=True)
            if ms < best.get(phase, (float("inf"),))[0]:
                best[phase] = (ms, label)
    if len(best) == 2:
        total = best["forward"][0] + best["backward"][0]
        print(f"best forward  {best['forward'][1]}: {best['forward'][0]:.2f} ms")
        print(f"best backward {best['backward'][1]}: {best['backward'][0]:.2f} ms")
        print(f"best fwd+bwd {total:.2f} ms = {total / floor:.2f}x floor")


if __name__ == "__main__":
    main()
