"""The benchmark: ``python -m linear_cross_entropy.bench --help`` (console script ``linear-cross-entropy-bench``).

Modules: :mod:`.measure` (problem, float64 reference, timing, memory, one shape's rows), :mod:`.peers` (the
methods compared), :mod:`.plots` (PNG plots, ``matplotlib`` imported lazily) and ``__main__`` (the CLI).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None, prog=None, **defaults) -> int:
    """The CLI (see ``python -m linear_cross_entropy.bench --help``); ``defaults`` override the parser's."""
    from .__main__ import main as _main

    return _main(argv, prog, **defaults)
