"""Compile the Gluon kernels of ``stats_gemm.py`` for sm_90 without a GPU and print their resource reports.

    PYTHONPATH=/tmp/t36 python benchmarks/gluon/compile_check.py [--dump DIR]

Per kernel/configuration: shared memory, registers, stack, and the SASS counts of HGMMA, MUFU.EX2, LDL/STL and
the register reconfigurations (``USETMAXREG``: warp specialisation took effect), with the values they set.
``--dump DIR`` writes the TTGIR, PTX and SASS of each configuration there.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import combine as gc  # noqa: E402
import stats_gemm as sg  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _run(flag: str, path: str) -> str:
    return subprocess.run([os.path.join(_BIN, "cuobjdump"), flag, path], capture_output=True, text=True).stdout


def compile_one(
    fn,
    args: dict,
    consts: dict,
    maxnreg: int | None,
    dump: str | None,
    label: str,
    source=GluonASTSource,
    num_warps: int = 4,
):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = args[name] if isinstance(args[name], str) else mangle_type(args[name])
    src = source(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    options = dict(num_warps=num_warps) | ({} if maxnreg is None else dict(maxnreg=maxnreg))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _run("--dump-resource-usage", f.name)
        sass = _run("--dump-sass", f.name)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{label}.{ext}"), "w") as f:
                f.write(kernel.asm[ext])
        with open(os.path.join(dump, f"{label}.sass"), "w") as f:
            f.write(sass)
    res = next((line.strip() for line in usage.splitlines() if "REG" in line), "?")
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    setmax = sorted(
        {
            (kind, int(v, 16))
            for kind, v in re.findall(r"USETMAXREG\.(\w+)\.CTAPOOL\s+(?:UP\d+,\s*)?(0x[0-9a-f]+)", sass)
        }
    )
    counts = {op: len(re.findall(rf"\b{re.escape(op)}\b", sass)) for op in ("HGMMA", "HMMA", "LDL", "STL")}
    counts["MUFU.EX2"] = sass.count("MUFU.EX2")
    counts["SYNCS"] = sass.count("SYNCS.")
    ptx = kernel.asm["ptx"]
    return dict(
        smem=kernel.metadata.shared,
        regs=regs.group(1) if regs else "?",
        stack=stack.group(1) if stack else "?",
        warps=kernel.metadata.num_warps,
        setmaxnreg=setmax,
        wgmma_ptx=ptx.count("wgmma.mma_async"),
        **counts,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    print("triton", triton.__version__, "target sm_90 (cuda 90), bf16")
    m, k, n = 1024, 896, 50257
    x = torch.empty(m, k, dtype=torch.bfloat16)
    w = torch.empty(n, k, dtype=torch.bfloat16)
    z = sg.row_padded(m, n, torch.bfloat16, "cpu")
    ptr_args = dict(
        bias_ptr=torch.empty(n, dtype=torch.bfloat16),
        target_ptr=torch.empty(m, dtype=torch.int64),
        partials_ptr=torch.empty(3, 1, m),
        z_y_ptr=torch.empty(m),
    )
    configs = [sg.DEFAULT, sg.Config(stages=5), sg.WIDE]
    ok = True
    for cfg in configs:
        xd, wd, zd = sg.descriptors(x, w, z, cfg)
        common = dict(
            NUM_STAGES=cfg.stages, GROUP_M=cfg.group_m, CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs
        )
        runs = [("plain", sg._plain_gemm_kernel, {}, {})]
        for bias in (False, True):
            for smooth in (False, True):
                runs.append(
                    (
                        f"stats bias={int(bias)} smooth={int(smooth)}",
                        sg._stats_gemm_kernel,
                        ptr_args,
                        dict(HAS_BIAS=bias, HAS_SMOOTHING=smooth),
                    )
                )
        for name, fn, extra, consts in runs:
            label = f"{name} {cfg}"
            try:
                r = compile_one(
                    fn,
                    dict(x_desc=xd, w_desc=wd, z_desc=zd, **extra),
                    common | consts,
                    cfg.maxnreg,
                    args.dump,
                    re.sub(r"[^A-Za-z0-9]+", "_", label),
                )
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                ok = False
                msg = str(e).strip().splitlines()
                print(f"{label}: FAILED {type(e).__name__}: {' | '.join(msg[-6:])[:1500]}")
                continue
            spill = "none" if (r["LDL"] + r["STL"] == 0 and r["stack"] == "0") else "SPILLS"
            fits = "fits" if r["smem"] <= 232448 else "OVER the 232448 B limit"
            ok &= r["smem"] <= 232448 and spill == "none"
            print(
                f"{label}: smem {r['smem']} B ({fits}), {r['warps']} warps, REG {r['regs']}, stack {r['stack']}, "
                f"spills {spill} (LDL {r['LDL']} STL {r['STL']}), HGMMA {r['HGMMA']} (ptx wgmma {r['wgmma_ptx']}), "
                f"HMMA {r['HMMA']}, MUFU.EX2 {r['MUFU.EX2']}, setmaxnreg {r['setmaxnreg'] or 'NONE'}"
            )
    # the library's factored exponential GEMM (backends/fused/factored_gluon.py, issue 20 v16)
    from linear_cross_entropy.backends.fused import factored_gluon as fg

    for bias in (False, True):
        label = f"library exp GEMM bias={int(bias)} 128x128x64 s{fg._STAGES}"
        r = compile_one(
            fg._exp_logits_gluon_kernel,
            dict(
                x_desc=fg._descriptor(x, (fg.BLOCK_M, fg.BLOCK_K)),
                w_desc=fg._descriptor(w, (fg.BLOCK_N, fg.BLOCK_K)),
                e_desc=fg._descriptor(z, (fg.BLOCK_M, fg.BLOCK_N)),
                bias_ptr=ptr_args["bias_ptr"],
                shift_ptr=ptr_args["z_y_ptr"],
                partials_ptr=torch.empty(1, m),
                logit_scale=0.5,
            ),
            dict(
                HAS_BIAS=bias,
                CLAMP=50.0,
                NUM_STAGES=fg._STAGES,
                GROUP_M=fg.GROUP_M,
                CONSUMER_REGS=fg._CONSUMER_REGS,
                PRODUCER_REGS=fg._PRODUCER_REGS,
            ),  # fmt: skip
            fg._MAXNREG,
            args.dump,
            re.sub(r"[^A-Za-z0-9]+", "_", label),
        )
        spill = "none" if (r["LDL"] + r["STL"] == 0 and r["stack"] == "0") else "SPILLS"
        ok &= r["smem"] <= 232448 and spill == "none"
        print(
            f"{label}: smem {r['smem']} B, REG {r['regs']}, stack {r['stack']}, spills {spill}, HGMMA {r['HGMMA']}, "
            f"MUFU.EX2 {r['MUFU.EX2']}, setmaxnreg {r['setmaxnreg'] or 'NONE'}"
        )
    # the combine (plain Triton): partials → loss, lse, dz's coefficients
    ptr = dict(
        partials_ptr="*fp32",
        z_y_ptr="*fp32",
        target_ptr="*i64",
        ce_scale_ptr="*fp32",
        z_scale_ptr="*fp32",
        loss_ptr="*fp32",
        lse_ptr="*fp32",
        coefs_ptr="*fp32",
        n_rows="i32",
        n_tiles="i32",
        plane="i32",
        stride_ce="i32",
        stride_zs="i32",
        num_classes="i32",
        ignore_index="i32",
        one_minus_eps="fp32",
        eps_over_c="fp32",
        w_sum="fp32",
        coef_base="fp32",
        two_z_loss="fp32",
    )
    for smooth in (False, True):
        label = f"combine smooth={int(smooth)} BLOCK_T=64 BLOCK_R=16, 4 warps"
        try:
            r = compile_one(
                gc._combine_kernel,
                ptr,
                dict(HAS_SMOOTHING=smooth, HAS_Z_LOSS=False, BLOCK_T=64, BLOCK_R=16),
                None,
                args.dump,
                re.sub(r"[^A-Za-z0-9]+", "_", label),
                source=ASTSource,
            )
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"{label}: FAILED {type(e).__name__}: {' | '.join(str(e).strip().splitlines()[-6:])[:1500]}")
            continue
        spill = "none" if (r["LDL"] + r["STL"] == 0 and r["stack"] == "0") else "SPILLS"
        ok &= spill == "none"
        print(
            f"{label}: smem {r['smem']} B, REG {r['regs']}, stack {r['stack']}, spills {spill}, "
            f"MUFU.EX2 {r['MUFU.EX2']}"
        )
    # the library's combine (backends/fused/factored_kernels.py), with the refit inside (issue 20 v18d)
    from linear_cross_entropy.backends.fused import factored
    from linear_cross_entropy.backends.fused.factored_kernels import _factored_combine_kernel

    names = _factored_combine_kernel.fn.arg_names
    sig = {n: "*fp32" for n in names if n.endswith("_ptr")}
    sig.update(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", e_ptr="*bf16", target_ptr="*i64", refit_ptr="*i8")
    sig.update({n: "i32" for n in names if n.startswith(("n_", "stride_")) or n == "ignore_index"})
    sig.update({n: "fp32" for n in ("z_loss", "label_smoothing", "logit_scale")})
    for bias, smooth in ((False, False), (True, True)):
        label = f"library combine + refit bias={int(bias)} smooth={int(smooth)}"
        consts = dict(
            HAS_BIAS=bias, HAS_CLASS_WEIGHT=smooth, HAS_Z_LOSS=smooth, HAS_SMOOTHING=smooth, CLAMP=factored.CLAMP,
            BLOCK_T=factored._COMBINE_BLOCK_T, BLOCK_R=factored._COMBINE_BLOCK_R, BLOCK_V=factored._REFIT_BLOCK_V,
            BLOCK_H=factored._REFIT_BLOCK_H, INPUT_PRECISION="tf32", TILE_M=128, TILE_N=128, GROUP_M=8,
        )  # fmt: skip
        r = compile_one(
            _factored_combine_kernel.fn, sig, consts, None, args.dump, re.sub(r"[^A-Za-z0-9]+", "_", label),
            source=ASTSource, num_warps=factored._COMBINE_WARPS,
        )  # fmt: skip
        spill = "none" if (r["LDL"] + r["STL"] == 0 and r["stack"] == "0") else "SPILLS"
        ok &= spill == "none"
        print(f"{label}: REG {r['regs']}, stack {r['stack']}, spills {spill}, HMMA {r['HMMA']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
