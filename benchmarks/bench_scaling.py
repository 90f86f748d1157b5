"""How does the cost grow with the number of classes?

Training step (fused AdamW; SparseRowAdamW + fused AdamW for ``hsoftmax_sparse``) and exact
top-5 of every method at each of the preset's class counts (full: 1,000, 10,000, 100,000 and
1,000,000; 80 slots per node, the last node padded), with the preset's in_features, hidden and
batch.
Tasks whose estimated memory exceeds the budget are skipped and recorded with the reason.
One round by default (``--rounds`` to change it).

    python benchmarks/bench_scaling.py [--quick]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from baselines import HeadShape
from harness import (
    Options,
    estimate_inference_bytes,
    estimate_train_bytes,
    make_task,
    script_main,
)


def build(opts: Options) -> tuple[list[Any], dict[Any, int], list[Any]]:
    base = opts.preset.shape
    tasks, est = [], {}
    for classes in opts.preset.scaling_classes:
        shape = HeadShape.for_classes(classes, in_features=base.in_features, hidden=base.hidden,
                                      n_bottom=base.n_bottom, batch=base.batch)
        # fewer warm-up steps and a shorter window for the slow, big heads
        kw: dict[str, Any] = {}
        if classes >= 1_000_000:
            kw = {"warmup": 1, "min_run_time": min(opts.min_run_time, 0.5)}
        for method in opts.methods:
            variant = "sparse" if method == "hsoftmax_sparse" else "adamw_fused"
            t = make_task(opts, "train", method, variant, shape, **kw)
            tasks.append(t)
            est[t.key()] = estimate_train_bytes(method, shape, variant)
            if method != "hsoftmax_sparse":
                t = make_task(opts, "topk5", method, "topk5", shape, **kw)
                tasks.append(t)
                est[t.key()] = estimate_inference_bytes(method, shape)
    return tasks, est, []


def main(argv: Sequence[str] | None = None) -> Path:
    # one round by default: 4 sizes x 6 methods x 2 questions is already 44 processes
    return script_main("scaling", __doc__.splitlines()[0], build, argv, default_rounds=1)


if __name__ == "__main__":
    main(sys.argv[1:])
