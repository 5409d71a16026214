"""Compile the warp-specialised Gluon ``dz·W`` of ``grad_gemm_pingpong.py`` for sm_90 without a GPU; resource report.

    PYTHONPATH=/tmp/t36 python benchmarks/gluon/compile_grad_pingpong.py [--dump DIR] [--only LABEL_SUBSTRING]

Per configuration: shared memory, registers, stack, SASS counts of HGMMA / MUFU.EX2 / LDL / STL, the register
reconfigurations (``USETMAXREG``), and ptxas's ``-v`` verdict on the wgmma pipeline (any "serialized" warning),
through ``compile_grad.compile_one`` (imported, unchanged).
"""

import argparse
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grad_gemm_pingpong as pp  # noqa: E402
from compile_grad import compile_one, report  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    import triton

    print("triton", triton.__version__, "target sm_90 (cuda 90), bf16")
    r, v, h = 1024, 50257, 896
    vpad = -(-v // 64) * 64
    z = torch.empty(r, vpad, dtype=torch.bfloat16)[:, :v]
    w = torch.empty(v, h, dtype=torch.bfloat16)
    ptrs = dict(target_ptr=torch.empty(r, dtype=torch.int64), lse_ptr=torch.empty(r), coef_ptr=torch.empty(3, r))
    ints = dict(n_rows=r, n_units=32, tiles_n=4, splits=1, k_steps=786, steps_per_split=786, out_rows_per_split=0)
    runs = []
    for cfg in (pp.DEFAULT, pp.PingPongConfig(pingpong=False), pp.PingPongConfig(stages=3)):
        for out_dtype in (torch.bfloat16, torch.float32):
            for smooth in (False, True):
                if cfg is not pp.DEFAULT and (out_dtype == torch.float32 or smooth):
                    continue
                runs.append((cfg, out_dtype, smooth))
    ok = True
    for cfg, out_dtype, smooth in runs:
        label = f"{cfg} out={str(out_dtype)[6:]} smoothing={int(smooth)}"
        if args.only and args.only not in label:
            continue
        out = torch.empty(r, h, dtype=out_dtype)
        zd, wd, od = pp.descriptors(z, w, out, cfg)
        consts = dict(
            HAS_SMOOTHING=smooth,
            PINGPONG=cfg.pingpong,
            NUM_STAGES=cfg.stages,
            CONSUMER_REGS=cfg.consumer_regs,
            PRODUCER_REGS=cfg.producer_regs,
        )
        try:
            res = compile_one(
                pp._grad_x_pp_kernel,
                dict(z_desc=zd, w_desc=wd, out_desc=od, **ptrs, **ints),
                consts,
                cfg.maxnreg,
                4,
                args.dump,
                re.sub(r"[^A-Za-z0-9]+", "_", label),
            )
        except Exception as e:  # noqa: BLE001 - reported, the others go on
            ok = False
            msg = str(e).strip().splitlines()
            print(f"{label}: FAILED {type(e).__name__}: {' | '.join(msg[-8:])[:2000]}", flush=True)
            continue
        ok &= report(label, res, need_setmaxnreg=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
