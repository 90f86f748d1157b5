"""The reference path of the bottom layers: gather each sample's node rows, then ``baddbmm``.

This is the definition of the bottom logits. It uses public torch ops only, so it is
differentiable to any order and runs under ``torch.func`` transforms, ``torch.compile``,
export, the meta device and FSDP. With ``sparse=True`` the rows are gathered by a small
autograd function whose gradient is a sparse COO tensor of the touched nodes (as
``nn.Embedding(sparse=True)`` gives), itself differentiable; under ``torch.func`` transforms and
in compiled graphs the gradient is dense. The CPU fast path that computes the same logits
without the gathered copy is :mod:`hsoftmax.fast_bottom`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .fastpaths import eager

__all__ = ["node_logits", "split_parameters"]


class _SparseRows(torch.autograd.Function):
    """``weight.index_select(0, index)`` whose gradient is a sparse COO tensor of rows."""

    @staticmethod
    def forward(weight: Tensor, index: Tensor) -> Tensor:
        return weight.index_select(0, index)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        weight, index = inputs
        ctx.shape = weight.shape
        ctx.save_for_backward(index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        grad_rows = torch.sparse_coo_tensor(
            index.unsqueeze(0), grad, ctx.shape, check_invariants=False
        )
        return grad_rows, None


def _rows(weight: Tensor, index: Tensor, sparse: bool) -> Tensor:
    if sparse and eager():
        return _SparseRows.apply(weight, index)
    return weight.index_select(0, index)


def node_logits(
    weight: Tensor, bias: Tensor, hidden: Tensor, nodes: Tensor, sparse: bool = False
) -> Tensor:
    """Bottom logits of chosen nodes: ``weight[nodes] @ hidden + bias[nodes]``.

    Args:
        weight: ``(n_top, n_bottom, hidden)`` the bottom weights.
        bias: ``(n_top, n_bottom)`` the bottom biases.
        hidden: ``(N, hidden)`` one vector per row.
        nodes: ``(N, m)`` int64 node ids per row.
        sparse: give ``weight`` and ``bias`` sparse COO gradients (in eager mode). Default:
            ``False``.

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
    n, m = nodes.shape
    n_bottom, width = weight.shape[1:]  # explicit sizes: n may be 0
    flat = nodes.reshape(-1)
    rows = _rows(weight, flat, sparse).view(n, m * n_bottom, width)
    row_bias = _rows(bias, flat, sparse).view(n, 1, m * n_bottom)
    logits = torch.baddbmm(row_bias, hidden.unsqueeze(1), rows.transpose(1, 2))
    return logits.view(n, m, n_bottom)


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
        if bool(getattr(module, "sparse", False)) and hasattr(module, "bottom_weight")
        for parameter in (module.bottom_weight, module.bottom_bias)
    }
    dense: list[nn.Parameter] = []
    sparse: list[nn.Parameter] = []
    for parameter in model.parameters():
        (sparse if id(parameter) in sparse_ids else dense).append(parameter)
    return dense, sparse
