r"""Issue 20, v16: the per-chunk chain with ``dz`` factored as a row scale times a stored exponential, so that the
logits GEMM's epilogue writes everything the two cuBLAS gradient GEMMs read and no pass over the logits remains.

    cd /work/main && PYTHONPATH=src python benchmarks/gluon/exp_chain.py [--shapes ...] [--no-check]

The math. For a row with target ``y``, shift ``c`` (any finite number; here the target logit ``z_y``, computed
beforehand as one dot product per row) and ``S = Σ_v exp(z_v − c)``: ``lse = c + log S`` and::

    dz_v = coef·exp(z_v − lse) − T·[v = y] = r·(E_v − [v = y]·T/r),   E_v = exp(z_v − c),   r = coef·exp(c − lse)

So the logits GEMM stores ``E`` (instead of ``z``) and per-(tile, row) partial sums; a one-launch combine turns
them into ``lse``, the loss and ``r``, and patches the target column ``E_y −= T/r`` (one element per row). Then::

    grad_x = r ⊙ (E'·W)          (cuBLAS, fp32 out, scaled and rounded once)
    grad_W (+)= E'ᵀ·(r ⊙ x)      (cuBLAS; r ⊙ x rounded to bf16: N·H elements)

Range: with ``c = z_y``, ``E ≤ exp(max_v z_v − z_y)`` and ``T/r = S`` (no z-loss). A row whose largest logit
exceeds its target logit by more than ``CLAMP`` nats (its ``p_y < e^−CLAMP``) cannot be stored this way (E would
overflow bf16, ``r ⊙ x`` underflow); the epilogue then shifts that tile by its own max (partials ``o_t > 0``) so
the combine still gets the exact ``lse``, and the row is flagged for a recomputation (counted here; the library
would recompute such rows' ``dz`` with ``r = 1``).

Steps, each in a subprocess with a time limit: (1) correctness at 1024 rows against float64 autograd, beside
today's chain; (2) timings per chunk (``do_bench`` medians): floor, today's chain (``bench.time_shape``), the new
pieces and chain with the Gluon ping-pong GEMM and with a plain-Triton GEMM of the same epilogue.
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
CLAMP = 50.0


def _setup():
    for p in (HERE, os.path.join(REPO, "benchmarks"), os.path.join(REPO, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import bench_softmax_gemm_gpu as bench
    import stats_gemm
    import torch

    return torch, bench, stats_gemm


# ------------------------------------------------------------------------------------------------ kernels (Triton)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _shift_kernel(
    x_ptr,  # (r, H)
    w_ptr,  # (V, H)
    target_ptr,  # (r,) int64
    shift_ptr,  # (r,) fp32: z_y, 0 where ignored or out of range; written
    n_classes,
    n_features,
    stride_x,
    stride_w,
    ignore_index,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(target_ptr + row)
    ok = (y != ignore_index) & (y >= 0) & (y < n_classes)
    y = tl.where(ok, y, 0)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in range(0, n_features, BLOCK_H):
        offs = k + tl.arange(0, BLOCK_H)
        m = offs < n_features
        a = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(w_ptr + y * stride_w + offs, mask=m, other=0.0).to(tl.float32)
        acc += a * b
    tl.store(shift_ptr + row, tl.where(ok, tl.sum(acc, axis=0), 0.0))


@triton.jit
def _combine_kernel(
    partials_ptr,  # (2, tiles, r) fp32: o_t, s_t
    shift_ptr,  # (r,) fp32
    target_ptr,  # (r,) int64
    share_ptr,  # (r,) fp32: the row's share s of the upstream gradient
    e_ptr,  # (r, V) bf16: E, patched at the target column
    loss_ptr,  # (r,) fp32
    lse_ptr,  # (r,) fp32
    scale_ptr,  # (r,) fp32: r
    flag_ptr,  # (r,) int32: 1 where the row needs a recomputation
    n_rows,
    n_tiles,
    n_classes,
    stride_e,
    ignore_index,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    plane = n_tiles.to(tl.int64) * n_rows
    offs_t = tl.arange(0, BLOCK_T)
    big_o = tl.zeros([BLOCK_R], tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + offs_t
        mask = (t < n_tiles)[:, None] & row_mask[None, :]
        o_t = tl.load(partials_ptr + t.to(tl.int64)[:, None] * n_rows + rows[None, :], mask=mask, other=0.0)
        big_o = tl.maximum(big_o, tl.max(o_t, axis=0))
    big_s = tl.zeros([BLOCK_R], tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + offs_t
        mask = (t < n_tiles)[:, None] & row_mask[None, :]
        offs = t.to(tl.int64)[:, None] * n_rows + rows[None, :]
        o_t = tl.load(partials_ptr + offs, mask=mask, other=0.0)
        s_t = tl.load(partials_ptr + plane + offs, mask=mask, other=0.0)
        big_s += tl.sum(s_t * tl.exp(o_t - big_o[None, :]), axis=0)
    shift = tl.load(shift_ptr + rows, mask=row_mask, other=0.0)
    y = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    keep = y != ignore_index
    bad = keep & ((y < 0) | (y >= n_classes))
    log_s = tl.log(big_s)
    lse = shift + big_o + log_s
    nan = float("nan")
    loss = tl.where(bad, nan, tl.where(keep, big_o + log_s, 0.0))  # lse − z_y with z_y = shift
    s = tl.load(share_ptr + rows, mask=row_mask, other=0.0)
    s = tl.where(bad, nan, tl.where(keep, s, 0.0))
    refit = keep & (bad == 0) & (big_o > 0)
    scale = s * tl.exp(-(big_o + log_s))  # coef·exp(c − lse), coef = s
    patch_rows = row_mask & keep & (bad == 0) & (refit == 0) & (s != 0)
    e_y_ptr = e_ptr + rows.to(tl.int64) * stride_e + tl.where(patch_rows, y, 0)
    e_y = tl.load(e_y_ptr, mask=patch_rows, other=0.0).to(tl.float32)
    tl.store(e_y_ptr, (e_y - big_s).to(e_ptr.dtype.element_ty), mask=patch_rows)  # T/r = S
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)
    tl.store(flag_ptr + rows, refit.to(tl.int32), mask=row_mask)


@triton.jit
def _exp_gemm_triton_kernel(
    x_desc,  # (r, H) blocks (BLOCK_M, BLOCK_K)
    w_desc,  # (V, H) blocks (BLOCK_N, BLOCK_K)
    e_desc,  # (r, V) blocks (BLOCK_M, BLOCK_N)
    shift_ptr,  # (r,) fp32
    partials_ptr,  # (2, tiles, r) fp32
    n_rows,
    n_classes,
    n_features,
    CLAMP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The plain-Triton GEMM with the same epilogue as the Gluon ``_exp_epilogue``."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(n_rows, BLOCK_M)
    blocks_n = tl.cdiv(n_classes, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    first_row = pid_m * BLOCK_M
    first_col = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, n_features, BLOCK_K):
        a = x_desc.load([first_row, k])
        b = w_desc.load([first_col, k])
        acc = tl.dot(a, b.T, acc)
    offs_m = first_row + tl.arange(0, BLOCK_M)
    offs_n = first_col + tl.arange(0, BLOCK_N)
    row_mask = offs_m < n_rows
    shift = tl.load(shift_ptr + offs_m, mask=row_mask, other=0.0)
    t = tl.where((offs_n < n_classes)[None, :], acc - shift[:, None], -float("inf"))
    mx = tl.max(t, axis=1)
    o = tl.where(mx > CLAMP, mx, 0.0)
    e = tl.exp2((t - o[:, None]) * _LOG2E)
    e_desc.store([first_row, first_col], e.to(e_desc.dtype))
    partial_ptr = partials_ptr + pid_n.to(tl.int64) * n_rows + offs_m
    tl.store(partial_ptr, o, mask=row_mask)
    tl.store(partial_ptr + blocks_n.to(tl.int64) * n_rows, tl.sum(e, axis=1), mask=row_mask)


# ------------------------------------------------------------------------------------------------ host side


class Chain:
    """The new chain's per-chunk buffers and steps."""

    def __init__(self, torch, sg, x, w, y, share, rows, accumulate, gemm="gluon"):
        dev = x.device
        h, v = x.shape[1], w.shape[0]
        self.torch, self.sg, self.gemm = torch, sg, gemm
        self.x, self.w, self.y, self.share = x, w, y, share
        self.cfg = sg.DEFAULT
        self.block_n = 128
        self.tiles = triton.cdiv(v, self.block_n)
        self.e = sg.row_padded(rows, v, x.dtype, dev)
        self.partials = torch.empty((2, self.tiles, rows), dtype=torch.float32, device=dev)
        self.shift = torch.empty(rows, dtype=torch.float32, device=dev)
        self.loss = torch.empty(rows, dtype=torch.float32, device=dev)
        self.lse = torch.empty(rows, dtype=torch.float32, device=dev)
        self.scale = torch.empty(rows, dtype=torch.float32, device=dev)
        self.flag = torch.empty(rows, dtype=torch.int32, device=dev)
        self.y32 = torch.empty(rows, h, dtype=torch.float32, device=dev)  # E'·W before the row scale
        self.xs = torch.empty(rows, h, dtype=x.dtype, device=dev)
        self.gx = torch.empty(rows, h, dtype=x.dtype, device=dev)
        self.gw = torch.empty(v, h, dtype=torch.float32 if accumulate else x.dtype, device=dev)
        self.accumulate = accumulate
        if gemm == "triton":
            from triton.tools.tensor_descriptor import TensorDescriptor

            bm, bn, bk = 128, 128, 64
            self.tdesc = (
                TensorDescriptor.from_tensor(x, [bm, bk]),
                TensorDescriptor.from_tensor(w, [bn, bk]),
                TensorDescriptor.from_tensor(self.e, [bm, bn]),
            )

    def poison(self):
        for t in (self.e, self.partials, self.shift, self.loss, self.lse, self.scale, self.y32, self.gx, self.gw):
            t.fill_(float("nan"))

    def shift_step(self):
        r, h = self.x.shape
        _shift_kernel[(r,)](
            self.x, self.w, self.y, self.shift, self.w.shape[0], h, self.x.stride(0), self.w.stride(0), -100,
            BLOCK_H=triton.next_power_of_2(min(h, 1024)), num_warps=4,
        )  # fmt: skip

    def gemm_step(self):
        if self.gemm == "gluon":
            self.sg.exp_gemm(self.x, self.w, None, self.shift, CLAMP, self.e, self.partials, self.cfg)
        else:
            r, h = self.x.shape
            v = self.w.shape[0]
            grid = (triton.cdiv(r, 128) * self.tiles,)
            _exp_gemm_triton_kernel[grid](
                *self.tdesc, self.shift, self.partials, r, v, h, CLAMP=CLAMP, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                GROUP_M=8, num_warps=8, num_stages=3,
            )  # fmt: skip

    def combine_step(self):
        r = self.x.shape[0]
        _combine_kernel[(triton.cdiv(r, 16),)](
            self.partials, self.shift, self.y, self.share, self.e, self.loss, self.lse, self.scale, self.flag, r,
            self.tiles, self.w.shape[0], self.e.stride(0), -100, BLOCK_T=64, BLOCK_R=16, num_warps=4,
        )  # fmt: skip

    def grad_step(self):
        from linear_cross_entropy.backends.fused.gemm import input_grad_gemm, weight_grad_gemm

        torch = self.torch
        sc = self.scale[:, None]
        input_grad_gemm(self.e, self.w, self.y32)
        torch.mul(self.y32, sc, out=self.gx)
        torch.mul(self.x, sc, out=self.xs)
        weight_grad_gemm(self.gw, self.e, self.xs, first=not self.accumulate)

    def run(self):
        self.shift_step()
        self.gemm_step()
        self.combine_step()
        self.grad_step()


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
        ch = Chain(torch, sg, x, w, y, share, CHECK_ROWS, accumulate=False, gemm=gemm)
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
        flagged = ch.flag.sum().item()
        lse_d = (ch.lse - buf.lse).abs().max().item()
        ok &= nan == 0 and flagged == 0 and all(a <= 1.5 * b for a, b in zip(errs[gemm][1:], errs["today"][1:]))
        print(f"  {shape} {gemm}: NaN {nan}, flagged rows {flagged}, lse vs today max |Δ| {lse_d:.1e}", flush=True)
    for name, e in errs.items():
        print(f"  {shape} {name:6s} vs float64: loss {e[0]:.2e}  grad_x {e[1]:.2e}  grad_W {e[2]:.2e}", flush=True)
    print(f"  {'PASS' if ok else 'FAIL'} {shape}", flush=True)
    harness.result(dict(kind="check", shape=shape, ok=ok, errs=errs))

    # a row beyond the window: its target logit far below the max (flagged, lse still exact)
    ch = Chain(torch, sg, x, w, y, share, CHECK_ROWS, accumulate=False, gemm="gluon")
    xb = x.clone()
    xb[3] *= 60  # logits of row 3 scaled: max − z_y >> CLAMP
    ch.x = xb
    ch.shift_step()
    ch.gemm_step()
    ch.combine_step()
    torch.cuda.synchronize()
    lse64 = torch.logsumexp(xb.double() @ w.double().T, dim=1)
    print(
        f"  window: row 3 flagged {bool(ch.flag[3].item())}, flagged total {ch.flag.sum().item()}, lse max rel err "
        f"{((ch.lse.double() - lse64).abs() / lse64.abs()).max().item():.1e}",
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
        ch = Chain(torch, sg, x, w, y, share, rows, accumulate=chunks > 1, gemm=gemm)
        ch.run()
        torch.cuda.synchronize()
        pieces = {"shift": ch.shift_step, "GEMM": ch.gemm_step, "combine": ch.combine_step, "grads": ch.grad_step}
        for name, fn in pieces.items():
            t[f"{gemm} {name}"] = bench.bench(fn)
        t[f"{gemm} chain"] = bench.bench(ch.run)
        for name in [*pieces, "chain"]:
            k = f"{gemm} {name}"
            print(f"  {k:32s} {t[k]:8.3f} ms  {t[k] / t['floor']:.3f}× chunk floor", flush=True)
        del ch
        torch.cuda.empty_cache()
    harness.result(dict(kind="time", shape=shape, chunks=chunks, rows=rows, t=t))


ROWS = [
    ("floor (3 cuBLAS GEMMs)", "floor"),
    ("today: logits GEMM", "today logits GEMM"),
    ("today: row kernel", "today row kernel"),
    ("today: dz·W + dzᵀ·x", lambda t: t["today dz·W"] + t["today dzᵀ·x"]),
    ("**today, chained**", "today chain"),
    ("new: shift (z_y)", "gluon shift"),
    ("new: Gluon exp GEMM", "gluon GEMM"),
    ("new: combine + patch", "gluon combine"),
    ("new: E'·W, E'ᵀ·(r⊙x) + scaling", "gluon grads"),
    ("**new (Gluon), chained**", "gluon chain"),
    ("new: Triton exp GEMM", "triton GEMM"),
    ("new (Triton GEMM), chained", "triton chain"),
]


def _table(times, shapes):
    print("\n| per chunk: ms (× chunk floor) | " + " | ".join(
        f"{s}, {times[s]['rows']} rows" if s in times else s for s in shapes) + " |")  # fmt: skip
    print("|---" * (len(shapes) + 1) + "|")
    for label, key in ROWS:
        cells = []
        for s in shapes:
            try:
                t = times[s]["t"]
                ms = key(t) if callable(key) else t[key]
                cells.append(f"{ms:.3f} ({ms / t['floor']:.3f}×)")
            except KeyError:
                cells.append("—")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        kind, shape = args.step.split(":")
        return (step_check if kind == "check" else step_time)(shape)
    t0 = time.time()
    print(harness.device_line())
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
    _table(times, args.shapes)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
