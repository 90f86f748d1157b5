"""Tests of hsoftmax.metrics against written-out loop references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hsoftmax import HierarchicalSoftmax
from hsoftmax.metrics import (
    RankingMetrics,
    evaluate,
    macro_mean_reciprocal_rank,
    mean_reciprocal_rank,
    ranking_metrics,
    target_rank,
    topk_accuracy,
)

# ---------------------------------------------------------------- loop references


def ref_ranks(scores: list[list[float]], target: list[int]) -> list[int]:
    ranks = []
    for row, y in zip(scores, target):
        rank = 1
        for value in row:
            if value > row[y]:
                rank += 1
        ranks.append(rank)
    return ranks


def ref_topk(scores: list[list[float]], target: list[int], k: int) -> float:
    hits = 0
    for r in ref_ranks(scores, target):
        if r <= k:
            hits += 1
    return hits / len(target)


def ref_rr(rank: int, max_rank: int | None) -> float:
    if max_rank is not None and rank > max_rank:
        return 0.0
    return 1.0 / rank


def ref_mrr(scores: list[list[float]], target: list[int], max_rank: int | None = None) -> float:
    total = 0.0
    for r in ref_ranks(scores, target):
        total += ref_rr(r, max_rank)
    return total / len(target)


def ref_ma_mrr(scores: list[list[float]], target: list[int], max_rank: int | None = None) -> float:
    per_class: dict[int, list[float]] = {}
    for r, y in zip(ref_ranks(scores, target), target):
        per_class.setdefault(y, []).append(ref_rr(r, max_rank))
    class_means = [sum(v) / len(v) for v in per_class.values()]
    return sum(class_means) / len(class_means)


# ---------------------------------------------------------------- strategies


@st.composite
def scored_samples(draw: st.DrawFn) -> tuple[list[list[float]], list[int]]:
    """Small integer-valued scores, so that ties are frequent."""
    n = draw(st.integers(min_value=1, max_value=12))
    c = draw(st.integers(min_value=1, max_value=7))
    values = st.integers(min_value=-3, max_value=3).map(float)
    scores = draw(st.lists(st.lists(values, min_size=c, max_size=c), min_size=n, max_size=n))
    target = draw(st.lists(st.integers(min_value=0, max_value=c - 1), min_size=n, max_size=n))
    return scores, target


@given(scored_samples(), st.integers(min_value=1, max_value=8), st.none() | st.integers(1, 4))
def test_against_loop_reference(
    data: tuple[list[list[float]], list[int]], k: int, max_rank: int | None
) -> None:
    scores, target = data
    s, t = torch.tensor(scores, dtype=torch.float64), torch.tensor(target)
    assert target_rank(s, t).tolist() == ref_ranks(scores, target)
    assert float(topk_accuracy(s, t, k)) == pytest.approx(ref_topk(scores, target, k))
    assert float(mean_reciprocal_rank(s, t, max_rank)) == pytest.approx(
        ref_mrr(scores, target, max_rank)
    )
    assert float(macro_mean_reciprocal_rank(s, t, max_rank)) == pytest.approx(
        ref_ma_mrr(scores, target, max_rank)
    )
    m = ranking_metrics(target_rank(s, t), t, ks=(k,), max_rank=max_rank)
    assert m.topk[k] == pytest.approx(ref_topk(scores, target, k))
    assert m.mrr == pytest.approx(ref_mrr(scores, target, max_rank))
    assert m.ma_mrr == pytest.approx(ref_ma_mrr(scores, target, max_rank))
    assert m.num_samples == len(target)
    assert m.num_classes_seen == len(set(target))


def test_ties_are_optimistic() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
    assert target_rank(scores, torch.tensor([2, 2])).tolist() == [1, 2]


def test_masked_classes_never_outrank() -> None:
    scores = torch.tensor([[float("-inf"), -5.0, float("-inf")]])
    assert target_rank(scores, torch.tensor([1])).tolist() == [1]


def test_leading_dimensions() -> None:
    scores = torch.randn(2, 3, 5)
    target = torch.randint(0, 5, (2, 3))
    ranks = target_rank(scores, target)
    assert ranks.shape == (2, 3)
    assert torch.equal(ranks.flatten(), target_rank(scores.view(6, 5), target.view(6)))
    assert mean_reciprocal_rank(scores, target) == mean_reciprocal_rank(
        scores.view(6, 5), target.view(6)
    )


def test_macro_differs_from_micro() -> None:
    # class 0: three samples ranked 1; class 1: one sample ranked 2
    scores = torch.tensor([[1.0, 0.0]] * 4)
    target = torch.tensor([0, 0, 0, 1])
    assert float(mean_reciprocal_rank(scores, target)) == pytest.approx((3 + 0.5) / 4)
    assert float(macro_mean_reciprocal_rank(scores, target)) == pytest.approx((1 + 0.5) / 2)


# ---------------------------------------------------------------- from the head


def _head() -> HierarchicalSoftmax:
    torch.manual_seed(0)
    return HierarchicalSoftmax(6, n_top=4, n_bottom=5, hidden=8, num_classes=17).double()


def test_head_output_accepted_and_equals_log_probs() -> None:
    head = _head()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 17, (9,))
    lp = head.log_probs(x)
    assert torch.equal(target_rank(head(x), y), target_rank(lp, y))
    assert topk_accuracy(head(x), y, 3) == topk_accuracy(lp, y, 3)


def test_evaluate_head_matches_reference() -> None:
    head = _head()
    x, y = torch.randn(23, 6, dtype=torch.float64), torch.randint(0, 17, (23,))
    scores, target = head.log_probs(x).tolist(), y.tolist()
    m = evaluate(head, x, y, ks=(1, 3, 17), batch_size=5)
    assert isinstance(m, RankingMetrics)
    assert m.topk == {k: pytest.approx(ref_topk(scores, target, k)) for k in (1, 3, 17)}
    assert m.topk[17] == 1.0
    assert m.mrr == pytest.approx(ref_mrr(scores, target))
    assert m.ma_mrr == pytest.approx(ref_ma_mrr(scores, target))
    assert m.num_samples == 23


def test_evaluate_network_and_loader() -> None:
    head = _head()
    net = nn.Sequential(nn.Identity(), head)  # returns a HierarchicalOutput, no log_probs
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 17, (10,))
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    assert evaluate(net, loader) == evaluate(head, x, y)


def test_evaluate_flat_classifier_logits() -> None:
    flat = nn.Linear(6, 17).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 17, (10,))
    m = evaluate(flat, x, y, max_rank=3)
    with torch.no_grad():
        assert m.mrr == pytest.approx(ref_mrr(flat(x).tolist(), y.tolist(), 3))


def test_perfect_scores() -> None:
    y = torch.tensor([3, 1, 4, 1, 5])
    scores = nn.functional.one_hot(y, 6).double()
    m = ranking_metrics(target_rank(scores, y), y)
    assert (m.topk[1], m.mrr, m.ma_mrr) == (1.0, 1.0, 1.0)


def test_empty_gives_nan() -> None:
    empty = torch.zeros(0, 4)
    assert math.isnan(float(mean_reciprocal_rank(empty, torch.zeros(0, dtype=torch.long))))
    assert math.isnan(float(macro_mean_reciprocal_rank(empty, torch.zeros(0, dtype=torch.long))))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: target_rank(torch.zeros(2, 3), torch.tensor([0, 3])),
            ValueError,
            r"expected target in \[0, 3\), got values in \[0, 3\]",
        ),
        (
            lambda: target_rank(torch.zeros(2, 3), torch.tensor([0])),
            ValueError,
            r"expected target of shape \(2,\), got \(1,\)",
        ),
        (
            lambda: target_rank(torch.zeros(2, 3), torch.tensor([0.0, 1.0])),
            TypeError,
            r"expected target of an integer dtype, got torch\.float32",
        ),
        (
            lambda: target_rank(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1])),
            TypeError,
            r"expected scores to be a floating-point tensor .* got torch\.int64",
        ),
        (
            lambda: target_rank([[0.0]], torch.tensor([0])),
            TypeError,
            r"expected scores .* got list",
        ),
        (
            lambda: target_rank(torch.tensor([[float("nan"), 0.0]]), torch.tensor([1])),
            ValueError,
            r"expected scores without NaN",
        ),
        (
            lambda: topk_accuracy(torch.zeros(1, 3), torch.tensor([0]), k=0),
            ValueError,
            r"expected k to be a positive int, got 0",
        ),
        (
            lambda: mean_reciprocal_rank(torch.zeros(1, 3), torch.tensor([0]), max_rank=0),
            ValueError,
            r"expected max_rank to be None or a positive int, got 0",
        ),
        (
            lambda: ranking_metrics(torch.tensor([0, 1]), torch.tensor([0, 1])),
            ValueError,
            r"expected ranks >= 1, got a minimum of 0",
        ),
        (
            lambda: ranking_metrics(torch.tensor([1]), torch.tensor([0]), ks=(1, -2)),
            ValueError,
            r"expected every k in ks to be a positive int, got -2",
        ),
        (
            lambda: evaluate(nn.Linear(2, 3), torch.zeros(4, 2)),
            ValueError,
            r"expected a target tensor with an input tensor, got target=None",
        ),
        (
            lambda: evaluate(nn.Linear(2, 3), torch.zeros(4, 2), torch.tensor([0, 1])),
            ValueError,
            r"expected target with the inputs' leading size 4, got \(2,\)",
        ),
        (
            lambda: evaluate(nn.Linear(2, 3), [], torch.tensor([0])),
            ValueError,
            r"expected target=None when data is an iterable",
        ),
        (
            lambda: evaluate(nn.Linear(2, 3), []),
            ValueError,
            r"expected at least one sample, got empty data",
        ),
        (
            lambda: evaluate(nn.Linear(2, 3), torch.zeros(1, 2), torch.tensor([0]), batch_size=0),
            ValueError,
            r"expected batch_size to be a positive int, got 0",
        ),
    ],
    ids=[
        "target-range",
        "target-shape",
        "target-float",
        "scores-int",
        "scores-list",
        "nan",
        "k",
        "max-rank",
        "ranks",
        "ks",
        "no-target",
        "target-size",
        "loader-with-target",
        "empty",
        "batch-size",
    ],
)
def test_errors(call: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]
