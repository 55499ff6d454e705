"""Snapshots: one contiguous copy of a state_dict plus its layout.

The copy is the only thing the training loop waits for, so buffers are allocated once and
reused: on this kind of machine a warm memcpy runs at ~17 GB/s while a fresh allocation runs
at ~1 GB/s because every page faults on first touch.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._buffers import copy_tensor, ensure_capacity
from .._errors import TransferError
from .._layout import Layout

__all__ = ["Snapshot", "SnapshotPool", "take_snapshot"]


@dataclass
class Snapshot:
    """A filled buffer and the layout that says where each tensor lives in it."""

    layout: Layout
    buffer: torch.Tensor

    @property
    def data(self) -> torch.Tensor:
        """The meaningful bytes (a buffer may be larger than the layout it holds)."""
        return self.buffer[: self.layout.nbytes]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors viewing the buffer (no copy); tied names view the same bytes."""
        return self.layout.views(self.buffer)


def take_snapshot(state_dict: Mapping[str, torch.Tensor], buffer: torch.Tensor | None = None) -> Snapshot:
    """Copy a state_dict into `buffer` (allocated when missing or too small)."""
    layout = Layout.for_state_dict(state_dict)
    buffer = ensure_capacity(buffer, layout.nbytes)
    views = layout.views(buffer)
    with torch.no_grad():
        for spec in layout.unique_tensors():
            copy_tensor(views[spec.name], state_dict[spec.name])
    return Snapshot(layout, buffer)


class SnapshotPool:
    """A fixed number of reusable buffers shared between the training thread and the writer.

    With two slots the trainer fills one while the background writer drains the other; a
    publish waits only when the writer is more than one version behind.
    """

    def __init__(self, slots: int = 2) -> None:
        self._free: list[torch.Tensor | None] = [None] * slots
        self._available = threading.Condition()

    def capture(self, state_dict: Mapping[str, torch.Tensor], timeout: float | None = None) -> Snapshot:
        """Copy the state_dict into a free buffer, waiting up to `timeout` for one."""
        with self._available:
            if not self._available.wait_for(lambda: self._free, timeout):
                raise TransferError(f"no snapshot buffer freed within {timeout} s: "
                                    "the background writer is stuck; check the storage tier")
            buffer = self._free.pop()
        try:
            return take_snapshot(state_dict, buffer)
        except BaseException:
            self._give_back(buffer)
            raise

    def release(self, snapshot: Snapshot) -> None:
        """Return a snapshot's buffer once every reader is done with it."""
        self._give_back(snapshot.buffer)

    def _give_back(self, buffer: torch.Tensor | None) -> None:
        with self._available:
            self._free.append(buffer)
            self._available.notify()
