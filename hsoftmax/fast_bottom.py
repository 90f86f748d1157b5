"""A CPU fast path of the bottom layers: the same logits as :func:`hsoftmax.bottom.node_logits`,
with no gathered copy of the rows.

A training step touches at most ``batch`` nodes of ``bottom_weight``. Here each sample's dot
products with its nodes' rows are taken where the rows lie (the per-sample dot-product kernel of
``embedding_bag``), and the backward reads the rows in place once more for the hidden vectors'
gradient (``embedding_bag`` with per-sample weights) and builds the rows' gradients by
broadcasting. The gradient of ``bottom_weight`` is dense for a dense head (added into a reused
buffer, see :mod:`hsoftmax.recycling`), and sparse COO with one coalesced entry per touched node
for ``sparse=True``.

It applies (:func:`applies`) in eager mode on the CPU, in float32 or float64, outside autocast,
and runs where :func:`hsoftmax.fastpaths.measured_faster` found it faster than the reference for
calls of that size. Its backward is differentiable: under ``create_graph=True`` (a double
backward, ``torch.autograd.functional.hessian``) it differentiates the reference path instead.
The contract tests run every test of the bottom layers on both paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from . import bottom, fastpaths
from .recycling import recycled_empty

__all__ = ["applies", "chosen", "node_logits"]

#: ``out[i] = grad[bag[i]] . weight[index[i]]``: a private aten op (embedding_bag's gradient for
#: per-sample weights), so looked up once; without it this path does not apply.
_PER_SAMPLE_DOTS = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)


def applies(weight: Tensor, hidden: Tensor) -> bool:
    """Whether this path computes the call exactly as the reference does: eager mode, CPU,
    float32 or float64 throughout, no autocast."""
    return (
        _PER_SAMPLE_DOTS is not None
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.float64)
        and hidden.dtype == weight.dtype
        and not torch.is_autocast_enabled("cpu")
        and fastpaths.eager()
    )


def _tracked(weight: Tensor, bias: Tensor, hidden: Tensor) -> bool:
    return torch.is_grad_enabled() and (
        weight.requires_grad or bias.requires_grad or hidden.requires_grad
    )


def _timed_call(
    logits_of: Callable[..., Tensor],
    weight: Tensor,
    bias: Tensor,
    hidden: Tensor,
    nodes: Tensor,
    sparse: bool,
) -> Callable[[], object]:
    """One call of ``logits_of`` on aliases of the arguments, with its backward when tracked,
    that leaves no trace on them (no ``.grad``, no graph, no hook). The aliases are made when
    it runs: most calls only build it."""
    tracked = _tracked(weight, bias, hidden)

    def run() -> object:
        inputs = (weight, bias, hidden)
        aliases = [t.detach().requires_grad_(tracked and t.requires_grad) for t in inputs]
        wanted = [t for t in aliases if t.requires_grad]
        with torch.set_grad_enabled(tracked):
            logits = logits_of(*aliases, nodes, sparse)
            if not tracked:
                return logits
            return torch.autograd.grad(logits, wanted, torch.ones_like(logits))

    return run


def chosen(weight: Tensor, bias: Tensor, hidden: Tensor, nodes: Tensor, sparse: bool) -> bool:
    """Whether this path runs for the call: it applies, and was measured faster than the
    reference for calls of this kind (see :func:`hsoftmax.fastpaths.measured_faster`)."""
    if not applies(weight, hidden):
        return False
    needs = tuple(t.requires_grad for t in (weight, bias, hidden))
    key = (
        "bottom", weight.dtype, tuple(weight.shape), fastpaths.size_bucket(nodes.shape[0]),
        nodes.shape[1], sparse, _tracked(weight, bias, hidden) and needs,
    )
    return fastpaths.measured_faster(
        key,
        _timed_call(node_logits, weight, bias, hidden, nodes, sparse),
        _timed_call(bottom.node_logits, weight, bias, hidden, nodes, sparse),
    )


class _Slots(NamedTuple):
    """The ``rows`` of ``weight.view(-1, hidden)`` that the chosen nodes hold, ``m * n_bottom``
    per sample, the ``sample`` of each and each sample's first position (``offsets``), in the
    form ``embedding_bag`` takes."""

    rows: Tensor
    sample: Tensor
    offsets: Tensor


def _slots(nodes: Tensor, n_bottom: int) -> _Slots:
    n, m = nodes.shape
    slot = torch.arange(n_bottom, device=nodes.device)
    rows = (nodes.unsqueeze(-1) * n_bottom + slot).reshape(-1)
    samples = torch.arange(n, device=nodes.device)
    return _Slots(rows, samples.repeat_interleave(m * n_bottom), samples * (m * n_bottom))


def _dot_logits(
    weight: Tensor, bias: Tensor, hidden: Tensor, nodes: Tensor, slots: _Slots
) -> Tensor:
    """Each sample's dot products with its nodes' rows, read in place: no gathered copy."""
    n, m = nodes.shape
    n_bottom, width = weight.shape[1:]
    assert _PER_SAMPLE_DOTS is not None  # checked by applies()
    dots = _PER_SAMPLE_DOTS(
        hidden, weight.reshape(-1, width), slots.rows, slots.offsets,
        slots.sample, 0, -1,  # mode 0: sum; no padding index
    ).view(n, m, n_bottom)
    return dots.add_(bias.index_select(0, nodes.reshape(-1)).view(n, m, n_bottom))


class _Distinct(NamedTuple):
    """Where the distinct values of an index sit: ``values`` sorted, the ``first`` position of
    each, each position's value number (``inverse``) and the positions that repeat a value."""

    values: Tensor
    first: Tensor
    inverse: Tensor
    repeats: Tensor


def _distinct(index: Tensor) -> _Distinct:
    """Where the distinct values of the 1-d ``index`` sit."""
    values, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(values, index.numel()).scatter_reduce_(0, inverse, positions, "amin")
    repeats = (positions != first[inverse]).nonzero().squeeze(1)
    return _Distinct(values, first, inverse, repeats)


def _sparse_gradient(
    parameter: Tensor, where: _Distinct, rows_of: Callable[[Tensor, str], Tensor]
) -> Tensor:
    """The sparse gradient of ``parameter`` when position ``j`` of the index that ``where``
    describes received ``rows_of(j, purpose)``. It comes coalesced, so that an optimizer reads
    each row once; only the repeated positions are computed apart from the distinct ones."""
    repeats = rows_of(where.repeats, "repeats")
    summed = rows_of(where.first, "rows").index_add_(0, where.inverse[where.repeats], repeats)
    grad = torch.sparse_coo_tensor(
        where.values.unsqueeze(0), summed, parameter.shape, check_invariants=False
    )
    return grad._coalesced_(True)


def _dense_gradient(parameter: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """The dense gradient of ``parameter`` whose rows ``index[j]`` received ``rows[j]``, in a
    buffer reused across steps once nothing else holds it."""
    zeros = recycled_empty(parameter, "gradient", parameter.shape, rows.dtype).zero_()
    return zeros.index_add_(0, index, rows)


class _NodeLogits(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        weight: Tensor,
        bias: Tensor,
        hidden: Tensor,
        nodes: Tensor,
        slots: _Slots,
        sparse: bool,
    ) -> Tensor:
        ctx.save_for_backward(weight, bias, hidden, nodes)
        ctx.slots, ctx.sparse = slots, sparse
        return _dot_logits(weight, bias, hidden, nodes, slots)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, bias, hidden, nodes = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            return _reference_backward(ctx, (weight, bias, hidden), nodes, grad)
        slots = ctx.slots
        n, m = nodes.shape  # explicit sizes: n may be 0
        n_bottom, width = weight.shape[1:]
        flat = nodes.reshape(-1)
        per_node = grad.reshape(n * m, n_bottom)  # row j: node flat[j] of sample j // m
        # row j: the hidden vector of sample j // m (a view when m == 1)
        hidden_rows = hidden.unsqueeze(1).expand(n, m, width).reshape(n * m, width)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:  # sum over slots of grad * row, the rows read in place
            grad_hidden = F.embedding_bag(
                slots.rows, weight.reshape(-1, width), slots.offsets, mode="sum",
                per_sample_weights=grad.reshape(-1),
            )

        def outer(j: Tensor | None, purpose: str = "rows") -> Tensor:
            """The gradients of the rows ``j`` (all when ``None``): ``grad x hidden``."""
            g, h = (per_node, hidden_rows) if j is None else (per_node[j], hidden_rows[j])
            out = recycled_empty(weight, purpose, (g.shape[0], n_bottom, width), weight.dtype)
            return torch.mul(g.unsqueeze(2), h.unsqueeze(1), out=out)

        where = _distinct(flat) if ctx.sparse else None
        if ctx.needs_input_grad[0] and where is not None:
            grad_weight = _sparse_gradient(weight, where, outer)
        elif ctx.needs_input_grad[0]:
            grad_weight = _dense_gradient(weight, flat, outer(None))
        if ctx.needs_input_grad[1] and where is not None:
            grad_bias = _sparse_gradient(bias, where, lambda j, _: per_node[j])
        elif ctx.needs_input_grad[1]:
            grad_bias = _dense_gradient(bias, flat, per_node)
        return grad_weight, grad_bias, grad_hidden, None, None, None


def _reference_backward(
    ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], nodes: Tensor, grad: Tensor
) -> tuple[Tensor | None, ...]:
    """The gradients as the reference path gives them, themselves differentiable."""
    needs = ctx.needs_input_grad[:3]
    wanted = [t for t, need in zip(inputs, needs) if need]
    logits = bottom.node_logits(*inputs, nodes, ctx.sparse)
    grads = iter(torch.autograd.grad(logits, wanted, grad, create_graph=True))
    return (*(next(grads) if need else None for need in needs), None, None, None)


def node_logits(
    weight: Tensor, bias: Tensor, hidden: Tensor, nodes: Tensor, sparse: bool = False
) -> Tensor:
    """:func:`hsoftmax.bottom.node_logits`, computed in place (see the module). Call it only
    where :func:`applies` holds."""
    slots = _slots(nodes, weight.shape[1])
    if _tracked(weight, bias, hidden):
        return _NodeLogits.apply(weight, bias, hidden, nodes, slots, sparse)
    return _dot_logits(weight, bias, hidden, nodes, slots)
