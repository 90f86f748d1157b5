"""Work tensors reused across training steps on the CPU, as CUDA's caching allocator does.

Each step of the bottom layers needs tensors of ``batch x n_bottom x hidden`` (the rows'
gradients) and, with dense gradients, one of the full size of ``bottom_weight``. With
glibc's default ``malloc`` such tensors are handed back to the system when freed (those over
32 MB always are), so every step page-faults them in again, a large share of a step at the
PlantCLEF size. :func:`recycled_empty` instead returns the storage it gave out last time for the
same owner and purpose, but only once nothing else references that storage: not a graph kept
for another backward, not a ``.grad``, not a user's variable. The results are therefore the
same as with fresh tensors. Other devices, and compiled graphs, allocate afresh. The cache
holds at most one storage per owner and purpose, and lets go of it with the owner or with
:func:`release`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["recycled_empty", "release"]

# the owner's storage -> {purpose: UntypedStorage}, dropped with it. Keyed by the storage, so
# that a detached alias of a parameter shares the parameter's work tensors.
_storages = WeakIdKeyDictionary()
_lock = threading.Lock()
_COUNTS_USES = hasattr(torch._C, "_storage_Use_Count")  # without it, nothing is reused


def _unreferenced(storage: torch.UntypedStorage) -> bool:
    """Whether only this cache holds ``storage``."""
    return bool(torch._C._storage_Use_Count(storage._cdata) == 1)


def recycled_empty(owner: Tensor, purpose: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous tensor on ``owner``'s device, reusing the storage returned for
    ``(owner, purpose)`` last time when it is large enough and no longer referenced elsewhere.

    Args:
        owner: the tensor the work belongs to, e.g. a parameter; its entries go with its
            storage, which its detached aliases share.
        purpose: which of the owner's work tensors this is.
        shape: the shape wanted.
        dtype: the dtype wanted.

    Example:
        >>> import torch
        >>> weight = torch.zeros(4, 3)
        >>> a = recycled_empty(weight, "rows", (2, 3), torch.float32)
        >>> pointer = a.data_ptr()
        >>> del a  # nothing holds the storage any more
        >>> recycled_empty(weight, "rows", (2, 3), torch.float32).data_ptr() == pointer
        True
    """
    if not _COUNTS_USES or owner.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=owner.device)
    nbytes = dtype.itemsize * int(torch.Size(shape).numel())
    with _lock:
        purposes = _storages.setdefault(owner.untyped_storage(), {})
        storage = purposes.get(purpose)
        if storage is not None and storage.nbytes() >= nbytes and _unreferenced(storage):
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # type: ignore[call-overload]
        tensor = torch.empty(shape, dtype=dtype)
        purposes[purpose] = tensor.untyped_storage()  # a busy one is left to its holder
        return tensor


def release(owner: Tensor | None = None) -> None:
    """Forget the storages kept for ``owner`` (default: for every owner), e.g. to return the
    memory of a finished training run while its parameters live on for inference.

    Tensors already handed out stay valid: only the cache's references go.

    Example:
        >>> import torch
        >>> weight = torch.zeros(4, 3)
        >>> work = recycled_empty(weight, "rows", (2, 3), torch.float32)
        >>> release(weight)
        >>> work.fill_(1.0).sum().item()
        6.0
    """
    with _lock:
        if owner is None:
            _storages.clear()
        else:
            _storages.pop(owner.untyped_storage(), None)
