"""How much memory does training take, and how many parameters does each head have?

- ``params``: closed-form parameter counts of every method (cross-checked against the built
  modules in the ``params`` column of the other rows).
- ``memory_train``: peak RSS of a fresh process that builds the method, its optimizer (fused
  AdamW; SparseRowAdamW + fused AdamW for ``hsoftmax_sparse``) and runs 3 training steps, minus
  the peak RSS of an idle worker with torch imported (column ``idle_rss_mb``), and minus a warm
  idle worker that ran every method on a tiny head (``peak_rss_warm_mb``).
- ``sparse_train``: the same at the preset's big sizes (full: 1,000,000 and 10,000,000 classes,
  80 slots per node), for the sparse head and, as estimated skips or measurements, the others.
  What would not fit in memory is estimated first and recorded with a skip reason.

    python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from baselines import HeadShape
from harness import Options, estimate_train_bytes, make_task, param_rows, script_main


def build(opts: Options) -> tuple[list[Any], dict[Any, int], list[Any]]:
    shape = opts.preset.shape
    tasks, est = [], {}
    for method in opts.methods:
        variant = "sparse" if method == "hsoftmax_sparse" else "adamw_fused"
        t = make_task(opts, "memory_train", method, variant, shape, steps=3)
        tasks.append(t)
        est[t.key()] = estimate_train_bytes(method, shape, variant)
    big_shapes = [
        HeadShape.for_classes(c, in_features=shape.in_features, hidden=shape.hidden,
                              n_bottom=shape.n_bottom, batch=shape.batch)
        for c in opts.preset.big_classes
    ]
    for big in big_shapes:
        for method in opts.methods:
            variant = "sparse" if method == "hsoftmax_sparse" else "adamw_fused"
            t = make_task(opts, "sparse_train", method, variant, big, steps=4)
            tasks.append(t)
            est[t.key()] = estimate_train_bytes(method, big, variant)
    return tasks, est, param_rows(opts, [shape, *big_shapes])


def main(argv: Sequence[str] | None = None) -> Path:
    # one round: peak memory does not drift like time does
    return script_main("memory", __doc__.splitlines()[0], build, argv, default_rounds=1)


if __name__ == "__main__":
    main(sys.argv[1:])
