"""SparseRowAdamW: equal to SparseAdam without weight decay, lazy AdamW with it."""

from __future__ import annotations

import copy

import pytest
import torch

import hsoftmax.optim
from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax, SparseRowAdamW, split_parameters


@pytest.fixture(autouse=True, params=["gathered", "views"])
def update_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both row updates: gathered rows, and the fused kernel on row views."""
    threshold = 0 if request.param == "views" else 2**62
    monkeypatch.setattr(hsoftmax.optim, "_MIN_VIEW_NUMEL", threshold)
    return str(request.param)


def _train(
    head: HierarchicalSoftmax,
    optimizer: torch.optim.Optimizer,
    steps: int = 4,
    generator: torch.Generator | None = None,
) -> None:
    generator = generator or torch.Generator().manual_seed(0)
    dense = torch.optim.SGD(split_parameters(head)[0], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        dense.zero_grad()
        x = torch.randn(6, 5, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 8, (6,), generator=generator)  # nodes 0 and 1 of 4 only
        HierarchicalCrossEntropy()(head(x), y).backward()
        optimizer.step()
        dense.step()


def _head() -> HierarchicalSoftmax:
    torch.manual_seed(0)
    return HierarchicalSoftmax(5, 4, 4, 3, sparse=True, dtype=torch.float64)


def test_close_to_sparse_adam_without_weight_decay() -> None:
    ours, reference = _head(), _head()
    _train(ours, SparseRowAdamW(split_parameters(ours)[1], lr=0.05))
    _train(reference, torch.optim.SparseAdam(split_parameters(reference)[1], lr=0.05))
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # eps sits elsewhere in SparseAdam


class _LoopLazyAdamW:
    """Written-out lazy AdamW: a Python loop over the touched rows."""

    def __init__(self, parameter: torch.Tensor, lr: float, decay: float) -> None:
        self.parameter, self.lr, self.decay, self.step_count = parameter, lr, decay, 0
        self.m, self.v = torch.zeros_like(parameter), torch.zeros_like(parameter)

    def step(self, grad: torch.Tensor, rows: list[int]) -> None:
        self.step_count += 1
        with torch.no_grad():
            for r in rows:
                self.m[r] = 0.9 * self.m[r] + 0.1 * grad[r]
                self.v[r] = 0.999 * self.v[r] + 0.001 * grad[r] ** 2
                m_hat = self.m[r] / (1 - 0.9**self.step_count)
                v_hat = self.v[r] / (1 - 0.999**self.step_count)
                self.parameter[r] *= 1 - self.lr * self.decay
                self.parameter[r] -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)


def test_matches_written_out_lazy_adamw_with_weight_decay() -> None:
    head, reference = _head(), _head()
    optimizer = SparseRowAdamW([head.bottom_weight], lr=0.05, weight_decay=0.1)
    oracle = _LoopLazyAdamW(reference.bottom_weight, lr=0.05, decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        head.zero_grad()
        reference.zero_grad()
        x = torch.randn(5, 5, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 12, (5,), generator=generator)  # nodes 0 to 2 of 4
        HierarchicalCrossEntropy()(head(x), y).backward()
        optimizer.step()
        reference.sparse = False
        HierarchicalCrossEntropy()(reference(x), y).backward()
        oracle.step(reference.bottom_weight.grad, sorted(set((y // 4).tolist())))  # type: ignore[arg-type]
        torch.testing.assert_close(head.bottom_weight, reference.bottom_weight)
    assert torch.equal(head.bottom_weight[3], _head().bottom_weight[3])  # never touched


def test_first_step_with_weight_decay() -> None:
    head = _head()
    before = copy.deepcopy(head)
    lr, decay, eps = 0.05, 0.1, 1e-8
    optimizer = SparseRowAdamW(split_parameters(head)[1], lr=lr, weight_decay=decay, eps=eps)
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 1])  # node 0 only
    HierarchicalCrossEntropy()(head(x), y).backward()
    grad = head.bottom_weight.grad.to_dense()  # type: ignore[union-attr]
    optimizer.step()
    # first step: exp_avg = 0.1 g, exp_avg_sq = 0.001 g^2, bias-corrected to g and g^2
    expected = before.bottom_weight.detach().clone()
    expected[0] = expected[0] * (1 - lr * decay) - lr * grad[0] / (grad[0].abs() + eps)
    torch.testing.assert_close(head.bottom_weight.detach(), expected)
    assert torch.equal(head.bottom_weight[1:], before.bottom_weight[1:])  # untouched rows stay


def test_resumes_from_its_state_dict() -> None:
    straight, resumed = _head(), _head()
    _train(straight, SparseRowAdamW(split_parameters(straight)[1], lr=0.05), steps=4)
    data = torch.Generator().manual_seed(0)
    optimizer = SparseRowAdamW(split_parameters(resumed)[1], lr=0.05)
    _train(resumed, optimizer, steps=2, generator=data)
    saved = copy.deepcopy((resumed.state_dict(), optimizer.state_dict()))
    _train(resumed, optimizer, steps=1, generator=torch.Generator().manual_seed(9))  # a detour
    resumed.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])  # new moment tensors: the row views must follow
    _train(resumed, optimizer, steps=2, generator=data)
    assert not torch.equal(straight.bottom_weight, _head().bottom_weight)
    torch.testing.assert_close(straight.bottom_weight, resumed.bottom_weight, rtol=0, atol=0)


def test_rejects_dense_gradients_and_bad_options() -> None:
    parameter = torch.nn.Parameter(torch.ones(3, 2))
    parameter.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"sparse COO gradient of rows.*got layout torch.strided"):
        SparseRowAdamW([parameter]).step()
    with pytest.raises(ValueError, match=r"expected lr >= 0, got -1"):
        SparseRowAdamW([parameter], lr=-1)
    with pytest.raises(ValueError, match=r"expected betas in \[0, 1\), got \(0.9, 1.0\)"):
        SparseRowAdamW([parameter], betas=(0.9, 1.0))
