"""Gradients of the bottom layers that cost the rows a batch touches, not the whole layer.

A training step touches at most ``batch`` nodes of ``bottom_weight``, yet a dense gradient and a
dense optimizer step cost its full size (``n_top * n_bottom * hidden``). With
``HierarchicalSoftmax(..., sparse=True)`` the bottom weights and biases receive sparse COO
gradients holding only the touched nodes, so that an optimizer for sparse gradients
(:class:`torch.optim.SparseAdam`) updates those rows alone and the step cost grows with the batch,
not with the number of classes. Dense training gets the same economy in the backward when the
parameters keep their dense ``.grad`` between steps (``zero_grad(set_to_none=False)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["gather_rows", "split_parameters"]


class _GatherRows(torch.autograd.Function):
    """``weight.index_select(0, index)`` whose gradient for ``weight`` holds only the rows used.

    The gradient is a sparse COO tensor if ``sparse``, or if ``weight`` already holds a dense
    ``.grad`` (``optimizer.zero_grad(set_to_none=False)``): autograd then adds it into that
    ``.grad`` in place, at a cost that grows with the batch, not with ``weight``. Otherwise it
    is a dense tensor, exactly as for ``index_select``.
    """

    @staticmethod
    def forward(weight: Tensor, index: Tensor, sparse: bool) -> Tensor:
        return weight.index_select(0, index)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, bool], output: Tensor) -> None:
        weight, index, sparse = inputs
        ctx.save_for_backward(index)
        ctx.weight = weight
        ctx.sparse = sparse

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (index,) = ctx.saved_tensors
        weight = ctx.weight
        accumulated = weight.grad is not None and weight.grad.layout == torch.strided
        if ctx.sparse or accumulated:
            rows = torch.sparse_coo_tensor(
                index.unsqueeze(0), grad, weight.shape, check_invariants=False
            )
            return rows, None, None
        return grad.new_zeros(weight.shape).index_add_(0, index, grad), None, None


def gather_rows(weight: Tensor, index: Tensor, sparse: bool = False) -> Tensor:
    """``weight.index_select(0, index)`` with a gradient that costs only the rows used.

    With ``sparse=True`` the gradient of ``weight`` is a sparse COO tensor (``sparse_dim=1``).
    With ``sparse=False`` it is dense, but when ``weight`` already holds a dense ``.grad`` (kept
    by ``optimizer.zero_grad(set_to_none=False)``) the rows are added into it in place instead
    of building a fresh zero-filled gradient of the full size every step. Under
    ``torch.compile`` this is plain ``index_select``.

    Args:
        weight: ``(R, *)`` tensor.
        index: ``(N,)`` int64 row ids.
        sparse: give ``weight`` a sparse COO gradient. Default: ``False``.

    Returns:
        ``(N, *)`` the selected rows.

    Example:
        >>> import torch
        >>> weight = torch.ones(5, 2, requires_grad=True)
        >>> gather_rows(weight, torch.tensor([1, 3, 1]), sparse=True).sum().backward()
        >>> weight.grad.is_sparse, weight.grad.to_dense()[:, 0].tolist()
        (True, [0.0, 2.0, 0.0, 1.0, 0.0])
    """
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and weight.requires_grad):
        return weight.index_select(0, index)
    return _GatherRows.apply(weight, index, sparse)


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
