"""Issue 20's pieces, per chunk: the softmax fused into Triton GEMMs against today's cuBLAS GEMMs + row kernel.

Per shape ``N×H×V`` and its default chunk (``rows``, as the fused default chunks it), bf16, 5% ignored targets:

- floor: the three cuBLAS GEMMs of one chunk (``x·Wᵀ``, ``dz·W``, ``dzᵀ·x``; V padded to a multiple of 128);
- today: cuBLAS logits GEMM → row kernel (both sweeps, ``dz`` in place) → cuBLAS ``dz·W`` and ``grad_W (+)= dzᵀ·x``
  (fp32 scratch where the shape runs several chunks);
- new, "all Triton": logits GEMM with the softmax partials in its epilogue, the combine, ``dz·W`` and ``dzᵀ·x`` with
  ``dz`` formed in their prologue;
- new, "dx stores dz": the same, but the ``dz·W`` kernel's first feature block also stores ``dz`` and cuBLAS does
  ``dzᵀ·x``;
each piece alone and each chain end to end (CUDA-event medians of ``triton.testing.do_bench``). Correctness first:
at 1024 rows of each shape the losses and gradients against an fp32 reference. Never asserts; a table last.

    python benchmarks/bench_softmax_gemm_gpu.py [--shapes 16384x896x151936 ...] [--variants t256 t512]
"""

import argparse
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy.backends.common import LossParams  # noqa: E402
from linear_cross_entropy.backends.fused import softmax_gemm as sg  # noqa: E402
from linear_cross_entropy.backends.fused.gemm import (  # noqa: E402
    input_grad_gemm,
    logits_gemm,
    row_padded,
    weight_grad_gemm,
)
from linear_cross_entropy.backends.fused.rows import cross_entropy_rows  # noqa: E402

# N×H×V → rows per chunk of today's default (options.fused_chunk_rows for bf16 with the fp32 scratch)
SHAPES = {  # smallest H first: where the removed pass weighs most
    "16384x896x151936": 4096,
    "8192x768x50257": 2048,
    "16384x1536x151936": 4096,
    "8192x2048x128256": 4096,
    "8192x4096x128256": 8192,
}
_T = sg.GemmTiles
SoftmaxGemmConfigT = sg.SoftmaxGemmConfig
_BASE = sg.default_config(torch.device("cuda"))
VARIANTS = {
    "t256": dataclasses.replace(_BASE, input_grad=_T(128, 256, 64, 8, 3), weight_grad=_T(128, 256, 64, 8, 3)),
    "t512": _BASE,  # the default: 64×512 gradient tiles (half the exp recomputation of 128×256)
    # and 2 CTAs per SM for the logits GEMM, so that one CTA's softmax epilogue overlaps another's MMA
    "t128": SoftmaxGemmConfigT(_T(128, 128, 64, 4, 2), _T(128, 128, 64, 8, 3), _T(128, 128, 64, 8, 3)),
    # 128×256 gradient tiles with shorter / longer reduction steps (more stages / fewer barriers per prologue)
    "t256k32": dataclasses.replace(_BASE, input_grad=_T(128, 256, 32, 8, 4), weight_grad=_T(128, 256, 32, 8, 4)),
    "t256k128": dataclasses.replace(_BASE, input_grad=_T(128, 256, 128, 8, 2), weight_grad=_T(128, 256, 128, 8, 2)),
}
LP = LossParams("mean", -100, 0.0, False)
NEW_PIECES = (
    "stats GEMM", "combine", "dz·W", "dz·W + store dz", "dzᵀ·x", "chain all Triton", "chain dx stores dz"
)  # fmt: skip


def bench(fn) -> float:
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
    except Exception as e:  # noqa: BLE001 - a configuration that fails to compile is reported, not fatal
        print(f"    failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return float("nan")


def problem(rows, h, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, h, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=g) * (2 / h**0.5)).bfloat16()
    y = torch.randint(0, v, (rows,), device="cuda", generator=g)
    y[torch.rand(rows, device="cuda", generator=g) < 0.05] = -100
    kept = (y != -100).sum().clamp_min(1)
    share = torch.ones(rows, device="cuda") / kept  # the mean's row shares (computed on the device, no sync)
    return x, w, y, share


class Buffers:
    def __init__(self, rows, h, v, chunks):
        self.z = row_padded(rows, v, torch.bfloat16, torch.device("cuda"))  # today's logits / dz, in place
        self.zn = row_padded(rows, v, torch.bfloat16, torch.device("cuda"))  # the new path's logits
        self.dz = row_padded(rows, v, torch.bfloat16, torch.device("cuda"))  # "dx stores dz"
        self.gx = torch.empty(rows, h, dtype=torch.bfloat16, device="cuda")
        self.gw = torch.empty(v, h, dtype=torch.float32 if chunks > 1 else torch.bfloat16, device="cuda")
        self.loss = torch.empty(rows, device="cuda")
        self.lse = torch.empty(rows, device="cuda")
        self.accumulate = chunks > 1


def today(x, w, y, share, buf):
    logits_gemm(x, w, buf.z)
    cross_entropy_rows(buf.z, buf.z, None, y, None, (share, share), buf.loss, buf.lse, None, LP)
    input_grad_gemm(buf.z, w, buf.gx)
    weight_grad_gemm(buf.gw, buf.z, x, first=not buf.accumulate)


def new_forward(x, w, y, share, buf, cfg):
    stats = sg.logits_stats(x, w, None, y, buf.zn, LP, cfg)
    return sg.combine_stats(stats, y, LP, w.shape[0], (share, share))


def new_all_triton(x, w, y, share, buf, cfg):
    _, lse, coefs = new_forward(x, w, y, share, buf, cfg)
    sg.input_grad(buf.zn, w, y, lse, coefs, LP, buf.gx, None, cfg)
    sg.weight_grad(buf.zn, x, y, lse, coefs, LP, buf.gw, buf.accumulate, cfg)


def new_dx_stores_dz(x, w, y, share, buf, cfg):
    _, lse, coefs = new_forward(x, w, y, share, buf, cfg)
    sg.input_grad(buf.zn, w, y, lse, coefs, LP, buf.gx, buf.dz, cfg)
    weight_grad_gemm(buf.gw, buf.dz, x, first=not buf.accumulate)


def check(h, v, cfgs, rows=1024):
    """Errors of each path's loss, grad_x, grad_W at ``rows`` rows against fp32 math on the same bf16 inputs."""
    x, w, y, share = problem(rows, h, v, seed=1)
    xr, wr = (t.detach().float().clone().requires_grad_() for t in (x, w))
    loss_ref = F.cross_entropy(xr @ wr.T, y, reduction="none")
    loss_ref.backward(share)
    out = {}
    paths = {"today": today} | {f"all Triton {k}": new_all_triton for k in cfgs}
    paths |= {f"dx stores dz {k}": new_dx_stores_dz for k in cfgs}
    for name, fn in paths.items():
        buf = Buffers(rows, h, v, chunks=1)
        for t in (buf.gx, buf.gw, buf.zn, buf.dz):
            t.fill_(float("nan"))  # poisoned: every element must be written
        cfg = cfgs.get(name.split()[-1])
        try:
            (fn(x, w, y, share, buf) if cfg is None else fn(x, w, y, share, buf, cfg))
            loss = buf.loss if cfg is None else new_forward(x, w, y, share, buf, cfg)[0]
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        errs = [_rel(a, b) for a, b in ((loss, loss_ref), (buf.gx, xr.grad), (buf.gw, wr.grad))]
        out[name] = errs
        print(f"  {name}: loss {errs[0]:.2e}  grad_x {errs[1]:.2e}  grad_W {errs[2]:.2e}")
    return out


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def time_shape(n, h, v, rows, cfgs):
    chunks = -(-n // rows)
    x, w, y, share = problem(rows, h, v)
    vp = -(-v // 128) * 128
    wp = torch.nn.functional.pad(w, (0, 0, 0, vp - v))
    buf = Buffers(rows, h, v, chunks)
    zp = torch.randn(rows, vp, device="cuda").bfloat16()
    t = {
        "floor x·Wᵀ": bench(lambda: torch.mm(x, wp.T)),
        "floor dz·W": bench(lambda: torch.mm(zp, wp)),
        "floor dzᵀ·x": bench(lambda: torch.mm(zp.T, x)),
    }
    t["floor"] = t["floor x·Wᵀ"] + t["floor dz·W"] + t["floor dzᵀ·x"]
    t["today logits GEMM"] = bench(lambda: logits_gemm(x, w, buf.z))
    t["today row kernel"] = bench(
        lambda: cross_entropy_rows(buf.z, buf.z, None, y, None, (share, share), buf.loss, buf.lse, None, LP)
    )
    t["today dz·W"] = bench(lambda: input_grad_gemm(buf.z, w, buf.gx))
    t["today dzᵀ·x"] = bench(lambda: weight_grad_gemm(buf.gw, buf.z, x, first=not buf.accumulate))
    t["today chain"] = bench(lambda: today(x, w, y, share, buf))
    for key, cfg in cfgs.items():
        time_new(t, key, cfg, x, w, y, share, buf)
    for name, ms in t.items():
        print(f"  {name:32s} {ms:8.3f} ms  {ms / t['floor']:.3f}× chunk floor")
    return chunks, t


def time_new(t, key, cfg, x, w, y, share, buf):
    """The new pieces and chains of one configuration, into ``t``."""
    v = w.shape[0]
    for name in NEW_PIECES:
        t[f"{key} {name}"] = float("nan")
    try:
        _, lse, coefs = new_forward(x, w, y, share, buf, cfg)
        stats = sg.logits_stats(x, w, None, y, buf.zn, LP, cfg)
    except Exception as e:  # noqa: BLE001
        print(f"    {key}: forward failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return
    t[f"{key} stats GEMM"] = bench(lambda: sg.logits_stats(x, w, None, y, buf.zn, LP, cfg))
    t[f"{key} combine"] = bench(lambda: sg.combine_stats(stats, y, LP, v, (share, share)))
    t[f"{key} dz·W"] = bench(lambda: sg.input_grad(buf.zn, w, y, lse, coefs, LP, buf.gx, None, cfg))
    t[f"{key} dz·W + store dz"] = bench(lambda: sg.input_grad(buf.zn, w, y, lse, coefs, LP, buf.gx, buf.dz, cfg))
    t[f"{key} dzᵀ·x"] = bench(lambda: sg.weight_grad(buf.zn, x, y, lse, coefs, LP, buf.gw, buf.accumulate, cfg))
    t[f"{key} chain all Triton"] = bench(lambda: new_all_triton(x, w, y, share, buf, cfg))
    t[f"{key} chain dx stores dz"] = bench(lambda: new_dx_stores_dz(x, w, y, share, buf, cfg))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    cfgs = {k: VARIANTS[k] for k in args.variants}
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    rows_out = []
    for shape in args.shapes:
        n, h, v = (int(s) for s in shape.split("x"))
        print(f"{shape} (chunk {SHAPES.get(shape, n)} rows)")
        if not args.no_check:
            check(h, v, cfgs)
        chunks, t = time_shape(n, h, v, SHAPES.get(shape, n), cfgs)
        rows_out.append((shape, chunks, t))
        summary(rows_out[-1:], cfgs)  # this shape's row now, in case a time limit stops the run
        torch.cuda.empty_cache()
    summary(rows_out, cfgs)


def summary(rows_out, cfgs):
    """Per chunk, ×(the chunk's floor): today's chain, each new chain, and the best new one's gain on a full step."""
    print("\n| N×H×V | chunks | floor ms/chunk | today | " + " | ".join(
        f"{k} all Triton | {k} dx stores dz" for k in cfgs) + " | best new vs today | best pieces |")  # fmt: skip
    print("|---" * (4 + 2 * len(cfgs) + 2) + "|")
    for shape, chunks, t in rows_out:
        floor = t["floor"]
        new = {k: t[k] for k in t if "chain all" in k or "chain dx" in k}
        best = min(new.values(), default=float("nan"))
        cells = " | ".join(
            f"{t[f'{k} chain all Triton'] / floor:.3f} | {t[f'{k} chain dx stores dz'] / floor:.3f}" for k in cfgs
        )
        print(f"| {shape} | {chunks} | {floor:.3f} | {t['today chain'] / floor:.3f} | {cells} | "
              f"{(best - t['today chain']) * chunks:+.2f} ms/step | {best_pieces(t, cfgs) / floor:.3f} |")  # fmt: skip


def best_pieces(t, cfgs) -> float:
    """The fastest configuration of each new piece put together (all Triton), as a chain would add them."""
    piece = lambda name: min((t[f"{k} {name}"] for k in cfgs), default=float("nan"))  # noqa: E731
    return piece("stats GEMM") + piece("combine") + piece("dz·W") + piece("dzᵀ·x")


if __name__ == "__main__":
    main()
