"""Upper bounds of the log-probability of each node's best class, for the exact top-k.

A class ``c`` of node ``n`` has log-probability ``top_n + l_c - logsumexp_n(l)``. With the
node's largest logit ``m`` and the mean ``a`` of its ``v`` valid logits,
``logsumexp >= m`` and, by Jensen's inequality, ``logsumexp >= a + log v``, so its best class
has log-probability at most ``top_n + m - max(m, a + log v)``. The bound is tight where the
node's softmax is flat, as at initialisation, exactly where ``top_n`` alone bounds nothing.
It needs every logit, but no exponential and no top-k, and the largest logits may come from a
cheaper approximate product as long as its error is bounded: with ``m`` off by at most ``e``,
the bound becomes ``top_n + m + e - max(m - e, a + log v)``.

The largest logits come from an int8 product where this machine multiplies int8 matrices at
least twice as fast as float32 ones (measured once per process): it is exact in integers, and
its rounding error is bounded from the scales. Elsewhere they come from the float product by
blocks of nodes, each block's maximum taken while it is in cache, with its rounding error
bounded. The mean logits come from each node's mean weights.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import fastpaths
from .recycling import recycled_empty

__all__ = ["bounds_apply", "node_bounds"]


@functools.cache
def _int8_products_correct() -> bool:
    """Whether this build of torch multiplies int8 matrices on the CPU and gets a small product
    right (checked once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch, "_int_mm")):
        return False
    a = torch.arange(-127, 129, 2, dtype=torch.int8).view(16, 8)
    b = a.flip(0)[:, [3, 1, 4, 1, 5, 0, 2, 6]]
    try:
        return torch.equal(torch._int_mm(a, b.T).long(), a.long() @ b.long().T)
    except RuntimeError:
        return False


#: The int8 product must take at most this share of the float32 one's time for the bounds to
#: pay: they add the quantisation of every weight, and a scan, to the product.
_INT8_SHARE = 0.5


def _int8_products_fast() -> bool:
    """Whether int8 products are correct and measured at least twice as fast as float32 ones on
    this machine (timed once per process, on a product the size of a block of the bounds).
    Some CPUs have no fast int8 instructions: an AVX2-only AMD EPYC multiplies int8 17x more
    slowly than float32."""
    if not _int8_products_correct():
        return False
    columns = 136
    q = torch.ones(2048, columns, dtype=torch.int8)
    h = torch.ones(256, columns, dtype=torch.int8)
    qf, hf = q.float(), h.float()
    return fastpaths.measured_faster(
        "int8 products",
        lambda: [torch._int_mm(q, h.T) for _ in range(int(1 / _INT8_SHARE))],
        lambda: torch.mm(qf, hf.T),
    )


#: Nodes are taken in blocks whose int32 products have about this many entries.
_BLOCK_ENTRIES = 2**21

#: int32 sums of ``K`` products of int8 values within ``+-127`` cannot overflow.
_MAX_COLUMNS = (2**31 - 1) // 127**2


def bounds_apply(hidden: Tensor) -> bool:
    """Whether :func:`node_bounds` runs for these hidden vectors: float32 or float64, CPU."""
    return hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.float64)


def _share(slot_mask: Tensor | None, like: Tensor) -> Tensor | None:
    """``(n_top, 1, n_bottom)`` weights of the mean over each node's valid slots (``None``: all
    slots are valid)."""
    if slot_mask is None:
        return None
    share = slot_mask.to(like.dtype).unsqueeze(1)
    return share / share.sum(-1, keepdim=True).clamp_min(1)


def _mean_logits(weight: Tensor, bias: Tensor, slot_mask: Tensor | None, hidden: Tensor) -> Tensor:
    """``(n_top, N)`` the mean logit of each node over its valid slots."""
    share = _share(slot_mask, weight)
    if share is None:
        mean_weight, mean_bias = weight.mean(1), bias.mean(1)
    else:
        mean_weight = torch.bmm(share, weight).squeeze(1)
        mean_bias = (share.squeeze(1) * bias).sum(-1)
    mean = recycled_empty(weight, "mean logits", (weight.shape[0], hidden.shape[0]), hidden.dtype)
    return torch.addmm(mean_bias[:, None], mean_weight, hidden.T, out=mean)


def _float_node_logits(
    weight: Tensor, bias: Tensor, slot_mask: Tensor | None, hidden: Tensor, step: int
) -> tuple[Tensor, Tensor]:
    """``(n_top, N)`` largest logit of each node over its valid slots, from a float product by
    blocks of ``step`` nodes (each block's maximum taken while it is in cache), and a bound of
    its rounding error and of the other products': ``K u / (1 - K u) |w|_2 |h|_2`` for sums of
    ``K`` products with unit roundoff ``u``, four times over."""
    rows = hidden.shape[0]
    n_top, n_bottom, width = weight.shape
    flat_weight, flat_bias = weight.reshape(-1, width), bias.reshape(-1, 1)
    products = recycled_empty(weight, "float products", (step * n_bottom, rows), hidden.dtype)
    largest = recycled_empty(weight, "float largest", (n_top, rows), hidden.dtype)
    for start in range(0, n_top, step):
        nodes = slice(start, min(start + step, n_top))
        n, positions = nodes.stop - start, slice(start * n_bottom, nodes.stop * n_bottom)
        logits = torch.addmm(
            flat_bias[positions], flat_weight[positions], hidden.T, out=products[: n * n_bottom]
        ).view(n, n_bottom, rows)
        if slot_mask is not None:
            logits.masked_fill_(~slot_mask[nodes, :, None], float("-inf"))
        torch.amax(logits, 1, out=largest[nodes])
    unit = torch.finfo(hidden.dtype).eps / 2
    gamma = 4 * (width + 1) * unit / (1 - (width + 1) * unit)
    w_size = torch.hypot(torch.linalg.vector_norm(weight, dim=-1), bias).amax(-1)
    h_size = torch.hypot(torch.linalg.vector_norm(hidden, dim=-1), hidden.new_ones(()))
    return largest, torch.outer(w_size * gamma, h_size)


def _int8_node_logits(
    weight: Tensor, bias: Tensor, slot_mask: Tensor | None, hidden: Tensor, step: int
) -> tuple[Tensor, Tensor]:
    """``(n_top, N)`` largest logit of each node over its valid slots, from an int8 product by
    blocks of ``step`` nodes, and a bound of its error.

    The bias is a last column of the weights (``hidden`` gets a column of ones). With
    ``h = s q + dh`` and ``w = t r + dw`` (int8 ``q`` and ``r``, a scale per row of ``hidden``
    and per node, ``|dw| <= t / 2`` in each of the ``K`` columns),
    ``|h . w - s t q . r| = |h . dw + dh . t r| <= t / 2 |h|_1 + |dh|_2 (|w|_2 + t / 2 sqrt K)``.
    """
    rows = hidden.shape[0]
    n_top, n_bottom, width = weight.shape
    columns = width + 1
    extended = torch.cat([hidden, hidden.new_ones(rows, 1)], 1)
    h_size = extended.abs()
    h_scale = h_size.amax(1) / 127  # at least 1 / 127 (the ones)
    h_size = h_size.sum(1)
    h_rounded = torch.round(extended / h_scale[:, None])
    h_error, h_int8 = extended - h_rounded * h_scale[:, None], h_rounded.to(torch.int8)
    w_scale, w_size = weight.new_empty(n_top), weight.new_empty(n_top)
    blocks = [slice(start, min(start + step, n_top)) for start in range(0, n_top, step)]
    rounded = recycled_empty(weight, "rounded rows", (step, n_bottom, width), weight.dtype)
    w_int8 = recycled_empty(weight, "int8 rows", (step, n_bottom, columns), torch.int8)
    products = recycled_empty(weight, "int8 products", (step * n_bottom, rows), torch.int32)
    largest = recycled_empty(weight, "int8 largest", (n_top, rows), torch.int32)
    for nodes in blocks:
        n, block, block_bias = nodes.stop - nodes.start, weight[nodes], bias[nodes]
        scale = torch.maximum(block.amax((1, 2)), block.amin((1, 2)).neg_())
        scale = torch.maximum(scale, block_bias.abs().amax(1))
        w_scale[nodes] = scale.clamp_min_(torch.finfo(scale.dtype).tiny).div_(127)
        w_size[nodes] = torch.hypot(torch.linalg.vector_norm(block, dim=-1), block_bias).amax(-1)
        inverse = scale.reciprocal()[:, None]
        torch.mul(block, inverse[..., None], out=rounded[:n]).round_()
        w_int8[:n, :, :width], w_int8[:n, :, width] = rounded[:n], block_bias.mul(inverse).round_()
        logits = torch._int_mm(
            w_int8[:n].view(-1, columns), h_int8.T, out=products[: n * n_bottom]
        ).view(n, n_bottom, rows)
        if slot_mask is not None:
            logits.masked_fill_(~slot_mask[nodes, :, None], torch.iinfo(torch.int32).min)
        torch.amax(logits, 1, out=largest[nodes])
    shape, dtype = (n_top, rows), hidden.dtype
    w_size += w_scale * (math.sqrt(columns) / 2)
    h_error_size = torch.linalg.vector_norm(h_error, dim=1)
    error = torch.outer(w_scale / 2, h_size, out=recycled_empty(weight, "errors", shape, dtype))
    error.addr_(w_size, h_error_size).mul_(1 + 2**-10)  # the margin covers float rounding
    largest_logits = recycled_empty(weight, "largest logits", shape, dtype)
    torch.mul(largest, w_scale[:, None], out=largest_logits).mul_(h_scale)
    return largest_logits, error


@torch.no_grad()
def node_bounds(
    weight: Tensor,
    bias: Tensor,
    slot_mask: Tensor | None,
    hidden: Tensor,
    top: Tensor,
    nodes_per_block: int | None = None,
) -> Tensor:
    """Upper bounds of the log-probability of each node's best class (see the module).

    Args:
        weight: ``(n_top, n_bottom, hidden)`` bottom weights.
        bias: ``(n_top, n_bottom)`` bottom biases.
        slot_mask: ``(n_top, n_bottom)`` bool, ``True`` where a slot holds a class, or ``None``.
        hidden: ``(N, hidden)`` hidden vectors, float32 or float64, on the CPU.
        top: ``(N, n_top)`` top log-probabilities (``-inf`` for empty nodes).
        nodes_per_block: how many nodes each product takes. Default: about ``2**21``
            products per block.

    Returns:
        ``(N, n_top)`` bounds, in ``top``'s dtype: no class of node ``n`` has a larger
        log-probability than ``bounds[:, n]``, up to float rounding of the exact values.
    """
    n_bottom = bias.shape[1]
    step = nodes_per_block or max(1, _BLOCK_ENTRIES // max(1, hidden.shape[0] * n_bottom))
    if slot_mask is None:
        log_count: Tensor | float = math.log(n_bottom)
    else:
        log_count = slot_mask.sum(-1, keepdim=True).clamp_min(1).to(hidden.dtype).log()
    int8 = hidden.shape[-1] + 1 <= _MAX_COLUMNS and _int8_products_fast()
    largest_logits = _int8_node_logits if int8 else _float_node_logits
    largest, error = largest_logits(weight, bias, slot_mask, hidden, step)
    mean = _mean_logits(weight, bias, slot_mask, hidden)
    # top + m + e - max(m - e, a + log v) = top + min(2 e, m + e - a - log v), in place
    gap = mean.sub_(largest).sub_(error).add_(log_count).neg_()
    return top + torch.minimum(gap, error.mul_(2), out=gap).T.to(top.dtype)
