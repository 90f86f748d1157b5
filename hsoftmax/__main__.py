"""``python -m hsoftmax``: parameter, memory and latency of a hierarchical head against flat ones.

With no arguments it uses the paper's configuration (EfficientNet-B4's 1792 features,
80,000 classes, 1000 nodes of 80, a 128-d projection, batch 256). It prints the closed-form
parameter, memory and FLOP comparison of the flat, bottleneck-flat and hierarchical heads, and
then times a training step and inference of each on this machine (``--no-timing`` skips that),
and the training step of the flat head with torch's chunked ``F.linear_cross_entropy``
(torch >= 2.13), which never builds the full logits. Progress goes to stderr, results to stdout.

The timings use ``time.perf_counter`` rather than ``torch.utils.benchmark``, whose import pulls
in ``torch.utils.cpp_extension`` (it prints ``No CUDA runtime is found`` on a CPU machine with a
CUDA build of torch).
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .builders import suggest_shape
from .counting import compare_heads, format_head_table, format_paper_table
from .loss import HierarchicalCrossEntropy
from .softmax import HierarchicalSoftmax

__all__ = ["main"]

PAPER = {"in_features": 1792, "num_classes": 80_000, "n_bottom": 80, "hidden": 128}
#: The flat head trained with torch's chunked ``F.linear_cross_entropy`` (training step only).
LINEAR_CE = "flat-linear-ce"
TASKS = ("train step", "exact log-probs", "top-1")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m hsoftmax``.

    Returns:
        The parser.

    Example:
        >>> build_parser().parse_args(["--num-classes", "1000"]).num_classes
        1000
    """
    prog = "hsoftmax" if Path(sys.argv[0]).stem == "hsoftmax" else "python -m hsoftmax"
    description = (
        "Compare a two-level hierarchical softmax head with a flat Linear(in, C) head and a "
        "flat head on the same bottleneck (Linear(in, hidden) then Linear(hidden, C)): "
        "exact parameter counts, memory, FLOPs per sample, and the measured latency of a "
        "training step and of inference on this machine, with the flat head's training step "
        "also timed with torch's chunked F.linear_cross_entropy (torch >= 2.13). The defaults "
        "are the PlantCLEF 2022 paper's configuration (EfficientNet-B4 features, 80,000 "
        "classes, 1000 nodes of 80, hidden 128)."
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=textwrap.fill(description, 78),
        epilog=(
            "examples:\n"
            f"  {prog} --no-timing\n"
            f"  {prog} --num-classes 10000 --n-bottom 100 \\\n"
            "      --batch-size 64 --min-run-time 0.5"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--in-features",
        type=_positive_int,
        default=PAPER["in_features"],
        metavar="N",
        help="size of the backbone's feature vector (default: %(default)s, EfficientNet-B4)",
    )
    add(
        "--num-classes",
        type=_positive_int,
        default=PAPER["num_classes"],
        metavar="C",
        help="number of classes (default: %(default)s)",
    )
    add(
        "--n-bottom",
        type=_positive_int,
        default=PAPER["n_bottom"],
        metavar="N",
        help="classes (slots) per node of the hierarchical head (default: %(default)s)",
    )
    add(
        "--n-top",
        type=_positive_int,
        default=None,
        metavar="N",
        help="nodes of the top layer (default: ceil(num_classes / n_bottom))",
    )
    add(
        "--hidden",
        type=_positive_int,
        default=PAPER["hidden"],
        metavar="H",
        help="size of the hierarchical head's projection, also the bottleneck-flat head's "
        "(default: %(default)s)",
    )
    add(
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="B",
        help="samples per batch in the timings (default: %(default)s)",
    )
    add(
        "--no-timing",
        action="store_true",
        help="print the closed-form comparison only, time nothing",
    )
    add(
        "--min-run-time",
        type=_positive_float,
        default=0.3,
        metavar="SECONDS",
        help="time spent repeating each timing; a slow one still runs twice, a warm-up and "
        "one timed run (default: %(default)s)",
    )
    return parser


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _time(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median seconds per call: one warm-up call, then calls for at least ``min_run_time``
    seconds (at least one), timed in blocks of about 10 ms so that fast calls are not lost in
    the timer's resolution."""
    start = time.perf_counter()
    fn()
    number = max(1, int(0.01 / max(time.perf_counter() - start, 1e-7)))
    times: list[float] = []
    deadline = time.perf_counter() + min_run_time
    while not times or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def linear_cross_entropy_available() -> bool:
    """Whether this torch has the chunked ``F.linear_cross_entropy`` (torch >= 2.13)."""
    return hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")


def _heads(
    in_features: int, num_classes: int, n_top: int, n_bottom: int, hidden: int
) -> list[tuple[str, Callable[[], nn.Module]]]:
    # the flat head last: its large buffers disturb the allocator for whatever follows
    return [
        (
            "hierarchical",
            lambda: HierarchicalSoftmax(
                in_features, n_top, n_bottom, hidden, num_classes=num_classes
            ),
        ),
        (
            "bottleneck-flat",
            lambda: nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            ),
        ),
        ("flat", lambda: nn.Linear(in_features, num_classes)),
        (LINEAR_CE, lambda: nn.Linear(in_features, num_classes)),
    ]


def _tasks(
    name: str, head: nn.Module, x: Tensor, y: Tensor
) -> list[tuple[str, Callable[[], Any]]]:
    params = list(head.parameters())
    if name == LINEAR_CE:
        assert isinstance(head, nn.Linear)
        linear = head
        options = getattr(nn, "LinearCrossEntropyOptions")()  # noqa: B009 (torch >= 2.13)
        chunked = getattr(F, "linear_cross_entropy")  # noqa: B009

        def loss() -> Tensor:
            return chunked(x, linear.weight, y, linear_bias=linear.bias, options=options)

        exact = top1 = loss  # not timed: inference is the flat head's

    elif isinstance(head, HierarchicalSoftmax):
        hier = head
        criterion = HierarchicalCrossEntropy()

        def loss() -> Tensor:
            return criterion(hier(x), y)

        def exact() -> Tensor:
            return hier.log_probs(x)

        def top1() -> Tensor:
            return hier.predict(x)

    else:

        def loss() -> Tensor:
            return F.cross_entropy(head(x), y)

        def exact() -> Tensor:
            return F.log_softmax(head(x), dim=-1)

        def top1() -> Tensor:
            return head(x).argmax(dim=-1)

    def train() -> None:
        # zero_grad(set_to_none=False) (gradients kept and zeroed in place, the fast path for
        # the hierarchical head), backward, plain SGD step; no torch.optim, whose import pulls
        # in torch._dynamo (seconds of start-up)
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        loss().backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-3)

    def inference(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.inference_mode():
                return fn()

        return run

    if name == LINEAR_CE:
        return [("train step", train)]
    return [
        ("train step", train),
        ("exact log-probs", inference(exact)),
        ("top-1", inference(top1)),
    ]


def measure(
    in_features: int,
    num_classes: int,
    n_top: int,
    n_bottom: int,
    hidden: int,
    batch_size: int,
    min_run_time: float = 0.3,
) -> dict[str, dict[str, float]]:
    """Time a training step and inference of the three heads on random data, and the training
    step of the flat head with the chunked ``F.linear_cross_entropy`` where torch has it.

    Every head is timed in its own block (warm-up, then repetitions), the flat heads last, and
    freed before the next. A training step is ``zero_grad``, forward, cross-entropy, backward
    and a plain SGD step.

    Args:
        in_features: input size.
        num_classes: number of classes.
        n_top: nodes of the hierarchical head.
        n_bottom: slots per node.
        hidden: projection (and bottleneck) size.
        batch_size: samples per batch.
        min_run_time: seconds of repetitions per timing. Default: 0.3.

    Returns:
        ``{head: {"train step" | "exact log-probs" | "top-1": median seconds per batch}}``;
        ``"flat-linear-ce"`` has the training step only, and is absent where torch has no
        ``F.linear_cross_entropy``.

    Example:
        >>> t = measure(8, 20, 4, 5, 4, batch_size=2, min_run_time=0.01)
        >>> sorted(t)[:2], sorted(t["flat"]), {"flat", "hierarchical"} <= set(t)
        (['bottleneck-flat', 'flat'], ['exact log-probs', 'top-1', 'train step'], True)
    """
    torch.manual_seed(0)
    x = torch.randn(batch_size, in_features)
    y = torch.randint(0, num_classes, (batch_size,))
    heads = _heads(in_features, num_classes, n_top, n_bottom, hidden)
    if not linear_cross_entropy_available():
        _progress(
            f"skipping {LINEAR_CE}: torch {torch.__version__} has no "
            "F.linear_cross_entropy (torch >= 2.13)"
        )
        heads = [h for h in heads if h[0] != LINEAR_CE]
    total = sum(1 if name == LINEAR_CE else 3 for name, _ in heads)
    results: dict[str, dict[str, float]] = {}
    step = 0
    for name, make in heads:
        head = make()
        for task, fn in _tasks(name, head, x, y):
            step += 1
            start = time.perf_counter()
            seconds = _time(fn, min_run_time)
            results.setdefault(name, {})[task] = seconds
            _progress(
                f"[{step}/{total}] {name:<15} {task:<16} {1e3 * seconds:10.2f} ms/batch "
                f"({time.perf_counter() - start:.1f} s)"
            )
        del head, fn
        gc.collect()
    return results


def format_timings(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table of :func:`measure`'s results, in ms per batch, with speed-ups.

    Args:
        results: what :func:`measure` returns.

    Returns:
        The table.

    Example:
        >>> r = {h: {"train step": 0.002, "exact log-probs": 0.001, "top-1": 0.001}
        ...      for h in ("hierarchical", "bottleneck-flat", "flat")}
        >>> print(format_timings(r))
        head                         train step  exact log-probs  top-1  (ms per batch)
        flat                               2.00             1.00   1.00
        bottleneck-flat                    2.00             1.00   1.00
        hierarchical                       2.00             1.00   1.00
        speed-up vs flat                   1.0x             1.0x   1.0x
        speed-up vs bottleneck-flat        1.0x             1.0x   1.0x
    """
    tasks = list(TASKS)
    rows = [["head", *tasks]]
    order = [h for h in ("flat", LINEAR_CE, "bottleneck-flat", "hierarchical") if h in results]

    rows += [
        [h, *(f"{1e3 * results[h][t]:.2f}" if t in results[h] else "-" for t in tasks)]
        for h in order
    ]
    if "hierarchical" in results:
        hier = results["hierarchical"]
        rows += [
            [
                f"speed-up vs {b}",
                *(f"{results[b][t] / hier[t]:.1f}x" if t in results[b] else "-" for t in tasks),
            ]
            for b in ("flat", LINEAR_CE, "bottleneck-flat")
            if b in results
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
        for r in rows
    ]
    lines[0] += "  (ms per batch)"
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments, without the program name. Default: ``sys.argv[1:]``.

    Returns:
        The exit status, 0 on success.

    Example:
        >>> main(["--num-classes", "100", "--n-bottom", "10", "--in-features", "32",
        ...       "--hidden", "8", "--no-timing"])  # doctest: +ELLIPSIS
        hsoftmax ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    n_top = args.n_top if args.n_top is not None else -(-args.num_classes // args.n_bottom)
    if n_top * args.n_bottom < args.num_classes:
        parser.error(
            f"expected n_top * n_bottom >= num_classes ({args.num_classes}), "
            f"got {n_top} * {args.n_bottom} = {n_top * args.n_bottom}"
        )
    heads = compare_heads(
        args.in_features, args.num_classes, args.n_bottom, args.hidden, n_top=n_top
    )
    print(f"hsoftmax {__version__}: a two-level hierarchical softmax head against flat heads")
    print(
        f"in_features={args.in_features}, num_classes={args.num_classes}, n_top={n_top}, "
        f"n_bottom={args.n_bottom}, hidden={args.hidden}"
    )
    print()
    print("Parameters and memory (exact, closed form; FLOPs per sample, 2 per multiply-add):")
    print(format_head_table(heads))
    flat, bottleneck, hier = heads
    print(
        textwrap.fill(
            f"Training touches one node per sample: {flat.train_flops / hier.train_flops:.0f}x "
            f"fewer FLOPs than flat, {bottleneck.train_flops / hier.train_flops:.1f}x fewer "
            f"than bottleneck-flat. The parameter saving over flat comes from the "
            f"{args.hidden}-d bottleneck: bottleneck-flat is about as small.",
            100,
        )
    )
    suggested = suggest_shape(args.num_classes)
    print(
        f"suggest_shape({args.num_classes}) = (n_top={suggested[0]}, n_bottom={suggested[1]}): "
        f"the fewest rows touched per training step."
    )
    paper = {k: getattr(args, k) for k in PAPER} == PAPER and n_top == 1000
    if paper:
        print()
        print(format_paper_table())
    if args.no_timing:
        return 0
    print()
    threads = torch.get_num_threads()
    _progress(
        f"timing 3 heads x 3 tasks, and the flat head's training step with "
        f"F.linear_cross_entropy, at batch {args.batch_size} with {threads} torch threads "
        f"(the flat heads are slowest, and run last)..."
    )
    start = time.perf_counter()
    results = measure(
        args.in_features,
        args.num_classes,
        n_top,
        args.n_bottom,
        args.hidden,
        args.batch_size,
        args.min_run_time,
    )
    print(
        f"Measured latency, median of repetitions after a warm-up (torch {torch.__version__}, "
        f"CPU {platform.machine()}, torch threads={threads}, float32, batch {args.batch_size}):"
    )
    print(format_timings(results))
    print(
        "train step = zero_grad(set_to_none=False) + forward + cross-entropy + backward"
        " + SGD step;\n"
        f"{LINEAR_CE} = the flat head trained with F.linear_cross_entropy(...,"
        " options=nn.LinearCrossEntropyOptions()),\n"
        "  chunked, never building the full logits (its inference is the flat head's);\n"
        "top-1 = argmax for the flat heads, top-1 routing (predict) for the hierarchical one."
    )
    _progress(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
