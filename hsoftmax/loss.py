"""The :class:`HierarchicalCrossEntropy` loss, a thin shell over
:func:`hsoftmax.functional.hierarchical_cross_entropy`."""

from __future__ import annotations

from torch import Tensor, nn

from .checks import check_loss_options
from .functional import HierarchicalOutput, hierarchical_cross_entropy

__all__ = ["HierarchicalCrossEntropy"]


class HierarchicalCrossEntropy(nn.Module):
    """Cross-entropy of a :class:`~hsoftmax.HierarchicalSoftmax`, with the options of
    ``nn.CrossEntropyLoss``.

    It trains on the target's path only: ``-log p(node(y)) - log p(slot(y) | node(y))``, the
    exact negative log-likelihood, at a cost independent of the number of classes. Without
    label smoothing it equals ``F.cross_entropy(head.log_probs(x), y, weight, ...)``; label
    smoothing is applied per level (see
    :func:`~hsoftmax.functional.hierarchical_cross_entropy`).

    Args:
        weight: optional ``(num_classes,)`` weight of each class. Default: ``None``.
        ignore_index: target value that contributes nothing. Default: ``-100``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        label_smoothing: in ``[0, 1]``, applied per level. Default: ``0.0``.

    Shape:
        - Input: the ``HierarchicalOutput`` of a head called on ``(*, in_features)``.
        - Target: ``(*)`` integer class ids.
        - Output: a scalar, or ``(*)`` with ``reduction='none'``.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(16, n_top=4, n_bottom=5, hidden=8)
        >>> criterion = hsoftmax.HierarchicalCrossEntropy(ignore_index=-1)
        >>> loss = criterion(head(torch.randn(3, 16)), torch.tensor([2, -1, 19]))
        >>> loss.backward()
    """

    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_loss_options(reduction, label_smoothing)
        if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"expected weight to be a 1-D tensor (one per class), got {shape}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )

    def forward(self, output: HierarchicalOutput, target: Tensor) -> Tensor:
        """Compute the loss; see :func:`~hsoftmax.functional.hierarchical_cross_entropy`."""
        return hierarchical_cross_entropy(
            output,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
