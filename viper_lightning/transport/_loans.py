"""What the producer lends its servers: a version's bytes (or a CUDA IPC export of them), held
in place for one transfer and given back by `release()`.

The fetch and collective servers see the producer only through a `Lender`: they never reach
into its store, its GPU tier or its bookkeeping, and the producer decides what may be lent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["MemoryLoan", "IpcLoan", "Lender"]


@dataclass(frozen=True)
class MemoryLoan:
    """A version's bytes as a flat uint8 tensor, kept in place until `release()`; `digest()`
    names what the bytes must hash to (computed once, on first need), and `blocks()`, where
    given, the block map that digest is computed from (what a consumer takes a delta by)."""

    data: torch.Tensor
    digest: Callable[[], str]
    release: Callable[[], None]
    blocks: Callable[[], bytes] | None = None


@dataclass(frozen=True)
class IpcLoan:
    """A GPU-tier copy exported for CUDA IPC: its JSON description, kept until `release()`."""

    description: dict[str, object]
    nbytes: int
    release: Callable[[], None]


class Lender(Protocol):
    """The producer's side of its servers."""

    @property
    def lends_device_memory(self) -> bool:
        """Whether CUDA IPC is offered (a GPU tier on CUDA, and a key: an IPC mapping is writable)."""

    def lend_memory(self, version: int, device_type: str | None = None) -> MemoryLoan | None:
        """The version's bytes, or None when no memory tier holds them any more. `device_type`
        is what the caller can send ("cuda" for NCCL, "cpu" for Gloo): the GPU tier's copy
        first when it lives there; None asks for host memory only (the ZeroMQ fetch path)."""

    def lend_ipc(self, version: int) -> IpcLoan | None:
        """The GPU tier's copy exported for CUDA IPC, or None when it no longer holds the version."""

    def tiers_of(self, version: int) -> list[str]:
        """The tiers that still hold a version, for a "gone" answer."""

    def latest_notice(self) -> bytes | None:
        """The newest signed notice, for a consumer that joins late."""
