"""Where does the time go? ``torch.profiler`` tables of one method's training step or inference.

    python benchmarks/profile_step.py --method hsoftmax --question train
    python benchmarks/profile_step.py --method hsoftmax_sparse --question train --variant sparse
    python benchmarks/profile_step.py --method hsoftmax --question topk5

Builds the method at the preset's head size (full: PlantCLEF), warms up, counts the minor page
faults of ``--steps`` calls, profiles ``--steps`` more, and writes both to
``results/profile_<method>_<question>[_<variant>][_<classes>][_<N>threads]_<device>.txt`` (the
thread count only when it is not 1; ``results/tmp`` for other presets) and stdout. Run it
alone: a profile on a busy machine is noise.
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from baselines import METHODS, make_optimizer  # noqa: E402
from harness import PRESETS, environment  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from worker import _batches, _build, _train_step_fn  # noqa: E402


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, default="hsoftmax")
    p.add_argument("--question", choices=("train", "log_probs", "topk5", "predict"),
                   default="train")
    p.add_argument("--variant", default="adamw_fused",
                   help="optimizer for train: adamw_fused, adamw or sparse")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--classes", type=int, default=None, help="override the preset's classes")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args(argv)

    from baselines import HeadShape
    from harness import Task

    shape = PRESETS[a.preset].shape
    if a.classes:
        shape = HeadShape.for_classes(a.classes, in_features=shape.in_features,
                                      hidden=shape.hidden, n_bottom=shape.n_bottom,
                                      batch=shape.batch)
    torch.set_num_threads(a.threads)
    variant = a.variant if a.question == "train" else a.question
    task = Task(a.question, a.method, variant, shape, a.device, "float32", a.threads)
    m = _build(task)
    batches = _batches(task)
    if a.question == "train":
        opt = make_optimizer(m, variant)
        fn = _train_step_fn(m, opt, batches)
    else:
        m.eval()
        x = batches[0][0]
        op = {"log_probs": lambda: m.log_probs(x), "topk5": lambda: m.topk(x, 5),
              "predict": lambda: m.predict(x)}[a.question]

        def fn() -> None:
            with torch.inference_mode():
                op()

    for _ in range(3):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(a.steps):
        fn()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / a.steps
    activities = [ProfilerActivity.CPU]
    if a.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(a.steps):
            fn()
        if a.device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
    env = environment(a.device)
    header = (f"# {a.method} {a.question} ({variant}), classes={shape.classes:,}, "
              f"batch={shape.batch}, {a.steps} calls, {a.threads} threads\n"
              f"# {env['device_name']}, torch {env['torch']}, commit {env['commit']}, "
              f"{env['date']}\n"
              f"# minor page faults per call (outside the profiler): {faults:,.0f}\n")
    text = header + prof.key_averages().table(sort_by=sort, row_limit=a.rows)
    folder = HERE / "results" if a.preset == "full" else HERE / "results" / "tmp"
    suffix = f"_{variant}" if a.question == "train" else ""
    cls = f"_{shape.classes}" if a.classes else ""
    threads = f"_{a.threads}threads" if a.threads != 1 else ""
    path = folder / f"profile_{a.method}_{a.question}{suffix}{cls}{threads}_{a.device}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"wrote {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
