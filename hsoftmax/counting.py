"""Parameter, memory and FLOP accounting for a flat, a bottleneck-flat and a hierarchical head.

Three heads on the same ``in_features`` and the same classes are compared:

- **flat**: ``Linear(in_features, num_classes)``, the usual final layer;
- **bottleneck-flat**: ``Linear(in_features, hidden)`` then ``Linear(hidden, num_classes)``, a
  flat softmax on the same ``hidden``-sized vector as the hierarchical head;
- **hierarchical**: :class:`~hsoftmax.HierarchicalSoftmax` with ``n_top`` nodes of ``n_bottom``
  slots each.

Most of the hierarchical head's parameter saving over the flat head comes from the bottleneck:
the bottleneck-flat head has about as many parameters. What the hierarchy adds is cheaper
*training* compute per sample: one node of the bottom layer instead of every class.

FLOP convention (used by every function here):

- a multiply-add counts as **2 FLOPs**; only the matrix products are counted (biases,
  activations, softmax, the loss and the optimizer step are ignored: they are linear in the
  number of outputs, not in the number of weights);
- **forward** FLOPs per sample are ``2 * (weights touched)``;
- **training** FLOPs per sample are ``3 * forward`` of the touched weights (forward, then the
  backward product for the input gradient and the one for the weight gradient);
- the flat heads touch every weight, in training and inference alike;
- the hierarchical head's training step touches the projection, the top layer and **one**
  node's bottom layer (the gold node);
- hierarchical **exact** inference (the log-probabilities of all classes) touches every weight;
  **top-1 routing** (:meth:`~hsoftmax.HierarchicalSoftmax.predict`) touches the projection, the
  top layer and one node.

The paper (PlantCLEF 2022, Table 1) is reproduced by :func:`paper_table`; the notes under
:func:`format_paper_table` say where each of its figures comes from.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .checks import check_int

__all__ = [
    "EFFICIENTNET_B4_BACKBONE_PARAMS",
    "HeadCount",
    "ModelSize",
    "bottleneck_head_parameters",
    "compare_heads",
    "count_parameters",
    "flat_head_parameters",
    "format_bytes",
    "format_count",
    "format_head_table",
    "format_paper_table",
    "hierarchical_head_parameters",
    "paper_table",
    "parameter_bytes",
]

#: Parameters of torchvision's ``efficientnet_b4`` (19,341,616) less its ImageNet classifier
#: ``Linear(1792, 1000)`` (1,793,000): the feature extractor the paper fine-tunes.
EFFICIENTNET_B4_BACKBONE_PARAMS = 19_341_616 - (1792 * 1000 + 1000)

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
_TORCH_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Count the parameters of a module exactly, each shared parameter once.

    Args:
        module: any ``nn.Module``.
        trainable_only: count only parameters with ``requires_grad=True``. Default: ``False``.

    Returns:
        The number of scalar parameters, ``sum(p.numel() for p in module.parameters())``.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.

    Example:
        >>> from torch import nn
        >>> count_parameters(nn.Linear(1792, 80_000))
        143440000
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def flat_head_parameters(in_features: int, num_classes: int, bias: bool = True) -> int:
    """Parameters of a flat head ``Linear(in_features, num_classes)``.

    .. math:: \\text{in} \\cdot C + C

    Args:
        in_features: size of the backbone's feature vector.
        num_classes: number of classes ``C``.
        bias: count the bias. Default: ``True``.

    Returns:
        The parameter count.

    Example:
        >>> flat_head_parameters(1792, 80_000, bias=False)
        143360000
    """
    check_int("in_features", in_features)
    check_int("num_classes", num_classes)
    return in_features * num_classes + (num_classes if bias else 0)


def bottleneck_head_parameters(
    in_features: int, num_classes: int, hidden: int, bias: bool = True
) -> int:
    """Parameters of ``Linear(in_features, hidden)`` then ``Linear(hidden, num_classes)``.

    .. math:: \\text{in} \\cdot h + h + h \\cdot C + C

    Args:
        in_features: size of the backbone's feature vector.
        num_classes: number of classes ``C``.
        hidden: the bottleneck size ``h``.
        bias: count the biases. Default: ``True``.

    Returns:
        The parameter count.

    Example:
        >>> bottleneck_head_parameters(1792, 80_000, 128)
        10549504
    """
    check_int("in_features", in_features)
    check_int("num_classes", num_classes)
    check_int("hidden", hidden)
    return in_features * hidden + hidden * num_classes + ((hidden + num_classes) if bias else 0)


def hierarchical_head_parameters(
    in_features: int, n_top: int, n_bottom: int, hidden: int, bias: bool = True
) -> int:
    """Parameters of a :class:`~hsoftmax.HierarchicalSoftmax` head.

    .. math::

        \\text{in} \\cdot h + h \\;+\\; h \\cdot n_{top} + n_{top}
        \\;+\\; n_{top} \\cdot n_{bottom} \\cdot h + n_{top} \\cdot n_{bottom}

    (projection, top layer, bottom layers). It does not depend on ``num_classes``: unused
    trailing slots still have their weights.

    Args:
        in_features: size of the backbone's feature vector.
        n_top: nodes in the top layer.
        n_bottom: slots per node.
        hidden: size of the projection ``h``.
        bias: count the biases (the head always has them). Default: ``True``.

    Returns:
        The parameter count.

    Example:
        >>> hierarchical_head_parameters(1792, 1000, 80, 128)
        10678504
    """
    check_int("in_features", in_features)
    check_int("n_top", n_top)
    check_int("n_bottom", n_bottom)
    check_int("hidden", hidden)
    weights = in_features * hidden + hidden * n_top + n_top * n_bottom * hidden
    biases = hidden + n_top + n_top * n_bottom
    return weights + (biases if bias else 0)


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES:
            raise ValueError(
                f"expected a floating dtype in {list(_TORCH_DTYPES)}, got {dtype}"
            )
        return _TORCH_DTYPES[dtype]
    if dtype not in _DTYPE_BYTES:
        raise ValueError(
            f"expected dtype in {sorted(_DTYPE_BYTES)} or a torch.dtype, got {dtype!r}"
        )
    return dtype


def parameter_bytes(num_params: int, dtype: str | torch.dtype = "fp32") -> int:
    """Bytes taken by ``num_params`` parameters stored in ``dtype``.

    Args:
        num_params: number of scalar parameters.
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"fp64"`` or the matching ``torch.dtype``.
            Default: ``"fp32"``.

    Returns:
        The number of bytes (parameters only: no gradients, optimizer state or activations).

    Example:
        >>> parameter_bytes(1000, "bf16")
        2000
        >>> parameter_bytes(1000, torch.float32)
        4000
    """
    check_int("num_params", num_params, minimum=0)
    return num_params * _DTYPE_BYTES[_dtype_name(dtype)]


@dataclass(frozen=True)
class HeadCount:
    """Parameters and per-sample FLOPs of one head (see the module docstring for the convention).

    Attributes:
        name: ``"flat"``, ``"bottleneck-flat"`` or ``"hierarchical"``.
        params: exact number of parameters.
        train_flops: FLOPs per sample of a training step (forward + backward).
        inference_flops: FLOPs per sample of the scores of every class (exact log-probs).
        top1_flops: FLOPs per sample of the cheapest prediction: the argmax for the flat heads,
            top-1 routing for the hierarchical head.
    """

    name: str
    params: int
    train_flops: int
    inference_flops: int
    top1_flops: int

    def bytes(self, dtype: str | torch.dtype = "fp32") -> int:
        """Bytes of the parameters in ``dtype`` (see :func:`parameter_bytes`).

        Args:
            dtype: ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"fp64"`` or a ``torch.dtype``.

        Returns:
            The number of bytes.
        """
        return parameter_bytes(self.params, dtype)

    @property
    def fp32_bytes(self) -> int:
        """Bytes of the parameters in float32."""
        return self.bytes("fp32")

    @property
    def fp16_bytes(self) -> int:
        """Bytes of the parameters in float16."""
        return self.bytes("fp16")

    @property
    def bf16_bytes(self) -> int:
        """Bytes of the parameters in bfloat16."""
        return self.bytes("bf16")


def compare_heads(
    in_features: int,
    num_classes: int,
    n_bottom: int,
    hidden: int,
    n_top: int | None = None,
) -> tuple[HeadCount, HeadCount, HeadCount]:
    """Closed-form parameters and FLOPs of the flat, bottleneck-flat and hierarchical heads.

    Args:
        in_features: size of the backbone's feature vector.
        num_classes: number of classes ``C``.
        n_bottom: slots per node of the hierarchical head.
        hidden: size ``h`` of the hierarchical projection, also the bottleneck of the
            bottleneck-flat head.
        n_top: nodes of the hierarchical head. Default: ``ceil(num_classes / n_bottom)``.

    Returns:
        ``(flat, bottleneck_flat, hierarchical)``, three :class:`HeadCount`.

    Raises:
        ValueError: if a size is not a positive int, or ``n_top * n_bottom < num_classes``.

    Example:
        >>> flat, bottleneck, hier = compare_heads(1792, 80_000, n_bottom=80, hidden=128)
        >>> flat.params, bottleneck.params, hier.params
        (143440000, 10549504, 10678504)
        >>> round(flat.train_flops / hier.train_flops)
        390
        >>> round(bottleneck.train_flops / hier.train_flops)
        28
    """
    check_int("in_features", in_features)
    check_int("num_classes", num_classes)
    check_int("n_bottom", n_bottom)
    check_int("hidden", hidden)
    if n_top is None:
        n_top = -(-num_classes // n_bottom)
    check_int("n_top", n_top)
    if n_top * n_bottom < num_classes:
        raise ValueError(
            f"expected n_top * n_bottom >= num_classes ({num_classes}), "
            f"got {n_top} * {n_bottom} = {n_top * n_bottom}"
        )
    flat_w = in_features * num_classes
    flat = HeadCount(
        "flat", flat_head_parameters(in_features, num_classes), 6 * flat_w, 2 * flat_w, 2 * flat_w
    )
    bott_w = in_features * hidden + hidden * num_classes
    bottleneck = HeadCount(
        "bottleneck-flat",
        bottleneck_head_parameters(in_features, num_classes, hidden),
        6 * bott_w,
        2 * bott_w,
        2 * bott_w,
    )
    routed_w = in_features * hidden + hidden * n_top + hidden * n_bottom
    all_w = in_features * hidden + hidden * n_top + hidden * n_top * n_bottom
    hier = HeadCount(
        "hierarchical",
        hierarchical_head_parameters(in_features, n_top, n_bottom, hidden),
        6 * routed_w,
        2 * all_w,
        2 * routed_w,
    )
    return flat, bottleneck, hier


def format_count(n: float) -> str:
    """Write a count with a k/M/G suffix, e.g. ``143.44M``.

    Args:
        n: the count.

    Returns:
        The short string.

    Example:
        >>> format_count(10_678_504), format_count(999), format_count(5.2e9)
        ('10.68M', '999', '5.20G')
    """
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}"
    return f"{n:g}"


def format_bytes(n: float) -> str:
    """Write a byte count in decimal units (MB = 10**6 bytes, as the paper's table).

    Args:
        n: number of bytes.

    Returns:
        The short string.

    Example:
        >>> format_bytes(573_760_000), format_bytes(512)
        ('573.8 MB', '512 B')
    """
    for factor, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{n:g} B"


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_head_table(heads: tuple[HeadCount, ...]) -> str:
    """A plain-text table of heads: parameters, bytes per dtype and FLOPs per sample.

    The FLOP columns are per sample: a training step, the exact scores of all classes, and the
    cheapest top-1 prediction (see the module docstring for the convention).

    Args:
        heads: the rows, e.g. the result of :func:`compare_heads`.

    Returns:
        The table, with an ``x fewer`` column: the first row's parameters over each row's.

    Example:
        >>> print(format_head_table(compare_heads(64, 1000, n_bottom=40, hidden=16)))
        ... # doctest: +NORMALIZE_WHITESPACE
        head             params  x fewer      fp32  fp16/bf16  train FLOPs  exact FLOPs  top-1 FLOPs
        ---------------  ------  -------  --------  ---------  -----------  -----------  -----------
        flat             65.00k    1.00x  260.0 kB   130.0 kB      384.00k      128.00k      128.00k
        bottleneck-flat  18.04k    3.60x   72.2 kB    36.1 kB      102.14k       34.05k       34.05k
        hierarchical     18.46k    3.52x   73.9 kB    36.9 kB       12.38k       34.85k        4.13k
    """
    header = [
        "head",
        "params",
        "x fewer",
        "fp32",
        "fp16/bf16",
        "train FLOPs",
        "exact FLOPs",
        "top-1 FLOPs",
    ]
    base = heads[0].params if heads else 1
    rows = [
        [
            h.name,
            format_count(h.params),
            f"{base / h.params:.2f}x",
            format_bytes(h.fp32_bytes),
            format_bytes(h.fp16_bytes),
            format_count(h.train_flops),
            format_count(h.inference_flops),
            format_count(h.top1_flops),
        ]
        for h in heads
    ]
    return _render(header, rows)


class ModelSize(NamedTuple):
    """One row of the paper's Table 1, as counted here.

    Attributes:
        name: the model's name.
        backbone: parameters of the backbone (feature extractor).
        head: parameters of the final layer.
        total: ``backbone + head``.
    """

    name: str
    backbone: int
    head: int
    total: int


def paper_table(
    backbone_params: int = EFFICIENTNET_B4_BACKBONE_PARAMS,
    in_features: int = 1792,
    num_classes: int = 80_000,
    n_top: int = 1000,
    n_bottom: int = 80,
    hidden: int = 128,
) -> tuple[ModelSize, ModelSize, ModelSize]:
    """Whole-model sizes of the paper's Table 1 (EfficientNet-B4, 80,000 classes), counted exactly.

    Args:
        backbone_params: parameters of the backbone without its classifier. Default: the
            torchvision EfficientNet-B4 feature extractor, :data:`EFFICIENTNET_B4_BACKBONE_PARAMS`.
        in_features: backbone feature size. Default: 1792 (EfficientNet-B4).
        num_classes: number of classes. Default: 80,000 (PlantCLEF 2022).
        n_top: nodes of the hierarchical head. Default: 1000 (the paper's).
        n_bottom: slots per node. Default: 80 (the paper's).
        hidden: projection size. Default: 128 (the paper's).

    Returns:
        ``(flat, bottleneck_flat, hierarchical)`` :class:`ModelSize` rows; every head counts
        its biases and the hierarchical head includes its projection.

    Example:
        >>> flat, bottleneck, hier = paper_table()
        >>> flat.total, hier.total
        (160988616, 28227120)
        >>> round(flat.total / hier.total, 2)
        5.7
    """
    check_int("backbone_params", backbone_params, minimum=0)
    heads = compare_heads(in_features, num_classes, n_bottom, hidden, n_top=n_top)
    names = ("backbone + flat", "backbone + bottleneck-flat", "backbone + hierarchical")
    rows = [
        ModelSize(names[i], backbone_params, h.params, backbone_params + h.params)
        for i, h in enumerate(heads)
    ]
    return rows[0], rows[1], rows[2]


def format_paper_table() -> str:
    """The paper's Table 1 (EfficientNet-B4 rows) beside the exact counts, with notes.

    What the paper's figures are, as far as they can be reconstructed (``B`` is torchvision's
    EfficientNet-B4 without its classifier, 17,548,616 parameters):

    - flat final layer ``143.3``/``143.36``M: ``1792 * 80,000`` weights; with the bias
      it is 143.44M. (The paper's text says ``2,048``; EfficientNet-B4 has 1792 features.)
    - hierarchical final layer ``10.4``M: the top layer and the bottom layers,
      ``128*1000 + 1000 + 1000*80*128 + 80,000 = 10.449M`` (10.368M without biases). The
      ``Linear(1792, 128)`` projection (229,504) is counted in the backbone: ``B`` plus it is
      17.78M, the paper's ``17.8``. Counting the whole head, as :func:`hierarchical_head_parameters`
      does, gives 10.68M.
    - totals ``160`` and ``28.2``M: exactly ``B + 143.44M = 160.99M`` and
      ``B + 10.68M = 28.23M``. The ``19`` printed as the flat model's backbone is
      EfficientNet-B4 *with* its ImageNet classifier (19.34M), so that row does not add up.
    - ``5.67x`` is ``160 / 28.2`` of the rounded totals; the exact ratio is 5.70x.
    - memory ``321.9MB`` and ``56.4MB`` match 2 bytes per parameter (half precision) of the
      exact totals, 321.98 MB and 56.45 MB, truncated.
    - a flat head on the same 128-d bottleneck has 10.55M parameters: the parameter saving
      comes from the bottleneck, not the hierarchy. The hierarchy saves training compute.

    Returns:
        A plain-text table and notes.

    Example:
        >>> print(format_paper_table().splitlines()[0])
        Table 1 of the paper (EfficientNet-B4, 1792 features, 80,000 classes) vs exact counts
    """
    flat, bottleneck, hier = paper_table()
    header = [
        "model",
        "backbone",
        "final layer",
        "total",
        "fp32",
        "fp16",
        "paper (M | M | M | memory)",
    ]
    paper = {
        flat.name: "19 | 143.3 | 160 | 321.9MB",
        bottleneck.name: "(not in paper)",
        hier.name: "17.8 | 10.4 | 28.2 | 56.4MB",
    }
    rows = [
        [
            r.name,
            format_count(r.backbone),
            format_count(r.head),
            format_count(r.total),
            format_bytes(parameter_bytes(r.total, "fp32")),
            format_bytes(parameter_bytes(r.total, "fp16")),
            paper[r.name],
        ]
        for r in (flat, bottleneck, hier)
    ]
    top_bottom = hier.head - (1792 * 128 + 128)
    notes = [
        "paper column: its backbone | final layer | total (millions) | memory, as printed.",
        f"backbone: torchvision's EfficientNet-B4 without its ImageNet classifier "
        f"({hier.backbone:,} parameters); final layer: the whole head, biases included.",
        f"whole model: {flat.total / hier.total:.2f}x fewer parameters exactly "
        f"(the paper's 5.67x is 160 / 28.2 of rounded totals); "
        f"{flat.total / bottleneck.total:.2f}x for the bottleneck-flat head.",
        f"the paper's hierarchical 'final layer' (10.4M) is the top and bottom layers only "
        f"({format_count(top_bottom)} with biases); its Linear(1792, 128) projection sits in "
        f"the paper's backbone ({format_count(hier.backbone + 1792 * 128 + 128)} = 17.8M).",
        "the paper's memory column matches 2 bytes per parameter (half precision), truncated.",
        "a flat softmax on the same 128-d bottleneck is as small as the hierarchical head: the "
        "parameter saving comes from the bottleneck; the hierarchy saves training compute.",
    ]
    title = "Table 1 of the paper (EfficientNet-B4, 1792 features, 80,000 classes) vs exact counts"
    wrapped = [textwrap.fill(n, 100, initial_indent="- ", subsequent_indent="  ") for n in notes]
    return "\n".join([title, _render(header, rows), *wrapped])
