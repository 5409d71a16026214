"""Compile the softmax-fused GEMMs for sm_90 on a machine without a GPU and print their resource reports.

Triton compiles for a named target without a driver, and its wheel ships ptxas and cuobjdump: per kernel and
tile configuration of ``bench_softmax_gemm_gpu.py``, the shared memory, registers, stack (spills), and the SASS
counts of wgmma (``HGMMA``), older MMAs (``HMMA``), ``MUFU.EX2`` and local loads/stores. Costs no device time; the
local Triton may differ from the GPU machine's (compare the versions printed).

    python benchmarks/compile_softmax_gemm_sm90.py [--dtype bf16] [--variants t256 t512 t128]
"""

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from bench_softmax_gemm_gpu import VARIANTS  # noqa: E402 - the configurations the GPU benchmark times

from linear_cross_entropy.backends.fused import softmax_gemm_kernels as K  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_ROWS = {"target_ptr": "*i64", "lse_ptr": "*fp32", "coef_ptr": "*fp32"}
_DIMS = {"n_rows": "i32", "n_classes": "i32", "n_features": "i32"}


def report(fn, sig: dict, consts: dict, warps: int, stages: int) -> str:
    jit = fn if isinstance(fn, triton.runtime.JITFunction) else fn.fn  # fn.fn: under @triton.heuristics
    sig = sig | {k: "constexpr" for k in consts if k not in sig}
    src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # noqa: BLE001 - reported, the other configurations go on
        return f"FAILED {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _run("--dump-resource-usage", f.name)
        sass = _run("--dump-sass", f.name)
    regs = next((line.strip() for line in usage.splitlines() if "REG" in line), "?")
    counts = ", ".join(f"{op} {sass.count(op)}" for op in ("HGMMA", "HMMA", "MUFU.EX2", "LDL", "STL"))
    return f"smem {kernel.metadata.shared} B; {' '.join(regs.split()[:2])}; {counts}"


def _run(flag: str, path: str) -> str:
    return subprocess.run([os.path.join(_BIN, "cuobjdump"), flag, path], capture_output=True, text=True).stdout


def _tile(t) -> tuple:
    """``(block_m, block_n, block_k, warps, stages)`` of one kernel's :class:`GemmTiles`."""
    return t.block_m, t.block_n, t.block_k, t.num_warps, t.num_stages


def _desc(dt, rows, cols):
    return f"tensordesc<{dt}[{rows}, {cols}]>"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    dt = args.dtype
    print("triton", triton.__version__, "target sm_90,", dt)
    for name in args.variants:
        config = VARIANTS[name]
        m, n, k, w, s = _tile(config.stats)
        sig = {"x_desc": _desc(dt, m, k), "w_desc": _desc(dt, n, k), "z_desc": _desc(dt, m, n)}
        sig |= {"target_ptr": "*i64", "partials_ptr": "*fp32", "z_y_ptr": "*fp32"} | _DIMS
        common = dict(HAS_SMOOTHING=False, GROUP_M=8, INPUT_PRECISION="tf32")
        consts = common | dict(bias_ptr=None, HAS_BIAS=False, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
        print(f"{name} stats {m}x{n}x{k} w{w} s{s}:", report(K._logits_stats_kernel, sig, consts, w, s))
        (m, n, k, w, s), out = _tile(config.input_grad), dt
        for store in (False, True):
            sig = {"z_desc": _desc(dt, m, k), "w_desc": _desc(dt, k, n), "out_desc": _desc(out, m, n // 2)}
            sig |= _ROWS | _DIMS
            extra = {"dz_desc": _desc(dt, m, k)} if store else {}
            consts = (
                common | dict(STORE_DZ=store, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k) | ({} if store else {"dz_desc": None})
            )
            label = f"{name} dz·W{' +dz' if store else ''} {m}x{n}x{k} w{w} s{s}:"
            print(label, report(K._input_grad_kernel, sig | extra, consts, w, s))
        m, n, k, w, s = _tile(config.weight_grad)
        for acc, out in ((False, dt), (False, "fp32"), (True, "fp32")):  # grad_W; the scratch's first chunk; +=
            sig = {"z_desc": _desc(dt, k, m), "x_desc": _desc(dt, k, n), "out_desc": _desc(out, m, n // 2)}
            sig |= _ROWS | _DIMS
            consts = common | dict(ACCUMULATE=acc, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
            label = f"{name} dzᵀ·x {out}{' +=' if acc else ''} {m}x{n}x{k} w{w} s{s}:"
            print(label, report(K._weight_grad_kernel, sig, consts, w, s))


if __name__ == "__main__":
    main()
