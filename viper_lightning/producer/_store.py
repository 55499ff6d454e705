"""TieredStore: the producer's cache-aware model handler.

Each version lives in a slot: a /dev/shm segment when the DRAM tier is on (so consumers on
this host can map it), else a plain reusable buffer. The newest `dram_versions` stay held in
DRAM; older ones are evicted once nobody borrows them (a flush or a remote transfer in
progress). The file-system tier is written from the slot by a background flusher, so a
publish never waits for the disk.

Nor for memory: the training thread copies only into a warm slot (its pages faulted in
already), and never waits for a borrowed one. Slots are made and faulted in ahead, off the
training thread, up to the pool's ready size (`prepare`, and after publishes); when a publish
finds none free beyond that (slow consumers), it waits for one being faulted in (once per new
slot) while the pool grows up to its limit. When every slot is held and the
pool may not grow (consumers still serve from every slot, flushes or transfers read them),
`try_capture` returns None and the publisher skips that version and reports it, rather than
stall training for as long as a consumer takes.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .._buffers import allocate_buffer
from .._digest import digest_reusing
from .._errors import ConfigurationError, StorageError, TransferError
from .._layout import Layout
from ..storage._shm import SHM_DIR, Segment, reclaim_stale_segments, segment_prefix
from ..transport._protocol import Location
from ._snapshot import Filled, fill_buffer

__all__ = ["TieredStore", "HostCopy"]

log = logging.getLogger("viper_lightning.publisher")

# Beyond the held versions: one being written, one consumers may still serve from (zero-copy),
# one still being flushed.
SLACK_SLOTS = 3
# Made ahead, off the training thread: the held versions, the one that double-buffered
# zero-copy consumers still map (their standby copy), and one to write the next version into.
# Beyond that the pool grows on demand, since each new slot also costs every consumer a page
# fault per page the first time it serves from it.
READY_SLOTS = 2
_LOCK_POLL_S = 0.005
LOCKED_GROWTH = 4  # how far slots that consumers still map may make the pool outgrow its budget
_NAME_TRIES = 16  # segment names tried when another user's files squat them


@dataclass(eq=False)
class _Slot:
    buffer: torch.Tensor
    segment: Segment | None = None
    filled: Filled | None = None  # what the last fill left (None: unknown, such as a GPU tier's download)
    blocks: bytes | None = None  # the block map of what it holds, once a digest computed it
    # the block map of what it held before the last fill, and the spans that fill wrote over it
    before: tuple[bytes, tuple[tuple[int, int], ...]] | None = None
    fills: int = 0  # how many fills it took: a host copy's digest describes the slot only for its own

    @property
    def capacity(self) -> int:
        return self.segment.capacity if self.segment else self.buffer.numel()


@dataclass(eq=False)
class HostCopy:
    """A version in host memory: its slot, its layout, and how many readers borrow its bytes."""

    version: int
    layout: Layout
    slot: _Slot
    borrowers: int = 0
    flushing: bool = False  # one of the borrows is the flusher's
    flushed: bool = False
    evicted: bool = False
    digest_key: bytes | None = field(default=None, repr=False)  # keyed BLAKE3 when set
    _digest: str | None = None
    _blocks: bytes | None = field(default=None, repr=False)  # the block map, with the digest
    fill: int = 0  # the slot's fill that holds this version (see _Slot.fills)
    _digest_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def data(self) -> torch.Tensor:
        return self.slot.buffer[: self.layout.nbytes]

    @property
    def known_digest(self) -> str | None:
        """The digest if some thread already computed it (never computes it)."""
        return self._digest

    def digest(self) -> str:
        """Computed once, by whichever thread needs it first (flusher or fetch server): only
        the blocks the slot's last fill wrote, when the block map of what it held before is
        known (a frozen part not copied again is not digested again either)."""
        with self._digest_lock:
            if self._digest is None:
                ours = self.slot.fills == self.fill  # else evicted and refilled: the slot's state is another's
                before, written = (self.slot.before if ours else None) or (None, ())
                self._digest, self._blocks = digest_reusing(self.data, self.digest_key, before, written)
                if self.slot.fills == self.fill:  # still ours once hashed: the map describes the slot
                    self.slot.blocks = self._blocks
            return self._digest

    def blocks(self) -> bytes:
        """The block map the digest is computed from (see `_digest`): what a delta is taken by."""
        self.digest()
        return self._blocks


class TieredStore:
    """Slots, the versions they hold, borrowing and eviction; thread-safe."""

    def __init__(self, model: str, host: str, *, dram_versions: int, dram_bytes: int | None = None,
                 digest_key: bytes | None = None) -> None:
        self.model = model
        self._digest_key = digest_key
        self.host = host
        self.dram_versions = dram_versions
        self.dram_bytes = dram_bytes
        self._max_slots = dram_versions + SLACK_SLOTS if dram_versions else 2
        self._ready_slots = min(dram_versions + READY_SLOTS, self._max_slots)
        self._free: list[_Slot] = []
        self._slots = 0
        self._held: deque[HostCopy] = deque()
        self._changed = threading.Condition()
        self._serial = 0
        self._warming = False
        self._closing = False
        self._warm_error: Exception | None = None  # the last warming failure, until a publish sees it
        self._warm_blocked = False  # a warming failed: none is tried again until a slot comes back
        self._slot_bytes = 0  # the largest slot asked for
        self._cannot_grow = False  # set when /dev/shm refused a slot beyond the budget
        self.on_starved: Callable[[], None] | None = None  # called while a capture waits for a slot
        self._warmer: threading.Thread | None = None
        self._segments: set[Segment] = set()
        # Even without close() (an exception, a forgotten context manager), the segments go
        # when the store is collected or the interpreter exits; only a hard crash leaves them,
        # and the next producer of this model reclaims those.
        self._unlink_all = weakref.finalize(self, _unlink_segments, self._segments)
        if dram_versions:
            reclaim_stale_segments(model)

    @property
    def uses_dram(self) -> bool:
        return self.dram_versions > 0

    # -- the training thread ---------------------------------------------------------------
    def capture(self, layout: Layout, state_dict: Mapping[str, torch.Tensor], timeout: float | None = None, *,
                frozen: frozenset[str] = frozenset()) -> _Slot:
        """Copy a state_dict laid out as `layout` into a free slot (the only work the training
        loop waits for); `frozen` tensors only if they changed since the slot took them."""
        return self._fill(self._acquire(layout.nbytes, timeout), _filler(layout, state_dict, frozen))

    def capture_filled(self, nbytes: int, fill: Callable[[torch.Tensor], None], timeout: float | None = None) -> _Slot:
        """A free slot of at least `nbytes`, filled by `fill(buffer)` (the GPU tier's download);
        it waits for one, up to `timeout`: for background threads, not the training thread."""
        return self._fill(self._acquire(nbytes, timeout), lambda buffer, before: fill(buffer))

    def try_capture(self, layout: Layout, state_dict: Mapping[str, torch.Tensor], *,
                    frozen: frozenset[str] = frozenset()) -> _Slot | None:
        """`capture` for the training thread: into a warm slot (see `_take_warm`), or None when
        every slot is held and the pool may not grow. Only a pool without any slot makes one
        here, faults and all: the first publish, unless `prepare` ran before it."""
        slot = self._take_warm(layout.nbytes)
        if slot is None:
            return None
        return self._fill(slot, _filler(layout, state_dict, frozen))

    def prepare(self, nbytes: int) -> None:
        """Make and fault in slots of `nbytes`, up to the pool's ready size, in the background,
        so that publishes copy into warm memory."""
        with self._changed:
            self._warm_ahead(nbytes)

    def _fill(self, slot: _Slot, fill: Callable[[torch.Tensor, Filled | None], Filled | None]) -> _Slot:
        """Fill `slot` (`fill(buffer, what it holds)` returns what it left, None if unknown) and
        keep what a digest of it may reuse (see HostCopy.digest)."""
        before, blocks = slot.filled, slot.blocks
        slot.filled, slot.blocks, slot.before = None, None, None  # unknown until the fill is done
        slot.fills += 1
        try:
            if slot.segment is not None:
                slot.segment.begin_write()
            filled = fill(slot.buffer, before)
        except BaseException:
            self._release(slot)
            raise
        slot.filled = filled
        if filled is not None and before is not None and blocks is not None \
                and before.layout.nbytes == filled.layout.nbytes:
            slot.before = (blocks, filled.written)
        return slot

    def release_slot(self, slot: _Slot) -> None:
        """Give back a captured slot that will not be committed."""
        self._release(slot)

    def commit(self, version: int, layout: Layout, slot: _Slot, *, borrowed: bool) -> HostCopy:
        """The slot now holds `version`: name its segment, then evict beyond the budget.
        `borrowed`: the caller keeps one borrow (given back once the version is flushed)."""
        if slot.segment is not None:
            slot.segment.publish(version, layout.nbytes, f"{segment_prefix(self.model)}v{version}")
        held = HostCopy(version, layout, slot, borrowers=1 if borrowed else 0, flushing=borrowed,
                        digest_key=self._digest_key, fill=slot.fills)
        with self._changed:
            self._held.append(held)
            self._evict_surplus()
            self._warm_ahead(layout.nbytes)
        return held

    # -- readers: flusher and fetch server -------------------------------------------------
    def borrow(self, version: int) -> HostCopy | None:
        """Keep a held version's bytes in place while they are read; None if evicted."""
        with self._changed:
            for held in self._held:
                if held.version == version and not held.evicted:
                    held.borrowers += 1
                    return held
        return None

    def give_back(self, held: HostCopy, *, flushed: bool = False) -> None:
        """End one borrow of `held` (a transfer's, or the flusher's with `flushed` saying whether
        the file system now holds it too)."""
        with self._changed:
            held.borrowers -= 1
            held.flushed = held.flushed or flushed
            self._evict_surplus()
            self._changed.notify_all()

    def end_flush(self, held: HostCopy, *, written: bool) -> None:
        """The flusher is done with `held` (`written`: the file system holds it now)."""
        with self._changed:
            held.flushing = False
        self.give_back(held, flushed=written)

    def latest(self) -> int | None:
        with self._changed:
            return self._held[-1].version if self._held else None

    def memory_locations(self, version: int, fetch_endpoint: str | None) -> tuple[Location, ...]:
        """Where `version` can be read from memory now: the segment and the fetch endpoint."""
        with self._changed:
            held = next((h for h in self._held if h.version == version and not h.evicted), None)
            if held is None or held.slot.segment is None:
                return ()
            locations = [Location("dram", self.host, f"shm://{held.slot.segment.name}")]
        if fetch_endpoint:
            locations.append(Location("dram", self.host, fetch_endpoint))
        return tuple(locations)

    def close(self) -> None:
        """Remove every segment: nothing of ours may outlive the producer in /dev/shm."""
        with self._changed:
            self._closing = True  # no new warming from here on
            warmer = self._warmer
        if warmer is not None:
            warmer.join()  # it may be creating a segment right now
        with self._changed:
            self._held.clear()
            self._free.clear()
        self._unlink_all()

    # -- internals ---------------------------------------------------------------------------
    def _take_warm(self, nbytes: int) -> _Slot | None:
        """A free slot, or one the warming thread is faulting in (publishes that come faster than
        a slot faults in wait for it, once per slot, until the pool reaches its limit); None when
        every slot is held (by consumers, a flush or a transfer) and the pool may not grow: that
        wait could be unbounded (a stopped consumer), so the publish is skipped instead. A slot
        that cannot be made within the pool's budget (/dev/shm too small) raises, as ever."""
        with self._changed:
            while True:
                slot = self._take_free(nbytes)
                if slot is not None:
                    self._warm_ahead(nbytes)  # the next publish finds a spare
                    return slot
                if self._slots == 0 and not self._warming:
                    self._warm_error = None  # making it here raises whatever stands in the way
                    break  # no slot at all yet: the first publish makes one
                if not self._warming:
                    self._warm_ahead(nbytes, needed=True)  # grow first: DRAM history is worth keeping
                if not self._warming:
                    if self._evict_surplus(need_slot=True):
                        continue
                    if self.on_starved is not None:
                        self.on_starved()  # e.g. the flusher, holding a slot through its delay
                    self._raise_within_budget()  # a warming that failed (/dev/shm too small?)
                    return None  # skip, reported
                # the warmer notifies when its slot is in; a consumer unlocking a free slot cannot
                self._changed.wait(_LOCK_POLL_S)
        return self._acquire(nbytes, None)

    def _raise_within_budget(self) -> None:
        """A slot the pool's own budget counts on could not be made: a configuration problem
        (e.g. /dev/shm too small), raised as `_acquire` raises it, not a reason to skip."""
        error, self._warm_error = self._warm_error, None
        if isinstance(error, (ConfigurationError, StorageError)) and self._slots < self._max_slots:
            raise error

    def _warm_ahead(self, nbytes: int, needed: bool = False) -> None:
        """Start faulting in one more slot, off the training thread, while the pool is below its
        ready size, or (`needed`: a publish found no slot free) below its limit. Slots are made
        at the largest size asked for, so a model that grew never waits on too small a one.
        After a failure, nothing more is tried until a slot comes back. Caller holds the lock."""
        self._slot_bytes = max(self._slot_bytes, nbytes)
        limit = self._growth_limit() if needed else self._ready_slots
        if self._warming or self._closing or self._warm_blocked or self._slots >= limit:
            return
        warmer = threading.Thread(target=self._warm_spare, args=(self._slot_bytes,), daemon=True,
                                  name=f"viper-warm-{self.model}")
        self._slots += 1  # reserved now, filled in by the warming thread
        self._warming = True
        try:
            warmer.start()
        except BaseException:  # e.g. no thread can be started: nothing is warming after all
            self._slots -= 1
            self._warming = False
            raise
        self._warmer = warmer

    def _growth_limit(self) -> int:
        """Slots the pool may have now: its budget, and more while consumers or transfers hold
        slots beyond it (a slow or stopped consumer must not stall training)."""
        held_elsewhere = self._consumers_hold_free_slots() or self._transfers_hold_old_versions()
        return self._max_slots * (LOCKED_GROWTH if held_elsewhere and not self._cannot_grow else 1)

    def _warm_spare(self, nbytes: int) -> None:
        """Make a slot and fault its pages in, so a publish into it stalls for a copy only."""
        slot = None
        try:
            slot = self._new_slot(nbytes)
            if slot.segment is not None:
                slot.segment.populate()
            else:
                slot.buffer[::mmap.PAGESIZE].zero_()
        except Exception as exc:  # noqa: BLE001 - kept: a publish raises it within the budget, else skips
            log.warning("%s: could not prepare a spare snapshot slot: %s", self.model, exc)
            with self._changed:
                if slot is not None and slot.segment is not None:
                    self._segments.discard(slot.segment)
                    slot.segment.unlink()
                self._slots -= 1
                self._warming = False
                self._warm_error, self._warm_blocked = exc, True
                self._cannot_grow = self._cannot_grow or isinstance(exc, (ConfigurationError, StorageError))
                self._changed.notify_all()
            return
        with self._changed:
            self._free.append(slot)
            self._warming = False
            self._changed.notify_all()
            self._warm_ahead(nbytes)  # on to the ready size (prepare makes them all, one by one)

    def _acquire(self, nbytes: int, timeout: float | None) -> _Slot:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slot = self._wait_for_slot(nbytes, timeout, deadline)
            if slot is not None:
                return slot
            try:
                return self._new_slot(nbytes)
            except BaseException as exc:
                with self._changed:  # the reserved place in the pool is free again
                    self._slots -= 1
                    self._changed.notify_all()
                    # Within the pool's own budget a failure is a configuration problem (or a bug);
                    # beyond it, /dev/shm being full only means waiting for a borrowed slot.
                    if not isinstance(exc, (ConfigurationError, StorageError)) or self._slots < self._max_slots:
                        raise
                    self._cannot_grow = True
                log.warning("%s: cannot add a snapshot slot beyond the pool's budget (%s); waiting for one "
                            "that a transfer still reads", self.model, exc)

    def _wait_for_slot(self, nbytes: int, timeout: float | None, deadline: float | None) -> _Slot | None:
        """A free slot, or None once a place to make a new one is reserved in the pool."""
        with self._changed:
            while (slot := self._take_free(nbytes)) is None:
                # Slots that consumers still map, or that transfers still read, may be outgrown (up
                # to a hard cap): a slow or stopped consumer somewhere must not stall training.
                if not self._warming and self._slots < self._growth_limit():
                    self._slots += 1
                    break
                if self._evict_surplus(need_slot=True):
                    continue
                if self.on_starved is not None:
                    self.on_starved()  # e.g. the flusher, holding a slot through its delay
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransferError(f"no free snapshot slot within {timeout} s: every slot is held by a "
                                        "flush, a transfer or consumers serving from it")
                # Consumers unlocking a zero-copy mapping cannot signal us: look again shortly.
                self._changed.wait(_LOCK_POLL_S if remaining is None else min(_LOCK_POLL_S, remaining))
        return slot

    def _transfers_hold_old_versions(self) -> bool:
        """Versions past the budget that stay only because a transfer (not a flush) borrows them."""
        return any(held.borrowers > held.flushing for held in list(self._held)[:-1])

    def _consumers_hold_free_slots(self) -> bool:
        return any(slot.segment is not None for slot in self._free)  # free, yet not lockable

    def _take_free(self, nbytes: int) -> _Slot | None:
        """A free slot big enough that no consumer still serves from (locked for writing)."""
        for slot in list(self._free):
            if slot.capacity < nbytes:  # the model grew: this slot can never fit it again
                self._free.remove(slot)
                self._drop(slot)
            elif slot.segment is None or slot.segment.try_lock():
                self._free.remove(slot)
                return slot
        return None

    def _evict_surplus(self, need_slot: bool = False) -> bool:
        """Free held versions beyond the DRAM budget (or the oldest, when a slot is needed);
        with a DRAM tier the newest version always stays, it is the one consumers are told about."""
        evicted = False
        for held in list(self._held):
            newest = held is self._held[-1]
            if held.borrowers > 0 or (newest and self.uses_dram):
                continue
            if not (self._over_budget() or (need_slot and not newest)):
                continue
            self._held.remove(held)
            held.evicted = True
            self._release_locked(held.slot)
            need_slot, evicted = False, True
        return evicted

    def _over_budget(self) -> bool:
        if not self.uses_dram:
            return bool(self._held)  # plain buffers: held only until flushed
        held_bytes = sum(held.layout.nbytes for held in self._held)
        return len(self._held) > self.dram_versions or (self.dram_bytes is not None and held_bytes > self.dram_bytes)

    def _new_slot(self, nbytes: int) -> _Slot:
        if not self.uses_dram:
            return _Slot(allocate_buffer(nbytes))
        for _ in range(_NAME_TRIES):
            with self._changed:
                self._serial += 1
                name = f"{segment_prefix(self.model)}free.{os.getpid()}.{self._serial}"
            try:
                segment = Segment(name, nbytes)
            except FileExistsError:  # a name squatted by another user's file: take the next one
                log.warning("%s/%s exists and is not ours; trying another name", SHM_DIR, name)
                continue
            with self._changed:
                self._segments.add(segment)
            return _Slot(segment.buffer, segment)
        raise StorageError(f"{_NAME_TRIES} segment names under {SHM_DIR} for {self.model!r} are taken by files "
                           "that are not ours; remove them or use another model name")

    def _release(self, slot: _Slot) -> None:
        with self._changed:
            self._release_locked(slot)

    def _release_locked(self, slot: _Slot) -> None:
        self._cannot_grow = self._warm_blocked = False  # the pool shrank in use: growing may work again
        if slot.segment is not None:
            self._serial += 1
            slot.segment.retire(f"{segment_prefix(self.model)}free.{os.getpid()}.{self._serial}")
        self._free.append(slot)
        self._changed.notify_all()

    def _drop(self, slot: _Slot) -> None:
        self._slots -= 1
        if slot.segment is not None:
            self._segments.discard(slot.segment)
            slot.segment.unlink()


def _filler(layout: Layout, state_dict: Mapping[str, torch.Tensor],
            frozen: frozenset[str]) -> Callable[[torch.Tensor, Filled | None], Filled]:
    return lambda buffer, before: fill_buffer(layout, state_dict, buffer, frozen=frozen, before=before)


def _unlink_segments(segments: set[Segment]) -> None:
    for segment in list(segments):
        segment.unlink()
    segments.clear()
