"""Snapshots: one contiguous copy of a state_dict plus its layout.

The copy is the only thing the training loop waits for, so buffers are allocated once and
reused: a copy into fresh memory is many times slower than into warm memory, because every page
faults on first touch (benchmarks/results has the figures).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._buffers import copy_tensor, ensure_capacity
from .._layout import Layout

__all__ = ["Snapshot", "take_snapshot", "fill_buffer"]


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
    fill_buffer(layout, state_dict, buffer)
    return Snapshot(layout, buffer)


def fill_buffer(layout: Layout, state_dict: Mapping[str, torch.Tensor], buffer: torch.Tensor) -> None:
    """Copy each distinct tensor once into its place in `buffer` (tied names share one copy)."""
    views = layout.views(buffer)
    with torch.no_grad():
        for spec in layout.unique_tensors():
            copy_tensor(views[spec.name], state_dict[spec.name])
