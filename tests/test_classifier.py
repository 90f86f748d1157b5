"""Tests of hsoftmax.classifier on look-alikes of torchvision and timm models, and the real ones."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax
from hsoftmax.classifier import find_classifier, replace_classifier

FEATURES = 24


class _Backbone(nn.Module):
    """A tiny feature extractor: (B, 3, 4, 4) -> (B, FEATURES)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, FEATURES, 3), nn.AdaptiveAvgPool2d(1))

    def feats(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)


class ResNetLike(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.feats(x))


class EfficientNetLike(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Dropout(0.4), nn.Linear(FEATURES, 1000))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.feats(x))


class VGGLike(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 1000)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.feats(x))


class DenseNetLike(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(FEATURES, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.feats(x))


class ConvNeXtLike(_Backbone):
    """torchvision ConvNeXt: classifier = Sequential(LayerNorm2d, Flatten, Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.GroupNorm(1, FEATURES), nn.Flatten(1), nn.Linear(FEATURES, 1000)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class ViTLike(_Backbone):
    """torchvision ViT: heads = Sequential(OrderedDict(head=Linear))."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(FEATURES, 1000)))

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.feats(x))


class SwinLike(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(FEATURES, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.feats(x))


class _NormMlpHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(FEATURES)
        self.fc = nn.Linear(FEATURES, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


class HeadFcLike(_Backbone):
    """A timm-ConvNeXt-like head module with its own ``fc``, without ``get_classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = _NormMlpHead()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.feats(x))


class TimmLike(HeadFcLike):
    """timm's protocol: get_classifier() returns the final Linear; num_classes attribute."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.num_classes = num_classes
        if num_classes == 0:
            self.head.fc = nn.Identity()  # type: ignore[assignment]

    def get_classifier(self) -> nn.Module:
        return self.head.fc


class SqueezeNetLike(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(FEATURES, 1000, 1), nn.ReLU())


CASES: list[tuple[Callable[[], nn.Module], str]] = [
    (ResNetLike, "fc"),
    (EfficientNetLike, "classifier.1"),
    (VGGLike, "classifier.3"),
    (DenseNetLike, "classifier"),
    (ConvNeXtLike, "classifier.2"),
    (ViTLike, "heads.head"),
    (SwinLike, "head"),
    (HeadFcLike, "head.fc"),
    (TimmLike, "head.fc"),
]


@pytest.mark.parametrize(("make", "path"), CASES, ids=[c[0].__name__ for c in CASES])
def test_replace_classifier_lookalikes(make: Callable[[], nn.Module], path: str) -> None:
    torch.manual_seed(0)
    model = make()
    assert find_classifier(model) == path
    in_features = model.get_submodule(path).in_features
    head = replace_classifier(model, n_top=50, n_bottom=20, hidden=8)
    assert isinstance(head, HierarchicalSoftmax)
    assert model.get_submodule(path) is head
    assert (head.in_features, head.n_top, head.n_bottom, head.hidden) == (in_features, 50, 20, 8)
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 500, 999])
    loss = HierarchicalCrossEntropy()(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert head.proj.weight.grad is not None


def test_replace_classifier_keeps_dtype_and_passes_kwargs() -> None:
    model = ResNetLike().double()
    head = replace_classifier(model, 10, 8, 4, num_classes=75, activation="gelu")
    assert head.proj.weight.dtype == torch.float64
    assert head.num_classes == 75
    assert isinstance(head.activation, nn.GELU)
    assert head.log_probs(torch.randn(2, FEATURES, dtype=torch.float64)).shape == (2, 75)


def test_replace_classifier_dtype_override() -> None:
    model = ResNetLike().double()
    head = replace_classifier(model, 10, 8, 4, dtype=torch.float32)
    assert head.proj.weight.dtype == torch.float32


def test_replace_classifier_device(device: torch.device) -> None:
    model = ResNetLike().to(device)
    head = replace_classifier(model, 10, 8, 4)
    assert head.proj.weight.device.type == device.type
    assert head.class_slots.device.type == device.type


def test_replace_classifier_updates_timm_num_classes() -> None:
    model = TimmLike()
    replace_classifier(model, 10, 8, 4, num_classes=77)
    assert model.num_classes == 77


def test_no_classifier_error_names_what_was_tried() -> None:
    with pytest.raises(ValueError, match=r"expected a single final nn\.Linear classifier") as info:
        replace_classifier(SqueezeNetLike(), 10, 8, 4)
    message = str(info.value)
    assert "fc is missing" in message
    assert "classifier is a Sequential ending in ReLU" in message
    assert "heads.head is missing" in message


def test_timm_without_classifier_errors() -> None:
    with pytest.raises(ValueError, match=r"get_classifier\(\) returned head\.fc is a Identity"):
        replace_classifier(TimmLike(num_classes=0), 10, 8, 4)


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"expected an nn\.Module, got int"):
        replace_classifier(3, 10, 8, 4)  # type: ignore[arg-type]


TORCHVISION = [
    ("resnet18", "fc", 512),
    ("efficientnet_b0", "classifier.1", 1280),
    ("mobilenet_v3_small", "classifier.3", 1024),
    ("densenet121", "classifier", 1024),
    ("vgg11", "classifier.6", 4096),
    ("convnext_tiny", "classifier.2", 768),
    ("regnet_y_400mf", "fc", 440),
    ("vit_b_16", "heads.head", 768),
    ("swin_t", "head", 768),
]


@pytest.mark.parametrize(("name", "path", "features"), TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_torchvision_models(name: str, path: str, features: int) -> None:
    models = pytest.importorskip("torchvision.models")
    model = getattr(models, name)(weights=None)
    head = replace_classifier(model, 100, 10, 16)
    assert model.get_submodule(path) is head
    assert head.in_features == features


TIMM = [
    ("resnet18", "fc"),
    ("efficientnet_b0", "classifier"),
    ("convnext_atto", "head.fc"),
    ("vit_tiny_patch16_224", "head"),
]


@pytest.mark.parametrize(("name", "path"), TIMM, ids=[t[0] for t in TIMM])
def test_timm_models(name: str, path: str) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False)
    features = model.get_classifier().in_features
    head = replace_classifier(model, 100, 10, 16)
    assert model.get_submodule(path) is head
    assert head.in_features == features
    assert model.num_classes == 1000
    assert model.get_classifier() is head
