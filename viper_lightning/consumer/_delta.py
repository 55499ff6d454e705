"""Updates that move only what changed (the `dram-zmq` route).

A consumer that fetched one version from a producer keeps, in its staging buffer, those bytes
and their block map (see `_digest`). For the next version it asks the producer for that
version's block map, checks it against the signed digest, and reads only the blocks whose
leaves differ, each checked against its leaf: the staging buffer then holds the new version,
verified as a whole fetch is, having moved only the changed blocks. A consumer that missed
versions gains as well: the map is compared with whatever version it holds.

The standby model is patched the same way: only the bytes of the changed blocks are copied into
its tensors, when it holds a version whose block map is known and nothing has written its
tensors since, as torch saw it (see `_marks`). Any
other load into it (another route, a mapping) forgets what it held, and then every tensor is
copied. Frozen tensors, a backbone under a trained head, a model under its adapters: after the
first version they cost nothing.

The other routes move whole versions: a mapping (`dram-shm`, `host-shm`) moves nothing anyway,
and a relay round or a direct collective transfer sends every member the same bytes."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
import zmq

from .._buffers import copy_tensor
from .._digest import changed_spans
from .._errors import IntegrityError
from .._layout import Layout
from .._marks import Mark, mark_of, unchanged
from ..transport._fetch import FetchClient
from ..transport._protocol import Location, Notice
from ._routes import Loaded, load_tensors

__all__ = ["DeltaLoads"]


@dataclass(frozen=True)
class _Held:
    """What a standby model holds: the version's block map and layout, and its tensors' marks."""

    blocks: bytes
    layout: Layout
    marks: dict[str, Mark | None]

    def untouched(self, model: torch.nn.Module) -> bool:
        tensors = model.state_dict(keep_vars=True)
        return tensors.keys() == self.marks.keys() and all(unchanged(self.marks[name], tensor)
                                                           for name, tensor in tensors.items())


class DeltaLoads:
    """The `dram-zmq` loads of one consumer, and what its staging buffer and standby models hold."""

    def __init__(self) -> None:
        self._staging: torch.Tensor | None = None  # the buffer `_staging_blocks` describes
        self._staging_blocks: bytes | None = None
        self._standbys: weakref.WeakKeyDictionary[torch.nn.Module, _Held] = weakref.WeakKeyDictionary()

    def forget_staging(self) -> None:
        """The staging buffer is about to be written by another route."""
        self._staging_blocks = None

    def forget(self, standby: torch.nn.Module) -> None:
        """`standby` is about to be loaded by another route."""
        self._standbys.pop(standby, None)

    def load(self, context: zmq.Context, key: bytes | None, timeout: float, staging: torch.Tensor, notice: Notice,
             location: Location, standby: torch.nn.Module) -> Loaded:
        """Fetch `notice`'s version into `staging` from the producer's fetch endpoint (the changed
        blocks only when staging holds a version already) and patch `standby` from it."""
        held = self._staging_blocks if staging is self._staging else None
        self._staging, self._staging_blocks = staging, None  # unknown until the fetch is verified
        started = time.perf_counter()
        client = FetchClient(context, location.address, notice.model, key, timeout, producer=notice.producer)
        fetched = client.fetch_changed_into(notice.version, staging, notice.nbytes, held)
        if notice.digest is not None and fetched.digest != notice.digest:
            raise IntegrityError(f"the producer served digest {fetched.digest} for version {notice.version}, "
                                 f"but its notice announced {notice.digest}")  # both verified before
        self._staging_blocks = fetched.blocks
        self._patch(standby, notice, staging, fetched.blocks)
        return Loaded(time.perf_counter() - started - fetched.digest_s, fetched.digest_s, fetched.moved_bytes)

    def _patch(self, standby: torch.nn.Module, notice: Notice, staging: torch.Tensor, blocks: bytes) -> None:
        held = self._standbys.pop(standby, None)
        if held is not None and held.layout == notice.layout and len(held.blocks) == len(blocks) \
                and held.untouched(standby):
            _copy_changed(standby, notice.layout, staging, changed_spans(held.blocks, blocks, notice.layout.nbytes))
        else:
            load_tensors(standby, notice.layout.views(staging))
        self._standbys[standby] = _Held(blocks, notice.layout, _marks(standby))


def _marks(model: torch.nn.Module) -> dict[str, Mark | None]:
    return {name: mark_of(tensor) for name, tensor in model.state_dict(keep_vars=True).items()}


def _copy_changed(model: torch.nn.Module, layout: Layout, staging: torch.Tensor,
                  spans: list[tuple[int, int]]) -> None:
    """Copy into each of the model's tensors the bytes of `spans` (of the packed buffer) that
    fall in it, and nothing else (tied weights once; a tensor that is not contiguous whole)."""
    specs, done = {spec.name: spec for spec in layout.tensors}, set()
    views = layout.views(staging)
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            spec = specs[name]
            first, end = spec.offset, spec.offset + spec.nbytes
            if id(target) in done:  # tied here: written once, from the first name, as a whole load does
                continue
            done.add(id(target))
            inside = [(max(start, first), min(stop, end)) for start, stop in spans if start < end and stop > first]
            if not inside:
                continue
            if not target.is_contiguous():
                copy_tensor(target, views[name])
                continue
            flat = target.detach().reshape(-1).view(torch.uint8)
            for start, stop in inside:
                copy_tensor(flat[start - first:stop - first], staging[start:stop])
