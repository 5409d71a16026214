"""Compile the Gluon ``dz·W`` kernel of ``grad_gemm.py`` for sm_90 without a GPU and print resource reports.

    PYTHONPATH=/tmp/t36 python benchmarks/gluon/compile_grad.py [--dump DIR] [--only LABEL_SUBSTRING]

Per configuration: shared memory, registers, stack, SASS counts of HGMMA / MUFU.EX2 / LDL / STL, the register
reconfigurations (``USETMAXREG``), and ptxas's own verdict on the wgmma pipeline: the PTX is re-assembled with
``ptxas -v`` and any "wgmma.mma_async instructions are serialized" warning is reported (register-A wgmma: if ptxas
cannot prove that the next prologue leaves the in-flight wgmma's A registers alone it serialises the pipeline).
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
import grad_gemm as gg  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name, *args) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True)


def compile_one(fn, args: dict, consts: dict, maxnreg, num_warps: int, dump: str | None, label: str):
    sig = {name: ("constexpr" if name in consts else mangle_type(args[name])) for name in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    opts = dict(num_warps=num_warps) | ({} if maxnreg is None else dict(maxnreg=maxnreg))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx_path = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx_path, "w") as f:
            f.write(ptx)
        usage = _tool("cuobjdump", "--dump-resource-usage", cubin).stdout
        sass = _tool("cuobjdump", "--dump-sass", cubin).stdout
        # as Triton runs it (the PTX carries .maxnreg when set), with -v: ptxas's info lines, incl. C7510-C7515
        pv = _tool("ptxas", "-arch=sm_90a", "-v", ptx_path, "-o", os.path.join(d, "again.cubin"))
    ptxas_msgs = pv.stdout + pv.stderr
    serial = [line.strip() for line in ptxas_msgs.splitlines() if "serializ" in line.lower()]
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{label}.{ext}"), "w") as f:
                f.write(kernel.asm[ext])
        with open(os.path.join(dump, f"{label}.sass"), "w") as f:
            f.write(sass)
        with open(os.path.join(dump, f"{label}.ptxas.txt"), "w") as f:
            f.write(ptxas_msgs)
    res = next((line.strip() for line in usage.splitlines() if "REG" in line), "?")
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    setmax = sorted(
        {
            (kind, int(v, 16))
            for kind, v in re.findall(r"USETMAXREG\.(\w+)\.CTAPOOL\s+(?:UP\d+,\s*)?(0x[0-9a-f]+)", sass)
        }
    )
    counts = {op: len(re.findall(rf"\b{re.escape(op)}\b", sass)) for op in ("HGMMA", "HMMA", "LDL", "STL", "LDSM")}
    counts["MUFU.EX2"] = sass.count("MUFU.EX2")
    counts["WARPGROUP.DEPBAR"] = sass.count("WARPGROUP.DEPBAR")
    counts["WARPGROUP.ARRIVE"] = sass.count("WARPGROUP.ARRIVE")
    return dict(
        smem=kernel.metadata.shared,
        regs=regs.group(1) if regs else "?",
        stack=stack.group(1) if stack else "?",
        warps=kernel.metadata.num_warps,
        setmaxnreg=setmax,
        wgmma_ptx=ptx.count("wgmma.mma_async"),
        serial=serial,
        ptxas_rc=pv.returncode,
        **counts,
    )


SMEM_LIMIT = 232448  # bytes of shared memory one H100 block may use


def report(label: str, res: dict, need_setmaxnreg: bool = False) -> bool:
    """Print one configuration's resource line; whether it fits, does not spill, is not serialised by ptxas (and,
    with ``need_setmaxnreg``, reconfigures registers: warp specialisation took effect)."""
    spill = "none" if (res["LDL"] + res["STL"] == 0 and res["stack"] == "0") else "SPILLS"
    fits = "fits" if res["smem"] <= SMEM_LIMIT else f"OVER the {SMEM_LIMIT} B limit"
    print(
        f"{label}: smem {res['smem']} B ({fits}), {res['warps']} warps, REG {res['regs']}, stack {res['stack']}, "
        f"spills {spill} (LDL {res['LDL']} STL {res['STL']}), HGMMA {res['HGMMA']} (ptx wgmma {res['wgmma_ptx']}), "
        f"HMMA {res['HMMA']}, MUFU.EX2 {res['MUFU.EX2']}, LDSM {res['LDSM']}, "
        f"WARPGROUP.ARRIVE {res['WARPGROUP.ARRIVE']} DEPBAR {res['WARPGROUP.DEPBAR']}, "
        f"setmaxnreg {res['setmaxnreg'] or 'none'}, ptxas -v rc {res['ptxas_rc']}, "
        f"wgmma serialisation: {res['serial'] or 'none reported'}",
        flush=True,
    )
    ok = res["smem"] <= SMEM_LIMIT and spill == "none" and not res["serial"]
    return ok and (bool(res["setmaxnreg"]) or not need_setmaxnreg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    print("triton", triton.__version__, "target sm_90 (cuda 90), bf16")
    r, v, h = 1024, 50257, 896
    vpad = -(-v // 64) * 64
    z = torch.empty(r, vpad, dtype=torch.bfloat16)[:, :v]
    w = torch.empty(v, h, dtype=torch.bfloat16)
    ptrs = dict(target_ptr=torch.empty(r, dtype=torch.int64), lse_ptr=torch.empty(r), coef_ptr=torch.empty(3, r))
    ints = dict(n_rows=r, tiles_n=4, splits=1, k_steps=786, steps_per_split=786, out_rows_per_split=0)
    runs = []
    for cfg in (gg.DEFAULT, gg.GradConfig(stages=3)):
        for out_dtype in (torch.bfloat16, torch.float32):
            for store in (False, True):
                for smooth in (False, True):
                    if cfg.stages != gg.DEFAULT.stages and (out_dtype == torch.float32 or smooth):
                        continue
                    runs.append((cfg, out_dtype, store, smooth))
    ok = True
    for cfg, out_dtype, store, smooth in runs:
        label = f"{cfg} out={str(out_dtype)[6:]} STORE_DZ={int(store)} smoothing={int(smooth)}"
        if args.only and args.only not in label:
            continue
        out = torch.empty(r, h, dtype=out_dtype)
        dz = torch.empty(r, vpad, dtype=torch.bfloat16)[:, :v] if store else None
        zd, wd, od, dd = gg.descriptors(z, w, out, dz, cfg)
        consts = dict(HAS_SMOOTHING=smooth, STORE_DZ=store, NUM_STAGES=cfg.stages)
        try:
            res = compile_one(
                gg._grad_x_kernel,
                dict(z_desc=zd, w_desc=wd, out_desc=od, dz_desc=dd, **ptrs, **ints),
                consts,
                None,
                cfg.num_warps,
                args.dump,
                re.sub(r"[^A-Za-z0-9]+", "_", label),
            )
        except Exception as e:  # noqa: BLE001 - reported, the others go on
            ok = False
            msg = str(e).strip().splitlines()
            print(f"{label}: FAILED {type(e).__name__}: {' | '.join(msg[-8:])[:2000]}", flush=True)
            continue
        ok &= report(label, res)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
