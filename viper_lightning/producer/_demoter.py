"""The GPU tier's drain: copies each device version down to the DRAM tier, off the training
thread and in publish order (the cascade then takes it on to the file system)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from ._cascade import Cascade
from ._catalog import VersionCatalog
from ._device import DeviceCopy, DeviceTier
from ._health import Health
from ._store import HostCopy, TieredStore

__all__ = ["Demoter"]

log = logging.getLogger("viper_lightning.publisher")

_STOP = object()


class Demoter:
    """Copies each submitted device copy into a host slot of `store`, records it in `catalog`,
    hands it to `cascade`, and digests it (transfers of the device copy are vouched for by the
    host copy's digest). `release` (given with each copy) ends the demoter's hold on it once the
    bytes are down. The first failure goes to `health`; later versions are then not copied but
    marked failed, so the publisher's next call raises it rather than piling up work."""

    def __init__(self, model: str, device: DeviceTier, store: TieredStore, catalog: VersionCatalog,
                 cascade: Cascade, health: Health, *, keeps_borrow: bool) -> None:
        self._model, self._device, self._store, self._catalog = model, device, store, catalog
        self._cascade, self._health = cascade, health
        self._keeps_borrow = keeps_borrow  # a flusher will give the host copy back
        self._failure: BaseException | None = None
        self._inbox: queue.Queue[object] = queue.Queue()
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
            host_copy = None
            try:
                host_copy = self._handle(*item)
            finally:
                self._inbox.task_done()  # publish() waits for host memory, never for the digest
            borrowed = self._store.borrow(host_copy.version) if host_copy is not None else None
            if borrowed is not None:  # pinned while hashed: its slot must not be reused meanwhile
                try:
                    borrowed.digest()  # for collective answers of the device copy: digests run on the host copy
                finally:
                    self._store.give_back(borrowed)
            if host_copy is not None:  # evicted meanwhile: waiters learn it at once, not after their timeout
                self._catalog.digested_on_host(host_copy.version)

    def _handle(self, version: int, copy: DeviceCopy, release: Callable[[], None]) -> HostCopy | None:
        try:
            if self._failure is not None:
                raise self._failure
            return self._demote(version, copy, release)
        except BaseException as exc:
            release()
            if self._failure is None:
                self._failure = exc
                self._health.report("demoter", exc)
                log.error("copying %s v%d from the GPU tier to host memory failed: %s", self._model, version, exc)
            self._catalog.failed_to_reach_host(version, f"copying it to host memory failed: {exc}")
            return None

    def _demote(self, version: int, copy: DeviceCopy, release: Callable[[], None]) -> HostCopy:
        record = self._catalog.get(version)
        nbytes = record.layout.nbytes
        slot = self._store.capture_filled(nbytes, lambda buffer: self._device.download(copy, buffer[:nbytes]))
        release()
        try:
            host_copy = self._store.commit(version, record.layout, slot, borrowed=self._keeps_borrow)
        except BaseException:
            self._store.release_slot(slot)
            raise
        self._catalog.reached_host(version, host_copy)
        self._cascade.in_host_memory(host_copy)
        return host_copy
