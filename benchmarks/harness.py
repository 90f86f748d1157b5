"""Shared machinery of the benchmark scripts: presets, tasks, process isolation, CSV rows, ratios.

A *task* is one measurement (a method, a question, a variant, a shape). Tasks run in worker
processes (``worker.py``): by default every task gets a fresh process, so that one method's
allocator and cache state (a flat 80k-class step leaves hundreds of MB of freed pages behind)
cannot slow the next one, and ``ru_maxrss`` of that process is the peak memory of that task alone.
Rounds alternate the order of the methods, and the timings of all rounds are pooled, so that
machine drift hits every method alike.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # benchmark the working tree's hsoftmax, installed or not
    sys.path.insert(0, str(ROOT))

from baselines import (  # noqa: E402
    METHODS,
    HeadShape,
    estimate_inference_bytes,
    estimate_train_bytes,
    parameter_count,
)

RESULT_MARK = "@@RESULT "

#: Columns of every results CSV, in order.
COLUMNS = (
    "question",
    "method",
    "variant",
    "classes",
    "n_top",
    "n_bottom",
    "in_features",
    "hidden",
    "batch",
    "dtype",
    "device",
    "device_name",
    "threads",
    "torch",
    "hsoftmax",
    "commit",
    "date",
    "params",
    "time_ms",
    "iqr_ms",
    "runs",
    "ratio_vs_flat",
    "ratio_vs_gather_bmm",
    "ratio_vs_flat_range",
    "q25_ms",
    "q75_ms",
    "peak_rss_mb",
    "idle_rss_mb",
    "peak_rss_warm_mb",
    "warm_idle_rss_mb",
    "peak_cuda_mb",
    "est_mb",
    "verified",
    "isolation",
    "rounds",
    "shared_machine",
    "load1",
    "copy_gbs",
    "skip_reason",
    "note",
)

#: Questions whose ratio is "flat's value / this value" on ``time_ms`` (higher is better).
TIME_QUESTIONS = ("train", "log_probs", "topk5", "predict", "sparse_train", "topk5_trained")


@dataclass(frozen=True)
class Preset:
    """Sizes and repetition counts of one benchmark mode."""

    name: str
    shape: HeadShape
    scaling_classes: tuple[int, ...]
    rounds: int
    min_run_time: float
    warmup: int
    isolation: str
    big_classes: tuple[int, ...] = ()  # sparse-path memory checks (bench_memory)


PRESETS: dict[str, Preset] = {
    # the test suite's smoke run: seconds, in-process
    "tiny": Preset("tiny", HeadShape(64, 16, 10, 10, None, 16), (100, 1000), 1, 0.01, 1,
                   "inprocess"),
    # about a minute: small head, one round, in-process (indicative numbers, no memory)
    "quick": Preset("quick", HeadShape(512, 64, 100, 50, None, 64), (1_000, 10_000), 1, 0.05, 1,
                    "inprocess", (50_000,)),
    # the PlantCLEF head of the paper, each task in its own process, alternating rounds
    "full": Preset("full", HeadShape(), (1_000, 10_000, 100_000, 1_000_000), 3, 1.0, 3,
                   "question", (1_000_000, 10_000_000)),
}


@dataclass
class Task:
    """One measurement, sent as JSON to a worker process."""

    question: str  # train | log_probs | topk5 | predict | memory_train | sparse_train | idle
    method: str
    variant: str  # the optimizer for training questions, the operation otherwise
    shape: HeadShape
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    min_run_time: float = 1.0
    warmup: int = 3
    steps: int = 3  # memory questions: training steps after construction
    k: int = 5
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Task:
        d = dict(d)
        d["shape"] = HeadShape(**d["shape"])
        return Task(**d)

    def key(self) -> tuple[str, str, str, int]:
        return (self.question, self.method, self.variant, self.shape.classes)


@dataclass
class Options:
    """Command-line options shared by all benchmark scripts."""

    preset: Preset
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    rounds: int = 1
    min_run_time: float = 1.0
    warmup: int = 3
    isolation: str = "question"
    methods: tuple[str, ...] = METHODS
    out: Path = HERE / "results"
    mem_budget_bytes: int = 0
    shared_machine: bool = False
    timeout_s: float = 3600.0
    wait_quiet_s: float = 0.0
    quiet_load: float = 2.5
    extra: dict[str, Any] = field(default_factory=dict)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="tiny (tests), quick (~1 min), full (PlantCLEF head; default)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (preset)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per blocked_autorange measurement (preset)")
    p.add_argument("--isolation", choices=("question", "method", "inprocess"), default=None,
                   help="a process per task (question), per method, or none (preset)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results, or results/tmp for "
                        "tiny/quick)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip tasks whose estimated peak exceeds this (default 85%% of "
                        "MemAvailable, or of free GPU memory)")
    p.add_argument("--shared-machine", action="store_true",
                   help="record that other work was running on the machine")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each task, wait up to SECONDS for the 1-minute load average "
                        "to fall below --quiet-load (default: don't wait)")
    p.add_argument("--quiet-load", type=float, default=None,
                   help="load average counted as quiet (default: 0.5 + threads)")


def options_from_args(a: argparse.Namespace, default_rounds: int | None = None) -> Options:
    """Options from parsed arguments; ``default_rounds`` overrides the preset's rounds unless
    ``--rounds`` was given (the scaling sweep runs one round by default)."""
    preset = PRESETS["quick" if a.quick else a.preset]
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"expected methods in {METHODS}, got {unknown}")
    out = a.out or (HERE / "results" if preset.name == "full" else HERE / "results" / "tmp")
    budget = int(a.mem_budget_gb * 2**30) if a.mem_budget_gb else default_mem_budget(a.device)
    return Options(
        preset=preset,
        device=a.device,
        dtype=a.dtype,
        threads=a.threads,
        rounds=a.rounds or min(preset.rounds, default_rounds or preset.rounds),
        min_run_time=a.min_run_time if a.min_run_time is not None else preset.min_run_time,
        warmup=preset.warmup,
        isolation=a.isolation or preset.isolation,
        methods=methods,
        out=out,
        mem_budget_bytes=budget,
        shared_machine=a.shared_machine,
        timeout_s=a.timeout,
        wait_quiet_s=a.wait_quiet,
        quiet_load=a.quiet_load if a.quiet_load is not None else 0.5 + a.threads,
    )


def default_mem_budget(device: str) -> int:
    """85% of the memory available now (``MemAvailable``), or of free GPU memory for cuda."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.85)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.85)
    except OSError:
        pass
    return 8 * 2**30


# --------------------------------------------------------------------------- environment


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hsoftmax"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    if not sha:  # not a git checkout (e.g. a copied working tree)
        return ""
    return sha + ("+dirty" if dirty else "")


def environment(device: str) -> dict[str, Any]:
    """Columns that describe where and with what the numbers were taken."""
    import torch

    try:
        import hsoftmax

        hs_version = getattr(hsoftmax, "__version__", "?")
    except Exception:  # pragma: no cover
        hs_version = "n/a"
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name()
    return {
        "device": device,
        "device_name": device_name,
        "torch": torch.__version__,
        "hsoftmax": hs_version,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (0 where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def wait_until_quiet(opts: Options) -> float:
    """Wait up to ``opts.wait_quiet_s`` for the load average to fall below ``opts.quiet_load``.

    Returns the load average when the task starts (recorded in the ``load1`` column).
    """
    deadline = time.monotonic() + opts.wait_quiet_s
    load = load_average()
    announced = False
    while load >= opts.quiet_load and time.monotonic() < deadline:
        if not announced:
            progress(f"    waiting for load average {load:.1f} < {opts.quiet_load:.1f} "
                     f"(up to {opts.wait_quiet_s:.0f} s)")
            announced = True
        time.sleep(5)
        load = load_average()
    return load


def progress(msg: str) -> None:
    """Progress output goes to stderr, so stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- running tasks


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(HERE), *filter(None, [env.get("PYTHONPATH", "")])]
    )
    return env


def run_in_process(tasks: Sequence[Task], timeout_s: float) -> list[dict[str, Any]]:
    """Run ``tasks`` one after another in ONE fresh worker process; one result per task."""
    payload = json.dumps([t.to_json() for t in tasks])
    threads = tasks[0].threads
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "worker.py")],
            input=payload,
            capture_output=True,
            text=True,
            env=_worker_env(threads),
            timeout=timeout_s,
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {timeout_s:.0f} s", -1
    results = [json.loads(line[len(RESULT_MARK):]) for line in out.splitlines()
               if line.startswith(RESULT_MARK)]
    if len(results) < len(tasks):
        why = f"worker exited with code {rc}"
        if rc in (-9, 137):
            why += " (killed: probably out of memory)"
        tail = err.strip().splitlines()[-1:] if err.strip() else []
        for t in tasks[len(results):]:
            results.append({"key": list(t.key()), "error": "; ".join([why, *tail])})
    wall = time.perf_counter() - t0
    for r in results:
        r.setdefault("process_wall_s", wall)
    return results


def run_tasks_inprocess(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Run tasks in this process (the tiny preset, tests). Peak memory is not measured."""
    import worker

    out = []
    for t in tasks:
        r = worker.run_task(t)
        r["peak_rss_kb"] = None
        out.append(r)
    return out


def idle_rss_kb(opts: Options, warm: bool = False) -> float | None:
    """``ru_maxrss`` of an idle worker (torch, hsoftmax and the baselines imported, no tensors).

    With ``warm``, the worker also trains and queries every method once on a tiny head
    (64 -> 16, 10 x 10 classes), so that its peak includes the code pages of libtorch, MKL's
    buffers and the allocator arenas that any method's step touches: subtracting it leaves the
    memory that grows with the head (parameters, gradients, optimizer state, activations).
    """
    if opts.isolation == "inprocess":
        return None
    question = "idle_warm" if warm else "idle"
    t = Task(question, "none", "none", opts.preset.shape, opts.device, opts.dtype, opts.threads)
    r = run_in_process([t], opts.timeout_s)[0]
    return r.get("peak_rss_kb")


def run_suite(
    script: str,
    tasks: Sequence[Task],
    opts: Options,
    *,
    estimate: dict[tuple[str, str, str, int], int] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` for ``opts.rounds`` alternating rounds with the chosen isolation.

    Tasks whose estimated bytes (``estimate[task.key()]``) exceed the memory budget are not run:
    they come back as rows with a ``skip_reason``. Returns the CSV rows (ratios filled in).
    """
    estimate = estimate or {}
    env = environment(opts.device)
    skipped: dict[tuple[str, str, str, int], str] = {}
    runnable: list[Task] = []
    for t in tasks:
        est = estimate.get(t.key())
        if est is not None and est > opts.mem_budget_bytes:
            skipped[t.key()] = (
                f"estimated peak {est / 2**30:.1f} GiB > budget "
                f"{opts.mem_budget_bytes / 2**30:.1f} GiB: would not fit in memory"
            )
        else:
            runnable.append(t)
    idle = idle_rss_kb(opts) if runnable else None
    warm = None
    if any(t.question in ("memory_train", "sparse_train") for t in runnable):
        warm = idle_rss_kb(opts, warm=True)
    pooled: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    n_total = opts.rounds * len(runnable)
    done = 0
    t_start = time.perf_counter()
    for rnd in range(opts.rounds):
        order = list(runnable) if rnd % 2 == 0 else list(reversed(runnable))
        for group in _groups(order, opts.isolation):
            label = ", ".join(f"{t.method}/{t.variant}@{t.shape.classes}" for t in group)
            progress(f"[{script}] round {rnd + 1}/{opts.rounds} "
                     f"task {done + 1}-{done + len(group)}/{n_total}: {group[0].question} {label}")
            load = wait_until_quiet(opts) if opts.wait_quiet_s > 0 else load_average()
            if opts.isolation == "inprocess":
                results = run_tasks_inprocess(group)
            else:
                results = run_in_process(group, opts.timeout_s)
            for i, t in enumerate(group):
                r = results[i]
                r["load1"] = load
                pooled.setdefault(t.key(), []).append(r)
                progress("    " + _describe(t, r))
            done += len(group)
    progress(f"[{script}] {n_total} tasks in {time.perf_counter() - t_start:.0f} s")
    rows = [
        _row(t, pooled.get(t.key(), []), skipped.get(t.key(), ""), opts, env, idle,
             estimate.get(t.key()), warm)
        for t in tasks
    ]
    add_ratios(rows)
    return rows


def _groups(tasks: Sequence[Task], isolation: str) -> Iterable[list[Task]]:
    if isolation == "question":
        for t in tasks:
            yield [t]
    elif isolation == "method":
        by_method: dict[str, list[Task]] = {}
        for t in tasks:
            by_method.setdefault(t.method, []).append(t)
        yield from by_method.values()
    else:
        yield list(tasks)


def _describe(t: Task, r: dict[str, Any]) -> str:
    head = f"{t.method:<16} {t.variant:<12} C={t.shape.classes:<9}"
    if r.get("error"):
        return f"{head} ERROR {r['error']}"
    parts = [head]
    if r.get("times"):
        times = sorted(r["times"])
        parts.append(f"{1e3 * times[len(times) // 2]:10.2f} ms ({len(times)} runs)")
    if r.get("peak_rss_kb"):
        parts.append(f"rss {r['peak_rss_kb'] / 1024:8.0f} MB")
    if r.get("verified") is not None:
        parts.append(f"verified={r['verified']}")
    return "  ".join(parts)


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _row(
    t: Task,
    results: list[dict[str, Any]],
    skip: str,
    opts: Options,
    env: dict[str, Any],
    idle_kb: float | None,
    est: int | None,
    warm_kb: float | None = None,
) -> dict[str, Any]:
    s = t.shape
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(env)
    row.update(
        question=t.question, method=t.method, variant=t.variant, classes=s.classes,
        n_top=s.n_top, n_bottom=s.n_bottom, in_features=s.in_features, hidden=s.hidden,
        batch=s.batch, dtype=t.dtype, threads=t.threads, isolation=opts.isolation,
        rounds=len(results), shared_machine=opts.shared_machine,
        params=parameter_count(t.method, s) if t.method in METHODS else "",
        est_mb=round(est / 2**20) if est else "",
        idle_rss_mb=round(idle_kb / 1024, 1) if idle_kb else "",
        warm_idle_rss_mb=round(warm_kb / 1024, 1) if warm_kb else "",
    )
    errors = [r["error"] for r in results if r.get("error")]
    ok = [r for r in results if not r.get("error")]
    notes = []
    if skip:
        row["skip_reason"] = skip
    elif errors and not ok:
        e = errors[0]
        row["skip_reason"] = e[len("skipped: "):] if e.startswith("skipped: ") else f"error: {e}"
    elif errors:
        notes.append(f"{len(errors)} of {len(results)} rounds failed: {errors[0]}")
    if ok:
        times = [x for r in ok for x in r.get("times", [])]
        if times:
            row["time_ms"] = round(1e3 * _quantile(times, 0.5), 4)
            row["q25_ms"] = round(1e3 * _quantile(times, 0.25), 4)
            row["q75_ms"] = round(1e3 * _quantile(times, 0.75), 4)
            row["iqr_ms"] = round(row["q75_ms"] - row["q25_ms"], 4)
            row["runs"] = len(times)
        peaks = [r["peak_rss_kb"] for r in ok if r.get("peak_rss_kb")]
        if peaks and idle_kb and opts.isolation == "question":
            row["peak_rss_mb"] = round((max(peaks) - idle_kb) / 1024, 1)
            if warm_kb:
                row["peak_rss_warm_mb"] = round((max(peaks) - warm_kb) / 1024, 1)
        loads = [r["load1"] for r in ok if r.get("load1") is not None]
        if loads:
            row["load1"] = round(max(loads), 2)
        bandwidths = [r["copy_gbs"] for r in ok if r.get("copy_gbs")]
        if bandwidths:
            row["copy_gbs"] = min(bandwidths)
        cuda = [r["peak_cuda_bytes"] for r in ok if r.get("peak_cuda_bytes")]
        if cuda:
            row["peak_cuda_mb"] = round(max(cuda) / 2**20, 1)
        ver = [r["verified"] for r in ok if r.get("verified") is not None]
        if ver:
            row["verified"] = all(ver)
        if ok[0].get("params"):
            row["params"] = ok[0]["params"]
        for r in ok:
            for n in r.get("notes", []):
                if n not in notes:
                    notes.append(n)
    row["note"] = "; ".join(notes)
    return row


def _reference(rows: Sequence[dict[str, Any]], row: dict[str, Any], method: str) -> Any:
    variant = row["variant"]
    if variant.startswith("sparse"):
        variant = "adamw_fused"  # sparse rows compare against the dense flat step
    for r in rows:
        if (r["method"] == method and r["question"] == row["question"]
                and r["classes"] == row["classes"] and r["variant"] == variant
                and r["batch"] == row["batch"]):
            return r
    return None


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Fill ``ratio_vs_flat`` and ``ratio_vs_gather_bmm`` (reference value / this value).

    Time questions compare ``time_ms``; memory questions ``peak_rss_mb`` (or ``peak_cuda_mb``);
    ``params`` compares parameter counts. Above 1 means this method is cheaper. Time questions
    also get ``ratio_vs_flat_range``: flat's first quartile over this method's third, to flat's
    third over this method's first (how far the ratio moves within the runs' spread).
    """
    for row in rows:
        for ref_method, col in (("flat", "ratio_vs_flat"), ("gather_bmm", "ratio_vs_gather_bmm")):
            ref = _reference(rows, row, ref_method)
            if ref is None:
                continue
            q = row["question"]
            if q.startswith("memory"):
                metric = "peak_cuda_mb" if row["device"] == "cuda" else "peak_rss_mb"
            elif q == "params":
                metric = "params"
            else:
                metric = "time_ms"
            a, b = ref.get(metric), row.get(metric)
            if a not in ("", None) and b not in ("", None) and float(b) > 0:
                row[col] = round(float(a) / float(b), 2)
            quartiles = [ref.get("q25_ms"), ref.get("q75_ms"), row.get("q25_ms"), row.get("q75_ms")]
            if ref_method == "flat" and metric == "time_ms" and all(quartiles):
                # the ratio's spread: flat's quartiles against this method's, crossed
                ref_q25, ref_q75, q25, q75 = (float(q) for q in quartiles)
                row["ratio_vs_flat_range"] = f"{ref_q25 / q75:.2f}-{ref_q75 / q25:.2f}"


# --------------------------------------------------------------------------- CSV


def csv_path(script: str, opts: Options) -> Path:
    suffix = "" if opts.preset.name == "full" else f"_{opts.preset.name}"
    return opts.out / f"{script}_{opts.device}{suffix}.csv"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    progress(f"wrote {path}")
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def shape_with(shape: HeadShape, **kw: Any) -> HeadShape:
    return replace(shape, **kw)


def make_task(opts: Options, question: str, method: str, variant: str, shape: HeadShape,
              **kw: Any) -> Task:
    """A task with the device, dtype, threads and repetition settings of ``opts``."""
    base: dict[str, Any] = {
        "device": opts.device, "dtype": opts.dtype, "threads": opts.threads,
        "min_run_time": opts.min_run_time, "warmup": opts.warmup,
    }
    base.update(kw)
    return Task(question, method, variant, shape, **base)


def train_variants(method: str) -> tuple[str, ...]:
    """Optimizers a method is trained with: fused and default AdamW, or the sparse pair."""
    if method == "hsoftmax_sparse":
        return ("sparse", "sparseadam")
    return ("adamw_fused", "adamw_fused_keep", "adamw")


def param_rows(opts: Options, shapes: Sequence[HeadShape]) -> list[dict[str, Any]]:
    """``params`` rows (closed-form parameter counts; no process is started)."""
    env = environment(opts.device)
    rows = []
    for shape in shapes:
        for m in opts.methods:
            t = make_task(opts, "params", m, "-", shape)
            row = _row(t, [], "", opts, env, None, None)
            row["rounds"] = ""
            row["note"] = "closed form (baselines.parameter_count)"
            rows.append(row)
    return rows


def script_main(
    script: str,
    description: str,
    build: Any,
    argv: Sequence[str] | None = None,
    default_rounds: int | None = None,
) -> Path:
    """The ``main`` of a benchmark script: parse options, build tasks, run, write the CSV.

    ``build(opts)`` returns ``(tasks, estimates, extra_rows)``.
    """
    p = argparse.ArgumentParser(prog=f"bench_{script}.py", description=description)
    add_common_args(p)
    opts = options_from_args(p.parse_args(argv), default_rounds)
    tasks, estimates, extra = build(opts)
    rows = run_suite(script, tasks, opts, estimate=estimates)
    rows = [*extra, *rows]
    add_ratios(rows)
    return write_csv(csv_path(script, opts), rows)


__all__ = [
    "COLUMNS",
    "PRESETS",
    "Options",
    "Preset",
    "Task",
    "add_common_args",
    "add_ratios",
    "csv_path",
    "estimate_inference_bytes",
    "estimate_train_bytes",
    "make_task",
    "options_from_args",
    "param_rows",
    "progress",
    "read_csv",
    "run_suite",
    "script_main",
    "shape_with",
    "train_variants",
    "write_csv",
]
