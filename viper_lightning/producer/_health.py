"""Health: where the producer's background failures go.

Each background part (announcer, demoter, flusher, the servers) reports its own failure here
instead of keeping it to itself; the publisher raises the first one on its caller's thread,
and `view()` says which parts are well."""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["Health"]


class _Failing(Protocol):
    """A part that keeps its own failure (the transport servers)."""

    error: BaseException | None


class Health:
    """The first failure of each part of one publisher, in the order they happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[str, _Failing | None] = {}  # a part that keeps its own failure, or None
        self._failures: dict[str, BaseException] = {}

    def add(self, part: str, failing: _Failing | None = None) -> None:
        """A part to report on; `failing` for one that keeps its own failure in `.error`."""
        with self._lock:
            self._parts[part] = failing

    def report(self, part: str, error: BaseException) -> None:
        """`part` failed; only its first failure is kept."""
        with self._lock:
            self._parts.setdefault(part, None)
            self._failures.setdefault(part, error)

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
        """Each part's state: "ok", or "failed: " and what went wrong."""
        with self._lock:
            parts = list(self._parts)
        return {part: "ok" if (error := self.failure_of(part)) is None else f"failed: {error}" for part in parts}
