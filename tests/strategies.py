"""Hypothesis strategies for heads, inputs and targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from hsoftmax import HierarchicalSoftmax


@dataclass
class Case:
    """A float64 head with spread-out weights, an input batch and valid targets."""

    head: HierarchicalSoftmax
    x: torch.Tensor
    target: torch.Tensor

    def __repr__(self) -> str:  # keeps hypothesis' failure reports short
        slots = self.head.class_slots.tolist() if self.head.slot_classes is not None else "id"
        return f"Case({self.head.extra_repr()}, slots={slots}, x={tuple(self.x.shape)})"


@st.composite
def cases(draw: st.DrawFn, max_top: int = 5, max_bottom: int = 5, grouped: bool = True) -> Case:
    n_top = draw(st.integers(1, max_top))
    n_bottom = draw(st.integers(1, max_bottom))
    positions = n_top * n_bottom
    num_classes = draw(st.integers(1, positions))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    class_slots = None
    if grouped and draw(st.booleans()):
        class_slots = torch.randperm(positions, generator=generator)[:num_classes]
    head = HierarchicalSoftmax(
        draw(st.integers(1, 6)),
        n_top,
        n_bottom,
        draw(st.integers(1, 6)),
        num_classes=num_classes,
        class_slots=class_slots,
        dtype=torch.float64,
    )
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(3 * torch.randn(parameter.shape, generator=generator))
    batch = draw(st.integers(1, 5))
    x = torch.randn(batch, head.in_features, generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, (batch,), generator=generator)
    return Case(head, x, target)
