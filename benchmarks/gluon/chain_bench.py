"""Per-chunk chain with the Gluon stats GEMM against today's fused chain (issue 20, after v14), on the GPU machine.

    cd /work/main && PYTHONPATH=src python benchmarks/gluon/chain_bench.py [--config default|wide] [--shapes ...]

Per chunk of the fused default's size (``benchmarks/bench_softmax_gemm_gpu.py``'s ``SHAPES``: 4096 rows of
16384x896x151936 and 8192x2048x128256, 2048 of 8192x768x50257), bf16, 5% ignored targets:

- floor: the three cuBLAS GEMMs (``x·Wᵀ``, ``dz·W``, ``dzᵀ·x``; V padded to 128) — ``bench.time_shape``;
- today: cuBLAS logits GEMM → row kernel (both sweeps, ``dz`` in place) → cuBLAS ``dz·W`` and ``grad_W (+)= dzᵀ·x``
  (fp32 scratch: every shape here runs several chunks) — ``bench.today`` / ``bench.time_shape``;
- new: Gluon ping-pong stats GEMM (``stats_gemm.py``: z in bf16 + per-(128-class tile, row) partials) → combine
  (``combine.py``: into the ``lse (r,)`` / ``coefs (r, 3)`` that ``rows.cross_entropy_grad`` reads, as
  ``chunks._sharded_rows`` forms them; a one-launch Triton kernel, and the library's torch functions for
  comparison) → the row kernel's sweep 2 alone (``cross_entropy_grad``, ``dz`` in place) → the same two cuBLAS
  GEMMs.

Steps, each in its own subprocess with a time limit (a hang or crash costs only that step): (1) per shape, at 1024
rows, loss / grad_x / grad_W of today's chain and of the new one against float64 autograd (without and with label
smoothing 0.1), the two combines against each other, today's ``dz`` against the new one; (2) per shape, timings
(``triton.testing.do_bench`` medians, via the bench's ``bench``): the floor and today's pieces and chain
(``bench.time_shape``), then the new pieces and chains. A table last: ms per chunk and × the chunk floor.
Total about 2-3 minutes (first compiles included) if nothing hangs.
"""

import argparse
import os
import sys
import time

import harness  # this folder's GPU-script driver (the script's own folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
SHAPES = ["16384x896x151936", "8192x2048x128256", "8192x768x50257"]
LIMITS = {"check": 150, "time": 150}  # seconds per process
CHECK_ROWS = 1024

# ----------------------------------------------------------------------------------------------------- worker side


def _setup():
    for p in (HERE, os.path.join(REPO, "benchmarks"), os.path.join(REPO, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import bench_softmax_gemm_gpu as bench  # the floor, today's chain, problem(), Buffers, bench(), LP, SHAPES
    import combine
    import stats_gemm
    import torch

    return torch, bench, stats_gemm, combine


class NewBuffers:
    """The new chain's own per-chunk buffers (the logits / dz buffer is ``bench.Buffers.zn``)."""

    def __init__(self, torch, sg, rows, v, cfg):
        dev = "cuda"
        self.partials = torch.empty((3, sg.stats_tiles(v, cfg), rows), dtype=torch.float32, device=dev)
        self.z_y = torch.empty(rows, dtype=torch.float32, device=dev)
        self.loss = torch.empty(rows, dtype=torch.float32, device=dev)
        self.lse = torch.empty(rows, dtype=torch.float32, device=dev)
        self.coefs = torch.empty((rows, 3), dtype=torch.float32, device=dev)  # (r, 3): what sweep 2 reads

    def poison(self):
        for t in (self.partials, self.z_y, self.loss, self.lse, self.coefs):
            t.fill_(float("nan"))


def new_chain(mods, x, w, y, share, buf, nb, lp, cfg, combine_fn=None):
    """Gluon stats GEMM → combine → sweep 2 (``dz`` over the logits) → cuBLAS ``dz·W``, ``grad_W (+)= dzᵀ·x``."""
    torch, bench, sg, gc = mods
    from linear_cross_entropy.backends.fused.gemm import input_grad_gemm, weight_grad_gemm
    from linear_cross_entropy.backends.fused.rows import cross_entropy_grad

    v = w.shape[0]
    sg.stats_gemm(x, w, None, y, lp.label_smoothing > 0, buf.zn, cfg, nb.partials, nb.z_y)
    (combine_fn or gc.combine_triton)(nb.partials, nb.z_y, y, lp, v, (share, share), nb.loss, nb.lse, nb.coefs)
    cross_entropy_grad(buf.zn, buf.zn, None, y, None, nb.lse, nb.coefs, lp, 0, v)
    input_grad_gemm(buf.zn, w, buf.gx)
    weight_grad_gemm(buf.gw, buf.zn, x, first=not buf.accumulate)


def today_lp(x, w, y, share, buf, lp):
    """``bench.today`` with another LossParams (label smoothing)."""
    from linear_cross_entropy.backends.fused.gemm import input_grad_gemm, logits_gemm, weight_grad_gemm
    from linear_cross_entropy.backends.fused.rows import cross_entropy_rows

    logits_gemm(x, w, buf.z)
    cross_entropy_rows(buf.z, buf.z, None, y, None, (share, share), buf.loss, buf.lse, None, lp)
    input_grad_gemm(buf.z, w, buf.gx)
    weight_grad_gemm(buf.gw, buf.z, x, first=not buf.accumulate)


def _config(sg, name):
    return {"default": sg.DEFAULT, "wide": sg.WIDE}[name]


def step_check(shape, cfg_name):
    mods = _setup()
    torch, bench, sg, gc = mods
    import dataclasses

    import torch.nn.functional as F

    cfg = _config(sg, cfg_name)
    _, h, v = (int(s) for s in shape.split("x"))
    x, w, y, share = bench.problem(CHECK_ROWS, h, v, seed=1)
    for eps in (0.0, 0.1):
        lp = dataclasses.replace(bench.LP, label_smoothing=eps)
        xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
        loss_ref = F.cross_entropy(xr @ wr.T, y, reduction="none", ignore_index=lp.ignore_index, label_smoothing=eps)
        loss_ref.backward(share.double())
        errs = {}
        buf_t = bench.Buffers(CHECK_ROWS, h, v, chunks=1)
        buf_n = bench.Buffers(CHECK_ROWS, h, v, chunks=1)
        nb = NewBuffers(torch, sg, CHECK_ROWS, v, cfg)
        for b in (buf_t, buf_n):
            for t in (b.gx, b.gw, b.z, b.zn, b.loss, b.lse):
                t.fill_(float("nan"))  # poisoned: every element must be written
        nb.poison()
        for name in ("today", "new"):
            b = buf_t if name == "today" else buf_n
            try:
                if name == "new":
                    new_chain(mods, x, w, y, share, buf_n, nb, lp, cfg)
                elif eps == 0:
                    bench.today(x, w, y, share, buf_t)
                else:
                    today_lp(x, w, y, share, buf_t, lp)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - reported; a CUDA error ends the process (the driver goes on)
                text = str(e).strip()
                print(
                    f"  FAIL {shape} eps={eps} {name}: {type(e).__name__}: {text.splitlines()[-1][:300] if text else ''}",
                    flush=True,
                )
                if "CUDA" in text or "illegal" in text or "Accelerator" in type(e).__name__:
                    sys.exit(3)
                continue
            loss = buf_t.loss if name == "today" else nb.loss
            errs[name] = [bench._rel(a, r) for a, r in ((loss, loss_ref), (b.gx, xr.grad), (b.gw, wr.grad))]
            print(
                f"  {shape} eps={eps} {name:5s} vs float64: loss {errs[name][0]:.2e}  grad_x {errs[name][1]:.2e}  "
                f"grad_W {errs[name][2]:.2e}",
                flush=True,
            )
        if len(errs) < 2:
            harness.result(dict(kind="check", shape=shape, eps=eps, ok=False))
            continue
        ratios = [a / b if b > 0 else float("nan") for a, b in zip(errs["new"], errs["today"])]
        same = all(abs(r - 1) <= 0.05 for r in ratios)  # equal to ~2 significant digits
        # what differs between the chains: the logits (Gluon vs cuBLAS: fp32 summation order → rare 1-ulp flips),
        # the lse (tile partials combined vs the row kernel's online sum), hence dz
        dz_t, dz_n = buf_t.z.float(), buf_n.zn.float()
        dz_off = (dz_t != dz_n).float().mean().item()
        dz_max = (dz_t - dz_n).abs().max().item() / dz_t.abs().max().item()
        lse_d = (nb.lse - buf_t.lse).abs().max().item()
        # the two combines on the same partials
        nb2 = NewBuffers(torch, sg, CHECK_ROWS, v, cfg)
        nb2.poison()
        sg.stats_gemm(x, w, None, y, eps > 0, buf_n.zn, cfg, nb2.partials, nb2.z_y)
        gc.combine_triton(nb2.partials, nb2.z_y, y, lp, v, (share, share), nb2.loss, nb2.lse, nb2.coefs)
        lt, st, ct = nb2.loss.clone(), nb2.lse.clone(), nb2.coefs.clone()
        gc.combine_torch(nb2.partials, nb2.z_y, y, lp, v, (share, share), nb2.loss, nb2.lse, nb2.coefs)
        comb = [(a - b).abs().max().item() for a, b in ((lt, nb2.loss), (st, nb2.lse), (ct, nb2.coefs))]
        nan_new = sum(torch.isnan(t).sum().item() for t in (nb.loss, nb.lse, nb.coefs, buf_n.gx, buf_n.gw))
        ok = same and nan_new == 0 and max(comb) <= 1e-5
        print(
            f"  {'PASS' if ok else 'FAIL'} {shape} eps={eps}: new/today error ratios "
            f"{' '.join(f'{r:.3f}' for r in ratios)} ({'same to ~2 digits' if same else 'DIFFERENT'}); NaN in new "
            f"outputs {nan_new}; dz new vs today: ≠ {dz_off:.2e} of entries, max |Δ|/max|dz| {dz_max:.1e}; lse max "
            f"|Δ| {lse_d:.1e}; combine Triton vs torch max |Δ| loss {comb[0]:.1e} lse {comb[1]:.1e} coefs "
            f"{comb[2]:.1e}",
            flush=True,
        )
        harness.result(dict(kind="check", shape=shape, eps=eps, ok=ok, errs=errs))
        del buf_t, buf_n, nb, nb2, xr, wr, loss_ref, dz_t, dz_n
        torch.cuda.empty_cache()


def step_time(shape, cfg_name):
    mods = _setup()
    torch, bench, sg, gc = mods
    from linear_cross_entropy.backends.fused.rows import cross_entropy_grad

    cfg = _config(sg, cfg_name)
    n, h, v = (int(s) for s in shape.split("x"))
    rows = bench.SHAPES[shape]
    print(f"{shape}: chunks of {rows} rows; floor and today (bench.time_shape):", flush=True)
    chunks, t = bench.time_shape(n, h, v, rows, {})
    torch.cuda.empty_cache()
    x, w, y, share = bench.problem(rows, h, v)
    buf = bench.Buffers(rows, h, v, chunks)
    nb = NewBuffers(torch, sg, rows, v, cfg)
    lp, shares = bench.LP, (share, share)
    new_chain(mods, x, w, y, share, buf, nb, lp, cfg)  # compiles; leaves valid partials / lse / coefs
    torch.cuda.synchronize()
    new = {
        "new stats GEMM": lambda: sg.stats_gemm(x, w, None, y, False, buf.zn, cfg, nb.partials, nb.z_y),
        "new combine (Triton)": lambda: gc.combine_triton(
            nb.partials, nb.z_y, y, lp, v, shares, nb.loss, nb.lse, nb.coefs
        ),
        "new combine (torch)": lambda: gc.combine_torch(
            nb.partials, nb.z_y, y, lp, v, shares, nb.loss, nb.lse, nb.coefs
        ),
        # in place over and over, as the bench times today's row kernel: the same work whatever the values
        "new sweep 2": lambda: cross_entropy_grad(buf.zn, buf.zn, None, y, None, nb.lse, nb.coefs, lp, 0, v),
        "new chain": lambda: new_chain(mods, x, w, y, share, buf, nb, lp, cfg),
        "new chain (torch combine)": lambda: new_chain(mods, x, w, y, share, buf, nb, lp, cfg, gc.combine_torch),
    }
    for name, fn in new.items():
        t[name] = bench.bench(fn)
    for name in new:
        print(f"  {name:32s} {t[name]:8.3f} ms  {t[name] / t['floor']:.3f}× chunk floor", flush=True)
    harness.result(dict(kind="time", shape=shape, chunks=chunks, rows=rows, t=t))


# ----------------------------------------------------------------------------------------------------- driver side


ROWS = [  # (label, key in t, or a function of t)
    ("floor: x·Wᵀ + dz·W + dzᵀ·x (cuBLAS)", "floor"),
    ("today: logits GEMM (cuBLAS)", "today logits GEMM"),
    ("today: row kernel, both sweeps", "today row kernel"),
    ("dz·W (cuBLAS; the same in both chains)", "today dz·W"),
    ("dzᵀ·x, fp32 += (cuBLAS; the same in both)", "today dzᵀ·x"),
    ("**today, chained**", "today chain"),
    ("new: Gluon stats GEMM", "new stats GEMM"),
    ("new: combine, Triton (1 launch)", "new combine (Triton)"),
    ("new: combine, torch (library functions)", "new combine (torch)"),
    ("new: row kernel, sweep 2 only", "new sweep 2"),
    (
        "new: pieces summed (Triton combine)",
        lambda t: (
            t["new stats GEMM"] + t["new combine (Triton)"] + t["new sweep 2"] + t["today dz·W"] + t["today dzᵀ·x"]
        ),
    ),
    ("**new, chained** (Triton combine)", "new chain"),
    ("new, chained (torch combine)", "new chain (torch combine)"),
    ("today: logits GEMM + row kernel", lambda t: t["today logits GEMM"] + t["today row kernel"]),
    (
        "new: stats GEMM + combine + sweep 2",
        lambda t: t["new stats GEMM"] + t["new combine (Triton)"] + t["new sweep 2"],
    ),
]


def _table(times, shapes):
    harness.chunk_table(times, shapes, ROWS)
    cells = []
    for s in shapes:
        if s not in times:
            cells.append("—")
            continue
        t, c = times[s]["t"], times[s]["chunks"]
        cells.append(f"{(t['new chain'] - t['today chain']) * c:+.2f} ms/step ({c} chunks)")
    print("| new − today, whole step | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default", choices=["default", "wide"])
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        kind, shape = args.step.split(":")
        return (step_check if kind == "check" else step_time)(shape, args.config)

    t0 = time.time()
    print(harness.device_line() + f"; Gluon stats GEMM config: {args.config}")
    checks, times = [], {}
    if not args.no_check:
        print(f"== correctness at {CHECK_ROWS} rows (against float64 autograd)", flush=True)
        for s in args.shapes:
            res, _ = harness.run_step(__file__, ["--step", f"check:{s}", "--config", args.config], LIMITS["check"])
            checks += res
    print("== timings (do_bench medians, per chunk)", flush=True)
    for s in args.shapes:
        res, _ = harness.run_step(__file__, ["--step", f"time:{s}", "--config", args.config], LIMITS["time"])
        for r in res:
            times[r["shape"]] = r
    if not args.no_check:
        verdicts = ", ".join(f"{r['shape']} eps={r['eps']} {'PASS' if r['ok'] else 'FAIL'}" for r in checks)
        print("\n== correctness: " + (verdicts or "no result (see above)"))
    _table(times, args.shapes)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
