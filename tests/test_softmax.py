"""HierarchicalSoftmax against the loop-based oracle, and its invariants."""

from __future__ import annotations

import copy
import io
import pickle
from unittest import mock

import pytest
import torch
from hypothesis import given
from reference import reference_log_probs, reference_predict
from strategies import Case, cases

import hsoftmax
from hsoftmax import HierarchicalSoftmax

# the contract: every test here runs on the reference path and on the fast paths
pytestmark = pytest.mark.usefixtures("path")

CONFIGS = [
    pytest.param(dict(n_top=4, n_bottom=5), id="full"),
    pytest.param(dict(n_top=4, n_bottom=5, num_classes=13), id="masked-tail"),
    pytest.param(dict(n_top=4, n_bottom=5, num_classes=9), id="empty-nodes"),
    pytest.param(dict(n_top=1, n_bottom=7), id="one-node"),
    pytest.param(dict(n_top=6, n_bottom=1), id="one-slot"),
    pytest.param(
        dict(n_top=3, n_bottom=4, class_slots=torch.tensor([11, 0, 5, 6, 2, 9, 1])), id="grouped"
    ),
]


def make_head(seed: int = 0, **kwargs: object) -> HierarchicalSoftmax:
    torch.manual_seed(seed)
    head = HierarchicalSoftmax(7, hidden=5, dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.mul_(4)
    return head


@pytest.mark.parametrize("config", CONFIGS)
def test_log_probs_match_reference(config: dict) -> None:
    head = make_head(**config)
    x = torch.randn(6, 7, dtype=torch.float64)
    torch.testing.assert_close(head.log_probs(x), reference_log_probs(head, x))


@pytest.mark.parametrize("config", CONFIGS)
def test_predict_matches_reference_routing(config: dict) -> None:
    head = make_head(**config)
    x = torch.randn(8, 7, dtype=torch.float64)
    assert torch.equal(head.predict(x), reference_predict(head, x))


@pytest.mark.parametrize("config", CONFIGS)
def test_topk_matches_reference(config: dict) -> None:
    head = make_head(**config)
    x = torch.randn(8, 7, dtype=torch.float64)
    expected = reference_log_probs(head, x).topk(min(3, head.num_classes))
    values, indices = head.topk(x, min(3, head.num_classes))
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(indices, expected.indices)


@given(cases())
def test_rows_are_normalised(case: Case) -> None:
    lp = case.head.log_probs(case.x)
    assert lp.shape == (case.x.shape[0], case.head.num_classes)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(case.x.shape[0], dtype=lp.dtype))


@pytest.mark.parametrize(
    "dense_ratio, dense_block",
    [(0, 2**20), (float("inf"), 2**20), (float("inf"), 1)],
    ids=["node-scan", "dense", "dense-node-by-node"],
)
@given(case=cases())
def test_exact_topk_equals_brute_force(
    case: Case, dense_ratio: float, dense_block: int, path: str
) -> None:
    lp = case.head.log_probs(case.x)
    fast = hsoftmax.fast_inference
    with mock.patch.object(fast, "_DENSE_SCAN_RATIO", dense_ratio), mock.patch.object(
        fast, "_DENSE_BLOCK", dense_block
    ):
        for k in {1, case.head.num_classes // 2, case.head.num_classes}:
            values, indices = case.head.topk(case.x, k)
            expected = lp.topk(k)
            torch.testing.assert_close(values, expected.values)
            torch.testing.assert_close(lp.gather(1, indices), expected.values)  # ties may swap
            assert all(len(set(row)) == k for row in indices.tolist())


@pytest.mark.parametrize("dense_block", [1, 2**20], ids=["node-by-node", "one-block"])
@given(case=cases())
def test_log_probs_without_autograd_equal_the_tracked_product(
    case: Case, dense_block: int, path: str
) -> None:
    tracked = case.head.log_probs(case.x)  # one product, under autograd
    assert tracked.requires_grad
    with torch.no_grad(), mock.patch.object(hsoftmax.fast_inference, "_DENSE_BLOCK", dense_block):
        torch.testing.assert_close(case.head.log_probs(case.x), tracked.detach())


@given(cases())
def test_predict_is_top1_routing_from_log_probs(case: Case) -> None:
    predicted = case.head.predict(case.x)
    expected = reference_predict(case.head, case.x)
    lp = case.head.log_probs(case.x)
    # equal, or a float tie between two candidates
    torch.testing.assert_close(lp.gather(1, predicted[:, None]), lp.gather(1, expected[:, None]))


@given(cases(max_top=1))
def test_one_node_is_a_plain_softmax(case: Case) -> None:
    head = case.head
    hidden = head.activation(head.proj(case.x))
    logits = hidden @ head.bottom_weight[0].T + head.bottom_bias[0]
    expected = logits.index_select(1, head.class_slots).log_softmax(-1)
    torch.testing.assert_close(head.log_probs(case.x), expected)


@given(cases())
def test_masked_positions_are_never_returned(case: Case) -> None:
    head = case.head
    classes = set(range(head.num_classes))
    assert set(head.predict(case.x).tolist()) <= classes
    assert set(head.topk(case.x, head.num_classes)[1].flatten().tolist()) == classes


def test_leading_dimensions_like_linear() -> None:
    head = make_head(n_top=3, n_bottom=4)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    flat = x.reshape(6, 7)
    assert head(x).hidden.shape == (2, 3, 5)
    torch.testing.assert_close(head.log_probs(x), head.log_probs(flat).view(2, 3, -1))
    assert torch.equal(head.predict(x), head.predict(flat).view(2, 3))
    values, indices = head.topk(x, 2)
    assert values.shape == indices.shape == (2, 3, 2)
    assert torch.equal(indices, head.topk(flat, 2)[1].view(2, 3, 2))


def test_topk_returns_exact_argmax_where_routing_does_not() -> None:
    head = make_head(n_top=20, n_bottom=20)
    x = torch.randn(400, 7, dtype=torch.float64)
    exact = head.log_probs(x).argmax(-1)
    assert torch.equal(head.topk(x, 1)[1].squeeze(-1), exact)
    assert (head.predict(x) != exact).any()  # top-1 routing is not the argmax


def test_topk_k_zero_and_k_all() -> None:
    head = make_head(n_top=3, n_bottom=4, num_classes=10)
    x = torch.randn(3, 7, dtype=torch.float64)
    values, indices = head.topk(x, 0)
    assert values.shape == indices.shape == (3, 0)
    assert sorted(head.topk(x, 10)[1][0].tolist()) == list(range(10))


def test_labels_beyond_float32_precision_use_integer_division() -> None:
    # 16_777_219 rounds to 16_777_220 in float32; (y / 4) would pick node 4_194_305.
    head = HierarchicalSoftmax(2, n_top=4_194_306, n_bottom=4, hidden=1)
    x = torch.randn(3, 2)
    y = torch.tensor([16_777_219, 16_777_216, 2**24 + 5])
    loss = hsoftmax.HierarchicalCrossEntropy(reduction="none")(head(x), y)
    z = head.activation(head.proj(x))
    node, slot = y // 4, y % 4
    bottom = torch.einsum("nsh,nh->ns", head.bottom_weight[node], z) + head.bottom_bias[node]
    expected = (
        head.top(z).log_softmax(-1)[torch.arange(3), node]
        + bottom.log_softmax(-1)[torch.arange(3), slot]
    )
    torch.testing.assert_close(loss, -expected)


def test_activation_is_configurable() -> None:
    head = HierarchicalSoftmax(4, 2, 3, 5, activation="tanh")
    assert isinstance(head.activation, torch.nn.Tanh)
    custom = HierarchicalSoftmax(4, 2, 3, 5, activation=torch.nn.SiLU())
    assert isinstance(custom.activation, torch.nn.SiLU)


def test_factory_kwargs_and_repr() -> None:
    head = HierarchicalSoftmax(4, 2, 3, 5, num_classes=5, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in head.parameters())
    assert head.num_classes == 5
    assert "n_top=2, n_bottom=3, hidden=5, num_classes=5" in repr(head)
    expected = 4 * 5 + 5 + 5 * 2 + 2 + 2 * 3 * 5 + 2 * 3
    assert sum(p.numel() for p in head.parameters()) == expected


def test_reset_parameters_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(1)
    first = HierarchicalSoftmax(4, 2, 3, 5)
    torch.manual_seed(1)
    second = HierarchicalSoftmax(4, 2, 3, 5)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    bound = 1 / 5**0.5
    assert first.bottom_weight.abs().max() <= bound


def _round_trips(head: HierarchicalSoftmax) -> list[HierarchicalSoftmax]:
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    loaded = HierarchicalSoftmax(7, 3, 4, 5, num_classes=7, dtype=torch.float64)
    loaded.load_state_dict(torch.load(buffer))
    return [loaded, pickle.loads(pickle.dumps(head)), copy.deepcopy(head)]


def test_state_round_trips_are_bit_identical() -> None:
    head = make_head(n_top=3, n_bottom=4, class_slots=torch.tensor([11, 0, 5, 6, 2, 9, 1]))
    x = torch.randn(5, 7, dtype=torch.float64)
    for copy_ in _round_trips(head):
        assert torch.equal(copy_.log_probs(x), head.log_probs(x))
        assert torch.equal(copy_.predict(x), head.predict(x))
        assert torch.equal(copy_.topk(x, 3)[1], head.topk(x, 3)[1])


@pytest.mark.parametrize("peak", [1.0, 30.0], ids=["flat-top", "peaked-top"])
def test_topk_on_larger_heads_matches_log_probs(peak: float) -> None:
    torch.manual_seed(3)
    head = HierarchicalSoftmax(16, 64, 8, 12, num_classes=500, dtype=torch.float64)
    with torch.no_grad():
        head.top.weight.mul_(peak)
    x = torch.randn(50, 16, dtype=torch.float64)
    lp = head.log_probs(x)
    values, indices = head.topk(x, 5)
    torch.testing.assert_close(values, lp.topk(5).values)
    torch.testing.assert_close(lp.gather(1, indices), values)


def test_meta_device_construction_for_counting() -> None:
    head = HierarchicalSoftmax(1792, 1000, 80, 128, num_classes=79_990, device="meta")
    assert head.bottom_weight.is_meta and head.slot_mask is not None and head.slot_mask.is_meta
    assert sum(p.numel() for p in head.parameters()) == 10_678_504
