"""Tests of hsoftmax.builders: taxonomy packing, balanced clustering, shape suggestion."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax
from hsoftmax.builders import slots_from_embeddings, slots_from_taxonomy, suggest_shape
from hsoftmax.grouping import check_class_slots


def _nodes_of_groups(parents: list[int], slots: torch.Tensor, n_bottom: int) -> dict[int, set]:
    nodes: dict[int, set] = {}
    for c, p in enumerate(parents):
        nodes.setdefault(p, set()).add(int(slots[c]) // n_bottom)
    return nodes


# ---------------------------------------------------------------- suggest_shape


@given(num_classes=st.integers(min_value=1, max_value=200_000))
def test_suggest_shape_properties(num_classes: int) -> None:
    n_top, n_bottom = suggest_shape(num_classes)
    assert n_top * n_bottom >= num_classes
    assert n_top * n_bottom - num_classes < n_bottom  # no whole node wasted
    assert n_bottom <= math.ceil(math.sqrt(num_classes))
    best = min(-(-num_classes // b) + b for b in range(1, math.isqrt(num_classes) + 2))
    assert n_top + n_bottom <= best * 1.05


@pytest.mark.parametrize(
    ("num_classes", "shape"),
    [(1, (1, 1)), (100, (10, 10)), (1000, (40, 25)), (80_000, (320, 250)), (10**6, (1000, 1000))],
    ids=["1", "100", "1000", "80000", "1e6"],
)
def test_suggest_shape_values(num_classes: int, shape: tuple[int, int]) -> None:
    assert suggest_shape(num_classes) == shape


def test_suggest_shape_tolerance_zero_gives_smallest_sum() -> None:
    n_top, n_bottom = suggest_shape(80_000, tolerance=0)
    assert n_top + n_bottom == 566


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, r"expected num_classes to be a positive int, got 0"),
        ({"num_classes": 10.0}, r"expected num_classes to be a positive int, got 10\.0"),
        ({"num_classes": 10, "tolerance": -1}, r"to be a finite number >= 0, got -1"),
        ({"num_classes": 10, "tolerance": float("nan")}, r"to be a finite number >= 0, got nan"),
    ],
    ids=["zero", "float", "negative-tolerance", "nan-tolerance"],
)
def test_suggest_shape_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        suggest_shape(**kwargs)


# ---------------------------------------------------------------- taxonomy


def test_taxonomy_small_groups_share_nodes_and_stay_whole() -> None:
    parents = [0, 1, 0, 2, 1, 0, 3, 3, 2, 1]  # sizes 3, 3, 2, 2
    slots = slots_from_taxonomy(parents, n_top=3, n_bottom=4)
    check_class_slots(slots, 10, 3, 4)
    nodes = _nodes_of_groups(parents, slots, 4)
    assert all(len(n) == 1 for n in nodes.values())
    # best-fit decreasing: the two 3-groups open nodes 0 and 1, the 2-groups need a third
    assert nodes == {0: {0}, 1: {1}, 2: {2}, 3: {2}}


def test_taxonomy_large_group_split_into_whole_nodes() -> None:
    parents = [5] * 9 + [7] * 2  # 9 = 2 whole nodes of 4, remainder 1
    slots = slots_from_taxonomy(parents, n_top=4, n_bottom=4)
    check_class_slots(slots, 11, 4, 4)
    node = (slots // 4).tolist()
    assert node[:8] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert node[9] == node[10]  # the small group stays whole
    # within a node, siblings are contiguous and in class-id order
    assert (slots[:8] == torch.arange(8)).all()


def test_taxonomy_splits_when_no_node_has_room() -> None:
    parents = [0, 0, 0, 1, 1, 1, 2, 2, 2]  # three groups of 3 in three nodes of 4: none split
    slots = slots_from_taxonomy(torch.tensor(parents), n_top=3, n_bottom=4)
    check_class_slots(slots, 9, 3, 4)
    nodes = _nodes_of_groups(parents, slots, 4)
    assert sorted(len(n) for n in nodes.values()) == [1, 1, 1]
    tight = slots_from_taxonomy(parents, n_top=2, n_bottom=5)  # 10 slots for 9 classes
    check_class_slots(tight, 9, 2, 5)
    assert sorted(len(n) for n in _nodes_of_groups(parents, tight, 5).values()) == [1, 1, 2]


@given(
    parents=st.lists(st.integers(min_value=-3, max_value=12), min_size=1, max_size=120),
    n_bottom=st.integers(min_value=1, max_value=9),
    extra=st.integers(min_value=0, max_value=4),
)
def test_taxonomy_valid_and_keeps_groups_whole_with_room(
    parents: list[int], n_bottom: int, extra: int
) -> None:
    num_classes = len(parents)
    n_top = -(-num_classes // n_bottom) + extra
    slots = slots_from_taxonomy(parents, n_top, n_bottom)
    assert slots.dtype == torch.long
    check_class_slots(slots, num_classes, n_top, n_bottom)
    # with one node per group to spare, no small group is ever split
    sizes = {p: parents.count(p) for p in set(parents)}
    if n_top >= sum(s // n_bottom + (s % n_bottom > 0) for s in sizes.values()):
        nodes = _nodes_of_groups(parents, slots, n_bottom)
        for p, size in sizes.items():
            assert len(nodes[p]) == -(-size // n_bottom)


def test_taxonomy_deterministic() -> None:
    parents = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(slots_from_taxonomy(parents, 30, 20), slots_from_taxonomy(parents, 30, 20))


@pytest.mark.parametrize(
    ("parents", "n_top", "error", "match"),
    [
        ([0, 1, 2], 1, ValueError, r"expected at most n_top \* n_bottom = 2 classes, got 3"),
        (torch.zeros(2, 2, dtype=torch.long), 4, ValueError, r"expected parents of shape"),
        ([], 4, ValueError, r"expected parents of shape \(num_classes,\) .* got \(0,\)"),
        (torch.tensor([0.0, 1.0]), 4, TypeError, r"expected parents of an integer dtype"),
        ("abc", 4, TypeError, r"expected parents to be a 1-d integer tensor .* got str"),
    ],
    ids=["too-many", "2d", "empty", "float", "str"],
)
def test_taxonomy_errors(parents: object, n_top: int, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        slots_from_taxonomy(parents, n_top, 2)  # type: ignore[arg-type]


# ---------------------------------------------------------------- embeddings


def _blobs(n_clusters: int, size: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(n_clusters, dim, generator=gen)
    label = torch.arange(n_clusters).repeat_interleave(size)
    perm = torch.randperm(n_clusters * size, generator=gen)
    points = centres[label] + 0.1 * torch.randn(n_clusters * size, dim, generator=gen)
    return points[perm], label[perm]


def test_embeddings_recover_blobs() -> None:
    points, label = _blobs(n_clusters=12, size=8, dim=6, seed=0)
    slots = slots_from_embeddings(points, n_top=12, n_bottom=8)
    check_class_slots(slots, 96, 12, 8)
    node = slots // 8
    for k in range(12):
        assert node[label == k].unique().numel() == 1
    assert node.unique().numel() == 12


def test_embeddings_balanced_when_data_is_not() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(90, 4, generator=gen), 50 + torch.randn(10, 4, generator=gen)])
    slots = slots_from_embeddings(points, n_top=10, n_bottom=10, normalize=True)
    check_class_slots(slots, 100, 10, 10)
    assert torch.bincount(slots // 10, minlength=10).max() <= 10


@given(
    num_classes=st.integers(min_value=1, max_value=60),
    n_bottom=st.integers(min_value=1, max_value=8),
    extra=st.integers(min_value=0, max_value=3),
    seed=st.integers(min_value=0, max_value=3),
)
def test_embeddings_valid(num_classes: int, n_bottom: int, extra: int, seed: int) -> None:
    n_top = -(-num_classes // n_bottom) + extra
    points = torch.randn(num_classes, 3, generator=torch.Generator().manual_seed(seed))
    slots = slots_from_embeddings(points, n_top, n_bottom, iters=3, seed=seed)
    check_class_slots(slots, num_classes, n_top, n_bottom)


def test_embeddings_deterministic_and_seeded() -> None:
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    a = slots_from_embeddings(points, 20, 16, seed=3)
    b = slots_from_embeddings(points, 20, 16, seed=3)
    assert torch.equal(a, b)
    assert torch.equal(slots_from_embeddings(points.double(), 20, 16, seed=3) // 16, a // 16)


def test_embeddings_on_device(device: torch.device) -> None:
    points, _ = _blobs(4, 5, 3, seed=1)
    slots = slots_from_embeddings(points.to(device), 4, 5)
    assert slots.device.type == device.type
    check_class_slots(slots.cpu(), 20, 4, 5)


def test_embeddings_head_trains_with_mapping() -> None:
    points, _ = _blobs(5, 6, 4, seed=2)
    slots = slots_from_embeddings(points, n_top=6, n_bottom=6)
    head = HierarchicalSoftmax(4, 6, 6, 8, class_slots=slots)
    x, y = torch.randn(7, 4), torch.randint(0, 30, (7,))
    loss = HierarchicalCrossEntropy()(head(x), y)
    assert torch.isfinite(loss)
    assert head.log_probs(x).exp().sum(-1).allclose(torch.ones(7))


@pytest.mark.parametrize(
    ("embeddings", "n_top", "error", "match"),
    [
        (torch.randn(5, 2), 2, ValueError, r"expected at most n_top \* n_bottom = 4 classes"),
        (torch.randn(5), 4, ValueError, r"expected embeddings of shape \(num_classes, dim\)"),
        (torch.ones(3, 2, dtype=torch.long), 4, TypeError, r"floating-point .* got torch\.int64"),
        ([[0.0, 1.0]], 4, TypeError, r"floating-point torch\.Tensor, got list"),
        (torch.tensor([[0.0], [float("nan")]]), 4, ValueError, r"expected finite embeddings"),
    ],
    ids=["too-many", "1d", "int", "list", "nan"],
)
def test_embeddings_errors(embeddings: object, n_top: int, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        slots_from_embeddings(embeddings, n_top, 2)  # type: ignore[arg-type]
