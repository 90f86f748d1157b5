"""Run the whole benchmark suite, then the report.

    python benchmarks/run_all.py --quick            # about a minute, results in results/tmp/
    python benchmarks/run_all.py                    # the PlantCLEF head, tens of minutes
    python benchmarks/run_all.py --device cuda      # the same on a GPU
    python benchmarks/run_all.py --only train,memory

Every option of the individual scripts (``--threads``, ``--rounds``, ``--methods``, ...) is
passed through. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_inference  # noqa: E402
import bench_memory  # noqa: E402
import bench_scaling  # noqa: E402
import bench_train  # noqa: E402
import report  # noqa: E402
from harness import progress  # noqa: E402

SCRIPTS = {
    "train": bench_train.main,
    "inference": bench_inference.main,
    "memory": bench_memory.main,
    "scaling": bench_scaling.main,
}


def main(argv: Sequence[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SCRIPTS),
                   help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--no-report", action="store_true")
    a, rest = p.parse_known_args(argv)
    if "--quick" in rest and "--preset" not in rest:
        rest = [x for x in rest if x != "--quick"] + ["--preset", "quick"]
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SCRIPTS]
    if unknown:
        raise SystemExit(f"expected --only in {list(SCRIPTS)}, got {unknown}")
    t0 = time.perf_counter()
    written = []
    for i, name in enumerate(only):
        progress(f"=== [{i + 1}/{len(only)}] bench_{name}.py {' '.join(rest)} "
                 f"({time.perf_counter() - t0:.0f} s elapsed)")
        written.append(SCRIPTS[name](rest))
    if not a.no_report and written:
        written += report.main(["--results", str(written[0].parent)])
    progress(f"=== done in {time.perf_counter() - t0:.0f} s")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
