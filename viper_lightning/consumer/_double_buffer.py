"""Double buffering: requests read the active copy while the next version loads into the
standby copy; a swap is a pointer flip between requests, so no request ever sees mixed weights."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["Lease", "DoubleBuffer", "IDLE_WAIT_S"]

log = logging.getLogger("viper_lightning.subscriber")

IDLE_WAIT_S = 1.0  # one wait for in-flight requests on the standby copy, between warnings


@dataclass
class _ModelCopy:
    model: torch.nn.Module
    version: int | None
    users: int = 0


@dataclass(frozen=True)
class Lease:
    """What one request holds: the model it must use and the version it answers with."""

    model: torch.nn.Module
    version: int | None


class DoubleBuffer:
    """The active and standby copies of a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._active = _ModelCopy(model, None)
        self._standby = _ModelCopy(copy.deepcopy(model), None)
        self._changed = threading.Condition()

    @property
    def version(self) -> int | None:
        return self._active.version

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        """Hold the active copy for one request; a swap meanwhile does not touch it."""
        with self._changed:
            held = self._active
            held.users += 1
        try:
            yield Lease(held.model, held.version)
        finally:
            with self._changed:
                held.users -= 1
                self._changed.notify_all()

    def models(self) -> list[torch.nn.Module]:
        """Both copies, active first."""
        with self._changed:
            return [self._active.model, self._standby.model]

    def idle_standby(self, timeout: float) -> torch.nn.Module | None:
        """The standby copy once no request still uses it (it was active before the last swap)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._standby.users == 0, timeout):
                return None
            return self._standby.model

    def wait_idle_standby(self, stop: threading.Event, model: str) -> torch.nn.Module | None:
        """The standby copy once idle, warning every IDLE_WAIT_S that a request still holds it;
        None once `stop` is set."""
        while not stop.is_set():
            standby = self.idle_standby(IDLE_WAIT_S)
            if standby is not None:
                return standby
            log.warning("%s: a request has held the previous version for over %.0f s; the update waits", model,
                        IDLE_WAIT_S)
        return None

    def swap(self, version: int) -> None:
        """Make the standby copy (just loaded with `version`) the one new requests get."""
        with self._changed:
            self._standby.version = version
            self._active, self._standby = self._standby, self._active
            self._changed.notify_all()
