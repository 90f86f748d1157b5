"""Where does a training step's time go, phase by phase, against what its matrix products need?

    python benchmarks/breakdown_step.py [--method hsoftmax_sparse --variant sparse] [--steps 300]

Builds the method at the preset's head size (full: PlantCLEF), then times each phase of
``--steps`` training steps with ``time.perf_counter`` (zero_grad, forward, backward, then each
optimizer of the step) and reports their medians. Beside them, the same step's matrix products
alone (``torch.utils.benchmark``, on the same shapes, data in cache): the part of the step that
no implementation of this architecture avoids. Writes
``results/breakdown_<method>_<variant>_<device>.txt`` (``results/tmp`` for other presets).
Run it alone: on a busy machine the phases are noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from baselines import METHODS, make_optimizer  # noqa: E402
from harness import PRESETS, Task, environment  # noqa: E402
from torch.utils import benchmark  # noqa: E402
from worker import _batches, _build  # noqa: E402


def _phases(model: Any, optimizer: Any, batches: list, steps: int) -> dict[str, float]:
    """Median milliseconds of each phase of ``steps`` training steps (after 20 warm-up steps)."""
    optimizers = getattr(optimizer, "opts", (optimizer,))
    names = ["zero_grad", "forward", "backward"]
    names += [f"step {type(o).__name__}" for o in optimizers]
    times: dict[str, list[float]] = {name: [] for name in [*names, "total"]}
    clock = time.perf_counter
    for i in range(steps + 20):
        x, y = batches[i % len(batches)]
        marks = [clock()]
        optimizer.zero_grad(set_to_none=True)
        marks.append(clock())
        loss = model.loss(x, y)
        marks.append(clock())
        loss.backward()
        marks.append(clock())
        for o in optimizers:
            o.step()
            marks.append(clock())
        if i >= 20:
            for name, start, stop in zip(names, marks, marks[1:]):
                times[name].append(stop - start)
            times["total"].append(marks[-1] - marks[0])
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def _products(batch: int, in_features: int, hidden: int, n_top: int) -> dict[str, float]:
    """Milliseconds of the step's dense matrix products, each alone: the projection and the top
    layer, forward and backward (no input gradient: the benchmark's inputs need none)."""
    x, w = torch.randn(batch, in_features), torch.randn(hidden, in_features)
    h, top = torch.randn(batch, hidden), torch.randn(n_top, hidden)
    g, g_hidden = torch.randn(batch, n_top), torch.randn(batch, hidden)
    bias, top_bias = torch.randn(hidden), torch.randn(n_top)
    cases: dict[str, Callable[[], object]] = {
        "projection forward": lambda: torch.addmm(bias, x, w.T),
        "projection weight gradient": lambda: g_hidden.T.mm(x),
        "top forward": lambda: torch.addmm(top_bias, h, top.T),
        "top weight gradient": lambda: g.T.mm(h),
        "top hidden gradient": lambda: g.mm(top),
    }
    threads = torch.get_num_threads()
    return {
        name: benchmark.Timer("f()", globals={"f": f}, num_threads=threads)
        .blocked_autorange(min_run_time=0.5).median * 1e3
        for name, f in cases.items()
    }


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, default="hsoftmax_sparse")
    p.add_argument("--variant", default="sparse", help="adamw_fused, adamw or sparse")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    shape = PRESETS[a.preset].shape
    task = Task("train", a.method, a.variant, shape, "cpu", "float32", a.threads)
    model = _build(task)
    phases = _phases(model, make_optimizer(model, a.variant), _batches(task), a.steps)
    products = _products(shape.batch, shape.in_features, shape.hidden, shape.n_top)
    env = environment("cpu")
    lines = [
        f"# {a.method} train ({a.variant}), classes={shape.classes:,}, batch={shape.batch}, "
        f"{a.steps} steps, {a.threads} threads",
        f"# {env['device_name']}, torch {env['torch']}, commit {env['commit']}, {env['date']}",
        "",
        "phase medians (ms), in the step:",
        *(f"  {name:32s} {ms:7.3f}" for name, ms in phases.items()),
        "",
        "the step's matrix products, each alone (ms):",
        *(f"  {name:32s} {ms:7.3f}" for name, ms in products.items()),
        f"  {'sum':32s} {sum(products.values()):7.3f}",
    ]
    text = "\n".join(lines) + "\n"
    folder = HERE / "results" if a.preset == "full" else HERE / "results" / "tmp"
    path = folder / f"breakdown_{a.method}_{a.variant}_cpu.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
