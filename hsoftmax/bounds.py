"""Upper bounds of the log-probability of each node's best class, for the exact top-k.

A class ``c`` of node ``n`` has log-probability ``top_n + l_c - logsumexp_n(l)``. With the
node's largest logit ``m`` and the mean ``a`` of its ``v`` valid logits,
``logsumexp >= m`` and, by Jensen's inequality, ``logsumexp >= a + log v``, so its best class
has log-probability at most ``top_n + m - max(m, a + log v)``. The bound is tight where the
node's softmax is flat, as at initialisation, exactly where ``top_n`` alone bounds nothing.
It needs every logit, but no exponential and no top-k, and the largest logits may come from a
cheaper approximate product as long as its error is bounded: with ``m`` off by at most ``e``,
the bound becomes ``top_n + m + e - max(m - e, a + log v)``.

Here the largest logits come from an int8 product (oneDNN's on the CPU, several times as fast
as float32), exact in integers, whose rounding error is bounded from the scales; the mean
logits are exact, from each node's mean weights.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .recycling import recycled_empty

__all__ = ["int8_bounds_apply", "node_bounds"]


@functools.cache
def _int8_products_work() -> bool:
    """Whether this build of torch multiplies int8 matrices on the CPU, with oneDNN, and gets a
    small product right (checked once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch, "_int_mm")):
        return False
    a = torch.arange(-127, 129, 2, dtype=torch.int8).view(16, 8)
    b = a.flip(0)[:, [3, 1, 4, 1, 5, 0, 2, 6]]
    try:
        return torch.equal(torch._int_mm(a, b.T).long(), a.long() @ b.long().T)
    except RuntimeError:
        return False


#: int32 sums of ``K`` products of int8 values within ``+-127`` cannot overflow.
_MAX_COLUMNS = (2**31 - 1) // 127**2


def int8_bounds_apply(hidden: Tensor) -> bool:
    """Whether :func:`node_bounds` can run for these hidden vectors: float32 or float64 on the
    CPU, with oneDNN."""
    return (
        hidden.device.type == "cpu"
        and hidden.dtype in (torch.float32, torch.float64)
        and hidden.shape[-1] + 1 <= _MAX_COLUMNS
        and _int8_products_work()
    )


def _mean_logits(
    weight: Tensor, bias: Tensor, slot_mask: Tensor | None, hidden: Tensor
) -> Tensor:
    """``(N, n_top)`` mean logit of each node over its valid slots: the product with the
    nodes' mean weights and bias."""
    if slot_mask is None:
        return F.linear(hidden, weight.mean(1), bias.mean(1))
    share = slot_mask.to(weight.dtype)
    share = share / share.sum(-1, keepdim=True).clamp_min(1)
    mean_weight = torch.bmm(share.unsqueeze(1), weight).squeeze(1)
    return F.linear(hidden, mean_weight, (share * bias).sum(-1))


def _largest_logits(
    weight: Tensor, bias: Tensor, slot_mask: Tensor | None, hidden: Tensor, blocks: list[slice]
) -> tuple[Tensor, Tensor]:
    """``(N, n_top)`` largest logit of each node over its valid slots, from an int8 product by
    blocks of nodes ``blocks``, and a bound of its error.

    The bias is a last column of the weights (``hidden`` gets a column of ones). With
    ``h = s q + dh`` and ``w = t r + dw`` (int8 ``q`` and ``r``, a scale per row of ``hidden``
    and per node, ``|dw| <= t / 2`` in each of the ``K`` columns),
    ``|h . w - s t q . r| = |h . dw + dh . t r| <= t / 2 |h|_1 + |dh|_2 (|w|_2 + t / 2 sqrt K)``.
    """
    rows = hidden.shape[0]
    n_top, n_bottom, width = weight.shape
    columns = width + 1
    extended = torch.cat([hidden, hidden.new_ones(rows, 1)], 1)
    h_scale = extended.abs().amax(1, keepdim=True) / 127  # at least 1 / 127 (the ones)
    h_rounded = torch.round(extended / h_scale)
    h_error, h_int8 = extended - h_rounded * h_scale, h_rounded.to(torch.int8)
    w_scale = torch.maximum(weight.amax((1, 2)), weight.amin((1, 2)).neg_())
    w_scale = torch.maximum(w_scale, bias.abs().amax(1))
    w_scale = w_scale.clamp_min_(torch.finfo(w_scale.dtype).tiny).div_(127)
    inverse = w_scale.reciprocal()[:, None]
    bias_int8 = torch.round(bias * inverse).to(torch.int8)
    step = blocks[0].stop - blocks[0].start
    rounded = recycled_empty(weight, "rounded rows", (step, n_bottom, width), weight.dtype)
    w_int8 = recycled_empty(weight, "int8 rows", (step, n_bottom, columns), torch.int8)
    products = recycled_empty(weight, "int8 products", (step * n_bottom, rows), torch.int32)
    largest = torch.empty(n_top, rows, dtype=torch.int32)
    for nodes in blocks:
        n = nodes.stop - nodes.start
        torch.mul(weight[nodes], inverse[nodes, :, None], out=rounded[:n]).round_()
        w_int8[:n, :, :width], w_int8[:n, :, width] = rounded[:n], bias_int8[nodes]
        logits = torch._int_mm(
            w_int8[:n].view(-1, columns), h_int8.T, out=products[: n * n_bottom]
        ).view(n, n_bottom, rows)
        if slot_mask is not None:
            logits.masked_fill_(~slot_mask[nodes, :, None], torch.iinfo(torch.int32).min)
        torch.amax(logits, 1, out=largest[nodes])
    w_size = torch.hypot(torch.linalg.vector_norm(weight, dim=-1), bias).amax(-1)
    w_size += w_scale * (math.sqrt(columns) / 2)
    h_size, h_error_size = extended.abs().sum(1), torch.linalg.vector_norm(h_error, dim=1)
    error = torch.outer(h_size, w_scale / 2) + torch.outer(h_error_size, w_size)
    largest_logits = largest.T.to(hidden.dtype) * h_scale * w_scale
    return largest_logits, error * (1 + 2**-10)  # the margin covers float rounding


@torch.no_grad()
def node_bounds(
    weight: Tensor,
    bias: Tensor,
    slot_mask: Tensor | None,
    hidden: Tensor,
    top: Tensor,
    blocks: list[slice],
) -> Tensor:
    """Upper bounds of the log-probability of each node's best class (see the module).

    Args:
        weight: ``(n_top, n_bottom, hidden)`` bottom weights.
        bias: ``(n_top, n_bottom)`` bottom biases.
        slot_mask: ``(n_top, n_bottom)`` bool, ``True`` where a slot holds a class, or ``None``.
        hidden: ``(N, hidden)`` hidden vectors, float32 or float64, on the CPU (see
            :func:`int8_bounds_apply`).
        top: ``(N, n_top)`` top log-probabilities (``-inf`` for empty nodes).
        blocks: consecutive slices of the nodes, of equal length but the last.

    Returns:
        ``(N, n_top)`` bounds, in ``top``'s dtype: no class of node ``n`` has a larger
        log-probability than ``bounds[:, n]``, up to float rounding of the exact values.
    """
    n_bottom = bias.shape[1]
    if slot_mask is None:
        log_count: Tensor | float = math.log(n_bottom)
    else:
        log_count = slot_mask.sum(-1).clamp_min(1).to(hidden.dtype).log()
    largest, error = _largest_logits(weight, bias, slot_mask, hidden, blocks)
    mean = _mean_logits(weight, bias, slot_mask, hidden)
    lower = torch.maximum(largest - error, mean + log_count)
    return top + (largest + error - lower).to(top.dtype)
