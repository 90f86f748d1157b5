"""The machinery of the benchmarks: tasks, one process per task, background load, CSV rows.

A *task* is one measurement: a method, a task name (``train``, ``topk5``, ...), a head shape, a
thread count and a background load. By default each task runs in a fresh worker process
(``worker.py``): a flat 80k-class step leaves allocator and cache state behind that slows the
next small step about 5x, and the process's peak RSS is then that task's alone. Rounds run the
tasks forward, then reversed, and the timings of all rounds are pooled, so that machine drift
hits every method alike.

With a background load (``contention``), a second process starts before the task's worker and
is killed when it ends: ``gemm`` multiplies float32 matrices on one thread in a loop, ``python``
spins in plain Python. On a 2-core machine either one keeps the other core busy.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # benchmark the working tree's hsoftmax, installed or not
    if _p not in sys.path:
        sys.path.insert(0, _p)

from baselines import HeadShape  # noqa: E402

RESULT_MARK = "@@RESULT "

#: Columns of every results CSV, in order.
COLUMNS = (
    "task", "method", "variant", "classes", "head", "batch", "threads", "contention",
    "device", "device_name", "dtype", "torch", "date", "commit",
    "time_ms", "q25_ms", "q75_ms", "runs", "peak_mb", "verified", "skip_reason", "note",
)

#: Background loads: the code of the process that runs beside each task (1 thread each).
LOADS = {
    "gemm": ("import torch\ntorch.set_num_threads(1)\n"
             "a, b = torch.randn(512, 512), torch.randn(512, 512)\nc = torch.empty(512, 512)\n"
             "print('ready', flush=True)\nwhile True:\n    torch.mm(a, b, out=c)\n"),
    "python": "print('ready', flush=True)\nx = 0\nwhile True:\n    x = (x + 1) % 1000003\n",
}


@dataclass(frozen=True)
class Preset:
    """Sizes and repetition counts of one benchmark mode."""

    name: str
    shape: HeadShape
    scaling_classes: tuple[int, ...]
    rounds: int
    min_run_time: float
    warmup: int
    isolation: str  # "process" (a fresh worker per task) or "inprocess"


PRESETS: dict[str, Preset] = {
    # the test suite's smoke run: seconds, in-process
    "tiny": Preset("tiny", HeadShape(64, 16, 10, 10, None, 16), (100, 1000), 1, 0.01, 1,
                   "inprocess"),
    # under a minute: a small head, one round, in-process (indicative numbers, no memory)
    "quick": Preset("quick", HeadShape(512, 64, 100, 50, None, 64), (1_000, 10_000), 1, 0.05, 1,
                    "inprocess"),
    # the PlantCLEF head of the paper, each task in its own process, alternating rounds
    "full": Preset("full", HeadShape(), (1_000, 10_000, 80_000, 1_000_000, 10_000_000), 2, 1.0,
                   3, "process"),
}


@dataclass
class Task:
    """One measurement, sent as JSON to a worker process."""

    task: str  # train | log_probs | topk5 | predict | topk5_trained
    method: str
    variant: str  # train: the optimizer; topk5: "" or "via_log_probs"
    shape: HeadShape
    threads: int = 2
    contention: str = "none"  # none | gemm | python
    device: str = "cpu"
    dtype: str = "float32"
    min_run_time: float = 1.0
    warmup: int = 3
    measure_memory: bool = False  # the peak RSS above a warmed-up worker (process isolation)
    k: int = 5
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> Task:
        return Task(**{**d, "shape": HeadShape(**d["shape"])})

    def key(self) -> tuple[Any, ...]:
        return (self.task, self.method, self.variant, self.shape.classes, self.shape.batch,
                self.threads, self.contention)

    def label(self) -> str:
        extra = f" {self.threads} thr" if self.threads != 2 else ""
        extra += f" + {self.contention}" if self.contention != "none" else ""
        v = f"/{self.variant}" if self.variant else ""
        return f"{self.task} {self.method}{v} C={self.shape.classes:,} B={self.shape.batch}{extra}"


@dataclass
class Options:
    """What a run measures and how (from the command line of ``run_all.py``)."""

    preset: Preset
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    rounds: int = 1
    min_run_time: float = 1.0
    methods: tuple[str, ...] = ()
    out: Path = HERE / "results"
    mem_budget_bytes: int = 8 * 2**30
    shared_machine: bool = False
    timeout_s: float = 1800.0
    extra: dict[str, Any] = field(default_factory=dict)

    def task(self, task: str, method: str, variant: str, shape: HeadShape,
             **kw: Any) -> Task:
        """A task with this run's device, dtype, threads and repetition settings."""
        base: dict[str, Any] = {
            "device": self.device, "dtype": self.dtype, "threads": self.threads,
            "min_run_time": self.min_run_time, "warmup": self.preset.warmup,
            "measure_memory": self.preset.isolation == "process",
        }
        return Task(task, method, variant, shape, **{**base, **kw})


def default_mem_budget(device: str) -> int:
    """85% of the memory available now (``MemAvailable``), or of free GPU memory for cuda."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0] * 0.85)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.85)
    except OSError:
        pass
    return 8 * 2**30


def progress(msg: str) -> None:
    """Progress goes to stderr, so stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "hsoftmax")
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if sha and dirty else "")


def environment(device: str) -> dict[str, str]:
    """Columns that say where and with what the numbers were taken."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name += f" ({os.cpu_count()} cores)"
    return {
        "device": device, "device_name": name, "torch": torch.__version__,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


# --------------------------------------------------------------------------- running


def _worker_env(task: Task) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(task.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(HERE),
                                                      env.get("PYTHONPATH", "")]))
    if task.method == "hsoftmax_reference":
        env["HSOFTMAX_REFERENCE"] = "1"
    return env


def start_load(kind: str) -> subprocess.Popen[str] | None:
    """Start the background load ``kind`` (see :data:`LOADS`) and wait until it runs."""
    if kind == "none":
        return None
    if kind not in LOADS:
        raise ValueError(f"expected a load in {('none', *LOADS)}, got {kind!r}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", LOADS[kind]], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    proc.stdout.readline()  # "ready": torch imported, the loop starts
    return proc


def stop_load(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None:
        proc.kill()
        proc.wait()


def run_in_process(tasks: Sequence[Task], timeout_s: float) -> list[dict[str, Any]]:
    """Run ``tasks`` one after another in ONE fresh worker process; one result per task."""
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "worker.py")],
            input=json.dumps([t.to_json() for t in tasks]), capture_output=True, text=True,
            env=_worker_env(tasks[0]), timeout=timeout_s,
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {timeout_s:.0f} s", -1
    results = [json.loads(line[len(RESULT_MARK):]) for line in out.splitlines()
               if line.startswith(RESULT_MARK)]
    for _ in tasks[len(results):]:
        why = f"worker exited with code {rc}" + (" (killed: out of memory?)"
                                                 if rc in (-9, 137) else "")
        tail = err.strip().splitlines()[-1:]
        results.append({"error": "; ".join([why, *tail])})
    return results


def run_inprocess(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Run tasks in this process (tiny and quick presets): no peak memory."""
    import worker

    return [worker.run_task(t) for t in tasks]


def run_tasks(name: str, tasks: Sequence[Task], opts: Options,
              estimates: dict[tuple[Any, ...], int]) -> list[dict[str, Any]]:
    """Run ``tasks`` for ``opts.rounds`` alternating rounds; return the CSV rows.

    A task whose estimated peak (``estimates[task.key()]``, bytes) exceeds the memory budget is
    not run: its row carries the reason in ``skip_reason``.
    """
    env = environment(opts.device)
    skipped = {t.key(): f"estimated peak {estimates[t.key()] / 2**30:.1f} GiB > budget "
                        f"{opts.mem_budget_bytes / 2**30:.1f} GiB: would not fit in memory"
               for t in tasks if estimates.get(t.key(), 0) > opts.mem_budget_bytes}
    runnable = [t for t in tasks if t.key() not in skipped]
    pooled: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    start, done, total = time.perf_counter(), 0, opts.rounds * len(runnable)
    for rnd in range(opts.rounds):
        order = runnable if rnd % 2 == 0 else runnable[::-1]
        groups = ([[t] for t in order] if opts.preset.isolation == "process"
                  else [[t for t in order if t.contention == c]
                        for c in dict.fromkeys(t.contention for t in order)])
        for group in groups:
            if not group:
                continue
            load = start_load(group[0].contention)
            try:
                if opts.preset.isolation == "process":
                    results = run_in_process(group, opts.timeout_s)
                else:
                    results = run_inprocess(group)
            finally:
                stop_load(load)
            for t, r in zip(group, results):
                done += 1
                pooled.setdefault(t.key(), []).append(r)
                elapsed = time.perf_counter() - start
                progress(f"[{name}] {done}/{total} {t.label():<48} {_describe(r)}"
                         f"  ({elapsed:.0f} s, ~{elapsed / done * (total - done):.0f} s left)")
    return [_row(t, pooled.get(t.key(), []), skipped.get(t.key(), ""), opts, env)
            for t in tasks]


def _describe(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"ERROR {r['error']}"
    times = sorted(r.get("times", []))
    out = f"{1e3 * times[len(times) // 2]:9.2f} ms x{len(times)}" if times else ""
    if r.get("peak_bytes") is not None:
        out += f"  peak {r['peak_bytes'] / 2**20:,.0f} MB"
    return out


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _row(t: Task, results: list[dict[str, Any]], skip: str, opts: Options,
         env: dict[str, str]) -> dict[str, Any]:
    s = t.shape
    contention = t.contention + ("+shared" if opts.shared_machine else "")
    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    row.update(env)
    row.update(task=t.task, method=t.method, variant=t.variant, classes=s.classes,
               head=f"{s.in_features}>{s.hidden}>{s.n_top}x{s.n_bottom}", batch=s.batch,
               threads=t.threads, contention=contention, dtype=t.dtype)
    ok = [r for r in results if not r.get("error")]
    errors = [r["error"] for r in results if r.get("error")]
    notes: list[str] = []
    if skip or (errors and not ok):
        e = skip or errors[0]
        expected = skip or e.startswith("skipped: ")
        row["skip_reason"] = e.removeprefix("skipped: ") if expected else f"error: {e}"
        return row
    if errors:
        notes.append(f"{len(errors)} of {len(results)} rounds failed: {errors[0]}")
    times = [x for r in ok for x in r.get("times", [])]
    if times:
        row.update(time_ms=round(1e3 * quantile(times, 0.5), 4),
                   q25_ms=round(1e3 * quantile(times, 0.25), 4),
                   q75_ms=round(1e3 * quantile(times, 0.75), 4), runs=len(times))
    peaks = [r["peak_bytes"] for r in ok if r.get("peak_bytes") is not None]
    if peaks:
        row["peak_mb"] = round(max(peaks) / 2**20, 1)
    verified = [r["verified"] for r in ok if r.get("verified") is not None]
    if verified:
        row["verified"] = all(verified)
    for r in ok:
        notes += [n for n in r.get("notes", []) if n not in notes]
    row["note"] = "; ".join(notes)
    return row


# --------------------------------------------------------------------------- CSV


def csv_path(suite: str, opts: Options) -> Path:
    suffix = "" if opts.preset.name == "full" else f"_{opts.preset.name}"
    return opts.out / f"{suite}_{opts.device}{suffix}.csv"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    progress(f"wrote {path}")
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
