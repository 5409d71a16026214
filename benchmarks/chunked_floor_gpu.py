r"""The chunked floor: what the three cuBLAS GEMMs alone cost when run in the fused default's row chunks.

    cd /work/main && python benchmarks/chunked_floor_gpu.py [--shapes NxHxV ...] [--rounds 5] [--quack]

Issue 20 measures the fused default against the floor — the three GEMMs of an exact forward + backward on the whole
problem (``bench.timing.floor_ms``). Within the issue's memory bound the default cannot run them whole: it runs them
per chunk of ``fused_chunk_rows`` rows (a ``(rows, V)`` buffer, a quarter of the logits at issue 20's shapes) and
accumulates the weight gradient across chunks in an fp32 ``(V, H)`` scratch, rounded once at the end. This script
times, per shape and on the same padded operands as the floor,

- ``floor``: the three GEMMs on the whole problem (``floor_ms``'s, written into preallocated outputs as the
  chunked variants write theirs);
- ``chunked floor``: the same GEMMs per chunk, ``grad_W`` accumulated in the fp32 scratch (cuBLAS ``beta = 1``)
  and rounded to bf16 once: the least any design that keeps a chunk's ``(rows, V)`` matrix and uses cuBLAS can
  spend, before any softmax work;
- each of the three GEMMs alone, whole and chunked (the logits ``x·Wᵀ``, ``dz·W``, ``dzᵀ·x``), to say which
  GEMM the chunking costs;
- ``ours``: the library's default forward + backward (unpadded shape, 5% ignored targets, as ``bench_gpu.py``);
- with ``--quack`` (QuACK installed): the chunked weight gradient through QuACK's GEMMs, the first chunk's stored
  and the others added by TMA reduce-add stores (no read of the scratch), and QuACK's chunked logits GEMM.

Every variant is timed as ``bench_gpu.py`` times a method (``time_fn``: device events around a step queued behind a
GPU sleep, median), ``--reps`` steps a window, the variants round-robin for ``--rounds`` windows (the GPU's power
state drifts between back-to-back loops: NOTES, v17), and the median over windows is reported with ×floor.
No assertion: a benchmark.
"""

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from linear_cross_entropy.backends.fused.policy import fused_chunk_rows  # noqa: E402
from linear_cross_entropy.bench.measure import make_problem, parse_shape  # noqa: E402
from linear_cross_entropy.bench.timing import floor_operands, time_fn  # noqa: E402

SHAPES = [
    "16384x896x151936",
    "16384x1536x151936",
    "8192x2048x128256",
    "16384x2048x131072",
    "8192x4096x128256",
    "8192x768x50257",
]


@triton.jit
def _weight_grad_kernel(
    # tensor descriptors
    e_desc,  # (r, V) blocks (BLOCK_R, BLOCK_V): a chunk's dz (or E')
    p_desc,  # (r, H) blocks (BLOCK_R, BLOCK_H): the chunk's rows of x (or r ⊙ x)
    out_desc,  # (V, H) fp32 blocks (BLOCK_V, BLOCK_H): the scratch, stored or added to
    # dimensions
    n_rows,
    n_classes,
    n_features,
    # meta-parameters
    ACCUMULATE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NUM_WORKERS: tl.constexpr,
):
    """Prototype: ``out (+)= eᵀ·p``, a persistent program per SM over ``(BLOCK_V, BLOCK_H)`` tiles (the feature
    tiles of one class block back to back: they share its ``e`` strip in L2). With ``ACCUMULATE`` each tile is
    added by a TMA reduce-add store (``cp.reduce.async.bulk``): the scratch is never read by the SMs."""
    tiles_h = tl.cdiv(n_features, BLOCK_H)
    num_tiles = tl.cdiv(n_classes, BLOCK_V) * tiles_h
    for tile in range(tl.program_id(0), num_tiles, NUM_WORKERS):
        first_class = (tile // tiles_h) * BLOCK_V
        first_feature = (tile % tiles_h) * BLOCK_H
        acc = tl.zeros((BLOCK_V, BLOCK_H), tl.float32)
        for k in range(0, n_rows, BLOCK_R):
            e = e_desc.load([k, first_class])
            p = p_desc.load([k, first_feature])
            acc = tl.dot(e.T, p, acc)
        if ACCUMULATE:
            out_desc.atomic_add([first_class, first_feature], acc)
        else:
            out_desc.store([first_class, first_feature], acc)


def _triton_weight_grad(config):
    """``(first, add)`` GEMMs of ``_weight_grad_chunked`` through :func:`_weight_grad_kernel` with ``config`` =
    ``(BLOCK_V, BLOCK_H, BLOCK_R, num_warps, num_stages)``."""
    from linear_cross_entropy.backends.grid import sm_count
    from linear_cross_entropy.backends.tma import descriptor

    bv, bh, br, warps, stages = config

    def run(a, b, out, accumulate):
        e = a.T  # (r, V): the GEMM's A operand is its transpose
        (r, v), h = e.shape, b.shape[1]
        workers = min(sm_count(e.device), triton.cdiv(v, bv) * triton.cdiv(h, bh))
        _weight_grad_kernel[(workers,)](
            descriptor(e, br, bv), descriptor(b, br, bh), descriptor(out, bv, bh), r, v, h,
            ACCUMULATE=accumulate, BLOCK_V=bv, BLOCK_H=bh, BLOCK_R=br, NUM_WORKERS=workers,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    return (lambda a, b, out: run(a, b, out, False)), (lambda a, b, out: run(a, b, out, True))


# (BLOCK_V, BLOCK_H, BLOCK_R, num_warps, num_stages) measured (NOTES); 128 × 256 and 256 × 128 tiles at 3 stages
# need 278552 bytes of shared memory on sm_90 (232448 there)
TRITON_CONFIGS = [(128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]


def _chunks(n: int, rows: int) -> list[slice]:
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def _weight_grad_chunked(s, grad_w, dz, x, parts, first_gemm, add_gemm):
    """``grad_w = Σ_c dz_cᵀ·x_c`` through the fp32 scratch ``s``, rounded once; ``dz`` holds a chunk's rows."""
    for i, part in enumerate(parts):
        r = part.stop - part.start
        (first_gemm if i == 0 else add_gemm)(dz[:r].T, x[part], s)
    grad_w.copy_(s)


def _cublas_first(a, b, out):
    torch.mm(a, b, out_dtype=torch.float32, out=out)


def _cublas_add(a, b, out):
    torch.addmm(out, a, b, out_dtype=torch.float32, out=out)


def _same_weight_grad(scratch, grad_w, dz, x, parts, first, add) -> bool:
    """Whether ``(first, add)`` compiles and gives cuBLAS's chunked fp32 sums (to fp32 summation order), printed."""
    _weight_grad_chunked(scratch, grad_w, dz, x, parts, _cublas_first, _cublas_add)
    want = scratch.clone()
    scratch.normal_()  # poison: every element must be written
    try:
        _weight_grad_chunked(scratch, grad_w, dz, x, parts, first, add)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a config that does not compile is reported and skipped
        print(f"  config failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return False
    err = ((scratch - want).norm() / want.norm()).item()
    print(f"  check against cuBLAS: relative difference {err:.1e}", flush=True)
    return err < 1e-5


def variants(n, h, v, quack: bool, triton_configs=()):
    """({name: step}, chunk rows) at one shape."""
    dtype = torch.bfloat16
    x, w, dz_full = floor_operands(n, h, v, dtype)
    rows = fused_chunk_rows(n, h, dtype.itemsize, fp32_scratch=True)  # the default's rule (policy.memory_chunk_rows)
    parts = _chunks(x.shape[0], rows)
    dz = dz_full[:rows]  # the chunk's (rows, V) buffer
    grad_x = torch.empty_like(x)
    grad_w = torch.empty_like(w)
    scratch = torch.empty(w.shape, dtype=torch.float32, device=w.device)

    def logits_chunked():
        for part in parts:
            torch.mm(x[part], w.T, out=dz[: part.stop - part.start])

    def input_grad_chunked():
        for part in parts:
            torch.mm(dz[: part.stop - part.start], w, out=grad_x[part])

    def weight_grad_chunked():
        _weight_grad_chunked(scratch, grad_w, dz, x, parts, _cublas_first, _cublas_add)

    def floor():
        torch.mm(x, w.T, out=dz_full)
        torch.mm(dz_full, w, out=grad_x)
        torch.mm(dz_full.T, x, out=grad_w)

    def chunked_floor():
        for i, part in enumerate(parts):
            r = part.stop - part.start
            torch.mm(x[part], w.T, out=dz[:r])
            torch.mm(dz[:r], w, out=grad_x[part])
            (_cublas_first if i == 0 else _cublas_add)(dz[:r].T, x[part], scratch)
        grad_w.copy_(scratch)

    xo, wo, yo = make_problem(n, h, v, dtype)
    xo.requires_grad_()
    wo.requires_grad_()

    fused = LinearCrossEntropyOptions(backend="fused")  # bench_gpu.py's ours[auto]; options=None is the reference

    def ours():
        xo.grad = wo.grad = None
        linear_cross_entropy(xo, wo, yo, options=fused).backward()

    steps = {
        "floor": floor,
        "chunked floor": chunked_floor,
        "ours (fused, auto)": ours,
        "x·Wᵀ whole": lambda: torch.mm(x, w.T, out=dz_full),
        "x·Wᵀ chunked": logits_chunked,
        "dz·W whole": lambda: torch.mm(dz_full, w, out=grad_x),
        "dz·W chunked": input_grad_chunked,
        "dzᵀ·x whole (bf16 out)": lambda: torch.mm(dz_full.T, x, out=grad_w),
        "dzᵀ·x chunked (fp32 scratch, rounded)": weight_grad_chunked,
    }
    for config in triton_configs:
        first, add = _triton_weight_grad(config)
        if not _same_weight_grad(scratch, grad_w, dz, x, parts, first, add):
            continue
        steps[f"dzᵀ·x chunked, Triton reduce-add {config}"] = lambda f=first, a=add: _weight_grad_chunked(
            scratch, grad_w, dz, x, parts, f, a
        )
        steps[f"dzᵀ·x chunked, cuBLAS first + Triton reduce-add {config}"] = lambda a=add: _weight_grad_chunked(
            scratch, grad_w, dz, x, parts, _cublas_first, a
        )
    if quack:
        from quack.gemm_interface import gemm, gemm_add_inplace

        def quack_first(a, b, out):
            gemm(a, b, out=out, tuned=False)

        def quack_add(a, b, out):
            gemm_add_inplace(a, b, out, tuned=False)  # beta = 1.0: TMA reduce-add stores, the scratch not read

        def quack_logits_chunked():
            for part in parts:
                gemm(x[part], w.T, out=dz[: part.stop - part.start], tuned=False)

        steps["dzᵀ·x chunked, QuACK reduce-add"] = lambda: _weight_grad_chunked(
            scratch, grad_w, dz, x, parts, quack_first, quack_add
        )
        steps["x·Wᵀ chunked, QuACK"] = quack_logits_chunked
    return steps, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quack", action="store_true", help="add QuACK's chunked weight-gradient and logits GEMMs")
    ap.add_argument("--triton", action="store_true", help="add the prototype Triton reduce-add weight gradient")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    table = []
    for spec in args.shapes:
        n, h, v = parse_shape(spec)
        steps, rows = variants(n, h, v, args.quack, TRITON_CONFIGS if args.triton else ())
        times = {name: [] for name in steps}
        for step in steps.values():  # compile and warm
            step()
        torch.cuda.synchronize()
        for _ in range(args.rounds):
            for name, step in steps.items():
                times[name].append(time_fn(step, args.reps, warmup=1))
        med = {name: statistics.median(ms) for name, ms in times.items()}
        for name, ms in times.items():
            whole = next((w for w in med if w.split(" ")[0] == name.split(" ")[0] and " whole" in w), "floor")
            table.append((spec, rows, name, med[name], med[name] / med["floor"], med[name] / med[whole], ms))
        del steps
        torch.cuda.empty_cache()
    print("\n| N×H×V | chunk rows | variant | median ms | ×floor | × the whole GEMM (or floor) | windows (ms) |")
    print("|---|---|---|---|---|---|---|")
    for spec, rows, name, ms, xf, xw, windows in table:
        print(
            f"| {spec} | {rows} | {name} | {ms:.3f} | {xf:.3f} | {xw:.3f} | {' '.join(f'{t:.2f}' for t in windows)} |"
        )


if __name__ == "__main__":
    main()
