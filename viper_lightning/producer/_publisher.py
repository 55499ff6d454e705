"""ModelPublisher: snapshot into the tiered store, announce, flush in the background.
Framework-agnostic; ViperCallback is a thin Lightning layer over it."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Mapping
from types import TracebackType

import torch
import zmq

from .._errors import ConfigurationError, ViperError
from .._layout import Layout
from .._priority import BACKGROUND_NICENESS
from .._shards import PartInfo
from ..storage._keys import load_or_create_key
from ..storage._pfs import FileSystemTier
from ..transport._collective import CollectiveServer, parse_address
from ..transport._fetch import FetchServer
from ..transport._reports import ConsumerReport, ReadyBoard, ReportBox
from ._announcer import Announcer
from ._cascade import Cascade
from ._catalog import CommitRecord, VersionCatalog, VersionRecord
from ._demoter import Demoter
from ._device import BusyError, DeviceTier
from ._flusher import Flusher
from ._health import FILE_SYSTEM_TIER, Health
from ._lender import MemoryLender
from ._notices import NoticeBoard
from ._reservations import VersionReservations
from ._settings import DEFAULT_ENDPOINT, DEFAULT_FETCH_ENDPOINT, DEFAULT_FLUSH_DELAY_S, PublisherSettings
from ._store import TieredStore
from ._switcher import DEFAULT_TOGETHER_DEADLINE_S, Switcher

__all__ = ["ModelPublisher", "CommitRecord", "DEFAULT_ENDPOINT", "DEFAULT_FETCH_ENDPOINT"]

log = logging.getLogger("viper_lightning.publisher")



class ModelPublisher:
    """Publishes versions of one model to consumers.

    The caller waits only for one copy of the weights into a reused slot (a shared-memory
    segment when the DRAM tier is on). The version is announced as soon as it is in memory;
    a background flusher writes it to the file-system tier and announces it again with that
    location. Failures of background threads are kept (see `health`) and raised by the next
    `publish`, `flush` or `close`.

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
        on_tier_error: what a failed write to the file-system tier does. "degrade" (default):
            the version stays in memory, the tier retries with backoff, and `health` reports it;
            training goes on. "raise": the next publish, flush or close raises it.
        allow_keyless: without `hmac_key`, sign nothing and serve anyone (an explicit opt-out,
            logged). By default a publisher without a key creates one for the model on this host
            (`/dev/shm/viper-key.<model>`, mode 0600), which same-user consumers here read.
        keep_every_version: write every version to the file system. By default (False) the
            writer skips a version that a newer one replaced before its write started: nobody
            would load it from there, and the write would cost disk bandwidth and CPU beside
            training. `writes_skipped` counts them; the newest version is always written.
            True also makes `publish` wait for a free snapshot slot rather than skip.
        background_niceness: added to the nice value of the flusher's thread, which digests and
            writes versions to the file system (Linux). 0 (default): training's priority. Higher
            values make the write wait for cores training leaves idle; measured on CPU training
            of a big model, it saved the step after a publish 0.3 s in some runs and cost more
            in others, and a model whose steps leave no idle core may see publishes skipped
            while a flush waits (see viper_lightning._priority). Threads that a publish may
            wait for (the slot warmer, the GPU tier's copy down) always run at training's.
        skip_unchanged_frozen: copy a parameter with requires_grad=False into a reused snapshot
            slot, and digest it, only when torch saw it change since that slot took it (its
            storage or version counter moved): a frozen backbone or base model then costs its
            bytes once, not at every publish. Off by default: a write torch does not see
            (through `.data`, as PEFT's adapter merge does, or numpy) would not be published.
            Turn it on for training with frozen parts when nothing writes them that way.
        together: replicas that subscribe with `together=True` switch to each version at once:
            each loads it into standby and reports ready, and a signed switch goes out on the
            notice socket once the replicas waited for are ready (see `together_quorum`).
        together_quorum: ready replicas that suffice for a switch; None (default): every replica
            that was ready for the previous switch (the first switch waits its deadline).
        together_deadline: seconds after a version is announced by which replicas not ready
            are left out of its switch (they swap alone once ready, and say so).
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
        on_tier_error: str = "degrade",
        allow_keyless: bool = False,
        keep_every_version: bool = False,
        background_niceness: int = BACKGROUND_NICENESS,
        skip_unchanged_frozen: bool = False,
        together: bool = False,
        together_quorum: int | None = None,
        together_deadline: float = DEFAULT_TOGETHER_DEADLINE_S,
    ) -> None:
        self.settings = PublisherSettings(
            model_name, endpoint, pfs_root, hmac_key, dram_versions=dram_versions, dram_bytes=dram_bytes,
            gpu_device=gpu_device, fetch_endpoint=fetch_endpoint, collective_endpoint=collective_endpoint,
            keep_versions=keep_versions, heartbeat_interval=heartbeat_interval, flush_delay=flush_delay,
            resume_after=resume_after, host_id=host_id, on_tier_error=on_tier_error, allow_keyless=allow_keyless,
            keep_every_version=keep_every_version, background_niceness=background_niceness,
            skip_unchanged_frozen=skip_unchanged_frozen, together=together, together_quorum=together_quorum,
            together_deadline=together_deadline)
        self.model_name = model_name
        key = _key_for(self.settings)
        host = host_id or socket.gethostname()
        self.producer_id = f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        pfs = pfs_root if isinstance(pfs_root, FileSystemTier) or pfs_root is None else FileSystemTier(pfs_root)
        if pfs is not None:
            _remove_temporaries(pfs, self.model_name)
        first_version = max(resume_after, pfs.highest(self.model_name) if pfs else 0) + 1
        if pfs is None and resume_after == 0:
            log.warning("%s: no pfs_root and no resume_after, so versions start at 1 again; consumers that "
                        "served a previous run refuse them as older. Pass resume_after (ViperCallback does "
                        "from its checkpoint) or a pfs_root.", self.model_name)
        self._health = Health(strict=on_tier_error == "raise")
        reservations = VersionReservations(pfs, self.model_name, first_version, self._health) if pfs else None
        self._catalog = VersionCatalog(self.model_name, host, self.producer_id, first_version, reservations)
        self._closed = False
        self._skipped_publishes = 0
        self._device = DeviceTier(gpu_device) if gpu_device is not None else None
        lends_device_memory = self._device is not None and self._device.on_gpu and key is not None
        self._context = zmq.Context()
        self._reports = ReportBox()
        self._ready = ReadyBoard() if together else None
        with contextlib.ExitStack() as resources:  # unwound here if construction fails, else by close()
            resources.callback(self._context.term)
            if reservations is not None:  # closed after everything that announces
                resources.callback(lambda: reservations.close(self._catalog.handed_out))
            if self._device is not None:
                resources.callback(self._device.close)
            self._store = TieredStore(self.model_name, host, dram_versions=dram_versions, dram_bytes=dram_bytes,
                                      digest_key=key)
            resources.callback(self._store.close)
            resources.callback(self._catalog.close)  # runs first: the store's memory is then unreferenced
            notices = NoticeBoard(self._catalog, self._store, self._device, key, lends_device_memory)
            lender = MemoryLender(self._store, self._device, self._catalog, notices,
                                  lends_device_memory=lends_device_memory)
            serves_memory = dram_versions > 0 or self._device is not None
            fetch = self._start_fetch_server(fetch_endpoint, key, lender) \
                if serves_memory and fetch_endpoint is not None else None
            if fetch is not None:
                resources.callback(fetch.close)
                self._health.add("fetch server", fetch)
            collective = self._start_collective(collective_endpoint, key, lender) \
                if serves_memory and collective_endpoint is not None else None
            if collective is not None:
                resources.callback(collective.close)
                self._health.add("collective server", collective)
            self.fetch_endpoint = fetch.endpoint if fetch else None
            self.collective_endpoint = collective.address if collective else None
            notices.serve_from(self.fetch_endpoint, collective)
            self._announcer = Announcer(self._context, endpoint, self.model_name, heartbeat_interval, notices,
                                        self._catalog, self._health)
            resources.callback(self._announcer.close)
            self._health.add("announcer")
            self._flusher = Flusher(pfs, self.model_name, key, keep_versions, notices=notices,
                                    catalog=self._catalog, store=self._store, announcer=self._announcer,
                                    health=self._health, delay_s=flush_delay if serves_memory else 0.0,
                                    keep_every_version=keep_every_version, niceness=background_niceness) \
                if pfs else None
            if self._flusher is not None:
                resources.callback(self._flusher.close)
                self._health.add(FILE_SYSTEM_TIER)
                self._store.on_starved = self._flusher.hurry
            self._switcher = Switcher(self.model_name, self._ready, self._announcer, quorum=together_quorum,
                                      deadline_s=together_deadline) if self._ready is not None else None
            if self._switcher is not None:
                resources.callback(self._switcher.close)  # it has the announcer switch: closed first
            self._cascade = Cascade(self._catalog, self._store, self._announcer, self._flusher, self._switcher)
            self._demoter = Demoter(self.model_name, self._device, self._store, self._catalog, self._cascade,
                                    self._health, keeps_borrow=self._flusher is not None) if self._device else None
            if self._demoter is not None:
                resources.callback(self._demoter.close)  # it feeds the flusher: drained first
                self._health.add("demoter")
            self._resources = resources.pop_all()
        self.endpoint = self._announcer.endpoint
        # A program that exits without close() still flushes, stops its threads before the
        # interpreter tears them down, and removes its segments.
        atexit.register(_close_at_exit, weakref.ref(self))

    @classmethod
    def from_settings(cls, settings: PublisherSettings) -> ModelPublisher:
        """A publisher with these (already checked) settings."""
        return cls(**{name.name: getattr(settings, name.name) for name in dataclasses.fields(settings)})

    # -- public API ------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The newest version whose tiers are settled and announced, or None."""
        return self._catalog.committed

    @property
    def next_version(self) -> int:
        """The number the next publish gives (unless it names one): above every version given out,
        stored or reserved on the file-system tier, and `resume_after`."""
        return self._catalog.handed_out + 1

    def take_consumer_reports(self) -> list[ConsumerReport]:
        """What consumers reported since the last call (oldest first): each update they applied,
        its publish-to-serving latency and route. Reports come through the fetch endpoint, signed
        when keyed; without one, none arrive."""
        return self._reports.take()

    @property
    def writes_skipped(self) -> int:
        """Versions the file-system writer skipped because a newer one replaced them before
        their write started (see `keep_every_version`)."""
        return self._flusher.skipped if self._flusher is not None else 0

    @property
    def publishes_skipped(self) -> int:
        """Publishes that returned None: every snapshot slot was held (consumers serving from
        it, a flush or a transfer reading it) and the pool was at its limit, so only an
        unbounded wait could have given one (never with `keep_every_version`)."""
        return self._skipped_publishes

    @property
    def last_stall_s(self) -> float | None:
        """How long the training thread waited in the latest publish."""
        return self._catalog.last_stall_s

    @property
    def last_commit(self) -> CommitRecord | None:
        """Where the newest completed version spent its time (stall, digest, file-system write)."""
        return self._catalog.last_commit

    @property
    def health(self) -> dict[str, str]:
        """Each background part ("announcer", "file-system tier", "demoter", "fetch server",
        "collective server"): "ok", "degraded: " (a tier retrying) or "failed: ", and why."""
        return self._health.view()

    def prepare(self, module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Make and fault in the snapshot slots for these weights in the background (the held
        versions, one that consumers may still serve from, one to write into), so that publishes
        copy into warm memory instead of paying a page fault per 4 KiB on the training thread.
        ViperCallback calls it when training starts; without it the first publish makes its
        slot itself."""
        self._store.prepare(Layout.for_state_dict(_state_dict_of(module_or_state_dict)).nbytes)

    def publish(self, module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
                step: int | None = None, epoch: int | None = None, *, wait_for_slot: bool = False,
                version: int | None = None, part: PartInfo | None = None) -> int | None:
        """Snapshot the weights and hand them to the tiers; returns the new version number.

        The training thread copies into a reused slot whose pages are already faulted in (see
        `prepare`); the pool grows off this thread. When every slot is held (consumers serving
        from it, a flush or a transfer reading it) and the pool is at its limit, this publish is
        skipped at once rather than wait for them: it returns None and `publishes_skipped`
        counts it. With `wait_for_slot` (e.g. the last publish of a run) or `keep_every_version`
        it waits for a slot instead.

        `version` gives the number (at least `next_version`; None: the next) and `part` says which
        pieces of a sharded model these weights are: ShardedPublisher numbers the parts of one
        version alike on every rank with them."""
        self._health.raise_if_failed()
        if self._closed:
            raise ViperError(f"publisher of {self.model_name!r} is closed; create a new ModelPublisher")
        if version is not None and version < self.next_version:
            raise ConfigurationError(f"version={version}: {self.model_name!r} has given out versions up to "
                                     f"{self.next_version - 1}; versions only go up")
        state_dict = _state_dict_of(module_or_state_dict)
        frozen = frozenset(name for name, tensor in state_dict.items()
                           if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad) \
            if self.settings.skip_unchanged_frozen else frozenset()
        created_at = time.time()  # latencies are measured from the publish call
        started = time.perf_counter()
        record = VersionRecord(Layout.for_state_dict(state_dict), step, epoch, created_at, part=part)
        if self._device is not None:
            published = self._publish_to_device(state_dict, record, started, version)
            if published is not None:
                return published
        waits = wait_for_slot or self.settings.keep_every_version
        slot = self._store.capture(record.layout, state_dict, frozen=frozen) if waits \
            else self._store.try_capture(record.layout, state_dict, frozen=frozen)
        if slot is None:
            self._skipped_publishes += 1
            log.log(logging.WARNING if self._skipped_publishes in (1, 10, 100, 1000) else logging.INFO,
                    "%s: skipped a publish (%d so far): every snapshot slot is still held (consumers serving "
                    "from it, a flush or a transfer reading it) and the pool is at its limit; training goes "
                    "on, and the next publish carries the newer weights", self.model_name,
                    self._skipped_publishes)
            return None
        version = self._catalog.add(record, version)
        host_copy = self._store.commit(version, record.layout, slot, borrowed=self._flusher is not None)
        self._catalog.published(version, time.perf_counter() - started)
        self._catalog.reached_host(version, host_copy)
        self._cascade.in_host_memory(host_copy)
        return version

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every published version has been through all its tiers and announced.
        False on timeout, or when the file-system tier is degraded (a version it should hold is
        only in memory; `health` says why). A version the writer skipped because a newer one
        replaced it (see `keep_every_version`) counts as through; the newest is always written."""
        if self._flusher is not None:
            self._flusher.hurry()  # no flush_delay (nor backoff) for what the caller waits for
        done = self._catalog.wait_all_finished(timeout, lambda: self._health.first_failure() is not None)
        self._health.raise_if_failed()
        return done and FILE_SYSTEM_TIER not in self._health.degraded()

    def wait_for_subscribers(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until `count` subscriptions have arrived (useful before a first publish)."""
        return self._announcer.wait_for_subscribers(count, timeout)

    def close(self) -> None:
        """Flush what is queued, stop every thread, remove the segments, raise a kept error."""
        if not self._closed:
            self._closed = True
            self._resources.close()
        self._health.raise_if_failed()

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

    # -- internals -------------------------------------------------------------------------
    def _publish_to_device(self, state_dict: Mapping[str, torch.Tensor], record: VersionRecord,
                           started: float, number: int | None) -> int | None:
        """The training thread's part with a GPU tier: a device copy (the host does not wait for
        it on CUDA), announced at once; the demoter copies it on to host memory. None when every
        device copy is still read by a transfer: the caller then copies to host memory itself."""
        # Backpressure: the previous version reaches host memory first, so versions settle in
        # order and a consumer that cannot take GPU routes is never more than one version behind.
        self._demoter.wait_idle()
        try:
            copy = self._device.capture(record.layout, state_dict, timeout=0)
        except BusyError as exc:
            log.info("%s: %s; this version skips the GPU tier", self.model_name, exc)
            return None
        version = self._catalog.add(record, number)
        release = self._device.hold(copy)  # the demoter's, taken before the copy becomes reusable
        self._device.commit(version, copy)
        self._catalog.published(version, time.perf_counter() - started)
        self._announcer.announce(version, final=False)
        self._demoter.submit(version, copy, release)
        return version

    def _start_fetch_server(self, endpoint: str, key: bytes | None, lender: MemoryLender) -> FetchServer:
        server = FetchServer(self._context, endpoint, self.model_name, key, lender, producer=self.producer_id,
                             reports=self._reports, ready=self._ready)
        server.start()
        return server

    def _start_collective(self, endpoint: str, key: bytes | None, lender: MemoryLender) -> CollectiveServer:
        backend, host, port = parse_address(endpoint, any_port=True)
        if backend == "nccl" and (self._device is None or not self._device.on_gpu):
            raise ConfigurationError(f"collective_endpoint {endpoint!r}: NCCL serves the GPU tier's copies; set "
                                     "gpu_device='cuda', or use gloo:// to serve host memory")
        return CollectiveServer(host, port, backend, lender, key)


def _close_at_exit(reference: weakref.ref) -> None:
    publisher = reference()
    if publisher is not None and not publisher._closed:
        try:
            publisher.close()
        except Exception:  # noqa: BLE001 - at exit there is no caller left to raise to
            log.exception("closing the publisher of %r at exit failed", publisher.model_name)


def _key_for(settings: PublisherSettings) -> bytes | None:
    """The configured key; else this host's key of the model (created on first use); else,
    only when asked for, none."""
    if settings.hmac_key is not None:
        return settings.hmac_key
    if not settings.allow_keyless:
        return load_or_create_key(settings.model_name)
    log.warning("%s: keyless (allow_keyless=True): anyone who reaches its endpoints can read these weights, and "
                "consumers believe any notice", settings.model_name)
    return None


def _remove_temporaries(pfs: FileSystemTier, model: str) -> None:
    """What crashed flushes left behind; best effort, since it is only clutter."""
    try:
        removed = pfs.remove_temporaries(model)
    except OSError as exc:
        log.warning("%s: could not remove leftovers of crashed writes under %s: %s", model, pfs.root, exc)
        return
    if removed:
        log.info("%s: removed %d leftovers of crashed writes under %s", model, len(removed), pfs.root)


def _state_dict_of(source: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, torch.nn.Module):
        return source.state_dict(keep_vars=True)  # parameters as such: requires_grad says which are frozen
    if isinstance(source, Mapping):
        return source
    raise ConfigurationError(
        f"publish() takes an nn.Module or a state_dict mapping, got {type(source).__name__}")
