"""The benchmarks' one entry point: run suites, write CSVs, then the report.

    python benchmarks/run_all.py --quick                  # under a minute, results/tmp/
    python benchmarks/run_all.py --only train             # one suite of the PlantCLEF head
    python benchmarks/run_all.py                          # all suites (about 40 minutes, 2 cores)
    python benchmarks/run_all.py --device cuda --rounds 1

Suites (each writes ``results/<suite>_<device>.csv``):

- ``train``: one training step of every method at the preset's head (PlantCLEF: 1792 -> 128,
  1000 x 80 = 80,000 classes, batch 256), fused AdamW (``SparseRowAdamW`` for the sparse head),
  with the peak memory of each step above a warmed-up worker.
- ``inference``: exact log-probabilities, exact top-5 (and ``log_probs(x).topk(5)`` for the
  hierarchical head), predict, and exact top-5 of a head trained on structured data.
- ``scaling``: training step (with peak memory) and exact top-5 from 1,000 to 10,000,000 classes
  (80 slots per node), and the training step of flat, ``linear_ce`` and the hierarchical head at
  8 times the batch (2,048), where the chunked ``F.linear_cross_entropy`` is built to win; what
  would not fit in memory is estimated and recorded as skipped.
- ``contention``: training step and exact top-5 of flat, gather+bmm and the hierarchical head
  (2 threads, and 1 thread), quiet and beside a background process busy on one core
  (``gemm``: 1-thread float32 matrix products; ``python``: a plain Python loop).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import report  # noqa: E402
from baselines import METHODS, TRAIN_ONLY, HeadShape, estimate_bytes, train_variant  # noqa: E402
from harness import (  # noqa: E402
    LOADS,
    PRESETS,
    Options,
    Task,
    csv_path,
    default_mem_budget,
    progress,
    read_csv,
    run_tasks,
    write_csv,
)

Built = tuple[list[Task], dict[tuple[Any, ...], int]]


def _add(tasks: list[Task], est: dict[tuple[Any, ...], int], t: Task) -> None:
    tasks.append(t)
    est[t.key()] = estimate_bytes(t.task, t.method, t.shape)


def train_suite(opts: Options) -> Built:
    tasks: list[Task] = []
    est: dict[tuple[Any, ...], int] = {}
    for m in opts.methods:
        _add(tasks, est, opts.task("train", m, train_variant(m), opts.preset.shape))
    return tasks, est


def inference_suite(opts: Options) -> Built:
    tasks: list[Task] = []
    est: dict[tuple[Any, ...], int] = {}
    shape = opts.preset.shape
    methods = [m for m in opts.methods if m not in TRAIN_ONLY]
    for task in ("log_probs", "topk5", "predict"):
        for m in methods:
            _add(tasks, est, opts.task(task, m, "", shape))
        if task == "topk5" and "hsoftmax" in methods:
            _add(tasks, est, opts.task(task, "hsoftmax", "via_log_probs", shape))
    for m in methods:
        if m in ("flat", "gather_bmm", "hsoftmax"):
            _add(tasks, est, opts.task("topk5_trained", m, "", shape))
    return tasks, est


def scaling_suite(opts: Options) -> Built:
    tasks: list[Task] = []
    est: dict[tuple[Any, ...], int] = {}
    base = opts.preset.shape
    for classes in opts.extra.get("classes") or opts.preset.scaling_classes:
        shape = HeadShape.for_classes(classes, in_features=base.in_features, hidden=base.hidden,
                                      n_bottom=base.n_bottom, batch=base.batch)
        # the big heads: one warm-up call and a short window (a call takes seconds)
        kw: dict[str, Any] = ({"warmup": 1, "min_run_time": min(opts.min_run_time, 0.5)}
                              if classes >= 1_000_000 else {})
        for m in opts.methods:
            if m in ("adaptive", "hsoftmax_reference"):
                continue
            _add(tasks, est, opts.task("train", m, train_variant(m), shape, **kw))
            if m not in TRAIN_ONLY and classes < 10_000_000:
                _add(tasks, est, opts.task("topk5", m, "", shape, **kw))
        if classes == base.classes:  # where the chunked linear_cross_entropy is built to win
            big_batch = replace(shape, batch=8 * base.batch)
            for m in ("flat", "linear_ce", "hsoftmax"):
                if m in opts.methods:
                    _add(tasks, est, opts.task("train", m, train_variant(m), big_batch,
                                               warmup=1, min_run_time=min(opts.min_run_time, 0.5)))
    return tasks, est


def contention_suite(opts: Options) -> Built:
    tasks: list[Task] = []
    est: dict[tuple[Any, ...], int] = {}
    shape = opts.preset.shape
    loads = opts.extra.get("loads", ("none", *LOADS))
    for load in loads:
        for task in ("train", "topk5"):
            for m in ("flat", "gather_bmm", "hsoftmax"):
                if m not in opts.methods:
                    continue
                variant = train_variant(m) if task == "train" else ""
                _add(tasks, est, opts.task(task, m, variant, shape, contention=load))
                if m == "hsoftmax" and opts.threads != 1:
                    _add(tasks, est, opts.task(task, m, variant, shape, contention=load,
                                               threads=1))
    return tasks, est


SUITES: dict[str, Callable[[Options], Built]] = {
    "train": train_suite,
    "inference": inference_suite,
    "scaling": scaling_suite,
    "contention": contention_suite,
}


def parse(argv: Sequence[str] | None) -> tuple[list[str], Options, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:6]))
    p.add_argument("--only", default=",".join(SUITES),
                   help=f"comma-separated suites, of {','.join(SUITES)} (default: all)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="tiny (tests), quick (under a minute), full (PlantCLEF head; default)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating rounds (default: the preset's, 2 for full; 1 for scaling)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of blocked_autorange per task and round (preset: 1.0)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--classes", default="",
                   help="class counts of the scaling suite (default: the preset's; full: "
                        "1000,10000,80000,1000000,10000000)")
    p.add_argument("--loads", default="none," + ",".join(LOADS),
                   help="background loads of the contention suite (default: none,gemm,python)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results; results/tmp unless full)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip tasks whose estimated peak exceeds this (default: 85%% of "
                        "MemAvailable, or of free GPU memory)")
    p.add_argument("--shared-machine", action="store_true",
                   help="other jobs are running: flag every row (contention column +shared)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    p.add_argument("--no-report", action="store_true", help="write the CSVs only")
    p.add_argument("--merge", action="store_true",
                   help="replace only the rows of the tasks run in the existing CSVs")
    p.add_argument("--readme", default=str(HERE.parent / "README.md"),
                   help="README whose headline table the report rewrites ('' to leave it)")
    a = p.parse_args(argv)
    preset = PRESETS["quick" if a.quick else a.preset]
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    loads = tuple(x.strip() for x in a.loads.split(",") if x.strip())
    for what, got, allowed in (("methods", methods, METHODS), ("--only", only, tuple(SUITES)),
                               ("--loads", loads, ("none", *LOADS))):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"expected {what} in {','.join(allowed)}, got {','.join(bad)}")
    opts = Options(
        preset=preset, device=a.device, dtype=a.dtype, threads=a.threads,
        rounds=a.rounds or preset.rounds,
        min_run_time=a.min_run_time if a.min_run_time is not None else preset.min_run_time,
        methods=methods,
        out=a.out or (HERE / "results" if preset.name == "full" else HERE / "results" / "tmp"),
        mem_budget_bytes=(int(a.mem_budget_gb * 2**30) if a.mem_budget_gb
                          else default_mem_budget(a.device)),
        shared_machine=a.shared_machine, timeout_s=a.timeout,
        extra={"loads": loads, "classes": tuple(int(c) for c in a.classes.split(",") if c)},
    )
    return only, opts, a


_ROW_KEY = ("task", "method", "variant", "classes", "batch", "threads", "contention")


def _merged(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``old`` with those of the tasks in ``new`` replaced, in ``old``'s order."""
    def key(row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(str(row.get(k, "")) for k in _ROW_KEY)

    fresh = {key(row): row for row in new}
    merged = [fresh.pop(key(row), row) for row in old]
    return merged + list(fresh.values())


def main(argv: Sequence[str] | None = None) -> list[Path]:
    only, opts, a = parse(argv)
    start = time.perf_counter()
    written = []
    for name in only:
        # one round of the scaling sweep unless --rounds says otherwise: its big heads are slow
        suite_opts = replace(opts, rounds=a.rounds or (1 if name == "scaling" else opts.rounds))
        tasks, estimates = SUITES[name](suite_opts)
        progress(f"=== {name}: {len(tasks)} tasks x {suite_opts.rounds} rounds "
                 f"({time.perf_counter() - start:.0f} s elapsed)")
        rows = run_tasks(name, tasks, suite_opts, estimates)
        path = csv_path(name, suite_opts)
        if a.merge and path.exists():
            rows = _merged(read_csv(path), rows)
        written.append(write_csv(path, rows))
    if not a.no_report and written:
        readme = a.readme if opts.preset.name == "full" else ""
        written += report.main(["--results", str(opts.out), "--readme", readme])
    progress(f"=== done in {time.perf_counter() - start:.0f} s")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
