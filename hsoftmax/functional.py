"""The maths of the two-level hierarchical softmax, as pure functions on tensors.

Every class ``c`` sits at a *position* ``p = class_slots[c]`` in ``[0, n_top * n_bottom)``:
node ``p // n_bottom`` of the top layer and slot ``p % n_bottom`` of that node's bottom layer.
With the identity mapping this is the paper's split ``node = y // n_bottom``,
``slot = y % n_bottom``. Positions that hold no class are masked: their probability is exactly 0.

.. math::

    \\log p(c \\mid x) = \\log \\operatorname{softmax}(z W_{top}^T + b_{top})_{node(c)}
        + \\log \\operatorname{softmax}(z W_{bottom}[node(c)]^T + b_{bottom}[node(c)])_{slot(c)}

where ``z = act(x W_{proj}^T + b_{proj})`` is the hidden vector. All functions here take a
:class:`HierarchicalOutput` (what :class:`~hsoftmax.HierarchicalSoftmax` returns) and work on any
number of leading dimensions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import bottom, fast_bottom
from .checks import (
    check_class_weight,
    check_k,
    check_loss_options,
    check_target,
    check_target_values,
)

__all__ = [
    "HierarchicalOutput",
    "gold_log_prob",
    "hierarchical_cross_entropy",
    "log_probs",
    "predict",
    "topk",
]

class HierarchicalOutput(NamedTuple):
    """What :class:`~hsoftmax.HierarchicalSoftmax` returns: everything the loss and inference need.

    It is a plain :class:`~typing.NamedTuple` of tensors (a pytree for ``torch.compile`` and
    ``torch.export``), not logits: pass it to :class:`~hsoftmax.HierarchicalCrossEntropy` or to
    the functions of :mod:`hsoftmax.functional`.

    Attributes:
        hidden: ``(*, hidden)`` the activated projection ``z``.
        top_logits: ``(*, n_top)`` logits of the top layer; nodes that hold no class are ``-inf``.
        bottom_weight: ``(n_top, n_bottom, hidden)`` the bottom layers' weights (the parameter).
        bottom_bias: ``(n_top, n_bottom)`` the bottom layers' biases (the parameter).
        class_slots: ``(num_classes,)`` the position of every class.
        slot_classes: ``(n_top * n_bottom,)`` the class at every position (``-1`` where masked),
            or ``None`` for the identity mapping.
        slot_mask: ``(n_top, n_bottom)`` bool, ``True`` where a position holds a class, or
            ``None`` when every position does.
        sparse: whether the bottom parameters get sparse gradients (see :mod:`hsoftmax.bottom`).
    """

    hidden: Tensor
    top_logits: Tensor
    bottom_weight: Tensor
    bottom_bias: Tensor
    class_slots: Tensor
    slot_classes: Tensor | None
    slot_mask: Tensor | None
    sparse: bool = False

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self.class_slots.shape[0]

    def log_probs(self) -> Tensor:
        """Exact log-probabilities of all classes, ``(*, num_classes)``: see :func:`log_probs`."""
        return log_probs(self)

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """The exact ``k`` most probable classes, ``(values, indices)``: see :func:`topk`."""
        return topk(self, k)

    def predict(self) -> Tensor:
        """The paper's top-1 routing, ``(*)`` class ids (not always the argmax): see
        :func:`predict`."""
        return predict(self)

    def __getattr__(self, name: str) -> object:
        # only reached for names the tuple lacks, e.g. tensor methods tried on "the logits"
        if name.startswith("__"):
            raise AttributeError(name)
        message = f"'HierarchicalOutput' object has no attribute {name!r}: {_NOT_LOGITS}"
        raise AttributeError(message)

    @classmethod
    def __torch_function__(
        cls, func: object, types: object, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        name = getattr(func, "__name__", str(func))
        raise TypeError(f"{name}() got a HierarchicalOutput, not a tensor: {_NOT_LOGITS}")


_NOT_LOGITS = (
    "the head's output is not logits; use out.log_probs() for the exact log-probabilities, "
    "out.topk(k) or out.predict() for classes, and hsoftmax.HierarchicalCrossEntropy()(out, "
    "target) for the loss"
)


def _log_softmax(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last dimension, in at least float32 for half-precision logits."""
    low = logits.dtype in (torch.float16, torch.bfloat16)
    return F.log_softmax(logits, dim=-1, dtype=torch.float32 if low else None)


def _class_log_probs(top: Tensor, bottom_logits: Tensor) -> Tensor:
    """``top[..., None] + log_softmax(bottom_logits)`` for ``(N, m)`` node log-probabilities and
    ``(N, m, n_bottom)`` logits (``log_softmax`` subtracts the maximum first: exact for the
    most probable slot even for huge logits)."""
    result, node = _log_softmax(bottom_logits), top.unsqueeze(-1)
    if result.requires_grad or node.requires_grad:
        return result + node
    return result.add_(node)  # no autograd: reuse the fresh tensor


def _masked_fill(fresh: Tensor, mask: Tensor, value: float) -> Tensor:
    """``masked_fill``, in place when autograd does not track ``fresh`` (a tensor made here):
    at inference it saves a copy of the largest tensor."""
    return (
        fresh.masked_fill(mask, value) if fresh.requires_grad else fresh.masked_fill_(mask, value)
    )


def _mask_slots(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Push the logits of empty positions to the dtype's minimum (finite, so that a node
    without any class still gives a finite, if meaningless, softmax and finite gradients)."""
    if mask is None:
        return logits
    return _masked_fill(logits, ~mask, torch.finfo(logits.dtype).min)


def _node_bottom_logits(out: HierarchicalOutput, hidden: Tensor, nodes: Tensor) -> Tensor:
    """Bottom logits of the given nodes.

    Args:
        out: the head's output.
        hidden: ``(N, hidden)``.
        nodes: ``(N, m)`` node ids per row.

    Returns:
        ``(N, m, n_bottom)`` masked bottom logits.
    """
    args = (out.bottom_weight, out.bottom_bias, hidden, nodes, out.sparse)
    fast = fast_bottom.chosen(*args)
    logits = fast_bottom.node_logits(*args) if fast else bottom.node_logits(*args)
    if out.slot_mask is not None:
        logits = _mask_slots(logits, out.slot_mask[nodes])
    return logits


def _flat(out: HierarchicalOutput) -> tuple[Tensor, Tensor]:
    """The hidden vectors and top logits with leading dimensions flattened to one."""
    return out.hidden.reshape(-1, out.hidden.shape[-1]), out.top_logits.reshape(
        -1, out.top_logits.shape[-1]
    )


def _to_classes(out: HierarchicalOutput, positions: Tensor) -> Tensor:
    """Map positions to class ids."""
    if out.slot_classes is None:
        return positions
    return out.slot_classes[positions]


def _gold_path(out: HierarchicalOutput, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top log-probs ``(N, n_top)``, the target node's bottom log-probs ``(N, n_bottom)``, and
    the target's node and slot ``(N,)``, for valid class ids ``target`` (not checked)."""
    hidden, top_logits = _flat(out)
    flat_target = target.reshape(-1).long()
    position = flat_target if out.slot_classes is None else out.class_slots[flat_target]
    n_bottom = out.bottom_bias.shape[1]
    node = torch.div(position, n_bottom, rounding_mode="floor")
    top = _log_softmax(top_logits)
    bottom = _log_softmax(_node_bottom_logits(out, hidden, node.unsqueeze(1)).squeeze(1))
    return top, bottom, node, position - node * n_bottom


def gold_log_prob(out: HierarchicalOutput, target: Tensor) -> Tensor:
    """Log-probability of each target class, touching only the target's node.

    This is the teacher-forced path of training: ``O(hidden * (n_top + n_bottom))`` per sample,
    independent of the number of classes. ``target`` must hold valid class ids (it is not
    checked here; :func:`hierarchical_cross_entropy` checks it).

    Args:
        out: the head's output, leading shape ``(*)``.
        target: ``(*)`` class ids in ``[0, num_classes)``.

    Returns:
        ``(*)`` the log-probability ``log p(target | x)``.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, n_top=4, n_bottom=5, hidden=8)
        >>> x, y = torch.randn(3, 16), torch.tensor([0, 7, 19])
        >>> gold = hsoftmax.functional.gold_log_prob(head(x), y)
        >>> torch.allclose(gold, head.log_probs(x).gather(1, y[:, None]).squeeze(1))
        True
    """
    top, bottom, node, slot = _gold_path(out, target)
    return _pick(top, bottom, node, slot).view(target.shape)


def _pick(top: Tensor, bottom: Tensor, node: Tensor, slot: Tensor) -> Tensor:
    """``top[i, node[i]] + bottom[i, slot[i]]`` for every row ``i``."""
    return (top.gather(1, node.unsqueeze(1)) + bottom.gather(1, slot.unsqueeze(1))).squeeze(1)


def hierarchical_cross_entropy(
    out: HierarchicalOutput,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Teacher-forced negative log-likelihood of the hierarchical softmax.

    .. math::

        \\ell_i = w_{y_i} \\bigl[-\\log p(node(y_i)) - \\log p(slot(y_i) \\mid node(y_i))\\bigr]

    It is the exact negative log-likelihood of the full distribution, computed from the target
    node alone. Without label smoothing it equals
    ``F.cross_entropy(log_probs(out), target, weight, ignore_index=..., reduction=...)``:
    ``'mean'`` divides by the sum of the weights of the non-ignored targets.

    Label smoothing is applied per level, so that it costs ``O(n_top + n_bottom)`` per sample
    rather than ``O(num_classes)``: with :math:`\\varepsilon` = ``label_smoothing``,

    .. math::

        \\ell_i = w_{y_i} \\bigl[(1 - \\varepsilon)(-\\log p(t_i) - \\log p(s_i \\mid t_i))
            + \\varepsilon (\\overline{-\\log p(n)} + \\overline{-\\log p(s \\mid t_i)})\\bigr]

    where the first bar averages over the nodes that hold classes and the second over the
    classes of the target node ``t_i``. It is ``F.cross_entropy(..., label_smoothing=eps)``
    applied to the top layer plus the same applied to the target node's bottom layer.

    Args:
        out: the head's output, leading shape ``(*)``.
        target: ``(*)`` integer class ids; entries equal to ``ignore_index`` are skipped.
        weight: optional ``(num_classes,)`` weight of each class. Default: ``None``.
        ignore_index: target value that contributes nothing. Default: ``-100``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        label_smoothing: :math:`\\varepsilon` in ``[0, 1]``. Default: ``0.0``.

    Returns:
        The loss: a scalar, or ``(*)`` with ``reduction='none'``.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, n_top=4, n_bottom=5, hidden=8)
        >>> x, y = torch.randn(3, 16), torch.tensor([0, 7, 19])
        >>> loss = hsoftmax.functional.hierarchical_cross_entropy(head(x), y)
        >>> expected = torch.nn.functional.cross_entropy(head.log_probs(x), y)
        >>> torch.allclose(loss, expected)
        True
    """
    check_loss_options(reduction, label_smoothing)
    if hasattr(type(out), "cross_entropy"):  # an output that computes its own, e.g. a shard's
        return out.cross_entropy(  # type: ignore[operator]
            target, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    target = check_target(target, tuple(out.hidden.shape[:-1]))
    check_target_values(target, out.num_classes, ignore_index)
    check_class_weight(weight, out.num_classes)

    keep = (target != ignore_index).reshape(-1)
    safe_target = torch.where(keep, target.reshape(-1), 0)
    top, bottom, node, slot = _gold_path(out, safe_target)
    if weight is None and label_smoothing == 0.0:  # each level's nll_loss skips ignored rows
        loss = F.nll_loss(top, node.where(keep, -1), ignore_index=-1, reduction=reduction)
        loss = loss + F.nll_loss(bottom, slot.where(keep, -1), ignore_index=-1, reduction=reduction)
        return loss.view(target.shape) if reduction == "none" else loss
    nll = -_pick(top, bottom, node, slot)
    if label_smoothing > 0.0:
        smooth = _mean_valid(-top, torch.isfinite(top)) + _mean_valid(
            -bottom, _slot_mask_of(out, node, bottom)
        )
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth

    sample_weight = keep.to(nll.dtype)
    if weight is not None:  # ignored rows take no weight, even an infinite weight[0]
        sample_weight = torch.where(keep, weight.to(nll.dtype)[safe_target], 0.0)
    loss = torch.where(keep, nll * sample_weight, 0.0)  # nor a NaN from a padded row
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / sample_weight.sum()


def _slot_mask_of(out: HierarchicalOutput, node: Tensor, like: Tensor) -> Tensor:
    if out.slot_mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return out.slot_mask.index_select(0, node)


def _mean_valid(values: Tensor, valid: Tensor) -> Tensor:
    """Row means of ``values`` over the ``valid`` entries (invalid ones may be infinite)."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum(-1)
    return total / valid.sum(-1)


def _all_positions_log_probs(
    out: HierarchicalOutput, hidden: Tensor, top: Tensor, nodes: slice = slice(None)
) -> Tensor:
    """``(N, n * n_bottom)`` log-probabilities of the positions of the nodes ``nodes`` (all by
    default), in position order, ``-inf`` where masked, from the hidden vectors and the top
    log-probabilities ``(N, n_top)``."""
    weight, bias = out.bottom_weight[nodes], out.bottom_bias[nodes]
    n, n_bottom, width = weight.shape
    bottom_logits = F.linear(
        hidden, weight.reshape(n * n_bottom, width), bias.reshape(-1)
    ).view(-1, n, n_bottom)
    mask = None if out.slot_mask is None else out.slot_mask[nodes]
    result = _class_log_probs(top[:, nodes], _mask_slots(bottom_logits, mask))
    result = result.view(-1, n * n_bottom)
    if mask is not None:
        result = _masked_fill(result, ~mask.reshape(-1), float("-inf"))
    return result


def log_probs(out: HierarchicalOutput) -> Tensor:
    """Exact log-probabilities of every class.

    One matrix product of the hidden vectors with all bottom weights, plus the top
    log-probabilities: ``O(hidden * num_classes)`` per sample.

    Args:
        out: the head's output, leading shape ``(*)``.

    Returns:
        ``(*, num_classes)`` log-probabilities; every row's ``logsumexp`` is 0. Half-precision
        inputs give float32.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, n_top=4, n_bottom=5, hidden=8, num_classes=18)
        >>> lp = hsoftmax.functional.log_probs(head(torch.randn(2, 16)))
        >>> lp.shape, torch.allclose(lp.exp().sum(-1), torch.ones(2))
        (torch.Size([2, 18]), True)
    """
    hidden, top_logits = _flat(out)
    top = _log_softmax(top_logits)
    if fast_inference.chosen("log_probs", out, hidden, top):
        positions = fast_inference.log_probs(out, hidden, top)
    else:
        positions = _all_positions_log_probs(out, hidden, top)
    num_classes = out.num_classes
    if out.slot_classes is not None:
        positions = positions.index_select(1, out.class_slots)
    elif num_classes < positions.shape[1]:
        positions = positions[:, :num_classes]
    return positions.view(*out.hidden.shape[:-1], num_classes)


def _valid_argmax(values: Tensor, valid: Tensor | None) -> Tensor:
    """``values.argmax(-1)`` among the ``valid`` entries only (``valid``: ``(n,)`` for every row,
    or one row each; ``None``: all). A row whose valid entries are all ``-inf`` (an overflow)
    gets its first valid entry: never an invalid one."""
    if valid is None:
        return values.argmax(-1)
    best = values.masked_fill(~valid, float("-inf")).argmax(-1)
    first = valid.to(torch.uint8).argmax(-1)
    best_is_valid = valid[best] if valid.dim() == 1 else valid.gather(-1, best[:, None])[:, 0]
    return torch.where(best_is_valid, best, first)


def predict(out: HierarchicalOutput) -> Tensor:
    """The paper's top-1 routing: the most probable node, then the most probable slot in it.

    It costs ``O(hidden * (n_top + n_bottom))`` per sample, but it is **not** always the most
    probable class: a class in a less probable node can beat the best class of the best node.
    Use :func:`topk` with ``k=1`` for the exact argmax.

    Args:
        out: the head's output, leading shape ``(*)``.

    Returns:
        ``(*)`` class ids (int64); never a masked position.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, n_top=4, n_bottom=5, hidden=8)
        >>> hsoftmax.functional.predict(head(torch.randn(3, 16))).shape
        torch.Size([3])
    """
    hidden, top_logits = _flat(out)
    node_valid = None if out.slot_mask is None else out.slot_mask.any(1)
    node = _valid_argmax(top_logits, node_valid)
    logits = _node_bottom_logits(out, hidden, node.unsqueeze(1)).squeeze(1)
    valid = None if out.slot_mask is None else out.slot_mask.index_select(0, node)
    positions = node * out.bottom_weight.shape[1] + _valid_argmax(logits, valid)
    return _to_classes(out, positions).view(out.hidden.shape[:-1])


def topk(out: HierarchicalOutput, k: int) -> tuple[Tensor, Tensor]:
    """The exact ``k`` most probable classes, sorted like :func:`torch.topk`.

    By definition ``log_probs(out).topk(k)``, and computed so by the reference path. On the CPU
    in eager mode, :mod:`hsoftmax.fast_inference` gives the same answer while scanning only
    the nodes that can hold a top class (``p(class) <= p(its node)``), where it is measured
    faster (see :mod:`hsoftmax.fastpaths`). Values agree up to float rounding; exact ties may be
    broken differently. The fast search depends on the data (host syncs): compiled and exported
    graphs take the reference path.

    Args:
        out: the head's output, leading shape ``(*)``.
        k: how many classes, in ``[0, num_classes]``.

    Returns:
        ``(values, indices)``, each ``(*, k)``: log-probabilities in decreasing order and
        their class ids.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, n_top=4, n_bottom=5, hidden=8)
        >>> out = head(torch.randn(3, 16))
        >>> values, indices = hsoftmax.functional.topk(out, 2)
        >>> torch.allclose(values, hsoftmax.functional.log_probs(out).topk(2).values)
        True
    """
    check_k(k, out.num_classes)
    hidden, top_logits = _flat(out)
    top = _log_softmax(top_logits)
    if fast_inference.chosen("topk", out, hidden, top, k):
        values, positions = fast_inference.topk(out, hidden, top, k)
    else:
        values, positions = _all_positions_log_probs(out, hidden, top).topk(k, dim=-1)
    shape = (*out.hidden.shape[:-1], k)
    return values.view(shape), _to_classes(out, positions).view(shape)


from . import fast_inference  # noqa: E402  (it builds on the reference functions above)
