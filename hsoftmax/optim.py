"""A lazy AdamW for the sparse row gradients of ``HierarchicalSoftmax(..., sparse=True)``."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SparseRowAdamW"]


#: Rows of at least this many elements are updated in place, as views, by one call of the fused
#: AdamW kernel on the CPU; smaller rows are cheaper to gather, update and scatter.
_MIN_VIEW_NUMEL = 1024

_Views = tuple[tuple[Tensor, ...], ...]  # per-row views of (parameter, exp_avg, exp_avg_sq)


def _pick(items: Sequence[Tensor], ids: list[int]) -> list[Tensor]:
    """``[items[i] for i in ids]``, selected in C rather than by a Python loop."""
    picked = operator.itemgetter(*ids)(items)
    return [picked] if len(ids) == 1 else list(picked)


def _summed_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows of a sparse COO gradient (``sparse_dim=1``) and their summed values."""
    index, values = grad._indices()[0], grad._values()
    if grad.is_coalesced() or bool((index[1:] > index[:-1]).all()):  # sorted, so distinct
        return index, values
    rows, inverse = torch.unique(index, return_inverse=True)
    summed = values.new_zeros(rows.shape[0], *values.shape[1:]).index_add_(0, inverse, values)
    return rows, summed


class SparseRowAdamW(torch.optim.Optimizer):
    """Lazy AdamW for parameters whose gradients are sparse COO tensors of rows.

    Only the rows present in a gradient are read and written: their moments are updated as in
    Adam, the decoupled weight decay ``lr * weight_decay`` shrinks them, and the rows that a
    step does not touch stay as they are, moments included (lazy Adam, as
    :class:`torch.optim.SparseAdam`; the bias corrections count the optimizer's steps). With
    ``weight_decay=0`` it takes the steps of :class:`torch.optim.SparseAdam` (but for ``eps``,
    added after the bias correction as in :class:`torch.optim.AdamW`) with far fewer passes
    over memory: a step costs ``O(rows touched)``.

    On the CPU rows of at least 1024 elements are updated in place by one call of
    torch's fused AdamW kernel on views of the touched rows, with no gather or scatter; other
    rows and devices are gathered, updated with vectorised ops and written back.

    Trade-off against dense AdamW: a row's moments do not decay while the row is not used, so a
    rarely used node keeps a stale, larger momentum; weight decay also reaches a row only when
    it is used.

    Args:
        params: parameters (or parameter groups) with sparse row gradients, e.g.
            ``hsoftmax.split_parameters(model)[1]``.
        lr: learning rate. Default: ``1e-3``.
        betas: coefficients of the running averages. Default: ``(0.9, 0.999)``.
        eps: added to the denominator. Default: ``1e-8``.
        weight_decay: decoupled weight decay. Default: ``0.0``.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, 4, 5, 8, sparse=True)
        >>> dense, sparse = hsoftmax.split_parameters(head)
        >>> optimizers = [torch.optim.AdamW(dense), hsoftmax.SparseRowAdamW(sparse, lr=1e-2)]
        >>> x, y = torch.randn(3, 16), torch.tensor([0, 4, 9])
        >>> hsoftmax.HierarchicalCrossEntropy()(head(x), y).backward()
        >>> for optimizer in optimizers:
        ...     optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"expected lr >= 0, got {lr}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"expected betas to be a pair (beta1, beta2), got {betas!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"expected betas in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"expected eps >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"expected weight_decay >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update the rows present in each parameter's sparse gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                grad = parameter.grad
                if grad is None:
                    continue
                if grad.layout != torch.sparse_coo or grad.sparse_dim() != 1:
                    raise ValueError(
                        "expected a sparse COO gradient of rows (sparse_dim=1), as "
                        f"HierarchicalSoftmax(sparse=True) gives, got layout {grad.layout}; "
                        "use torch.optim.AdamW for dense gradients"
                    )
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                state["step"] += 1
                rows, values = _summed_rows(grad)
                if _fuses(parameter):
                    views = self._row_views(parameter, state)
                    _update_views(views, rows, values, group, state["step"])
                else:
                    _update_gathered(parameter, state, rows, values, group)
        return loss

    def _row_views(self, parameter: Tensor, state: dict[str, Any]) -> _Views:
        """Per-row views of the parameter and its moments, made once per storage."""
        tensors = (parameter, state["exp_avg"], state["exp_avg_sq"])
        key = tuple(t.data_ptr() for t in tensors)
        cache = self.__dict__.setdefault("_view_cache", {})  # not in state_dict, not pickled
        if cache.get(id(parameter), (None,))[0] != key:  # new, or storage replaced
            cache[id(parameter)] = (key, tuple(t.detach().unbind(0) for t in tensors))
        return cache[id(parameter)][1]


def _fuses(parameter: Tensor) -> bool:
    """Whether the rows of ``parameter`` are updated in place by the fused kernel."""
    return (
        parameter.device.type == "cpu"
        and parameter.is_contiguous()
        and math.prod(parameter.shape[1:]) >= _MIN_VIEW_NUMEL
    )


def _update_views(
    views: _Views, rows: Tensor, values: Tensor, group: dict[str, Any], step: int
) -> None:
    """One fused AdamW kernel over views of the touched rows: no gather, no scatter."""
    ids = rows.tolist()
    if not ids:
        return
    weights, exp_avg, exp_avg_sq = (_pick(v, ids) for v in views)
    grads = list(values.contiguous().unbind(0))
    steps = [torch.tensor(float(step))] * len(ids)
    beta1, beta2 = group["betas"]
    torch._fused_adamw_(
        weights, grads, exp_avg, exp_avg_sq, [], steps, lr=group["lr"],
        beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
        amsgrad=False, maximize=False,
    )


def _update_gathered(
    parameter: Tensor, state: dict[str, Any], rows: Tensor, values: Tensor, group: dict[str, Any]
) -> None:
    """Gather the touched rows, update them with vectorised ops and scatter them back."""
    (beta1, beta2), step = group["betas"], state["step"]
    lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
    exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
    exp_avg_sq.addcmul_(values, values, value=1 - beta2)
    state["exp_avg"].index_copy_(0, rows, exp_avg)
    state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
    correction1 = 1 - beta1**step
    root2 = math.sqrt(1 - beta2**step)
    # m / c1 / (sqrt(v / c2) + eps) == (sqrt(c2) / c1) * m / (sqrt(v) + eps * sqrt(c2))
    denom = exp_avg_sq.sqrt_().add_(eps * root2)
    weights = parameter.index_select(0, rows)
    if decay:
        weights.mul_(1 - lr * decay)
    weights.addcdiv_(exp_avg, denom, value=-lr * root2 / correction1)
    parameter.index_copy_(0, rows, weights)
