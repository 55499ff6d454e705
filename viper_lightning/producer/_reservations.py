"""VersionReservations: a version number never names two different sets of weights.

A version is announced from memory before the file system holds it, so a producer that crashes
and restarts cannot learn from the stored versions alone which numbers it already used. Before
announcing, it records a reservation on the file-system tier (`RESERVED`, written atomically);
a restarted producer starts above it. Reservations are taken in blocks, the next one in the
background while half of the current one is left, so a publish almost never waits for a write."""

from __future__ import annotations

import logging
import threading

from .._errors import StorageError
from ..storage._pfs import FileSystemTier
from ._health import FILE_SYSTEM_TIER, Health

__all__ = ["VersionReservations"]

log = logging.getLogger("viper_lightning.publisher")

BLOCK = 64  # versions reserved by one write


class VersionReservations:
    """Keeps `RESERVED` ahead of every version this producer hands out."""

    def __init__(self, pfs: FileSystemTier, model: str, first_version: int, health: Health) -> None:
        self._pfs, self._model, self._health = pfs, model, health
        self._reserved = first_version - 1
        self._lock = threading.Lock()
        self._ahead: threading.Thread | None = None
        self._reserve(first_version + BLOCK - 1)

    def ensure(self, version: int) -> None:
        """Before `version` is announced: it must be reserved (waits only if the background
        reservation fell behind), and the next block is started when half of this one is used."""
        if version > self._reserved:
            self._join_ahead()
            if version > self._reserved:
                self._reserve(version + BLOCK - 1)
        if version > self._reserved - BLOCK // 2 and (self._ahead is None or not self._ahead.is_alive()):
            self._ahead = threading.Thread(target=self._reserve, args=(self._reserved + BLOCK,), daemon=True,
                                           name=f"viper-reserve-{self._model}")
            self._ahead.start()

    def close(self, handed_out: int) -> None:
        """A clean stop: every version up to `handed_out` went out, none after it will, so the
        reservation comes back down to it and the next run continues without a gap."""
        self._join_ahead()
        if handed_out < self._reserved:
            try:
                self._pfs.reserve(self._model, handed_out)
            except StorageError as exc:  # the higher reservation stands: a gap, never a reuse
                log.warning("%s: could not trim the version reservation to %d: %s", self._model, handed_out, exc)

    def _join_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.join()

    def _reserve(self, upto: int) -> None:
        try:
            self._pfs.reserve(self._model, upto)
        except StorageError as exc:  # the file-system tier is failing anyway: report, keep training
            self._health.degrade(FILE_SYSTEM_TIER, exc, escalate=False)  # the flusher's write escalates
            log.error("%s: could not reserve version numbers up to %d, so a restart after a crash may "
                      "reuse them: %s", self._model, upto, exc)
        with self._lock:  # the tier counts as restored on the flusher's next good write, not here
            self._reserved = max(self._reserved, upto)
