"""NoticeBoard: each version's notice as of now, from the catalog's facts and the memory tiers
that hold the version at this moment (tiers change as versions are demoted, flushed, evicted)."""

from __future__ import annotations

from ..transport._collective import BACKENDS, CollectiveServer
from ..transport._protocol import Location, Notice, Switch
from ._catalog import VersionCatalog
from ._device import DeviceTier
from ._store import HostCopy, TieredStore

__all__ = ["NoticeBoard"]


class NoticeBoard:
    """Builds notices and manifests; the servers' addresses are added once they are bound."""

    def __init__(self, catalog: VersionCatalog, store: TieredStore, device: DeviceTier | None,
                 key: bytes | None, lends_device_memory: bool) -> None:
        self._catalog, self._store, self._device, self._key = catalog, store, device, key
        self._lends_device_memory = lends_device_memory
        self._fetch_endpoint: str | None = None
        self._collective: CollectiveServer | None = None
        self._last: tuple[tuple, bytes] | None = None  # heartbeats repeat a notice: encode it once

    def serve_from(self, fetch_endpoint: str | None, collective: CollectiveServer | None) -> None:
        """Where the servers listen, for the locations notices name."""
        self._fetch_endpoint, self._collective = fetch_endpoint, collective

    def encoded(self, version: int) -> bytes | None:
        """The signed notice as of now; None when no tier holds the version any more."""
        digest, memory = self._catalog.known_digest(version), self.memory_locations(version)
        key = (version, digest, memory, self._catalog.on_file_system(version))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        notice = self._catalog.notice(version, digest, memory)
        if notice is None or not notice.locations:
            return None
        self._last = (key, notice.encode(self._key))
        return self._last[1]

    def switch(self, version: int) -> bytes:
        """The signed switch to `version`, for replicas that switch together."""
        return Switch(self._catalog.model, version, self._catalog.producer_id).encode(self._key)

    def latest(self) -> bytes | None:
        """The newest version in memory, for a consumer that joins late."""
        latest = self._store.latest()
        return self.encoded(latest) if latest is not None else None

    def manifest(self, host_copy: HostCopy) -> Notice:
        """What the file-system tier stores beside the bytes (computes the digest if nobody has yet)."""
        return self._catalog.notice(host_copy.version, host_copy.digest(), ())

    def memory_locations(self, version: int) -> tuple[Location, ...]:
        """The GPU tier's (IPC through the fetch endpoint, the collective if it serves that
        device), then the DRAM tier's (segment, fetch endpoint, a Gloo collective)."""
        host, locations = self._catalog.host, []
        collective = self._collective
        if self._device is not None and self._device.holds(version):
            if self._lends_device_memory and self._fetch_endpoint:
                locations.append(Location("gpu", host, self._fetch_endpoint))
            if collective is not None and serves_device(collective.backend, self._device):
                locations.append(Location("gpu", host, collective.address, collective.load))
                collective = None  # listed once: it serves the DRAM copy only as a fallback
        dram = self._store.memory_locations(version, self._fetch_endpoint)
        locations += dram
        if dram and collective is not None and collective.backend != "nccl":
            locations.append(Location("dram", host, collective.address, collective.load))
        return tuple(locations)


def serves_device(backend: str, device: DeviceTier | None) -> bool:
    """Whether a collective of this backend moves the GPU tier's tensors (NCCL for CUDA, Gloo
    for the tier kept in host memory)."""
    return device is not None and device.device.type == BACKENDS[backend]
