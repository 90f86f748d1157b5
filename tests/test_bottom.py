"""The bottom layers' logits, by the reference path and by the CPU fast path: values and
gradients (to second order) equal plain autograd, for every gradient layout."""

from __future__ import annotations

import pytest
import torch

from hsoftmax import bottom, fast_bottom


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


IMPLEMENTATIONS = [
    pytest.param(bottom.node_logits, id="reference"),
    pytest.param(fast_bottom.node_logits, id="fast"),
]


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("layout", ["dense", "kept", "sparse"])
@pytest.mark.parametrize("node_logits", IMPLEMENTATIONS)
def test_values_and_gradients_equal_plain_autograd(m: int, layout: str, node_logits) -> None:
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
@pytest.mark.parametrize("node_logits", IMPLEMENTATIONS)
def test_inference_values_equal_plain(m: int, node_logits) -> None:
    weight, bias, hidden, nodes = _inputs(m)
    with torch.no_grad():
        torch.testing.assert_close(
            node_logits(weight, bias, hidden, nodes), _plain(weight, bias, hidden, nodes)
        )
        empty = node_logits(weight, bias, hidden[:0], nodes[:0])
    assert empty.shape == (0, m, 3)


def test_fast_sparse_gradients_are_coalesced_with_one_entry_per_node() -> None:
    weight, bias, hidden, nodes = _inputs(2)
    fast_bottom.node_logits(weight, bias, hidden, nodes, sparse=True).sum().backward()
    assert weight.grad is not None  # autograd keeps the indices but drops the coalesced flag
    distinct = sorted(set(nodes.flatten().tolist()))
    assert weight.grad._indices().tolist() == [distinct]
    assert weight.grad._values().shape == (len(distinct), 3, 4)


@pytest.mark.parametrize("node_logits", IMPLEMENTATIONS)
def test_a_non_contiguous_weight_gives_the_same_values_and_gradients(node_logits) -> None:
    weight, bias, hidden, nodes = _inputs(2)
    strided = weight.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not strided.is_contiguous()
    upstream = torch.randn(6, 2, 3, dtype=torch.float64)
    node_logits(weight, bias, hidden, nodes).backward(upstream)
    logits = node_logits(strided, bias, hidden, nodes)
    torch.testing.assert_close(logits, _plain(weight, bias, hidden, nodes))
    logits.backward(upstream)
    torch.testing.assert_close(strided.grad, weight.grad)


def test_torch_func_transforms_work_on_the_reference_path() -> None:
    """``torch.func.grad`` and ``vmap`` give plain autograd's values and gradients (the fast
    path does not apply under them)."""
    node_logits = bottom.node_logits
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


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("node_logits", IMPLEMENTATIONS)
def test_second_order_gradients_equal_plain_autograd(node_logits, sparse: bool) -> None:
    """A double backward (gradient penalties, Hessian-vector products, MAML) is exact on both
    paths: the fast path differentiates the reference under ``create_graph=True``."""
    weight, bias, hidden, nodes = _inputs(2)
    upstream = torch.randn(6, 2, 3, dtype=torch.float64)

    def first_order(logits_of) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
        loss = (logits_of(weight, bias, hidden, nodes).tanh() * upstream).sum()
        return torch.autograd.grad(loss, (weight, hidden), create_graph=True)

    def plain(w, b, h, n):  # type: ignore[no-untyped-def]
        return _plain(w, b, h, n)

    def checked(w, b, h, n):  # type: ignore[no-untyped-def]
        return node_logits(w, b, h, n, sparse=sparse)

    for got, want in zip(first_order(checked), first_order(plain), strict=True):
        got = got.to_dense() if got.is_sparse else got
        torch.testing.assert_close(got, want)
        penalty = (got**2).sum(), (want**2).sum()
        second = [torch.autograd.grad(p, (weight, hidden), retain_graph=True) for p in penalty]
        for a, b in zip(*second, strict=True):
            torch.testing.assert_close(a.to_dense() if a.is_sparse else a, b)


@pytest.mark.parametrize("node_logits", IMPLEMENTATIONS)
def test_a_dense_head_hands_hooks_dense_gradients(node_logits) -> None:
    """With ``.grad`` kept from an earlier step, hooks and ``autograd.grad`` still get a dense
    gradient (a sparse one made ``g.clamp`` fail on the second step)."""
    weight, bias, hidden, nodes = _inputs(2)
    seen = []
    weight.register_hook(lambda g: seen.append(g.layout) or g.clamp(-1, 1))
    for _ in range(2):
        node_logits(weight, bias, hidden, nodes).sum().backward()
    (grad,) = torch.autograd.grad(node_logits(weight, bias, hidden, nodes).sum(), weight)
    assert seen == [torch.strided] * 3 and grad.layout == torch.strided
