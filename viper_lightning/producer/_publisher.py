"""ModelPublisher: snapshot into the tiered store, announce, flush in the background.
Framework-agnostic; ViperCallback is a thin Lightning layer over it."""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import torch
import zmq

from .._errors import ConfigurationError, TransferError, ViperError
from .._layout import Layout
from ..storage._pfs import FileSystemTier
from ..transport._collective import BACKENDS, CollectiveServer, parse_address
from ..transport._cuda_ipc import export_cuda_tensor
from ..transport._fetch import FetchServer, Readable, Shared
from ..transport._protocol import DEFAULT_ENDPOINT, Location, Notice, check_endpoint, check_model_name, normalize_key
from ._announcer import Announcer
from ._demoter import Demoter
from ._device import BusyError, DeviceCopy, DeviceTier
from ._flusher import Flusher
from ._store import Held, TieredStore

__all__ = ["ModelPublisher", "CommitRecord", "DEFAULT_ENDPOINT", "DEFAULT_FETCH_ENDPOINT"]

log = logging.getLogger("viper_lightning.publisher")

DEFAULT_FETCH_ENDPOINT = "tcp://127.0.0.1:*"
_HISTORY = 64  # versions whose metadata is kept for re-announcing
_DIGEST_WAIT_S = 30.0
DEFAULT_FLUSH_DELAY_S = 0.05


@dataclass(frozen=True)
class CommitRecord:
    """Where one publish spent its time, in seconds: the training thread waited only `stall_s`;
    the flusher spent `digest_s` and `store_s` on the file-system tier (0 without one)."""

    version: int
    stall_s: float
    digest_s: float
    store_s: float


@dataclass
class _Info:
    layout: Layout
    step: int | None
    epoch: int | None
    created_at: float
    stall_s: float
    held: Held | None  # None while the version is only on the GPU tier
    pfs_address: str | None = None
    settled: bool = False  # in host memory (GPU tier: set by the demoter)
    demoted: threading.Event = field(default_factory=threading.Event)  # settled and digested, or failed
    demote_failure: str | None = None


class ModelPublisher:
    """Publishes versions of one model to consumers.

    The caller waits only for one copy of the weights into a reused slot (a shared-memory
    segment when the DRAM tier is on). The version is announced as soon as it is in memory;
    a background flusher writes it to the file-system tier and announces it again with that
    location. Failures of background threads are kept and raised by the next `publish`,
    `flush` or `close`.

    Args:
        model_name: the model's name: the ZeroMQ topic and the directory under `pfs_root`.
        endpoint: where notices are published (bound here). Loopback by default; use
            `tcp://127.0.0.1:*` for a free port and read `endpoint` afterwards.
        pfs_root: the file-system tier (a path, any fsspec URL, or a FileSystemTier), or None
            for memory only.
        hmac_key: shared key (16+ bytes) signing notices, manifests and fetch requests.
        dram_versions: versions kept in shared memory (0 turns the DRAM tier off).
        dram_bytes: also keep no more than this many bytes of held versions there (None: no
            byte budget); the newest version stays whatever its size. It bounds what is kept for
            consumers, not the slot pool (sized by dram_versions).
        fetch_endpoint: where remote consumers fetch from memory (None: no remote fetch).
        gpu_device: keep a device-resident copy of the latest version there ("cuda", "cuda:N"):
            publish then waits for no copy at all (it runs on a side stream), the copy to host
            memory happens in the background, same-host consumers read it over CUDA IPC and
            others over NCCL. "cpu" runs the same tier in host memory (tests without a GPU).
            None (default): no GPU tier; a CUDA model is then copied straight to host memory.
        collective_endpoint: also serve versions over torch.distributed point-to-point:
            "nccl://HOST:PORT" serves the GPU tier to other hosts' GPUs, "gloo://HOST:PORT"
            host memory (or the "cpu" GPU tier); port 0 picks a free one. Its store has no
            authentication: bind it to a trusted network only.
        keep_versions: versions kept on the file system (None keeps all).
        heartbeat_interval: seconds between repeats of the latest notice.
        flush_delay: seconds between announcing a version in memory and starting its write to
            the file system, so consumers loading it from memory do not share the CPU and the
            memory bus with the write (0 writes at once).
        resume_after: versions start above this (and above any version already stored).
        host_id: this host's name in notices (default: the host name).
    """

    def __init__(
        self,
        model_name: str,
        endpoint: str = DEFAULT_ENDPOINT,
        pfs_root: str | FileSystemTier | None = None,
        hmac_key: str | bytes | None = None,
        *,
        dram_versions: int = 1,
        dram_bytes: int | None = None,
        gpu_device: str | None = None,
        fetch_endpoint: str | None = DEFAULT_FETCH_ENDPOINT,
        collective_endpoint: str | None = None,
        keep_versions: int | None = None,
        heartbeat_interval: float = 1.0,
        flush_delay: float = DEFAULT_FLUSH_DELAY_S,
        resume_after: int = 0,
        host_id: str | None = None,
    ) -> None:
        self.model_name = check_model_name(model_name)
        check_settings(pfs_root, dram_versions, keep_versions, heartbeat_interval, resume_after, dram_bytes)
        check_endpoint(endpoint)
        if not (isinstance(flush_delay, (int, float)) and 0 <= flush_delay < 60):
            raise ConfigurationError(f"flush_delay={flush_delay!r}: use seconds in [0, 60), e.g. 0.05")
        if fetch_endpoint is not None:
            check_endpoint(fetch_endpoint)
        self._key = normalize_key(hmac_key)
        self._host = host_id or socket.gethostname()
        self.producer_id = f"{self._host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pfs = pfs_root if isinstance(pfs_root, FileSystemTier) or pfs_root is None else FileSystemTier(pfs_root)
        self._next_version = max(resume_after, self._pfs.highest(self.model_name) if self._pfs else 0) + 1
        if self._pfs is None and resume_after == 0:
            log.warning("%s: no pfs_root and no resume_after, so versions start at 1 again; consumers that "
                        "served a previous run refuse them as older. Pass resume_after (ViperCallback does "
                        "from its checkpoint) or a pfs_root.", self.model_name)
        self._device = DeviceTier(gpu_device) if gpu_device is not None else None
        self._store = TieredStore(self.model_name, self._host, dram_versions=dram_versions, dram_bytes=dram_bytes)
        self._infos: dict[int, _Info] = {}
        self._state = threading.Condition()
        self._pending = 0
        self._committed: int | None = None
        self._closed = False
        self.last_stall_s: float | None = None
        self.last_commit: CommitRecord | None = None
        self._context = zmq.Context()
        self._fetch: FetchServer | None = None
        self._collective: CollectiveServer | None = None
        self._collective_backend: str | None = None
        serves_memory = dram_versions > 0 or self._device is not None
        try:
            self._fetch = self._start_fetch_server(fetch_endpoint) if serves_memory else None
            self._collective = self._start_collective(collective_endpoint) if serves_memory else None
            self._announcer = Announcer(self._context, endpoint, self.model_name, heartbeat_interval,
                                        self._encoded_notice, self._announced)
        except BaseException:
            for server in (self._fetch, self._collective):
                if server is not None:
                    server.close()
            self._store.close()
            self._context.term()
            raise
        self.fetch_endpoint = self._fetch.endpoint if self._fetch else None
        self.endpoint = self._announcer.endpoint
        # A program that exits without close() still flushes, stops its threads before the
        # interpreter tears them down, and removes its segments.
        atexit.register(_close_at_exit, weakref.ref(self))
        self._flusher = (Flusher(self._pfs, self.model_name, self._key, keep_versions, self._manifest,
                                 self._flushed, flush_delay if dram_versions or gpu_device else 0.0)
                         if self._pfs else None)
        if self._flusher is not None:
            self._store.on_starved = self._flusher.hurry
        self._demoter = Demoter(self.model_name, self._demote, self._demote_failed) if self._device else None

    # -- public API ------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The newest version whose tiers are settled and announced, or None."""
        return self._committed

    def publish(self, module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
                step: int | None = None, epoch: int | None = None) -> int:
        """Snapshot the weights and hand them to the tiers; returns the new version number."""
        self._raise_if_failed()
        if self._closed:
            raise ViperError(f"publisher of {self.model_name!r} is closed; create a new ModelPublisher")
        state_dict = _state_dict_of(module_or_state_dict)
        created_at = time.time()  # latencies are measured from the publish call
        started = time.perf_counter()
        if self._device is not None:
            version = self._publish_to_device(state_dict, _Info(None, step, epoch, created_at, 0.0, None), started)
            if version is not None:
                return version
        layout, slot = self._store.capture(state_dict)
        version = self._take_version()
        held = self._store.commit(version, layout, slot, pin=self._flusher is not None)
        self.last_stall_s = time.perf_counter() - started
        self._remember(version, _Info(layout, step, epoch, created_at, self.last_stall_s, held))
        self._settled_in_memory(version, held)
        return version

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every published version is on all its tiers and announced; False on timeout."""
        if self._flusher is not None:
            self._flusher.hurry()  # no flush_delay for what the caller waits for
        with self._state:
            done = self._state.wait_for(lambda: self._pending == 0 or self._failure() is not None, timeout)
        self._raise_if_failed()
        return done

    def wait_for_subscribers(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until `count` subscriptions have arrived (useful before a first publish)."""
        return self._announcer.wait_for_subscribers(count, timeout)

    def close(self) -> None:
        """Flush what is queued, stop every thread, remove the segments, raise a kept error."""
        if not self._closed:
            self._closed = True
            if self._demoter is not None:
                self._demoter.close()  # it feeds the flusher: drained first
            if self._flusher is not None:
                self._flusher.close()
            self._announcer.close()
            for server in (self._fetch, self._collective):
                if server is not None:
                    server.close()
            self._store.close()
            if self._device is not None:
                self._device.close()
            self._context.term()
        self._raise_if_failed()

    def __enter__(self) -> ModelPublisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except ViperError:
            log.exception("publisher failed while the caller was already failing")

    # -- the cascade: GPU tier, DRAM tier, file system ------------------------------------
    def _take_version(self) -> int:
        with self._state:
            version = self._next_version
            self._next_version += 1
            self._pending += 1
        return version

    def _publish_to_device(self, state_dict: Mapping[str, torch.Tensor], info: _Info,
                           started: float) -> int | None:
        """The training thread's part with a GPU tier: a device copy (the host does not wait for
        it on CUDA), announced at once; the demoter copies it on to host memory. None when every
        device copy is still read by a transfer: the caller then copies to host memory itself."""
        # Backpressure: the previous version reaches host memory first, so versions settle in
        # order and a consumer that cannot take GPU routes is never more than one version behind.
        self._demoter.wait_idle()
        info.layout = Layout.for_state_dict(state_dict)
        try:
            copy = self._device.capture(info.layout, state_dict, timeout=0)
        except BusyError as exc:
            log.info("%s: %s; this version skips the GPU tier", self.model_name, exc)
            return None
        version = self._take_version()
        release = self._device.hold(copy)  # the demoter's, taken before the copy becomes reusable
        self._device.commit(version, copy)
        self.last_stall_s = info.stall_s = time.perf_counter() - started
        self._remember(version, info)
        self._announcer.announce(version, final=False)
        self._demoter.submit(version, copy, release)
        return version

    def _demote(self, version: int, copy: DeviceCopy, release: Callable[[], None]) -> None:
        """Demoter thread: device copy to a DRAM slot, announced, then on to the flusher."""
        info = self._infos[version]
        nbytes = info.layout.nbytes
        slot = self._store.capture_filled(nbytes, lambda buffer: self._device.download(copy, buffer[:nbytes]))
        release()
        try:
            held = self._store.commit(version, info.layout, slot, pin=self._flusher is not None)
        except BaseException:
            self._store.release_slot(slot)
            raise
        info.held, info.settled = held, True
        self._settled_in_memory(version, held)
        held.digest()  # for collective answers of the device copy: xxh3 runs on the host copy
        info.demoted.set()

    def _demote_failed(self, version: int, copy: DeviceCopy, exc: BaseException) -> None:
        info = self._infos.get(version)
        if info is None or info.settled:  # its count is the flusher's or the final notice's
            return
        info.demote_failure = f"copying it to host memory failed: {exc}"
        info.demoted.set()
        with self._state:
            self._pending -= 1
            self._state.notify_all()

    def _settled_in_memory(self, version: int, held: Held) -> None:
        """The version is in host memory: tell consumers, and hand it to the flusher."""
        if self._flusher is None:  # memory only: the stall is all there is to record
            info = self._infos.get(version)
            self.last_commit = CommitRecord(version, info.stall_s if info else 0.0, 0.0, 0.0)
        if self._store.uses_dram:
            self._announcer.announce(version, final=self._flusher is None)
        if self._flusher is not None:
            self._flusher.submit(held)

    # -- notices ---------------------------------------------------------------------------
    def _notice(self, version: int, digest: str | None, *, with_memory: bool = True) -> Notice | None:
        info = self._infos.get(version)
        if info is None:
            return None
        locations = self._memory_locations(version) if with_memory else ()
        if info.pfs_address is not None:
            locations += (Location("pfs", self._host, info.pfs_address),)
        return Notice(model=self.model_name, version=version, nbytes=info.layout.nbytes, digest=digest,
                      layout=info.layout, producer=self.producer_id, step=info.step, epoch=info.epoch,
                      created_at=info.created_at, locations=locations)

    def _memory_locations(self, version: int) -> tuple[Location, ...]:
        """The GPU tier's (IPC through the fetch endpoint, the collective if it serves that
        device), then the DRAM tier's (segment, fetch endpoint, a Gloo collective)."""
        locations: list[Location] = []
        collective = self._collective
        if self._device is not None and self._device.holds(version):
            if self._lends_device_memory() and self.fetch_endpoint:
                locations.append(Location("gpu", self._host, self.fetch_endpoint))
            if collective is not None and self._collective_serves_device():
                locations.append(Location("gpu", self._host, collective.address, collective.load))
                collective = None  # listed once: it serves the DRAM copy only as a fallback
        dram = self._store.memory_locations(version, self.fetch_endpoint)
        locations += dram
        if dram and collective is not None and not collective.address.startswith("nccl://"):
            locations.append(Location("dram", self._host, collective.address, collective.load))
        return tuple(locations)

    def _encoded_notice(self, version: int) -> bytes | None:
        """The notice as of now (its tiers change as versions flush and evict); None if none holds it."""
        info = self._infos.get(version)
        digest = info.held.known_digest if info and info.held else None  # never delay a notice for a digest
        notice = self._notice(version, digest)
        return notice.encode(self._key) if notice is not None and notice.locations else None

    def _manifest(self, held: Held) -> Notice:
        return self._notice(held.version, held.digest(), with_memory=False)

    def _flushed(self, held: Held, address: str | None, digest_s: float, store_s: float) -> None:
        info = self._infos.get(held.version)
        if info is not None and address is not None:
            info.pfs_address = address
            self.last_commit = CommitRecord(held.version, info.stall_s, digest_s, store_s)
        self._store.unpin(held, flushed=address is not None)
        self._announcer.announce(held.version, final=True)

    def _announced(self, version: int, final: bool) -> None:
        if not final:
            return
        with self._state:
            self._pending -= 1
            self._committed = max(self._committed or 0, version)
            self._state.notify_all()

    def _remember(self, version: int, info: _Info) -> None:
        self._infos[version] = info
        for old in [v for v in self._infos if v <= version - _HISTORY]:
            del self._infos[old]

    # -- remote fetch ----------------------------------------------------------------------
    def _start_fetch_server(self, endpoint: str | None) -> FetchServer | None:
        if endpoint is None:
            return None
        share = self._share if self._lends_device_memory() else None
        server = FetchServer(self._context, endpoint, self.model_name, self._key, self._readable,
                             self._tiers_of, self._latest_notice, share=share)
        server.start()
        return server

    def _start_collective(self, endpoint: str | None) -> CollectiveServer | None:
        if endpoint is None:
            return None
        backend, host, port = parse_address(endpoint, any_port=True)
        if backend == "nccl" and (self._device is None or not self._device.on_gpu):
            raise ConfigurationError(f"collective_endpoint {endpoint!r}: NCCL serves the GPU tier's copies; set "
                                     "gpu_device='cuda', or use gloo:// to serve host memory")
        self._collective_backend = backend
        return CollectiveServer(host, port, backend, self._collective_readable, self._tiers_of)

    def _lends_device_memory(self) -> bool:
        """CUDA IPC maps the copy writable into the consumer: only to holders of the key."""
        return self._device is not None and self._device.on_gpu and self._key is not None

    def _collective_serves_device(self) -> bool:
        return self._device is not None and self._device.device.type == BACKENDS[self._collective_backend]

    def _collective_readable(self, version: int) -> Readable | None:
        """The GPU tier's copy when the backend moves that device's tensors, else host memory."""
        if self._collective_serves_device():
            readable = self._device_readable(version)
            if readable is not None or self._collective_backend == "nccl":
                return readable
        return self._readable(version)

    def _readable(self, version: int) -> Readable | None:
        held = self._store.pin(version)
        if held is None:
            return None
        return Readable(held.data, held.digest, lambda: self._store.unpin(held))

    def _device_readable(self, version: int) -> Readable | None:
        copy = self._device.pin(version)
        if copy is None:
            return None
        copy.wait()
        return Readable(copy.data, lambda: self._host_digest(version), lambda: self._device.release(copy))

    def _host_digest(self, version: int) -> str:
        """A device copy's digest is its host copy's (xxh3 runs on the host); with backpressure
        on publish, that is at most one host copy away."""
        info = self._infos.get(version)
        if info is None or not info.demoted.wait(_DIGEST_WAIT_S):
            raise TransferError(f"version {version} has no host copy digested yet; fetch it again shortly")
        if info.held is None:
            raise TransferError(f"version {version} has no digest: {info.demote_failure}")
        return info.held.digest()

    def _share(self, version: int) -> Shared | None:
        """CUDA IPC for a same-host consumer: the copy stays pinned until its lease ends."""
        copy = self._device.pin(version)
        if copy is None:
            return None
        try:
            copy.wait()
            with self._device.stream_context():
                description = export_cuda_tensor(copy.data)
        except BaseException:
            self._device.release(copy)
            raise
        return Shared(description, copy.layout.nbytes, lambda: self._device.release(copy))

    def _tiers_of(self, version: int) -> list[str]:
        """Where a version still lives, for a "gone" answer."""
        info = self._infos.get(version)
        tiers = ["gpu"] if self._device is not None and self._device.holds(version) else []
        if self._store.memory_locations(version, None):
            tiers.append("dram")
        return tiers + (["pfs"] if info is not None and info.pfs_address else [])

    def _latest_notice(self) -> bytes | None:
        latest = self._store.latest()
        return self._encoded_notice(latest) if latest is not None else None

    # -- errors ----------------------------------------------------------------------------
    def _failure(self) -> BaseException | None:
        for part in (self._demoter, self._flusher, self._announcer, self._fetch, self._collective):
            if part is not None and part.error is not None:
                return part.error
        return None

    def _raise_if_failed(self) -> None:
        error = self._failure()
        if error is not None:
            raise error


def _close_at_exit(reference: weakref.ref) -> None:
    publisher = reference()
    if publisher is not None and not publisher._closed:
        try:
            publisher.close()
        except Exception:  # noqa: BLE001 - at exit there is no caller left to raise to
            log.exception("closing the publisher of %r at exit failed", publisher.model_name)


def _state_dict_of(source: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    raise ConfigurationError(
        f"publish() takes an nn.Module or a state_dict mapping, got {type(source).__name__}")


def check_settings(pfs_root: object, dram_versions: int, keep_versions: int | None,
                   heartbeat_interval: float, resume_after: int, dram_bytes: int | None = None) -> None:
    if pfs_root is None and dram_versions == 0:
        raise ConfigurationError(
            "with dram_versions=0 and pfs_root=None no tier would hold the published bytes; "
            "keep the DRAM tier (dram_versions>=1) or pass pfs_root='/scratch/viper'")
    if dram_versions < 0:
        raise ConfigurationError(f"dram_versions={dram_versions}: use 0 (no DRAM tier) or more")
    if dram_bytes is not None and not (isinstance(dram_bytes, int) and not isinstance(dram_bytes, bool)
                                       and dram_bytes > 0):
        raise ConfigurationError(f"dram_bytes={dram_bytes!r}: use a positive number of bytes, or None for no byte budget")
    if keep_versions is not None and keep_versions < 1:
        raise ConfigurationError(f"keep_versions={keep_versions}: keep at least 1 version, or None for all")
    if not heartbeat_interval > 0:
        raise ConfigurationError(f"heartbeat_interval={heartbeat_interval}: use a positive number of seconds")
    if resume_after < 0:
        raise ConfigurationError(f"resume_after={resume_after}: versions are non-negative")
