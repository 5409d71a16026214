"""GPU check and timing of the Gluon ping-pong GEMMs (``stats_gemm.py``) against cuBLAS and v14's Triton kernel.

    cd /work/main && PYTHONPATH=src python benchmarks/gluon/check_and_time.py [--configs default wide]

Every step runs in its own subprocess with a wall-clock limit, so a deadlocked kernel (mbarrier phase bug) costs
at most that limit and the other steps still run: a SIGKILLed process takes its CUDA context, and the spinning
kernel, with it. A check process that dies on a CUDA error is restarted at the next case. Steps: (1) correctness
of plain_gemm, (2) correctness of stats_gemm (M = 1024, K in {768, 896, 2048}, N in {50257, 151936}, every
bias × smoothing combination at both N, outputs NaN-poisoned; z against the float64 product rounded to bf16 and
against cuBLAS's bf16 GEMM (see ``_check_z``), the partials against float64 math on the kernel's own z, z_y
exact), (3) cuBLAS and the v14 Triton ``_logits_stats_kernel`` timings, (4) the Gluon timings (skipped for a
kernel whose check hung). A table comes last. Total: well under 3 minutes unless steps hang (then each costs its
limit).
"""

import argparse
import os
import sys
import time

import harness  # this folder's GPU-script driver (the script's own folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
# (M, K, N, bias, smoothing). The first run crashed at (768, 151936, 0, 1): not the kernel but this script, whose
# "first class of the last tile" target was (N // 128)·128 = N at N = 151936 (out of range), so the check's
# z[rows, y[rows]] indexed past the row (a device-side assert). Every bias × smoothing pair now runs at both N.
CHECK_CASES = [
    (1024, 768, 50257, 1, 1),
    (1024, 896, 50257, 0, 0),
    (1024, 2048, 50257, 1, 0),
    (1024, 768, 50257, 0, 1),
    (1024, 768, 151936, 0, 1),
    (1024, 896, 151936, 1, 1),
    (1024, 2048, 151936, 0, 0),
    (1024, 896, 151936, 1, 0),
]
PLAIN_CASES = [(1024, k, n, 0, 0) for n in (50257, 151936) for k in (768, 896, 2048)]
TIME_SHAPES = [(4096, 896, 151936), (4096, 2048, 128256), (2048, 768, 50257)]
LIMITS = {"check_plain": 60, "check_stats": 90, "time_base": 60, "time_gluon": 60}  # seconds per process


# ------------------------------------------------------------------------------------------------- worker side


def _setup():
    import torch

    sys.path.insert(0, HERE)
    import stats_gemm as sg

    torch.backends.cuda.matmul.allow_tf32 = False
    return torch, sg


def _configs(sg, names):
    return {name: {"default": sg.DEFAULT, "wide": sg.WIDE}[name] for name in names}


def _problem(torch, m, k, n, seed, bias=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * (2 / k**0.5)).bfloat16()
    b = (torch.randn(n, device="cuda", generator=g) * 0.5).bfloat16() if bias else None
    y = torch.randint(0, n, (m,), device="cuda", generator=g)
    y[torch.rand(m, device="cuda", generator=g) < 0.05] = -100  # ignored rows: z_y untouched there
    # edge classes: first, last, next-to-last, the first class of the last 128- and 256-class tiles (in range: the
    # old (n // 128) * 128 was n itself when 128 divides n)
    edge = [0, n - 1, n - 2, (n - 1) // 128 * 128, (n - 1) // 256 * 256]
    y[: len(edge)] = torch.tensor(edge, device="cuda")
    assert bool(((y == -100) | ((y >= 0) & (y < n))).all()), "targets must be in [0, N) or ignored"
    return x, w, b, y


def _poisoned_z(torch, sg, m, n):
    z = sg.row_padded(m, n, torch.bfloat16, "cuda")
    z.fill_(float("nan"))
    return z


_U = 2.0**-24  # fp32's unit roundoff


def _bf16_order(torch, t):
    """bf16 values as int32 in value order: adjacent bf16 values differ by exactly 1 (+0 and -0 are both 0), so
    the difference of two is the number of bf16 steps between them, across binades and signs."""
    b = t.contiguous().view(torch.int16).int()
    return torch.where(b < 0, -(b & 0x7FFF), b)


def _ulp(torch, a):
    """The bf16 ulp of float32 magnitudes ``a`` holding bf16 values (8 significant bits: a = f·2^e, f in [0.5, 1),
    spacing 2^(e-8)); 0 where a = 0."""
    _, e = torch.frexp(a)
    return torch.where(a == 0, 0.0, torch.ldexp(torch.ones_like(a), e - 8))


def _z_stats(torch, t, ref64, refb_ord, refb_abs, acc_bound):
    """One bf16 result ``t`` against the float64 product: NaNs; the fraction of entries that are not the float64
    value correctly rounded to bf16; entries more than one bf16 step from it; those of them that are also farther
    from the float64 value than half an ulp of the larger-magnitude of (t, rounded float64) plus the fp32
    accumulation bound (a real error: no fp32-accumulating GEMM may be there); the largest |float64| among the
    entries more than one step off."""
    nan = torch.isnan(t).sum().item()
    steps = (_bf16_order(torch, t) - refb_ord).abs()
    off = (steps > 0).float().mean().item()
    far = steps > 1
    tf = t.float()
    half_ulp = 0.5 * _ulp(torch, torch.maximum(tf.abs(), refb_abs))
    beyond = (far & ((tf.double() - ref64).abs() > (half_ulp + acc_bound).double())).sum().item()
    far_ref = ref64.abs()[far]
    return dict(
        nan=nan, off=off, far=far.sum().item(), beyond=beyond, far_ref=far_ref.max().item() if far_ref.numel() else 0.0
    )


def _check_z(torch, z, x, w, b):
    """(ok, message): z against the float64 product rounded to bf16, side by side with cuBLAS's own bf16 GEMM.

    An fp32 accumulation of K bf16 products (each exact in fp32) differs from the float64 sum by up to
    ~γ·Σ|x·w| (γ ≤ K·u in any order; typically ~√K·u): after the rounding to bf16 that is (a) one bf16 step
    where the float64 value lies near the midpoint of two bf16 values (a fraction ∝ the fp32 error / ulp, which
    grows with K), and (b) MORE than one step where |z| is so small (cancellation) that its bf16 ulp is below
    the fp32 error itself — any fp32-accumulating GEMM does both, cuBLAS included (its columns say how often).
    Tensor cores add more: their accumulation aligns and truncates (Fasi et al. 2021, "Numerical behavior of
    NVIDIA tensor cores"), a biased error that grows ~K; an fp32 SGEMM reference (FFMA, round-to-nearest) does not
    share it. So the verdict: no NaN; no entry more than one step off unless the worst-case accumulation bound
    explains it (4u·(K+1)·(Σ|x·w| + |b|): rigorous for truncation too, loose, but a wrong tile, k-step or bias is
    off on many entries by far more); and about as many entries off as cuBLAS's bf16 GEMM on the same tensor
    cores (at most 2× its counts + a margin), which catches what the loose bound lets through."""
    k = x.shape[1]
    ref64 = x.double() @ w.double().T
    if b is not None:
        ref64 += b.double()
    refb = ref64.float().bfloat16()  # float64 → float32 → bf16: a double rounding only on exact float32 ties
    refb_ord, refb_abs = _bf16_order(torch, refb), refb.float().abs()
    terms = (x.abs() @ w.abs().T).float() * 1.01  # Σ|x·w| (a positive sum: bf16's 2^-8 error covered by 1.01)
    if b is not None:
        terms += b.abs().float()
    acc_bound = 4 * _U * (k + 1) * terms
    del terms
    cub = torch.nn.functional.linear(x, w, b)  # cuBLAS bf16 (bias in its fp32 epilogue or as C: one rounding)
    kz = _z_stats(torch, z, ref64, refb_ord, refb_abs, acc_bound)
    kc = _z_stats(torch, cub, ref64, refb_ord, refb_abs, acc_bound)
    vs = (_bf16_order(torch, z) - _bf16_order(torch, cub)).abs()
    vs_off, vs_far = (vs > 0).float().mean().item(), (vs > 1).sum().item()
    worse = kz["far"] > 2 * kc["far"] + 10 or kz["off"] > 2 * kc["off"] + 1e-4
    ok = kz["nan"] == 0 and kz["beyond"] == 0 and not worse

    def fmt(d):
        return (
            f"≠ {d['off']:.2e}, > 1 step {d['far']} (|z64| ≤ {d['far_ref']:.1e}), beyond the fp32 bound {d['beyond']}"
        )

    msg = (
        f"z vs float64→bf16: kernel NaN {kz['nan']}, {fmt(kz)} | cuBLAS {fmt(kc)} | kernel vs cuBLAS ≠ "
        f"{vs_off:.2e}, > 1 step {vs_far}"
        + (" | kernel's z further from float64 than cuBLAS's (> 2x its counts)" * worse)
    )
    return ok, msg


def _check_stats(torch, z, partials, z_y, y, bn, smoothing):
    """Partials against float64 math on the kernel's own z; z_y exact; ignored rows' z_y untouched (NaN)."""
    m, n = z.shape
    tiles = -(-n // bn)
    zd = z.double()
    pad = tiles * bn - n
    zt = torch.nn.functional.pad(zd, (0, pad), value=float("-inf")).view(m, tiles, bn)
    mx = zt.amax(dim=2)  # (m, tiles)
    s = torch.exp(zt - mx[..., None]).sum(dim=2)
    msgs, ok = [], True
    p = partials.double()
    nan = torch.isnan(p[:2]).sum().item() + (torch.isnan(p[2]).sum().item() if smoothing else 0)
    ok &= nan == 0
    m_err = (p[0] - mx.T).abs().max().item()
    ok &= m_err == 0
    s_err = ((p[1] - s.T).abs() / s.T).max().item()
    ok &= s_err <= 1e-5
    msgs.append(f"partials NaN {nan}, m_t max |Δ| {m_err:.2g}, s_t max rel {s_err:.2e}")
    if smoothing:
        zs = torch.nn.functional.pad(zd, (0, pad), value=0.0).view(m, tiles, bn)
        sz, sa = zs.sum(dim=2), zs.abs().sum(dim=2).clamp_min(1e-30)
        sz_err = ((p[2] - sz.T).abs() / sa.T).max().item()
        ok &= sz_err <= 1e-5
        msgs.append(f"Σz max rel(Σ|z|) {sz_err:.2e}")
    valid = y >= 0
    rows = torch.nonzero(valid).squeeze(1)
    want = z[rows, y[rows]].float()
    zy_bad = (z_y[rows] != want).sum().item()
    untouched = torch.isnan(z_y[~valid]).all().item()
    ok &= zy_bad == 0 and untouched
    msgs.append(f"z_y mismatches {zy_bad}/{rows.numel()}, ignored rows untouched {untouched}")
    return ok, "; ".join(msgs)


def step_check(kind, cfg_names, start=0):
    """Cases ``start, start + 1, ...`` of one kernel and configuration; after a CUDA error (the context is gone) the
    process exits with status 3 and the driver starts another at the next case."""
    torch, sg = _setup()
    cases = PLAIN_CASES if kind == "plain" else CHECK_CASES
    for cname, cfg in _configs(sg, cfg_names).items():
        for i in range(start, len(cases)):
            m, k, n, bias, smoothing = cases[i]
            label = f"{kind} [{cname}] M={m} K={k} N={n}" + (f" bias={bias} smoothing={smoothing}" * (kind == "stats"))
            harness.result(dict(kind="begin", case=i))
            where = "setup"
            try:
                x, w, b, y = _problem(torch, m, k, n, seed=i, bias=bool(bias))
                z = _poisoned_z(torch, sg, m, n)
                torch.cuda.synchronize()
                where = "kernel"  # an error from here to the synchronize is the kernel's
                if kind == "plain":
                    sg.plain_gemm(x, w, z, cfg)
                    torch.cuda.synchronize()
                    where = "check"
                    ok, msg = _check_z(torch, z, x, w, None)
                else:
                    tiles = sg.stats_tiles(n, cfg)
                    partials = torch.full((3, tiles, m), float("nan"), device="cuda")
                    z_y = torch.full((m,), float("nan"), device="cuda")
                    torch.cuda.synchronize()
                    sg.stats_gemm(x, w, b, y, bool(smoothing), z, cfg, partials, z_y)
                    torch.cuda.synchronize()
                    where = "check"
                    ok, msg = _check_z(torch, z, x, w, b)
                    ok2, msg2 = _check_stats(torch, z, partials, z_y, y, cfg.block_n, bool(smoothing))
                    ok, msg = ok and ok2, f"{msg}; {msg2}"
                print(f"{'PASS' if ok else 'FAIL'} {label}: {msg}", flush=True)
                harness.result(dict(kind="check", variant=f"{kind} {cname}", ok=ok))
            except Exception as e:  # noqa: BLE001 - reported, the other cases go on
                text = str(e).strip()
                print(
                    f"FAIL {label}: in the {where}: {type(e).__name__}: {text.splitlines()[-1][:300] if text else ''}",
                    flush=True,
                )
                harness.result(dict(kind="check", variant=f"{kind} {cname}", ok=False))
                if "CUDA" in text or "illegal" in text or "Accelerator" in type(e).__name__:
                    sys.exit(3)  # the context is likely gone: the driver goes on in a new process


def step_time_base(cfg_names):
    torch, sg = _setup()
    sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
    from linear_cross_entropy.backends.common import LossParams
    from linear_cross_entropy.backends.fused import softmax_gemm as tsg
    from linear_cross_entropy.backends.fused.gemm import row_padded

    lp = LossParams("mean", -100, 0.0, False)
    for shape in TIME_SHAPES:
        m, k, n = shape
        x, w, _, y = _problem(torch, m, k, n, seed=0)
        # loop tensors are bound as defaults (B023): the lambdas run inside harness.time_gemm, before the del below
        harness.time_gemm("cuBLAS x @ w.T", shape, lambda x=x, w=w: x @ w.T)
        if n % 128:
            wp = torch.nn.functional.pad(w, (0, 0, 0, -(-n // 128) * 128 - n))
            harness.time_gemm("cuBLAS x @ w.T (N padded to 128)", shape, lambda x=x, wp=wp: x @ wp.T)
        z = row_padded(m, n, torch.bfloat16, torch.device("cuda"))
        harness.time_gemm(
            "Triton v14 logits_stats 128x256", shape, lambda x=x, w=w, y=y, z=z: tsg.logits_stats(x, w, None, y, z, lp)
        )
        del x, w, y, z
        torch.cuda.empty_cache()


def step_time_gluon(cfg_names, skip):
    torch, sg = _setup()
    for shape in TIME_SHAPES:
        m, k, n = shape
        x, w, _, y = _problem(torch, m, k, n, seed=0)
        z = sg.row_padded(m, n, torch.bfloat16, "cuda")
        for cname, cfg in _configs(sg, cfg_names).items():
            if f"plain {cname}" not in skip:
                harness.time_gemm(
                    f"Gluon plain_gemm [{cname}]", shape, lambda x=x, w=w, z=z, cfg=cfg: sg.plain_gemm(x, w, z, cfg)
                )
            if f"stats {cname}" not in skip:
                harness.time_gemm(
                    f"Gluon stats_gemm [{cname}]",
                    shape,
                    lambda x=x, w=w, y=y, z=z, cfg=cfg: sg.stats_gemm(x, w, None, y, False, z, cfg),
                )
        del x, w, y, z
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- driver side


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["default", "wide"], choices=["default", "wide"])
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step == "check_plain":
        return step_check("plain", args.configs, args.start)
    if args.step == "check_stats":
        return step_check("stats", args.configs, args.start)
    if args.step == "time_base":
        return step_time_base(args.configs)
    if args.step == "time_gluon":
        return step_time_gluon(args.configs, set(" ".join(args.skip).split(",")) if args.skip else set())

    t0 = time.time()
    print(harness.device_line())
    all_results, hung = [], []
    for kind in ("plain", "stats"):
        n_cases = len(PLAIN_CASES if kind == "plain" else CHECK_CASES)
        for c in args.configs:  # one process per kernel and configuration: a hang loses only that one
            print(f"== check {kind} [{c}]", flush=True)
            start = 0
            while start < n_cases:  # a crash or a hang ends the process: go on at the next case
                res, status = harness.run_step(
                    __file__,
                    ["--step", f"check_{kind}", "--configs", c, "--start", str(start)],
                    LIMITS[f"check_{kind}"],
                )
                all_results += [r for r in res if r["kind"] != "begin"]
                begun = [r["case"] for r in res if r["kind"] == "begin"]
                if status.startswith("TIMEOUT"):
                    hung.append(f"{kind} {c}")
                    if begun:
                        print(f"  case {begun[-1]} hung; the others are not run (a hang costs the whole limit)")
                    break
                if status == "exit 0" or not begun:
                    break
                start = begun[-1] + 1
    print("== time_base", flush=True)
    res, _ = harness.run_step(__file__, ["--step", "time_base"], LIMITS["time_base"])
    all_results += res
    for c in args.configs:
        if f"plain {c}" in hung and f"stats {c}" in hung:
            print(f"== time_gluon [{c}]: skipped (both checks hung)")
            continue
        print(f"== time_gluon [{c}]" + (f" (skipping hung: {hung})" if hung else ""), flush=True)
        res, _ = harness.run_step(
            __file__,
            ["--step", "time_gluon", "--configs", c] + (["--skip", ",".join(hung)] if hung else []),
            LIMITS["time_gluon"],
        )
        all_results += res

    print("\n== summary")
    checks = {}
    for r in all_results:
        if r["kind"] == "check":
            c = checks.setdefault(r["variant"], [0, 0])
            c[0 if r["ok"] else 1] += 1
    for v, (p, f) in checks.items():
        print(f"  check {v}: {p} PASS, {f} FAIL" + (" (HUNG: cases missing)" if v in hung else ""))
    for v in hung:
        if v not in checks:
            print(f"  check {v}: HUNG before any case reported")
    harness.ratio_table(all_results, TIME_SHAPES, "cuBLAS x @ w.T")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
