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
from ..transport._protocol import MAX_VERSION
from ._health import FILE_SYSTEM_TIER, Health

__all__ = ["VersionReservations"]

log = logging.getLogger("viper_lightning.publisher")

BLOCK = 64  # versions reserved by one write
WAIT_S = 1.0  # the longest a publish waits for a reservation write


class VersionReservations:
    """Keeps `RESERVED` ahead of every version this producer hands out, without ever making the
    training thread wait on the file system for more than WAIT_S: a version announced before its
    reservation is durable is reported (the file-system tier is degraded), not waited for."""

    def __init__(self, pfs: FileSystemTier, model: str, first_version: int, health: Health) -> None:
        self._pfs, self._model, self._health = pfs, model, health
        self._reserved = first_version - 1  # durable up to here
        self._lock = threading.Lock()
        self._ahead: threading.Thread | None = None
        self._failing = False
        self._start(first_version + BLOCK - 1)
        self._wait_ahead()

    def ensure(self, version: int) -> None:
        """Before `version` is announced: reserved already, or in the background within WAIT_S;
        the next block is started when half of this one is used."""
        if version > self._reserved:
            if not self._running():
                self._start(version + BLOCK - 1)
            self._wait_ahead()
            if version > self._reserved:
                self._health.degrade(FILE_SYSTEM_TIER, StorageError(
                    f"version {version} of {self._model!r} was announced before its number was reserved on "
                    f"{self._pfs.root}: a restart after a crash could reuse it"), escalate=False)
        if version > self._reserved - BLOCK // 2 and not self._running():
            self._start(max(self._reserved, version) + BLOCK)

    def close(self, handed_out: int) -> None:
        """A clean stop: every version up to `handed_out` went out, none after it will, so the
        reservation comes back down to it and the next run continues without a gap, unless the
        file says another producer reserved more meanwhile (then it stands: a gap, never a reuse)."""
        self._wait_ahead()
        if self._running() or handed_out >= self._reserved:
            return
        try:
            if self._pfs.reserved(self._model) == self._reserved:
                self._pfs.reserve(self._model, handed_out)
        except StorageError as exc:
            log.warning("%s: could not trim the version reservation to %d: %s", self._model, handed_out, exc)

    def _running(self) -> bool:
        return self._ahead is not None and self._ahead.is_alive()

    def _start(self, upto: int) -> None:
        self._ahead = threading.Thread(target=self._reserve, args=(min(upto, MAX_VERSION),), daemon=True,
                                       name=f"viper-reserve-{self._model}")
        self._ahead.start()

    def _wait_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.join(WAIT_S)  # a hung mount costs at most this, then is reported

    def _reserve(self, upto: int) -> None:
        try:
            self._pfs.reserve(self._model, upto)
        except StorageError as exc:  # the file-system tier is failing anyway: report, keep training
            self._health.degrade(FILE_SYSTEM_TIER, exc, escalate=False)  # the flusher's write escalates
            if not self._failing:
                log.error("%s: could not reserve version numbers up to %d, so a restart after a crash may "
                          "reuse them: %s", self._model, upto, exc)
            self._failing = True
            return
        self._failing = False
        with self._lock:  # the tier counts as restored on the flusher's next good write, not here
            self._reserved = max(self._reserved, upto)
