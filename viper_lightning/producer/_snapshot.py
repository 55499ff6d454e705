"""Snapshots: one contiguous copy of a state_dict plus its layout.

The copy is the only thing the training loop waits for, so buffers are allocated once and
reused: a copy into fresh memory is many times slower than into warm memory, because every page
faults on first touch (benchmarks/results has the figures).

A frozen parameter (requires_grad=False: a backbone under a trained head, a model under its
adapters) is copied into a reused buffer only when it changed since that buffer last took it, as
torch saw it (see `_marks`). A write that torch does not see (through `.data`, numpy, or a
collective writing into it) would go unnoticed, so the publisher does this only with
`skip_unchanged_frozen=True`, and only for a module (a plain mapping's tensors are not
parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .._buffers import copy_tensor, ensure_capacity
from .._layout import Layout
from .._marks import Mark, mark_of, unchanged

__all__ = ["Snapshot", "Filled", "take_snapshot", "fill_buffer"]


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


@dataclass(frozen=True)
class Filled:
    """What a fill left in a buffer: its layout, the frozen tensors' marks (see `_marks`) as
    copied, and the byte spans this fill wrote (the rest the buffer held before)."""

    layout: Layout
    marks: dict[str, Mark | None] = field(default_factory=dict)
    written: tuple[tuple[int, int], ...] = ()


def fill_buffer(layout: Layout, state_dict: Mapping[str, torch.Tensor], buffer: torch.Tensor, *,
                frozen: frozenset[str] = frozenset(), before: Filled | None = None) -> Filled:
    """Copy each distinct tensor once into its place in `buffer` (tied names share one copy),
    but a `frozen` one that `before` (what the buffer holds) shows unchanged (see the module doc)."""
    views = layout.views(buffer)
    held = before.marks if before is not None and before.layout == layout else {}
    marks, written = {}, []
    with torch.no_grad():
        for spec in layout.unique_tensors():
            tensor = state_dict[spec.name]
            if spec.name in frozen:
                if unchanged(held.get(spec.name), tensor):
                    marks[spec.name] = held[spec.name]
                    continue
                marks[spec.name] = mark_of(tensor)
            copy_tensor(views[spec.name], tensor)
            if spec.nbytes:
                written.append((spec.offset, spec.offset + spec.nbytes))
    return Filled(layout, marks, tuple(written))
