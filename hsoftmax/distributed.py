"""A hierarchical head whose nodes are sharded across the ranks of a process group.

Each rank keeps a contiguous block of about ``n_top / world_size`` nodes: their rows of the top
layer and their bottom layers (and the optimizer state of those rows only, since the optimizer
sees no other rows); the projection is replicated. A sample needs one node's bottom layer, so
training moves the samples to the rows, never the rows to the samples:

1. every rank computes the hidden vectors ``z`` of its own batch;
2. the hidden vectors and target positions of all ranks are all-gathered
   (``world x batch x hidden`` numbers);
3. every rank computes, for every gathered sample, its nodes' share of the top softmax (the
   maximum and the sum of exponentials of its top logits); the rank that owns a sample's
   target node also computes the target's top logit and ``-log p(slot | node)``;
4. these few numbers per sample go back to the sample's rank (an all-to-all), which combines
   the shares into the top layer's ``logsumexp`` and reduces as
   :func:`~hsoftmax.functional.hierarchical_cross_entropy` does.

Backward mirrors it: the hidden gradients are summed back to their ranks (an all-to-all of
``world x batch x hidden``), and the projection's gradients are all-reduced. Communication per
step is ``O(batch x world x hidden)`` plus the projection (``in_features x hidden``),
independent of the number of classes. The gradients are those of
:class:`~torch.nn.parallel.DistributedDataParallel` on the full head and the same local
batches: the projection's gradients are averaged over the ranks (by hooks, unless
``sync_replicated=False``) and a shard's gradient is the average over the ranks of the
gradients that the samples of every rank give its rows.

Inference moves hidden vectors the same way: :meth:`ShardedOutput.topk` merges one exact top-k
per shard, :meth:`ShardedOutput.predict` keeps the answer of the shard that holds the best
node, and :meth:`ShardedOutput.log_probs` returns every class (``batch x num_classes`` numbers
move, the size of the answer). The collectives are those of :mod:`torch.distributed`
(``all_gather``, ``all_to_all_single``, ``all_reduce``, ``broadcast``, ``gather``), so any
backend that has them works (gloo, NCCL). Checkpoints: the ``state_dict`` holds the shards as
``DTensor`` (``Shard(0)`` over the nodes), which :mod:`torch.distributed.checkpoint` saves and
loads on any world size; :func:`gather_head` rebuilds the full
:class:`~hsoftmax.HierarchicalSoftmax`.

The forward depends on the data (host syncs): this module runs eagerly, not under
``torch.compile``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as HF
from .checks import (
    check_class_weight,
    check_flag,
    check_floating_dtype,
    check_input,
    check_int,
    check_k,
    check_loss_options,
    check_target,
    check_target_values,
)
from .functional import HierarchicalOutput
from .grouping import ClassLayout, class_layout
from .loss import HierarchicalCrossEntropy
from .softmax import HierarchicalSoftmax, _make_activation

__all__ = [
    "ShardedCrossEntropy",
    "ShardedHierarchicalSoftmax",
    "ShardedOutput",
    "gather_head",
    "load_optimizer_state_dict",
    "optimizer_state_dict",
    "shard_head",
    "shard_range",
    "sharded_cross_entropy",
]


# -- the partition -------------------------------------------------------------------------------


def shard_range(n_top: int, world_size: int, rank: int) -> tuple[int, int]:
    """The nodes ``[start, stop)`` that rank ``rank`` holds: blocks of ``ceil(n_top /
    world_size)`` nodes in rank order, as ``torch.chunk`` and ``DTensor``'s ``Shard(0)`` split
    a tensor, so the last ranks may hold fewer nodes or none.

    Example:
        >>> [shard_range(5, 4, rank) for rank in range(4)]
        [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    chunk = -(-n_top // world_size)
    return min(rank * chunk, n_top), min((rank + 1) * chunk, n_top)


# -- collectives with autograd -------------------------------------------------------------------


def _all_gather(x: Tensor, group: Any) -> Tensor:
    """``(n, *)`` on every rank -> ``(world, n, *)``, rank-major (no autograd)."""
    out = x.new_empty((dist.get_world_size(group), *x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


def _exchange(x: Tensor, group: Any) -> Tensor:
    """All-to-all along the first dimension: ``out[j]`` on rank ``i`` is ``x[i]`` of rank ``j``
    (no autograd). ``x``: ``(world, *)``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _GatherFromRanks(torch.autograd.Function):
    """All-gather whose backward sums each rank's gradient back to it (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _exchange(grad, ctx.group).sum(0), None


class _Exchange(torch.autograd.Function):
    """All-to-all along the first dimension; its adjoint is itself."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _exchange(grad, ctx.group), None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose gradient is multiplied by ``scale`` (dense or sparse)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


# -- the head's output -----------------------------------------------------------------------------


class ShardedOutput:
    """What :class:`ShardedHierarchicalSoftmax` returns: this rank's hidden vectors and the
    head that holds this rank's shard.

    Pass it to :class:`~hsoftmax.HierarchicalCrossEntropy` (which calls
    :meth:`cross_entropy`) or :class:`ShardedCrossEntropy`. Every method is a collective: all
    ranks of the head's group must call it, in the same order, each with its own batch (the
    batch sizes may differ).

    Attributes:
        hidden: ``(*, hidden)`` the activated projection of this rank's batch.
        head: the :class:`ShardedHierarchicalSoftmax` that made it.
    """

    def __init__(self, hidden: Tensor, head: ShardedHierarchicalSoftmax) -> None:
        self.hidden = hidden
        self.head = head

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self.head.num_classes

    def cross_entropy(self, target: Tensor, **options: Any) -> Tensor:
        """The loss of this rank's batch: see :func:`sharded_cross_entropy`."""
        return sharded_cross_entropy(self, target, **options)

    def log_probs(self) -> Tensor:
        """Exact log-probabilities of all classes, ``(*, num_classes)``."""
        return _log_probs(self)

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """The exact ``k`` most probable classes, ``(values, indices)``, each ``(*, k)``."""
        return _topk(self, k)

    def predict(self) -> Tensor:
        """The paper's top-1 routing, ``(*)`` class ids (not always the argmax)."""
        return _predict(self)

    def __repr__(self) -> str:
        return f"ShardedOutput(hidden={tuple(self.hidden.shape)}, head={self.head.extra_repr()})"


class _Batch:
    """This rank's batch flattened and padded to the largest batch of the group, so that
    every collective moves equal blocks."""

    def __init__(self, out: ShardedOutput) -> None:
        head = out.head
        self.head, self.group = head, head.group
        self.hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
        self.n = self.hidden.shape[0]
        sizes = _all_gather(torch.tensor([self.n], device=self.hidden.device), self.group)
        self.padded = int(sizes.max())

    def pad(self, t: Tensor, value: float = 0) -> Tensor:
        """``t`` (rows of this batch) padded with ``value`` rows to ``padded`` rows."""
        extra = self.padded - t.shape[0]
        if not extra:
            return t
        return torch.cat([t, t.new_full((extra, *t.shape[1:]), value)])

    def gather_hidden(self) -> Tensor:
        """``(world * padded, hidden)`` the hidden vectors of all ranks, with autograd."""
        gathered = _GatherFromRanks.apply(self.pad(self.hidden), self.group)
        return gathered.reshape(-1, self.hidden.shape[-1])

    def gather(self, t: Tensor, value: float) -> Tensor:
        """``(world * padded, *)`` a per-sample tensor of all ranks, without autograd."""
        return _all_gather(self.pad(t, value), self.group).flatten(0, 1)

    def back(self, t: Tensor) -> Tensor:
        """``(world * padded, *)`` per-sample results, each sample's from its owner, ->
        ``(world, n, *)``: the owners' values for this rank's samples, with autograd."""
        blocks = t.reshape(self.head.world_size, self.padded, *t.shape[1:])
        return _Exchange.apply(blocks, self.group)[:, : self.n]


def _shard(parameter: Tensor, world_size: int) -> Tensor:
    """A shard's parameter as the step uses it: its gradient, summed over the samples of every
    rank, is divided by ``world_size`` (DDP averages over the ranks); detached without grad."""
    if not torch.is_grad_enabled():
        return parameter.detach()
    return _ScaleGrad.apply(parameter, 1.0 / world_size) if world_size > 1 else parameter


def _local_output(head: ShardedHierarchicalSoftmax, sparse: bool) -> HierarchicalOutput:
    """This rank's bottom layers as a :class:`HierarchicalOutput` of its ``n_local`` nodes,
    for the functions of :mod:`hsoftmax.functional` (its hidden and top fields are unused)."""
    weight = _shard(head.bottom_weight, head.world_size)
    bias = _shard(head.bottom_bias, head.world_size)
    mask = None if head.slot_mask is None else head.slot_mask[head.node_start : head.node_stop]
    empty = bias.new_empty(0)
    return HierarchicalOutput(empty, empty, weight, bias, empty, None, mask, sparse)


def _local_top(head: ShardedHierarchicalSoftmax, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The top logits of this rank's nodes, ``(N, n_local)``, and ``(n_local,)`` whether each
    node holds a class (the logits of the others are ``-inf``)."""
    weight, bias = _shard(head.top.weight, head.world_size), _shard(head.top.bias, head.world_size)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    valid = head._local_node_valid()
    return logits.masked_fill(~valid, float("-inf")), valid


def _top_stats(logits: Tensor, valid: Tensor) -> Tensor:
    """``(N, 4)`` per row: the maximum ``m`` of the valid logits (no gradient; ``-inf`` where
    none), ``sum(exp(logit - m))``, the sum of the valid logits and their number. The ranks'
    statistics combine into the top layer's ``logsumexp`` and mean (:func:`_top_normaliser`)."""
    n = logits.shape[0]
    if not bool(valid.any()):
        none = logits.new_zeros(n, 4)
        none[:, 0] = float("-inf")
        return none
    peak = logits.detach().amax(1)
    finite = torch.where(torch.isfinite(peak), peak, 0.0)
    shifted = torch.where(valid, logits - finite[:, None], float("-inf"))
    total = torch.where(valid, logits, 0.0).sum(1)
    count = valid.sum().to(logits.dtype).expand(n)
    return torch.stack([peak, shifted.exp().sum(1), total, count], 1)


def _top_normaliser(stats: Tensor) -> tuple[Tensor, Tensor]:
    """From ``(world, n, 4)`` statistics (:func:`_top_stats`): the ``logsumexp`` of all top
    logits, ``(n,)``, and their mean over the nodes that hold classes, ``(n,)``."""
    peak, sums, total, count = stats.unbind(-1)
    top = peak.amax(0).detach()
    scale = torch.where(torch.isfinite(peak), (peak - top).exp(), 0.0)
    logsumexp = top + (sums * scale).sum(0).log()
    return logsumexp, total.sum(0) / count.sum(0)


def _owned(head: ShardedHierarchicalSoftmax, positions: Tensor) -> Tensor:
    """Indices of the ``positions`` (``-1``: none) that this rank's nodes hold."""
    low, high = head.node_start * head.n_bottom, head.node_stop * head.n_bottom
    return ((positions >= low) & (positions < high)).nonzero().squeeze(1)


# -- training ------------------------------------------------------------------------------------


def sharded_cross_entropy(
    out: ShardedOutput,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """:func:`~hsoftmax.functional.hierarchical_cross_entropy` of this rank's batch, with the
    nodes sharded across the ranks. A collective: every rank calls it.

    The value is the loss of this rank's batch, as the full head gives it. After
    ``backward()``, each parameter's gradient is what
    :class:`~torch.nn.parallel.DistributedDataParallel` gives the full head on the same
    local batches: the shards' gradients are averaged over the ranks here, the projection's by
    the head's hooks (see :class:`ShardedHierarchicalSoftmax`).

    Args:
        out: the sharded head's output for this rank's batch, leading shape ``(*)``.
        target: ``(*)`` integer class ids; entries equal to ``ignore_index`` are skipped.
        weight: optional ``(num_classes,)`` weight of each class. Default: ``None``.
        ignore_index: target value that contributes nothing. Default: ``-100``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        label_smoothing: in ``[0, 1]``, applied per level. Default: ``0.0``.

    Returns:
        The loss of this rank's batch: a scalar, or ``(*)`` with ``reduction='none'``.
    """
    check_loss_options(reduction, label_smoothing)
    head = out.head
    target = check_target(target, tuple(out.hidden.shape[:-1]))
    check_target_values(target, head.num_classes, ignore_index)
    check_class_weight(weight, head.num_classes)
    batch = _Batch(out)
    keep = (target != ignore_index).reshape(-1)
    safe_target = torch.where(keep, target.reshape(-1), 0)
    position = safe_target if head.slot_classes is None else head.class_slots[safe_target]

    # every rank: its nodes' share of the top softmax for every sample of the group; the owner
    # of a sample's node: its top logit and -log p(slot | node) (and the smoothing term)
    positions = batch.gather(torch.where(keep, position, -1), -1)
    hidden = batch.gather_hidden()
    top_logits, valid = _local_top(head, hidden)
    mine = _owned(head, positions)
    local = _local_output(head, head.sparse)
    local_node = torch.div(positions[mine], head.n_bottom, rounding_mode="floor")
    slot = positions[mine] - local_node * head.n_bottom
    local_node = local_node - head.node_start
    bottom = HF._log_softmax(
        HF._node_bottom_logits(local, hidden[mine], local_node.unsqueeze(1)).squeeze(1)
    )
    gold_top = top_logits[mine].gather(1, local_node.unsqueeze(1))
    terms = [gold_top, -bottom.gather(1, slot.unsqueeze(1))]
    if label_smoothing > 0.0:
        terms.append(HF._mean_valid(-bottom, HF._slot_mask_of(local, local_node, bottom))[:, None])
    owned = torch.cat(terms, 1)
    per_sample = owned.new_zeros(positions.shape[0], owned.shape[1]).index_copy(0, mine, owned)
    stats = _top_stats(top_logits, valid)
    back = batch.back(torch.cat([stats, per_sample], 1))  # (world, n, 4 + 2 or 3)
    logsumexp, mean_logit = _top_normaliser(back[..., :4])
    owner = back[..., 4:].sum(0)  # only the owner's entry is nonzero

    nll = logsumexp - owner[:, 0] + owner[:, 1]
    if label_smoothing > 0.0:
        smooth = (logsumexp - mean_logit) + owner[:, 2]
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    sample_weight = keep.to(nll.dtype)
    if weight is not None:
        sample_weight = torch.where(keep, weight.to(nll.dtype)[safe_target], 0.0)
    loss = torch.where(keep, nll * sample_weight, 0.0)
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / sample_weight.sum()


class ShardedCrossEntropy(HierarchicalCrossEntropy):
    """:class:`~hsoftmax.HierarchicalCrossEntropy` under the name of the sharded head: the same
    options, and for a :class:`ShardedOutput` the loss of :func:`sharded_cross_entropy` (which
    ``HierarchicalCrossEntropy`` hands it to).

    Example:
        >>> criterion = ShardedCrossEntropy(label_smoothing=0.1)
        >>> criterion
        ShardedCrossEntropy(ignore_index=-100, reduction='mean', label_smoothing=0.1)
    """


# -- inference -----------------------------------------------------------------------------------


def _shard_scores(head: ShardedHierarchicalSoftmax, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """For the gathered hidden vectors: ``(N, n_local * n_bottom)`` scores of this shard's
    positions, ``top logit + log p(slot | node)`` (the log-probability before the top layer's
    ``logsumexp`` is subtracted; ``-inf`` where masked), and the ``(N, 4)`` statistics of the
    top layer (:func:`_top_stats`)."""
    top_logits, valid = _local_top(head, hidden)
    stats = _top_stats(top_logits, valid)
    if head.node_stop == head.node_start:  # an empty shard
        return hidden.new_empty((hidden.shape[0], 0)), stats
    return HF._all_positions_log_probs(_local_output(head, False), hidden, top_logits), stats


def _log_probs(out: ShardedOutput) -> Tensor:
    with torch.no_grad():
        head, batch = out.head, _Batch(out)
        scores, stats = _shard_scores(head, batch.gather_hidden())
        width = -(-head.n_top // head.world_size) * head.n_bottom  # every shard padded to it
        padding = scores.new_full((scores.shape[0], width - scores.shape[1]), float("-inf"))
        blocks = batch.back(torch.cat([stats, scores, padding], 1))  # (world, n, 4 + width)
        logsumexp, _ = _top_normaliser(blocks[..., :4])
        positions = blocks[..., 4:].permute(1, 0, 2).reshape(batch.n, head.world_size * width)
        positions = positions[:, : head.n_top * head.n_bottom] - logsumexp[:, None]
        if head.slot_classes is not None:
            positions = positions.index_select(1, head.class_slots)
        else:
            positions = positions[:, : head.num_classes]
        return positions.reshape(*out.hidden.shape[:-1], head.num_classes)


def _topk(out: ShardedOutput, k: int) -> tuple[Tensor, Tensor]:
    head = out.head
    check_k(k, head.num_classes)
    with torch.no_grad():
        batch = _Batch(out)
        scores, stats = _shard_scores(head, batch.gather_hidden())
        values, positions = scores.topk(min(k, scores.shape[1]), dim=-1)  # exact in this shard
        positions = positions + head.node_start * head.n_bottom
        classes = positions if head.slot_classes is None else head.slot_classes[positions]
        missing = k - values.shape[1]  # a shard with fewer than k positions
        values = torch.cat([values, values.new_full((values.shape[0], missing), float("-inf"))], 1)
        classes = torch.cat([classes, classes.new_full((classes.shape[0], missing), -1)], 1)
        blocks = batch.back(torch.cat([stats, values], 1))  # (world, n, 4 + k)
        classes = batch.back(classes)
        logsumexp, _ = _top_normaliser(blocks[..., :4])
        width = head.world_size * k
        merged = blocks[..., 4:].permute(1, 0, 2).reshape(batch.n, width)
        best_values, best = merged.topk(k, dim=-1)
        best_classes = classes.permute(1, 0, 2).reshape(batch.n, width).gather(1, best)
        shape = (*out.hidden.shape[:-1], k)
        return (best_values - logsumexp[:, None]).view(shape), best_classes.view(shape)


def _predict(out: ShardedOutput) -> Tensor:
    """Each shard routes every gathered sample to its best node and that node's best slot; the
    sample's rank keeps the answer of the shard whose best node has the highest top logit (the
    first such shard: the lowest node, as ``argmax`` breaks ties)."""
    head = out.head
    with torch.no_grad():
        batch = _Batch(out)
        hidden = batch.gather_hidden()
        top_logits, valid = _local_top(head, hidden)
        if head.node_stop == head.node_start:  # an empty shard
            best = top_logits.new_full((hidden.shape[0],), float("-inf"))
            classes = torch.full_like(best, -1, dtype=torch.long)
        else:
            node = HF._valid_argmax(top_logits, valid)
            best = top_logits.gather(1, node[:, None]).squeeze(1)
            local = _local_output(head, False)
            logits = HF._node_bottom_logits(local, hidden, node.unsqueeze(1)).squeeze(1)
            slots_valid = None if local.slot_mask is None else local.slot_mask.index_select(0, node)
            positions = (node + head.node_start) * head.n_bottom + HF._valid_argmax(
                logits, slots_valid)
            classes = positions if head.slot_classes is None else head.slot_classes[positions]
            best = torch.where(valid.any(), best, float("-inf"))  # a shard without classes
        has = valid.any().to(best.dtype).expand_as(best)
        answers = batch.back(torch.stack([best, has], 1))  # (world, n, 2)
        classes = batch.back(classes)
        # the highest top logit among the shards that hold classes (all -inf: the first of them)
        rank = HF._valid_argmax(answers[..., 0].t(), answers[..., 1].t() > 0)
        return classes.gather(0, rank[None]).squeeze(0).view(out.hidden.shape[:-1])


# -- the module ----------------------------------------------------------------------------------


#: The parameters sharded by node (``Shard(0)`` of the full head's tensors of the same names).
_SHARDED = ("top.weight", "top.bias", "bottom_weight", "bottom_bias")


class _TopRows(nn.Module):
    """This rank's rows of the top layer: ``weight`` ``(n_local, hidden)`` and ``bias``
    ``(n_local,)``, the names of ``nn.Linear(hidden, n_top)``'s parameters."""

    def __init__(self, rows: int, hidden: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, hidden={self.weight.shape[1]}"


def _group_size_rank(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "expected an initialised torch.distributed process group "
            "(torch.distributed.init_process_group), got none"
        )
    return dist.get_world_size(group), dist.get_rank(group)


class ShardedHierarchicalSoftmax(nn.Module):
    """This rank's part of a :class:`~hsoftmax.HierarchicalSoftmax` whose bottom layers are
    sharded by node across a process group.

    The projection ``proj`` is replicated (broadcast from the group's first rank when
    initialised); the top layer's rows ``top.weight``, ``top.bias`` and the bottom layers
    ``bottom_weight``, ``bottom_bias`` hold the nodes ``[node_start, node_stop)`` only
    (:func:`shard_range`). Build it directly (each rank allocates its shard only), on the meta
    device then ``to_empty()`` and ``reset_parameters()``, or from a full head with
    :func:`shard_head`. Build the optimizer after sharding: it then holds the state of this
    rank's rows only.

    The forward returns a :class:`ShardedOutput`; ``HierarchicalCrossEntropy()(local(x), y)``
    (or :class:`ShardedCrossEntropy`) gives the loss of this rank's batch, and after
    ``backward()`` the gradients are those of DDP on the full head (see
    :func:`sharded_cross_entropy`). With ``sync_replicated=True`` hooks average the gradients
    of ``proj`` over the group during ``backward()``, as DDP does; with ``False`` the caller
    does it. Either way, wrap only the backbone in DDP or FSDP2, never the sharded head, whose
    shards differ across ranks.

    Args:
        in_features: size of each input sample.
        n_top: number of nodes of the top layer (of the whole head).
        n_bottom: number of slots per node.
        hidden: size of the projection ``z``.
        num_classes: number of classes, at most ``n_top * n_bottom``. Default:
            ``n_top * n_bottom``, or the length of ``class_slots``.
        class_slots: optional ``(num_classes,)`` positions of the classes, as for
            :class:`~hsoftmax.HierarchicalSoftmax`. Default: the identity.
        activation: as for :class:`~hsoftmax.HierarchicalSoftmax`. Default: ``'relu'``.
        sparse: give the shard's bottom layers sparse gradients of the rows a step touches,
            for :class:`~hsoftmax.SparseRowAdamW`. Default: ``False``.
        device: device of the parameters. Default: ``None``.
        dtype: floating dtype of the parameters. Default: ``None``.
        group: the process group. Default: ``None``, the default group.
        sync_replicated: average the replicated parameters' gradients over the group in
            ``backward()``. Default: ``True``.

    Attributes:
        node_start, node_stop: the nodes this rank holds.
        world_size, rank: of the group.
    """

    slot_classes: Tensor | None
    slot_mask: Tensor | None
    node_mask: Tensor | None
    class_slots: Tensor

    def __init__(
        self,
        in_features: int,
        n_top: int,
        n_bottom: int,
        hidden: int,
        *,
        num_classes: int | None = None,
        class_slots: Tensor | None = None,
        activation: str | nn.Module = "relu",
        sparse: bool = False,
        group: Any = None,
        sync_replicated: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("hidden", hidden)
        check_floating_dtype(dtype)
        if isinstance(class_slots, Tensor):
            class_slots = class_slots.cpu()
        layout = class_layout(n_top, n_bottom, num_classes, class_slots)
        self.world_size, self.rank = _group_size_rank(group)
        self.group = group
        self.in_features, self.n_top, self.n_bottom, self.hidden = (
            in_features, n_top, n_bottom, hidden
        )
        self.sparse = check_flag("sparse", sparse)
        self.sync_replicated = bool(sync_replicated)
        self.node_start, self.node_stop = shard_range(n_top, self.world_size, self.rank)
        n_local = self.node_stop - self.node_start
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.proj = nn.Linear(in_features, hidden, **factory)
        self.activation = _make_activation(activation)
        self.top = _TopRows(n_local, hidden, **factory)
        self.bottom_weight = nn.Parameter(torch.empty(n_local, n_bottom, hidden, **factory))
        self.bottom_bias = nn.Parameter(torch.empty(n_local, n_bottom, **factory))
        self._set_layout(layout)
        self.register_state_dict_post_hook(ShardedHierarchicalSoftmax._shards_as_dtensors)
        self.register_load_state_dict_pre_hook(ShardedHierarchicalSoftmax._before_load)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        """The number of classes."""
        return self.class_slots.shape[0]

    def _set_layout(self, layout: ClassLayout) -> None:
        self._class_slots = None if layout.slot_classes is None else layout.class_slots.cpu()
        device = self.proj.weight.device
        for name, tensor in layout._asdict().items():
            tensor = None if tensor is None else tensor.to(device)
            self.register_buffer(name, tensor, persistent=name == "class_slots")

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The parameters that every rank holds whole: those of ``proj`` and ``activation``."""
        return [*self.proj.parameters(), *self.activation.parameters()]

    def _local_node_valid(self) -> Tensor:
        """``(n_local,)`` whether each of this rank's nodes holds a class."""
        if self.node_mask is None:
            return torch.ones(self.node_stop - self.node_start, dtype=torch.bool,
                              device=self.proj.weight.device)
        return self.node_mask[self.node_start : self.node_stop]

    def _hook_replicated(self) -> None:
        """Average the replicated parameters' gradients over the group in ``backward()``. Hooked
        at the forward, since ``to_empty()`` or ``load_state_dict(assign=True)`` may replace the
        parameters."""
        if not (self.sync_replicated and self.world_size > 1 and torch.is_grad_enabled()):
            return
        for parameter in self.replicated_parameters():
            if parameter.requires_grad and getattr(parameter, "_hsoftmax_averaged", None) is None:
                parameter.register_hook(self._average)
                parameter._hsoftmax_averaged = True  # type: ignore[attr-defined]

    def _average(self, grad: Tensor) -> Tensor:
        grad = grad / self.world_size
        dist.all_reduce(grad, group=self.group)
        return grad

    def reset_parameters(self) -> None:
        """Initialise as :class:`~hsoftmax.HierarchicalSoftmax` does, then broadcast the
        replicated parameters from the group's first rank (a collective, except on the meta
        device)."""
        self._set_layout(class_layout(self.n_top, self.n_bottom, self.num_classes,
                                      self._class_slots))
        self.proj.reset_parameters()
        bound = 1.0 / math.sqrt(self.hidden)  # as nn.Linear(hidden, n_top) initialises
        nn.init.uniform_(self.top.weight, -bound, bound)
        nn.init.uniform_(self.top.bias, -bound, bound)
        nn.init.uniform_(self.bottom_weight, -bound, bound)
        nn.init.uniform_(self.bottom_bias, -bound, bound)
        self.broadcast_replicated()

    @torch.no_grad()
    def broadcast_replicated(self) -> None:
        """Copy the replicated parameters of the group's first rank to every rank."""
        if self.proj.weight.device.type == "meta" or self.world_size == 1:
            return
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for parameter in self.replicated_parameters():
            dist.broadcast(parameter.data, source, group=self.group)

    def extra_repr(self) -> str:
        grouped = ", class_slots=custom" if self.slot_classes is not None else ""
        return (
            f"in_features={self.in_features}, n_top={self.n_top}, n_bottom={self.n_bottom}, "
            f"hidden={self.hidden}, num_classes={self.num_classes}{grouped}, "
            f"nodes=[{self.node_start}, {self.node_stop}) of rank {self.rank}/{self.world_size}"
            + (", sparse=True" if self.sparse else "")
        )

    def forward(self, x: Tensor) -> ShardedOutput:
        """Project this rank's batch and compute its top logits (no communication).

        Args:
            x: ``(*, in_features)`` floating-point input.

        Returns:
            A :class:`ShardedOutput` for the loss and inference.
        """
        check_input(x, self.in_features)
        self._hook_replicated()
        hidden = self.activation(self.proj(x))
        return ShardedOutput(hidden, self)

    def log_probs(self, x: Tensor) -> Tensor:
        """Exact log-probabilities of all classes for this rank's ``x`` (a collective)."""
        return self(x).log_probs()

    def predict(self, x: Tensor) -> Tensor:
        """The paper's top-1 routing for this rank's ``x`` (a collective)."""
        return self(x).predict()

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The exact ``k`` most probable classes for this rank's ``x`` (a collective)."""
        return self(x).topk(k)

    # -- checkpoints: the shards as DTensors ---------------------------------------------------

    def _mesh(self) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        group = self.group if self.group is not None else dist.group.WORLD
        return DeviceMesh.from_group(group, self.proj.weight.device.type)  # type: ignore[arg-type]

    @staticmethod
    def _shards_as_dtensors(
        module: ShardedHierarchicalSoftmax, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """Put the shards in the state dict as ``DTensor``s of the full ``(n_top, ...)``
        tensors, ``Shard(0)``: what :mod:`torch.distributed.checkpoint` reshards."""
        from torch.distributed.tensor import DTensor, Shard

        mesh = module._mesh()
        for name in _SHARDED:
            key = prefix + name
            local = state_dict.get(key)
            if isinstance(local, Tensor) and not isinstance(local, DTensor):
                shape = torch.Size((module.n_top, *local.shape[1:]))
                stride = torch.empty(shape, device="meta").stride()
                state_dict[key] = DTensor.from_local(
                    local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride
                )

    def _before_load(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Accept the shards as ``DTensor``s (from :mod:`torch.distributed.checkpoint`) or the
        full tensors of a :class:`~hsoftmax.HierarchicalSoftmax` (this rank's rows are kept);
        check a custom ``class_slots``."""
        from torch.distributed.tensor import DTensor

        for name in _SHARDED:
            value = state_dict.get(prefix + name)
            if isinstance(value, DTensor):
                value = _local_rows(self, value)
            if isinstance(value, Tensor) and value.shape[:1] == (self.n_top,):
                value = value[self.node_start : self.node_stop]
            if value is not None:
                state_dict[prefix + name] = value
        slots = state_dict.get(prefix + "class_slots")
        if (
            isinstance(slots, Tensor)
            and not slots.is_meta
            and slots.shape == self.class_slots.shape
        ):
            layout = class_layout(self.n_top, self.n_bottom, self.num_classes, slots.cpu())
            self._class_slots = None if layout.slot_classes is None else layout.class_slots
            self._pending_layout = layout

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        layout = self.__dict__.pop("_pending_layout", None)
        if layout is not None:
            self._set_layout(layout)


# -- from and to a full head ---------------------------------------------------------------------


def shard_head(
    head: HierarchicalSoftmax, group: Any = None, sync_replicated: bool = True
) -> ShardedHierarchicalSoftmax:
    """This rank's part of a full head that is identical on every rank.

    The result keeps a copy of the projection and this rank's block of nodes (their top-layer
    rows and bottom layers, :func:`shard_range`); the full head can then be freed. A head on
    the meta device gives a shard on the meta device: ``to_empty(device=...)`` then
    ``reset_parameters()`` allocate and initialise this rank's rows only.

    Args:
        head: the full :class:`~hsoftmax.HierarchicalSoftmax`.
        group: the process group. Default: ``None``, the default group.
        sync_replicated: see :class:`ShardedHierarchicalSoftmax`. Default: ``True``.

    Returns:
        The :class:`ShardedHierarchicalSoftmax` of this rank.
    """
    if not isinstance(head, HierarchicalSoftmax):
        raise TypeError(f"expected a HierarchicalSoftmax, got {type(head).__name__}")
    weight = head.bottom_weight
    with torch.device("meta"):
        local = ShardedHierarchicalSoftmax(
            head.in_features, head.n_top, head.n_bottom, head.hidden,
            num_classes=head.num_classes, class_slots=head._class_slots,
            activation=copy.deepcopy(head.activation), sparse=head.sparse, group=group,
            sync_replicated=sync_replicated, dtype=weight.dtype,
        )
    local.to_empty(device=weight.device)
    local.load_state_dict(head.state_dict())  # each rank keeps its rows (see _before_load)
    local.train(head.training)
    return local


def _gather_rows(shard: Tensor, local: ShardedHierarchicalSoftmax, dst: int | None) -> Tensor:
    """The full ``(n_top, ...)`` tensor of a node-sharded parameter on rank ``dst`` (every rank
    with ``None``); an empty tensor on the others."""
    chunk = -(-local.n_top // local.world_size)
    padded = shard.detach().new_zeros((chunk, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard.detach()
    if dst is None:
        return _all_gather(padded, local.group).flatten(0, 1)[: local.n_top]
    if local.rank != dst:
        dist.gather(padded, None, group_dst=dst, group=local.group)
        return padded.new_empty(0)
    gathered = padded.new_empty((local.world_size, *padded.shape))
    dist.gather(padded, list(gathered.unbind(0)), group_dst=dst, group=local.group)
    return gathered.flatten(0, 1)[: local.n_top]


@torch.no_grad()
def gather_head(
    local: ShardedHierarchicalSoftmax, dst: int | None = 0
) -> HierarchicalSoftmax | None:
    """The full :class:`~hsoftmax.HierarchicalSoftmax`, for a checkpoint or single-device
    serving (a collective).

    Args:
        local: this rank's :class:`ShardedHierarchicalSoftmax`.
        dst: the group rank that gets the head, or ``None`` for every rank (each then holds
            the full bottom layers). Default: ``0``.

    Returns:
        The full head on rank ``dst`` (every rank with ``dst=None``), ``None`` elsewhere.
    """
    if not isinstance(local, ShardedHierarchicalSoftmax):
        raise TypeError(f"expected a ShardedHierarchicalSoftmax, got {type(local).__name__}")
    rows = {name: _gather_rows(local.get_parameter(name), local, dst) for name in _SHARDED}
    if dst is not None and local.rank != dst:
        return None
    weight = local.bottom_weight
    with torch.device("meta"):
        head = HierarchicalSoftmax(
            local.in_features, local.n_top, local.n_bottom, local.hidden,
            num_classes=local.num_classes, class_slots=local._class_slots,
            activation=copy.deepcopy(local.activation), sparse=local.sparse, dtype=weight.dtype,
        )
    head.to_empty(device=weight.device)
    state = {k: v for k, v in local.state_dict().items() if k not in _SHARDED}
    head.load_state_dict({**state, **rows})
    head.train(local.training)
    return head


# -- optimizer state for torch.distributed.checkpoint ----------------------------------------------


def _as_dtensor(head: ShardedHierarchicalSoftmax, local: Tensor) -> Tensor:
    """This rank's rows as a ``DTensor`` of the full ``(n_top, ...)`` tensor, ``Shard(0)``."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size((head.n_top, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, head._mesh(), [Shard(0)], run_check=False, shape=shape, stride=stride
    )


def _local_rows(head: ShardedHierarchicalSoftmax, value: Any) -> Tensor:
    """This rank's rows of a ``DTensor`` of a full ``(n_top, ...)`` tensor. The same choice on
    every rank (``full_tensor`` is a collective): the local part when it is sharded as ours."""
    from torch.distributed.tensor import Shard

    ours = value.device_mesh.size() == head.world_size and tuple(value.placements) == (Shard(0),)
    if ours:
        return value.to_local()
    return value.full_tensor()[head.node_start : head.node_stop]


def _head_parameters(
    head: ShardedHierarchicalSoftmax, optimizer: torch.optim.Optimizer
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the head's parameters that ``optimizer`` updates."""
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [(n, p) for n, p in head.named_parameters() if id(p) in optimized]


@torch.no_grad()
def _initialise_state(head: ShardedHierarchicalSoftmax, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state of the head's parameters (a step with zero gradients and
    learning rate 0), so that there are tensors for a checkpoint to be loaded into."""
    params = [p for _, p in _head_parameters(head, optimizer) if not optimizer.state.get(p)]
    if not params:
        return
    saved = [(p, p.grad) for p in params]
    new = {id(p) for p in params}
    for p in params:
        sparse = head.sparse and (p is head.bottom_weight or p is head.bottom_bias)
        p.grad = (
            torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=p.device),
                                    p.new_empty((0, *p.shape[1:])), p.shape,
                                    check_invariants=False)
            if sparse else torch.zeros_like(p)
        )
    others = [(q, q.grad) for g in optimizer.param_groups for q in g["params"] if id(q) not in new]
    for q, _ in others:
        q.grad = None  # only the head's new parameters take this step
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        for p, grad in saved + others:
            p.grad = grad


def optimizer_state_dict(
    head: ShardedHierarchicalSoftmax, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer's state of the head's parameters, by parameter name, with the state of
    the shards as ``DTensor``s of full ``(n_top, ...)`` tensors: what
    :mod:`torch.distributed.checkpoint` saves, and loads on any world size with
    :func:`load_optimizer_state_dict`.

    The state of the optimizer's other parameters (a backbone's) is not included: save it with
    :func:`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` or by hand. State
    that the optimizer has not created yet is created first (a step with learning rate 0).

    Args:
        head: this rank's :class:`ShardedHierarchicalSoftmax`.
        optimizer: an optimizer of (some of) its parameters, e.g. AdamW or
            :class:`~hsoftmax.SparseRowAdamW`, whose per-parameter state holds tensors of the
            parameter's shape and scalars.

    Returns:
        ``{parameter name: {state name: value}}``.
    """
    _initialise_state(head, optimizer)
    state: dict[str, Any] = {}
    for name, parameter in _head_parameters(head, optimizer):
        entries = {}
        for key, value in optimizer.state[parameter].items():
            if name in _SHARDED and isinstance(value, Tensor) and value.shape == parameter.shape:
                value = _as_dtensor(head, value)
            entries[key] = value
        state[name] = entries
    return state


@torch.no_grad()
def load_optimizer_state_dict(
    head: ShardedHierarchicalSoftmax, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what :func:`optimizer_state_dict` gave (possibly on another world size, through
    :mod:`torch.distributed.checkpoint`) into the optimizer: each rank keeps its rows.

    Example (on every rank)::

        state = {"head": head.state_dict(), "optim": optimizer_state_dict(head, optimizer)}
        dcp.load(state, checkpoint_id=path)
        head.load_state_dict(state["head"])
        load_optimizer_state_dict(head, optimizer, state["optim"])
    """
    from torch.distributed.tensor import DTensor

    _initialise_state(head, optimizer)
    for name, parameter in _head_parameters(head, optimizer):
        if name not in state:
            continue
        target = optimizer.state[parameter]
        for key, value in state[name].items():
            if isinstance(value, DTensor):
                value = _local_rows(head, value)
            if isinstance(target.get(key), Tensor) and isinstance(value, Tensor):
                target[key].copy_(value)
            else:
                target[key] = value
