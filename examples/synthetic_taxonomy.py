"""Synthetic taxonomy, end to end: flat vs bottleneck-flat vs hierarchical heads.

A generated data set with a real two-level structure: ``families`` families of
``per_family`` classes each (20,000 classes by default). Features follow a hierarchical
Gaussian model: a mean per family, a class mean around it, samples around the class mean, all
seen through a fixed random linear map into ``in_features`` dimensions. Class ids are shuffled,
so that neighbouring ids carry no structure (as with alphabetical ids of unrelated species).

Five heads are trained on the same features with the same optimizer and epochs:

- ``flat``: ``Linear(in_features, C)``;
- ``bottleneck-flat``: ``Linear(in_features, hidden)``, ReLU, ``Linear(hidden, C)``;
- ``hier y//n_bottom``: :class:`hsoftmax.HierarchicalSoftmax` with the paper's split;
- ``hier clustered``: classes grouped by balanced k-means of their mean training feature
  (:func:`hsoftmax.builders.slots_from_embeddings`), when no taxonomy is known;
- ``hier true parents``: classes grouped by their family
  (:func:`hsoftmax.builders.slots_from_taxonomy`).

It reports top-1, top-5, MRR (exact log-probabilities for the hierarchical heads), top-1 of
the paper's routed ``predict``, parameters and wall time, and writes
``examples/results/synthetic_taxonomy.{csv,md,png}``.

Run (about 5 minutes on 2 CPU cores)::

    python examples/synthetic_taxonomy.py

``--quick`` runs a tiny version in seconds and writes to a temporary folder unless ``--out``
is given.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.utils import benchmark

import hsoftmax
from hsoftmax.builders import slots_from_embeddings, slots_from_taxonomy
from hsoftmax.counting import count_parameters
from hsoftmax.metrics import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """A dependency-free progress bar on stderr (one line per 10% when not a terminal).

    Args:
        items: what to iterate over.
        total: how many items.
        desc: a label.

    Yields:
        The items.
    """
    tty = sys.stderr.isatty()
    start, shown = time.perf_counter(), -1
    for i, item in enumerate(items, 1):
        yield item
        tenth = i * 10 // max(total, 1)
        if not tty and tenth == shown:
            continue
        shown = tenth
        bar = "#" * (i * 20 // max(total, 1))
        end = "\r" if tty and i < total else "\n"
        elapsed = time.perf_counter() - start
        sys.stderr.write(f"{desc:>24} [{bar:<20}] {i}/{total} {elapsed:6.1f}s{end}")


@dataclass
class Config:
    """Sizes of the data set and the heads."""

    families: int = 200
    per_family: int = 100
    latent: int = 32
    in_features: int = 64
    hidden: int = 32
    train_per_class: int = 5
    test_per_class: int = 2
    epochs: int = 2
    batch_size: int = 512
    lr: float = 1e-2
    seed: int = 0
    timing_s: float = 2.0

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.families * self.per_family


QUICK = Config(families=20, per_family=25, latent=16, in_features=32, hidden=16,
               train_per_class=6, test_per_class=2, epochs=2, batch_size=256, timing_s=0.05)


@dataclass
class Data:
    """Features and labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    family: Tensor  # (num_classes,) the true parent of each class


def make_data(cfg: Config) -> Data:
    """Draw the hierarchical Gaussian data set.

    Args:
        cfg: the sizes.

    Returns:
        Train and test features and labels, and each class's family.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    c = cfg.num_classes
    family = torch.randperm(c, generator=g) // cfg.per_family  # shuffled class ids
    family_means = 1.0 * torch.randn(cfg.families, cfg.latent, generator=g)
    class_means = family_means[family] + 0.5 * torch.randn(c, cfg.latent, generator=g)
    mixing = torch.randn(cfg.latent, cfg.in_features, generator=g) / cfg.latent**0.5

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(c).repeat(per_class)
        latent = class_means[y] + 0.35 * torch.randn(len(y), cfg.latent, generator=g)
        x = latent @ mixing + 0.05 * torch.randn(len(y), cfg.in_features, generator=g)
        return x, y

    x_train, y_train = draw(cfg.train_per_class)
    x_test, y_test = draw(cfg.test_per_class)
    return Data(x_train, y_train, x_test, y_test, family)


def build_heads(cfg: Config, data: Data) -> dict[str, nn.Module]:
    """The five heads, freshly initialised with the same seed.

    Args:
        cfg: the sizes.
        data: the data set (for the families and the class-mean features).

    Returns:
        ``{name: head}``.
    """
    n_top, n_bottom = cfg.families, cfg.per_family
    c = cfg.num_classes
    class_means = torch.zeros(c, cfg.in_features).index_add_(0, data.y_train, data.x_train)
    class_means /= torch.bincount(data.y_train, minlength=c).clamp(min=1).unsqueeze(1)
    layouts: dict[str, Tensor | None] = {
        "hier y//n_bottom": None,
        "hier clustered": slots_from_embeddings(class_means, n_top, n_bottom, seed=cfg.seed),
        "hier true parents": slots_from_taxonomy(data.family, n_top, n_bottom),
    }
    torch.manual_seed(cfg.seed)
    heads: dict[str, nn.Module] = {
        "flat": nn.Linear(cfg.in_features, c),
        "bottleneck-flat": nn.Sequential(
            nn.Linear(cfg.in_features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, c)
        ),
    }
    for name, slots in layouts.items():
        heads[name] = hsoftmax.HierarchicalSoftmax(
            cfg.in_features, n_top, n_bottom, cfg.hidden, num_classes=c, class_slots=slots
        )
    return heads


@dataclass
class Result:
    """One row of the results."""

    head: str
    num_classes: int
    params: int
    top1: float
    top5: float
    mrr: float
    routed_top1: float
    train_s: float
    train_ms_per_step: float  # median of a timed step on a fixed batch
    eval_s: float
    final_loss: float


def median_step_ms(
    head: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, data: Data,
    cfg: Config,
) -> float:
    """Median time of one training step on a fixed batch (``torch.utils.benchmark``).

    More robust than the training loop's wall time when other jobs share the machine.

    Returns:
        Milliseconds per step (zero_grad, loss, backward, optimizer step).
    """
    x, y = data.x_train[: cfg.batch_size], data.y_train[: cfg.batch_size]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(head(x), y).backward()
        optimizer.step()

    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=cfg.timing_s).median * 1e3


def train_and_eval(name: str, head: nn.Module, cfg: Config, data: Data) -> Result:
    """Train one head for ``cfg.epochs`` epochs, then evaluate it on the test set.

    Args:
        name: the head's name.
        head: the head.
        cfg: the sizes and optimizer settings.
        data: the data set.

    Returns:
        The measured row.
    """
    hierarchical = isinstance(head, hsoftmax.HierarchicalSoftmax)
    criterion: nn.Module = (
        hsoftmax.HierarchicalCrossEntropy() if hierarchical else nn.CrossEntropyLoss()
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(data.y_train)
    batches = [
        idx
        for _ in range(cfg.epochs)
        for idx in torch.randperm(n, generator=g).split(cfg.batch_size)
    ]
    head.train()
    loss = torch.zeros(())
    start = time.perf_counter()
    for idx in progress(batches, len(batches), f"train {name}"):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(head(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start
    head.eval()
    start = time.perf_counter()
    metrics = evaluate(head, data.x_test, data.y_test, ks=(1, 5), batch_size=1024)
    if isinstance(head, hsoftmax.HierarchicalSoftmax):
        with torch.no_grad():
            routed = torch.cat([head.predict(x) for x in data.x_test.split(4096)])
        routed_top1 = float((routed == data.y_test).double().mean())
    else:
        routed_top1 = float("nan")
    eval_s = time.perf_counter() - start
    step_ms = median_step_ms(head, criterion, optimizer, data, cfg)
    result = Result(
        head=name,
        num_classes=cfg.num_classes,
        params=count_parameters(head),
        top1=metrics.topk[1],
        top5=metrics.topk[5],
        mrr=metrics.mrr,
        routed_top1=routed_top1,
        train_s=train_s,
        train_ms_per_step=step_ms,
        eval_s=eval_s,
        final_loss=float(loss.detach()),
    )
    print(
        f"{name:>18}: top-1 {result.top1:.3f}  top-5 {result.top5:.3f}  MRR {result.mrr:.3f}  "
        f"params {result.params:,}  train {train_s:.1f}s",
        flush=True,
    )
    return result


def write_results(results: list[Result], cfg: Config, out: Path, command: str) -> None:
    """Write the CSV, a markdown table and a plot.

    Args:
        results: the rows.
        cfg: the configuration used.
        out: the output folder.
        command: the command line that reproduces the run.
    """
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "load1": f"{os.getloadavg()[0]:.1f}",
    }
    with open(out / "synthetic_taxonomy.csv", "w", newline="") as f:
        fields = list(asdict(results[0])) + list(meta)
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({**asdict(r), **meta})

    def fmt(v: float) -> str:
        return "–" if v != v else f"{v:.3f}"

    lines = [
        "| head | params | top-1 | top-5 | MRR | top-1, routed `predict` | train (s) "
        "| median ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.head} | {r.params:,} | {fmt(r.top1)} | {fmt(r.top5)} | {fmt(r.mrr)} "
            f"| {fmt(r.routed_top1)} | {r.train_s:.1f} | {r.train_ms_per_step:.2f} |"
        )
    lines += [
        "",
        f"{cfg.num_classes:,} classes in {cfg.families} families of {cfg.per_family}; "
        f"{cfg.in_features} input features, hidden {cfg.hidden}; "
        f"{cfg.train_per_class} training and {cfg.test_per_class} test samples per class; "
        f"{cfg.epochs} epochs of AdamW (lr {cfg.lr:g}, batch {cfg.batch_size}). "
        f"Generated by `{command}` with torch {meta['torch']} on {meta['machine']} "
        f"({meta['date']}; 1-minute load average {meta['load1']} at the end: other jobs "
        "shared the cores when it is above the thread count, which slows every head).",
        "",
    ]
    (out / "synthetic_taxonomy.md").write_text("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    names = [r.head for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    xs = range(len(names))
    for i, (key, label) in enumerate((("top1", "top-1"), ("top5", "top-5"), ("mrr", "MRR"))):
        ax1.bar([x + (i - 1) * width for x in xs], [getattr(r, key) for r in results],
                width, label=label)
    ax1.set_xticks(list(xs), names, rotation=20, ha="right")
    ax1.set_ylim(0, 1)
    ax1.set_title(f"Test metrics, {cfg.num_classes:,} classes")
    ax1.legend()
    ax2.bar(list(xs), [r.train_ms_per_step for r in results], color="tab:gray")
    ax2.set_xticks(list(xs), names, rotation=20, ha="right")
    ax2.set_ylabel("median ms per training step")
    ax2.set_title(f"Training step, batch {cfg.batch_size} (CPU)")
    fig.tight_layout()
    fig.savefig(out / "synthetic_taxonomy.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description="Flat vs hierarchical heads on a synthetic "
                                     "two-level taxonomy.")
    parser.add_argument("--quick", action="store_true", help="a tiny run for the test suite")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: examples/results; a temporary one "
                        "with --quick)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.epochs is not None:
        cfg.epochs = args.epochs
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    torch.manual_seed(cfg.seed)
    print(f"{cfg.num_classes:,} classes in {cfg.families} families; "
          f"{cfg.train_per_class * cfg.num_classes:,} training samples", flush=True)
    data = make_data(cfg)
    heads = build_heads(cfg, data)
    results = [train_and_eval(name, head, cfg, data) for name, head in heads.items()]
    command = "python examples/synthetic_taxonomy.py" + (" --quick" if args.quick else "")
    write_results(results, cfg, out, command)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
