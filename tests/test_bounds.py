"""The int8 upper bounds that prune the exact top-k, against float64 brute force."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference import reference_log_probs
from strategies import Case, cases

from hsoftmax import HierarchicalSoftmax, bounds, fast_inference

pytestmark = pytest.mark.usefixtures("fast")
NO_INT8 = not bounds._int8_products_correct()


@pytest.fixture(autouse=True, params=["int8", "float"])
def products(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the largest logits from int8 products and from float ones."""
    if request.param == "int8" and NO_INT8:
        pytest.skip("no oneDNN int8 products here")
    monkeypatch.setattr(bounds, "_int8_products_fast", lambda: request.param == "int8")
    return str(request.param)


def _inputs(head: HierarchicalSoftmax, x: torch.Tensor) -> tuple:
    out = head(x)
    top = F.log_softmax(out.top_logits, -1)
    return out.bottom_weight, out.bottom_bias, out.slot_mask, out.hidden, top


def _best_per_node(head: HierarchicalSoftmax, x: torch.Tensor) -> torch.Tensor:
    """``(N, n_top)`` float64 log-probability of each node's best class, ``-inf`` if empty."""
    lp = reference_log_probs(head, x)
    nodes = head.class_slots // head.n_bottom
    best = torch.full((x.shape[0], head.n_top), -math.inf, dtype=torch.float64)
    return best.scatter_reduce(1, nodes.expand_as(lp), lp, "amax")


@given(case=cases(), block=st.integers(1, 5))
def test_bounds_hold_for_every_node(case: Case, block: int) -> None:
    with torch.no_grad():
        weight, bias, mask, hidden, top = _inputs(case.head, case.x)
        bound = bounds.node_bounds(weight, bias, mask, hidden, top, block)
    best = _best_per_node(case.head, case.x)
    assert bound.shape == best.shape and bound.dtype == top.dtype
    empty = best == -math.inf
    assert torch.all(bound[empty] == -math.inf)
    assert torch.all(bound[~empty] >= best[~empty] - 1e-9 * (1 + best[~empty].abs()))


@given(
    case=cases(),
    scales=st.tuples(*[st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 1e3, 1e6])] * 3),
)
def test_maxima_stay_within_their_error_and_means_are_exact(
    case: Case, scales: tuple, products: str
) -> None:
    head, (w_scale, b_scale, h_scale) = case.head, scales
    weight = head.bottom_weight.detach() * w_scale
    bias = head.bottom_bias.detach() * b_scale
    hidden = head.activation(head.proj(case.x)).detach() * h_scale
    mask = head.slot_mask
    maxima = bounds._int8_node_logits if products == "int8" else bounds._float_node_logits
    largest, error = maxima(weight, bias, mask, hidden, 2)
    mean = bounds._mean_logits(weight, bias, mask, hidden)
    logits = torch.einsum("bh,tsh->tbs", hidden, weight) + bias[:, None]
    valid = torch.ones_like(bias, dtype=torch.bool) if mask is None else mask
    exact = logits.masked_fill(~valid[:, None], -math.inf).amax(-1)
    occupied = (exact > -math.inf).expand_as(largest)
    assert torch.all(error >= 0)
    assert torch.all((largest - exact).abs()[occupied] <= error[occupied])
    share = valid[:, None].double() / valid.sum(-1).clamp_min(1)[:, None, None]
    expected_mean = (logits * share).sum(-1)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-9 * (1 + logits.abs().max()))


def test_bounds_hold_in_float32() -> None:
    torch.manual_seed(0)
    head = HierarchicalSoftmax(12, 30, 9, 16, num_classes=263)
    x = torch.randn(40, 12)
    with torch.no_grad():
        weight, bias, mask, hidden, top = _inputs(head, x)
        bound = bounds.node_bounds(weight, bias, mask, hidden, top, 7)
    best = _best_per_node(head, x)
    occupied = best > -math.inf
    assert torch.all(bound.double()[occupied] >= best[occupied] - 1e-5)
    assert torch.all(bound[~occupied] == -math.inf)


@given(cases())
def test_topk_pruned_by_the_bounds_equals_brute_force(case: Case) -> None:
    head, x = case.head, case.x
    lp = head.log_probs(x)
    with torch.no_grad():
        weight, bias, mask, hidden, top = _inputs(head, x)
        bound = bounds.node_bounds(weight, bias, mask, hidden, top, 3)
        out = head(x)
        for k in {1, head.num_classes // 2, head.num_classes}:
            values, positions = fast_inference._pruned_topk(out, hidden, top, bound, k, tight=True)
            indices = positions if out.slot_classes is None else out.slot_classes[positions]
            expected = lp.topk(k)
            torch.testing.assert_close(values, expected.values)
            torch.testing.assert_close(lp.gather(1, indices), expected.values)
            assert all(len(set(row)) == k for row in indices.tolist())


def test_untrained_head_topk_takes_the_bounds() -> None:
    torch.manual_seed(1)
    head = HierarchicalSoftmax(16, 64, 8, 12, num_classes=500)  # flat top: bounds needed
    x = torch.randn(64, 16)
    lp = head.log_probs(x)
    spy = mock.Mock(wraps=bounds.node_bounds)
    with (
        mock.patch.object(fast_inference, "node_bounds", spy),
        mock.patch.object(fast_inference, "_BOUND_ROWS", 1),
    ):
        values, indices = head.topk(x, 5)
    assert spy.called
    torch.testing.assert_close(values, lp.topk(5).values)
    torch.testing.assert_close(lp.gather(1, indices), values)


def test_bounds_apply_to_full_precision_on_the_cpu() -> None:
    assert bounds.bounds_apply(torch.zeros(2, 3, dtype=torch.float64))
    assert not bounds.bounds_apply(torch.zeros(2, 3, dtype=torch.float16))
    assert not bounds.bounds_apply(torch.zeros(2, 3, device="meta"))


def test_rows_that_go_dense_share_one_pass() -> None:
    torch.manual_seed(2)
    head = HierarchicalSoftmax(16, 64, 8, 12, num_classes=500)
    with torch.no_grad():
        head.top.weight.mul_(3)  # rows need different numbers of nodes
    x = torch.randn(64, 16)
    lp = head.log_probs(x)
    spy = mock.Mock(wraps=fast_inference._dense_topk)
    with (
        mock.patch.object(fast_inference, "_dense_topk", spy),
        mock.patch.object(fast_inference, "_dense_is_cheaper", lambda count, *_: count > 2),
        mock.patch.object(fast_inference, "bounds_apply", lambda _: False),
    ):
        values, indices = head.topk(x, 5)
        out = head(x)
        top = F.log_softmax(out.top_logits, -1)
        first = top.topk(1).values[:, :1]
    needed = (top >= first - 1).sum(-1)  # rows differ in how many nodes they may need
    assert len(set(needed.tolist())) > 2
    assert spy.call_count == 1
    torch.testing.assert_close(values, lp.topk(5).values)
    torch.testing.assert_close(lp.gather(1, indices), values)


def test_bounds_are_tight_where_node_softmaxes_are_flat() -> None:
    torch.manual_seed(3)
    head = HierarchicalSoftmax(32, 50, 40, 64)  # at initialisation: nearly flat softmaxes
    x = torch.randn(64, 32)
    with torch.no_grad():
        bound = bounds.node_bounds(*_inputs(head, x))
    slack = bound.double() - _best_per_node(head, x)
    assert slack.min() > -1e-5 and slack.mean() < 0.1  # a few hundredths at this size
