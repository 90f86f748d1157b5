"""Fuzzing: hypothesis draws shapes, sizes, masks, class placements, leading dimensions
(including empty and absent batches), dtypes, targets with ``ignore_index`` and every loss option;
nothing crashes and the invariants hold:

- every row of ``log_probs`` is normalised and matches the loop-based float64 oracle;
- the loss equals ``F.cross_entropy`` of ``log_probs`` (weight, ignore_index, reduction), and
  with label smoothing the per-level formula written out from the definition;
- the exact top-k equals ``log_probs().topk(k)``; ``predict`` is top-1 routing;
- every parameter gets a finite gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_log_probs
from torch import Tensor

import hsoftmax.functional as HF
from hsoftmax import HierarchicalCrossEntropy, HierarchicalSoftmax

# the contract: every test here runs on the reference path and on the fast paths
pytestmark = pytest.mark.usefixtures("path")

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Draw:
    """A head, an input of any leading shape, targets and loss options."""

    head: HierarchicalSoftmax
    x: Tensor
    target: Tensor
    weight: Tensor | None
    ignore_index: int
    reduction: str
    label_smoothing: float
    k: int

    def __repr__(self) -> str:  # short failure reports
        slots = self.head.class_slots.tolist() if self.head.slot_classes is not None else "id"
        return (
            f"Draw({self.head.extra_repr()}, activation={self.head.activation}, "
            f"slots={slots}, x={tuple(self.x.shape)} {self.x.dtype}, "
            f"target={self.target.tolist()} {self.target.dtype}, "
            f"weight={None if self.weight is None else self.weight.tolist()}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, k={self.k})"
        )


@st.composite
def draws(draw: st.DrawFn, device: torch.device) -> Draw:
    n_top = draw(st.integers(1, 6))
    n_bottom = draw(st.integers(1, 6))
    positions = n_top * n_bottom
    num_classes = draw(st.integers(1, positions))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    class_slots = None
    if draw(st.booleans()):
        class_slots = torch.randperm(positions, generator=generator)[:num_classes]
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    head = HierarchicalSoftmax(
        draw(st.integers(1, 5)),
        n_top,
        n_bottom,
        draw(st.integers(1, 5)),
        num_classes=num_classes,
        class_slots=class_slots,
        activation=draw(st.sampled_from(["relu", "gelu", "tanh", "identity"])),
        sparse=draw(st.booleans()),
        dtype=dtype,
    )
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    leading = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    x = torch.randn(*leading, head.in_features, generator=generator, dtype=dtype)

    ignore_index = draw(st.sampled_from([-100, -1, 0, num_classes - 1]))
    target = torch.randint(0, num_classes, leading, generator=generator)
    ignored = torch.rand(leading, generator=generator) < draw(st.sampled_from([0.0, 0.3]))
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    target = target.to(draw(st.sampled_from([torch.int64, torch.int32])))
    weight = None
    if draw(st.booleans()):
        weight = torch.rand(num_classes, generator=generator, dtype=dtype) + 0.1
    return Draw(
        head=head.to(device),
        x=x.to(device),
        target=target.to(device),
        weight=None if weight is None else weight.to(device),
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(0.0, 1.0)),
        k=draw(st.integers(0, num_classes)),
    )


def _dense(grad: Tensor | None) -> Tensor:
    assert grad is not None
    return grad.to_dense() if grad.is_sparse else grad


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 1e-4}


def _levels(head: HierarchicalSoftmax, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Written out from the definition, in float64: top log-probs ``(N, n_top)``, bottom
    log-probs ``(N, n_top, n_bottom)`` (``-inf`` at empty positions, NaN in empty nodes) and the
    ``(n_top, n_bottom)`` mask of filled positions."""
    p = {name: value.detach().double() for name, value in head.named_parameters()}
    flat = x.double().reshape(-1, head.in_features)
    z = head.activation(flat @ p["proj.weight"].T + p["proj.bias"])
    filled = torch.zeros(head.n_top * head.n_bottom, dtype=torch.bool, device=x.device)
    filled[head.class_slots] = True
    filled = filled.view(head.n_top, head.n_bottom)
    top_logits = (z @ p["top.weight"].T + p["top.bias"]).masked_fill(~filled.any(1), -math.inf)
    bottom_logits = torch.einsum("nh,tsh->nts", z, p["bottom_weight"]) + p["bottom_bias"]
    bottom_logits = bottom_logits.masked_fill(~filled, -math.inf)
    return top_logits.log_softmax(-1), bottom_logits.log_softmax(-1), filled


def _expected_loss(d: Draw) -> Tensor:
    """The loss written out: per-level label smoothing, ``nn.CrossEntropyLoss`` weighting."""
    top, bottom, filled = _levels(d.head, d.x)
    target = d.target.reshape(-1).long()
    keep = target != d.ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    position = d.head.class_slots[safe]
    node, slot = position // d.head.n_bottom, position % d.head.n_bottom
    rows = torch.arange(len(target), device=target.device)
    node_bottom = bottom[rows, node]  # (N, n_bottom)
    nll = -(top[rows, node] + node_bottom[rows, slot])
    valid_nodes = filled.any(1)
    smooth_top = -(top[:, valid_nodes]).mean(-1)
    node_filled = filled[node]
    smooth_bottom = -torch.where(node_filled, node_bottom, 0).sum(-1) / node_filled.sum(-1)
    eps = d.label_smoothing
    loss = (1 - eps) * nll + eps * (smooth_top + smooth_bottom)
    w = keep.double() * (1.0 if d.weight is None else d.weight.double()[safe])
    loss = torch.where(keep, loss * w, 0)
    if d.reduction == "none":
        return loss.view(d.target.shape)
    if d.reduction == "sum":
        return loss.sum()
    return loss.sum() / w.sum()


@FUZZ
@given(data=st.data())
def test_fuzz_loss_and_inference(device: torch.device, data: st.DataObject) -> None:
    d = data.draw(draws(device))
    head, x, tol = d.head, d.x, _tolerance(d.x.dtype)
    num_classes, leading = head.num_classes, tuple(x.shape[:-1])
    criterion = HierarchicalCrossEntropy(
        weight=d.weight,
        ignore_index=d.ignore_index,
        reduction=d.reduction,
        label_smoothing=d.label_smoothing,
    )
    out = head(x)
    loss = criterion(out, d.target)

    # the loss: its shape, the written-out formula, and F.cross_entropy without smoothing
    assert loss.shape == (leading if d.reduction == "none" else ())
    assert loss.dtype == x.dtype
    expected = _expected_loss(d)
    torch.testing.assert_close(loss.double(), expected, equal_nan=True, **tol)
    with torch.no_grad():
        log_probs = head.log_probs(x)
    if d.label_smoothing == 0.0:
        flat = F.cross_entropy(
            log_probs.reshape(-1, num_classes),
            d.target.reshape(-1).long(),
            weight=d.weight,
            ignore_index=d.ignore_index,
            reduction=d.reduction,
        )
        torch.testing.assert_close(loss, flat.view(loss.shape), equal_nan=True, **tol)

    # every parameter gets a finite gradient (when the loss is defined at all), and a second
    # backward accumulates into the kept .grad (in place for the bottom rows): twice the first
    total = loss.sum()
    if torch.isfinite(total):
        total.backward()
        first = {name: _dense(p.grad).clone() for name, p in head.named_parameters()}
        for name, grad in first.items():
            assert torch.isfinite(grad).all(), name
        criterion(head(x), d.target).sum().backward()
        for name, parameter in head.named_parameters():
            torch.testing.assert_close(_dense(parameter.grad), 2 * first[name], **tol, msg=name)

    # log_probs: shape, normalisation, the oracle
    assert log_probs.shape == (*leading, num_classes)
    assert torch.isfinite(log_probs).all()
    ones = torch.zeros(leading, dtype=log_probs.dtype, device=x.device)
    torch.testing.assert_close(log_probs.logsumexp(-1), ones, atol=1e-5, rtol=0)
    oracle = reference_log_probs(head.cpu(), x.reshape(-1, head.in_features).cpu())
    head.to(x.device)
    torch.testing.assert_close(
        log_probs.reshape(-1, num_classes).double().cpu(), oracle.view(-1, num_classes), **tol
    )

    # gold path == log_probs at the target
    valid = d.target.long().clamp(0, num_classes - 1)
    with torch.no_grad():
        gold = HF.gold_log_prob(head(x), valid)
    torch.testing.assert_close(gold, log_probs.gather(-1, valid.unsqueeze(-1)).squeeze(-1), **tol)

    # exact top-k == top-k of the exact log-probs
    with torch.no_grad():
        values, indices = head.topk(x, d.k)
    assert values.shape == indices.shape == (*leading, d.k)
    assert indices.dtype == torch.int64
    torch.testing.assert_close(values, log_probs.topk(d.k, dim=-1).values, **tol)
    torch.testing.assert_close(log_probs.gather(-1, indices), values, **tol)
    if d.k:
        assert ((indices >= 0) & (indices < num_classes)).all()
        assert (indices.sort(-1).values.diff(dim=-1) != 0).all()  # distinct

    # predict: a real class in the most probable node (top-1 routing)
    with torch.no_grad():
        predicted = head.predict(x)
    assert predicted.shape == leading and predicted.dtype == torch.int64
    assert ((predicted >= 0) & (predicted < num_classes)).all()
    top, bottom, _ = _levels(head, x)
    node = (head.class_slots[predicted] // head.n_bottom).reshape(-1)
    rows = torch.arange(node.numel(), device=x.device)
    assert (top[rows, node] >= top.max(-1).values - 1e-6).all()
    slot = (head.class_slots[predicted] % head.n_bottom).reshape(-1)
    assert (bottom[rows, node, slot] >= bottom[rows, node].max(-1).values - 1e-6).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("leading", [(0,), (2, 0), (0, 3)], ids=["0", "2x0", "0x3"])
def test_empty_batch(device: torch.device, reduction: str, leading: tuple[int, ...]) -> None:
    """An empty batch behaves like ``F.cross_entropy``: NaN mean, zero sum, empty 'none'."""
    head = HierarchicalSoftmax(6, 4, 3, 5, num_classes=10, class_slots=torch.randperm(12)[:10])
    head = head.to(device)
    x = torch.randn(*leading, 6, device=device, requires_grad=True)
    y = torch.zeros(leading, dtype=torch.long, device=device)
    loss = HierarchicalCrossEntropy(reduction=reduction)(head(x), y)
    empty = torch.zeros(0, 10, device=device)
    expected = F.cross_entropy(empty, y.reshape(-1), reduction=reduction)
    torch.testing.assert_close(loss, expected.view(loss.shape), equal_nan=True)
    loss.sum().backward()
    assert head.predict(x).shape == leading
    assert head.log_probs(x).shape == (*leading, 10)
    values, indices = head.topk(x, 2)
    assert values.shape == indices.shape == (*leading, 2)
