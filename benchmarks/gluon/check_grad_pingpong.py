"""GPU check and timing of the warp-specialised Gluon ``dz·W`` (``grad_gemm_pingpong.py``).

    cd /work/main && PYTHONPATH=src python benchmarks/gluon/check_grad_pingpong.py

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

import json
import os
import subprocess
import sys
import time

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


def _result(d):
    print("@@RESULT " + json.dumps(d), flush=True)


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
                    _result(dict(kind="check", ok=ok))
                except Exception as e:  # noqa: BLE001
                    txt = str(e).strip().splitlines()
                    print(f"FAIL {label}: {type(e).__name__}: {txt[-1][:300] if txt else ''}", flush=True)
                    _result(dict(kind="check", ok=False))
                    if "CUDA" in str(e) or "illegal" in str(e):
                        return
            del w, y, z, dz, ref
            torch.cuda.empty_cache()


def _time(name, shape, fn):
    import triton.testing

    try:
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001
        txt = str(e).strip().splitlines()
        print(f"  {name} {shape}: failed: {type(e).__name__}: {txt[-1][:200] if txt else ''}", flush=True)
        ms = float("nan")
    r, h, v = shape
    print(f"  {name:36s} {r}x{h}x{v}: {ms:.3f} ms ({2 * r * h * v / ms / 1e9:.0f} TFLOP/s)", flush=True)
    _result(dict(kind="time", variant=name, shape=list(shape), ms=ms))


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
        # loop tensors are bound as defaults (B023): the lambdas run inside _time, before the del below
        _time(BASE, shape, lambda dzb=dzb, w=w, gx=gx: torch.matmul(dzb, w, out=gx))
        _time(
            "Gluon ping-pong grad_x",
            shape,
            lambda z=z, w=w, y=y, lse=lse, coefs=coefs, gx=gx: pp.grad_x(z, w, y, lse, coefs, False, gx),
        )
        _time(
            "Gluon grad_x, no MMA turn",
            shape,
            lambda z=z, w=w, y=y, lse=lse, coefs=coefs, gx=gx: pp.grad_x(z, w, y, lse, coefs, False, gx, free),
        )
        _time(
            "Gluon ping-pong (label smoothing)",
            shape,
            lambda z=z, w=w, y=y, lse=lse, coefs=coefs, gx=gx: pp.grad_x(z, w, y, lse, coefs, True, gx),
        )
        del w, y, z, dzb
        torch.cuda.empty_cache()


def _run_step(step, limit):
    t0 = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--step", step]
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        out, err, status = cp.stdout, cp.stderr, f"exit {cp.returncode}"
    except subprocess.TimeoutExpired as e:
        dec = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        out, err, status = dec(e.stdout), dec(e.stderr), f"TIMEOUT after {limit} s (deadlock? killed)"
    results = []
    for line in out.splitlines():
        if line.startswith("@@RESULT "):
            results.append(json.loads(line[len("@@RESULT ") :]))
        else:
            print(line)
    if status != "exit 0":
        print(f"  [{step}] {status}; stderr tail:\n    " + "\n    ".join(err.strip().splitlines()[-12:]))
    print(f"  [{step}] {status}, {time.time() - t0:.0f} s", flush=True)
    return results, status


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        return {"check": step_check, "time": step_time}[sys.argv[2]]()
    t0 = time.time()
    info = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, triton; print(torch.cuda.get_device_name(), 'torch', "
            "torch.__version__, 'triton', triton.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    print(info.stdout.strip() or info.stderr.strip()[-500:])
    print("== check", flush=True)
    results, status = _run_step("check", LIMITS["check"])
    checks = [r for r in results if r["kind"] == "check"]
    if status.startswith("TIMEOUT") and not checks:
        print("== time: skipped (the check hung before any case reported)")
    else:
        print("== time", flush=True)
        results += _run_step("time", LIMITS["time"])[0]
    print(
        f"\n== summary: checks {sum(r['ok'] for r in checks)} PASS, {sum(not r['ok'] for r in checks)} FAIL"
        + (" (check step " + status + ")" if status != "exit 0" else "")
    )
    times = [r for r in results if r["kind"] == "time"]
    variants = list(dict.fromkeys(r["variant"] for r in times))
    lookup = {(r["variant"], tuple(r["shape"])): r["ms"] for r in times}
    print("\n| variant | " + " | ".join(f"{r}x{h}x{v} ms (× cuBLAS)" for r, h, v in TIME_SHAPES) + " |")
    print("|---" * (len(TIME_SHAPES) + 1) + "|")
    for var in variants:
        cells = []
        for s in map(tuple, TIME_SHAPES):
            ms, base = lookup.get((var, s)), lookup.get((BASE, s))
            cells.append(
                "—" if ms is None else (f"{ms:.3f} ({ms / base:.2f}×)" if base and base == base else f"{ms:.3f}")
            )
        print(f"| {var} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
