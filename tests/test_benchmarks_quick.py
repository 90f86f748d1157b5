"""Smoke test of the benchmark suite: the smallest configuration, end to end, in seconds.

Runs ``bench_train`` and ``bench_inference`` with the ``tiny`` preset (in-process, one thread),
then checks the CSV columns, that every measured row has a time, and that the top-k answers were
verified against ``log_probs(x).topk(k)``; one task also goes through a worker process, the path
the real runs take. The heavy runs live in ``benchmarks/`` and are never run by the tests.
"""

from __future__ import annotations

import csv
import subprocess
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


def test_history_lists_every_committed_run(tmp_path: Path) -> None:
    """``history.py`` evaluates a target on each committed version of its CSV, once per run."""
    history = pytest.importorskip("history")
    report = pytest.importorskip("report")
    target = next(t for t in report.TARGETS if t.what == "sparse train step vs flat")
    csv_path = tmp_path / "benchmarks" / "results" / "train_cpu.csv"
    csv_path.parent.mkdir(parents=True)

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)

    def commit_run(code: str, ratio: str, quartiles: str) -> None:
        rows = [{"question": "train", "method": "flat", "variant": "adamw_fused",
                 "classes": "80000", "device": "cpu", "commit": code, "date": "2026-11-26T10:00Z",
                 "time_ms": "1500", "ratio_vs_flat": "1.0"},
                {"question": "train", "method": "hsoftmax_sparse", "variant": "sparse",
                 "classes": "80000", "device": "cpu", "commit": code, "date": "2026-11-26T10:00Z",
                 "time_ms": "10", "ratio_vs_flat": ratio, "ratio_vs_flat_range": quartiles}]
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[1]))
            writer.writeheader()
            writer.writerows(rows)
        git("add", "-A")
        git("commit", "-q", "-m", code)

    git("init", "-q")
    commit_run("aaa", "140.0", "")
    commit_run("bbb", "160.5", "150.1-170.2")
    lines = [line for line in history.history(target, "cpu", tmp_path) if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in lines] == ["`bbb`", "`aaa`"]  # newest first
    assert "160.50x" in lines[0] and "150.1-170.2" in lines[0] and "| yes |" in lines[0]
    assert "140.00x" in lines[1] and "| **no** |" in lines[1]
