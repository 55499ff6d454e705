"""MemoryLender: what the producer's servers may read, and for how long."""

from __future__ import annotations

from ..transport._cuda_ipc import export_cuda_tensor
from ..transport._loans import IpcLoan, MemoryLoan
from ._catalog import VersionCatalog
from ._device import DeviceTier
from ._notices import NoticeBoard
from ._store import TieredStore

__all__ = ["MemoryLender"]

DIGEST_WAIT_S = 30.0  # how long a transfer of a GPU-tier copy waits for its host copy's digest


class MemoryLender:
    """Lends the fetch and collective servers the versions held in memory (see transport's
    `Lender`): each loan keeps its bytes in place until released."""

    def __init__(self, store: TieredStore, device: DeviceTier | None, catalog: VersionCatalog,
                 notices: NoticeBoard, *, lends_device_memory: bool) -> None:
        self._store, self._device, self._catalog, self._notices = store, device, catalog, notices
        self._lends_device_memory = lends_device_memory

    @property
    def lends_device_memory(self) -> bool:
        """CUDA IPC maps the copy writable into the consumer: only to holders of the key."""
        return self._lends_device_memory

    def lend_memory(self, version: int, device_type: str | None = None) -> MemoryLoan | None:
        if device_type is not None and self._device is not None and self._device.device.type == device_type:
            loan = self._device_loan(version)
            if loan is not None or device_type == "cuda":  # NCCL moves device memory only
                return loan
        host_copy = self._store.borrow(version)
        if host_copy is None:
            return None
        return MemoryLoan(host_copy.data, host_copy.digest, lambda: self._store.give_back(host_copy),
                          host_copy.blocks)

    def lend_ipc(self, version: int) -> IpcLoan | None:
        """CUDA IPC for a same-host consumer: the copy stays borrowed until its lease ends."""
        copy = self._device.borrow(version)
        if copy is None:
            return None
        try:
            copy.wait()
            with self._device.stream_context():
                description = export_cuda_tensor(copy.data)
        except BaseException:
            self._device.give_back(copy)
            raise
        return IpcLoan(description, copy.layout.nbytes, lambda: self._device.give_back(copy))

    def tiers_of(self, version: int) -> list[str]:
        tiers = ["gpu"] if self._device is not None and self._device.holds(version) else []
        if self._store.memory_locations(version, None):
            tiers.append("dram")
        return tiers + (["pfs"] if self._catalog.on_file_system(version) else [])

    def latest_notice(self) -> bytes | None:
        return self._notices.latest()

    def _device_loan(self, version: int) -> MemoryLoan | None:
        """The GPU tier's copy; its digest is its host copy's (digests run on the host), at most
        one host copy away since publish waits for the previous demotion."""
        copy = self._device.borrow(version)
        if copy is None:
            return None
        copy.wait()
        return MemoryLoan(copy.data, lambda: self._catalog.host_digest(version, DIGEST_WAIT_S),
                          lambda: self._device.give_back(copy))
