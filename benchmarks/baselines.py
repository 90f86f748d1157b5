"""Baseline heads for the benchmark suite, and a thin adapter around hsoftmax's head.

Every method exposes the same small interface (a :class:`Method`):

- ``loss(x, y)``: the scalar mean training loss (cross-entropy or its exact hierarchical form);
- ``log_probs(x)``: exact log-probabilities of all ``num_classes`` classes, ``(B, C)``;
- ``topk(x, k)``: ``(values, indices)`` of the exact top-k classes by log-probability;
- ``predict(x)``: one class id per sample. For the flat heads and the adaptive softmax this is the
  exact argmax; for the two-level heads it is *top-1 routing* (argmax node, then argmax slot in
  it), which is cheaper but not always the most probable class.

Nothing is "n/a": every method can answer every question, but some answer it the only way they
can (brute force). ``Method.notes`` says how each answer is computed; the benchmark copies it into
the CSV.

Baselines:

- ``flat``: ``nn.Linear(in_features, C)`` + cross-entropy (143.4M parameters at PlantCLEF size).
- ``flat_bottleneck``: ``Linear(in_features, hidden) -> ReLU -> Linear(hidden, C)``, the flat
  softmax on the same bottleneck as the hierarchical head (about the same parameter count: the
  parameter saving of the hierarchical head comes from the bottleneck, not the hierarchy).
- ``adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss(in_features, C, cutoffs, div_value=4.0)`` on the
  raw features, with cutoffs at 2.5%, 12.5% and 50% of the classes (80k classes: head of 2,000
  classes, tails of 8,000, 30,000 and 40,000 with projections 448, 112 and 28). Labels in the
  benchmark are uniform, which is the adaptive softmax's worst case: it is built for Zipfian
  frequencies, and most samples here fall in a tail cluster.
- ``gather_bmm``: a plain two-level hierarchical softmax as in the paper's code: the gold node's
  bottom weights are fetched with advanced indexing ``W[node]`` (a ``(B, hidden, n_bottom)`` copy)
  and multiplied with ``torch.bmm``; dense ``W_bottom`` gradient. Exact log-probs by one einsum
  over all nodes, exact top-k by brute force on those.

Our head (``hsoftmax`` / ``hsoftmax_sparse``) is wrapped by :class:`HSoftmaxMethod`, which only
calls the public API: ``HierarchicalSoftmax``, ``HierarchicalCrossEntropy``, ``head.log_probs``,
``head.topk``, ``head.predict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Names of all methods the suite knows, in the order they appear in tables.
METHODS = ("flat", "flat_bottleneck", "adaptive", "gather_bmm", "hsoftmax", "hsoftmax_sparse")
BASELINES = ("flat", "flat_bottleneck", "adaptive", "gather_bmm")


@dataclass(frozen=True)
class HeadShape:
    """The size of a classification head.

    Args:
        in_features: width of the backbone features.
        hidden: width of the bottleneck (hierarchical heads and ``flat_bottleneck``).
        n_top: number of top-level nodes.
        n_bottom: number of slots per node.
        num_classes: number of real classes; ``None`` means ``n_top * n_bottom``.
        batch: batch size used by the benchmark.
    """

    in_features: int = 1792
    hidden: int = 128
    n_top: int = 1000
    n_bottom: int = 80
    num_classes: int | None = None
    batch: int = 256

    @property
    def classes(self) -> int:
        return self.num_classes if self.num_classes is not None else self.n_top * self.n_bottom

    @staticmethod
    def for_classes(
        classes: int, *, in_features: int, hidden: int, n_bottom: int, batch: int
    ) -> HeadShape:
        """The shape with ``classes`` classes and ``n_bottom`` slots per node (last node padded)."""
        n_top = math.ceil(classes / n_bottom)
        return HeadShape(in_features, hidden, n_top, n_bottom, classes, batch)


# --------------------------------------------------------------------------- the interface


class Method(nn.Module):
    """A classification head with the benchmark interface (see the module docstring)."""

    name: str = ""
    #: how each answer is computed, copied into the CSV ``note`` column.
    notes: dict[str, str] = {}  # noqa: RUF012 (class-level defaults, overridden per class)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def log_probs(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters with dense gradients (all of them, except for a sparse head)."""
        return self.parameters()

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters with sparse gradients (for ``torch.optim.SparseAdam``)."""
        return []


def _topk_of_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of a softmax given its logits: top-k of the logits, minus the log-partition."""
    values, indices = logits.topk(k, dim=-1)
    return values - logits.logsumexp(dim=-1, keepdim=True), indices


class Flat(Method):
    """``nn.Linear(in_features, C)`` + cross-entropy: the usual classification head."""

    name = "flat"
    notes = {  # noqa: RUF012
        "train": "Linear(in, C) + F.cross_entropy",
        "log_probs": "log_softmax of all logits",
        "topk": "logits.topk(k) - logsumexp (exact)",
        "predict": "argmax of logits (exact)",
    }

    def __init__(self, shape: HeadShape, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.fc: nn.Module = nn.Linear(shape.in_features, shape.classes, device=device,
                                       dtype=dtype)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.fc(x), y)

    def log_probs(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.fc(x), dim=-1)

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return _topk_of_logits(self.fc(x), k)

    def predict(self, x: Tensor) -> Tensor:
        return self.fc(x).argmax(dim=-1)


class FlatBottleneck(Flat):
    """``Linear(in, hidden) -> ReLU -> Linear(hidden, C)``: flat softmax on the same bottleneck."""

    name = "flat_bottleneck"
    notes = {  # noqa: RUF012
        **Flat.notes,
        "train": "Linear(in, hidden) -> ReLU -> Linear(hidden, C) + F.cross_entropy",
    }

    def __init__(self, shape: HeadShape, device: Any = None, dtype: Any = None) -> None:
        nn.Module.__init__(self)
        self.proj = nn.Linear(shape.in_features, shape.hidden, device=device, dtype=dtype)
        self.out = nn.Linear(shape.hidden, shape.classes, device=device, dtype=dtype)
        self.fc = nn.Sequential(self.proj, nn.ReLU(), self.out)


def adaptive_cutoffs(classes: int) -> list[int]:
    """Cutoffs of the adaptive softmax baseline: 2.5%, 12.5% and 50% of the classes."""
    cutoffs = sorted({max(1, round(classes * f)) for f in (0.025, 0.125, 0.5)})
    return [c for c in cutoffs if 0 < c < classes] or [max(1, classes // 2)]


class Adaptive(Method):
    """``nn.AdaptiveLogSoftmaxWithLoss`` on the raw features (div_value=4, see adaptive_cutoffs)."""

    name = "adaptive"
    notes = {  # noqa: RUF012
        "train": "nn.AdaptiveLogSoftmaxWithLoss(...).loss, cutoffs 2.5/12.5/50% of C, div 4",
        "log_probs": "AdaptiveLogSoftmaxWithLoss.log_prob",
        "topk": "log_prob(x).topk(k) (brute force)",
        "predict": "AdaptiveLogSoftmaxWithLoss.predict (exact argmax)",
    }

    def __init__(self, shape: HeadShape, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(
            shape.in_features,
            shape.classes,
            adaptive_cutoffs(shape.classes),
            div_value=4.0,
            device=device,
            dtype=dtype,
        )

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.asm(x, y).loss

    def log_probs(self, x: Tensor) -> Tensor:
        return self.asm.log_prob(x)

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.asm.log_prob(x).topk(k, dim=-1)

    def predict(self, x: Tensor) -> Tensor:
        return self.asm.predict(x)


class GatherBmm(Method):
    """A plain two-level hierarchical softmax, written like the paper's code.

    ``z = relu(proj(x))``; top logits ``top(z)``; the gold node's bottom weights gathered with
    ``W_bottom[node]`` (shape ``(B, hidden, n_bottom)``, the paper's layout) and applied with
    ``torch.bmm``. The loss is the exact gold-path NLL (top CE + bottom CE), with padded slots of
    the last node masked. Class ``y`` lives at node ``y // n_bottom``, slot ``y % n_bottom``.
    """

    name = "gather_bmm"
    notes = {  # noqa: RUF012
        "train": "W_bottom[node] advanced indexing + torch.bmm, dense grads",
        "log_probs": "einsum over all nodes + top log-probs",
        "topk": "log_probs(x).topk(k) (brute force)",
        "predict": "top-1 routing: argmax node, then bmm with W_bottom[node]",
    }
    mask: Tensor

    def __init__(self, shape: HeadShape, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.n_top, self.n_bottom, self.classes = shape.n_top, shape.n_bottom, shape.classes
        self.proj = nn.Linear(shape.in_features, shape.hidden, **kw)
        self.top = nn.Linear(shape.hidden, shape.n_top, **kw)
        self.w_bottom = nn.Parameter(torch.empty(shape.n_top, shape.hidden, shape.n_bottom, **kw))
        self.b_bottom = nn.Parameter(torch.empty(shape.n_top, shape.n_bottom, **kw))
        bound = 1.0 / math.sqrt(shape.hidden)
        with torch.no_grad():
            self.w_bottom.uniform_(-bound, bound)
            self.b_bottom.uniform_(-bound, bound)
        padded = shape.n_top * shape.n_bottom
        # additive mask: 0 for real classes, -inf for the padded slots of the last node
        mask = torch.zeros(padded, device=device, dtype=dtype)
        mask[shape.classes :] = float("-inf")
        self.register_buffer("mask", mask.view(shape.n_top, shape.n_bottom), persistent=False)
        self.has_padding = padded != shape.classes

    def _z(self, x: Tensor) -> Tensor:
        return F.relu(self.proj(x))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        z = self._z(x)
        node = torch.div(y, self.n_bottom, rounding_mode="floor")
        slot = y - node * self.n_bottom
        top_logits = self.top(z)
        w = self.w_bottom[node]  # (B, hidden, n_bottom)
        bottom_logits = torch.bmm(z.unsqueeze(1), w).squeeze(1) + self.b_bottom[node]
        if self.has_padding:
            bottom_logits = bottom_logits + self.mask[node]
        return F.cross_entropy(top_logits, node) + F.cross_entropy(bottom_logits, slot)

    def log_probs(self, x: Tensor) -> Tensor:
        z = self._z(x)
        top = F.log_softmax(self.top(z), dim=-1)  # (B, n_top)
        bottom = torch.einsum("bh,thn->btn", z, self.w_bottom) + self.b_bottom + self.mask
        bottom = F.log_softmax(bottom, dim=-1)  # (B, n_top, n_bottom)
        lp = (top.unsqueeze(-1) + bottom).flatten(1)
        return lp[:, : self.classes] if self.has_padding else lp

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.log_probs(x).topk(k, dim=-1)

    def predict(self, x: Tensor) -> Tensor:
        z = self._z(x)
        node = self.top(z).argmax(dim=-1)
        bottom = torch.bmm(z.unsqueeze(1), self.w_bottom[node]).squeeze(1) + self.b_bottom[node]
        bottom = bottom + self.mask[node]
        return node * self.n_bottom + bottom.argmax(dim=-1)


# --------------------------------------------------------------------------- our head


def hsoftmax_available() -> tuple[bool, str]:
    """Whether ``hsoftmax.HierarchicalSoftmax`` and ``HierarchicalCrossEntropy`` import."""
    try:
        import hsoftmax

        names = ("HierarchicalSoftmax", "HierarchicalCrossEntropy")
        missing = [n for n in names if not hasattr(hsoftmax, n)]
    except Exception as exc:  # pragma: no cover - depends on the working tree
        return False, f"import hsoftmax failed: {exc!r}"
    if missing:
        return False, f"hsoftmax has no {', '.join(missing)} yet"
    return True, ""


class HSoftmaxMethod(Method):
    """``hsoftmax.HierarchicalSoftmax`` + ``HierarchicalCrossEntropy`` through the public API."""

    name = "hsoftmax"
    notes = {  # noqa: RUF012
        "train": "HierarchicalCrossEntropy()(head(x), y), dense",
        "log_probs": "head.log_probs",
        "topk": "head.topk (exact top-k)",
        "predict": "head.predict (top-1 routing)",
    }

    def __init__(
        self, shape: HeadShape, device: Any = None, dtype: Any = None, sparse: bool = False
    ) -> None:
        super().__init__()
        import hsoftmax

        kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        if shape.num_classes is not None and shape.num_classes != shape.n_top * shape.n_bottom:
            kwargs["num_classes"] = shape.num_classes
        if sparse:
            kwargs["sparse"] = True  # raises TypeError on a head without the sparse path
            self.name = "hsoftmax_sparse"
            self.notes = {**self.notes, "train": "HierarchicalSoftmax(sparse=True), sparse grads"}
        self.head = hsoftmax.HierarchicalSoftmax(
            shape.in_features, shape.n_top, shape.n_bottom, shape.hidden, **kwargs
        )
        self.criterion = hsoftmax.HierarchicalCrossEntropy()
        self.sparse = sparse

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.criterion(self.head(x), y)

    def log_probs(self, x: Tensor) -> Tensor:
        return self.head.log_probs(x)

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.head.topk(x, k)

    def predict(self, x: Tensor) -> Tensor:
        return self.head.predict(x)

    def sparse_parameters(self) -> list[nn.Parameter]:
        if not self.sparse:
            return []
        import hsoftmax

        split = getattr(hsoftmax, "split_parameters", None)
        if callable(split):  # the documented way: (dense, sparse) = split_parameters(model)
            return list(split(self.head)[1])
        return [p for n, p in self.head.named_parameters() if n.startswith("bottom_")]

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        sparse_ids = {id(p) for p in self.sparse_parameters()}
        return (p for p in self.parameters() if id(p) not in sparse_ids)


# --------------------------------------------------------------------------- factories


def build_method(name: str, shape: HeadShape, device: Any = None, dtype: Any = None) -> Method:
    """Build the method ``name`` (one of :data:`METHODS`) at ``shape``.

    Raises:
        ValueError: for an unknown name.
        TypeError: for ``hsoftmax_sparse`` when the head has no ``sparse`` option yet.
    """
    if name == "flat":
        return Flat(shape, device, dtype)
    if name == "flat_bottleneck":
        return FlatBottleneck(shape, device, dtype)
    if name == "adaptive":
        return Adaptive(shape, device, dtype)
    if name == "gather_bmm":
        return GatherBmm(shape, device, dtype)
    if name == "hsoftmax":
        return HSoftmaxMethod(shape, device, dtype)
    if name == "hsoftmax_sparse":
        return HSoftmaxMethod(shape, device, dtype, sparse=True)
    raise ValueError(f"expected a method in {METHODS}, got {name!r}")


#: Optimizer variants. ``sparse``: the optimizer hsoftmax documents for sparse gradients
#: (``hsoftmax.SparseRowAdamW``; ``torch.optim.SparseAdam`` where hsoftmax has none) on the sparse
#: parameters and fused AdamW on the rest; ``sparseadam``: ``torch.optim.SparseAdam`` instead.
OPTIMIZERS = ("adamw_fused", "adamw_fused_keep", "adamw", "sparse", "sparseadam")


def sparse_optimizer_name(kind: str) -> str:
    """The class used for the sparse parameters by optimizer variant ``kind``."""
    if kind == "sparse":
        try:
            import hsoftmax

            if hasattr(hsoftmax, "SparseRowAdamW"):
                return "hsoftmax.SparseRowAdamW"
        except Exception:  # pragma: no cover
            pass
    return "torch.optim.SparseAdam"


class _Chain:
    """Several optimizers stepped together (SparseAdam for the sparse part, AdamW for the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()


def make_optimizer(method: Method, kind: str, lr: float = 1e-3) -> Any:
    """The optimizer ``kind`` (one of :data:`OPTIMIZERS`) for ``method``'s parameters.

    ``adamw_fused`` is ``torch.optim.AdamW(fused=True)``; ``adamw_fused_keep`` is the same (the
    benchmark then keeps the gradients between steps, ``zero_grad(set_to_none=False)``, as
    hsoftmax's README advises); ``adamw`` is AdamW with torch's default implementation for the
    device (the per-tensor loop on CPU, foreach on CUDA); ``sparse`` is
    ``hsoftmax.SparseRowAdamW`` (``torch.optim.SparseAdam`` where hsoftmax has none) on
    :meth:`Method.sparse_parameters` and fused AdamW on the others; ``sparseadam`` uses
    ``torch.optim.SparseAdam``.
    """
    if kind in ("adamw_fused", "adamw_fused_keep"):
        return torch.optim.AdamW(method.parameters(), lr=lr, fused=True)
    if kind == "adamw":
        return torch.optim.AdamW(method.parameters(), lr=lr)
    if kind in ("sparse", "sparseadam"):
        sparse = method.sparse_parameters()
        if not sparse:
            raise ValueError(f"method {method.name!r} has no sparse parameters")
        if sparse_optimizer_name(kind) == "hsoftmax.SparseRowAdamW":
            import hsoftmax

            sparse_opt: torch.optim.Optimizer = hsoftmax.SparseRowAdamW(sparse, lr=lr)
        else:
            sparse_opt = torch.optim.SparseAdam(sparse, lr=lr)
        return _Chain(
            sparse_opt,
            torch.optim.AdamW(list(method.dense_parameters()), lr=lr, fused=True),
        )
    raise ValueError(f"expected an optimizer in {OPTIMIZERS}, got {kind!r}")


# --------------------------------------------------------------------------- estimates


def parameter_count(name: str, shape: HeadShape) -> int:
    """Closed-form parameter count of method ``name`` at ``shape`` (no allocation)."""
    d, h, c = shape.in_features, shape.hidden, shape.classes
    if name == "flat":
        return d * c + c
    if name == "flat_bottleneck":
        return d * h + h + h * c + c
    if name == "adaptive":
        cutoffs = [*adaptive_cutoffs(c), c]
        n = d * (cutoffs[0] + len(cutoffs) - 1)  # head, no bias
        for i in range(len(cutoffs) - 1):
            p = d // (4 ** (i + 1))
            n += d * p + p * (cutoffs[i + 1] - cutoffs[i])
        return n
    padded = shape.n_top * shape.n_bottom
    return d * h + h + h * shape.n_top + shape.n_top + padded * h + padded


def estimate_train_bytes(name: str, shape: HeadShape, optimizer: str, itemsize: int = 4) -> int:
    """A rough upper estimate of the peak bytes of a training step, used to skip what won't fit.

    Dense: parameters, gradients and two Adam states (4 copies), plus activations of the logits
    (about 4 ``(B, C)`` tensors for the flat heads). Sparse: parameters and two Adam states of
    the bottom weights (3 copies) plus everything else dense.
    """
    n = parameter_count(name, shape)
    b, c, h = shape.batch, shape.classes, shape.hidden
    if name in ("flat", "flat_bottleneck"):
        act = 4 * b * c
    elif name == "adaptive":
        act = 4 * b * max(adaptive_cutoffs(c)[0], c // 2)
    else:
        act = 4 * b * h * shape.n_bottom
    if optimizer.startswith("sparse"):
        padded = shape.n_top * shape.n_bottom
        bottom = padded * (h + 1)
        return (3 * bottom + 4 * (n - bottom) + act) * itemsize
    return (4 * n + act) * itemsize


def estimate_inference_bytes(name: str, shape: HeadShape, itemsize: int = 4) -> int:
    """Parameters plus about three ``(B, C)`` tensors (logits, log-probs, a temporary)."""
    n = parameter_count(name, shape)
    return (n + 3 * shape.batch * shape.classes) * itemsize
