"""The benchmark CLI (``python -m linear_cross_entropy.bench``) on tiny CPU shapes: it runs, writes its CSV (and
its plots where matplotlib is installed). Benchmarks measure; nothing here looks at a timing."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from linear_cross_entropy.bench import main
from linear_cross_entropy.bench.measure import CSV_FIELDS, parse_shape

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny GEMMs gain nothing from threads, and on a busy machine waiting for a second one costs the most."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _run(tmp_path, *extra, shapes=("64x32x256",), methods=("eager", "ours")):
    argv = ["--device", "cpu", "--shapes", *shapes, "--methods", *methods, "--reps", "1"]
    assert main([*argv, "--out", str(tmp_path), "--tag", "tiny", *extra]) == 0
    with open(tmp_path / "tiny.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_cli_writes_csv_and_plots(tmp_path, capsys):
    fields, rows = _run(tmp_path, methods=("eager", "ours", "torch built-in"))
    assert tuple(fields) == CSV_FIELDS
    methods = {r["method"] for r in rows}
    assert {"floor (3 GEMMs)", "eager", "ours-chunked[auto]", "ours[reference]"} <= methods
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        assert "torch built-in" in methods
    assert {r["shape"] for r in rows} == {"64x32x256"}
    assert {r["device"] for r in rows} == {"cpu"} and {r["dtype"] for r in rows} == {"float32"}
    for r in rows:
        float(r["ms"]), float(r["x_floor"])  # numbers, whatever their values
        if not r["method"].startswith("floor"):
            for k in ("loss_err", "dx_err", "dw_err"):
                assert float(r[k]) < 1e-4  # float32 against float64: a wiring check, not a benchmark
    out = capsys.readouterr().out
    assert "| N×H×V | method | ms | ×floor | extra MiB | loss err | dX err | dW err | first call s |" in out
    if HAS_MATPLOTLIB:
        assert (tmp_path / "tiny_by_shape.png").stat().st_size > 0


def test_cli_without_tqdm_two_dtypes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the built-in line progress instead of tqdm
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    fields, rows = _run(tmp_path, "--no-plot", "--dtypes", "float32", "bfloat16", "--backends", "chunked")
    assert tuple(fields) == CSV_FIELDS
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert {r["method"] for r in rows} == {"floor (3 GEMMs)", "eager", "ours-chunked[auto]"}
    assert not list(tmp_path.glob("*.png"))
    captured = capsys.readouterr()
    assert "[1/8" in captured.err  # one progress line per step: (floor, reference, 2 methods) x 2 dtypes
    assert "| dtype |" in captured.out


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plots_of_a_sweep(tmp_path):
    from linear_cross_entropy.bench.plots import plot_results, read_csv

    _run(tmp_path, "--no-plot", "--backends", "chunked", shapes=("64x32x256", "128x32x256"), methods=("ours",))
    paths = plot_results(read_csv(tmp_path / "tiny.csv"), str(tmp_path), "again")
    assert sorted(os.path.basename(p) for p in paths) == ["again_by_shape.png", "again_over_N.png"]


def test_plot_title_names_the_backends_that_ran():
    from linear_cross_entropy.bench.plots import _our_backends

    def backends(*methods):
        return _our_backends([{"method": m} for m in methods])

    assert backends("floor (3 GEMMs)", "eager", "ours-chunked[auto]", "ours[reference]") == "chunked/reference"
    assert backends("ours[auto]", "ours[auto,fp32 loss]", "ours-tiled[compact]") == "fused/tiled"


def test_parse_shape():
    assert parse_shape("8192x4096x128256") == (8192, 4096, 128256)
    with pytest.raises(ValueError):
        parse_shape("8192x4096")


def test_help_of_module_and_wrapper(capsys):
    out = subprocess.run(
        [sys.executable, "-m", "linear_cross_entropy.bench", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "--shapes" in out and "--kernel-sweep" in out
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "benchmarks", "bench_gpu.py"))
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    with pytest.raises(SystemExit) as exc:
        bench_gpu.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "benchmarks/bench_gpu.py" in out and "--policies" in out and "--tag" in out


def test_policy_specs():
    import torch

    from linear_cross_entropy.bench.peers import _policy_options

    o = _policy_options("compact:float32@252+fp32-loss", "fused")
    assert (o.backend, o.acc_policy, o.acc_dtype, o.batch_chunk_size, o.loss_dtype) == (
        "fused",
        "compact",
        torch.float32,
        252,
        torch.float32,
    )
    o = _policy_options("auto", "chunked")
    assert (o.acc_policy, o.acc_dtype, o.batch_chunk_size, o.loss_dtype) == ("auto", None, None, None)
    with pytest.raises(ValueError, match="fp32-loss"):
        _policy_options("auto+fp16-loss", "fused")


def test_gpu_peers_are_skipped_on_the_cpu_with_a_note():
    from linear_cross_entropy.bench.peers import FAMILIES, methods

    peers = ("liger", "cut-cross-entropy", "quack")
    assert set(peers) <= set(FAMILIES)
    fns, notes = methods(("eager", *peers), ["auto"], device="cpu")
    assert list(fns) == ["eager"]
    assert sorted(note.split(" skipped")[0] for note in notes) == sorted(peers)
    assert all("CUDA" in note for note in notes)
