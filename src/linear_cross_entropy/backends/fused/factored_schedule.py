r"""The exponential GEMM's tile order and where each tile's partial goes: one source for both kernels and the host.

Both exponential GEMMs (:mod:`.factored_kernels`' plain-Triton one and :mod:`.factored_gluon`'s) are persistent:
``W`` workers (a program, or one consumer warpgroup of a CTA) walk the tiles ``t = w, w + W, w + 2W, ...`` of one
linear order. The order is the grouped one (``GROUP_M`` row blocks walk the vocabulary tiles together, sharing each
``W`` tile through L2), except that the row blocks past the last full group form groups of the powers of two in
their count, largest first (5 → 4 + 1), so that *every* group's size ``g`` divides ``W`` (``GROUP_M`` a power of two
dividing ``W``). Within a group of ``g`` row blocks a worker's tiles are ``i ≡ i_0 (mod W)`` (``i`` the tile's index
in the group, ``i = m_local + g·n``), i.e. one row block and the vocabulary tiles ``n ≡ s (mod W/g)``: so

    slot(tile) = n mod (W/g)

names, for each row, a set of tiles one worker handles back to back. The worker sums their exponentials in
registers and stores one partial per slot when it reaches the set's last tile (``n + W/g ≥`` the tile count):
``min(W/g, tiles_n)`` partials a row instead of one per 128-class tile (33 instead of 1187 at V = 151936 on a
132-SM H100) — deterministic, no atomics, and the tile order of the full groups unchanged.

The functions are plain Python on integers (the host's allocation and the tests call them as they are) written in
the operators Triton and Gluon share; :data:`tile_schedule_jit` and the Gluon module wrap the same source.
"""

from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (the interpreter patches the jit functions' module through it)

from ..grid import cdiv

__all__ = ["group_size", "tile_schedule", "group_size_jit", "tile_schedule_jit", "slots", "largest_group"]


def group_size(m, tiles_m, GROUP_M):
    """The number of row blocks in row block ``m``'s group (``GROUP_M`` ≤ 8, a power of two). Past the full groups
    (``rem = tiles_m mod GROUP_M`` row blocks split into powers of two, largest first), ``m``'s group is the bit
    where ``m − full_m`` and ``rem`` first differ (``m − full_m < rem``). Branch-free, for vectors of rows too."""
    full_m = tiles_m // GROUP_M * GROUP_M
    in_full = m < full_m
    d = (m - full_m) ^ (tiles_m - full_m)  # in 1..7 past the full groups
    return in_full * GROUP_M + (1 - in_full) * (1 + (d >= 2) + 2 * (d >= 4))


def tile_schedule(tile, tiles_m, tiles_n, GROUP_M, WORKERS):
    """``(pid_m, pid_n, slot, last)`` of linear tile ``tile``: its row and vocabulary blocks, its partial's slot, and
    whether it is the last tile of its slot (its worker then stores the slot's partial). ``group_size``'s
    arithmetic, inlined: a jit function cannot call a plain one."""
    full_m = tiles_m // GROUP_M * GROUP_M
    full_tiles = full_m * tiles_n
    in_full = tile < full_tiles
    # a row block of the tile's group: the group's first (full groups), or one inside it (past them)
    m = in_full * (tile // (GROUP_M * tiles_n) * GROUP_M) + (1 - in_full) * (full_m + (tile - full_tiles) // tiles_n)
    d = (m - full_m) ^ (tiles_m - full_m)
    size = in_full * GROUP_M + (1 - in_full) * (1 + (d >= 2) + 2 * (d >= 4))
    first_m = m - (m - (1 - in_full) * full_m) % size
    i = tile - first_m * tiles_n
    pid_n = i // size
    per_slot = WORKERS // size
    return first_m + i % size, pid_n, pid_n % per_slot, pid_n + per_slot >= tiles_n


group_size_jit = triton.jit(group_size)
tile_schedule_jit = triton.jit(tile_schedule)


def largest_group(workers: int, group_m: int) -> int:
    """The largest power of two ≤ ``group_m`` dividing ``workers`` (the schedule's ``GROUP_M``)."""
    return min(group_m, workers & -workers)


def slots(rows: int, block_m: int, tiles_n: int, group_m: int, workers: int) -> int:
    """Partials a row, at most, for a chunk of ``rows`` rows: ``W / g`` for its smallest group ``g``, at most one
    a vocabulary tile."""
    tiles_m = cdiv(rows, block_m)
    rem = tiles_m % group_m
    smallest = rem & -rem if rem else group_m
    return min(workers // smallest, tiles_n)
