"""Health: where the producer's background failures go.

Each background part (announcer, demoter, flusher, the servers) reports its own trouble here
instead of keeping it to itself. A failure stops that part, and the publisher raises the first
one on its caller's thread. A degraded part (a secondary tier that failed and retries) keeps
going and is only reported, unless the publisher is strict (`on_tier_error="raise"`), which
raises it like a failure. `view()` says how each part is."""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["Health", "FILE_SYSTEM_TIER"]

FILE_SYSTEM_TIER = "file-system tier"  # its writes: the flusher's versions and the version reservations


class _Failing(Protocol):
    """A part that keeps its own failure (the transport servers)."""

    error: BaseException | None


class Health:
    """The first failure of each part of one publisher, in the order they happened."""

    def __init__(self, *, strict: bool = False) -> None:
        self._lock = threading.Lock()
        self._strict = strict
        self._parts: dict[str, _Failing | None] = {}  # a part that keeps its own failure, or None
        self._failures: dict[str, BaseException] = {}
        self._degraded: dict[str, BaseException] = {}  # the latest trouble of a part that retries

    def add(self, part: str, failing: _Failing | None = None) -> None:
        """A part to report on; `failing` for one that keeps its own failure in `.error`."""
        with self._lock:
            self._parts[part] = failing

    def report(self, part: str, error: BaseException) -> None:
        """`part` failed; only its first failure is kept."""
        with self._lock:
            self._parts.setdefault(part, None)
            self._failures.setdefault(part, error)

    def degrade(self, part: str, error: BaseException, *, escalate: bool = True) -> None:
        """`part` failed but carries on (and retries); strict publishers treat it as a failure
        unless `escalate` is False (trouble the caller can do nothing about, only know of)."""
        with self._lock:
            self._parts.setdefault(part, None)
            self._degraded[part] = error
            if self._strict and escalate:
                self._failures.setdefault(part, error)

    def recovered(self, part: str) -> None:
        with self._lock:
            self._degraded.pop(part, None)

    def degraded(self) -> dict[str, BaseException]:
        with self._lock:
            return dict(self._degraded)

    def failure_of(self, part: str) -> BaseException | None:
        with self._lock:
            reported, failing = self._failures.get(part), self._parts.get(part)
        return reported if reported is not None else failing.error if failing is not None else None

    def first_failure(self) -> BaseException | None:
        """The earliest reported failure, else the first part keeping one of its own."""
        with self._lock:
            parts = list(dict.fromkeys([*self._failures, *self._parts]))
        return next((error for part in parts if (error := self.failure_of(part)) is not None), None)

    def raise_if_failed(self) -> None:
        error = self.first_failure()
        if error is not None:
            raise error

    def view(self) -> dict[str, str]:
        """Each part's state: "ok", "degraded: " or "failed: " and what went wrong."""
        with self._lock:
            parts, degraded = list(self._parts), dict(self._degraded)
        view = {}
        for part in parts:
            failure = self.failure_of(part)
            view[part] = f"failed: {failure}" if failure is not None else \
                f"degraded: {degraded[part]}" if part in degraded else "ok"
        return view
