"""Plots of benchmark CSVs: a thin wrapper around ``linear_cross_entropy.bench.plots`` (the one source).

python benchmarks/plots.py benchmarks/results/h100_main.csv benchmarks/results/h100_sweep_N.csv --tag h100
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy.bench.plots import main as _plots_main  # noqa: E402
from linear_cross_entropy.bench.plots import plot_results, read_csv  # noqa: E402, F401  (re-exported)


def main(argv=None):
    _plots_main(argv, out="benchmarks/results", tag="h100")


if __name__ == "__main__":
    main()
