"""Worker process of the benchmark suite: runs tasks read as JSON from stdin.

Each result is printed on stdout as one line ``@@RESULT {json}``. The parent (``harness.py``)
starts a fresh worker per task by default, so ``ru_maxrss`` at the end of a task is that task's
peak resident memory (including the idle cost of the interpreter and torch, which the parent
subtracts using an idle worker).

What each question does (``x`` is a ``(batch, in_features)`` standard-normal batch, ``y`` uniform
labels; four batches rotate so that no step sees the same data twice in a row):

- ``train``: one step = ``zero_grad(set_to_none=True)`` (``False`` for the ``*_keep`` variants),
  ``loss(x, y)``, ``backward()``, ``optimizer.step()``. Verified after timing: ``loss(x, y)`` equals
  ``-log_probs(x)[y].mean()`` (the training loss is the NLL of the exact distribution).

The peak memory (``ru_maxrss``, ``torch.cuda.max_memory_allocated``) is read right after timing,
before any verification, so the checks' float64 references are not counted.
- ``log_probs`` / ``topk5`` / ``predict``: under ``torch.inference_mode()``, model in ``eval()``.
  Verified, on the timed batch and two more (one scaled by 4 to make the distribution peaked):
  ``log_probs`` rows sum to 1; the top-k equals ``log_probs(x).topk(k)`` (values within 1e-4 and
  ``log_probs`` at the returned indices equal the returned values, so ties cannot fail it);
  ``predict`` equals the exact argmax (flat, adaptive) or top-1 routing recomputed from
  ``log_probs`` (argmax of the node masses, then the best slot in that node) for the two-level
  heads.
- ``memory_train`` / ``sparse_train``: construct, then ``steps`` training steps; each step is
  timed with ``time.perf_counter`` (after the first, which allocates optimizer state).
- ``idle``: nothing (the baseline of ``ru_maxrss``); ``idle_warm``: every method trained and
  queried once on a tiny head (the baseline of ``peak_rss_warm_mb``).

After every other task on the CPU, once its peak is recorded, a copy of 128 MB measures the
memory bandwidth of the moment (``copy_gbs``): this VM's memory-bound phases run slower in some
periods than in others.
"""

from __future__ import annotations

import gc
import json
import math
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from baselines import (  # noqa: E402
    HSoftmaxMethod,
    Method,
    build_method,
    hsoftmax_available,
    make_optimizer,
    sparse_optimizer_name,
)
from torch.utils import benchmark  # noqa: E402

RESULT_MARK = "@@RESULT "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _batches(task: Any, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(task.seed)
    s = task.shape
    out = []
    for _ in range(n):
        x = torch.randn(s.batch, s.in_features, generator=g, dtype=torch.float32)
        y = torch.randint(0, s.classes, (s.batch,), generator=g)
        out.append((x.to(task.device, DTYPES[task.dtype]), y.to(task.device)))
    return out


def _structured_batches(task: Any, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Features with the two-level structure the head assumes: a class's code is its node's
    code (dominant) plus its own, projected to ``in_features``, plus noise (``y // n_bottom``
    groups similar classes, as a taxonomy or a clustering would)."""
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


#: Training steps before ``topk5_trained`` is timed (methods whose top-k cost depends on the
#: weights only: the pruned exact top-k of ``hsoftmax``).
TRAIN_STEPS_BEFORE_TOPK = 60


MIN_RUNS = 3


def _timeit(fn: Callable[[], Any], task: Any) -> list[float]:
    """``task.warmup`` calls, then ``blocked_autorange`` until at least MIN_RUNS measurements
    (a slow call, such as a flat 80k-class step, would otherwise give one measurement)."""
    for _ in range(task.warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=task.threads)
    m = timer.blocked_autorange(min_run_time=task.min_run_time)
    times = [float(t) for t in m.times]
    while len(times) < MIN_RUNS:
        times.append(float(timer.timeit(m.number_per_run).median))
    return times


def _build(task: Any) -> Method:
    if task.method.startswith("hsoftmax"):
        ok, why = hsoftmax_available()
        if not ok:
            raise _Skip(why)
    try:
        return build_method(task.method, task.shape, task.device, DTYPES[task.dtype])
    except TypeError as exc:
        if task.method == "hsoftmax_sparse":
            raise _Skip(f"HierarchicalSoftmax(sparse=True) not available: {exc}") from exc
        raise


class _Skip(Exception):
    """The task cannot run here (missing feature); reported as a skip reason, not a failure."""


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=1e-5))


def _node_routing(lp: torch.Tensor, n_top: int, n_bottom: int) -> torch.Tensor:
    """Top-1 routing recomputed from exact log-probs (identity class layout)."""
    b, c = lp.shape
    pad = n_top * n_bottom - c
    full = torch.cat([lp, lp.new_full((b, pad), -math.inf)], dim=1) if pad else lp
    full = full.view(b, n_top, n_bottom)
    node = full.logsumexp(dim=-1).argmax(dim=-1)
    slot = full[torch.arange(b, device=lp.device), node].argmax(dim=-1)
    return node * n_bottom + slot


def verify_inference(m: Method, task: Any, xs: list[torch.Tensor]) -> tuple[bool, list[str]]:
    """Check the answers of ``task.variant`` on several batches (see the module docstring)."""
    notes: list[str] = []
    ok = True
    s = task.shape
    atol = 1e-4 if task.dtype == "float32" else 5e-2
    for x in xs:
        lp = m.log_probs(x).float()
        if lp.shape != (x.shape[0], s.classes):
            return False, [f"log_probs shape {tuple(lp.shape)} != {(x.shape[0], s.classes)}"]
        if task.variant == "log_probs":
            total = lp.exp().sum(-1)
            if not _close(total, torch.ones_like(total), atol=1e-3):
                ok = False
                notes.append("log_probs rows do not sum to 1")
        elif task.variant == "topk5":
            values, idx = m.topk(x, task.k)
            ref = lp.topk(task.k, dim=-1).values
            exact = _close(values.float(), ref, atol) and _close(lp.gather(1, idx), ref, atol)
            distinct = all(len(set(r.tolist())) == task.k for r in idx)
            if not (exact and distinct):
                ok = False
                notes.append("topk differs from log_probs(x).topk(k)")
        elif task.variant == "predict":
            pred = m.predict(x)
            if task.method in ("flat", "flat_bottleneck", "adaptive"):
                ref_idx = lp.argmax(dim=-1)
                what = "argmax"
            else:
                ref_idx = _node_routing(lp, s.n_top, s.n_bottom)
                what = "top-1 routing"
            agree = (pred == ref_idx).float().mean().item()
            if agree < 1.0:
                # ties between equal float32 log-probs are possible but should be rare
                ok = ok and agree >= 0.99
                notes.append(f"predict agrees with {what} on {100 * agree:.1f}%")
    if isinstance(m, HSoftmaxMethod):
        notes.extend(_param_reference_check(m, xs[0]))
    return ok, notes


def _param_reference_check(m: HSoftmaxMethod, x: torch.Tensor) -> list[str]:
    """Compare head.log_probs with a float64 recomputation from the documented parameters."""
    head = m.head
    slots = getattr(head, "class_slots", None)
    if isinstance(slots, torch.Tensor) and not _is_identity(slots):
        return []
    with torch.no_grad():
        hd = {n: p.detach().double() for n, p in head.named_parameters()}
        try:
            z = torch.nn.functional.linear(x.double(), hd["proj.weight"], hd["proj.bias"])
            z = head.activation(z)
            top = torch.nn.functional.linear(z, hd["top.weight"], hd["top.bias"])
            w, b = hd["bottom_weight"], hd["bottom_bias"]  # (n_top, n_bottom, hidden)
        except KeyError:
            return ["float64 parameter reference n/a (parameter names differ)"]
        n_top, n_bottom = w.shape[0], w.shape[1]
        c = head.num_classes
        bottom = torch.einsum("bh,tnh->btn", z, w) + b
        valid = torch.arange(n_top * n_bottom, device=w.device) < c
        bottom = bottom.masked_fill(~valid.view(n_top, n_bottom), -math.inf)
        top = top.masked_fill(~valid.view(n_top, n_bottom).any(-1), -math.inf)
        lp = (top.log_softmax(-1).unsqueeze(-1) + bottom.log_softmax(-1)).flatten(1)[:, :c]
        got = m.log_probs(x).double()
    if not torch.allclose(got, lp, atol=1e-4, rtol=1e-5):
        err = (got - lp).abs().max().item()
        return [f"head.log_probs differs from a float64 parameter reference by {err:.2e}"]
    return []


def _is_identity(slots: torch.Tensor) -> bool:
    return bool((slots == torch.arange(len(slots), device=slots.device)).all())


def _train_step_fn(
    m: Method, opt: Any, batches: list[Any], set_to_none: bool = True
) -> Callable[[], None]:
    state = {"i": 0}

    def step() -> None:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=set_to_none)
        m.loss(x, y).backward()
        opt.step()

    return step


def _train_before_topk(m: Method, task: Any, batches: list[Any], res: dict[str, Any]) -> None:
    """Train ``hsoftmax`` on the structured data, so that its top level is peaked as in a
    trained model; the other methods' top-k costs do not depend on their weights."""
    if task.method != "hsoftmax":
        res["notes"].append("structured inputs; cost independent of training, timed at init")
        return
    m.train()
    step = _train_step_fn(m, make_optimizer(m, "adamw_fused"), batches)
    for _ in range(len(batches)):
        step()
    with torch.no_grad():
        top = cast(Any, m).head(batches[0][0]).top_logits.softmax(-1).max(-1).values.median().item()
    res["notes"].append(
        f"trained {len(batches)} AdamW steps on structured synthetic data; "
        f"median top-node probability {top:.2f}"
    )


def run_task(task: Any) -> dict[str, Any]:
    """Run one task; never raises (errors come back in ``error``, skips in ``skip``)."""
    res: dict[str, Any] = {"key": list(task.key()), "notes": []}
    try:
        torch.set_num_threads(task.threads)
        if task.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if task.question == "idle_warm":
            _warm_up_all(task)
        elif task.question != "idle":
            _run(task, res)
    except _Skip as exc:
        res["error"] = f"skipped: {exc}"
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    gc.collect()
    if "peak_rss_kb" not in res:  # idle, or a task that failed before its peak was marked
        _mark_peak(task, res)
    if task.device == "cpu" and task.question not in ("idle", "idle_warm"):
        res["copy_gbs"] = round(_copy_bandwidth_gbs(), 1)  # after the peak: not counted
    return res


def _copy_bandwidth_gbs() -> float:
    """The machine's memory bandwidth at this moment, in GB/s (bytes read and written): the
    best of ten copies of 128 MB, four times the L3 cache of the benchmark VM."""
    source = torch.ones(2**25)
    target = torch.empty_like(source)
    best = math.inf
    for _ in range(10):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best / 1e9


def _warm_up_all(task: Any) -> None:
    """Train and query every method once on a tiny head (the warm idle baseline)."""
    from baselines import METHODS, HeadShape

    tiny = HeadShape(64, 16, 10, 10, None, 16)
    for name in METHODS:
        t = type(task)("train", name, "sparse" if name.endswith("sparse") else "adamw_fused",
                       tiny, task.device, task.dtype, task.threads)
        try:
            m = _build(t)
        except _Skip:
            continue
        opt = make_optimizer(m, t.variant)
        step = _train_step_fn(m, opt, _batches(t))
        for _ in range(2):
            step()
        x = _batches(t, 1)[0][0]
        with torch.inference_mode():
            m.log_probs(x), m.topk(x, 5), m.predict(x)


def _mark_peak(task: Any, res: dict[str, Any]) -> None:
    """Record the peak memory so far: called right after timing, before the verification
    (whose float64 reference would otherwise be counted as the method's memory)."""
    res["peak_rss_kb"] = _maxrss_kb()
    if task.device == "cuda":
        torch.cuda.synchronize()
        res["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()


def _run(task: Any, res: dict[str, Any]) -> None:
    torch.manual_seed(task.seed)
    m = _build(task)
    res["params"] = sum(p.numel() for p in m.parameters())
    batches = _batches(task)
    q = task.question
    if task.variant.startswith("sparse"):
        res["notes"].append(f"{sparse_optimizer_name(task.variant)} on the sparse parameters, "
                            "fused AdamW on the rest")
    if q == "train":
        m.train()
        opt = make_optimizer(m, task.variant)
        keep = task.variant.endswith("_keep")
        if keep:
            res["notes"].append("zero_grad(set_to_none=False): gradients kept between steps")
        res["times"] = _timeit(_train_step_fn(m, opt, batches, set_to_none=not keep), task)
        _mark_peak(task, res)
        x, y = batches[0]
        loss = m.loss(x, y).detach()
        with torch.no_grad():
            nll = -m.log_probs(x).float().gather(1, y[:, None]).mean()
        res["verified"] = _close(loss.float(), nll, atol=1e-4 * max(1.0, abs(nll.item())))
        if not res["verified"]:
            res["notes"].append(f"loss {loss.item():.6f} != -mean log_probs[y] {nll.item():.6f}")
    elif q in ("log_probs", "topk5", "predict", "topk5_trained"):
        if q == "topk5_trained":
            batches = _structured_batches(task, TRAIN_STEPS_BEFORE_TOPK + 3)
            _train_before_topk(m, task, batches[3:], res)
        m.eval()
        with torch.inference_mode():
            x = batches[0][0]
            if q == "log_probs":
                def fn() -> Any:
                    return m.log_probs(x)
            elif q in ("topk5", "topk5_trained"):
                def fn() -> Any:
                    return m.topk(x, task.k)
            else:
                def fn() -> Any:
                    return m.predict(x)
            res["times"] = _timeit(fn, task)
            _mark_peak(task, res)
            xs = [x, batches[1][0], 4.0 * batches[2][0]]
            res["verified"], notes = verify_inference(m, task, xs)
            res["notes"].extend(notes)
    elif q in ("memory_train", "sparse_train"):
        m.train()
        opt = make_optimizer(m, task.variant)
        step = _train_step_fn(m, opt, batches)
        times = []
        for _ in range(task.steps):
            if task.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if task.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res["times"] = times[1:] if len(times) > 1 else times
        _mark_peak(task, res)
        res["notes"].append(f"{task.steps} steps after construction; first step "
                            f"{1e3 * times[0]:.0f} ms (allocates optimizer state)")
    else:
        raise ValueError(f"unknown question {q!r}")


def main() -> None:
    from harness import Task

    tasks = [Task.from_json(d) for d in json.loads(sys.stdin.read())]
    for t in tasks:
        r = run_task(t)
        print(RESULT_MARK + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
