"""How long do exact log-probabilities, exact top-5 and top-1 routing take?

Every method at the preset's head size, under ``torch.inference_mode()``, one batch:
``log_probs(x)`` (all classes), ``topk(x, 5)`` (exact; checked against ``log_probs(x).topk(5)``
while timing, column ``verified``), ``predict(x)`` (exact argmax for the flat heads and the
adaptive softmax; top-1 routing for the two-level heads). ``hsoftmax_sparse`` is left out: its
inference is the dense head's. ``topk5_trained`` times the exact top-5 on structured synthetic
features (classes grouped under nodes) after ``hsoftmax`` is trained on them for a few steps,
so that its top level is peaked as in a trained model; at initialisation (``topk5``) the top
level is nearly uniform, the worst case for its pruned search.

    python benchmarks/bench_inference.py [--quick]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import Options, estimate_inference_bytes, make_task, script_main

QUESTIONS = ("log_probs", "topk5", "predict", "topk5_trained")


def build(opts: Options) -> tuple[list[Any], dict[Any, int], list[Any]]:
    shape = opts.preset.shape
    tasks, est = [], {}
    for q in QUESTIONS:
        for method in opts.methods:
            if method == "hsoftmax_sparse":
                continue
            variant = "topk5" if q == "topk5_trained" else q
            t = make_task(opts, q, method, variant, shape)
            tasks.append(t)
            est[t.key()] = estimate_inference_bytes(method, shape)
    return tasks, est, []


def main(argv: Sequence[str] | None = None) -> Path:
    return script_main("inference", __doc__.splitlines()[0], build, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
