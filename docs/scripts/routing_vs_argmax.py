"""Measure how often the paper's top-1 routing differs from the exact argmax.

:meth:`hsoftmax.HierarchicalSoftmax.predict` takes the most probable node, then the most
probable class inside it. The most probable class overall (``topk(x, 1)``) can sit in another
node. This script counts how often the two answers differ, and what that costs in accuracy:

- on *random* heads (fresh initialisation, Gaussian inputs): no structure at all;
- on heads *trained* on a synthetic two-level data set (families of classes, hierarchical
  Gaussian features), once with the paper's split ``node = y // n_bottom`` on shuffled class
  ids, once with classes grouped by their true family.

It writes ``docs/generated/routing_vs_argmax.csv`` and ``.md`` (included by the user guide).

Run: ``python docs/scripts/routing_vs_argmax.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import hsoftmax

OUT = Path(__file__).resolve().parents[1] / "generated"


@dataclass
class Row:
    """One measured setting."""

    setting: str
    num_classes: int
    n_top: int
    n_bottom: int
    samples: int
    differ_pct: float
    routed_top1_pct: float
    exact_top1_pct: float


def compare(head: hsoftmax.HierarchicalSoftmax, x: torch.Tensor, y: torch.Tensor | None) -> tuple:
    """Fraction of rows where routing and the exact argmax differ, and both accuracies.

    Args:
        head: the head.
        x: ``(N, in_features)`` inputs.
        y: ``(N,)`` labels, or ``None`` when there are none.

    Returns:
        ``(differ, routed_acc, exact_acc)`` in percent (accuracies are NaN without labels).
    """
    routed, exact = [], []
    with torch.no_grad():
        for chunk in x.split(512):
            out = head(chunk)
            routed.append(hsoftmax.functional.predict(out))
            exact.append(hsoftmax.functional.log_probs(out).argmax(-1))
    r, e = torch.cat(routed), torch.cat(exact)
    differ = 100.0 * (r != e).double().mean().item()
    if y is None:
        return differ, float("nan"), float("nan")
    return differ, 100.0 * (r == y).double().mean().item(), 100.0 * (e == y).double().mean().item()


def random_heads(samples: int) -> list[Row]:
    """Freshly initialised heads on standard Gaussian inputs."""
    rows = []
    for n_top, n_bottom in ((10, 100), (100, 100), (1000, 80)):
        torch.manual_seed(0)
        head = hsoftmax.HierarchicalSoftmax(256, n_top, n_bottom, hidden=128)
        x = torch.randn(samples, 256)
        differ, _, _ = compare(head, x, None)
        rows.append(Row("random init", n_top * n_bottom, n_top, n_bottom, samples, differ,
                        float("nan"), float("nan")))
    return rows


def make_data(
    families: int, per_family: int, dim: int, per_class: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A two-level data set: family means, class means around them, samples around those.

    Class ids are shuffled, so that ``y // n_bottom`` is *not* the family.

    Returns:
        ``(x, y, family_of_class)``.
    """
    g = torch.Generator().manual_seed(seed)
    num_classes = families * per_family
    family_means = 3.0 * torch.randn(families, dim, generator=g)
    family = torch.randperm(num_classes, generator=g) // per_family  # shuffled ids
    class_means = family_means[family] + 1.5 * torch.randn(num_classes, dim, generator=g)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = class_means[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y, family


def train(head: hsoftmax.HierarchicalSoftmax, x: torch.Tensor, y: torch.Tensor, epochs: int):
    """A few epochs of AdamW on the hierarchical cross-entropy."""
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    loss_fn = hsoftmax.HierarchicalCrossEntropy()
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(256):
            opt.zero_grad(set_to_none=True)
            loss_fn(head(x[idx]), y[idx]).backward()
            opt.step()


def trained_heads(epochs: int, per_class: int) -> list[Row]:
    """Heads trained on the synthetic two-level data, by noise level and grouping."""
    rows = []
    families, per_family, dim = 50, 40, 64
    for noise in (2.0, 4.0):
        x, y, family = make_data(families, per_family, dim, per_class + 10, noise, seed=0)
        test = torch.arange(len(y)) % (per_class + 10) >= per_class
        # classes of one family take consecutive positions: the true parents as nodes
        order = torch.sort(family, stable=True).indices
        grouped = torch.empty_like(order)
        grouped[order] = torch.arange(len(order))
        for name, slots in (("y // n_bottom", None), ("true parents", grouped)):
            torch.manual_seed(0)
            head = hsoftmax.HierarchicalSoftmax(
                dim, families, per_family, hidden=64, class_slots=slots
            )
            train(head, x[~test], y[~test], epochs)
            differ, routed, exact = compare(head, x[test], y[test])
            rows.append(Row(f"trained, noise {noise:g}, {name}", families * per_family,
                            families, per_family, int(test.sum()), differ, routed, exact))
            print(rows[-1])
    return rows


def to_markdown(rows: list[Row], command: str) -> str:
    """The rows as a MyST/GitHub markdown table with a footnote on provenance."""
    def pct(v: float) -> str:
        return "–" if v != v else f"{v:.2f}"

    lines = [
        "| setting | classes | n_top × n_bottom | test samples | routing ≠ argmax (%) "
        "| top-1, routing (%) | top-1, exact (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | {r.num_classes:,} | {r.n_top} × {r.n_bottom} | {r.samples:,} "
            f"| {pct(r.differ_pct)} | {pct(r.routed_top1_pct)} | {pct(r.exact_top1_pct)} |"
        )
    lines += [
        "",
        f"Generated by `{command}` with torch {torch.__version__} on "
        f"{platform.machine()} CPU ({time.strftime('%Y-%m-%d')}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, measure, write the CSV and markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, writes nothing")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        rows = random_heads(256)[:1]
        print(rows)
        return
    rows = random_heads(4096) + trained_heads(epochs=6, per_class=25)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "routing_vs_argmax.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    md = to_markdown(rows, "python docs/scripts/routing_vs_argmax.py")
    (args.out / "routing_vs_argmax.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
