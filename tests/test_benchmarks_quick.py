"""Smoke test of the benchmark suite: the smallest configuration, end to end, in seconds.

Runs ``bench_train`` and ``bench_inference`` with the ``tiny`` preset (in-process, one thread),
then checks the CSV columns, that every measured row has a time, and that the top-k answers were
verified against ``log_probs(x).topk(k)``; one task also goes through a worker process, the path
the real runs take. The heavy runs live in ``benchmarks/`` and are never run by the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

harness = pytest.importorskip("harness")


def _run(script: str, out: Path) -> list[dict[str, str]]:
    module = __import__(f"bench_{script}")
    path = module.main(["--preset", "tiny", "--threads", "1", "--out", str(out)])
    assert path == out / f"{script}_cpu_tiny.csv"
    with open(path) as f:
        header = f.readline().strip().split(",")
    assert tuple(header) == harness.COLUMNS
    return harness.read_csv(path)


def test_tiny_suite_writes_verified_rows(tmp_path: Path) -> None:
    rows = _run("train", tmp_path) + _run("inference", tmp_path)
    measured = [r for r in rows if not r["skip_reason"]]
    assert {r["method"] for r in measured} >= {"flat", "flat_bottleneck", "adaptive", "gather_bmm"}
    for r in rows:
        assert r["torch"] and r["device"] == "cpu" and r["threads"] == "1" and r["date"]
        assert r["dtype"] == "float32"
    for r in measured:
        assert float(r["time_ms"]) > 0, r
        assert r["verified"] == "True", r
    topk = [r for r in measured if r["question"] == "topk5"]
    assert len(topk) >= 4
    ours = [r for r in rows if r["method"] == "hsoftmax"]
    assert all(r["verified"] == "True" or r["skip_reason"] for r in ours)
    flat_train = next(
        r for r in measured if r["method"] == "flat" and r["variant"] == "adamw_fused"
    )
    assert float(flat_train["ratio_vs_flat"]) == pytest.approx(1.0)


def test_worker_process_reports_time_and_peak_memory() -> None:
    from baselines import HeadShape

    task = harness.Task("topk5", "gather_bmm", "topk5", HeadShape(16, 8, 4, 5, 18, 4),
                        threads=1, min_run_time=0.01, warmup=1)
    (result,) = harness.run_in_process([task], timeout_s=120)
    assert not result.get("error"), result
    assert result["verified"] is True
    assert result["times"] and result["peak_rss_kb"] > 0


def test_readme_headline_is_the_committed_cpu_results() -> None:
    """The README's table is what ``report.py`` makes of the committed CSVs, not typed."""
    report = pytest.importorskip("report")
    results = BENCH / "results"
    tables = {k: harness.read_csv(results / f"{k}_cpu.csv") for k in report.TABLES}
    readme = (BENCH.parent / "README.md").read_text()
    between = readme.split(report.README_START, 1)[1].split(report.README_END, 1)[0]
    assert between.strip() == report.headline(tables).strip()
    assert "x |" in between  # some ratios were measured
