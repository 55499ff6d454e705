"""What a subscriber did: one record per applied update, one per refusal."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .._shards import PartInfo

__all__ = ["UpdateRecord", "Refusal", "SubscriberStats", "call_hook"]

log = logging.getLogger("viper_lightning.subscriber")


@dataclass(frozen=True)
class UpdateRecord:
    """Timings of one applied update, in seconds.

    discovery: publish call to notice received (the producer's snapshot and storage writes
    included); transfer: bytes into the staging buffer; verify: the digest check over them;
    swap: flip the standby copy in (the copy into it is part of transfer); latency: publish
    call to the new version answering requests. `route` is how the bytes came ("dram-shm",
    "dram-zmq", "pfs"), `trigger` what started the update, `why` the planner's reasoning.
    `swapped_at` is when the swap happened (time.time(), comparable across hosts with synced
    clocks); `together` is None unless the replica switches together, else "together",
    "left-out" or "alone" (see consumer._together). `moved_bytes` is what the route read from
    the version's source: `nbytes` for a whole version, the changed blocks for a delta
    (consumer._delta), 0 for a mapping. `part` is the notice's part of a sharded model (None for a
    whole model): where its pieces go, and which run published it."""

    version: int
    step: int | None
    route: str
    nbytes: int
    discovery_s: float
    transfer_s: float
    verify_s: float
    swap_s: float
    latency_s: float
    trigger: str
    why: str
    swapped_at: float = 0.0
    together: str | None = None
    moved_bytes: int = 0
    part: PartInfo | None = None


@dataclass(frozen=True)
class Refusal:
    """An update that was refused, and why (the message names what was wrong)."""

    version: int | None
    reason: str


@dataclass
class SubscriberStats:
    """A snapshot of the subscriber's history (bounded to the most recent entries)."""

    updates: list[UpdateRecord] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    applied: int = 0
    refused: int = 0

    @property
    def last(self) -> UpdateRecord | None:
        return self.updates[-1] if self.updates else None


class StatsRecorder:
    """Thread-safe accumulation; `snapshot()` hands out copies."""

    def __init__(self, history: int) -> None:
        self._updates: deque[UpdateRecord] = deque(maxlen=history)
        self._refusals: deque[Refusal] = deque(maxlen=history)
        self._applied = 0
        self._refused = 0
        self._lock = threading.Lock()

    def applied(self, record: UpdateRecord) -> None:
        with self._lock:
            self._updates.append(record)
            self._applied += 1

    def refused(self, refusal: Refusal) -> None:
        with self._lock:
            self._refusals.append(refusal)
            self._refused += 1

    def snapshot(self) -> SubscriberStats:
        with self._lock:
            return SubscriberStats(list(self._updates), list(self._refusals), self._applied, self._refused)


def call_hook(hook: Callable | None, argument: object, model: str) -> None:
    """A user's on_update or on_refusal hook: it must not be able to stop a subscriber."""
    if hook is None:
        return
    try:
        hook(argument)
    except Exception:
        log.exception("%s hook %r raised; ignored", model, hook)
