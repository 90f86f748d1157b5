"""Smoke tests of the benchmarks: the machinery end to end on a tiny head, in seconds.

``run_all.py --preset tiny`` runs every suite in-process (one thread, a plain-Python background
load), then the report; one task also goes through a worker
process, the path the real runs take. The heavy runs live in ``benchmarks/`` and are never run
by the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

harness = pytest.importorskip("harness")
report = pytest.importorskip("report")
run_all = pytest.importorskip("run_all")
baselines = pytest.importorskip("baselines")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    written = run_all.main(["--preset", "tiny", "--threads", "1", "--out", str(out),
                            "--loads", "none,python", "--readme", "", "--no-report"])
    assert written == [out / f"{s}_cpu_tiny.csv" for s in report.SUITES]
    for path in written:
        with open(path) as f:
            assert tuple(f.readline().strip().split(",")) == harness.COLUMNS
    return out, report.load_tables(out, "cpu_tiny")


def test_tiny_suites_write_verified_rows(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    _, tables = tiny_run
    rows = [r for rs in tables.values() for r in rs]
    measured = [r for r in rows if not r["skip_reason"]]
    assert {r["method"] for r in measured} >= {"flat", "flat_bottleneck", "adaptive",
                                              "gather_bmm", "hsoftmax", "hsoftmax_sparse"}
    for r in rows:
        assert r["torch"] and r["device"] == "cpu" and r["threads"] == "1" and r["date"]
        assert r["dtype"] == "float32" and r["batch"] in ("16", "128")
    for r in measured:
        assert 0 < float(r["q25_ms"]) <= float(r["time_ms"]) <= float(r["q75_ms"]), r
        assert r["verified"] == "True", r
    # the baseline of issue 2: measured here, or skipped with the reason on an older torch
    (lce,) = [r for r in tables["train"] if r["method"] == "linear_ce"]
    assert lce["time_ms"] or "linear_cross_entropy" in lce["skip_reason"]
    via = [r for r in tables["inference"] if r["variant"] == "via_log_probs"]
    assert len(via) == 1 and via[0]["note"] == "log_probs(x).topk(k)"
    assert {r["contention"] for r in tables["contention"]} == {"none", "python"}
    big = [r for r in tables["scaling"] if r["batch"] == "128"]  # 8 x the batch, for linear_ce
    assert {r["method"] for r in big} == {"flat", "linear_ce", "hsoftmax"}


def test_report_ratios_summary_and_plots(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, tables = tiny_run
    train = tables["train"]
    flat = next(r for r in train if r["method"] == "flat")
    assert report.ratio(report.reference(train, flat, "flat"), flat) == pytest.approx(1.0)
    sparse = next(r for r in train if r["method"] == "hsoftmax_sparse")
    assert report.reference(train, sparse, "flat") is flat  # against the dense flat step
    written = report.main(["--results", str(out), "--readme", ""])
    assert out / "summary_cpu_tiny.md" in written and out / "train_cpu_tiny.png" in written
    summary = (out / "summary_cpu_tiny.md").read_text()
    for t in report.TARGETS:
        assert t.what in summary
    assert "## Under CPU contention" in summary and "python / quiet" in summary
    assert "| 100 | 128 |" in summary  # linear_ce beside flat at 8 x the batch
    head = report.headline(tables)
    assert head.count("\n") == len(report.HEADLINES) + 2
    assert "not measured" in head  # the tiny scaling run has no 1M or 10M classes


def test_worker_process_reports_time_and_peak_memory() -> None:
    shape = baselines.HeadShape(16, 8, 4, 5, 18, 4)
    tasks = [harness.Task("topk5", "gather_bmm", "", shape, threads=1, min_run_time=0.01,
                          warmup=1, measure_memory=True),
             harness.Task("train", "hsoftmax_reference", "adamw_fused", shape, threads=1,
                          min_run_time=0.01, warmup=1)]
    results = harness.run_in_process(tasks, timeout_s=120)
    for r in results:
        assert not r.get("error"), r
        assert r["verified"] is True and r["times"]
    assert results[0]["peak_bytes"] >= 0


def test_linear_ce_is_skipped_without_linear_cross_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = pytest.importorskip("worker")
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    ok, why = baselines.linear_ce_available()
    assert not ok and "linear_cross_entropy" in why
    task = harness.Task("train", "linear_ce", "adamw_fused", baselines.HeadShape(8, 4, 2, 3),
                        threads=1, min_run_time=0.01, warmup=1)
    result = worker.run_task(task)
    assert result["error"].startswith("skipped: ") and "torch >= 2.13" in result["error"]


def test_background_load_runs_until_stopped() -> None:
    proc = harness.start_load("python")
    assert proc is not None and proc.poll() is None
    harness.stop_load(proc)
    assert proc.poll() is not None
    assert harness.start_load("none") is None


def test_readme_headline_is_the_committed_cpu_results() -> None:
    """The README's table is what ``report.py`` makes of the committed CSVs, not typed."""
    tables = report.load_tables(BENCH / "results", "cpu")
    readme = (BENCH.parent / "README.md").read_text()
    between = readme.split(report.README_START, 1)[1].split(report.README_END, 1)[0]
    assert between.strip() == report.headline(tables).strip()
    assert "x |" in between  # some ratios were measured
