"""The class <-> (node, slot) mapping: validation and the tensors derived from it.

A mapping is a LongTensor ``class_slots`` of shape ``(num_classes,)``: class ``c`` sits at
position ``class_slots[c]`` in ``[0, n_top * n_bottom)``, that is at node
``class_slots[c] // n_bottom`` and slot ``class_slots[c] % n_bottom``. The identity mapping
(``class_slots[c] = c``) is the paper's split. Builders of better mappings live in
:mod:`hsoftmax.builders`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .checks import check_int, check_integer_tensor

__all__ = ["ClassLayout", "check_class_slots", "class_layout"]


def check_class_slots(class_slots: object, num_classes: int, n_top: int, n_bottom: int) -> Tensor:
    """Check a class -> position mapping and return it as an int64 tensor.

    Args:
        class_slots: ``(num_classes,)`` integer tensor of distinct positions.
        num_classes: the number of classes.
        n_top: nodes in the top layer.
        n_bottom: slots per node.

    Returns:
        The mapping as an int64 tensor on its original device.

    Raises:
        TypeError: if it is not an integer tensor.
        ValueError: if its shape is wrong, or positions are out of range or repeated.

    Example:
        >>> import torch
        >>> check_class_slots(torch.tensor([3, 0, 1]), num_classes=3, n_top=2, n_bottom=2)
        tensor([3, 0, 1])
    """
    class_slots = check_integer_tensor("class_slots", class_slots)
    if class_slots.dim() != 1:
        raise ValueError(
            f"expected a 1-D class_slots (one position per class), got shape "
            f"{tuple(class_slots.shape)}"
        )
    if class_slots.shape != (num_classes,):
        raise ValueError(
            f"expected class_slots of shape ({num_classes},) (one position per class), "
            f"got {tuple(class_slots.shape)}"
        )
    positions = n_top * n_bottom
    slots = class_slots.long()
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= positions):
        raise ValueError(
            f"expected class_slots in [0, {positions}) (n_top * n_bottom), "
            f"got values in [{int(slots.min())}, {int(slots.max())}]"
        )
    if torch.unique(slots).numel() != num_classes:
        raise ValueError("expected class_slots to hold distinct positions, got repeated values")
    return slots


class ClassLayout(NamedTuple):
    """The tensors derived from a mapping.

    Attributes:
        class_slots: ``(num_classes,)`` position of each class.
        slot_classes: ``(n_top * n_bottom,)`` class at each position, ``-1`` where empty;
            ``None`` for the identity mapping.
        slot_mask: ``(n_top, n_bottom)`` bool, ``True`` where a position holds a class;
            ``None`` when all do.
        node_mask: ``(n_top,)`` bool, ``True`` where a node holds a class; ``None`` when all do.
    """

    class_slots: Tensor
    slot_classes: Tensor | None
    slot_mask: Tensor | None
    node_mask: Tensor | None


def class_layout(
    n_top: int,
    n_bottom: int,
    num_classes: int | None = None,
    class_slots: Tensor | None = None,
) -> ClassLayout:
    """Validate sizes and a mapping, and derive the masks and the inverse mapping.

    Args:
        n_top: nodes in the top layer.
        n_bottom: slots per node.
        num_classes: number of classes in ``[1, n_top * n_bottom]``. Default: the length of
            ``class_slots`` if given, else ``n_top * n_bottom``.
        class_slots: optional ``(num_classes,)`` mapping. Default: the identity.

    Returns:
        The :class:`ClassLayout`, on the device of ``class_slots`` (CPU by default).

    Example:
        >>> layout = class_layout(n_top=2, n_bottom=3, num_classes=5)
        >>> layout.slot_mask
        tensor([[ True,  True,  True],
                [ True,  True, False]])
    """
    check_int("n_top", n_top)
    check_int("n_bottom", n_bottom)
    positions = n_top * n_bottom
    if num_classes is None:
        num_classes = positions if class_slots is None else len(class_slots)
    check_int("num_classes", num_classes)
    if num_classes > positions:
        raise ValueError(
            f"expected num_classes in [1, {positions}] (n_top * n_bottom), got {num_classes}"
        )
    identity = torch.arange(num_classes, device="cpu")  # explicit: not a torch.device context
    slots = (
        identity
        if class_slots is None
        else check_class_slots(class_slots, num_classes, n_top, n_bottom)
    )
    identity = identity.to(slots.device)
    slot_classes = None
    if not torch.equal(slots, identity):
        slot_classes = torch.full((positions,), -1, dtype=torch.long, device=slots.device)
        slot_classes[slots] = identity
    if num_classes == positions:
        return ClassLayout(slots, slot_classes, None, None)
    filled = torch.zeros(positions, dtype=torch.bool, device=slots.device)
    filled[slots] = True
    slot_mask = filled.view(n_top, n_bottom)
    node_mask = slot_mask.any(dim=1)
    return ClassLayout(slots, slot_classes, slot_mask, None if bool(node_mask.all()) else node_mask)
