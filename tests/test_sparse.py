"""The opt-in sparse gradient path for the bottom layers."""

from __future__ import annotations

import copy

import pytest
import torch

import hsoftmax
from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax, split_parameters

# the contract: every test here runs on the reference path and on the fast paths
pytestmark = pytest.mark.usefixtures("path")


def _pair(**kwargs: object) -> tuple[HierarchicalSoftmax, HierarchicalSoftmax]:
    torch.manual_seed(0)
    dense = HierarchicalSoftmax(6, 5, 4, 3, dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
    sparse = HierarchicalSoftmax(6, 5, 4, 3, dtype=torch.float64, sparse=True, **kwargs)  # type: ignore[arg-type]
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def test_sparse_gradients_equal_dense_gradients() -> None:
    dense, sparse = _pair(num_classes=18, class_slots=torch.randperm(20)[:18])
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 3, 3, 17, -100, 9, 9])
    for head in (dense, sparse):
        HierarchicalCrossEntropy(label_smoothing=0.1)(head(x), y).backward()
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert b.grad.is_sparse == name.startswith("bottom_")
        torch.testing.assert_close(b.grad.to_dense(), a.grad)


def test_sparse_adam_updates_only_touched_nodes() -> None:
    _, head = _pair()
    dense_params, sparse_params = split_parameters(head)
    assert {id(p) for p in sparse_params} == {id(head.bottom_weight), id(head.bottom_bias)}
    optimizers = [torch.optim.AdamW(dense_params), torch.optim.SparseAdam(sparse_params)]
    before = head.bottom_weight.detach().clone()
    y = torch.tensor([1, 6, 7])  # nodes 0 and 1
    HierarchicalCrossEntropy()(head(torch.randn(3, 6, dtype=torch.float64)), y).backward()
    for optimizer in optimizers:
        optimizer.step()
    changed = (head.bottom_weight.detach() != before).flatten(1).any(1)
    assert changed.tolist() == [True, True, False, False, False]


def test_split_parameters_finds_heads_inside_a_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), HierarchicalSoftmax(6, 2, 3, 4, sparse=True))
    dense, sparse = split_parameters(model)
    assert len(dense) == 6 and len(sparse) == 2
    assert split_parameters(HierarchicalSoftmax(6, 2, 3, 4))[1] == []


def test_inference_is_the_same_with_sparse_heads() -> None:
    dense, sparse = _pair()
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(dense.log_probs(x), sparse.log_probs(x))
    assert torch.equal(dense.predict(x), sparse.predict(x))
    assert torch.equal(dense.topk(x, 3)[1], sparse.topk(x, 3)[1])
    assert "sparse=True" in repr(sparse)
    assert hsoftmax.functional.gold_log_prob(sparse(x), torch.tensor([0, 1, 2, 3])).shape == (4,)


def _train(head: HierarchicalSoftmax, set_to_none: bool, steps: int = 3) -> list[torch.Tensor]:
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(5)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        x = torch.randn(4, 6, dtype=torch.float64, generator=generator)
        y = torch.randint(0, head.num_classes, (4,), generator=generator)
        HierarchicalCrossEntropy()(head(x), y).backward()
        assert head.bottom_weight.grad is not None
        assert head.bottom_weight.grad.layout == torch.strided  # stock optimizers work
        optimizer.step()
    return [p.detach().clone() for p in head.parameters()]


def test_kept_dense_grads_take_rows_in_place_with_identical_results() -> None:
    first, _ = _pair()
    second = copy.deepcopy(first)
    for a, b in zip(_train(first, set_to_none=True), _train(second, set_to_none=False)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradient_accumulation_over_micro_batches() -> None:
    head, _ = _pair()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.tensor([0, 5, 9, 9, 13, 19])
    HierarchicalCrossEntropy(reduction="sum")(head(x), y).backward()
    full = head.bottom_weight.grad.clone()  # type: ignore[union-attr]
    head.zero_grad(set_to_none=False)
    for half in (slice(0, 3), slice(3, 6)):
        HierarchicalCrossEntropy(reduction="sum")(head(x[half]), y[half]).backward()
    torch.testing.assert_close(head.bottom_weight.grad, full)
