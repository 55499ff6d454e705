"""The switcher: replicas that switch together swap to a version when the producer says so.

Each replica loads a version into its standby copy, reports "ready" to the fetch endpoint and
keeps serving the previous version; once the replicas this producer waits for are ready, the
announcer sends a signed `Switch` on the notice socket and they all swap at once (a notice
reaches every host within a millisecond, where their loads may finish seconds apart).

Whom it waits for: `quorum` ready replicas when set; otherwise every replica that became ready
with the previous version, also after its switch (none for the first, which therefore waits its
whole deadline). A replica
not ready `deadline_s` after the version was announced is left out: the switch goes without
it, `left_out` counts it, and the replica, seeing the switch already made once it is ready,
swaps at once and says so in its own stats.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from ..transport._reports import ReadyBoard
from ._announcer import Announcer

__all__ = ["Switcher", "DEFAULT_TOGETHER_DEADLINE_S"]

log = logging.getLogger("viper_lightning.publisher")

DEFAULT_TOGETHER_DEADLINE_S = 10.0  # a replica's load may take a transfer over a slow link
_STOP = object()


class Switcher:
    """Waits for the replicas of each submitted version on `board` and has `announcer` switch."""

    def __init__(self, model: str, board: ReadyBoard, announcer: Announcer, *, quorum: int | None,
                 deadline_s: float) -> None:
        self._model, self._board, self._announcer = model, board, announcer
        self._quorum, self._deadline_s = quorum, deadline_s
        self._last = 0  # the version last switched to
        self.switched = 0  # versions switched to
        self.left_out = 0  # replicas expected but not ready by a deadline, summed over switches
        self._inbox: queue.Queue[object] = queue.Queue()
        self._closing = threading.Event()  # ends a wait for replicas at once
        self._thread = threading.Thread(target=self._run, name=f"viper-switcher-{model}", daemon=True)
        self._thread.start()

    def submit(self, version: int) -> None:
        """`version` was announced: switch to it once its replicas are ready (or by the deadline)."""
        self._inbox.put((version, time.monotonic()))

    def close(self) -> None:
        self._closing.set()
        self._board.wake()
        self._inbox.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            version, announced = item
            while not self._inbox.empty():  # a newer version replaces one not switched to yet
                newer = self._inbox.get()
                if newer is _STOP:
                    self._inbox.put(_STOP)
                    break
                version, announced = newer
            self._switch(version, announced)

    def _switch(self, version: int, announced: float) -> None:
        # late ones included: a replica left out of the last switch is alive and back in
        expected, quorum = self._board.ready_with(self._last) if self._last else frozenset(), self._quorum

        def enough(ready: frozenset[str]) -> bool:
            if self._closing.is_set():
                return True
            if quorum is not None:
                return len(ready) >= quorum
            return bool(expected) and expected <= ready

        ready = self._board.wait(version, enough, announced + self._deadline_s - time.monotonic())
        if self._closing.is_set():
            return
        missing = expected - ready
        if missing:
            log.warning("%s v%d: switching without %d replica(s) not ready within %.1f s: %s", self._model,
                        version, len(missing), self._deadline_s, ", ".join(sorted(missing)))
        self.left_out += len(missing)
        self._last = version
        self._announcer.switch(version)
        self.switched += 1
