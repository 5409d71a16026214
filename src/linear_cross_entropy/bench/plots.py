"""PNG plots of benchmark rows (dicts with the CSV's columns); ``matplotlib`` is imported only when plotting.

- ``{tag}_by_shape.png``: ×floor and extra memory of every method at every shape (always, when there are rows).
- ``{tag}_over_N.png`` (×floor and extra memory) and ``{tag}_over_V.png`` / ``{tag}_over_H.png`` (×floor): a
  sweep over one dimension with the other two fixed, when the rows hold one (at least two values of it; where
  several sweeps over the same dimension exist, the longest).

With rows of more than one dtype, each dtype gets its own files (``{tag}_{dtype}_...``).
"""

from __future__ import annotations

import collections
import os

_AXES = ("N", "H", "V")
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
_YLABEL = {"x_floor": "fwd+bwd time / three-GEMM floor", "extra_mib": "peak MiB beyond inputs and grads"}


def _dims(row):
    return dict(zip(_AXES, (int(t) for t in row["shape"].split("x"))))


def _number(v):
    return None if v in ("", None) else float(v)


def _sweep(rows, axis):
    """{method: [(value of ``axis``, row)]} over the longest sweep of ``axis`` (the other dimensions fixed)."""
    groups = collections.defaultdict(set)
    for r in rows:
        d = _dims(r)
        groups[tuple(d[a] for a in _AXES if a != axis)].add(d[axis])
    if not groups:
        return {}
    fixed, values = max(groups.items(), key=lambda kv: len(kv[1]))
    if len(values) < 2:
        return {}
    out = collections.defaultdict(list)
    for r in rows:
        d = _dims(r)
        if tuple(d[a] for a in _AXES if a != axis) == fixed:
            out[r["method"]].append((d[axis], r))
    return out


def _colors(plt, rows):
    methods = sorted({r["method"] for r in rows})
    return {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}


def _plot_sweeps(plt, rows, out_dir, prefix, title, colors):
    paths = []
    for axis, metrics in (("N", ("x_floor", "extra_mib")), ("V", ("x_floor",)), ("H", ("x_floor",))):
        series = _sweep(rows, axis)
        if not series:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for method, pts in sorted(series.items()):
                pts = [(k, _number(r[metric])) for k, r in sorted(pts, key=lambda p: p[0])]
                pts = [p for p in pts if p[1] is not None]
                if not pts or (metric == "extra_mib" and method.startswith("floor")):
                    continue
                style = "-" if method.startswith("ours") else "--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=method, color=colors[method])
            ax.set_xscale("log", base=2)
            if metric == "extra_mib" and ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):
                ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(_YLABEL[metric])
            ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{title}, over {axis}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_over_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_by_shape(plt, rows, out_dir, prefix, title, colors):
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["shape"], r["method"]): r for r in rows}
    metrics = ("x_floor", "extra_mib")
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(shapes) * len(metrics)), 4.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        positive = True
        for i, method in enumerate(methods):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                r = value.get((shape, method))
                y = _number(r[metric]) if r is not None else None
                if y is None or (metric == "extra_mib" and method.startswith("floor")):
                    continue
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(y)
                positive &= y > 0
            if xs:
                ax.bar(xs, ys, width, label=method, color=colors[method])
        ax.set_xticks(range(len(shapes)), [s.replace("x", "×") for s in shapes])
        ax.set_xlabel("N×H×V")
        ax.set_ylabel(_YLABEL[metric])
        if metric == "x_floor":
            ax.axhline(1.0, color="black", lw=0.8)
        elif positive and ax.patches:
            ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_by_shape.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_results(rows, out_dir, tag):
    """Write the plots of ``rows`` under ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    colors = _colors(plt, rows)
    by_dtype = collections.defaultdict(list)
    for r in rows:
        by_dtype[r.get("dtype") or "bfloat16"].append(r)  # CSVs written before the dtype column were all bf16
    paths = []
    for dtype, dtype_rows in by_dtype.items():
        prefix = tag if len(by_dtype) == 1 else f"{tag}_{dtype}"
        devices = sorted({r.get("device") or "cuda" for r in dtype_rows})
        title = f"{tag}: linear + cross-entropy, ours {_our_backends(dtype_rows)}, {_SHORT.get(dtype, dtype)}, {'/'.join(devices)}"
        paths += _plot_by_shape(plt, dtype_rows, out_dir, prefix, title, colors)
        paths += _plot_sweeps(plt, dtype_rows, out_dir, prefix, title, colors)
    return paths


def _our_backends(rows):
    """The backends of our rows as the method labels name them (:mod:`.peers`: ``ours-chunked[auto]`` -> chunked,
    ``ours[reference]`` -> reference, ``ours[auto]`` -> fused), e.g. ``"chunked/reference"``."""
    names = set()
    for r in rows:
        family, bracket, spec = r["method"].partition("[")
        if family == "ours":
            names.add("reference" if spec == "reference]" else "fused")
        elif family.startswith("ours-") and bracket:
            names.add(family.removeprefix("ours-"))
    return "/".join(sorted(names)) or "(none)"


def read_csv(path):
    """Rows of a CSV written by the benchmark (numbers as floats, empty cells as ``""``)."""
    import csv

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("ms", "x_floor", "extra_mib", "loss_err", "dx_err", "dw_err", "first_call_s"):
                if k in r:
                    r[k] = float(r[k]) if r[k] else ""
            rows.append(r)
    return rows


def main(argv=None, **defaults):
    """``python -m linear_cross_entropy.bench.plots CSV... --out DIR --tag TAG``: plot benchmark CSVs together."""
    import argparse

    ap = argparse.ArgumentParser(description="Plot CSVs written by the benchmark together.")
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--tag", default="bench")
    ap.set_defaults(**defaults)
    args = ap.parse_args(argv)
    rows = []
    for path in args.csv:
        rows += read_csv(path)
    print(plot_results(rows, args.out, args.tag))


if __name__ == "__main__":
    main()
