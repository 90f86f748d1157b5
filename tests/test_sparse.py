"""The opt-in sparse gradient path for the bottom layers."""

from __future__ import annotations

import torch

import hsoftmax
from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax, split_parameters


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
