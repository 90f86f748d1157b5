"""Ranking metrics: top-k accuracy, mean reciprocal rank (MRR) and macro-averaged MRR (MA-MRR).

Everything starts from the **rank of the true class**: with scores ``s`` (logits or
log-probabilities, any monotone score) of one sample and true class ``y``,

.. math:: \\operatorname{rank} = 1 + \\#\\{c : s_c > s_y\\}

**Ties** are counted in the true class's favour (optimistic): classes whose score equals the
true class's do not push it down. Masked classes (``-inf``) never rank above a real one. NaN
scores are rejected.

- top-k accuracy: the fraction of samples with ``rank <= k``;
- MRR: the mean of ``1 / rank`` over samples;
- MA-MRR, the PlantCLEF ranking metric: the MRR of each class's samples, averaged over the
  classes that have samples, so that rare classes weigh as much as common ones. (The paper
  spells it "Moving Average" MRR; the challenge's metric is this macro average over species.)

PlantCLEF runs list at most a fixed number of classes per observation; ``max_rank`` scores a
true class ranked below it as ``1 / rank = 0``. (PlantCLEF also pools the images of one
observation before ranking; do that pooling on the scores before calling these functions.)

The score functions accept a ``(*, num_classes)`` tensor or the head's output
(:class:`~hsoftmax.functional.HierarchicalOutput`, turned into exact log-probabilities).
:func:`evaluate` takes the model and the data and does the batching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from . import functional as HF
from .checks import check_integer_tensor
from .functional import HierarchicalOutput

__all__ = [
    "RankingMetrics",
    "evaluate",
    "macro_mean_reciprocal_rank",
    "mean_reciprocal_rank",
    "ranking_metrics",
    "target_rank",
    "topk_accuracy",
]

#: What the score functions accept (a runtime alias, hence ``Union`` for Python 3.9).
Scores = Union[Tensor, HierarchicalOutput]  # noqa: UP007


def _scores(scores: object) -> Tensor:
    if isinstance(scores, HierarchicalOutput):
        return HF.log_probs(scores)
    if not isinstance(scores, Tensor) or not scores.dtype.is_floating_point:
        got = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(
            f"expected scores to be a floating-point tensor or a HierarchicalOutput, got {got}"
        )
    if scores.dim() == 0:
        raise ValueError("expected scores of shape (*, num_classes), got a 0-d tensor")
    return scores


def _check_target(target: object, shape: tuple[int, ...], num_classes: int | None) -> Tensor:
    target = check_integer_tensor("target", target)
    if tuple(target.shape) != shape:
        raise ValueError(f"expected target of shape {shape}, got {tuple(target.shape)}")
    if target.numel():
        low, high = int(target.min()), int(target.max())
        upper = num_classes if num_classes is not None else high + 1
        if low < 0 or high >= upper:
            raise ValueError(
                f"expected target in [0, {upper}), got values in [{low}, {high}]"
            )
    return target.long()


def _check_max_rank(max_rank: int | None) -> None:
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0
    ):
        raise ValueError(f"expected max_rank to be None or a positive int, got {max_rank!r}")


def target_rank(scores: Scores, target: Tensor) -> Tensor:
    """The rank of the true class, 1 for the best: ``1 + #{classes scored strictly higher}``.

    Args:
        scores: ``(*, num_classes)`` scores (logits or log-probabilities), or the head's output.
        target: ``(*)`` true class ids in ``[0, num_classes)``.

    Returns:
        ``(*)`` int64 ranks in ``[1, num_classes]``. Ties count in the true class's favour.

    Raises:
        TypeError: if ``scores`` is not floating-point or ``target`` not integer.
        ValueError: on a shape mismatch, a target out of range, or a NaN score.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]])
        >>> target_rank(scores, torch.tensor([2, 1]))
        tensor([2, 1])
    """
    s = _scores(scores)
    target = _check_target(target, tuple(s.shape[:-1]), s.shape[-1])
    if bool(torch.isnan(s).any()):
        raise ValueError("expected scores without NaN, got NaN values")
    true = s.gather(-1, target.unsqueeze(-1))
    return 1 + (s > true).sum(-1)


def _reciprocal(ranks: Tensor, max_rank: int | None) -> Tensor:
    rr = ranks.double().reciprocal()
    return rr if max_rank is None else rr.masked_fill(ranks > max_rank, 0.0)


def _mean(values: Tensor) -> Tensor:
    return values.mean() if values.numel() else values.new_tensor(float("nan"))


def topk_accuracy(scores: Scores, target: Tensor, k: int = 1) -> Tensor:
    """The fraction of samples whose true class ranks in the top ``k``.

    Args:
        scores: ``(*, num_classes)`` scores, or the head's output.
        target: ``(*)`` true class ids.
        k: how many top classes count as a hit. Default: 1.

    Returns:
        A 0-d float64 tensor in ``[0, 1]`` (NaN for no samples).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1]])
        >>> target = torch.tensor([2, 0])  # ranks 2 and 1
        >>> topk_accuracy(scores, target), topk_accuracy(scores, target, k=2)
        (tensor(0.5000, dtype=torch.float64), tensor(1., dtype=torch.float64))
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"expected k to be a positive int, got {k!r}")
    return _mean((target_rank(scores, target) <= k).double().flatten())


def mean_reciprocal_rank(scores: Scores, target: Tensor, max_rank: int | None = None) -> Tensor:
    """Mean reciprocal rank of the true class over all samples.

    Args:
        scores: ``(*, num_classes)`` scores, or the head's output.
        target: ``(*)`` true class ids.
        max_rank: ranks beyond it score 0 (a run listing only ``max_rank`` classes).
            Default: ``None`` (no limit).

    Returns:
        A 0-d float64 tensor in ``(0, 1]`` (NaN for no samples).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1]])
        >>> mean_reciprocal_rank(scores, torch.tensor([2, 0]))  # ranks 2 and 1
        tensor(0.7500, dtype=torch.float64)
    """
    _check_max_rank(max_rank)
    return _mean(_reciprocal(target_rank(scores, target), max_rank).flatten())


def _macro(rr: Tensor, target: Tensor) -> Tensor:
    rr, target = rr.flatten(), target.flatten()
    if not target.numel():
        return rr.new_tensor(float("nan"))
    counts = torch.bincount(target)
    sums = torch.zeros(counts.shape, dtype=rr.dtype, device=rr.device).index_add_(0, target, rr)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def macro_mean_reciprocal_rank(
    scores: Scores, target: Tensor, max_rank: int | None = None
) -> Tensor:
    """MA-MRR: the mean over classes of each class's mean reciprocal rank (PlantCLEF's metric).

    .. math:: \\text{MA-MRR} = \\frac{1}{|K|} \\sum_{c \\in K} \\frac{1}{n_c}
              \\sum_{i : y_i = c} \\frac{1}{\\operatorname{rank}_i}

    where ``K`` is the set of classes with at least one sample and ``n_c`` their counts.

    Args:
        scores: ``(*, num_classes)`` scores, or the head's output.
        target: ``(*)`` true class ids.
        max_rank: ranks beyond it score 0. Default: ``None`` (no limit).

    Returns:
        A 0-d float64 tensor in ``(0, 1]`` (NaN for no samples).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.6, 0.3, 0.1]])
        >>> # class 2: rank 2; class 0: ranks 1 and 1 -> (1/2 + 1) / 2
        >>> macro_mean_reciprocal_rank(scores, torch.tensor([2, 0, 0]))
        tensor(0.7500, dtype=torch.float64)
    """
    _check_max_rank(max_rank)
    ranks = target_rank(scores, target)
    return _macro(_reciprocal(ranks, max_rank), target.long())


class RankingMetrics(NamedTuple):
    """What :func:`evaluate` and :func:`ranking_metrics` return.

    Attributes:
        topk: ``{k: top-k accuracy}`` for each requested ``k``.
        mrr: mean reciprocal rank.
        ma_mrr: macro-averaged mean reciprocal rank (mean over classes with samples).
        num_samples: the number of samples.
        num_classes_seen: the number of distinct true classes (the classes MA-MRR averages).
    """

    topk: dict[int, float]
    mrr: float
    ma_mrr: float
    num_samples: int
    num_classes_seen: int


def ranking_metrics(
    ranks: Tensor,
    target: Tensor,
    ks: Iterable[int] = (1, 5),
    max_rank: int | None = None,
) -> RankingMetrics:
    """All ranking metrics from precomputed ranks (e.g. :func:`target_rank` of several batches).

    Args:
        ranks: ``(*)`` ranks of the true classes, from 1.
        target: ``(*)`` true class ids, for MA-MRR.
        ks: the ``k`` of the top-k accuracies. Default: ``(1, 5)``.
        max_rank: ranks beyond it score 0 in MRR and MA-MRR. Default: ``None`` (no limit).

    Returns:
        A :class:`RankingMetrics`.

    Example:
        >>> import torch
        >>> m = ranking_metrics(torch.tensor([1, 2, 4]), torch.tensor([0, 0, 1]), ks=(1, 3))
        >>> m.topk, round(m.mrr, 4), round(m.ma_mrr, 4)
        ({1: 0.3333333333333333, 3: 0.6666666666666666}, 0.5833, 0.5)
    """
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"expected every k in ks to be a positive int, got {k!r}")
    _check_max_rank(max_rank)
    if not isinstance(ranks, Tensor) or ranks.dtype.is_floating_point:
        got = ranks.dtype if isinstance(ranks, Tensor) else type(ranks).__name__
        raise TypeError(f"expected ranks to be an integer torch.Tensor, got {got}")
    target = _check_target(target, tuple(ranks.shape), None)
    ranks, target = ranks.flatten(), target.flatten()
    if ranks.numel() and int(ranks.min()) < 1:
        raise ValueError(f"expected ranks >= 1, got a minimum of {int(ranks.min())}")
    rr = _reciprocal(ranks, max_rank)
    return RankingMetrics(
        topk={k: float(_mean((ranks <= k).double())) for k in ks},
        mrr=float(_mean(rr)),
        ma_mrr=float(_macro(rr, target)),
        num_samples=ranks.numel(),
        num_classes_seen=int(torch.unique(target).numel()),
    )


def _model_scores(model: Callable[[Tensor], Any], inputs: Tensor) -> Tensor:
    log_probs = getattr(model, "log_probs", None)
    out = log_probs(inputs) if callable(log_probs) else model(inputs)
    return _scores(out)


def _batches(
    data: Tensor | Iterable[tuple[Tensor, Tensor]], target: Tensor | None, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, Tensor):
        if target is None:
            raise ValueError("expected a target tensor with an input tensor, got target=None")
        if not isinstance(target, Tensor) or target.shape[:1] != data.shape[:1]:
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(
                f"expected target with the inputs' leading size {data.shape[0]}, got {got}"
            )
        return zip(data.split(batch_size), target.split(batch_size))
    if target is not None:
        raise ValueError(
            "expected target=None when data is an iterable of (inputs, target) batches, "
            "got a target"
        )
    return data


@torch.no_grad()
def evaluate(
    model: Callable[[Tensor], Any],
    data: Tensor | Iterable[tuple[Tensor, Tensor]],
    target: Tensor | None = None,
    ks: Iterable[int] = (1, 5),
    max_rank: int | None = None,
    batch_size: int = 1024,
) -> RankingMetrics:
    """Top-k accuracies, MRR and MA-MRR of a model on some data, with no ranking code to write.

    Scores come from ``model.log_probs(inputs)`` when the model has that method (a
    :class:`~hsoftmax.HierarchicalSoftmax`: exact log-probabilities, not top-1 routing), else
    from ``model(inputs)``, which may return logits or a
    :class:`~hsoftmax.functional.HierarchicalOutput` (a whole network ending in the head).
    Runs under ``torch.no_grad()``; the model's train/eval mode is left as it is.

    Args:
        model: the head, a network ending in it, or any classifier returning logits.
        data: ``(N, ...)`` inputs with ``target``, or an iterable of ``(inputs, target)``
            batches (e.g. a ``DataLoader``).
        target: ``(N,)`` true class ids when ``data`` is a tensor, else ``None``.
        ks: the ``k`` of the top-k accuracies. Default: ``(1, 5)``.
        max_rank: ranks beyond it score 0 in MRR and MA-MRR. Default: ``None`` (no limit).
        batch_size: samples per forward when ``data`` is a tensor. Default: 1024.

    Returns:
        A :class:`RankingMetrics`.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, n_top=10, n_bottom=10, hidden=8).eval()
        >>> x, y = torch.randn(50, 16), torch.randint(0, 100, (50,))
        >>> m = evaluate(head, x, y, ks=(1, 100))
        >>> m.topk[100], m.num_samples
        (1.0, 50)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"expected batch_size to be a positive int, got {batch_size!r}")
    ranks, targets = [], []
    for inputs, y in _batches(data, target, batch_size):
        ranks.append(target_rank(_model_scores(model, inputs), y).flatten())
        targets.append(y.flatten())
    if not ranks:
        raise ValueError("expected at least one sample, got empty data")
    return ranking_metrics(torch.cat(ranks), torch.cat(targets), ks=ks, max_rank=max_rank)
