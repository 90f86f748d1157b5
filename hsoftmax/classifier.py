"""Swap a backbone's final ``nn.Linear`` classifier for a :class:`~hsoftmax.HierarchicalSoftmax`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .softmax import HierarchicalSoftmax

__all__ = ["CLASSIFIER_PATHS", "find_classifier", "replace_classifier"]

#: Attribute paths tried, in order, when the model has no timm-style ``get_classifier()``:
#: torchvision's ResNet/RegNet/Inception (``fc``), EfficientNet/MobileNet/DenseNet/VGG/ConvNeXt
#: (``classifier``), Swin/timm ViT (``head``), ViT (``heads.head``, inside ``heads``), and
#: timm-style heads with their own module (``head.fc``).
CLASSIFIER_PATHS = ("fc", "classifier", "head", "heads.head", "heads", "head.fc", "last_linear")

# Parameter-free modules that may follow the final Linear of a Sequential head.
_PASSTHROUGH = (nn.Identity, nn.Dropout)


def _get(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for name in path.split("."):
        if not isinstance(obj, nn.Module) or name not in obj._modules:
            return None
        obj = obj._modules[name]
    return obj


def _final_linear(module: nn.Module, path: str) -> tuple[str | None, str]:
    """The path of the final Linear of ``module`` (itself, or a Sequential's last layer).

    Returns ``(path, "")`` on success, else ``(None, why)``.
    """
    if isinstance(module, nn.Linear):
        return path, ""
    if isinstance(module, nn.Sequential):
        children = list(module._modules.items())
        while children and isinstance(children[-1][1], _PASSTHROUGH):
            children.pop()
        if children and isinstance(children[-1][1], nn.Linear):
            return f"{path}.{children[-1][0]}", ""
        last = type(children[-1][1]).__name__ if children else "nothing"
        return None, f"{path} is a Sequential ending in {last}"
    return None, f"{path} is a {type(module).__name__}"


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules(remove_duplicate=False):
        if module is target and name:
            return name
    return None


def find_classifier(model: nn.Module) -> str:
    """Find the attribute path of a model's final ``nn.Linear`` classifier.

    A timm model (one with ``get_classifier()``) is asked for its classifier first, and the path
    of the returned module is looked up. Otherwise the paths of :data:`CLASSIFIER_PATHS` are
    tried in order; a path may hold an ``nn.Linear`` or an ``nn.Sequential`` whose last layer
    (ignoring trailing ``Dropout``/``Identity``) is an ``nn.Linear``.

    Args:
        model: the backbone with its classifier.

    Returns:
        The dotted path of the final Linear, e.g. ``"fc"`` or ``"classifier.1"``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if no single final ``nn.Linear`` is found; the message lists what was tried.

    Example:
        >>> from torch import nn
        >>> model = nn.Module()
        >>> model.classifier = nn.Sequential(nn.Dropout(0.4), nn.Linear(1792, 1000))
        >>> find_classifier(model)
        'classifier.1'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    tried: list[str] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        module = get_classifier()
        if isinstance(module, nn.Module):
            path = _path_of(model, module)
            if path is not None:
                found, why = _final_linear(module, path)
                if found is not None:
                    return found
                tried.append(f"get_classifier() returned {why}")
            else:
                tried.append(
                    f"get_classifier() returned a {type(module).__name__} not found in the model"
                )
        else:
            tried.append(f"get_classifier() returned a {type(module).__name__}")
    for path in CLASSIFIER_PATHS:
        module = _get(model, path)
        if module is None:
            tried.append(f"{path} is missing")
            continue
        found, why = _final_linear(module, path)
        if found is not None:
            return found
        tried.append(why)
    raise ValueError(
        f"expected a single final nn.Linear classifier in {type(model).__name__}, "
        f"got none: {'; '.join(tried)}"
    )


def replace_classifier(
    model: nn.Module, n_top: int, n_bottom: int, hidden: int, **kwargs: Any
) -> HierarchicalSoftmax:
    """Replace a model's final ``nn.Linear`` by a :class:`~hsoftmax.HierarchicalSoftmax` in place.

    The classifier is found by :func:`find_classifier` (timm's ``get_classifier()``, then
    ``fc``, ``classifier``, ``head``, ``heads.head``, ...). The new head takes the old one's
    ``in_features``, device and dtype, and its old weights are dropped. A timm model's
    ``num_classes`` attribute is updated to the new head's.

    Args:
        model: the backbone with its classifier; modified in place.
        n_top: nodes of the top layer.
        n_bottom: slots per node.
        hidden: size of the head's projection.
        **kwargs: passed on to :class:`~hsoftmax.HierarchicalSoftmax` (``num_classes``,
            ``class_slots``, ``activation``; ``device`` and ``dtype`` override the old head's).

    Returns:
        The new head, now part of ``model``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if no single final ``nn.Linear`` is found.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential()
        >>> model.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU())
        >>> model.fc = nn.Linear(32, 1000)
        >>> head = replace_classifier(model, n_top=25, n_bottom=40, hidden=16)
        >>> model.fc is head, head.in_features, head.num_classes
        (True, 32, 1000)
        >>> model(torch.randn(2, 3, 4)).top_logits.shape
        torch.Size([2, 25])
    """
    path = find_classifier(model)
    old = _get(model, path)
    assert isinstance(old, nn.Linear)
    kwargs.setdefault("device", old.weight.device)
    kwargs.setdefault("dtype", old.weight.dtype)
    head = HierarchicalSoftmax(old.in_features, n_top, n_bottom, hidden, **kwargs)
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, name, head)
    if callable(getattr(model, "get_classifier", None)) and isinstance(
        getattr(model, "num_classes", None), int
    ):
        setattr(model, "num_classes", head.num_classes)  # noqa: B010
    return head
