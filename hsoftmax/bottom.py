"""The bottom layers' per-node products, with gradients that cost only the nodes a batch uses.

A training step touches at most ``batch`` nodes of ``bottom_weight`` (``n_top x n_bottom x
hidden``). :func:`node_logits` takes each sample's dot products with its nodes' rows where they
lie, with no gathered copy (the per-sample dot-product kernel of ``embedding_bag``). Its backward
reads the rows in place once more for the hidden vectors' gradient (``embedding_bag`` with
per-sample weights) and builds the rows' gradients by broadcasting. The gradient of
``bottom_weight`` is:

- sparse COO (``sparse_dim=1``, one entry per touched node, coalesced) with ``sparse=True``,
  for :class:`~hsoftmax.SparseRowAdamW` or :class:`torch.optim.SparseAdam` (see
  :func:`split_parameters`), in the spirit of ``nn.Embedding(sparse=True)``: the whole step then
  costs ``O(batch)``, not ``O(classes)``;
- otherwise dense, as for ``index_select``; when the parameter already holds a dense ``.grad``
  (``optimizer.zero_grad(set_to_none=False)``) the rows are added into it in place, which
  spares zero-filling a fresh gradient of the full size every step.

In half precision and under autocast, in compiled, traced or exported graphs, and under
``torch.func`` transforms, the rows are gathered and multiplied by ``baddbmm`` under plain
autograd instead: every path of the head then rounds alike, and every op has a derivative and an
export rule. Large work tensors are reused across steps on the CPU (:mod:`hsoftmax.recycling`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .recycling import recycled_empty

__all__ = ["node_logits", "split_parameters"]


_FULL_PRECISION = (torch.float32, torch.float64)
#: ``out[i] = grad[bag[i]] . weight[index[i]]``: a private aten op (embedding_bag's gradient for
#: per-sample weights), so looked up once, with the gathered product as the fallback.
_PER_SAMPLE_DOTS = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)


def _eager() -> bool:
    """Whether ops without a derivative or export rule may run: not compiling, not tracing, and
    no ``torch.func`` transform (which needs a ``setup_context``, slower on every call)."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
    )


def _gathered_logits(weight: Tensor, bias: Tensor, hidden: Tensor, nodes: Tensor) -> Tensor:
    """Differentiable and traceable: gather the rows, then ``baddbmm``. ``(N, m, n_bottom)``."""
    n, m = nodes.shape
    n_bottom, width = weight.shape[1:]  # explicit sizes: n may be 0
    flat = nodes.reshape(-1)
    rows = weight.index_select(0, flat).view(n, m * n_bottom, width)
    row_bias = bias.index_select(0, flat).view(n, 1, m * n_bottom)
    return torch.baddbmm(row_bias, hidden.unsqueeze(1), rows.transpose(1, 2)).view(n, m, n_bottom)


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
    """Each sample's dot products with its nodes' rows, read in place: no gathered copy.
    In half precision or under autocast, the gathered product, rounded as every other path of
    the head rounds it."""
    low_precision = weight.dtype not in _FULL_PRECISION
    if low_precision or _PER_SAMPLE_DOTS is None or torch.is_autocast_enabled(hidden.device.type):
        return _gathered_logits(weight, bias, hidden, nodes)
    n, m = nodes.shape
    n_bottom, width = weight.shape[1:]
    dots = _PER_SAMPLE_DOTS(
        hidden.to(weight.dtype), weight.reshape(-1, width), slots.rows, slots.offsets,
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
        ctx: Any,
        weight: Tensor,
        bias: Tensor,
        hidden: Tensor,
        nodes: Tensor,
        slots: _Slots,
        sparse: bool,
    ) -> Tensor:
        ctx.save_for_backward(weight, hidden, nodes)  # weight: autograd checks its version
        ctx.slots, ctx.bias, ctx.sparse = slots, bias, sparse  # bias: only its .grad is read
        return _dot_logits(weight, bias, hidden, nodes, slots)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, hidden, nodes = ctx.saved_tensors
        bias, slots = ctx.bias, ctx.slots
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
                per_sample_weights=grad.reshape(-1).to(weight.dtype),
            ).to(hidden.dtype)

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
            grad_bias = _sparse_gradient(bias, where, lambda j, _: per_node[j].to(bias.dtype))
        elif ctx.needs_input_grad[1]:
            grad_bias = _dense_gradient(bias, flat, per_node.to(bias.dtype))
        return grad_weight, grad_bias, grad_hidden, None, None, None


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
    if not _eager():
        return _gathered_logits(weight, bias, hidden, nodes)
    slots = _slots(nodes, weight.shape[1])
    if tracked:
        return _NodeLogits.apply(weight, bias, hidden, nodes, slots, sparse)
    return _dot_logits(weight, bias, hidden, nodes, slots)


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
