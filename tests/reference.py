"""An obviously-correct, loop-based reference of the hierarchical softmax (the test oracle).

Everything is computed one sample and one class at a time in float64, straight from the
definition, with no vectorised tricks shared with the library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hsoftmax import HierarchicalSoftmax


def _log_softmax(values: list[float]) -> list[float]:
    finite = [v for v in values if v != -math.inf]
    top = max(finite)
    total = sum(math.exp(v - top) for v in finite)
    return [v - top - math.log(total) if v != -math.inf else -math.inf for v in values]


def reference_log_probs(head: HierarchicalSoftmax, x: Tensor) -> Tensor:
    """``(N, num_classes)`` float64 log-probabilities of ``x`` ``(N, in_features)``."""
    h = {name: p.detach().double() for name, p in head.named_parameters()}
    slots = head.class_slots.tolist()
    n_bottom = head.n_bottom
    classes_at = {position: c for c, position in enumerate(slots)}
    rows = []
    for sample in x.detach().double():
        z = head.activation(h["proj.weight"] @ sample + h["proj.bias"]).tolist()
        top_logits = []
        for node in range(head.n_top):
            occupied = any(node * n_bottom + s in classes_at for s in range(n_bottom))
            logit = sum(w * v for w, v in zip(h["top.weight"][node].tolist(), z)) + float(
                h["top.bias"][node]
            )
            top_logits.append(logit if occupied else -math.inf)
        top = _log_softmax(top_logits)
        row = [0.0] * head.num_classes
        for node in range(head.n_top):
            logits = []
            for slot in range(n_bottom):
                if node * n_bottom + slot not in classes_at:
                    logits.append(-math.inf)
                    continue
                weights = h["bottom_weight"][node, slot].tolist()
                logits.append(
                    sum(w * v for w, v in zip(weights, z)) + float(h["bottom_bias"][node, slot])
                )
            if all(v == -math.inf for v in logits):
                continue
            bottom = _log_softmax(logits)
            for slot in range(n_bottom):
                position = node * n_bottom + slot
                if position in classes_at:
                    row[classes_at[position]] = top[node] + bottom[slot]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def reference_loss(
    log_probs: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Weighted NLL written out sample by sample, like ``nn.CrossEntropyLoss``."""
    losses, weights = [], []
    for row, y in zip(log_probs.tolist(), target.tolist()):
        if y == ignore_index:
            losses.append(0.0)
            weights.append(0.0)
            continue
        w = 1.0 if weight is None else float(weight[y])
        losses.append(-w * row[y])
        weights.append(w)
    if reduction == "none":
        return torch.tensor(losses, dtype=torch.float64)
    if reduction == "sum":
        return torch.tensor(sum(losses), dtype=torch.float64)
    return torch.tensor(sum(losses) / sum(weights), dtype=torch.float64)


def reference_smoothed_loss(
    head: HierarchicalSoftmax, x: Tensor, target: Tensor, epsilon: float
) -> Tensor:
    """The documented per-level label smoothing, written out, mean over samples."""
    lp = reference_log_probs(head, x)
    slots = head.class_slots.tolist()
    n_bottom = head.n_bottom
    total = 0.0
    for row, y in zip(lp.tolist(), target.tolist()):
        node_of = {c: slots[c] // n_bottom for c in range(head.num_classes)}
        nodes = sorted(set(node_of.values()))
        node_lp = {
            n: math.log(sum(math.exp(row[c]) for c in node_of if node_of[c] == n)) for n in nodes
        }
        gold_node = node_of[y]
        siblings = [c for c in node_of if node_of[c] == gold_node]
        slot_lp = {c: row[c] - node_lp[gold_node] for c in siblings}
        nll = -row[y]
        smooth = -sum(node_lp.values()) / len(nodes) - sum(slot_lp.values()) / len(siblings)
        total += (1 - epsilon) * nll + epsilon * smooth
    return torch.tensor(total / len(target), dtype=torch.float64)


def reference_predict(head: HierarchicalSoftmax, x: Tensor) -> Tensor:
    """Top-1 routing from the reference log-probabilities: best node mass, then best class in it."""
    lp = reference_log_probs(head, x)
    slots = head.class_slots.tolist()
    answers = []
    for row in lp.tolist():
        mass: dict[int, float] = {}
        for c, value in enumerate(row):
            node = slots[c] // head.n_bottom
            mass[node] = mass.get(node, 0.0) + math.exp(value)
        best_node = max(mass, key=lambda n: mass[n])
        members = [c for c in range(head.num_classes) if slots[c] // head.n_bottom == best_node]
        answers.append(max(members, key=lambda c: row[c]))
    return torch.tensor(answers)
