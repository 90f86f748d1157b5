"""Word-level language model: flat softmax vs adaptive softmax vs hierarchical softmax.

A small LSTM language model is trained on the King James Bible (about 900,000 words, from the
Debian package ``bible-kjv``, read offline through its ``bible`` program) with five output
layers on the same body and budget:

- ``flat``: ``Linear(hidden, V)`` and cross-entropy;
- ``adaptive``: :class:`torch.nn.AdaptiveLogSoftmaxWithLoss` (frequent words in the head
  cluster, rare ones in smaller tail clusters);
- ``hier random``: :class:`hsoftmax.HierarchicalSoftmax` with words placed at random;
- ``hier frequency``: words placed by frequency rank (node 0 holds the most frequent words);
- ``hier clustered``: words grouped by balanced k-means of the trained flat model's output
  embeddings (:func:`hsoftmax.slots_from_embeddings`).

It reports validation perplexity (exact, for every head) and the output layer's time per
training step (forward + loss + backward on a fixed batch of hidden states), and writes
``examples/results/language_model.{csv,md,png}``.

Install the corpus once, then run (a few minutes on 2 CPU cores)::

    sudo apt-get install bible-kjv
    python examples/language_model.py
    python examples/language_model.py --text-file my_corpus.txt   # or any plain-text file

``--quick`` trains a few steps in seconds; without the corpus it uses a small built-in text.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import benchmark

import hsoftmax

RESULTS = Path(__file__).resolve().parent / "results"
INSTALL = "sudo apt-get install bible-kjv"

#: Genesis 1:1-10 (public domain), the fallback text of ``--quick`` when no corpus is installed.
FALLBACK = """
In the beginning God created the heaven and the earth.
And the earth was without form, and void; and darkness was upon the face of the deep.
And the Spirit of God moved upon the face of the waters.
And God said, Let there be light: and there was light.
And God saw the light, that it was good: and God divided the light from the darkness.
And God called the light Day, and the darkness he called Night.
And the evening and the morning were the first day.
And God said, Let there be a firmament in the midst of the waters, and let it divide the
waters from the waters.
And God made the firmament, and divided the waters which were under the firmament from the
waters which were above the firmament: and it was so.
And God called the firmament Heaven. And the evening and the morning were the second day.
And God said, Let the waters under the heaven be gathered together unto one place, and let the
dry land appear: and it was so.
And God called the dry land Earth; and the gathering together of the waters called he Seas:
and God saw that it was good.
"""


def load_lines(text_file: Path | None, quick: bool) -> tuple[list[str], str]:
    """The corpus as a list of lines (verses), and its name.

    Args:
        text_file: a plain-text file to use instead of the Bible, or ``None``.
        quick: allow the built-in fallback text when no corpus is installed.

    Returns:
        ``(lines, name)``.

    Raises:
        SystemExit: when no corpus is available outside ``--quick``.
    """
    if text_file is not None:
        return text_file.read_text(encoding="utf-8", errors="replace").splitlines(), text_file.name
    bible = shutil.which("bible")
    if bible is not None:
        dump = subprocess.run(
            [bible, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
        ).stdout
        # each line is "Ge1:1 In the beginning ..."; drop the reference
        lines = [line.split(" ", 1)[1] for line in dump.splitlines() if " " in line]
        return lines, "King James Bible (Debian package bible-kjv)"
    if quick:
        return FALLBACK.strip().splitlines() * 20, "built-in fallback (Genesis 1:1-10)"
    raise SystemExit(
        "language_model.py needs a text corpus. Install the King James Bible once with\n"
        f"    {INSTALL}\n"
        "or pass --text-file PATH (any plain-text file). --quick runs without it."
    )


TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,;:!?]")


@dataclass
class Corpus:
    """Token ids of the training and validation text, and the vocabulary."""

    train: Tensor
    valid: Tensor
    words: list[str]  # id -> word, most frequent first
    counts: Tensor  # id -> training count


def build_corpus(lines: list[str], min_count: int) -> Corpus:
    """Tokenize, build a frequency-ranked vocabulary, split every 10th line into validation.

    Args:
        lines: the text, one verse or sentence per line.
        min_count: words rarer than this in the training lines become ``<unk>``.

    Returns:
        The :class:`Corpus`; word ids are frequency ranks (0 = most frequent).
    """
    tokenized = [[*TOKEN.findall(line.lower()), "<eos>"] for line in lines if line.strip()]
    train_lines = [t for i, t in enumerate(tokenized) if i % 10 != 9]
    valid_lines = [t for i, t in enumerate(tokenized) if i % 10 == 9]
    counts = Counter(w for t in train_lines for w in t)
    kept = [w for w, c in counts.most_common() if c >= min_count]
    unk = sum(c for w, c in counts.items() if c < min_count)
    words = [*kept, "<unk>"]
    index = {w: i for i, w in enumerate(words)}
    unk_id = index["<unk>"]

    def ids(chunks: list[list[str]]) -> Tensor:
        return torch.tensor([index.get(w, unk_id) for t in chunks for w in t], dtype=torch.long)

    word_counts = torch.tensor([counts[w] for w in kept] + [unk], dtype=torch.long)
    return Corpus(ids(train_lines), ids(valid_lines), words, word_counts)


class LanguageModel(nn.Module):
    """Embedding, one LSTM layer, and an output layer chosen by ``kind``.

    Args:
        vocab: vocabulary size ``V``.
        dim: embedding and LSTM size.
        kind: ``'flat'``, ``'adaptive'`` or ``'hier'``.
        shape: ``(n_top, n_bottom)`` of the hierarchical head.
        class_slots: the word -> position mapping of the hierarchical head.
    """

    def __init__(
        self,
        vocab: int,
        dim: int,
        kind: str,
        shape: tuple[int, int] = (1, 1),
        class_slots: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head: nn.Module
        if kind == "flat":
            self.head = nn.Linear(dim, vocab)
        elif kind == "adaptive":
            cutoffs = [c for c in (vocab // 10, vocab // 3) if 0 < c < vocab - 1]
            self.head = nn.AdaptiveLogSoftmaxWithLoss(
                dim, vocab, sorted(set(cutoffs)), div_value=4.0
            )
        else:
            # dim in, hidden = dim: the head's projection plays the role of the flat head's input
            self.head = hsoftmax.HierarchicalSoftmax(
                dim, shape[0], shape[1], hidden=dim, num_classes=vocab, class_slots=class_slots,
                activation="identity",
            )
        self.criterion = hsoftmax.HierarchicalCrossEntropy() if kind == "hier" else None

    def features(self, tokens: Tensor) -> Tensor:
        """``(B, T)`` token ids -> ``(B * T, dim)`` hidden states."""
        out, _ = self.lstm(self.embed(tokens))
        return out.reshape(-1, out.shape[-1])

    def head_loss(self, h: Tensor, target: Tensor) -> Tensor:
        """Mean negative log-likelihood (nats) of ``target`` given hidden states ``h``."""
        if self.kind == "flat":
            return F.cross_entropy(self.head(h), target)
        if self.kind == "adaptive":
            return self.head(h, target).loss
        assert self.criterion is not None
        return self.criterion(self.head(h), target)

    def forward(self, tokens: Tensor, target: Tensor) -> Tensor:
        """Mean negative log-likelihood of the next tokens."""
        return self.head_loss(self.features(tokens), target.reshape(-1))


def batches(
    ids: Tensor, batch: int, bptt: int, gen: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """Cut a token stream into shuffled ``(input, target)`` windows of ``bptt`` tokens."""
    n = (len(ids) - 1) // bptt
    starts = torch.randperm(n, generator=gen) * bptt
    out = []
    for chunk in starts.split(batch):
        rows = chunk.unsqueeze(1) + torch.arange(bptt)
        out.append((ids[rows], ids[rows + 1]))
    return out


@dataclass
class Result:
    """One output layer's row."""

    head: str
    vocab: int
    head_params: int
    valid_ppl: float
    head_ms_per_step: float
    train_s: float
    steps: int


def head_time_ms(
    model: LanguageModel, dim: int, tokens: int, vocab: int, min_run_time: float = 0.5
) -> float:
    """Median time (ms) of the output layer's forward + loss + backward on ``tokens`` states."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, dim, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,), generator=g)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.head_loss(h, y).backward()

    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@torch.no_grad()
def perplexity(model: LanguageModel, ids: Tensor, bptt: int, batch: int) -> float:
    """Exact validation perplexity."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches(ids, batch, bptt, torch.Generator().manual_seed(0)):
        total += float(model(x, y)) * y.numel()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def train(model: LanguageModel, corpus: Corpus, args: argparse.Namespace, name: str) -> float:
    """Train for ``args.steps`` steps; returns the wall time in seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    data: list[tuple[Tensor, Tensor]] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if not data:
            data = batches(corpus.train, args.batch, args.bptt, gen)
        x, y = data.pop()
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"{name:>16} step {step:>5}/{args.steps}  loss {loss.item():.3f}  "
                  f"{elapsed:6.1f}s", file=sys.stderr, flush=True)
    return time.perf_counter() - start


def write_results(results: list[Result], out: Path, note: str) -> None:
    """Write the CSV, the markdown table and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": f"{platform.machine()} CPU, "
            f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
            "load1": f"{os.getloadavg()[0]:.1f}"}
    with open(out / "language_model.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(results[0]), *meta])
        writer.writeheader()
        for r in results:
            writer.writerow({**asdict(r), **meta})
    lines = ["| output layer | head params | validation perplexity | head ms / step | train (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.head} | {r.head_params:,} | {r.valid_ppl:.1f} "
                     f"| {r.head_ms_per_step:.2f} | {r.train_s:.1f} |")
    lines += ["", f"{note} Measured with torch {meta['torch']} on {meta['machine']} "
              f"({meta['date']}; 1-minute load average {meta['load1']} at the end: other jobs "
              "shared the cores when it is above the thread count).", ""]
    (out / "language_model.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        return
    names = [r.head for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(names, [r.valid_ppl for r in results], color="tab:blue")
    ax1.set_ylabel("validation perplexity (lower is better)")
    ax2.bar(names, [r.head_ms_per_step for r in results], color="tab:gray")
    ax2.set_ylabel("output layer ms / step (fwd + bwd)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=25)
    fig.tight_layout()
    fig.savefig(out / "language_model.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Train the five language models and write the comparison.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description="Flat vs adaptive vs hierarchical softmax "
                                     "in a word-level LSTM language model.")
    parser.add_argument("--quick", action="store_true", help="a few steps, for the test suite")
    parser.add_argument("--text-file", type=Path, default=None, help="use this text instead")
    parser.add_argument("--steps", type=int, default=400, help="training steps per model")
    parser.add_argument("--dim", type=int, default=128, help="embedding and LSTM size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-count", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lines, name = load_lines(args.text_file, args.quick)
    if args.quick:
        lines = lines[:600]
        args.steps, args.dim, args.batch, args.bptt, args.min_count = 6, 32, 8, 16, 1
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    corpus = build_corpus(lines, args.min_count)
    vocab = len(corpus.words)
    shape = hsoftmax.suggest_shape(vocab)
    print(f"{name}: {len(corpus.train):,} training and {len(corpus.valid):,} validation tokens, "
          f"vocabulary {vocab:,}, hierarchical shape {shape[0]} x {shape[1]}", flush=True)

    def make(kind: str, slots: Tensor | None = None) -> LanguageModel:
        torch.manual_seed(args.seed)
        return LanguageModel(vocab, args.dim, kind, shape, slots)

    g = torch.Generator().manual_seed(args.seed)
    results: list[Result] = []
    models: dict[str, LanguageModel] = {}
    plans: list[tuple[str, str, Tensor | None]] = [
        ("flat", "flat", None),
        ("adaptive", "adaptive", None),
        ("hier random", "hier", torch.randperm(vocab, generator=g)),
        ("hier frequency", "hier", None),
        ("hier clustered", "hier", None),  # slots filled in from the trained flat model
    ]
    for label, kind, slots in plans:
        if label == "hier clustered":
            flat_head = models["flat"].head
            assert isinstance(flat_head, nn.Linear)
            weight = flat_head.weight.detach()
            slots = hsoftmax.slots_from_embeddings(weight, *shape, normalize=True, seed=args.seed)
        model = make(kind, slots)
        train_s = train(model, corpus, args, label)
        models[label] = model
        ppl = perplexity(model, corpus.valid, args.bptt, 64)
        params = sum(p.numel() for p in model.head.parameters())
        results.append(Result(label, vocab, params, ppl, float("nan"), train_s, args.steps))
        print(f"{label:>16}: validation perplexity {ppl:8.1f}   head params {params:,}",
              flush=True)
    # head timings in alternating rounds (forward order, then reversed), so that the load of
    # a shared machine hits every head alike; the median over rounds is reported
    rounds = 1 if args.quick else 5
    times: dict[str, list[float]] = {label: [] for label in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for label in order:
            times[label].append(head_time_ms(models[label], args.dim, args.batch * args.bptt,
                                             vocab, 0.02 if args.quick else 0.5))
    for result in results:
        result.head_ms_per_step = sorted(times[result.head])[len(times[result.head]) // 2]
        print(f"{result.head:>16}: head {result.head_ms_per_step:6.2f} ms/step", flush=True)
    note = (f"{name}: {len(corpus.train):,} training tokens, vocabulary {vocab:,} (words seen "
            f"at least {args.min_count} times), hierarchical shape {shape[0]} × {shape[1]}. "
            f"LSTM of size {args.dim}, {args.steps} Adam steps of {args.batch} × {args.bptt} "
            f"tokens per model. Head time: forward + loss + backward of the output layer on "
            f"{args.batch * args.bptt} hidden states, median of {rounds} alternating rounds "
            f"after training. Generated by "
            f"`python examples/language_model.py{' --quick' if args.quick else ''}`.")
    write_results(results, out, note)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
