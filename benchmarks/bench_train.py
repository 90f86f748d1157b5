"""How long does one training step take? (forward + backward + optimizer step)

Every method at the preset's head size (PlantCLEF: 1792 -> 128, 1000 x 80 = 80,000 classes,
batch 256), with ``torch.optim.AdamW(fused=True)`` and with AdamW's default implementation;
the sparse head (``hsoftmax_sparse``) with ``hsoftmax.SparseRowAdamW`` (variant ``sparse``) or
``torch.optim.SparseAdam`` (``sparseadam``) on the bottom weights and fused AdamW on the rest.
Rows: ``question=train``, ``variant`` = the optimizer.

    python benchmarks/bench_train.py            # full PlantCLEF run (minutes)
    python benchmarks/bench_train.py --quick    # small head, about 20 s
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import Options, estimate_train_bytes, make_task, script_main, train_variants


def build(opts: Options) -> tuple[list[Any], dict[Any, int], list[Any]]:
    shape = opts.preset.shape
    tasks, est = [], {}
    for method in opts.methods:
        for variant in train_variants(method):
            t = make_task(opts, "train", method, variant, shape)
            tasks.append(t)
            est[t.key()] = estimate_train_bytes(method, shape, variant)
    return tasks, est, []


def main(argv: Sequence[str] | None = None) -> Path:
    return script_main("train", __doc__.splitlines()[0], build, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
