"""Plots of benchmark rows (dicts as written by bench_gpu.py): ×floor and extra memory over N, ×floor over V."""

from __future__ import annotations

import collections
import os

_BASE = {"N": (4096, 128256), "V": (8192, 4096)}  # the fixed dimensions of each sweep: (H, V) and (N, H)


def _series(rows, axis):
    """{method: [(value of the swept dimension, row)]} over the shapes of the ``axis`` sweep (others fixed)."""
    out = collections.defaultdict(list)
    for r in rows:
        n, h, v = (int(t) for t in r["shape"].split("x"))
        if (axis == "N" and (h, v) == _BASE["N"]) or (axis == "V" and (n, h) == _BASE["V"]):
            out[r["method"]].append(({"N": n, "V": v}[axis], r))
    return out


def plot_results(rows, out_dir, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    paths = []
    for axis, metrics in (("N", ("x_floor", "extra_mib")), ("V", ("x_floor",))):
        if len({k for pts in _series(rows, axis).values() for k, _ in pts}) < 2:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for method, pts in sorted(_series(rows, axis).items()):
                pts = [(k, r[metric]) for k, r in sorted(pts, key=lambda p: p[0]) if r[metric] not in ("", None)]
                if not pts or (metric == "extra_mib" and method.startswith("floor")):
                    continue
                style = "-" if method.startswith("ours") else "--"
                ax.plot(
                    [p[0] for p in pts],
                    [float(p[1]) for p in pts],
                    style,
                    marker="o",
                    label=method,
                    color=colors[method],
                )
            ax.set_xscale("log", base=2)
            if metric == "extra_mib":
                ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(
                {"x_floor": "fwd+bwd time / three-GEMM floor", "extra_mib": "peak MiB beyond inputs and grads"}[metric]
            )
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{tag}: fused linear + cross-entropy, bf16, over {axis}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{tag}_over_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main():
    """``python benchmarks/plots.py CSV... --out DIR --tag TAG``: plot CSVs written by bench_gpu.py together."""
    import argparse
    import csv

    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="h100")
    args = ap.parse_args()
    rows = []
    for path in args.csv:
        for r in csv.DictReader(open(path)):
            for k in ("x_floor", "extra_mib"):
                r[k] = float(r[k]) if r[k] else ""
            rows.append(r)
    print(plot_results(rows, args.out, args.tag))


if __name__ == "__main__":
    main()
