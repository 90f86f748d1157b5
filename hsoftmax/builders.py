"""Builders of class -> slot mappings (``class_slots``) and a shape suggestion.

The paper puts class ``y`` at node ``y // n_bottom``: neighbours by index share a node whether
they look alike or not. A better mapping puts similar classes under one node, so that the top
layer learns a coarse decision and each node a fine one. Each builder here returns a LongTensor
``class_slots`` of shape ``(num_classes,)`` with distinct positions in ``[0, n_top * n_bottom)``,
to pass as ``HierarchicalSoftmax(..., class_slots=class_slots)``:

- :func:`slots_from_taxonomy`: from each class's parent (e.g. its genus);
- :func:`slots_from_embeddings`: balanced clustering of class embeddings (the rows of a trained
  flat classifier's weight, or class-mean features);
- :func:`suggest_shape`: an ``(n_top, n_bottom)`` for a number of classes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .checks import check_int, check_tolerance

__all__ = ["slots_from_embeddings", "slots_from_taxonomy", "suggest_shape"]


def _check_capacity(num_classes: int, n_top: int, n_bottom: int) -> None:
    if num_classes > n_top * n_bottom:
        raise ValueError(
            f"expected at most n_top * n_bottom = {n_top * n_bottom} classes, got {num_classes}"
        )


def suggest_shape(num_classes: int, tolerance: float = 0.05) -> tuple[int, int]:
    """Suggest ``(n_top, n_bottom)`` for ``num_classes`` classes.

    The rule: a training step touches ``n_top + n_bottom`` output rows per sample, which is
    smallest near ``n_top = n_bottom = sqrt(num_classes)``. Among the shapes with
    ``n_bottom <= ceil(sqrt(num_classes))`` and ``n_top = ceil(num_classes / n_bottom)`` (so
    ``n_top * n_bottom >= num_classes`` and ``n_top >= n_bottom`` up to rounding) whose
    ``n_top + n_bottom`` is within ``tolerance`` of the smallest, it picks the one with the
    fewest unused slots ``n_top * n_bottom - num_classes``, then the smallest sum, then the
    largest ``n_bottom``. ``n_bottom`` is kept the smaller factor because the per-sample read
    of one node's weights costs ``n_bottom * hidden``, while the top layer is one dense matmul.

    Args:
        num_classes: the number of classes.
        tolerance: how far (relative) ``n_top + n_bottom`` may exceed its minimum to waste
            fewer slots. Default: 0.05.

    Returns:
        ``(n_top, n_bottom)``.

    Raises:
        ValueError: if ``num_classes`` is not a positive int or ``tolerance`` is negative.

    Example:
        >>> suggest_shape(80_000)
        (320, 250)
        >>> suggest_shape(1000)
        (40, 25)
    """
    check_int("num_classes", num_classes)
    check_tolerance(tolerance)
    n_bottom = np.arange(1, math.isqrt(num_classes - 1) + 2, dtype=np.int64)
    n_bottom = n_bottom[n_bottom <= max(1, math.ceil(math.sqrt(num_classes)))]
    n_top = -(-num_classes // n_bottom)
    total = n_top + n_bottom
    ok = total <= math.floor(int(total.min()) * (1 + tolerance))
    waste = n_top * n_bottom - num_classes
    # lexsort: the last key is the primary one
    best = np.lexsort((-n_bottom[ok], total[ok], waste[ok]))[0]
    return int(n_top[ok][best]), int(n_bottom[ok][best])


def _as_long_vector(name: str, values: object) -> Tensor:
    if isinstance(values, Tensor):
        tensor = values
    elif isinstance(values, (Sequence, np.ndarray)) and not isinstance(values, (str, bytes)):
        try:
            tensor = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"expected {name} to be a sequence of ints, got {values!r}") from error
    else:
        raise TypeError(
            f"expected {name} to be a 1-d integer tensor or a sequence of ints, "
            f"got {type(values).__name__}"
        )
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(
            f"expected {name} of shape (num_classes,) with num_classes >= 1, "
            f"got {tuple(tensor.shape)}"
        )
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"expected {name} of an integer dtype, got {tensor.dtype}")
    return tensor.long()


def slots_from_taxonomy(
    parents: Tensor | Sequence[int], n_top: int, n_bottom: int
) -> Tensor:
    """Put sibling classes (same parent, e.g. same genus) under the same node.

    Classes are grouped by parent. A parent with ``n_bottom`` or more children fills whole
    nodes with them (``size // n_bottom`` of them) and its remaining children are packed as a
    smaller group. Groups smaller than a node share nodes: they are placed largest first, each
    into the node with the least free room that still holds it whole (best-fit decreasing).
    Only when no node has room for a group whole is it split, over the nodes with the most
    free room. Inside a node, siblings sit next to each other in class-id order. The result
    is deterministic; nodes left empty (when ``n_top * n_bottom`` exceeds what is needed) are
    masked by the head.

    Args:
        parents: ``(num_classes,)`` integer parent id of each class (any integers; equal ids
            mean siblings).
        n_top: nodes of the top layer.
        n_bottom: slots per node.

    Returns:
        ``(num_classes,)`` int64 ``class_slots`` with distinct positions in
        ``[0, n_top * n_bottom)``, on the CPU.

    Raises:
        TypeError: if ``parents`` is not integer.
        ValueError: if ``parents`` is not 1-d and non-empty, or the classes do not fit in
            ``n_top * n_bottom`` positions.

    Example:
        >>> genus = [7, 3, 7, 3, 3, 9, 7]  # classes 1, 3, 4 share genus 3; 0, 2, 6 genus 7
        >>> slots = slots_from_taxonomy(genus, n_top=3, n_bottom=3)
        >>> (slots // 3).tolist()  # the node of each class
        [1, 0, 1, 0, 0, 2, 1]
    """
    check_int("n_top", n_top)
    check_int("n_bottom", n_bottom)
    parent = _as_long_vector("parents", parents).cpu()
    num_classes = parent.numel()
    _check_capacity(num_classes, n_top, n_bottom)
    _, group = torch.unique(parent, return_inverse=True)
    sizes = torch.bincount(group).numpy()
    # the classes of each group, contiguous and in class-id order
    members = torch.sort(group, stable=True).indices.numpy()
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))

    slots = np.empty(num_classes, dtype=np.int64)
    cursor = starts.copy()  # next unplaced member of each group

    def place(g: int, count: int, node: int, offset: int) -> None:
        chunk = members[cursor[g] : cursor[g] + count]
        slots[chunk] = node * n_bottom + offset + np.arange(count)
        cursor[g] += count

    # whole nodes for large groups
    node = 0
    for g in np.flatnonzero(sizes >= n_bottom):
        for _ in range(int(sizes[g]) // n_bottom):
            place(int(g), n_bottom, node, 0)
            node += 1
    # best-fit decreasing for the rest; free room kept sorted as (free, node)
    free = [(n_bottom, n) for n in range(node, n_top)]
    rests = sizes % n_bottom
    order = np.lexsort((np.arange(len(sizes)), -rests))
    for g in order[rests[order] > 0]:
        need = int(rests[g])
        while need:
            i = bisect.bisect_left(free, (need, -1))
            if i == len(free):  # no node holds the group whole: fill the roomiest one
                i = len(free) - 1
            room, target = free.pop(i)
            count = min(room, need)
            place(int(g), count, target, n_bottom - room)
            need -= count
            if room > count:
                bisect.insort(free, (room - count, target))
    return torch.from_numpy(slots)


def _candidates(
    points: Tensor, centroids: Tensor, blocked: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    """The ``width`` nearest non-blocked centroids of every point, nearest first, and their
    distances (up to a per-point constant), in row chunks of about 4M distances. Blocked
    centroids (at infinite distance) fill the tail when fewer are open."""
    rows = max(1, (1 << 22) // max(1, centroids.shape[0]))
    bias = (centroids * centroids).sum(1).masked_fill(blocked, float("inf"))
    index, dist = [], []
    for chunk in points.split(rows):
        # |x - c|^2 - |x|^2; the addmm keeps one (rows, k) buffer
        d = torch.addmm(bias, chunk, centroids.T, alpha=-2.0)
        value, arg = d.topk(width, dim=1, largest=False, sorted=True)
        index.append(arg)
        dist.append(value)
    return torch.cat(index), torch.cat(dist)


def _balanced_assign(points: Tensor, centroids: Tensor, capacity: int, width: int = 16) -> Tensor:
    """Assign every point to a centroid, at most ``capacity`` per centroid.

    Rounds of proposals: every unassigned point proposes to the next centroid on its list of
    nearest ones; each centroid accepts its closest proposers up to its room and rejects the
    rest, who move down their list. A point whose list runs out gets a fresh list of the
    nearest centroids that still have room.
    """
    n, k = points.shape[0], centroids.shape[0]
    width = min(width, k)
    device = points.device
    room = torch.full((k,), capacity, dtype=torch.long, device=device)
    cand, cand_dist = _candidates(points, centroids, room == 0, width)
    pointer = torch.zeros(n, dtype=torch.long, device=device)
    assign = torch.full((n,), -1, dtype=torch.long, device=device)
    pending = torch.arange(n, device=device)
    while pending.numel():
        stale = pending[pointer[pending] >= width]
        if stale.numel():
            cand[stale], cand_dist[stale] = _candidates(
                points[stale], centroids, room == 0, width
            )
            pointer[stale] = 0
        column = pointer[pending]
        target = cand[pending, column]
        dist = cand_dist[pending, column]
        # sort by (target, distance, point id): stable sorts, the primary key last
        order = torch.sort(dist, stable=True).indices
        order = order[torch.sort(target[order], stable=True).indices]
        sorted_target = target[order]
        counts = torch.bincount(sorted_target, minlength=k)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=device) - first[sorted_target]
        accept = torch.zeros_like(pending, dtype=torch.bool)
        accept[order] = rank < room[sorted_target]
        assign[pending[accept]] = target[accept]
        room -= torch.bincount(target[accept], minlength=k)
        pointer[pending[~accept]] += 1
        pending = pending[~accept]
    return assign


def slots_from_embeddings(
    embeddings: Tensor,
    n_top: int,
    n_bottom: int,
    *,
    iters: int = 10,
    normalize: bool = False,
    seed: int = 0,
) -> Tensor:
    """Group similar classes under one node by balanced k-means on class embeddings.

    Runs k-means with ``n_top`` centroids in which every cluster holds at most ``n_bottom``
    classes. Centroids start at ``n_top`` distinct classes drawn with ``seed``; each iteration
    assigns classes greedily (every class proposes to its nearest centroid with room, a full
    centroid keeps its closest proposers) and moves each centroid to the mean of its classes,
    until the assignment stops changing or after ``iters`` iterations. Cluster ``k`` becomes
    node ``k``; its classes take its slots in class-id order. Everything is vectorized: the
    distance matrix is computed in row chunks of about 4M entries.

    Good embeddings: the rows of a trained flat classifier's weight ``(num_classes, features)``
    (with ``normalize=True``), or the mean feature of each class's training samples.

    Args:
        embeddings: ``(num_classes, dim)`` floating-point embedding of each class.
        n_top: nodes of the top layer (clusters).
        n_bottom: slots per node (the most classes per cluster).
        iters: the most k-means iterations. Default: 10.
        normalize: L2-normalize the embeddings first (cosine similarity, spherical k-means).
            Default: ``False``.
        seed: seed of the initial centroids; the result is deterministic for a given seed.
            Default: 0.

    Returns:
        ``(num_classes,)`` int64 ``class_slots`` with distinct positions in
        ``[0, n_top * n_bottom)``, on the device of ``embeddings``.

    Raises:
        TypeError: if ``embeddings`` is not a floating-point tensor.
        ValueError: if it is not 2-d and non-empty, or the classes do not fit in
            ``n_top * n_bottom`` positions.

    Example:
        >>> import torch
        >>> centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
        >>> emb = centres.repeat_interleave(4, dim=0) + 0.1 * torch.randn(12, 2)
        >>> slots = slots_from_embeddings(emb, n_top=3, n_bottom=4)
        >>> nodes = (slots // 4).view(3, 4)  # four classes per true cluster
        >>> bool((nodes == nodes[:, :1]).all()), len(set(nodes[:, 0].tolist()))
        (True, 3)
    """
    check_int("n_top", n_top)
    check_int("n_bottom", n_bottom)
    check_int("iters", iters)
    if not isinstance(embeddings, Tensor) or not embeddings.dtype.is_floating_point:
        got = embeddings.dtype if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise TypeError(f"expected embeddings to be a floating-point torch.Tensor, got {got}")
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(
            f"expected embeddings of shape (num_classes, dim), got {tuple(embeddings.shape)}"
        )
    num_classes = embeddings.shape[0]
    _check_capacity(num_classes, n_top, n_bottom)
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("expected finite embeddings, got NaN or infinite values")
    points = embeddings.detach()
    if points.dtype != torch.float64:
        points = points.float()
    if normalize:
        points = torch.nn.functional.normalize(points, dim=1)
    k = min(n_top, num_classes)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randperm(num_classes, generator=generator)[:k].to(points.device)
    centroids = points[start].clone()
    assign = _balanced_assign(points, centroids, n_bottom)
    for _ in range(iters - 1):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(points.dtype)
        new = _balanced_assign(points, centroids, n_bottom)
        if torch.equal(new, assign):
            break
        assign = new
    by_cluster = torch.sort(assign, stable=True).indices
    counts = torch.bincount(assign, minlength=k)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(assign)
    slot[by_cluster] = torch.arange(num_classes, device=assign.device) - first[assign[by_cluster]]
    return assign * n_bottom + slot
