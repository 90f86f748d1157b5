"""``node_logits``: values and gradients equal plain autograd, for every gradient layout."""

from __future__ import annotations

import pytest
import torch

from hsoftmax import bottom
from hsoftmax.bottom import node_logits


def _inputs(m: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(m)
    weight = torch.randn(5, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    nodes = torch.tensor([[1, 3], [3, 3], [0, 1], [4, 4], [1, 2], [3, 0]])[:, :m]  # repeats
    return weight, bias, hidden, nodes


def _plain(
    weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor, nodes: torch.Tensor
) -> torch.Tensor:
    return torch.einsum("nmsd,nd->nms", weight[nodes], hidden) + bias[nodes]


@pytest.fixture(params=["in place", "gathered"])
def rows_read(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Rows read in place by the per-sample dot kernel, or gathered (its fallback)."""
    if request.param == "gathered":
        monkeypatch.setattr(bottom, "_PER_SAMPLE_DOTS", None)
    return str(request.param)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("layout", ["dense", "kept", "sparse"])
def test_values_and_gradients_equal_plain_autograd(m: int, layout: str, rows_read: str) -> None:
    weight, bias, hidden, nodes = _inputs(m)
    upstream = torch.randn(6, m, 3, dtype=torch.float64)
    _plain(weight, bias, hidden, nodes).backward(upstream)
    expected = [t.grad.clone() for t in (weight, bias, hidden)]  # type: ignore[union-attr]
    for t in (weight, bias, hidden):
        t.grad = torch.ones_like(t) if layout == "kept" else None
    logits = node_logits(weight, bias, hidden, nodes, sparse=layout == "sparse")
    torch.testing.assert_close(logits, _plain(weight, bias, hidden, nodes))
    logits.backward(upstream)
    for t, grad in zip((weight, bias, hidden), expected, strict=True):
        assert t.grad is not None
        got = t.grad.to_dense() if t.grad.is_sparse else t.grad
        if layout == "kept":
            got = got - 1  # the kept gradient started at ones
        assert t.grad.is_sparse == (layout == "sparse" and t is not hidden)
        torch.testing.assert_close(got, grad)


@pytest.mark.parametrize("m", [1, 2])
def test_inference_values_equal_plain(m: int, rows_read: str) -> None:
    weight, bias, hidden, nodes = _inputs(m)
    with torch.no_grad():
        torch.testing.assert_close(
            node_logits(weight, bias, hidden, nodes), _plain(weight, bias, hidden, nodes)
        )
        empty = node_logits(weight, bias, hidden[:0], nodes[:0])
    assert empty.shape == (0, m, 3)


def test_sparse_gradients_are_coalesced_with_one_entry_per_node() -> None:
    weight, bias, hidden, nodes = _inputs(2)
    node_logits(weight, bias, hidden, nodes, sparse=True).sum().backward()
    assert weight.grad is not None  # autograd keeps the indices but drops the coalesced flag
    distinct = sorted(set(nodes.flatten().tolist()))
    assert weight.grad._indices().tolist() == [distinct]
    assert weight.grad._values().shape == (len(distinct), 3, 4)


def test_a_non_contiguous_weight_gives_the_same_values_and_gradients() -> None:
    weight, bias, hidden, nodes = _inputs(2)
    strided = weight.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not strided.is_contiguous()
    upstream = torch.randn(6, 2, 3, dtype=torch.float64)
    node_logits(weight, bias, hidden, nodes).backward(upstream)
    logits = node_logits(strided, bias, hidden, nodes)
    torch.testing.assert_close(logits, _plain(weight, bias, hidden, nodes))
    logits.backward(upstream)
    torch.testing.assert_close(strided.grad, weight.grad)


def test_torch_func_transforms_take_the_gathered_path() -> None:
    """``torch.func.grad`` and ``vmap`` work (the custom autograd Function does not support
    them) and give plain autograd's values and gradients."""
    weight, bias, hidden, nodes = _inputs(2)
    upstream = torch.randn(6, 2, 3, dtype=torch.float64)

    def loss(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return (node_logits(w, bias, h, nodes) * upstream).sum()

    grad_weight, grad_hidden = torch.func.grad(loss, argnums=(0, 1))(weight, hidden)
    (_plain(weight, bias, hidden, nodes) * upstream).sum().backward()
    torch.testing.assert_close(grad_weight, weight.grad)
    torch.testing.assert_close(grad_hidden, hidden.grad)
    per_row = torch.func.vmap(lambda h, n: node_logits(weight, bias, h[None], n[None])[0])
    torch.testing.assert_close(per_row(hidden, nodes), _plain(weight, bias, hidden, nodes))
