"""Whether a tensor's bytes may have changed since it was last looked at, without reading them.

Torch moves a tensor's version counter on every in-place write it sees, and a reassignment
(`.data = ...`, `load_state_dict(assign=True)`) gives it other storage. An address alone does
not tell storages apart (an allocator hands a freed block of the same size out again), so a mark
also holds a weak reference to the storage: a storage that died, or another one, is a change.
Inference tensors keep no version counter: they never match. Writes torch does not see (through
`.data`, numpy, or a collective writing into the tensor) move nothing: whoever relies on a mark
says so."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["Mark", "mark_of", "unchanged"]


@dataclass(frozen=True, eq=False)
class Mark:
    address: int
    version: int
    storage: StorageWeakRef


def mark_of(tensor: torch.Tensor) -> Mark | None:
    """The tensor's mark now; None for one that keeps no version counter."""
    if tensor.is_inference():
        return None
    return Mark(tensor.data_ptr(), tensor._version, StorageWeakRef(tensor.untyped_storage()))


def unchanged(before: Mark | None, tensor: torch.Tensor) -> bool:
    """Whether `tensor` still has the bytes it had when `before` was taken (as torch saw it)."""
    now = mark_of(tensor)
    return (before is not None and now is not None and not before.storage.expired()
            and (before.address, before.version, before.storage.cdata) == (now.address, now.version, now.storage.cdata))
