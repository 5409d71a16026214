"""Fused linear + cross-entropy on a GPU: ours beside the floor and the peers, in one process.

A thin wrapper around ``python -m linear_cross_entropy.bench`` (``src/linear_cross_entropy/bench/``, the one source
of the benchmark) that keeps this script's defaults: results under ``benchmarks/results``, tag ``gpu``, plots only
with ``--plot``. Every flag of the package's CLI works here too (``--help``).

For each shape (N×H×V, bf16 by default): the floor (three cuBLAS GEMMs on shapes padded to multiples of 128:
``x@Wᵀ``, ``dz@W``, ``dzᵀ@x``, 6·N·H·V FLOPs), eager (``F.cross_entropy((x@Wᵀ).float(), y)``), torch.compile of
eager, ours under each acc_policy, and Liger-Kernel / cut-cross-entropy when importable. Inputs as in
``shared/anchors.md``: x ~ N(0, 1), W ~ N(0, 4/H), 5% of targets ignored. Reported per method: median fwd+bwd time
(CUDA events), ×floor, peak memory beyond inputs and the two gradients, and relative L2 errors of the loss,
grad_input and grad_weight against a float64 computation. Prints a table last; writes CSV (and PNG plots with
``--plot``) under ``--out``. Benchmarks measure; they do not assert.

    python benchmarks/bench_gpu.py --shapes 8192x4096x128256 16384x2048x131072 --out benchmarks/results
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from linear_cross_entropy.bench import main as bench_main  # noqa: E402


def main(argv=None):
    return bench_main(argv, prog="benchmarks/bench_gpu.py", out="benchmarks/results", tag="gpu", plot=False)


if __name__ == "__main__":
    sys.exit(main())
