"""Reused work tensors: never while referenced, and training gives the same numbers."""

from __future__ import annotations

import pytest
import torch

from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax, recycling
from hsoftmax.recycling import recycled_empty, release


def test_storage_is_reused_only_once_unreferenced() -> None:
    owner = torch.zeros(3)
    first = recycled_empty(owner, "work", (4, 5), torch.float32)
    busy = recycled_empty(owner, "work", (4, 5), torch.float32)
    assert busy.data_ptr() != first.data_ptr()  # first is still held
    pointer = busy.data_ptr()  # the cache now keeps the newest
    del first, busy
    smaller = recycled_empty(owner, "work", (2, 5), torch.float64)
    assert smaller.data_ptr() == pointer and smaller.shape == (2, 5)
    assert smaller.dtype == torch.float64 and smaller.is_contiguous()
    assert recycled_empty(owner, "other", (2, 5), torch.float64).data_ptr() != pointer
    del smaller
    assert recycled_empty(owner, "work", (5, 5), torch.float32).data_ptr() != pointer  # too small


def test_a_detached_alias_shares_the_owners_work_tensors() -> None:
    owner = torch.zeros(3)
    pointer = recycled_empty(owner, "work", (4, 5), torch.float32).data_ptr()
    assert recycled_empty(owner.detach(), "work", (4, 5), torch.float32).data_ptr() == pointer


def test_release_forgets_an_owner_or_every_owner() -> None:
    a, b = torch.zeros(2), torch.zeros(2)
    for owner in (a, b):
        recycled_empty(owner, "work", (3,), torch.float32)
    release(a)
    storage_a, storage_b = a.untyped_storage(), b.untyped_storage()
    assert storage_a not in recycling._storages and storage_b in recycling._storages
    release()
    assert storage_b not in recycling._storages


def _steps(
    head: HierarchicalSoftmax, steps: int = 3, **backward: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dense gradients of ``bottom_weight`` over a few steps, each one kept by the caller, and a
    copy of each taken at its own step."""
    generator = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(steps):
        head.zero_grad(set_to_none=True)
        x = torch.randn(9, 6, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 20, (9,), generator=generator)
        loss = HierarchicalCrossEntropy()(head(x), y)
        loss.backward(**backward)
        if backward:
            loss.backward()
        grad = head.bottom_weight.grad
        assert grad is not None
        grad = grad.to_dense() if grad.is_sparse else grad
        grads.append((grad, grad.clone()))
    return grads


@pytest.mark.parametrize("sparse", [False, True])
def test_kept_gradients_are_never_overwritten(sparse: bool) -> None:
    torch.manual_seed(0)
    head = HierarchicalSoftmax(6, 5, 4, 3, dtype=torch.float64, sparse=sparse)
    kept = _steps(head)
    for grad, copy in kept:  # later steps did not write into the gradients handed out before
        torch.testing.assert_close(grad, copy, rtol=0, atol=0)
    head.sparse = not sparse  # the other path gives the same gradients
    for (grad, _), (other, _) in zip(kept, _steps(head), strict=True):
        torch.testing.assert_close(grad, other)


def test_a_retained_graph_gives_its_gradients_twice() -> None:
    torch.manual_seed(0)
    head = HierarchicalSoftmax(6, 5, 4, 3, dtype=torch.float64)
    once = _steps(head)
    twice = _steps(head, retain_graph=True)
    for (a, _), (b, _) in zip(once, twice, strict=True):
        torch.testing.assert_close(b, 2 * a)


@pytest.mark.usefixtures("fast")  # the fast path reads the weights again in its backward
def test_a_backward_after_an_in_place_update_fails_clearly() -> None:
    torch.manual_seed(0)
    head = HierarchicalSoftmax(6, 5, 4, 3)
    loss = HierarchicalCrossEntropy()(head(torch.randn(4, 6)), torch.tensor([0, 5, 9, 19]))
    loss.backward(retain_graph=True)
    with torch.no_grad():  # the backward reads bottom_weight: its gradient would be stale
        head.bottom_weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inference_mode_buffers_serve_training_afterwards() -> None:
    torch.manual_seed(0)
    head = HierarchicalSoftmax(6, 5, 4, 3, dtype=torch.float64)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 5, 9, 19])
    expected = torch.autograd.grad(HierarchicalCrossEntropy()(head(x), y), head.bottom_weight)
    with torch.inference_mode():  # the buffers are made here, as inference tensors
        head.topk(x, 3)
        HierarchicalCrossEntropy()(head(x), y)
    for _ in range(2):
        head.zero_grad(set_to_none=True)
        HierarchicalCrossEntropy()(head(x), y).backward()
        torch.testing.assert_close(head.bottom_weight.grad, expected[0])
