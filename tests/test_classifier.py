"""Tests of hsoftmax.classifier on look-alikes of torchvision and timm models, and the real ones."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from hsoftmax import HierarchicalCrossEntropy, HierarchicalOutput, HierarchicalSoftmax
from hsoftmax.classifier import (
    CLASSIFIER_PATHS,
    CONVENTIONS,
    find_classifier,
    replace_classifier,
)

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


class ViTSequentialLike(_Backbone):
    """A ``heads`` Sequential whose last layer is the Linear, under another name than ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.Sequential(nn.Linear(FEATURES, 1000), nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.feats(x))


class CadeneLike(_Backbone):
    """pretrainedmodels (Cadene): ``last_linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.last_linear = nn.Linear(FEATURES, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_linear(self.feats(x))


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
    """timm's conventions: ``get_classifier()`` returns the final Linear; ``reset_classifier(
    num_classes, global_pool=None)`` rebuilds it (an ``Identity`` for 0) and sets
    ``num_classes``; ``num_features``; dropout (``drop_rate``) applied before the classifier."""

    def __init__(self, num_classes: int = 1000, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_features = FEATURES
        self.drop_rate = drop_rate
        self.resets: list[int] = []
        self.num_classes = num_classes
        if num_classes == 0:
            self.head.fc = nn.Identity()  # type: ignore[assignment]

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.resets.append(num_classes)
        self.num_classes = num_classes
        new: nn.Module = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.head.fc = new  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.dropout(self.head.norm(self.feats(x)), self.drop_rate, self.training)
        return self.head.fc(x)


class EfficientNetPytorchLike(_Backbone):
    """efficientnet_pytorch (lukemelas): ``_dropout`` then ``_fc``, separate modules."""

    def __init__(self) -> None:
        super().__init__()
        self._dropout = nn.Dropout(0.4)
        self._fc = nn.Linear(FEATURES, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self._dropout(self.feats(x)))


class NanoGPTLike(_Backbone):
    """nanoGPT: ``lm_head`` tied to the token embedding, no ``get_output_embeddings``."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(1000, FEATURES)
        self.lm_head = nn.Linear(FEATURES, 1000, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.feats(x))


class HFCausalLMLike(_Backbone):
    """transformers' conventions: ``get_output_embeddings()``/``set_output_embeddings()``,
    ``config.tie_word_embeddings``, ``all_tied_weights_keys`` and a ``tie_weights()`` that
    assigns the input embedding's weight to ``lm_head.weight`` when the config says so."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(tie_word_embeddings=True)
        self.wte = nn.Embedding(1000, FEATURES)
        self.lm_head = nn.Linear(FEATURES, 1000, bias=False)
        self.all_tied_weights_keys = {"lm_head.weight": "wte.weight"}
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new: nn.Module) -> None:
        self.lm_head = new  # type: ignore[assignment]

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.feats(x))


class SqueezeNetLike(_Backbone):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(FEATURES, 1000, 1), nn.ReLU())


# (model, path of its final Linear, the convention that finds it)
CASES: list[tuple[Callable[[], nn.Module], str, str]] = [
    (TimmLike, "head.fc", "get_classifier()"),
    (HFCausalLMLike, "lm_head", "get_output_embeddings()"),
    (ResNetLike, "fc", "fc"),
    (EfficientNetLike, "classifier.1", "classifier"),
    (VGGLike, "classifier.3", "classifier"),
    (DenseNetLike, "classifier", "classifier"),
    (ConvNeXtLike, "classifier.2", "classifier"),
    (SwinLike, "head", "head"),
    (ViTLike, "heads.head", "heads.head"),
    (ViTSequentialLike, "heads.0", "heads"),
    (HeadFcLike, "head.fc", "head.fc"),
    (CadeneLike, "last_linear", "last_linear"),
    (EfficientNetPytorchLike, "_fc", "_fc"),
    (NanoGPTLike, "lm_head", "lm_head"),
]


def test_every_convention_has_a_case() -> None:
    assert [c.name for c in CONVENTIONS] == list(dict.fromkeys(case[2] for case in CASES))
    assert tuple(c.name for c in CONVENTIONS[2:]) == CLASSIFIER_PATHS


@pytest.mark.parametrize(("make", "path", "convention"), CASES, ids=[c[0].__name__ for c in CASES])
def test_find_classifier_convention(
    make: Callable[[], nn.Module], path: str, convention: str
) -> None:
    found = [c for c in CONVENTIONS if c.locate(make())[0] is not None]
    assert found[0].name == convention
    assert find_classifier(make()) == path


@pytest.mark.parametrize(("make", "path", "convention"), CASES, ids=[c[0].__name__ for c in CASES])
def test_replace_classifier_lookalikes(
    make: Callable[[], nn.Module], path: str, convention: str
) -> None:
    torch.manual_seed(0)
    model = make()
    assert find_classifier(model) == path
    in_features = model.get_submodule(path).in_features
    head = replace_classifier(model, n_top=50, n_bottom=20, hidden=8)
    assert isinstance(head, HierarchicalSoftmax)
    assert model.get_submodule(path) is head
    assert (head.in_features, head.n_top, head.n_bottom, head.hidden) == (in_features, 50, 20, 8)
    assert head.num_classes == 1000
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
    head = replace_classifier(model, 40, 25, 4, dtype=torch.float32)
    assert head.proj.weight.dtype == torch.float32


def test_replace_classifier_device(device: torch.device) -> None:
    model = ResNetLike().to(device)
    head = replace_classifier(model, 40, 25, 4)
    assert head.proj.weight.device.type == device.type
    assert head.class_slots.device.type == device.type


# -- the class count comes from the old head ---------------------------------------------------


def _resnet(num_classes: int) -> nn.Module:
    model = ResNetLike()
    model.fc = nn.Linear(FEATURES, num_classes)
    return model


def test_class_count_taken_from_the_old_head() -> None:
    """resnet18(num_classes=10_000) with 128 x 80 used to become a 10,240-class head whose
    predict returned classes that do not exist."""
    torch.manual_seed(0)
    model = _resnet(10_000)
    head = replace_classifier(model, n_top=128, n_bottom=80, hidden=8)
    assert head.num_classes == 10_000
    x = torch.randn(16, FEATURES)
    with torch.no_grad():
        head.bottom_bias[125:, :] = 50.0  # favour the trailing nodes, where the unused slots are
        assert head.log_probs(x).shape == (16, 10_000)
        assert int(head.predict(x).max()) < 10_000
        assert int(head.topk(x, 5)[1].max()) < 10_000


def test_shape_too_small_for_the_old_head_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"expected n_top \* n_bottom >= 10000 \(the out_features "
                       r"of the old classifier fc\), got 64 \* 80 = 5120"):
        replace_classifier(_resnet(10_000), n_top=64, n_bottom=80, hidden=8)


def test_num_classes_overrides_the_old_head() -> None:
    head = replace_classifier(_resnet(10_000), n_top=64, n_bottom=80, hidden=8, num_classes=5000)
    assert head.num_classes == 5000
    with pytest.raises(ValueError, match=r"expected n_top \* n_bottom >= 6000 \(num_classes\), "
                       r"got 64 \* 80 = 5120"):
        replace_classifier(_resnet(10_000), 64, 80, 8, num_classes=6000)


def test_class_slots_must_match_the_old_head() -> None:
    slots = torch.randperm(1200)[:900]
    with pytest.raises(ValueError, match=r"expected class_slots of length 1000 \(the out_features "
                       r"of the old classifier fc\), got 900; pass num_classes="):
        replace_classifier(ResNetLike(), 40, 30, 4, class_slots=slots)
    head = replace_classifier(ResNetLike(), 40, 30, 4, class_slots=slots, num_classes=900)
    assert head.num_classes == 900


def test_lazy_linear_asks_for_a_forward_pass() -> None:
    model = ResNetLike()
    model.fc = nn.LazyLinear(1000)
    with pytest.raises(ValueError, match=r"uninitialised LazyLinear at fc \(in_features unknown\); "
                       r"run one forward pass"):
        replace_classifier(model, 40, 25, 4)
    model(torch.randn(2, 3, 4, 4))  # LazyLinear becomes a Linear(FEATURES, 1000)
    head = replace_classifier(model, 40, 25, 4)
    assert (head.in_features, head.num_classes) == (FEATURES, 1000)


def test_dropout_after_the_final_linear_is_refused() -> None:
    """A Dropout after the Linear would act on logits the hierarchical head does not have."""
    model = ResNetLike()
    model.fc = nn.Sequential(nn.Linear(FEATURES, 1000), nn.Dropout())  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"fc is a Sequential ending in Dropout"):
        replace_classifier(model, 40, 25, 4)


# -- dropout before the classifier is kept -----------------------------------------------------


@pytest.mark.parametrize(("make", "dropout"), [
    (EfficientNetLike, "classifier.0"), (EfficientNetPytorchLike, "_dropout"),
], ids=["torchvision", "efficientnet_pytorch"])
def test_dropout_before_the_classifier_is_kept(
    make: Callable[[], nn.Module], dropout: str
) -> None:
    model = make()
    kept = model.get_submodule(dropout)
    replace_classifier(model, 40, 25, 4)
    assert model.get_submodule(dropout) is kept
    assert isinstance(kept, nn.Dropout) and kept.p == 0.4


def test_timm_dropout_is_kept() -> None:
    """The head's input is dropped out in training mode, as timm's drop_rate does."""
    torch.manual_seed(0)
    model = TimmLike(drop_rate=0.5)
    head = replace_classifier(model, 40, 25, 4)
    seen: list[Tensor] = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.train()(torch.randn(4, 3, 4, 4))
    model.eval()(torch.randn(4, 3, 4, 4))
    assert (seen[0] == 0).any() and not (seen[1] == 0).any()


# -- timm --------------------------------------------------------------------------------------


def test_timm_the_timm_way() -> None:
    """reset_classifier(0) (no throw-away Linear of num_classes), then the head in its place."""
    model = TimmLike()
    head = replace_classifier(model, 10, 8, 4, num_classes=77)
    assert model.resets == [0]
    assert model.get_classifier() is head
    assert model.num_classes == 77
    assert isinstance(model(torch.randn(2, 3, 4, 4)), HierarchicalOutput)


def test_timm_without_classifier_errors() -> None:
    with pytest.raises(ValueError, match=r"get_classifier\(\) returned head\.fc is a Identity"):
        replace_classifier(TimmLike(num_classes=0), 10, 8, 4)


# -- transformers ------------------------------------------------------------------------------


def test_transformers_like_unties_the_embedding() -> None:
    """A tied lm_head: without untying, a later tie_weights() grafted the embedding matrix
    onto the head as a stray ``weight``."""
    model = HFCausalLMLike()
    embedding = model.wte.weight
    head = replace_classifier(model, 40, 25, 4)
    assert model.lm_head is head
    assert model.config.tie_word_embeddings is False
    assert model.all_tied_weights_keys == {}
    model.tie_weights()
    assert not hasattr(head, "weight")
    assert model.wte.weight is embedding


def test_no_classifier_error_names_what_was_tried() -> None:
    with pytest.raises(ValueError, match=r"expected a single final nn\.Linear classifier") as info:
        replace_classifier(SqueezeNetLike(), 10, 8, 4)
    message = str(info.value)
    assert "fc is missing" in message
    assert "classifier is a Sequential ending in ReLU" in message
    assert "heads.head is missing" in message
    assert "_fc is missing" in message
    assert "get_classifier" not in message  # a method the model does not have is not listed


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"expected an nn\.Module, got int"):
        replace_classifier(3, 10, 8, 4)  # type: ignore[arg-type]


# -- the real packages, where they install -----------------------------------------------------


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


def test_efficientnet_pytorch() -> None:
    """The paper's backbone package: ``_fc`` replaced, ``_dropout`` kept."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    model = efficientnet_pytorch.EfficientNet.from_name(  # a narrow, shallow B0: fast
        "efficientnet-b0", num_classes=3000, image_size=32, width_coefficient=0.25,
        depth_coefficient=0.25, dropout_rate=0.4,
    )
    dropout = model._dropout
    head = replace_classifier(model, n_top=60, n_bottom=50, hidden=16)
    assert model._fc is head and model._dropout is dropout and dropout.p == 0.4
    assert (head.in_features, head.num_classes) == (320, 3000)
    out = model(torch.randn(2, 3, 32, 32))
    HierarchicalCrossEntropy()(out, torch.tensor([0, 2999])).backward()
    assert head.proj.weight.grad is not None


def test_transformers_gpt2() -> None:
    """A tiny randomly initialised GPT-2 (built from a config, nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=1000, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied by default
    embedding = model.transformer.wte.weight
    assert find_classifier(model) == "lm_head"
    head = replace_classifier(model, n_top=40, n_bottom=25, hidden=16)
    assert model.get_output_embeddings() is head
    assert head.num_classes == 1000
    assert model.config.tie_word_embeddings is False
    model.tie_weights()
    assert not hasattr(head, "weight")
    assert model.transformer.wte.weight is embedding
    ids = torch.randint(0, 1000, (2, 8))
    hidden = model.base_model(ids).last_hidden_state
    loss = HierarchicalCrossEntropy()(head(hidden[:, :-1]), ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and head.proj.weight.grad is not None
