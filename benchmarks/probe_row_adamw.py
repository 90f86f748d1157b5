"""What does updating the touched rows one kernel call per row cost? A probe, not part of the suite.

    python benchmarks/probe_row_adamw.py

``hsoftmax.SparseRowAdamW`` updates the rows of ``bottom_weight`` that a batch touched with one
call of torch's fused AdamW kernel on a list of per-row views (PlantCLEF head: 1,000 rows of
80 x 128, about 226 of them touched by a batch of 256). This times, with
``torch.utils.benchmark`` and 2 threads, in one process:

- ``SparseRowAdamW.step`` on such a sparse gradient;
- the fused kernel alone on the per-row views (with 2 threads, then 1);
- the fused kernel on one contiguous block holding as many rows: the same arithmetic and memory
  traffic without a call per row, which no stock operator offers for scattered rows.

Each call takes the next of 8 sets of rows (different rows each time, as in training), so most
of the data comes from memory. Writes ``results/probe_row_adamw_cpu.txt``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from harness import environment  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import hsoftmax  # noqa: E402

N_TOP, N_BOTTOM, HIDDEN, BATCH, SETS = 1000, 80, 128, 256, 8


def _fused_adamw(weights: list[torch.Tensor], grads: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 steps: list[torch.Tensor]) -> None:
    """Torch's fused AdamW kernel, with SparseRowAdamW's defaults."""
    torch._fused_adamw_(weights, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1e-3, beta1=0.9,
                        beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)


def _cycling(calls: list[Callable[[], None]]) -> Callable[[], None]:
    """One call per invocation, the next set of rows each time."""
    state = {"i": 0}

    def call() -> None:
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    return call


def main() -> Path:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(N_TOP, N_BOTTOM, HIDDEN))
    optimizer = hsoftmax.SparseRowAdamW([weight])
    grads = []
    for _ in range(SETS):
        rows = torch.randint(0, N_TOP, (BATCH,)).unique()
        values = torch.randn(len(rows), N_BOTTOM, HIDDEN)
        grads.append((rows, values, torch.sparse_coo_tensor(
            rows.unsqueeze(0), values, weight.shape, check_invariants=False)._coalesced_(True)))
    touched = round(sum(len(rows) for rows, _, _ in grads) / SETS)
    weight.grad = grads[0][2]
    optimizer.step()  # creates the moments
    moments = (optimizer.state[weight]["exp_avg"], optimizer.state[weight]["exp_avg_sq"])

    def step(grad: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            weight.grad = grad
            optimizer.step()
        return call

    def per_row(rows: torch.Tensor, values: torch.Tensor) -> Callable[[], None]:
        lists = [[t.detach()[i] for i in rows.tolist()] for t in (weight, *moments)]
        row_grads = list(values.unbind(0))
        steps = [torch.tensor(1.0)] * len(row_grads)
        return lambda: _fused_adamw(lists[0], row_grads, lists[1], lists[2], steps)

    def block(rows: torch.Tensor) -> Callable[[], None]:
        w, g, m, v = ([torch.randn(len(rows), N_BOTTOM, HIDDEN).abs()] for _ in range(4))
        return lambda: _fused_adamw(w, g, m, v, [torch.tensor(1.0)])

    cases = {
        "SparseRowAdamW.step": _cycling([step(g) for _, _, g in grads]),
        "fused kernel, per-row views": _cycling([per_row(r, v) for r, v, _ in grads]),
        "fused kernel, per-row views, 1 thread": _cycling([per_row(r, v) for r, v, _ in grads]),
        "fused kernel, one contiguous block": _cycling([block(r) for r, _, _ in grads]),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):  # interleaved rounds
        for name, fn in cases.items():
            threads = 1 if name.endswith("1 thread") else 2
            timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
            times[name].append(timer.blocked_autorange(min_run_time=1.0).median * 1e3)
    env = environment("cpu")
    lines = [f"# SparseRowAdamW rows: {N_TOP} x {N_BOTTOM} x {HIDDEN}, about {touched} rows "
             f"touched per call (batch {BATCH}), {SETS} row sets in turn",
             f"# {env['device_name']}, torch {env['torch']}, commit {env['commit']}, "
             f"{env['date']}", "", "median ms over 3 interleaved rounds (min-max):"]
    for name, ts in times.items():
        ts = sorted(ts)
        lines.append(f"  {name:<40} {ts[1]:7.3f}  ({ts[0]:.3f}-{ts[-1]:.3f})")
    out = HERE / "results" / "probe_row_adamw_cpu.txt"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
