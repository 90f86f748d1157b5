"""Swap a backbone's final ``nn.Linear`` classifier for a :class:`~hsoftmax.HierarchicalSoftmax`.

Libraries expose the classifier in different ways. :data:`CONVENTIONS` is the table of the ones
known here, tried in order; the first that finds a final ``nn.Linear`` wins:

- ``get_classifier()`` (timm): replaced by ``reset_classifier(0)``, then the head in the place
  of timm's classifier, and ``num_classes`` set;
- ``get_output_embeddings()`` (the ``lm_head`` of a Hugging Face ``transformers`` causal LM):
  replaced by ``set_output_embeddings(head)``, with the word-embedding tie switched off;
- the attribute paths of :data:`CLASSIFIER_PATHS` (``fc``, ``classifier``, ..., ``_fc`` of
  efficientnet_pytorch, ``lm_head``): replaced by assignment. An attribute may hold the
  ``nn.Linear`` itself or an ``nn.Sequential`` whose last layer (after trailing
  ``nn.Identity``) is one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .softmax import HierarchicalSoftmax

__all__ = ["CLASSIFIER_PATHS", "CONVENTIONS", "Convention", "find_classifier", "replace_classifier"]


def _get(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for name in path.split("."):
        if not isinstance(obj, nn.Module) or name not in obj._modules:
            return None
        obj = obj._modules[name]
    return obj


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    setattr(parent, name, module)


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules(remove_duplicate=False):
        if module is target and name:
            return name
    return None


def _final_linear(module: Any, path: str) -> tuple[str | None, str]:
    """The path of the final Linear of ``module`` (itself, or a Sequential's last layer).

    Returns ``(path, "")`` on success, else ``(None, why)``. A ``Dropout`` after the final Linear
    would act on the logits, which a hierarchical head does not have, so it is refused.
    """
    if module is None:
        return None, f"{path} is missing"
    if isinstance(module, nn.Linear):
        return path, ""
    if isinstance(module, nn.Sequential):
        children = list(module._modules.items())
        while children and isinstance(children[-1][1], nn.Identity):
            children.pop()
        if children and isinstance(children[-1][1], nn.Linear):
            return f"{path}.{children[-1][0]}", ""
        last = type(children[-1][1]).__name__ if children else "nothing"
        return None, f"{path} is a Sequential ending in {last}"
    return None, f"{path} is a {type(module).__name__}"


def _found_by_method(model: nn.Module, method: str) -> tuple[str | None, str]:
    """Locate the module returned by ``model.<method>()`` (``get_classifier``, ...)."""
    get = getattr(model, method, None)
    if not callable(get):
        return None, f"no {method}()"
    module = get()
    if not isinstance(module, nn.Module):
        return None, f"{method}() returned a {type(module).__name__}"
    path = _path_of(model, module)
    if path is None:
        return None, f"{method}() returned a {type(module).__name__} not found in the model"
    found, why = _final_linear(module, path)
    return (found, "") if found is not None else (None, f"{method}() returned {why}")


def _set_attribute(model: nn.Module, path: str, head: nn.Module) -> None:
    _set(model, path, head)


def _set_timm(model: nn.Module, path: str, head: nn.Module) -> None:
    """timm: ``reset_classifier(0)`` (timm removes its own classifier and keeps its pooling and
    dropout; no throw-away ``Linear(num_features, num_classes)`` is built), the head at the
    classifier's place, and ``num_classes``."""
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(0)
        removed = model.get_classifier()  # type: ignore[operator]
        moved = _path_of(model, removed) if isinstance(removed, nn.Module) else None
        path = moved if moved is not None else path
    _set(model, path, head)
    if isinstance(getattr(model, "num_classes", None), int):
        setattr(model, "num_classes", head.num_classes)  # noqa: B010


def _set_transformers(model: nn.Module, path: str, head: nn.Module) -> None:
    """transformers: ``set_output_embeddings(head)``, and the word-embedding tie broken.

    A causal LM usually ties ``lm_head.weight`` to the input embedding (``tie_word_embeddings``).
    The hierarchical head has no ``(vocab, hidden)`` matrix to share, so the tie is switched off
    in the config: otherwise a later ``tie_weights()`` (``save_pretrained``, ``resize_token_
    embeddings``, ...) would graft the embedding matrix onto the head as a stray ``weight``.
    The input embedding keeps its (formerly shared) weights.
    """
    model.set_output_embeddings(head)  # type: ignore[operator]
    if model.get_output_embeddings() is not head:  # type: ignore[operator]
        _set(model, path, head)
    config: Any = getattr(model, "config", None)
    configs: list[Any] = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        configs.append(get_text_config())
    for cfg in configs:
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5 caches the ties
    if isinstance(tied, dict):
        for key in [k for k in tied if str(k).startswith(f"{path}.")]:
            del tied[key]


@dataclass(frozen=True)
class Convention:
    """One way a library exposes its model's classifier.

    Attributes:
        name: the method or attribute path, e.g. ``"get_classifier()"`` or ``"fc"``.
        used_by: the libraries and models that follow it.
        locate: ``model -> (path, "")`` with the dotted path of the final ``nn.Linear``, or
            ``(None, why)`` when the convention does not apply.
        install: ``(model, path, head) -> None``: puts ``head`` in place of the Linear.
    """

    name: str
    used_by: str
    locate: Callable[[nn.Module], tuple[str | None, str]]
    install: Callable[[nn.Module, str, nn.Module], None]


def _attribute(path: str, used_by: str) -> Convention:
    return Convention(path, used_by, lambda model: _final_linear(_get(model, path), path),
                      _set_attribute)


#: The attribute conventions: (path, who uses it), tried in this order.
_ATTRIBUTES = (
    ("fc", "torchvision ResNet/RegNet/Inception"),
    ("classifier", "torchvision EfficientNet/MobileNet/DenseNet/VGG/ConvNeXt"),
    ("head", "torchvision Swin"),
    ("heads.head", "torchvision ViT"),
    ("heads", "ViT-like models with a Sequential of heads"),
    ("head.fc", "timm-style heads with their own module"),
    ("last_linear", "pretrainedmodels (Cadene)"),
    ("_fc", "efficientnet_pytorch (the paper's EfficientNet-B4)"),
    ("lm_head", "nanoGPT-style language models"),
)

#: Attribute paths tried, in order, after the methods of timm and transformers.
CLASSIFIER_PATHS = tuple(path for path, _ in _ATTRIBUTES)

#: The known conventions, tried in this order.
CONVENTIONS: tuple[Convention, ...] = (
    Convention(
        "get_classifier()", "timm",
        lambda model: _found_by_method(model, "get_classifier"), _set_timm,
    ),
    Convention(
        "get_output_embeddings()", "Hugging Face transformers",
        lambda model: _found_by_method(model, "get_output_embeddings"), _set_transformers,
    ),
    *(_attribute(path, used_by) for path, used_by in _ATTRIBUTES),
)


def _locate(model: nn.Module) -> tuple[Convention, str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    tried: list[str] = []
    for convention in CONVENTIONS:
        path, why = convention.locate(model)
        if path is not None:
            return convention, path
        if not why.startswith("no "):  # a method the model does not have is not worth listing
            tried.append(why)
    raise ValueError(
        f"expected a single final nn.Linear classifier in {type(model).__name__}, "
        f"got none: {'; '.join(tried)}"
    )


def find_classifier(model: nn.Module) -> str:
    """Find the attribute path of a model's final ``nn.Linear`` classifier.

    The conventions of :data:`CONVENTIONS` are tried in order: timm's ``get_classifier()``,
    transformers' ``get_output_embeddings()``, then the attribute paths of
    :data:`CLASSIFIER_PATHS` (``fc``, ``classifier``, ``head``, ..., ``_fc``, ``lm_head``). An
    attribute may hold an ``nn.Linear`` or an ``nn.Sequential`` whose last layer (ignoring
    trailing ``Identity``) is an ``nn.Linear``.

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
    return _locate(model)[1]


def _class_count(
    path: str, old: nn.Linear, n_top: Any, n_bottom: Any, kwargs: dict[str, Any]
) -> int:
    """The number of classes of the new head: the old head's, unless ``num_classes`` is given."""
    num_classes = kwargs.get("num_classes")
    source = "num_classes"
    if num_classes is None:
        num_classes, source = old.out_features, f"the out_features of the old classifier {path}"
        slots = kwargs.get("class_slots")
        if slots is not None and len(slots) != num_classes:
            raise ValueError(
                f"expected class_slots of length {num_classes} ({source}), got {len(slots)}; "
                "pass num_classes= to change the number of classes"
            )
    sizes = (n_top, n_bottom, num_classes)
    if all(isinstance(n, int) for n in sizes) and n_top * n_bottom < num_classes:
        raise ValueError(
            f"expected n_top * n_bottom >= {num_classes} ({source}), got "
            f"{n_top} * {n_bottom} = {n_top * n_bottom}; hsoftmax.suggest_shape"
            f"({num_classes}) gives a shape that fits"
        )
    return num_classes


def replace_classifier(
    model: nn.Module, n_top: int, n_bottom: int, hidden: int, **kwargs: Any
) -> HierarchicalSoftmax:
    """Replace a model's final ``nn.Linear`` by a :class:`~hsoftmax.HierarchicalSoftmax` in place.

    The classifier is found by :func:`find_classifier` and replaced the way its library expects
    (see :data:`CONVENTIONS`):

    - **timm** (``get_classifier()``): ``model.reset_classifier(0)`` removes timm's classifier,
      the head goes in its place and ``model.num_classes`` is set to the head's.
    - **Hugging Face transformers** (``get_output_embeddings()``, the ``lm_head`` of a causal
      LM): ``model.set_output_embeddings(head)``. The head cannot share the input embedding
      matrix, so ``config.tie_word_embeddings`` is set to ``False`` (else a later
      ``tie_weights()`` would attach that matrix to the head); the input embedding keeps its
      weights. A transformers model's own ``forward`` computes logits and its loss from
      ``lm_head``, which now returns a :class:`~hsoftmax.HierarchicalOutput`: train on the last
      hidden states of ``model.base_model`` instead, as ``examples/gpt_lm_head.py`` does.
    - **attributes** (``fc``, ``classifier``, ``_fc`` of efficientnet_pytorch, ...): assignment.

    The new head has the old one's number of classes (``out_features``), ``in_features``,
    device and dtype; its old weights are dropped. Everything else is kept, in particular the
    backbone's dropout before the classifier (torchvision EfficientNet's ``classifier[0]``,
    efficientnet_pytorch's ``_dropout``, timm's ``drop_rate``): it now acts on the input of the
    head's projection, as the paper's EfficientNet-B4 did.

    Args:
        model: the backbone with its classifier; modified in place.
        n_top: nodes of the top layer.
        n_bottom: slots per node; ``n_top * n_bottom`` must hold the classes.
        hidden: size of the head's projection.
        **kwargs: passed on to :class:`~hsoftmax.HierarchicalSoftmax`: ``num_classes``
            (default: the old head's ``out_features``), ``class_slots``, ``activation``;
            ``device`` and ``dtype`` override the old head's.

    Returns:
        The new head, now part of ``model``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if no single final ``nn.Linear`` is found, if it is an uninitialised
            ``nn.LazyLinear``, or if ``n_top * n_bottom`` cannot hold the classes.

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
    convention, path = _locate(model)
    old = model.get_submodule(path)
    if not isinstance(old, nn.Linear):  # pragma: no cover - _locate only returns Linears
        raise TypeError(f"expected {path} to be an nn.Linear, got {type(old).__name__}")
    if isinstance(old, LazyModuleMixin) and old.has_uninitialized_params():
        raise ValueError(
            f"expected an initialised classifier, got an uninitialised {type(old).__name__} at "
            f"{path} (in_features unknown); run one forward pass, e.g. model(example_batch), "
            "before replace_classifier"
        )
    kwargs["num_classes"] = _class_count(path, old, n_top, n_bottom, kwargs)
    kwargs.setdefault("device", old.weight.device)
    kwargs.setdefault("dtype", old.weight.dtype)
    head = HierarchicalSoftmax(old.in_features, n_top, n_bottom, hidden, **kwargs)
    convention.install(model, path, head)
    return head
