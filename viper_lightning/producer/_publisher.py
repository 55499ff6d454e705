"""ModelPublisher: snapshot, store in the tiers, then announce. Framework-agnostic."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import torch
import zmq

from .._digest import digest_buffer
from .._errors import ConfigurationError, ViperError
from ..storage._pfs import FileSystemTier
from ..transport._protocol import Location, Notice, check_endpoint, check_model_name, normalize_key
from ..transport._pubsub import NoticeBroadcaster
from ._snapshot import Snapshot, SnapshotPool

__all__ = ["ModelPublisher", "CommitRecord", "DEFAULT_ENDPOINT"]

log = logging.getLogger("viper_lightning.publisher")

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
_POLL_S = 0.02  # how often the writer looks for new subscribers while idle
_STOP = object()


@dataclass
class _Job:
    version: int
    step: int | None
    epoch: int | None
    created_at: float
    snapshot: Snapshot
    stall_s: float


@dataclass(frozen=True)
class CommitRecord:
    """Where one publish spent its time, in seconds: the training thread waited only `stall_s`;
    the writer thread spent the rest."""

    version: int
    stall_s: float
    digest_s: float
    store_s: float
    notify_s: float


class ModelPublisher:
    """Publishes versions of one model: the caller waits only for a copy into a reused buffer;
    a background writer digests it, commits it to the storage tiers and only then sends the
    notice. A failure of the writer is kept and raised by the next `publish`, `flush` or `close`.

    Args:
        model_name: the model's name: the ZeroMQ topic and the directory under `pfs_root`.
        endpoint: where notices are published (bound here). Loopback by default; use
            `tcp://127.0.0.1:*` for a free port and read `endpoint` afterwards.
        pfs_root: the file-system tier (a path or any fsspec URL). Required until the memory
            tiers exist, since a notice must point at a tier that holds the bytes.
        hmac_key: shared key (16+ bytes) signing every notice and manifest.
        keep_versions: versions kept on the file system (None keeps all).
        heartbeat_interval: seconds between repeats of the latest notice, so consumers that
            lost a notice (ZeroMQ drops silently) still converge.
        resume_after: versions start above this (and above any version already stored).
        host_id: this host's name in notices (default: the host name).
        buffers: snapshot buffers; with 2 the trainer fills one while the writer drains the other.
    """

    def __init__(
        self,
        model_name: str,
        endpoint: str = DEFAULT_ENDPOINT,
        pfs_root: str | None = None,
        hmac_key: str | bytes | None = None,
        *,
        keep_versions: int | None = None,
        heartbeat_interval: float = 1.0,
        resume_after: int = 0,
        host_id: str | None = None,
        buffers: int = 2,
    ) -> None:
        self.model_name = check_model_name(model_name)
        _check_settings(pfs_root, keep_versions, heartbeat_interval, resume_after, buffers)
        self._key = normalize_key(hmac_key)
        self._keep = keep_versions
        self._heartbeat = heartbeat_interval
        self._host = host_id or socket.gethostname()
        self.producer_id = f"{self._host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pfs = FileSystemTier(pfs_root) if pfs_root is not None else None
        stored = self._pfs.highest(self.model_name) if self._pfs else 0
        self._next_version = max(resume_after, stored) + 1
        self._pool = SnapshotPool(buffers)
        self._jobs: queue.Queue[object] = queue.Queue()
        self._state = threading.Condition()
        self._pending = 0
        self._subscriptions = 0
        self._error: BaseException | None = None
        self._committed: int | None = None
        self._closed = False
        self.last_stall_s: float | None = None
        self.last_commit: CommitRecord | None = None
        self._context = zmq.Context()
        self._ready = threading.Event()
        self.endpoint = check_endpoint(endpoint)
        self._writer = threading.Thread(target=self._run, name=f"viper-publisher-{model_name}", daemon=True)
        self._writer.start()
        self._ready.wait()
        if self._error is not None:
            self._shutdown_context()
            raise self._error

    # -- public API ------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The newest version committed and announced, or None."""
        return self._committed

    def publish(self, module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
                step: int | None = None, epoch: int | None = None) -> int:
        """Snapshot the weights and queue them for the tiers; returns the new version number."""
        self._raise_if_failed()
        if self._closed:
            raise ViperError(f"publisher of {self.model_name!r} is closed")
        state_dict = _state_dict_of(module_or_state_dict)
        created_at = time.time()  # latencies are measured from the publish call
        started = time.perf_counter()
        snapshot = self._pool.capture(state_dict)
        self.last_stall_s = time.perf_counter() - started
        with self._state:
            version = self._next_version
            self._next_version += 1
            self._pending += 1
        self._jobs.put(_Job(version, step, epoch, created_at, snapshot, self.last_stall_s))
        return version

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued version is committed and announced; False on timeout."""
        with self._state:
            done = self._state.wait_for(lambda: self._pending == 0 or self._error, timeout)
        self._raise_if_failed()
        return done

    def wait_for_subscribers(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until `count` subscriptions have arrived (useful before a first publish)."""
        with self._state:
            return self._state.wait_for(lambda: self._subscriptions >= count, timeout)

    def close(self) -> None:
        """Commit what is queued, stop the writer, and raise its first error if it had one."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
            self._writer.join()
            self._shutdown_context()
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

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            with NoticeBroadcaster(self._context, self.endpoint) as broadcaster:
                self.endpoint = broadcaster.endpoint
                self._ready.set()
                self._serve(broadcaster)
        except BaseException as exc:  # kept and re-raised on the caller's thread
            self._fail(exc)
        finally:
            self._ready.set()

    def _serve(self, broadcaster: NoticeBroadcaster) -> None:
        latest: bytes | None = None
        last_sent = time.monotonic()
        while True:
            try:
                job = self._jobs.get(timeout=_POLL_S)
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            if isinstance(job, _Job):
                latest = self._commit(job, broadcaster) or latest
                last_sent = time.monotonic()
            joined = broadcaster.new_subscriptions()
            if joined:
                with self._state:
                    self._subscriptions += joined
                    self._state.notify_all()
            due = time.monotonic() - last_sent >= self._heartbeat
            if latest is not None and (joined or due):
                broadcaster.send(self.model_name, latest)
                last_sent = time.monotonic()

    def _commit(self, job: _Job, broadcaster: NoticeBroadcaster) -> bytes | None:
        """Digest, store, announce. Returns the notice sent, or None when the job failed."""
        try:
            if self._error is not None:
                return None
            started = time.perf_counter()
            notice = self._describe(job)
            digested = time.perf_counter()
            notice = notice.with_locations(self._store(notice, job.snapshot))
            stored = time.perf_counter()
            payload = notice.encode(self._key)
            broadcaster.send(self.model_name, payload)
            self._committed = job.version
            self.last_commit = CommitRecord(job.version, job.stall_s, digested - started,
                                            stored - digested, time.perf_counter() - stored)
            return payload
        except BaseException as exc:
            self._fail(exc)
            return None
        finally:
            self._pool.release(job.snapshot)
            with self._state:
                self._pending -= 1
                self._state.notify_all()

    def _describe(self, job: _Job) -> Notice:
        snapshot = job.snapshot
        return Notice(model=self.model_name, version=job.version, nbytes=snapshot.layout.nbytes,
                      digest=digest_buffer(snapshot.data), layout=snapshot.layout,
                      producer=self.producer_id, step=job.step, epoch=job.epoch,
                      created_at=job.created_at)

    def _store(self, notice: Notice, snapshot: Snapshot) -> tuple[Location, ...]:
        """Commit the bytes to each tier; returns the locations that now hold them."""
        locations: list[Location] = []
        if self._pfs is not None:
            manifest = notice.encode(self._key, with_locations=False)
            address = self._pfs.write(notice, snapshot.data, manifest)
            locations.append(Location("pfs", self._host, address))
            if self._keep is not None:
                self._pfs.prune(self.model_name, self._keep)
        return tuple(locations)

    # -- errors ----------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        with self._state:
            if self._error is None:
                self._error = exc
                log.error("publisher of %r failed: %s", self.model_name, exc)
            self._state.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _shutdown_context(self) -> None:
        self._context.term()


def _state_dict_of(source: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    raise ConfigurationError(
        f"publish() takes an nn.Module or a state_dict mapping, got {type(source).__name__}")


def _check_settings(pfs_root: str | None, keep_versions: int | None, heartbeat_interval: float,
                    resume_after: int, buffers: int) -> None:
    if pfs_root is None:
        raise ConfigurationError(
            "pfs_root is None, so no tier would hold the published bytes; pass a directory or "
            "fsspec URL, e.g. pfs_root='/scratch/viper'")
    if keep_versions is not None and keep_versions < 1:
        raise ConfigurationError(f"keep_versions={keep_versions}: keep at least 1 version, or None for all")
    if not heartbeat_interval > 0:
        raise ConfigurationError(f"heartbeat_interval={heartbeat_interval}: use a positive number of seconds")
    if resume_after < 0:
        raise ConfigurationError(f"resume_after={resume_after}: versions are non-negative")
    if buffers < 1:
        raise ConfigurationError(f"buffers={buffers}: at least one snapshot buffer is needed")
