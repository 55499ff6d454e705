"""The burst buffer's drain: writes held versions to the file-system tier in the background,
in publish order, from the memory they already occupy (no extra copy)."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time

from .._priority import lower_this_thread
from ..storage._pfs import FileSystemTier
from ._announcer import Announcer
from ._catalog import VersionCatalog
from ._health import FILE_SYSTEM_TIER, Health
from ._notices import NoticeBoard
from ._store import HostCopy, TieredStore

__all__ = ["Flusher"]

log = logging.getLogger("viper_lightning.publisher")

_STOP = object()
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


class Flusher:
    """Writes each submitted version with its manifest from `notices`, records the write in
    `catalog`, gives the version's borrow back to `store` and has `announcer` send its final
    notice (also after a failed write: the version then stays where it is held).

    A version is drained no sooner than `delay_s` after it is submitted (announced in memory):
    the drain's digest and write compete for CPU and memory bandwidth, and the consumers loading
    that version from memory right then are the latency that matters. The delay is skipped when
    more versions are queued, when `hurry()` says the producer waits for a slot this drain
    holds, and at close.

    A failed write (a full disk, a stray directory, an unreachable mount) degrades the tier, it
    does not stop training: the failure goes to `health`, the version stays in the memory tiers
    that hold it, and versions submitted during a backoff (doubling from RETRY_FIRST_S up to
    RETRY_MAX_S) are not written unless a flush() or close() asks for them; the first write
    that succeeds again restores the tier.

    Unless `keep_every_version`, a version that a newer one replaced before its write started
    is not written (`skipped` counts them): the newest version is always written, so a run's
    last weights always reach the file system.

    The thread runs `niceness` above training's nice value (see `_priority`)."""

    def __init__(self, pfs: FileSystemTier, model: str, key: bytes | None, keep_versions: int | None, *,
                 notices: NoticeBoard, catalog: VersionCatalog, store: TieredStore, announcer: Announcer,
                 health: Health, delay_s: float = 0.0, keep_every_version: bool = False,
                 niceness: int = 0) -> None:
        self._pfs, self._model, self._key, self._keep = pfs, model, key, keep_versions
        self._notices, self._catalog, self._store, self._announcer = notices, catalog, store, announcer
        self._health = health
        self._niceness = niceness
        self._delay_s = delay_s
        self._keep_every_version = keep_every_version
        self._newest_submitted = 0
        self.skipped = 0
        self._hurried_at = -math.inf  # versions submitted before this are drained without delay
        self._woken = threading.Event()
        self._inbox: queue.Queue[object] = queue.Queue()
        self._retry_at = -math.inf  # no write is tried before this (monotonic seconds)
        self._backoff_s = RETRY_FIRST_S
        self._thread = threading.Thread(target=self._run, name=f"viper-flusher-{model}", daemon=True)
        self._thread.start()

    def submit(self, held: HostCopy) -> None:
        self._newest_submitted = max(self._newest_submitted, held.version)
        self._inbox.put((held, time.monotonic()))

    def hurry(self) -> None:
        """Drain what is queued now, without delay (a flush() or a capture waits for it)."""
        self._hurried_at = time.monotonic()
        self._woken.set()

    def close(self) -> None:
        self.hurry()
        self._inbox.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        lower_this_thread(self._niceness)  # the digest and the write wait for idle cores
        while (item := self._inbox.get()) is not _STOP:
            held, submitted = item
            self._wait_out_delay(submitted)
            address = None
            superseded = not self._keep_every_version and self._newest_submitted > held.version
            self.skipped += superseded
            try:
                # In a backoff, versions stay in memory only, unless a flush() or close() asks for
                # them: the last weights of a run must get their try whatever the backoff says.
                if not superseded and (time.monotonic() >= self._retry_at or submitted <= self._hurried_at):
                    address, digest_s, store_s = self._flush(held)
                    self._catalog.flushed(held.version, address, digest_s, store_s)
                    self._recovered()
            except Exception as exc:  # noqa: BLE001 - the tier degrades; training goes on
                self._degraded(held.version, exc)
            finally:
                self._store.end_flush(held, written=address is not None)
                self._announcer.announce(held.version, final=True)

    def _degraded(self, version: int, exc: Exception) -> None:
        self._health.degrade(FILE_SYSTEM_TIER, exc)
        log.error("flushing %s v%d to %s failed; the file-system tier is degraded, next try in %.0f s: %s",
                  self._model, version, self._pfs.root, self._backoff_s, exc)
        self._retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, RETRY_MAX_S)

    def _recovered(self) -> None:
        if self._backoff_s != RETRY_FIRST_S:
            log.warning("%s: the file-system tier at %s works again", self._model, self._pfs.root)
        self._health.recovered(FILE_SYSTEM_TIER)
        self._retry_at, self._backoff_s = -math.inf, RETRY_FIRST_S

    def _wait_out_delay(self, submitted: float) -> None:
        """Until `delay_s` after submission, unless hurried or more versions queue up."""
        while (self._inbox.empty() and submitted > self._hurried_at
               and (left := submitted + self._delay_s - time.monotonic()) > 0):
            self._woken.wait(left)
            self._woken.clear()  # the loop re-reads _hurried_at, so a hurry is never lost

    def _flush(self, held: HostCopy) -> tuple[str, float, float]:
        started = time.perf_counter()
        notice = self._notices.manifest(held)  # computes the digest if nobody has yet
        digested = time.perf_counter()
        address = self._pfs.write(notice, held.data, notice.encode(self._key, with_locations=False))
        if self._keep is not None:
            self._pfs.prune(self._model, self._keep)
        return address, digested - started, time.perf_counter() - digested

