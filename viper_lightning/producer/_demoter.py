"""The GPU tier's drain: copies each device version down to the DRAM tier, off the training
thread and in publish order (the flusher then takes it on to the file system)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from ._device import DeviceCopy

__all__ = ["Demoter"]

log = logging.getLogger("viper_lightning.publisher")

_STOP = object()


class Demoter:
    """`demote(version, copy, release)` does the work, calling `release` once it no longer
    reads the copy; `failed(version, copy, exc)` is called when it raises (`release` is then
    called here, and does nothing if demote already did). The first failure is kept in `error`; later versions go to `failed` too,
    without being copied, so the publisher's next call raises it rather than piling up work."""

    def __init__(self, model: str, demote: Callable[[int, DeviceCopy, Callable[[], None]], None],
                 failed: Callable[[int, DeviceCopy, BaseException], None]) -> None:
        self._model, self._demote, self._failed = model, demote, failed
        self._inbox: queue.Queue[object] = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"viper-demoter-{model}", daemon=True)
        self._thread.start()

    def submit(self, version: int, copy: DeviceCopy, release: Callable[[], None]) -> None:
        self._inbox.put((version, copy, release))

    def wait_idle(self) -> None:
        """Until every submitted version is in host memory (or has failed to get there)."""
        self._inbox.join()

    def close(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._inbox.get()) is not _STOP:
            try:
                self._handle(*item)
            finally:
                self._inbox.task_done()

    def _handle(self, version: int, copy: DeviceCopy, release: Callable[[], None]) -> None:
        try:
            if self.error is not None:
                raise self.error
            self._demote(version, copy, release)
        except BaseException as exc:
            release()
            if self.error is None:
                self.error = exc
                log.error("copying %s v%d from the GPU tier to host memory failed: %s", self._model, version, exc)
            self._failed(version, copy, exc)
