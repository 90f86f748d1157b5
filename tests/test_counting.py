"""Tests of hsoftmax.counting: closed forms against real modules, FLOPs, the paper's Table 1."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hsoftmax import HierarchicalSoftmax
from hsoftmax.counting import (
    EFFICIENTNET_B4_BACKBONE_PARAMS,
    HeadCount,
    bottleneck_head_parameters,
    compare_heads,
    count_parameters,
    flat_head_parameters,
    format_bytes,
    format_count,
    format_head_table,
    format_paper_table,
    hierarchical_head_parameters,
    paper_table,
    parameter_bytes,
)

sizes = st.integers(min_value=1, max_value=12)


@given(in_features=sizes, n_top=sizes, n_bottom=sizes, hidden=sizes)
def test_hierarchical_closed_form_equals_module(
    in_features: int, n_top: int, n_bottom: int, hidden: int
) -> None:
    head = HierarchicalSoftmax(in_features, n_top, n_bottom, hidden)
    assert hierarchical_head_parameters(in_features, n_top, n_bottom, hidden) == sum(
        p.numel() for p in head.parameters()
    )
    assert count_parameters(head) == sum(p.numel() for p in head.parameters())


def test_hierarchical_closed_form_paper_config() -> None:
    head = HierarchicalSoftmax(1792, 1000, 80, 128)
    assert count_parameters(head) == hierarchical_head_parameters(1792, 1000, 80, 128)
    assert count_parameters(head) == 10_678_504


def test_hierarchical_count_ignores_num_classes() -> None:
    head = HierarchicalSoftmax(8, 4, 5, 3, num_classes=17)
    assert count_parameters(head) == hierarchical_head_parameters(8, 4, 5, 3)


@given(in_features=sizes, num_classes=sizes, hidden=sizes, bias=st.booleans())
def test_flat_closed_forms_equal_modules(
    in_features: int, num_classes: int, hidden: int, bias: bool
) -> None:
    flat = nn.Linear(in_features, num_classes, bias=bias)
    bottleneck = nn.Sequential(
        nn.Linear(in_features, hidden, bias=bias), nn.Linear(hidden, num_classes, bias=bias)
    )
    assert flat_head_parameters(in_features, num_classes, bias) == count_parameters(flat)
    assert bottleneck_head_parameters(in_features, num_classes, hidden, bias) == count_parameters(
        bottleneck
    )


def test_count_parameters_shared_and_trainable() -> None:
    shared = nn.Linear(3, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 3))
    model.append(model[0])  # the same module twice counts once
    assert count_parameters(model) == 16 + 15
    model[2].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 16 + 3


def test_paper_figures() -> None:
    assert flat_head_parameters(1792, 80_000, bias=False) == 143_360_000
    flat, bottleneck, hier = compare_heads(1792, 80_000, n_bottom=80, hidden=128)
    assert (flat.params, bottleneck.params, hier.params) == (143_440_000, 10_549_504, 10_678_504)
    # the paper's 10.4M "final layer": top + bottom layers, the projection counted elsewhere
    top_bottom = hier.params - (1792 * 128 + 128)
    assert round(top_bottom / 1e6, 1) == 10.4
    assert round((EFFICIENTNET_B4_BACKBONE_PARAMS + 1792 * 128 + 128) / 1e6, 1) == 17.8
    flat_model, _, hier_model = paper_table()
    assert round(hier_model.total / 1e6, 1) == 28.2
    assert round(flat_model.total / 1e6) == 161
    assert round(160 / 28.2, 2) == 5.67  # the paper's ratio of its rounded totals
    assert round(flat_model.total / hier_model.total, 2) == 5.70
    # memory column: 2 bytes per parameter, truncated to 0.1 MB
    assert int(parameter_bytes(flat_model.total, "fp16") / 1e5) / 10 == 321.9
    assert int(parameter_bytes(hier_model.total, "fp16") / 1e5) / 10 == 56.4


def test_flops_convention() -> None:
    flat, bottleneck, hier = compare_heads(10, 12, n_bottom=4, hidden=3)
    assert hier == HeadCount(
        "hierarchical",
        hierarchical_head_parameters(10, 3, 4, 3),
        train_flops=3 * 2 * (10 * 3 + 3 * 3 + 3 * 4),
        inference_flops=2 * (10 * 3 + 3 * 3 + 3 * 12),
        top1_flops=2 * (10 * 3 + 3 * 3 + 3 * 4),
    )
    assert flat.train_flops == 3 * flat.inference_flops == 3 * 2 * 10 * 12
    assert bottleneck.inference_flops == bottleneck.top1_flops == 2 * (10 * 3 + 3 * 12)


def test_compare_heads_explicit_n_top() -> None:
    _, _, hier = compare_heads(10, 12, n_bottom=4, hidden=3, n_top=5)
    assert hier.params == hierarchical_head_parameters(10, 5, 4, 3)


@pytest.mark.parametrize(
    ("dtype", "nbytes"),
    [("fp32", 40), ("fp16", 20), ("bf16", 20), (torch.float32, 40), (torch.bfloat16, 20)],
    ids=["fp32", "fp16", "bf16", "torch.float32", "torch.bfloat16"],
)
def test_bytes(dtype: str | torch.dtype, nbytes: int) -> None:
    assert parameter_bytes(10, dtype) == nbytes
    assert HeadCount("x", 10, 0, 0, 0).bytes(dtype) == nbytes


def test_head_count_byte_properties() -> None:
    h = HeadCount("x", 10, 0, 0, 0)
    assert (h.fp32_bytes, h.fp16_bytes, h.bf16_bytes) == (40, 20, 20)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: parameter_bytes(10, "int8"), r"expected dtype in .* got 'int8'"),
        (lambda: parameter_bytes(10, torch.int64), r"expected a floating dtype .* got torch.int64"),
        (lambda: parameter_bytes(-1), r"expected num_params to be an int >= 0, got -1"),
        (lambda: flat_head_parameters(0, 10), r"expected in_features to be a positive int, got 0"),
        (lambda: hierarchical_head_parameters(4, 2, 2, 1.5), r"expected hidden .* got 1.5"),
        (
            lambda: compare_heads(4, 100, n_bottom=10, hidden=2, n_top=5),
            r"expected n_top \* n_bottom >= num_classes \(100\), got 5 \* 10 = 50",
        ),
    ],
    ids=["dtype-name", "dtype-int", "negative", "zero-in", "float-hidden", "too-few-slots"],
)
def test_bad_input(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


def test_count_parameters_type_error() -> None:
    with pytest.raises(TypeError, match=r"expected an nn\.Module, got Tensor"):
        count_parameters(torch.zeros(3))  # type: ignore[arg-type]


def test_formatting() -> None:
    assert format_count(143_440_000) == "143.44M"
    assert format_bytes(56_454_240) == "56.5 MB"
    table = format_head_table(compare_heads(1792, 80_000, n_bottom=80, hidden=128))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["head", "params", "x"]
    assert [line.split()[0] for line in lines[2:]] == ["flat", "bottleneck-flat", "hierarchical"]
    assert "143.44M" in lines[2] and "10.68M" in lines[4] and "13.43x" in lines[4]
    text = format_paper_table()
    assert "5.70x" in text and "5.67x" in text and "10.45M" in text
