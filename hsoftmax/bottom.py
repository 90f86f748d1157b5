"""The bottom layers' per-node products, with gradients that cost only the nodes a batch uses.

A training step touches at most ``batch`` nodes of ``bottom_weight`` (``n_top x n_bottom x
hidden``). :func:`node_logits` computes the logits of chosen nodes from gathered rows, as row
vector products (several times faster on the CPU than ``bmm`` of matrix-vector products), and
its backward builds the rows' gradients by broadcasting. The gradient of ``bottom_weight`` is:

- sparse COO (``sparse_dim=1``, one entry per touched node, coalesced) with ``sparse=True``,
  for :class:`~hsoftmax.SparseRowAdamW` or :class:`torch.optim.SparseAdam` (see
  :func:`split_parameters`), in the spirit of ``nn.Embedding(sparse=True)``: the whole step then
  costs ``O(batch)``, not ``O(classes)``;
- otherwise dense, as for ``index_select``; when the parameter already holds a dense ``.grad``
  (``optimizer.zero_grad(set_to_none=False)``) the rows are added into it in place, which
  spares zero-filling a fresh gradient of the full size every step.

A dense backward overwrites the gathered rows with their gradients, so that a step holds one
``batch x n_bottom x hidden`` buffer at a time; a second backward through a retained graph
gathers the rows again. Large work tensors are reused across steps on the CPU
(:mod:`hsoftmax.recycling`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .recycling import recycled_empty

__all__ = ["node_logits", "split_parameters"]


def _gather(weight: Tensor, bias: Tensor, nodes: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``nodes`` ``(N, m)``: weights ``(N, m * n_bottom, hidden)``, biases
    ``(N, 1, m * n_bottom)``."""
    n, m = nodes.shape
    n_bottom, width = weight.shape[1:]  # explicit sizes: n may be 0
    flat = nodes.reshape(-1)
    if torch.is_grad_enabled():  # the differentiable plain path (compiled graphs): no out=
        rows = weight.index_select(0, flat)
    else:
        rows = recycled_empty(weight, "rows", (n * m, n_bottom, width), weight.dtype)
        torch.index_select(weight, 0, flat, out=rows)
    rows = rows.view(n, m * n_bottom, width)
    return rows, bias.index_select(0, flat).view(n, 1, m * n_bottom)


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
    parameter: Tensor, where: _Distinct, rows_of: Callable[[Tensor], Tensor]
) -> Tensor:
    """The sparse gradient of ``parameter`` when position ``j`` of the index that ``where``
    describes received ``rows_of(j)``. It comes coalesced, so that an optimizer reads each row
    once; only the repeated positions are computed apart from the distinct ones."""
    repeated = where.inverse[where.repeats]
    summed = rows_of(where.first).index_add_(0, repeated, rows_of(where.repeats))
    grad = torch.sparse_coo_tensor(
        where.values.unsqueeze(0), summed, parameter.shape, check_invariants=False
    )
    return grad._coalesced_(True)


def _dense_gradient(parameter: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """The gradient of ``parameter`` whose rows ``index[j]`` received ``rows[j]``."""
    if parameter.grad is not None and parameter.grad.layout == torch.strided:
        # autograd adds a sparse gradient into the kept dense .grad in place
        return torch.sparse_coo_tensor(
            index.unsqueeze(0), rows, parameter.shape, check_invariants=False
        )
    zeros = recycled_empty(parameter, "gradient", parameter.shape, rows.dtype).zero_()
    return zeros.index_add_(0, index, rows)


class _NodeLogits(torch.autograd.Function):
    @staticmethod
    def forward(
        weight: Tensor, bias: Tensor, hidden: Tensor, nodes: Tensor, sparse: bool
    ) -> tuple[Tensor, Tensor]:
        rows, row_bias = _gather(weight, bias, nodes)
        logits = torch.baddbmm(row_bias, hidden.unsqueeze(1), rows.transpose(1, 2))
        return logits.view(*nodes.shape, weight.shape[1]), rows

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        weight, bias, hidden, nodes, sparse = inputs
        ctx.save_for_backward(hidden, nodes)
        ctx.rows = output[1]  # not in saved_tensors: a dense backward overwrites it
        ctx.weight, ctx.bias, ctx.sparse, ctx.version = weight, bias, sparse, weight._version
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else each backward zero-fills a gradient for the rows

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None, None, None
        hidden, nodes = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        rows = ctx.rows if ctx.rows is not None else _gathered_again(ctx, nodes)
        n, m = nodes.shape  # explicit sizes: n may be 0
        n_bottom, width = weight.shape[1:]
        flat = nodes.reshape(-1)
        per_node = grad.reshape(n * m, n_bottom)  # row j: node flat[j] of sample j // m
        # row j: the hidden vector of sample j // m (a view when m == 1)
        hidden_rows = hidden.unsqueeze(1).expand(n, m, width).reshape(n * m, width)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_rows = grad.reshape(n, 1, m * n_bottom).to(rows.dtype)
            grad_hidden = torch.bmm(grad_rows, rows).squeeze(1).to(hidden.dtype)

        def outer(j: Tensor) -> Tensor:
            out = recycled_empty(weight, "outer", (j.numel(), n_bottom, width), weight.dtype)
            return torch.mul(per_node[j].unsqueeze(2), hidden_rows[j].unsqueeze(1), out=out)

        where = _distinct(flat) if ctx.sparse else None
        if ctx.needs_input_grad[0] and where is not None:
            grad_weight = _sparse_gradient(weight, where, outer)
        elif ctx.needs_input_grad[0]:
            ctx.rows = None  # the gathered rows are done with: they become the rows' gradients
            rows_grad = rows.view(n * m, n_bottom, width)
            torch.mul(per_node.unsqueeze(2), hidden_rows.unsqueeze(1), out=rows_grad)
            grad_weight = _dense_gradient(weight, flat, rows_grad)
        if ctx.needs_input_grad[1] and where is not None:
            grad_bias = _sparse_gradient(bias, where, lambda j: per_node[j].to(bias.dtype))
        elif ctx.needs_input_grad[1]:
            grad_bias = _dense_gradient(bias, flat, per_node.to(bias.dtype))
        return grad_weight, grad_bias, grad_hidden, None, None


def _gathered_again(ctx: Any, nodes: Tensor) -> Tensor:
    """The rows for a second backward through a retained graph (the first one reused them)."""
    if ctx.weight._version != ctx.version:
        raise RuntimeError(
            "bottom_weight was modified in place after the forward, so a second backward "
            "through this retained graph cannot recompute its rows; run the forward again"
        )
    return _gather(ctx.weight, ctx.bias, nodes)[0]


def node_logits(
    weight: Tensor, bias: Tensor, hidden: Tensor, nodes: Tensor, sparse: bool = False
) -> Tensor:
    """Bottom logits of chosen nodes: ``weight[nodes] @ hidden + bias[nodes]``, row by row.

    Args:
        weight: ``(n_top, n_bottom, hidden)`` the bottom weights.
        bias: ``(n_top, n_bottom)`` the bottom biases.
        hidden: ``(N, hidden)`` one vector per row.
        nodes: ``(N, m)`` int64 node ids per row.
        sparse: give ``weight`` and ``bias`` sparse COO gradients. Default: ``False``.

    Returns:
        ``(N, m, n_bottom)`` logits.

    Example:
        >>> import torch
        >>> weight = torch.randn(5, 3, 4, requires_grad=True)
        >>> logits = node_logits(weight, torch.zeros(5, 3), torch.randn(2, 4),
        ...                      torch.tensor([[1], [3]]), sparse=True)
        >>> logits.sum().backward()
        >>> logits.shape, weight.grad.is_sparse
        (torch.Size([2, 1, 3]), True)
    """
    tracked = torch.is_grad_enabled() and (
        weight.requires_grad or bias.requires_grad or hidden.requires_grad
    )
    if tracked and not torch.compiler.is_compiling():
        return _NodeLogits.apply(weight, bias, hidden, nodes, sparse)[0]
    return _NodeLogits.forward(weight, bias, hidden, nodes, sparse)[0]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a model's parameters into those with dense and those with sparse gradients.

    The sparse ones are the bottom weights and biases of every
    :class:`~hsoftmax.HierarchicalSoftmax` built with ``sparse=True``; give them to
    :class:`torch.optim.SparseAdam` and the rest to any dense optimizer.

    Args:
        model: any module, e.g. a backbone whose classifier was replaced.

    Returns:
        ``(dense, sparse)`` lists of parameters, each parameter once.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, 4, 5, 8, sparse=True)
        >>> dense, sparse = hsoftmax.split_parameters(head)
        >>> optimizers = [torch.optim.AdamW(dense), torch.optim.SparseAdam(sparse)]
        >>> len(dense), len(sparse)
        (4, 2)
    """
    sparse_ids = {
        id(parameter)
        for module in model.modules()
        if getattr(module, "sparse", False) is True and hasattr(module, "bottom_weight")
        for parameter in (module.bottom_weight, module.bottom_bias)
    }
    dense: list[nn.Parameter] = []
    sparse: list[nn.Parameter] = []
    for parameter in model.parameters():
        (sparse if id(parameter) in sparse_ids else dense).append(parameter)
    return dense, sparse
