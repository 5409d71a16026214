r"""Issue 20, v16: one chunk of the library's factored row pass (``backends/fused/factored*.py``: ``dz`` as a row
scale times the exponential the logits GEMM's epilogue stores, the math in ``factored_kernels.py``) against
today's chain (cuBLAS logits GEMM, row kernel, cuBLAS gradient GEMMs), on the GPU machine.

    cd /work/main && PYTHONPATH=src python benchmarks/gluon/exp_chain.py [--shapes ...] [--no-check]

Steps, each in a subprocess with a time limit: (1) correctness at 1024 rows against float64 autograd, beside
today's chain and eager bf16, and a row beyond the window (its largest logit far above the target logit: refitted);
(2) timings per chunk (``do_bench`` medians): floor, today's chain (``bench.time_shape``), the factored forward
(target logits, exponential GEMM, combine, refit), its gradient step (cuBLAS ``E'·W`` and ``E'ᵀ·(r ⊙ x)``, the
target column's kernels) and the chain, with the Gluon GEMM and with the plain-Triton one (``factored_gluon.runs_on``
switched off). A table last.
"""

import argparse
import os
import sys
import time

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
SHAPES = ["16384x896x151936", "16384x1536x151936", "8192x2048x128256", "8192x768x50257", "8192x4096x128256"]
LIMITS = {"check": 150, "time": 200}
CHECK_ROWS = 1024


_RUNS_ON = None  # factored_gluon.runs_on as imported (the chains switch it to force the plain-Triton GEMM)
LP = None


def _setup():
    global _RUNS_ON, LP
    for p in (HERE, os.path.join(REPO, "benchmarks"), os.path.join(REPO, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import bench_softmax_gemm_gpu as bench
    import torch

    from linear_cross_entropy.backends.fused import factored_gluon

    _RUNS_ON = _RUNS_ON or factored_gluon.runs_on
    LP = bench.LP
    return torch, bench, None


class Chain:
    """One chunk of the library's factored pass (``backends/fused/factored.py``), with its GEMM chosen."""

    def __init__(self, torch, x, w, y, share, rows, accumulate, gemm="gluon"):
        from linear_cross_entropy.backends.fused import factored

        self.torch, self.factored, self.gemm = torch, factored, gemm
        self.x, self.w, self.y, self.share = x, w, y, share
        self.ws = factored.allocate(rows, x, w.shape[0], None, smoothing=False, rank_one_rows=False)
        self.buf = self.ws.chunk(0, rows)
        self.loss = torch.empty(rows, dtype=torch.float32, device=x.device)
        self.lse = torch.empty(rows, dtype=torch.float32, device=x.device)
        # one spare row in front: with an fp32 scratch the chunk runs as a later chunk (start 1: accumulating)
        self.start = 1 if accumulate else 0
        self.gx_all = torch.empty((rows + self.start, x.shape[1]), dtype=x.dtype, device=x.device)
        self.gx = self.gx_all[self.start :]
        self.gw = torch.empty(w.shape, dtype=torch.float32 if accumulate else x.dtype, device=x.device)
        self.accumulate = accumulate

    def poison(self):
        for t in (self.buf.e, self.buf.partials, self.loss, self.lse, self.gx, self.gw):
            t.fill_(float("nan"))

    def _use_gemm(self):
        from linear_cross_entropy.backends.fused import factored_gluon

        factored_gluon.runs_on = _RUNS_ON if self.gemm == "gluon" else (lambda x: False)

    def forward(self):
        self._use_gemm()
        share = (self.share, self.share)
        self.factored.forward_chunk(
            self.x, self.w, None, self.y, None, share, LP, self.buf, self.loss, self.lse, smoothing=None
        )

    def grads(self):
        self.factored.gradient_gemms(
            self.gx_all, self.gw, None, self.buf, self.w, self.x, self.y, self.start, smoothing=None
        )
        self.factored.target_column_grads(self.gw, None, self.ws.target_grad, self.x, self.y, self.w.shape[0])

    def run(self):
        self.forward()
        self.grads()


def step_check(shape):
    torch, bench, sg = _setup()
    import torch.nn.functional as F

    _, h, v = (int(s) for s in shape.split("x"))
    x, w, y, share = bench.problem(CHECK_ROWS, h, v, seed=1)
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    loss_ref = F.cross_entropy(xr @ wr.T, y, reduction="none", ignore_index=-100)
    loss_ref.backward(share.double())
    buf = bench.Buffers(CHECK_ROWS, h, v, chunks=1)
    for t in (buf.gx, buf.gw, buf.z, buf.loss, buf.lse):
        t.fill_(float("nan"))
    bench.today(x, w, y, share, buf)
    torch.cuda.synchronize()
    errs = {"today": [bench._rel(a, r) for a, r in ((buf.loss, loss_ref), (buf.gx, xr.grad), (buf.gw, wr.grad))]}
    # eager bf16 (the library's accuracy contract): F.linear + F.cross_entropy in bf16
    xe, we = (t.detach().clone().requires_grad_() for t in (x, w))
    le = F.cross_entropy(xe @ we.T, y, reduction="none", ignore_index=-100)
    le.backward(share.to(le.dtype))
    errs["eager"] = [bench._rel(a, r) for a, r in ((le.detach(), loss_ref), (xe.grad, xr.grad), (we.grad, wr.grad))]
    ok = True
    for gemm in ("gluon", "triton"):
        ch = Chain(torch, x, w, y, share, CHECK_ROWS, accumulate=False, gemm=gemm)
        ch.poison()
        try:
            ch.run()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            text = str(e).strip().splitlines()
            print(f"  FAIL {shape} {gemm}: {type(e).__name__}: {text[-1][:300] if text else ''}", flush=True)
            ok = False
            if "CUDA" in str(e) or "illegal" in str(e):
                sys.exit(3)
            continue
        errs[gemm] = [bench._rel(a, r) for a, r in ((ch.loss, loss_ref), (ch.gx, xr.grad), (ch.gw, wr.grad))]
        nan = sum(torch.isnan(t).sum().item() for t in (ch.loss, ch.gx, ch.gw))
        flagged = ch.buf.refit.sum().item()
        lse_d = (ch.lse - buf.lse).abs().max().item()
        ok &= nan == 0 and flagged == 0 and all(a <= 1.5 * b for a, b in zip(errs[gemm][1:], errs["today"][1:]))
        print(f"  {shape} {gemm}: NaN {nan}, flagged rows {flagged}, lse vs today max |Δ| {lse_d:.1e}", flush=True)
    for name, e in errs.items():
        print(f"  {shape} {name:6s} vs float64: loss {e[0]:.2e}  grad_x {e[1]:.2e}  grad_W {e[2]:.2e}", flush=True)
    print(f"  {'PASS' if ok else 'FAIL'} {shape}", flush=True)
    harness.result(dict(kind="check", shape=shape, ok=ok, errs=errs))

    # a row beyond the window: its target logit far below the max (refitted, lse still exact)
    ch = Chain(torch, x.clone(), w, y, share, CHECK_ROWS, accumulate=False, gemm="gluon")
    ch.x[3] *= 60  # logits of row 3 scaled: max − z_y far beyond the window (factored.CLAMP)
    ch.run()
    torch.cuda.synchronize()
    xr = ch.x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    lref = F.cross_entropy(xr @ wr.T, y, reduction="none", ignore_index=-100)
    lref.backward(share.double())
    print(
        f"  window: row 3 refitted {bool(ch.buf.refit[3].item())}, refitted total {ch.buf.refit.sum().item()}, "
        f"lse max rel err {((ch.lse.double() - torch.logsumexp(xr.detach() @ wr.detach().T, 1)).abs()).max().item():.1e}, "
        f"grad_x row 3 rel err {bench._rel(ch.gx[3], xr.grad[3]):.1e}, grad_W {bench._rel(ch.gw, wr.grad):.1e}",
        flush=True,
    )


def step_time(shape):
    torch, bench, sg = _setup()
    n, h, v = (int(s) for s in shape.split("x"))
    rows = bench.SHAPES.get(shape, 4096 if v > 100000 else 2048)
    print(f"{shape}: chunks of {rows} rows; floor and today (bench.time_shape):", flush=True)
    chunks, t = bench.time_shape(n, h, v, rows, {})
    torch.cuda.empty_cache()
    x, w, y, share = bench.problem(rows, h, v)
    for gemm in ("gluon", "triton"):
        ch = Chain(torch, x, w, y, share, rows, accumulate=chunks > 1, gemm=gemm)
        ch.run()
        torch.cuda.synchronize()
        pieces = {"forward": ch.forward, "grads": ch.grads}
        for name, fn in pieces.items():
            t[f"{gemm} {name}"] = bench.bench(fn)
        t[f"{gemm} chain"] = bench.bench(ch.run)
        for name in [*pieces, "chain"]:
            k = f"{gemm} {name}"
            print(f"  {k:32s} {t[k]:8.3f} ms  {t[k] / t['floor']:.3f}× chunk floor", flush=True)
        del ch
        torch.cuda.empty_cache()
    harness.result(dict(kind="time", shape=shape, chunks=chunks, rows=rows, t=t))


def step_pieces(shape):
    """The gradient step's pieces alone, one chunk (accumulating where the shape runs several), beside cuBLAS's
    same GEMMs on today's ``dz``: which piece holds the step's excess over today's two GEMMs. The pieces run one
    ``do_bench`` loop after another, which drifts with the GPU's power state by up to ±15% at the 700 W cap (NOTES,
    v17): compare GEMMs of similar cost with ``exp_gemm_ab.py``'s interleaved windows instead."""
    torch, bench, sg = _setup()
    from linear_cross_entropy.backends.fused import factored, factored_gluon
    from linear_cross_entropy.backends.fused.factored_kernels import _input_grad_rows_kernel
    from linear_cross_entropy.backends.fused.gemm import input_grad_gemm, weight_grad_gemm

    n, h, v = (int(s) for s in shape.split("x"))
    rows = bench.SHAPES.get(shape, 4096 if v > 100000 else 2048)
    chunks = -(-n // rows)
    x, w, y, share = bench.problem(rows, h, v)
    tbuf = bench.Buffers(rows, h, v, chunks)
    bench.today(x, w, y, share, tbuf)  # tbuf.z: today's dz
    ch = Chain(torch, x, w, y, share, rows, accumulate=chunks > 1, gemm="gluon")
    sched = ch.factored.schedule(rows, x, v)
    ch.run()
    torch.cuda.synchronize()
    buf, gw = ch.buf, ch.gw
    first = chunks == 1
    block_h = min(1024, 1 << (h - 1).bit_length())

    def rows_kernel(with_x):
        _input_grad_rows_kernel[(rows,)](
            buf.product, w, x if with_x else None, y, buf.scale, buf.target_grad, None, None, ch.gx, v, h,
            buf.product.stride(0), w.stride(0), x.stride(0), ch.gx.stride(0),
            BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip

    def combine(block_r, block_t, warps):
        def run():
            factored._COMBINE_BLOCK_R, factored._COMBINE_BLOCK_T, factored._COMBINE_WARPS = block_r, block_t, warps
            factored.combine(x, w, None, y, None, (share, share), LP, None, buf, ch.loss, ch.lse, sched)

        return run

    def gluon_gemm(group_m, stages):
        def run():
            factored_gluon._STAGES = stages
            factored_gluon.exp_logits(
                x, w, None, buf.shift, 1.0, factored.CLAMP, buf.e, buf.partials, sched.workers, group_m
            )

        return run

    pieces = {
        "cuBLAS dz·W (today's dz)": lambda: input_grad_gemm(tbuf.z, w, tbuf.gx),
        "cuBLAS E'·W": lambda: input_grad_gemm(buf.e, w, buf.product),
        "grad_x rows kernel": lambda: rows_kernel(False),
        "grad_x rows kernel + r ⊙ x": lambda: rows_kernel(True),
        "r ⊙ x": lambda: torch.mul(x, buf.scale[:, None], out=buf.product),
        "cuBLAS dzᵀ·x (today's dz)": lambda: weight_grad_gemm(gw, tbuf.z, x, first=first),
        "cuBLAS E'ᵀ·(r⊙x)": lambda: weight_grad_gemm(gw, buf.e, buf.product, first=first),
        "cuBLAS E'ᵀ·x": lambda: weight_grad_gemm(gw, buf.e, x, first=first),
        "cuBLAS dzᵀ·(r⊙x)": lambda: weight_grad_gemm(gw, tbuf.z, buf.product, first=first),
        "target columns (sort + kernel, once a call)": lambda: factored.target_column_grads(
            gw, None, ch.ws.target_grad, x, y, v
        ),
        "gradient step (library)": ch.grads,
        "cuBLAS logits GEMM": lambda: torch.mm(x, w.T, out=tbuf.z),
    }
    for g, st in ((8, 4), (8, 5), (4, 4), (4, 5)):  # the schedule's groups divide its workers: at most 8
        pieces[f"Gluon exp GEMM GROUP_M={g} stages={st}"] = gluon_gemm(g, st)
    for br, bt, nw in ((16, 64, 4), (32, 64, 4), (64, 32, 4), (32, 128, 8), (64, 64, 8)):
        pieces[f"combine {br}x{bt}, {nw} warps"] = combine(br, bt, nw)
    t = {"floor": bench.time_shape(n, h, v, rows, {})[1]["floor"]}
    print(f"{shape}: {rows} rows a chunk, {chunks} chunks", flush=True)
    for name, fn in pieces.items():
        t[name] = bench.bench(fn)
        print(f"  {name:32s} {t[name]:8.3f} ms", flush=True)
    harness.result(dict(kind="pieces", shape=shape, chunks=chunks, rows=rows, t=t))


ROWS = [
    ("floor (3 cuBLAS GEMMs)", "floor"),
    ("today: logits GEMM", "today logits GEMM"),
    ("today: row kernel", "today row kernel"),
    ("today: dz·W + dzᵀ·x", lambda t: t["today dz·W"] + t["today dzᵀ·x"]),
    ("**today, chained**", "today chain"),
    ("factored: forward (z_y, Gluon exp GEMM, combine, refit)", "gluon forward"),
    ("factored: E'·W, E'ᵀ·(r⊙x), target rows", "gluon grads"),
    ("**factored (Gluon), chained**", "gluon chain"),
    ("factored: forward with the Triton exp GEMM", "triton forward"),
    ("factored (Triton GEMM), chained", "triton chain"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--pieces", action="store_true", help="time the gradient step's pieces alone instead")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        kind, shape = args.step.split(":")
        return {"check": step_check, "time": step_time, "pieces": step_pieces}[kind](shape)
    t0 = time.time()
    print(harness.device_line())
    if args.pieces:
        times = {}
        for s in args.shapes:
            for r in harness.run_step(__file__, ["--step", f"pieces:{s}"], LIMITS["time"])[0]:
                times[r["shape"]] = r
        names = next(iter(times.values()))["t"] if times else {}
        harness.chunk_table(times, args.shapes, [(k, k) for k in names])
        return
    checks, times = [], {}
    if not args.no_check:
        print(f"== correctness at {CHECK_ROWS} rows (against float64 autograd)", flush=True)
        for s in args.shapes[:3]:
            res, _ = harness.run_step(__file__, ["--step", f"check:{s}"], LIMITS["check"])
            checks += res
    print("== timings (do_bench medians, per chunk)", flush=True)
    for s in args.shapes:
        res, _ = harness.run_step(__file__, ["--step", f"time:{s}"], LIMITS["time"])
        for r in res:
            times[r["shape"]] = r
    if checks:
        print("\n== correctness: " + ", ".join(f"{r['shape']} {'PASS' if r['ok'] else 'FAIL'}" for r in checks))
    harness.chunk_table(times, args.shapes, ROWS)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
