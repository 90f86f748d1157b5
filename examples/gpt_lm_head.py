"""A GPT-2-style language model from Hugging Face ``transformers`` with a hierarchical LM head.

A tiny GPT-2 is built from a config (random initialisation, nothing downloaded) and trained on a
synthetic token stream, once with each output layer on the same body, data and budget:

- ``flat tied``: GPT-2's own ``lm_head``, tied to the input embedding (the transformers
  default), trained with the model's own loss, ``model(ids, labels=ids).loss``;
- ``flat untied``: the same with ``tie_word_embeddings=False``;
- ``hier``: :func:`hsoftmax.replace_classifier` puts a :class:`hsoftmax.HierarchicalSoftmax` in
  place of ``lm_head`` (it switches the embedding tie off: the head has no matrix to share).
  The model's own forward computes logits from ``lm_head`` and cannot take the head's output,
  so training calls the base model for the last hidden states and applies the head and
  :class:`hsoftmax.HierarchicalCrossEntropy` to them. Token ids are in frequency order, so the
  paper's ``y // n_bottom`` split puts the most frequent tokens in the first nodes;
- ``hier random``: the same head with tokens placed at random (``class_slots``).

The text is a stationary Markov chain over the vocabulary, drawn here with a fixed seed: each
token has a few successors drawn from a Zipf law, with Dirichlet transition probabilities.
Its entropy rate gives the lowest perplexity any model can reach on it, reported beside the
results with the perplexity of the unigram distribution (a model that ignores the context).

It reports exact validation perplexity, exact next-token top-1 accuracy (``head.topk``, not the
routed guess), parameters and the time of a training step (timed after training, the models in
alternating rounds), and writes
``examples/results/gpt_lm_head.{csv,md}``.

Run (a few minutes on 2 CPU cores)::

    pip install transformers
    python examples/gpt_lm_head.py
    python examples/gpt_lm_head.py --quick    # a few steps on a small vocabulary, seconds

Exit status 2, with a message saying what to install, when transformers cannot be imported.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import benchmark

import hsoftmax

RESULTS = Path(__file__).resolve().parent / "results"
EXIT_NO_TRANSFORMERS = 2


def import_transformers() -> ModuleType | None:
    """Import transformers, or print why it cannot be used and return ``None``."""
    try:
        import transformers
    except Exception as error:  # ImportError, or a build that does not fit this torch
        print(
            "examples/gpt_lm_head.py needs Hugging Face transformers, which cannot be imported "
            f"here ({type(error).__name__}: {error}).\nInstall it: pip install transformers",
            file=sys.stderr,
        )
        return None
    transformers.logging.set_verbosity_error()
    return transformers


@dataclass
class Chain:
    """A Markov chain over ``vocab`` tokens: ``successors[s, k]`` follows ``s`` with
    probability ``probs[s, k]``; ``stationary`` is its stationary distribution."""

    successors: np.ndarray  # (vocab, fanout) int64
    probs: np.ndarray  # (vocab, fanout) float64
    stationary: np.ndarray  # (vocab,) float64

    def entropy_rate(self) -> float:
        """Nats per token of the chain: the lowest cross-entropy any model can reach."""
        p = self.probs
        row = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
        return float(self.stationary @ row)

    def unigram_entropy(self) -> float:
        """Nats per token of the stationary distribution: a model without context."""
        pi = self.stationary[self.stationary > 0]
        return float(-(pi * np.log(pi)).sum())

    def best_next(self) -> np.ndarray:
        """The most probable successor of every token (repeated successors merged)."""
        same = self.successors[:, :, None] == self.successors[:, None, :]
        merged = (same * self.probs[:, None, :]).sum(2)
        return self.successors[np.arange(len(self.successors)), merged.argmax(1)]


def make_chain(vocab: int, fanout: int, zipf: float, alpha: float, seed: int) -> Chain:
    """Draw the chain; ids come out roughly in decreasing frequency (Zipf over ids)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1) ** zipf
    successors = rng.choice(vocab, size=(vocab, fanout), p=weights / weights.sum())
    probs = rng.dirichlet(np.full(fanout, alpha), size=vocab)
    pi = np.full(vocab, 1.0 / vocab)
    for _ in range(500):  # power iteration
        new = np.bincount(successors.ravel(), (pi[:, None] * probs).ravel(), minlength=vocab)
        if np.abs(new - pi).sum() < 1e-12:
            pi = new
            break
        pi = new
    return Chain(successors, probs, pi)


def sample(chain: Chain, streams: int, length: int, seed: int) -> Tensor:
    """``(streams, length)`` token ids: independent runs of the chain, started stationary."""
    rng = np.random.default_rng(seed)
    cumulative = chain.probs.cumsum(1)
    state = rng.choice(len(chain.stationary), size=streams, p=chain.stationary)
    out = np.empty((streams, length), dtype=np.int64)
    for t in range(length):
        out[:, t] = state
        u = rng.random(streams)[:, None]
        k = np.minimum((u > cumulative[state]).sum(1), chain.probs.shape[1] - 1)
        state = chain.successors[state, k]
    return torch.from_numpy(out)


def windows(stream: Tensor, seq: int) -> Tensor:
    """Cut ``(streams, length)`` into non-overlapping ``(n, seq)`` windows."""
    per_row = stream.shape[1] // seq
    return stream[:, : per_row * seq].reshape(-1, seq)


@dataclass
class Result:
    """One LM head's row."""

    head: str
    vocab: int
    shape: str
    head_params: int
    total_params: int
    valid_ppl: float
    valid_top1: float
    train_ms_per_step: float
    train_s: float
    steps: int
    oracle_ppl: float
    unigram_ppl: float


class Runner:
    """Builds, trains and evaluates one GPT-2 with a given LM head."""

    def __init__(self, transformers: ModuleType, args: argparse.Namespace, label: str,
                 shape: tuple[int, int], slots: Tensor | None) -> None:
        torch.manual_seed(args.seed)
        config = transformers.GPT2Config(
            vocab_size=args.vocab, n_positions=args.seq, n_embd=args.dim, n_layer=args.layers,
            n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=label != "flat untied",
        )
        self.label = label
        self.model: Any = transformers.GPT2LMHeadModel(config)
        self.head: hsoftmax.HierarchicalSoftmax | None = None
        if label.startswith("hier"):
            self.head = hsoftmax.replace_classifier(
                self.model, *shape, hidden=args.dim, class_slots=slots
            )
        self.criterion = hsoftmax.HierarchicalCrossEntropy()

    def loss(self, ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy of a ``(batch, seq)`` window batch."""
        if self.head is None:
            return self.model(input_ids=ids, labels=ids).loss  # the model's own loss
        hidden = self.model.base_model(input_ids=ids).last_hidden_state
        return self.criterion(self.head(hidden[:, :-1]), ids[:, 1:])

    def next_token(self, ids: Tensor) -> Tensor:
        """The exact most probable next token at every position but the last."""
        if self.head is None:
            return self.model(input_ids=ids).logits[:, :-1].argmax(-1)
        hidden = self.model.base_model(input_ids=ids).last_hidden_state[:, :-1]
        return self.head.topk(hidden, 1)[1].squeeze(-1)

    def train(self, data: Tensor, args: argparse.Namespace) -> float:
        """Train; returns the wall time in seconds."""
        self.model.train()
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        warmup = max(1, args.steps // 10)

        def factor(step: int) -> float:  # linear warm-up, then cosine decay
            return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            ids = data[torch.randint(0, len(data), (args.batch,), generator=gen)]
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(ids)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % max(1, args.steps // 10) == 0 or step == args.steps:
                print(f"{self.label:>12} step {step:>5}/{args.steps}  loss {loss.item():.3f}  "
                      f"{time.perf_counter() - start:6.1f}s", file=sys.stderr, flush=True)
        return time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, data: Tensor, batch: int) -> tuple[float, float]:
        """Exact validation perplexity and next-token top-1 accuracy."""
        self.model.eval()
        nll, hits, count = 0.0, 0.0, 0
        for ids in data.split(batch):
            n = ids[:, 1:].numel()
            nll += float(self.loss(ids)) * n
            hits += float((self.next_token(ids) == ids[:, 1:]).sum())
            count += n
        return math.exp(nll / count), hits / count

    def step_ms(self, ids: Tensor, min_run_time: float) -> float:
        """Median time (ms) of forward + loss + backward of the whole model on ``ids``."""
        self.model.train()

        def step() -> None:
            self.model.zero_grad(set_to_none=True)
            self.loss(ids).backward()

        timer = benchmark.Timer(stmt="step()", globals={"step": step})
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3

    def parameters(self) -> tuple[int, int]:
        """(LM head parameters not shared with the body, all parameters, each once)."""
        total = hsoftmax.count_parameters(self.model)
        return total - hsoftmax.count_parameters(self.model.base_model), total


def write_results(results: list[Result], out: Path, note: str) -> None:
    """Write the CSV and the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": f"{platform.machine()} CPU, "
            f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
            "load1": f"{os.getloadavg()[0]:.1f}"}
    with open(out / "gpt_lm_head.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(results[0]), *meta])
        writer.writeheader()
        for r in results:
            writer.writerow({**asdict(r), **meta})
    lines = ["| LM head | shape | head params | all params | validation perplexity "
             "| next-token top-1 | train ms / step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.head} | {r.shape} | {r.head_params:,} | {r.total_params:,} "
                     f"| {r.valid_ppl:.1f} | {r.valid_top1:.3f} | {r.train_ms_per_step:.0f} |")
    lines += ["", f"{note} Measured with torch {meta['torch']} on {meta['machine']} "
              f"({meta['date']}; 1-minute load average {meta['load1']} at the end: other jobs "
              "shared the cores when it is above the thread count).", ""]
    (out / "gpt_lm_head.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Train the GPT-2 with each LM head and write the comparison.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 when transformers is missing.
    """
    parser = argparse.ArgumentParser(description="GPT-2 (transformers) with a flat vs a "
                                     "hierarchical LM head on a synthetic token stream.")
    parser.add_argument("--quick", action="store_true", help="a few steps, for the test suite")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128, help="GPT-2 width (n_embd)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens per training window")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="training steps per model")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-tokens", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    transformers = import_transformers()
    if transformers is None:
        return EXIT_NO_TRANSFORMERS
    if args.quick:
        args.vocab, args.dim, args.layers, args.heads = 512, 32, 1, 2
        args.seq, args.batch, args.steps, args.train_tokens = 16, 8, 4, 20_000
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)

    chain = make_chain(args.vocab, fanout=8, zipf=1.0, alpha=0.3, seed=args.seed)
    streams = 64
    stream = sample(chain, 2 * streams, args.train_tokens // streams, args.seed + 1)
    train_data = windows(stream[:streams], args.seq)
    valid_data = windows(stream[streams:], args.seq)[: 32 if args.quick else 512]
    oracle, unigram = math.exp(chain.entropy_rate()), math.exp(chain.unigram_entropy())
    shape = hsoftmax.suggest_shape(args.vocab)
    print(f"Markov chain over {args.vocab:,} tokens: {train_data.numel():,} training and "
          f"{valid_data.numel():,} validation tokens; perplexity floor {oracle:.1f}, "
          f"unigram {unigram:.1f}; hierarchical shape {shape[0]} x {shape[1]}", flush=True)
    best = torch.from_numpy(chain.best_next())
    oracle_top1 = float((best[valid_data[:, :-1]] == valid_data[:, 1:]).float().mean())

    g = torch.Generator().manual_seed(args.seed)
    plans: list[tuple[str, Tensor | None]] = [
        ("flat tied", None), ("flat untied", None), ("hier", None),
        ("hier random", torch.randperm(args.vocab, generator=g)),
    ]
    results: list[Result] = []
    runners: list[Runner] = []
    for label, slots in plans:
        runner = Runner(transformers, args, label, shape, slots)
        train_s = runner.train(train_data, args)
        ppl, top1 = runner.evaluate(valid_data, args.batch)
        head_params, total = runner.parameters()
        shape_text = f"{shape[0]} × {shape[1]}" if runner.head is not None else "flat"
        results.append(Result(label, args.vocab, shape_text, head_params, total, ppl, top1,
                              float("nan"), train_s, args.steps, oracle, unigram))
        runners.append(runner)
        print(f"{label:>12}: validation perplexity {ppl:8.1f}  top-1 {top1:.3f}  "
              f"head params {head_params:,}", flush=True)
    # step timings in alternating rounds (forward order, then reversed), so that the load of a
    # shared machine hits every model alike; the median over rounds is reported
    rounds = 1 if args.quick else 5
    ids = train_data[: args.batch]
    times: list[list[float]] = [[] for _ in runners]
    for r in range(rounds):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            times[i].append(runners[i].step_ms(ids, 0.02 if args.quick else 1.0))
    for result, ms in zip(results, times):
        result.train_ms_per_step = sorted(ms)[len(ms) // 2]
        print(f"{result.head:>12}: {result.train_ms_per_step:.0f} ms per step", flush=True)

    command = f"python examples/gpt_lm_head.py{' --quick' if args.quick else ''}"
    layers = f"{args.layers} layer{'s' if args.layers > 1 else ''}"
    note = (f"A GPT-2 ({layers}, width {args.dim}, {args.heads} heads, random "
            f"initialisation, no dropout) trained from scratch for {args.steps} AdamW steps of "
            f"{args.batch} × {args.seq} tokens per head, on a synthetic Markov chain over "
            f"{args.vocab:,} tokens ({train_data.numel():,} training tokens; each token has 8 "
            f"Zipf-drawn successors). The chain's entropy rate sets the floor: no model can have "
            f"a perplexity below {oracle:.1f}; the unigram perplexity (no context) is "
            f"{unigram:.1f}. On the {valid_data.numel():,} validation tokens the chain's own "
            f"best guess has top-1 accuracy {oracle_top1:.3f}. Perplexity and top-1 are exact "
            f"for every head (the "
            f"hierarchical top-1 is `head.topk(h, 1)`, not the routed guess). \"head params\" "
            f"counts the LM head's parameters not shared with the body: 0 for the tied flat "
            f"head. Train ms / step: forward + loss + backward of the whole model on one batch, "
            f"median of {rounds} alternating rounds after training. Generated by `{command}`.")
    write_results(results, out, note)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
