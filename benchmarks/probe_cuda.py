"""Which bottom-logit path makes the CUDA training step faster? A probe, not part of the suite.

On a GPU the PlantCLEF head's training step is bound by the host's kernel launches. This times,
in one process with ``torch.utils.benchmark``, the fused-AdamW step of ``gather_bmm`` and of
``hsoftmax`` three ways: as shipped (per-sample dot products, :func:`hsoftmax.bottom.node_logits`),
with the bottom logits from gathered rows and ``baddbmm`` (the path of compiled graphs, forced by
patching ``hsoftmax.bottom._eager``), and without the target check. It writes ``probe.txt`` and a
profiler table of the shipped step to OUT.

    python benchmarks/probe_cuda.py OUT
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from baselines import make_optimizer  # noqa: E402
from harness import PRESETS, Task  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils import benchmark  # noqa: E402
from worker import _batches, _build, _train_step_fn  # noqa: E402

import hsoftmax.bottom  # noqa: E402
import hsoftmax.functional  # noqa: E402


def _ms(fn: Callable[[], None]) -> float:
    timer = benchmark.Timer("fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=1).median * 1e3


def main(out: Path) -> None:
    shape = PRESETS["full"].shape
    lines = []
    for method in ("gather_bmm", "hsoftmax"):
        task = Task("train", method, "adamw_fused", shape, "cuda", "float32", 2)
        model = _build(task)
        step = _train_step_fn(model, make_optimizer(model, "adamw_fused"), _batches(task))
        for _ in range(5):
            step()
        lines.append(f"train {method} adamw_fused: {_ms(step):.3f} ms")
        if method != "hsoftmax":
            continue
        eager = hsoftmax.bottom._eager
        hsoftmax.bottom._eager = lambda: False
        for _ in range(3):
            step()
        lines.append(f"train {method} adamw_fused gathered path: {_ms(step):.3f} ms")
        hsoftmax.bottom._eager = eager
        check = hsoftmax.functional._check_target
        hsoftmax.functional._check_target = lambda *args: None
        lines.append(f"train {method} adamw_fused no target check: {_ms(step):.3f} ms")
        hsoftmax.functional._check_target = check
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        (out / f"prof_train_{method}.txt").write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45)
        )
    (out / "probe.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
