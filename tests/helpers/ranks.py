"""Multi-process tests on the CPU: ``run_ranks`` spawns gloo process groups whose workers collect mismatches (lists
of strings) instead of raising, so that no rank leaves the others waiting in a collective."""

from __future__ import annotations

import os

import pytest
import torch

from .compare import within_plain


def free_port() -> int:
    """A TCP port on localhost that is free now (for ``init_process_group``'s ``tcp://`` rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(body, world: int, args: tuple, out_dir, limit_s: float) -> None:
    """Run ``body(rank, world, *args, errors)`` in ``world`` spawned processes joined in a gloo process group.

    ``body`` appends the mismatches it finds to ``errors`` (a list of strings) instead of raising at the first, so
    that no rank leaves the others waiting in a collective; an exception is recorded too. Each rank writes its list
    to ``out_dir/rank{rank}.txt``. Fails the test on any entry, or when the processes still run after ``limit_s``
    seconds (a hang; the process group's own timeout is 60 s), terminating them."""
    import pathlib
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(_rank_main, args=(body, world, free_port(), args, str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + limit_s
    paths = [pathlib.Path(out_dir) / f"rank{r}.txt" for r in range(world)]
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                pytest.fail(f"{world} worker processes still running after {limit_s} s (hang?)")
    except mp.ProcessExitedException:
        # A rank killed by a signal after every rank wrote its report died in gloo's teardown ("terminate called
        # without an active exception" at process exit, seen on CI's 2 cores despite the barrier below): the
        # reports judge the run. A rank killed before writing its report is a real crash.
        if not all(path.exists() for path in paths):
            raise
    reports = [path.read_text() for path in paths]
    failures = [f"rank {r}:\n{text}" for r, text in enumerate(reports) if text]
    assert not failures, "\n\n".join(failures)


def _rank_main(rank, body, world, port, args, out_dir):
    import datetime
    import traceback

    import torch.distributed as dist

    errors = []
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        body(rank, world, *args, errors)
    except Exception:  # noqa: BLE001
        errors.append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(errors))
        if dist.is_initialized():
            # Every rank reaches teardown before any destroys the group: a gloo rank torn down while its peer still
            # had collectives in flight once aborted ("terminate called without an active exception", SIGABRT) after
            # a passing run. A rank stuck in a collective ends at the group's own timeout instead.
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - the errors list already says what went wrong
                pass
            dist.destroy_process_group()


def expect_error(errors, name, exc_type, match, fn):
    """Inside a worker: ``fn()`` must raise ``exc_type`` with ``match`` in its message; a mismatch is recorded."""
    try:
        fn()
    except exc_type as e:
        if match not in str(e):
            errors.append(f"{name}: message {str(e)!r} lacks {match!r}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"{name}: expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    else:
        errors.append(f"{name}: no error")


def check_close(errors, name, actual, expected):
    """Inside a worker: a float64 result equal to the single-process one but for the order of its sums."""
    try:
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)
    except AssertionError as e:
        errors.append(f"{name}: {e}")


def check_within_plain(errors, name, actual, plain, expected):
    """Inside a worker: one low-precision result within :func:`helpers.within_plain`'s bound (plain PyTorch's error
    in its dtype), a failure recorded under ``name``."""
    try:
        failures = within_plain((actual,), (plain,), (expected,), plain.dtype, names=(name,))
    except AssertionError as e:  # dtype or shape mismatch
        failures = [f"{name}: {e}"]
    errors.extend(failures)
