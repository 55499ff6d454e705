"""Cascade: what happens to a version once it is in host memory."""

from __future__ import annotations

from ._announcer import Announcer
from ._catalog import VersionCatalog
from ._flusher import Flusher
from ._store import HostCopy, TieredStore
from ._switcher import Switcher

__all__ = ["Cascade"]


class Cascade:
    """Announces a version that reached host memory (with the DRAM tier on), has the switcher
    (replicas that switch together) wait for its replicas, and hands it to the flusher, the
    burst buffer's drain; without a file-system tier, the version is final here."""

    def __init__(self, catalog: VersionCatalog, store: TieredStore, announcer: Announcer,
                 flusher: Flusher | None, switcher: Switcher | None = None) -> None:
        self._catalog, self._store, self._announcer, self._flusher = catalog, store, announcer, flusher
        self._switcher = switcher

    def in_host_memory(self, host_copy: HostCopy) -> None:
        if self._flusher is None:
            self._catalog.kept_in_memory_only(host_copy.version)
        if self._store.uses_dram:
            self._announcer.announce(host_copy.version, final=self._flusher is None)
            if self._switcher is not None:
                self._switcher.submit(host_copy.version)
        if self._flusher is not None:
            self._flusher.submit(host_copy)
