"""GPU check and timing of the warp-specialised Gluon ``dz·W`` (``grad_gemm_pingpong.py``).

    cd /work/main && PYTHONPATH=src python benchmarks/gluon/check_grad_pingpong.py
    PYTHONPATH=/tmp/t36 python benchmarks/gluon/check_grad_pingpong.py --selftest   # CPU only, no kernel

Every step runs in its own subprocess with a wall-clock limit (a deadlock or crash costs only that step):
(1) correctness at r = 1024, H in {768, 2048}, V in {50257, 151936}, 10% ignored rows, with / without label
smoothing, NaN-poisoned outputs; bf16 output with the automatic V splits, plus (per problem) the free-running
consumers (no MMA turn), an fp32 output through 2 V splits, or a forced single split. grad_x against float64
``dz·W`` built from the same z, lse, coefs: NaN-free, max |Δ| and relative Frobenius error within 2x cuBLAS's on
the bf16-rounded dz, and the relative error < 0.05 in absolute terms (so a wrong product fails even if cuBLAS's
own error were large); (2) timings (``do_bench`` medians): cuBLAS ``dz @ W`` on a precomputed bf16 dz (row stride
padded to a multiple of 8), the Gluon kernel (ping-pong, free-running, with label smoothing). A table comes last.
The problem builder and error helpers are imported from ``check_grad.py`` (read-only).
"""

import os
import re
import sys
import time

import harness  # this folder's GPU-script driver (the script's own folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK_CASES = [(1024, h, v) for v in (50257, 151936) for h in (768, 2048)]
TIME_SHAPES = [(4096, 896, 151936), (4096, 2048, 128256), (2048, 768, 50257)]
LIMITS = {"check": 80, "time": 65}
BASE = "cuBLAS dz @ W (bf16 dz given)"


def _setup():
    import torch

    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
    import grad_gemm_pingpong as pp

    torch.backends.cuda.matmul.allow_tf32 = False
    return torch, pp


def step_check():
    torch, pp = _setup()
    from check_grad import _dz64, _errs, _problem

    i = 0
    for r, h, v in CHECK_CASES:
        for smoothing in (False, True):
            i += 1
            _, w, y, z, lse, coefs, _ = _problem(torch, r, h, v, seed=100 + i, smoothing=smoothing)
            dz = _dz64(torch, z, y, lse, coefs, smoothing)
            ref = dz @ w.double()
            cub_max, cub_rel = _errs(torch, dz.bfloat16() @ w, ref)
            cub32_max, cub32_rel = _errs(torch, dz.bfloat16().float() @ w.float(), ref)
            variants = [("bf16 out, auto splits", torch.bfloat16, pp.DEFAULT, None)]
            if not smoothing:
                variants += [
                    ("bf16 out, no MMA turn", torch.bfloat16, pp.PingPongConfig(pingpong=False), None),
                    ("fp32 out, 2 V splits", torch.float32, pp.DEFAULT, 2),
                ]
            else:
                variants += [("bf16 out, 1 split", torch.bfloat16, pp.DEFAULT, 1)]
            for name, odt, cfg, splits in variants:
                label = f"r={r} H={h} V={v} smoothing={int(smoothing)} {name}"
                try:
                    out = torch.full((r, h), float("nan"), dtype=odt, device="cuda")
                    pp.grad_x(z, w, y, lse, coefs, smoothing, out, cfg, splits=splits)
                    torch.cuda.synchronize()
                    nan = int(torch.isnan(out).sum().item())
                    mx, rel = _errs(torch, out, ref)
                    bmax, brel = (cub_max, cub_rel) if odt == torch.bfloat16 else (cub32_max, cub32_rel)
                    ok = nan == 0 and mx <= 2 * bmax and rel <= 2 * brel and rel < 0.05
                    msg = f"NaN {nan}, max|Δ| {mx:.3g} (cuBLAS {bmax:.3g}), rel {rel:.3g} (cuBLAS {brel:.3g})"
                    print(f"{'PASS' if ok else 'FAIL'} {label}: {msg}", flush=True)
                    harness.result(dict(kind="check", ok=ok))
                except Exception as e:  # noqa: BLE001
                    txt = str(e).strip().splitlines()
                    print(f"FAIL {label}: {type(e).__name__}: {txt[-1][:300] if txt else ''}", flush=True)
                    harness.result(dict(kind="check", ok=False))
                    if "CUDA" in str(e) or "illegal" in str(e):
                        return
            del w, y, z, dz, ref
            torch.cuda.empty_cache()


def step_time():
    torch, pp = _setup()
    from check_grad import _problem

    free = pp.PingPongConfig(pingpong=False)
    for shape in TIME_SHAPES:
        r, h, v = shape
        _, w, y, z, lse, coefs, _ = _problem(torch, r, h, v, seed=0, smoothing=False)
        # bf16 dz for cuBLAS, row stride padded to a multiple of 8 (fp32 math, as the kernel)
        dzb = torch.empty(r, -(-v // 8) * 8, dtype=torch.bfloat16, device="cuda")[:, :v]
        coef, t, _e = coefs.unbind(0)
        d = coef[:, None] * torch.exp(z.float() - lse[:, None])
        rows = torch.nonzero(y >= 0).squeeze(1)
        d[rows, y[rows]] -= t[rows]
        dzb.copy_(d)
        del d
        gx = torch.empty(r, h, dtype=torch.bfloat16, device="cuda")
        # loop tensors are bound as defaults (B023): the lambdas run inside harness.time_gemm, before the del below
        harness.time_gemm(BASE, shape, lambda dzb=dzb, w=w, gx=gx: torch.matmul(dzb, w, out=gx))
        harness.time_gemm(
            "Gluon ping-pong grad_x",
            shape,
            lambda z=z, w=w, y=y, lse=lse, coefs=coefs, gx=gx: pp.grad_x(z, w, y, lse, coefs, False, gx),
        )
        harness.time_gemm(
            "Gluon grad_x, no MMA turn",
            shape,
            lambda z=z, w=w, y=y, lse=lse, coefs=coefs, gx=gx: pp.grad_x(z, w, y, lse, coefs, False, gx, free),
        )
        harness.time_gemm(
            "Gluon ping-pong (label smoothing)",
            shape,
            lambda z=z, w=w, y=y, lse=lse, coefs=coefs, gx=gx: pp.grad_x(z, w, y, lse, coefs, True, gx),
        )
        del w, y, z, dzb
        torch.cuda.empty_cache()


def _epilogue_stores(src):
    """The consumer epilogue's stores, read from ``grad_gemm_pingpong.py``'s source: ``{"fp32": [(piece, column
    block, buffer)], "bf16": [...]}`` in store order (column block i = ``off_n + i·EPI_N``)."""
    body = src[src.index("# epilogue: four 64 x 64 pieces") :]
    body = body[: body.index("@gluon.jit")]
    fp32, bf16 = body.split("\n        else:\n", 1)
    col = r"off_n(?: \+ (?:(\d+) \* )?(EPI_N))?"

    def blk(m, i):
        return int(m.group(i)) if m.group(i) else (1 if m.group(i + 1) else 0)

    f = [
        (m.group(1), blk(m, 2), "buf")
        for m in re.finditer(r"buf\.store\((p\d)\)\s*fence_async_shared\(\)\s*tma\.async_copy_shared_to_global"
                             r"\(out_desc, \[out_row, " + col + r"\], buf\)", fp32)
    ]  # fmt: skip
    b = [
        (m.group(1), blk(m, 3), m.group(2))
        for m in re.finditer(r"_store_piece\(out_desc, (p\d), (dz_[ab]), out_row, " + col + r"\)", bf16)
    ]
    return {"fp32": f, "bf16": b}


def selftest():
    """CPU only (no GPU, no kernel launch; Triton 3.6 importable). (1) The epilogue's reshape/permute/split
    (``pp.epilogue_pieces``, the kernel's sequence in torch): piece pi is columns [64i, 64i + 64). (2) The kernel's
    stores, read from its source, both paths (bf16 pieces, fp32 split partials): piece pi goes to ``off_n + i·EPI_N``,
    each column block once, the bf16 pieces alternate the two staging buffers (``store_wait(1)`` reuse). The first
    GPU run's order (p2 at +64, p1 at +128) fails (1)+(2). (3) The kernel's arithmetic emulated per unit / consumer
    / step with those stores on small shapes (partial units, V splits, fp32 and bf16 outputs, smoothing, targets at
    the edge classes) against float64 dz·W. (4) Launch plans and TMA descriptors of row-padded buffers."""
    torch, pp = _setup()
    from check_grad import _dz64

    cfg = pp.DEFAULT
    acc = torch.arange(cfg.block_m * cfg.block_n, dtype=torch.float32).reshape(cfg.block_m, cfg.block_n)
    pieces = pp.epilogue_pieces(acc, cfg.block_k)
    for i in range(4):
        assert torch.equal(pieces[f"p{i}"], acc[:, 64 * i : 64 * i + 64]), f"p{i} is not columns [{64 * i}, +64)"
    print("selftest: epilogue split p0..p3 = columns [0,64) [64,128) [128,192) [192,256) OK")

    with open(pp.__file__) as fh:
        stores = _epilogue_stores(fh.read())
    for path, seq in stores.items():
        print(f"selftest: {path} epilogue stores (piece, column block, buffer): {seq}")
        assert len(seq) == 4, (path, seq)
        assert sorted(b for _, b, _ in seq) == [0, 1, 2, 3], (path, seq)
        for name, b, _ in seq:
            assert torch.equal(pieces[name], acc[:, 64 * b : 64 * b + 64]), (
                f"{path} epilogue stores {name} (columns [{64 * int(name[1])}, +64)) at off_n + {b}·EPI_N"
            )
    assert [buf for _, _, buf in stores["bf16"]] == ["dz_a", "dz_b", "dz_a", "dz_b"], stores["bf16"]
    print("selftest: epilogue stores: piece pi at off_n + i·EPI_N in both paths OK")

    g = torch.Generator().manual_seed(0)
    cases = [
        (200, 384, 3000, 1, torch.bfloat16, False),
        (200, 384, 3000, 3, torch.bfloat16, True),
        (130, 256, 1000, 2, torch.float32, True),
        (64, 512, 4033, 1, torch.float32, False),
    ]
    for r, h, v, sp, odt, smoothing in cases:
        x = torch.randn(r, h, generator=g).bfloat16()
        w = (torch.randn(v, h, generator=g) * (2 / h**0.5)).bfloat16()
        y = torch.randint(0, v, (r,), generator=g)
        y[torch.rand(r, generator=g) < 0.1] = -100
        y[:4] = torch.tensor([0, v - 1, v - 2, (v - 1) // 64 * 64])
        z = (x.float() @ w.float().T).bfloat16()
        lse = torch.logsumexp(z.float(), 1)
        share = torch.where(y >= 0, 1.0 / (y >= 0).sum(), 0.0)
        eps = 0.1 if smoothing else 0.0
        coefs = torch.stack([share, share * (1 - eps), share * eps / v if smoothing else torch.zeros(r)])
        ref = _dz64(torch, z, y, lse, coefs, smoothing) @ w.double()
        out = _emulate(torch, pp, cfg, stores, z, w, y, lse, coefs, smoothing, sp, odt)
        rel = ((out - ref).norm() / ref.norm()).item()
        label = f"r={r} H={h} V={v} splits={sp} out={str(odt)[6:]} smoothing={int(smoothing)}"
        assert rel < 5e-3, (label, rel)
        print(f"selftest: emulated kernel {label}: rel {rel:.2g} OK")

    from linear_cross_entropy.backends.fused.gemm import row_padded

    shapes = CHECK_CASES + TIME_SHAPES + [(200, 384, 3000), (64, 256, 64)]
    for r, h, v in shapes:
        for sp in (None, 1, 2, 3, 16):
            tiles_m, tiles_n, k_steps, splits, per = pp.plan(r, h, v, 132, cfg, sp)
            assert tiles_m * 2 * cfg.block_m >= r and tiles_n * cfg.block_n >= h and k_steps * cfg.block_k >= v
            assert splits >= 1 and (splits - 1) * per < k_steps <= splits * per, (r, h, v, sp)
        zz = row_padded(8, v, torch.bfloat16, torch.device("cpu"))
        for odt in (torch.bfloat16, torch.float32):
            pp.descriptors(zz, torch.empty(v, h, dtype=torch.bfloat16), torch.empty(8, h, dtype=odt), cfg)
            pp._check(zz, torch.empty(v, h, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.int64), torch.zeros(8),
                      torch.zeros(3, 8), torch.empty(8, h, dtype=odt))  # fmt: skip
    print("selftest: launch plans, descriptors of row-padded buffers OK")


def _emulate(torch, pp, cfg, stores, z, w, y, lse, coefs, smoothing, splits, odt):
    """The kernel in torch: per unit (tile, split) and consumer (64 rows), per step the fp32 dz of the loaded tile
    (zero-filled beyond V / r, as TMA and the masked loads), bf16, times the W tile; the epilogue pieces stored where
    the kernel's source stores them (bf16 straight into out with one split and bf16 out, else fp32 partials)."""
    (r, v), h = z.shape, w.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tiles_m, tiles_n, k_steps, splits, per = pp.plan(r, h, v, 132, cfg, splits)
    direct = splits == 1 and odt == torch.bfloat16
    r_pad = tiles_m * 2 * bm
    zp = torch.zeros(r_pad, k_steps * bk)
    zp[:r, :v] = z.float()
    wp = torch.zeros(k_steps * bk, tiles_n * bn)
    wp[:v, :h] = w.float()
    pad = lambda t: torch.cat([t, torch.zeros(r_pad - r, dtype=t.dtype)])  # noqa: E731  (masked loads)
    lse2, coef, tco = pad(lse) * 1.4426950408889634, pad(coefs[0]), pad(coefs[1])
    eco = pad(coefs[2]) if smoothing else torch.zeros(r_pad)
    te = tco + eco
    tgt = pad(torch.where(y >= 0, y, -1))
    work = torch.full((splits, r_pad, tiles_n * bn), float("nan"))
    seq = stores["bf16" if direct else "fp32"]
    for unit in range(tiles_m * tiles_n * splits):
        tile, split = divmod(unit, splits)
        pm, pn = divmod(tile, tiles_n)
        k_lo = split * per
        n = min(k_steps - k_lo, per)
        for c in range(2):
            rows = slice(pm * 2 * bm + c * bm, pm * 2 * bm + c * bm + bm)
            tgt_rel = torch.where(tgt[rows] >= 0, tgt[rows] - k_lo * bk, -1)
            acc = torch.zeros(bm, bn)
            for k in range(n):
                cl = (k_lo + k) * bk
                p = torch.exp2(zp[rows, cl : cl + bk] * 1.4426950408889634 - lse2[rows, None])
                on_t = torch.arange(bk)[None, :] == (tgt_rel - k * bk)[:, None]
                sub = torch.where(on_t, te[rows, None], eco[rows, None])
                dz = (coef[rows, None] * p - sub).bfloat16().float()
                acc += dz @ wp[cl : cl + bk, pn * bn : pn * bn + bn]
            pieces = pp.epilogue_pieces(acc, bk)
            for name, b, _ in seq:
                piece = pieces[name].bfloat16().float() if direct else pieces[name]
                work[split, rows, pn * bn + b * bk : pn * bn + (b + 1) * bk] = piece
    res = work[0] if direct else work.sum(0)
    return res[:r, :h].to(odt).double()


def main():
    if sys.argv[1:] == ["--selftest"]:
        return selftest()
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        return {"check": step_check, "time": step_time}[sys.argv[2]]()
    t0 = time.time()
    print(harness.device_line())
    print("== check", flush=True)
    results, status = harness.run_step(__file__, ["--step", "check"], label="check", limit=LIMITS["check"])
    checks = [r for r in results if r["kind"] == "check"]
    if status.startswith("TIMEOUT") and not checks:
        print("== time: skipped (the check hung before any case reported)")
    else:
        print("== time", flush=True)
        results += harness.run_step(__file__, ["--step", "time"], label="time", limit=LIMITS["time"])[0]
    print(
        f"\n== summary: checks {sum(r['ok'] for r in checks)} PASS, {sum(not r['ok'] for r in checks)} FAIL"
        + (" (check step " + status + ")" if status != "exit 0" else "")
    )
    harness.ratio_table(results, TIME_SHAPES, BASE)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
