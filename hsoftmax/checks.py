"""The checks of user input, in one place: each raises one sentence that says what was expected
and what was passed, before anything is computed or changed."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "check_class_weight",
    "check_flag",
    "check_floating_dtype",
    "check_input",
    "check_int",
    "check_integer_tensor",
    "check_k",
    "check_loss_options",
    "check_target",
    "check_target_values",
    "check_tolerance",
]

REDUCTIONS = ("none", "mean", "sum")


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Raise a ``ValueError`` unless ``value`` is an int (``bool`` excluded) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"expected {name} to be {kind}, got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    """A bool from ``True``/``False``, ``numpy.bool_`` or the ints 0 and 1; else ``TypeError``."""
    if isinstance(value, (bool, np.bool_)) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise TypeError(f"expected {name} to be a bool, got {value!r}")


def check_floating_dtype(dtype: object) -> None:
    """Raise a ``TypeError`` unless ``dtype`` is ``None`` or a floating ``torch.dtype``."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"expected a floating torch.dtype for the parameters, got {dtype!r}")


def check_integer_tensor(name: str, value: object, what: str = "") -> Tensor:
    """Return ``value`` if it is a tensor of an integer dtype (not bool); else ``TypeError``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"expected {name} of an integer dtype{what}, got {value.dtype}")
    return value


def check_input(x: object, in_features: int) -> None:
    """Raise unless ``x`` is a floating tensor of shape ``(*, in_features)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"expected input of shape (*, {in_features}) (in_features), got {tuple(x.shape)}"
        )


def check_loss_options(reduction: str, label_smoothing: float) -> None:
    """Raise a ``ValueError`` for an unknown ``reduction`` or a ``label_smoothing`` outside
    ``[0, 1]``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction in {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"expected label_smoothing in [0, 1], got {label_smoothing}")


def check_class_weight(weight: Tensor | None, num_classes: int) -> None:
    """Raise a ``ValueError`` unless ``weight`` is ``None`` or of shape ``(num_classes,)``."""
    if weight is not None and weight.shape != (num_classes,):
        raise ValueError(
            f"expected weight of shape ({num_classes},) (one per class), "
            f"got {tuple(weight.shape)}"
        )


def check_k(k: object, num_classes: int) -> int:
    """Raise unless ``k`` is an int in ``[0, num_classes]``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"expected k to be an int, got {type(k).__name__}")
    if not 0 <= k <= num_classes:
        raise ValueError(f"expected k in [0, {num_classes}] (num_classes), got {k}")
    return k


def check_tolerance(tolerance: object) -> float:
    """Raise a ``ValueError`` unless ``tolerance`` is a finite number ``>= 0``."""
    if (
        not isinstance(tolerance, (int, float))
        or isinstance(tolerance, bool)
        or not 0 <= tolerance < math.inf
    ):
        raise ValueError(f"expected tolerance to be a finite number >= 0, got {tolerance!r}")
    return float(tolerance)


def check_target(target: object, batch_shape: tuple[int, ...]) -> Tensor:
    """The class ids ``target`` as int64, after checking its type and shape (``-100`` is not a
    uint8 value: targets are widened before any comparison)."""
    target = check_integer_tensor("target", target, " (class ids)")
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(
            f"expected target of shape {tuple(batch_shape)} (the input's leading dimensions), "
            f"got {tuple(target.shape)}"
        )
    return target.long()


def check_target_values(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise an ``IndexError`` if some int64 ``target`` is outside ``[0, num_classes)`` and is
    not ``ignore_index``. No host sync on accelerators or in compiled graphs (an asynchronous
    assert there); no check under ``torch.func`` transforms (an index out of range still
    raises)."""
    if torch._C._are_functorch_transforms_active():
        return
    outside = (target < 0) | (target >= num_classes)
    message = f"expected target in [0, {num_classes}) or ignore_index={ignore_index}"
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(outside.any()):  # then look past the ignored entries
            values = target[outside & (target != ignore_index)]
            if values.numel():
                raise IndexError(
                    f"{message}, got values in [{int(values.min())}, {int(values.max())}]"
                )
    else:
        torch._assert_async(~(outside & (target != ignore_index)).any(), message)
