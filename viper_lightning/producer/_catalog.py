"""VersionCatalog: what the producer knows about each version it published, under one lock.

Several threads move a version along (the training thread publishes it, the demoter copies it
to host memory, the flusher writes it to the file system, the announcer settles it); each
records its step here, and the notices and manifests are built from here."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .._errors import ConfigurationError, TransferError
from .._layout import Layout
from .._shards import PartInfo
from ..transport._protocol import MAX_VERSION, Location, Notice
from ._reservations import VersionReservations
from ._store import HostCopy

__all__ = ["VersionCatalog", "VersionRecord", "CommitRecord"]

HISTORY = 64  # versions whose record is kept for re-announcing


@dataclass(frozen=True)
class CommitRecord:
    """Where one publish spent its time, in seconds: the training thread waited only `stall_s`;
    the flusher spent `digest_s` and `store_s` on the file-system tier (0 without one)."""

    version: int
    stall_s: float
    digest_s: float
    store_s: float


@dataclass(eq=False)
class VersionRecord:
    """One published version: what it is, and how far it has got through the tiers."""

    layout: Layout
    step: int | None
    epoch: int | None
    created_at: float
    stall_s: float = 0.0
    host_copy: HostCopy | None = None  # None while the version is only on the GPU tier
    pfs_address: str | None = None
    # Set once the version is in host memory and can be digested there, or has failed to get there.
    reached_host: threading.Event = field(default_factory=threading.Event)
    demote_failure: str | None = None
    part: PartInfo | None = None  # a sharded producer's rank: which pieces of the model these are


class VersionCatalog:
    """Version numbers, records, and which versions are still on their way to their last tier."""

    def __init__(self, model: str, host: str, producer_id: str, first_version: int,
                 reservations: VersionReservations | None = None) -> None:
        self.model, self.host, self.producer_id = model, host, producer_id
        self._reservations = reservations  # None without a file-system tier: nothing durable to reserve on
        self._records: dict[int, VersionRecord] = {}
        self._changed = threading.Condition()
        self._next = first_version
        self._in_progress = 0  # published, not yet announced with their final tiers
        self._committed: int | None = None
        self.last_stall_s: float | None = None
        self.last_commit: CommitRecord | None = None

    def close(self) -> None:
        """Forget the records (and with them the host copies they reference), so the memory of
        the versions can go when the store closes."""
        with self._changed:
            self._records.clear()

    # -- numbering and progress ------------------------------------------------------------
    def add(self, record: VersionRecord, number: int | None = None) -> int:
        """Number a new version (the next, or `number` when given, which must not be below it) and
        keep its record (the oldest beyond HISTORY are forgotten)."""
        with self._changed:
            version = self._next if number is None else number
            if version < self._next:
                raise ConfigurationError(f"version {version} of {self.model!r} is not above the last one given out "
                                         f"({self._next - 1}); versions only go up")
            if version > MAX_VERSION:
                raise ConfigurationError(f"version numbers of {self.model!r} are used up at {MAX_VERSION}; "
                                         "publish under a new model name")
            self._next = version + 1
            self._in_progress += 1
            self._records[version] = record
            for old in [v for v in self._records if v <= version - HISTORY]:
                del self._records[old]
        if self._reservations is not None:
            self._reservations.ensure(version)  # before anyone can announce it
        return version

    def get(self, version: int) -> VersionRecord | None:
        with self._changed:
            return self._records.get(version)

    @property
    def handed_out(self) -> int:
        """The highest version number given out so far (first_version - 1 before any)."""
        return self._next - 1

    @property
    def committed(self) -> int | None:
        """The newest version whose tiers are settled and announced."""
        return self._committed

    def published(self, version: int, stall_s: float) -> None:
        """The training thread is done with `version` after `stall_s` seconds."""
        with self._changed:
            self._records[version].stall_s = stall_s
            self.last_stall_s = stall_s

    def finished(self, version: int) -> None:
        """`version` got its final notice: every tier it goes to holds it."""
        with self._changed:
            self._in_progress -= 1
            self._committed = max(self._committed or 0, version)
            self._changed.notify_all()

    def wait_all_finished(self, timeout: float | None, give_up: Callable[[], bool]) -> bool:
        """Until no version is in progress (False on timeout, or once `give_up()` holds)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_progress == 0 or give_up(), timeout) \
                and self._in_progress == 0

    # -- steps through the tiers -----------------------------------------------------------
    def reached_host(self, version: int, host_copy: HostCopy) -> None:
        with self._changed:
            record = self._records.get(version)
            if record is not None:
                record.host_copy = host_copy

    def digested_on_host(self, version: int) -> None:
        record = self.get(version)
        if record is not None:
            record.reached_host.set()

    def failed_to_reach_host(self, version: int, reason: str) -> None:
        """The GPU tier's copy never reached host memory: nothing more will come of `version`."""
        with self._changed:
            record = self._records.get(version)
            if record is None or record.host_copy is not None:  # its count is the flusher's or the final notice's
                return
            record.demote_failure = reason
            record.reached_host.set()
            self._in_progress -= 1
            self._changed.notify_all()

    def flushed(self, version: int, address: str, digest_s: float, store_s: float) -> None:
        with self._changed:
            record = self._records.get(version)
            if record is not None:
                record.pfs_address = address
                self.last_commit = CommitRecord(version, record.stall_s, digest_s, store_s)

    def kept_in_memory_only(self, version: int) -> None:
        """No file-system tier: the stall is all there is to record of the commit."""
        record = self.get(version)
        self.last_commit = CommitRecord(version, record.stall_s if record else 0.0, 0.0, 0.0)

    # -- what consumers are told -------------------------------------------------------------
    def host_digest(self, version: int, timeout: float) -> str:
        """The digest of the version's host copy (a GPU-tier copy is digested there), waiting up
        to `timeout` for it to arrive."""
        record = self.get(version)
        if record is None or not record.reached_host.wait(timeout):
            raise TransferError(f"version {version} has no host copy digested yet; fetch it again shortly")
        if record.host_copy is None:
            raise TransferError(f"version {version} has no digest: {record.demote_failure}")
        return record.host_copy.digest()

    def known_digest(self, version: int) -> str | None:
        """The digest if some thread already computed it: a notice never waits for one."""
        record = self.get(version)
        return record.host_copy.known_digest if record is not None and record.host_copy is not None else None

    def on_file_system(self, version: int) -> bool:
        record = self.get(version)
        return record is not None and record.pfs_address is not None

    def notice(self, version: int, digest: str | None, memory: tuple[Location, ...]) -> Notice | None:
        """The notice of `version` with the memory tiers given and, once written, the file system."""
        with self._changed:
            record = self._records.get(version)
            if record is None:
                return None
            if digest is None and record.pfs_address and record.host_copy is not None:
                # written since the caller read the digest: the write computed it first
                digest = record.host_copy.known_digest
            on_file_system = record.pfs_address if digest is not None else None  # a manifest needs one
            locations = memory + ((Location("pfs", self.host, on_file_system),) if on_file_system else ())
        return Notice(model=self.model, version=version, nbytes=record.layout.nbytes, digest=digest,
                      layout=record.layout, producer=self.producer_id, step=record.step, epoch=record.epoch,
                      created_at=record.created_at, locations=locations, part=record.part)
