"""CPU fast paths of exact inference, proven equal to the reference functions of
:mod:`hsoftmax.functional` by the same contract tests.

- :func:`log_probs`: the log-probabilities of all classes by cache-sized blocks of nodes.
- :func:`topk`: the exact top-k without the full product. Since ``p(class) <= p(its node)``, a
  class can only beat the ``k``-th best class found so far if its node does. A first round
  scans each row's ``ceil(k / n_bottom)`` most probable nodes; the rows where some unscanned
  node is at least as probable as the ``k``-th class found get a second round over those nodes
  (their number rounded up to a power of two, to scan rows in a few groups), after which the
  answer is exact. A peaked top distribution (a trained model) needs a few nodes per row. A
  flat one (an untrained model) would need most nodes: such rows first get a tight bound per
  node (:mod:`hsoftmax.bounds`: every logit is computed, by an int8 product where int8 products
  are measured fast, but none is exponentiated, kept or sorted), which leaves a few nodes per
  row to scan exactly.

Both apply on the CPU outside compiled and traced graphs, :func:`log_probs` without autograd
(:func:`applies`), and run where :func:`hsoftmax.fastpaths.measured_faster` found them faster
than the reference for calls of that size. A batch with a non-finite hidden vector or
log-probability takes the dense search, which answers as the reference does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fastpaths
from .bounds import bounds_apply, node_bounds
from .functional import (
    HierarchicalOutput,
    _all_positions_log_probs,
    _class_log_probs,
    _node_bottom_logits,
)

__all__ = ["applies", "chosen", "log_probs", "topk"]


def applies(kind: str, out: HierarchicalOutput, hidden: Tensor) -> bool:
    """Whether the fast ``kind`` may answer the call: CPU, eager mode, and for ``"log_probs"``
    no autograd graph (the top-k values stay differentiable: they are gathered by the
    reference functions)."""
    tracked = torch.is_grad_enabled() and (
        hidden.requires_grad or out.bottom_weight.requires_grad or out.bottom_bias.requires_grad
    )
    return (
        hidden.device.type == "cpu" and not (tracked and kind == "log_probs") and fastpaths.eager()
    )


def chosen(
    kind: str, out: HierarchicalOutput, hidden: Tensor, top: Tensor, k: int | None = None
) -> bool:
    """Whether the fast ``kind`` (``"log_probs"`` or ``"topk"``) runs for this call: it
    applies, and was measured faster than the reference for calls of this kind."""
    if not applies(kind, out, hidden):
        return False
    key = (
        kind, hidden.dtype, tuple(out.bottom_weight.shape), out.num_classes,
        fastpaths.size_bucket(hidden.shape[0]), k,
    )
    if kind == "log_probs":
        return fastpaths.measured_faster(
            key, lambda: log_probs(out, hidden, top),
            lambda: _all_positions_log_probs(out, hidden, top),
        )
    assert k is not None
    return fastpaths.measured_faster(
        key, lambda: topk(out, hidden, top, k),
        lambda: _all_positions_log_probs(out, hidden, top).topk(k, dim=-1),
    )


def topk(out: HierarchicalOutput, hidden: Tensor, top: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k log-probabilities and positions of each row (see the module)."""
    if bool(torch.isfinite(hidden).all()) and not bool(top.isnan().any()):
        values, positions = _pruned_topk(out, hidden, top, top, k, tight=False)
        if not bool(values.isnan().any()):
            return values, positions
    return _dense_topk(out, hidden, top, k)  # non-finite rows: as the reference answers


#: The log-probabilities of all positions are computed for blocks of nodes of about this many
#: entries each (4 MB in float32), so that a block stays in cache from the product to the result.
_DENSE_BLOCK = 2**20


def _node_blocks(n_top: int, entries_per_node: int) -> list[slice]:
    """Consecutive slices of the nodes, of about ``_DENSE_BLOCK`` entries each."""
    step = max(1, _DENSE_BLOCK // max(1, entries_per_node))
    return [slice(start, min(start + step, n_top)) for start in range(0, n_top, step)]


def log_probs(out: HierarchicalOutput, hidden: Tensor, top: Tensor) -> Tensor:
    """:func:`~hsoftmax.functional._all_positions_log_probs` by blocks of nodes, written into one
    result (a few blocks per call, not a loop over nodes)."""
    n_top, n_bottom = out.bottom_bias.shape
    blocks = _node_blocks(n_top, hidden.shape[0] * n_bottom)
    if len(blocks) == 1:
        return _all_positions_log_probs(out, hidden, top)
    result = None
    for nodes in blocks:
        block = _all_positions_log_probs(out, hidden, top, nodes)
        if result is None:  # the first block tells the dtype
            result = block.new_empty(block.shape[0], n_top * n_bottom)
        result[:, nodes.start * n_bottom : nodes.stop * n_bottom] = block
    assert result is not None
    return result


# Gathering one node's weights for one row costs about as much as _DENSE_SCAN_RATIO nodes of
# one row of the dense product, which also reads all the weights once: scanning ``count`` nodes
# for each of ``rows`` rows is done densely when that is cheaper.
_DENSE_SCAN_RATIO = 16


def _dense_is_cheaper(count: int, rows: int, n_top: int) -> bool:
    return _DENSE_SCAN_RATIO * count * rows >= n_top * (_DENSE_SCAN_RATIO + rows)


def _scan_nodes(
    out: HierarchicalOutput, hidden: Tensor, top: Tensor, nodes: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Exact top-k (at most) log-probabilities and positions of each row among the classes of
    its nodes ``nodes`` ``(N, m)``, from the top log-probabilities ``top`` ``(N, n_top)``."""
    n_bottom = out.bottom_bias.shape[1]
    logits = _node_bottom_logits(out, hidden, nodes)
    candidates = _class_log_probs(top.gather(1, nodes), logits).flatten(1)
    if out.slot_mask is not None:
        valid = out.slot_mask.index_select(0, nodes.reshape(-1)).view_as(candidates)
        candidates = candidates.masked_fill(~valid, float("-inf"))
    found, where = candidates.topk(min(k, candidates.shape[1]), dim=-1)
    chosen = nodes.gather(1, torch.div(where, n_bottom, rounding_mode="floor"))
    return found, chosen * n_bottom + where % n_bottom


def _best_of(values: list[Tensor], positions: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The best ``k`` (log-probability, position) pairs of each row among several sets."""
    best, pick = torch.cat(values, 1).topk(k, dim=-1)
    return best, torch.cat(positions, 1).gather(1, pick)


def _dense_topk(
    out: HierarchicalOutput, hidden: Tensor, top: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Exact top-k log-probabilities and positions among all positions, by blocks of nodes
    (see :func:`_blocked_log_probs`): the best ``k`` of each block, then the best of those."""
    n_top, n_bottom = out.bottom_bias.shape
    values, positions = [], []
    for nodes in _node_blocks(n_top, hidden.shape[0] * n_bottom):
        block = _all_positions_log_probs(out, hidden, top, nodes)
        found, where = block.topk(min(k, block.shape[1]), dim=-1)
        values.append(found)
        positions.append(where + nodes.start * n_bottom)
    if len(values) == 1:
        return values[0], positions[0]
    return _best_of(values, positions, k)


def _next_power_of_two(counts: Tensor) -> Tensor:
    """The smallest power of two at least ``counts`` (int64, ``counts >= 1``)."""
    return torch.pow(2, torch.ceil(torch.log2(counts.double())).long())


#: The int8 bounds of :mod:`hsoftmax.bounds` quantise every weight once per call, a cost that
#: fewer rows than this do not repay; the whole search is still timed against the reference.
_BOUND_ROWS = 40


def _pruned_topk(
    out: HierarchicalOutput, hidden: Tensor, top: Tensor, bound: Tensor, k: int, tight: bool
) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row, scanning nodes in decreasing ``bound`` (an upper bound of each
    node's best class) until no unscanned node can beat the ``k``-th class found. Rows that
    would scan about as much as the dense product get the tighter bounds of
    :func:`hsoftmax.bounds.node_bounds` first, unless ``bound`` is already tight."""
    rows, n_top = bound.shape
    n_bottom = out.bottom_bias.shape[1]
    # Enough nodes to hold k classes; a tight bound tells where the best classes are, so that
    # k nodes (one per class at worst) give a threshold close to the final one.
    first = min(n_top, k if tight else -(-k // n_bottom))
    if _dense_is_cheaper(first, rows, n_top):
        return _dense_topk(out, hidden, top, k)
    scanned = bound.topk(first, dim=-1).indices
    values, positions = _scan_nodes(out, hidden, top, scanned, k)
    if k == 0:
        return values, positions
    # Unscanned nodes whose bound reaches the k-th class found may hold better classes (all
    # scanned nodes then reach it too). Rows are grouped by their number rounded up to a
    # power of two: each row scans at most twice the nodes it needs, in a few groups (never a
    # loop over rows or nodes).
    needed = (bound >= values[:, -1:]).sum(-1) - first
    extra = torch.where(needed > 0, _next_power_of_two(needed.clamp_min(1)), 0)
    extra = extra.clamp_max(n_top - first)
    heavy = []  # rows that scan about as much as the dense product: all in one pass
    lowest = torch.finfo(bound.dtype).min
    for count in extra.unique().tolist():
        if count == 0:
            continue
        group = torch.nonzero(extra == count).squeeze(1)
        if _dense_is_cheaper(first + count, group.shape[0], n_top):
            heavy.append(group)
            continue
        # the scanned nodes last: below every other, even a bound of -inf
        rest = bound[group].clamp_min(lowest).scatter_(1, scanned[group], float("-inf"))
        more, where = _scan_nodes(out, hidden[group], top[group], rest.topk(count).indices, k)
        values[group], positions[group] = _best_of(
            [values[group], more], [positions[group], where], k
        )
    if heavy:
        group = torch.cat(heavy)
        h, t = hidden[group], top[group]
        if tight or group.shape[0] < _BOUND_ROWS or not bounds_apply(h):
            values[group], positions[group] = _dense_topk(out, h, t, k)
        else:
            tighter = node_bounds(out.bottom_weight, out.bottom_bias, out.slot_mask, h, t)
            values[group], positions[group] = _pruned_topk(out, h, t, tighter, k, tight=True)
    return values, positions


