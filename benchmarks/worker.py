"""Worker process of the benchmarks: runs the tasks read as JSON from stdin.

Each result is printed on stdout as one line ``@@RESULT {json}``. ``x`` is a
``(batch, in_features)`` standard-normal batch and ``y`` uniform labels; four batches rotate.

- ``train``: one step = ``zero_grad()``, ``loss(x, y)``, ``backward()``, ``optimizer.step()``.
  Checked after timing: ``loss(x, y)`` equals ``-log_probs(x)[y].mean()``.
- ``log_probs``, ``topk5``, ``predict``: one batch under ``torch.inference_mode()``. Checked on
  the timed batch and two more (one scaled by 4, so that the distribution is peaked): rows of
  ``log_probs`` sum to 1; ``topk`` equals ``log_probs(x).topk(k)`` (values within 1e-4, and
  ``log_probs`` at the returned indices equal to them, so ties cannot fail it); ``predict`` is
  the argmax (flat heads) or top-1 routing recomputed from ``log_probs`` (two-level heads).
  Variant ``via_log_probs`` of ``topk5`` times ``log_probs(x).topk(k)`` itself.
- ``topk5_trained``: ``topk5`` on structured features (classes grouped under nodes) after the
  hierarchical head is trained 60 steps on them, so that its top level is peaked as in a
  trained model; the other methods' top-k costs do not depend on the weights.

Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` after ``warmup`` calls (one, when a
call takes over 2 s), topped up to at least 3 measurements.

Peak memory (``measure_memory``): the worker first trains and queries the same method on a
tiny head, so that code pages, thread pools and allocator arenas are already counted; the
task's peak is ``ru_maxrss`` after timing minus ``ru_maxrss`` then (on CUDA,
``torch.cuda.max_memory_allocated`` minus the memory allocated before the task).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from baselines import (  # noqa: E402
    HeadShape,
    Method,
    build_method,
    hsoftmax_available,
    linear_ce_available,
    make_optimizer,
)
from torch.utils import benchmark  # noqa: E402

RESULT_MARK = "@@RESULT "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_RUNS = 3
TRAIN_STEPS_BEFORE_TOPK = 60
TINY = HeadShape(64, 16, 10, 10, None, 16)


class Skip(Exception):
    """The task cannot run here (a missing feature): a skip reason, not a failure."""


def _batches(task: Any, shape: HeadShape, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(task.seed)
    out = []
    for _ in range(n):
        x = torch.randn(shape.batch, shape.in_features, generator=g)
        y = torch.randint(0, shape.classes, (shape.batch,), generator=g)
        out.append((x.to(task.device, DTYPES[task.dtype]), y.to(task.device)))
    return out


def _structured_batches(task: Any, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A class's feature is its node's code (dominant) plus its own, projected, plus noise."""
    g = torch.Generator().manual_seed(task.seed + 1)
    s = task.shape
    rank = 64
    codes = 3 * torch.randn(s.n_top, rank, generator=g).repeat_interleave(s.n_bottom, 0)
    codes = codes[: s.classes] + torch.randn(s.classes, rank, generator=g)
    mix = torch.randn(rank, s.in_features, generator=g) / rank**0.5
    out = []
    for _ in range(n):
        y = torch.randint(0, s.classes, (s.batch,), generator=g)
        x = codes[y] @ mix + 0.5 * torch.randn(s.batch, s.in_features, generator=g)
        out.append((x.to(task.device, DTYPES[task.dtype]), y.to(task.device)))
    return out


def _timeit(fn: Callable[[], Any], task: Any) -> list[float]:
    for _ in range(task.warmup):
        start = time.perf_counter()
        fn()
        if time.perf_counter() - start > 2.0:
            break
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=task.threads)
    m = timer.blocked_autorange(min_run_time=task.min_run_time)
    times = [float(t) for t in m.times]
    while len(times) < MIN_RUNS:
        times.append(float(timer.timeit(m.number_per_run).median))
    return times


def _build(task: Any, shape: HeadShape) -> Method:
    if task.method.startswith("hsoftmax"):
        ok, why = hsoftmax_available(reference=task.method == "hsoftmax_reference")
        if not ok:
            raise Skip(why)
    if task.method == "linear_ce":
        ok, why = linear_ce_available()
        if not ok:
            raise Skip(why)
    return build_method(task.method, shape, task.device, DTYPES[task.dtype])


def _step_fn(m: Method, opt: Any, batches: list[Any]) -> Callable[[], None]:
    state = {"i": 0}

    def step() -> None:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad()
        m.loss(x, y).backward()
        opt.step()

    return step


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=1e-5))


def _routing(lp: torch.Tensor, n_top: int, n_bottom: int) -> torch.Tensor:
    """Top-1 routing recomputed from exact log-probs (the paper's class layout)."""
    b, c = lp.shape
    full = torch.cat([lp, lp.new_full((b, n_top * n_bottom - c), -math.inf)], 1).view(
        b, n_top, n_bottom)
    node = full.logsumexp(-1).argmax(-1)
    return node * n_bottom + full[torch.arange(b, device=lp.device), node].argmax(-1)


def verify_inference(m: Method, task: Any, xs: list[torch.Tensor]) -> tuple[bool, list[str]]:
    """Check the answers of ``task`` on several batches (see the module docstring)."""
    s, notes = task.shape, []
    atol = 1e-4 if task.dtype == "float32" else 5e-2
    for x in xs:
        lp = m.log_probs(x).float()
        if task.task == "log_probs":
            total = lp.exp().sum(-1)
            if not _close(total, torch.ones_like(total), atol=1e-3):
                notes.append("log_probs rows do not sum to 1")
        elif task.task.startswith("topk5"):
            values, idx = m.topk(x, task.k)
            ref = lp.topk(task.k, dim=-1).values
            exact = _close(values.float(), ref, atol) and _close(lp.gather(1, idx), ref, atol)
            if not exact or any(len(set(r.tolist())) != task.k for r in idx):
                notes.append("topk differs from log_probs(x).topk(k)")
        elif task.task == "predict":
            pred = m.predict(x)
            flat = m.name in ("flat", "flat_bottleneck", "adaptive")
            ref_idx = lp.argmax(-1) if flat else _routing(lp, s.n_top, s.n_bottom)
            agree = (pred == ref_idx).float().mean().item()
            if agree < 0.99:  # ties between equal float32 log-probs are possible but rare
                notes.append(f"predict agrees with {'argmax' if flat else 'routing'} on "
                             f"{100 * agree:.1f}%")
    return not notes, sorted(set(notes))


def _warm_up_tiny(task: Any) -> None:
    """Train and query the method once on a tiny head (the baseline of the peak memory)."""
    m = _build(task, TINY)
    step = _step_fn(m, make_optimizer(m, "sparse" if task.variant == "sparse" else
                                      "adamw_fused"), _batches(task, TINY))
    for _ in range(2):
        step()
    x = _batches(task, TINY, 1)[0][0]
    with torch.inference_mode():
        m.log_probs(x), m.topk(x, task.k), m.predict(x)


def _memory_now(task: Any) -> int:
    if task.device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _run(task: Any, res: dict[str, Any]) -> None:
    torch.manual_seed(task.seed)
    baseline = 0
    if task.measure_memory:
        _warm_up_tiny(task)
        gc.collect()
        if task.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        baseline = _memory_now(task)
    m = _build(task, task.shape)
    res["notes"].append(m.notes.get("topk" if task.task.startswith("topk") else task.task, ""))
    if task.method == "hsoftmax_reference":
        res["notes"].append("reference path forced (HSOFTMAX_REFERENCE=1)")
    batches = _batches(task, task.shape)
    if task.task == "train":
        m.train()
        res["times"] = _timeit(_step_fn(m, make_optimizer(m, task.variant), batches), task)
        if task.measure_memory:
            res["peak_bytes"] = _memory_now(task) - baseline
        x, y = (t[:8] for t in batches[0])  # 8 rows: all classes' log-probs must fit in memory
        with torch.no_grad():
            loss = m.loss(x, y).float()
            nll = -m.log_probs(x).float().gather(1, y[:, None]).mean()
        res["verified"] = _close(loss, nll, atol=1e-4 * max(1.0, abs(nll.item())))
        if not res["verified"]:
            res["notes"].append(f"loss {loss.item():.6f} != -mean log_probs[y] {nll.item():.6f}")
        return
    if task.task == "topk5_trained":
        batches = _structured_batches(task, TRAIN_STEPS_BEFORE_TOPK + 3)
        if m.name.startswith("hsoftmax"):
            m.train()
            step = _step_fn(m, make_optimizer(m, "adamw_fused"), batches[3:])
            for _ in range(TRAIN_STEPS_BEFORE_TOPK):
                step()
            res["notes"].append(f"trained {TRAIN_STEPS_BEFORE_TOPK} steps on structured data")
    m.eval()
    x = batches[0][0]
    k = task.k
    calls: dict[str, Callable[[], Any]] = {
        "log_probs": lambda: m.log_probs(x),
        "predict": lambda: m.predict(x),
        "topk5": lambda: m.topk(x, k),
        "topk5_trained": lambda: m.topk(x, k),
        "topk5/via_log_probs": lambda: m.log_probs(x).topk(k, dim=-1),
    }
    name = f"{task.task}/{task.variant}" if task.variant else task.task
    if name not in calls:
        raise ValueError(f"unknown task {name!r}")
    if task.variant == "via_log_probs":
        res["notes"] = ["log_probs(x).topk(k)"]
    with torch.inference_mode():
        res["times"] = _timeit(calls[name], task)
        if task.measure_memory:
            res["peak_bytes"] = _memory_now(task) - baseline
        res["verified"], notes = verify_inference(m, task, [x, batches[1][0], 4 * batches[2][0]])
    res["notes"].extend(notes)


def run_task(task: Any) -> dict[str, Any]:
    """Run one task; never raises (errors come back in ``error``, skips as ``skipped: ...``)."""
    res: dict[str, Any] = {"notes": []}
    torch.set_num_threads(task.threads)
    reference = task.method == "hsoftmax_reference"
    forced = reference and os.environ.get("HSOFTMAX_REFERENCE", "") in ("", "0")
    try:
        if forced:  # in-process runs; a worker gets HSOFTMAX_REFERENCE=1 from the harness
            import hsoftmax

            getattr(hsoftmax, "use_reference_path", lambda _: None)(True)
        _run(task, res)
    except Skip as exc:
        res["error"] = f"skipped: {exc}"
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        import traceback

        traceback.print_exc(file=sys.stderr)
    finally:
        if forced:
            import hsoftmax

            getattr(hsoftmax, "use_reference_path", lambda _: None)(False)
    res["notes"] = [n for n in res["notes"] if n]
    return res


def main() -> None:
    from harness import Task

    for d in json.loads(sys.stdin.read()):
        print(RESULT_MARK + json.dumps(run_task(Task.from_json(d))), flush=True)


if __name__ == "__main__":
    main()
