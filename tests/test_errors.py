"""Bad input gets a clear error from the library, saying what was expected and what was passed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((0, 2, 3, 4), {}, ValueError, r"in_features to be a positive int, got 0"),
        ((4, -1, 3, 4), {}, ValueError, r"n_top to be a positive int, got -1"),
        ((4, 2, 2.5, 4), {}, ValueError, r"n_bottom to be a positive int, got 2.5"),
        ((4, 2, 3, True), {}, ValueError, r"hidden to be a positive int, got True"),
        ((4, 2, 3, 4), {"num_classes": 7}, ValueError, r"num_classes in \[1, 6\].*got 7"),
        ((4, 2, 3, 4), {"num_classes": 0}, ValueError, r"num_classes to be a positive int, got 0"),
        ((4, 2, 3, 4), {"dtype": torch.int64}, TypeError, r"floating torch.dtype.*got torch.int64"),
        ((4, 2, 3, 4), {"dtype": "float32"}, TypeError, r"floating torch.dtype.*got 'float32'"),
        ((4, 2, 3, 4), {"sparse": "yes"}, TypeError, r"expected sparse to be a bool, got 'yes'"),
        ((4, 2, 3, 4), {"activation": "swish"}, ValueError, r"activation in .*got 'swish'"),
        ((4, 2, 3, 4), {"class_slots": [0, 1]}, TypeError, r"class_slots to be a torch.Tensor"),
        (
            (4, 2, 3, 4),
            {"class_slots": torch.tensor([0.0, 1.0])},
            TypeError,
            r"class_slots of an integer dtype, got torch.float32",
        ),
        (
            (4, 2, 3, 4),
            {"class_slots": torch.tensor([0, 6]), "num_classes": 2},
            ValueError,
            r"class_slots in \[0, 6\).*got values in \[0, 6\]",
        ),
        (
            (4, 2, 3, 4),
            {"class_slots": torch.tensor([1, 1])},
            ValueError,
            r"distinct positions",
        ),
        (
            (4, 2, 3, 4),
            {"class_slots": torch.tensor([1, 2]), "num_classes": 3},
            ValueError,
            r"class_slots of shape \(3,\).*got \(2,\)",
        ),
    ],
)
def test_constructor_errors(args: tuple, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        HierarchicalSoftmax(*args, **kwargs)


@pytest.fixture
def head() -> HierarchicalSoftmax:
    return HierarchicalSoftmax(4, 2, 3, 5, num_classes=5)


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.randn(3, 5), ValueError, r"shape \(\*, 4\).*got \(3, 5\)"),
        (torch.tensor(1.0), ValueError, r"shape \(\*, 4\).*got \(\)"),
        (torch.ones(3, 4, dtype=torch.long), TypeError, r"floating-point input, got torch.int64"),
        ([[1.0] * 4], TypeError, r"torch.Tensor, got list"),
    ],
)
def test_input_errors(head: HierarchicalSoftmax, x: Any, error: type, message: str) -> None:
    for call in (head, head.log_probs, head.predict, lambda v: head.topk(v, 1)):
        with pytest.raises(error, match=message):
            call(x)


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (torch.tensor([0, 5, 1]), IndexError, r"target in \[0, 5\).*got values in \[5, 5\]"),
        (torch.tensor([-3, 2, 9]), IndexError, r"ignore_index=-100, got values in \[-3, 9\]"),
        (
            torch.tensor([0.0, 1.0, 2.0]),
            TypeError,
            r"integer dtype \(class ids\), got torch.float32",
        ),
        (torch.tensor([0, 1]), ValueError, r"target of shape \(3,\).*got \(2,\)"),
        (torch.tensor([[0, 1, 2]]), ValueError, r"target of shape \(3,\).*got \(1, 3\)"),
        ([0, 1, 2], TypeError, r"target to be a torch.Tensor, got list"),
    ],
)
def test_target_errors(head: HierarchicalSoftmax, target: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        HierarchicalCrossEntropy()(head(torch.randn(3, 4)), target)


def test_weight_of_wrong_length(head: HierarchicalSoftmax) -> None:
    criterion = HierarchicalCrossEntropy(weight=torch.ones(6))
    with pytest.raises(ValueError, match=r"weight of shape \(5,\).*got \(6,\)"):
        criterion(head(torch.randn(3, 4)), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"1-D tensor.*got \(2, 3\)"):
        HierarchicalCrossEntropy(weight=torch.ones(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "average"}, r"reduction in \('none', 'mean', 'sum'\), got 'average'"),
        ({"label_smoothing": 1.5}, r"label_smoothing in \[0, 1\], got 1.5"),
        ({"label_smoothing": -0.1}, r"label_smoothing in \[0, 1\], got -0.1"),
    ],
)
def test_loss_option_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HierarchicalCrossEntropy(**kwargs)


def test_topk_errors(head: HierarchicalSoftmax) -> None:
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"k in \[0, 5\] \(num_classes\), got 6"):
        head.topk(x, 6)
    with pytest.raises(ValueError, match=r"k in \[0, 5\].*got -1"):
        head.topk(x, -1)
    with pytest.raises(TypeError, match=r"k to be an int, got float"):
        head.topk(x, 2.0)  # type: ignore[arg-type]
