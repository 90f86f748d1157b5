"""The heads the benchmarks compare, each behind one small interface (:class:`Method`).

- ``loss(x, y)``: the mean training loss; ``log_probs(x)``: exact log-probabilities of all
  classes; ``topk(x, k)``: the exact top-k; ``predict(x)``: the exact argmax for the flat heads
  and the adaptive softmax, *top-1 routing* (argmax node, then argmax slot) for the two-level
  heads. ``Method.notes`` says how each answer is computed; the CSV copies it.

Baselines:

- ``flat``: ``nn.Linear(in_features, C)`` + ``F.cross_entropy`` (143.4M parameters at 80k).
- ``linear_ce``: the same weights trained with torch's chunked ``F.linear_cross_entropy``
  (``options=nn.LinearCrossEntropyOptions()``), which never builds the full ``(B, C)`` logits;
  inference as ``flat``. Needs torch >= 2.13: on older versions its rows say so and skip.
- ``flat_bottleneck``: ``Linear(in, hidden) -> ReLU -> Linear(hidden, C)``, the flat softmax on
  the same bottleneck as the hierarchical head (about the same parameter count: the parameter
  saving of the hierarchical head comes from the bottleneck, not the hierarchy).
- ``adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss`` (cutoffs at 2.5%, 12.5% and 50% of C,
  div_value=4). Uniform labels are its worst case: it is built for Zipfian frequencies.
- ``gather_bmm``: a plain two-level softmax as in the paper's code: ``W_bottom[node]`` advanced
  indexing + ``torch.bmm``, dense gradients; log-probs by one einsum, top-k by brute force.

Ours, through the public API only (``HierarchicalSoftmax``, ``HierarchicalCrossEntropy``,
``head.log_probs/topk/predict``, ``split_parameters``, ``SparseRowAdamW``):

- ``hsoftmax``: the dense head; ``hsoftmax_sparse``: ``sparse=True`` with ``SparseRowAdamW``;
- ``hsoftmax_reference``: the dense head with the reference path forced
  (``HSOFTMAX_REFERENCE=1`` in its worker, ``hsoftmax.use_reference_path(True)`` in-process).
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
METHODS = (
    "flat", "linear_ce", "flat_bottleneck", "adaptive", "gather_bmm",
    "hsoftmax", "hsoftmax_sparse", "hsoftmax_reference",
)
#: Methods whose inference is another method's (timed once, under that name).
TRAIN_ONLY = ("linear_ce", "hsoftmax_sparse")


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


def linear_ce_available() -> tuple[bool, str]:
    """Whether this torch has the chunked ``F.linear_cross_entropy`` (torch >= 2.13)."""
    if hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions"):
        return True, ""
    return False, f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"


class LinearCE(Flat):
    """``nn.Linear(in_features, C)`` trained with the chunked ``F.linear_cross_entropy``."""

    name = "linear_ce"
    notes = {  # noqa: RUF012
        **Flat.notes,
        "train": "F.linear_cross_entropy(x, W, y, linear_bias=b, "
                 "options=nn.LinearCrossEntropyOptions()) (chunked, default options)",
    }

    def __init__(self, shape: HeadShape, device: Any = None, dtype: Any = None) -> None:
        super().__init__(shape, device, dtype)
        self.options = getattr(nn, "LinearCrossEntropyOptions")()  # noqa: B009 (torch < 2.13)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        fc = self.fc
        assert isinstance(fc, nn.Linear)
        return getattr(F, "linear_cross_entropy")(  # noqa: B009 (absent before torch 2.13)
            x, fc.weight, y, linear_bias=fc.bias, options=self.options
        )


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


def hsoftmax_available(reference: bool = False) -> tuple[bool, str]:
    """Whether the public API this benchmark uses imports (and, with ``reference``, the switch
    ``hsoftmax.use_reference_path``)."""
    try:
        import hsoftmax
    except Exception as exc:  # pragma: no cover - depends on the working tree
        return False, f"import hsoftmax failed: {exc!r}"
    names = ["HierarchicalSoftmax", "HierarchicalCrossEntropy"]
    if reference:
        names.append("use_reference_path")
    missing = [n for n in names if not hasattr(hsoftmax, n)]
    return (False, f"hsoftmax has no {', '.join(missing)} yet") if missing else (True, "")


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
            kwargs["sparse"] = True
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

        return list(hsoftmax.split_parameters(self.head)[1])

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        sparse_ids = {id(p) for p in self.sparse_parameters()}
        return (p for p in self.parameters() if id(p) not in sparse_ids)


# --------------------------------------------------------------------------- factories


def build_method(name: str, shape: HeadShape, device: Any = None, dtype: Any = None) -> Method:
    """Build the method ``name`` (one of :data:`METHODS`) at ``shape``.

    ``hsoftmax_reference`` builds the dense head; the caller forces the reference path.
    """
    classes: dict[str, type[Method]] = {
        "flat": Flat, "linear_ce": LinearCE, "flat_bottleneck": FlatBottleneck,
        "adaptive": Adaptive, "gather_bmm": GatherBmm,
    }
    if name in classes:
        return classes[name](shape, device, dtype)
    if name in ("hsoftmax", "hsoftmax_reference"):
        m = HSoftmaxMethod(shape, device, dtype)
        m.name = name
        return m
    if name == "hsoftmax_sparse":
        m = HSoftmaxMethod(shape, device, dtype, sparse=True)
        m.name = name
        return m
    raise ValueError(f"expected a method in {METHODS}, got {name!r}")


def train_variant(method: str) -> str:
    """The optimizer a method trains with: ``sparse`` for the sparse head, else ``adamw_fused``."""
    return "sparse" if method == "hsoftmax_sparse" else "adamw_fused"


class _Chain:
    """Several optimizers stepped together (the sparse rows' and the dense rest's)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()


def make_optimizer(method: Method, kind: str, lr: float = 1e-3) -> Any:
    """``adamw_fused``: ``torch.optim.AdamW(fused=True)`` on every parameter; ``sparse``:
    ``hsoftmax.SparseRowAdamW`` on ``split_parameters(head)[1]`` and fused AdamW on the rest."""
    if kind == "adamw_fused":
        return torch.optim.AdamW(method.parameters(), lr=lr, fused=True)
    if kind == "sparse":
        import hsoftmax

        sparse = method.sparse_parameters()
        if not sparse:
            raise ValueError(f"method {method.name!r} has no sparse parameters")
        dense = list(method.dense_parameters())
        return _Chain(hsoftmax.SparseRowAdamW(sparse, lr=lr),
                      torch.optim.AdamW(dense, lr=lr, fused=True))
    raise ValueError(f"expected an optimizer in ('adamw_fused', 'sparse'), got {kind!r}")


# --------------------------------------------------------------------------- estimates


def parameter_count(name: str, shape: HeadShape) -> int:
    """Closed-form parameter count of method ``name`` at ``shape`` (no allocation)."""
    d, h, c = shape.in_features, shape.hidden, shape.classes
    if name in ("flat", "linear_ce"):
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
    elif name == "linear_ce":
        act = b * c + c * shape.in_features  # a slice of the logits, a weight-gradient scratch
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


def estimate_bytes(task: str, name: str, shape: HeadShape) -> int:
    """The estimate for a task: training (``train``) or inference (the others)."""
    if task == "train":
        return estimate_train_bytes(name, shape, train_variant(name))
    return estimate_inference_bytes(name, shape)
