"""HierarchicalCrossEntropy against F.cross_entropy, the written-out references, and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference import reference_log_probs, reference_loss, reference_smoothed_loss
from strategies import Case, cases

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax
from hsoftmax.functional import gold_log_prob

# the contract: every test here runs on the reference path and on the fast paths
pytestmark = pytest.mark.usefixtures("path")


def make_case(num_classes: int | None = 17, batch: int = 9, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    head = HierarchicalSoftmax(6, 4, 5, 3, num_classes=num_classes, dtype=torch.float64)
    x = torch.randn(batch, 6, dtype=torch.float64)
    return Case(head, x, torch.randint(0, head.num_classes, (batch,)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("ignored", [False, True], ids=["all-kept", "some-ignored"])
def test_equals_cross_entropy_of_log_probs(reduction: str, weighted: bool, ignored: bool) -> None:
    case = make_case()
    target = case.target.clone()
    if ignored:
        target[::3] = -100
    weight = torch.rand(17, dtype=torch.float64) + 0.1 if weighted else None
    loss = HierarchicalCrossEntropy(weight=weight, reduction=reduction)(case.head(case.x), target)
    lp = case.head.log_probs(case.x)
    expected = F.cross_entropy(lp, target, weight=weight, reduction=reduction)
    torch.testing.assert_close(loss, expected)
    oracle = reference_loss(reference_log_probs(case.head, case.x), target, weight, -100, reduction)
    torch.testing.assert_close(loss, oracle)


@given(cases(), st.sampled_from(["mean", "sum", "none"]), st.integers(-3, 3))
def test_loss_is_minus_log_prob_of_target(case: Case, reduction: str, ignore_index: int) -> None:
    target = case.target.clone()
    target[0] = ignore_index if ignore_index < 0 else target[0]
    weight = torch.rand(case.head.num_classes, dtype=torch.float64) + 0.5
    criterion = HierarchicalCrossEntropy(weight, ignore_index=ignore_index, reduction=reduction)
    lp = case.head.log_probs(case.x)
    expected = F.cross_entropy(lp, target, weight, ignore_index=ignore_index, reduction=reduction)
    torch.testing.assert_close(criterion(case.head(case.x), target), expected, equal_nan=True)


@given(cases(), st.floats(0.0, 1.0))
def test_label_smoothing_matches_written_out_reference(case: Case, epsilon: float) -> None:
    loss = HierarchicalCrossEntropy(label_smoothing=epsilon)(case.head(case.x), case.target)
    expected = reference_smoothed_loss(case.head, case.x, case.target, epsilon)
    torch.testing.assert_close(loss, expected)


def test_label_smoothing_is_per_level_cross_entropy() -> None:
    case = make_case(num_classes=None)
    head, eps = case.head, 0.2
    out = head(case.x)
    node, slot = case.target // 5, case.target % 5
    bottom = torch.einsum("nsh,nh->ns", head.bottom_weight[node], out.hidden)
    bottom = bottom + head.bottom_bias[node]
    expected = F.cross_entropy(out.top_logits, node, label_smoothing=eps) + F.cross_entropy(
        bottom, slot, label_smoothing=eps
    )
    loss = HierarchicalCrossEntropy(label_smoothing=eps)(out, case.target)
    torch.testing.assert_close(loss, expected)


def test_all_targets_ignored_gives_nan_mean_like_torch() -> None:
    case = make_case()
    target = torch.full_like(case.target, -100)
    loss = HierarchicalCrossEntropy()(case.head(case.x), target)
    expected = F.cross_entropy(case.head.log_probs(case.x), target)
    assert loss.isnan() and expected.isnan()
    assert HierarchicalCrossEntropy(reduction="sum")(case.head(case.x), target) == 0


def test_gold_path_does_not_touch_other_nodes() -> None:
    case = make_case(num_classes=None)
    target = torch.tensor([0, 1, 7, 8])  # nodes 0 and 1 only
    with torch.no_grad():
        case.head.bottom_weight[2:] = float("nan")
        case.head.bottom_bias[2:] = float("nan")
    loss = HierarchicalCrossEntropy()(case.head(case.x[:4]), target)
    assert torch.isfinite(loss)
    loss.backward()
    grad = case.head.bottom_weight.grad
    assert grad is not None and grad[2:].abs().sum() == 0 and grad[:2].abs().sum() > 0


def test_every_parameter_gets_a_gradient() -> None:
    case = make_case()
    HierarchicalCrossEntropy()(case.head(case.x), case.target).backward()
    assert all(p.grad is not None for p in case.head.parameters())


def test_leading_dimensions_and_reduction_none_shape() -> None:
    case = make_case(batch=12)
    x, target = case.x.view(3, 4, 6), case.target.view(3, 4)
    loss = HierarchicalCrossEntropy(reduction="none")(case.head(x), target)
    assert loss.shape == (3, 4)
    flat = HierarchicalCrossEntropy(reduction="none")(case.head(case.x), case.target)
    torch.testing.assert_close(loss.flatten(), flat)


def test_gold_log_prob_matches_log_probs() -> None:
    case = make_case()
    gold = gold_log_prob(case.head(case.x), case.target)
    expected = case.head.log_probs(case.x).gather(1, case.target[:, None]).squeeze(1)
    torch.testing.assert_close(gold, expected)


@pytest.mark.parametrize("smoothing", [0.0, 0.3], ids=["plain", "smoothed"])
def test_gradcheck_float64(smoothing: float) -> None:
    case = make_case(num_classes=17, batch=4)
    head = case.head
    target = torch.tensor([3, 16, -100, 9])
    weight = torch.rand(17, dtype=torch.float64) + 0.5
    criterion = HierarchicalCrossEntropy(weight, label_smoothing=smoothing)
    names = [name for name, _ in head.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_() for p in head.parameters())
    x = case.x[:4].clone().requires_grad_()

    def loss_of(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        state = dict(zip(names, params))
        out = torch.func.functional_call(head, state, (x,))
        return criterion(out, target)

    assert torch.autograd.gradcheck(loss_of, (x, *inputs))
