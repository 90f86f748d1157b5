"""The :class:`HierarchicalSoftmax` layer: parameters, buffers and thin inference methods."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as HF
from .checks import check_flag, check_floating_dtype, check_input, check_int
from .functional import HierarchicalOutput
from .grouping import ClassLayout, class_layout

__all__ = ["HierarchicalSoftmax"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}


def _make_activation(activation: str | nn.Module) -> nn.Module:
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]()
    raise ValueError(
        f"expected activation in {sorted(_ACTIVATIONS)} or an nn.Module, got {activation!r}"
    )


def _fully_sharded(module: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` manages ``module`` (it changes the module's class)."""
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__)


class HierarchicalSoftmax(nn.Module):
    """A two-level hierarchical softmax head, a drop-in replacement for a final ``nn.Linear``.

    .. math::

        z = act(x W_{proj}^T + b_{proj}), \\qquad
        \\log p(c \\mid x) = \\log p(node(c) \\mid z) + \\log p(slot(c) \\mid node(c), z)

    The top layer is a softmax over ``n_top`` nodes; each node has its own softmax over
    ``n_bottom`` slots. Class ``c`` sits at node ``class_slots[c] // n_bottom`` and slot
    ``class_slots[c] % n_bottom``; by default ``class_slots[c] = c``, the paper's split
    ``node = y // n_bottom``, ``slot = y % n_bottom``. Positions without a class (when
    ``num_classes < n_top * n_bottom``) have probability exactly 0 and are never predicted.

    The forward returns a :class:`~hsoftmax.functional.HierarchicalOutput` for
    :class:`~hsoftmax.HierarchicalCrossEntropy`, which trains on the target's node only.
    Inference: :meth:`log_probs` (exact, all classes), :meth:`topk` (exact top-k) and
    :meth:`predict` (the paper's cheap top-1 routing, not always the argmax).

    Args:
        in_features: size of each input sample.
        n_top: number of nodes of the top layer.
        n_bottom: number of slots per node.
        hidden: size of the projection ``z`` shared by both layers.
        num_classes: number of classes, at most ``n_top * n_bottom``.
            Default: ``n_top * n_bottom``, or the length of ``class_slots``.
        class_slots: optional ``(num_classes,)`` integer tensor of distinct positions in
            ``[0, n_top * n_bottom)`` (see :mod:`hsoftmax.builders`). Default: the identity.
        activation: ``'relu'`` (the paper's), ``'gelu'``, ``'tanh'``, ``'identity'``, or any
            ``nn.Module``. Default: ``'relu'``.
        sparse: give ``bottom_weight`` and ``bottom_bias`` sparse gradients holding only the
            nodes a batch touches, for :class:`torch.optim.SparseAdam` (see
            :func:`~hsoftmax.bottom.split_parameters`). Stock dense optimizers reject sparse
            gradients. Default: ``False``.
        device: device of the parameters. Default: ``None``.
        dtype: floating dtype of the parameters. Default: ``None``.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: a ``HierarchicalOutput`` whose tensors have leading shape ``(*)``.

    Attributes:
        proj: the ``nn.Linear(in_features, hidden)`` projection.
        top: the ``nn.Linear(hidden, n_top)`` top layer.
        bottom_weight: ``(n_top, n_bottom, hidden)`` weights of the bottom layers.
        bottom_bias: ``(n_top, n_bottom)`` biases of the bottom layers.
        class_slots: ``(num_classes,)`` buffer, the position of every class.

    Example:
        >>> import torch, hsoftmax
        >>> head = hsoftmax.HierarchicalSoftmax(32, n_top=10, n_bottom=8, hidden=16)
        >>> x, y = torch.randn(4, 32), torch.tensor([0, 5, 42, 79])
        >>> loss = hsoftmax.HierarchicalCrossEntropy()(head(x), y)
        >>> head.log_probs(x).shape, head.predict(x).shape, head.topk(x, 3)[1].shape
        (torch.Size([4, 80]), torch.Size([4]), torch.Size([4, 3]))
    """

    slot_classes: Tensor | None
    slot_mask: Tensor | None
    node_mask: Tensor | None
    class_slots: Tensor

    def __init__(
        self,
        in_features: int,
        n_top: int,
        n_bottom: int,
        hidden: int,
        *,
        num_classes: int | None = None,
        class_slots: Tensor | None = None,
        activation: str | nn.Module = "relu",
        sparse: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("hidden", hidden)
        check_floating_dtype(dtype)
        sparse = check_flag("sparse", sparse)
        if class_slots is not None and isinstance(class_slots, Tensor):
            class_slots = class_slots.cpu()
        layout = class_layout(n_top, n_bottom, num_classes, class_slots)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.n_top = n_top
        self.n_bottom = n_bottom
        self.hidden = hidden
        self.sparse = sparse
        self.proj = nn.Linear(in_features, hidden, **factory)
        self.activation = _make_activation(activation)
        self.top = nn.Linear(hidden, n_top, **factory)
        self.bottom_weight = nn.Parameter(torch.empty(n_top, n_bottom, hidden, **factory))
        self.bottom_bias = nn.Parameter(torch.empty(n_top, n_bottom, **factory))
        self._set_layout(layout)
        self.register_load_state_dict_pre_hook(HierarchicalSoftmax._before_load)
        self.register_load_state_dict_post_hook(HierarchicalSoftmax._after_load)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self.class_slots.shape[0]

    def _set_layout(self, layout: ClassLayout) -> None:
        """Register ``class_slots`` (persistent) and the buffers derived from it, on the
        parameters' device, and keep a CPU copy of a custom mapping to rebuild them from."""
        self._class_slots = None if layout.slot_classes is None else layout.class_slots.cpu()
        device = self.bottom_weight.device
        for name, tensor in layout._asdict().items():
            tensor = None if tensor is None else tensor.to(device)
            self.register_buffer(name, tensor, persistent=name == "class_slots")

    def _layout(self, class_slots: Tensor | None) -> ClassLayout:
        return class_layout(self.n_top, self.n_bottom, self.num_classes, class_slots)

    def _before_load(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Check a loaded ``class_slots`` before anything is copied into the head."""
        slots = state_dict.get(prefix + "class_slots")
        if isinstance(slots, Tensor) and slots.shape == self.class_slots.shape:
            self._layout(slots.cpu())

    @staticmethod
    def _after_load(module: HierarchicalSoftmax, incompatible_keys: Any) -> None:
        """Derive the masks and the inverse mapping again from a loaded ``class_slots``."""
        module._set_layout(module._layout(module.class_slots.cpu()))

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` (every layer uniform in ``±1/sqrt(fan_in)``), and build
        the mapping's buffers again (after ``to_empty()`` from the meta device they hold
        uninitialised memory)."""
        self._set_layout(self._layout(self._class_slots))
        self.proj.reset_parameters()
        self.top.reset_parameters()
        bound = 1.0 / math.sqrt(self.hidden)
        nn.init.uniform_(self.bottom_weight, -bound, bound)
        nn.init.uniform_(self.bottom_bias, -bound, bound)

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(
            "expected torch.compile or torch.export for HierarchicalSoftmax, got torch.jit.script:"
            " its output is a NamedTuple with methods, which TorchScript cannot compile"
        )

    def extra_repr(self) -> str:
        grouped = ", class_slots=custom" if self.slot_classes is not None else ""
        return (
            f"in_features={self.in_features}, n_top={self.n_top}, n_bottom={self.n_bottom}, "
            f"hidden={self.hidden}, num_classes={self.num_classes}{grouped}"
            + (", sparse=True" if self.sparse else "")
        )

    def forward(self, x: Tensor) -> HierarchicalOutput:
        """Project the input and compute the top logits; the bottom layers stay untouched.

        Args:
            x: ``(*, in_features)`` floating-point input.

        Returns:
            A :class:`~hsoftmax.functional.HierarchicalOutput` for the loss and inference.
        """
        check_input(x, self.in_features)
        hidden = self.activation(self.proj(x))
        top_logits = self.top(hidden)
        if self.node_mask is not None:
            top_logits = top_logits.masked_fill(~self.node_mask, float("-inf"))
        weight: Tensor = self.bottom_weight
        bias: Tensor = self.bottom_bias
        if not torch.is_grad_enabled():  # a loss computed later must not train the bottoms
            weight, bias = weight.detach(), bias.detach()
        if _fully_sharded(self):  # FSDP2 frees the gathered parameters when forward returns
            weight, bias = weight.clone(), bias.clone()
        return HierarchicalOutput(
            hidden,
            top_logits,
            weight,
            bias,
            self.class_slots,
            self.slot_classes,
            self.slot_mask,
            self.sparse,
        )

    def log_probs(self, x: Tensor) -> Tensor:
        """Exact log-probabilities of all classes: ``(*, in_features) -> (*, num_classes)``.

        See :func:`hsoftmax.functional.log_probs`.
        """
        return HF.log_probs(self(x))

    def predict(self, x: Tensor) -> Tensor:
        """Top-1 routing, as in the paper: ``(*, in_features) -> (*)`` class ids.

        The argmax node, then the argmax slot in it. Cheap, but not always the most probable
        class; ``topk(x, 1)`` gives the exact argmax. See :func:`hsoftmax.functional.predict`.
        """
        return HF.predict(self(x))

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The exact ``k`` most probable classes: ``(values, indices)``, each ``(*, k)``.

        Equal to ``self.log_probs(x).topk(k)``. See :func:`hsoftmax.functional.topk`.
        """
        return HF.topk(self(x), k)
