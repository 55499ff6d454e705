"""ModelSubscriber: listens for notices, loads the newest version into a standby copy over the
cheapest reachable route, and swaps it in between requests. Bad input is refused and logged;
the model keeps serving the last good version and the subscriber keeps listening."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from types import TracebackType

import torch
import zmq

from .._errors import ConfigurationError, IntegrityError, ProtocolError, StorageError, TransferError, ViperError
from .._layout import Layout, check_compatible
from ..storage._keys import key_file_for, read_key
from ..storage._pfs import FileSystemTier
from ..storage._shm import SHM_DIR
from ..transport._reports import ConsumerReport, ReportSender
from ..transport._protocol import (DEFAULT_ENDPOINT, Location, Notice, Switch, check_endpoint, check_model_name,
                                   normalize_key)
from ..transport._pubsub import NoticeListener
from ._host_share import HostShare
from ._loaders import FROM_OFF_HOST, RouteLoaders
from ._routes import Loaded
from ._planner import Route, RouteKind, TransferPlanner, explain
from ._double_buffer import Lease, DoubleBuffer
from ._stats import Refusal, StatsRecorder, SubscriberStats, UpdateRecord, call_hook
from ._together import DEFAULT_TOGETHER_TIMEOUT_S, TogetherSwitch

__all__ = ["ModelSubscriber"]

log = logging.getLogger("viper_lightning.subscriber")

_REMEMBERED_REFUSALS = 1024  # refused (or served) payloads recognised when heartbeats repeat them
HOST_COPY_WAIT_BPS = 10e6  # a host copy's waiters allow its fetch fetch_timeout plus its bytes at this rate
_BURST_S = 1.0  # the longest a burst of notices is parsed before the newest is applied
_PERMANENT = (ProtocolError, IntegrityError)  # refused for good; storage/transfer errors are retried


class ModelSubscriber:
    """Keeps `model` at the newest published version of `model_name`.

    Args:
        model: the serving model; a second copy is made for double buffering.
        model_name: the producer's model name (the notice topic).
        endpoint: the producer's notice endpoint (connected to here).
        pfs_root: the file-system tier as this host sees it; when None, a notice's file
            location is followed only if it is a local absolute path.
        hmac_key: the producer's shared key; notices, manifests and fetches are authenticated.
        routes: allowed transfer routes ("gpu-ipc", "dram-shm", "host-shm", "gpu-nccl", "relay", "dram-zmq",
            "collective", "pfs"); None allows all. The gpu routes are taken only by a model on a GPU.
            "host-shm" shares a version that comes from off this host among the consumers of the
            model here: the first fetches it into shared memory, the others map it (waiting for
            that fetch up to `fetch_timeout` plus its bytes at 10 MB/s, then fetching on their own).
        zero_copy: on the "dram-shm" route, serve straight from the producer's segment
            (copy-on-write, locked against reuse while in use) instead of copying it; needs a CPU model.
        host_id: this host's name, compared with the notice's to use shared memory (default:
            the host name; it must match the producer's `host_id`).
        fetch_timeout: seconds without progress before a remote fetch is abandoned.
        load_latest: on start, load the newest version found under `pfs_root` (late joiner).
        load_version: with `load_latest`, load this stored version on start instead of the newest
            (ShardedSubscriber loads the newest version that every part stored).
        poll_interval: how long the listener waits per poll (bounds shutdown latency).
        on_update / on_refusal: called on the subscriber thread after each applied or refused update.
        history: how many update and refusal records `stats` keeps.
        planner: the TransferPlanner choosing routes (one with other costs or routes); by
            default one for `host_id` and `routes`.
        allow_keyless: without `hmac_key`, accept unauthenticated notices and weights (an
            explicit opt-out). By default a subscriber without a key uses the key the producer of
            this model created on this host (see viper_lightning.storage._keys) and refuses
            everything until it has it.
        together: switch together with the other replicas of a producer made with
            `together=True`: load each version into standby, report ready, and swap when the
            producer's signed switch comes (`stats.updates[-1].together` says how it went).
        together_timeout: seconds a ready replica waits for the switch before it swaps alone.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_name: str,
        endpoint: str = DEFAULT_ENDPOINT,
        pfs_root: str | FileSystemTier | None = None,
        hmac_key: str | bytes | None = None,
        *,
        routes: Sequence[str] | None = None,
        zero_copy: bool = True,
        host_id: str | None = None,
        fetch_timeout: float = 10.0,
        load_latest: bool = True,
        load_version: int | None = None,
        poll_interval: float = 0.05,
        on_update: Callable[[UpdateRecord], None] | None = None,
        on_refusal: Callable[[Refusal], None] | None = None,
        history: int = 1000,
        planner: TransferPlanner | None = None,
        allow_keyless: bool = False,
        together: bool = False,
        together_timeout: float = DEFAULT_TOGETHER_TIMEOUT_S,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(allow_keyless, bool):
            raise ConfigurationError(f"allow_keyless={allow_keyless!r}: use True or False")
        if not poll_interval > 0 or not fetch_timeout > 0:
            raise ConfigurationError("poll_interval and fetch_timeout must be positive numbers of seconds")
        self.model_name = check_model_name(model_name)
        self.endpoint = check_endpoint(endpoint)
        self._key = normalize_key(hmac_key)
        # where the key comes from: "configured", "host" (this host's key file, re-read if the
        # producer made a new one) or "none" (keyless, the explicit opt-out)
        self._key_source = "configured" if self._key is not None else "none" if allow_keyless else "host"
        if allow_keyless and self._key is None:
            log.warning("%s: keyless (allow_keyless=True): any local user who can bind the producer's port or write "
                        "under pfs_root can have their weights served here", self.model_name)
        self._pfs = pfs_root if isinstance(pfs_root, FileSystemTier) or pfs_root is None else FileSystemTier(pfs_root)
        device = _device_of(model)
        self._planner = planner if planner is not None else \
            TransferPlanner(host_id or socket.gethostname(), routes, on_gpu=_is_cuda(device))
        self._load_latest = load_latest
        self._load_version = load_version
        self._poll_interval = poll_interval
        self._on_update, self._on_refusal = on_update, on_refusal
        self._expected = Layout.for_state_dict(model.state_dict())
        self._buffers = DoubleBuffer(model)
        self._recorder = StatsRecorder(history)
        name = f"{self._planner.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # in relay rounds and ready reports
        self._loaders = RouteLoaders(device, self._pfs, self._key, fetch_timeout, self._expected.nbytes,
                                     zero_copy=zero_copy, member=name)
        self._together = TogetherSwitch(name, together_timeout) if together else None
        self._listener: NoticeListener | None = None  # the subscriber thread's, while it runs
        self._refused: OrderedDict[str, None] = OrderedDict()
        self._newest_announced = 0
        self._version_changed = threading.Condition()
        self._stop = threading.Event()
        self._share = HostShare(self.model_name, self._planner.host,
                                fetch_timeout + self._expected.nbytes / HOST_COPY_WAIT_BPS, self._stop) \
            if RouteKind.HOST_SHM in self._planner.allowed and os.path.isdir(SHM_DIR) else None
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._context: zmq.Context | None = None
        self._report_sender: ReportSender | None = None  # the subscriber thread's, while it runs
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ModelSubscriber:
        """Connect and start following updates (returns once the socket is connected)."""
        if self._thread is None:
            self._join_host()
            self._context = self._loaders.context = zmq.Context()
            self._thread = threading.Thread(target=self._run, name=f"viper-subscriber-{self.model_name}",
                                            daemon=True)
            self._thread.start()
            self._listening.wait()
            if self._error is not None:
                self.close()
        return self

    def _join_host(self) -> None:
        """List this consumer among the model's consumers here, so that they share host copies."""
        if self._share is None:
            return
        try:
            self._share.join()
        except OSError as exc:
            log.warning("%s: cannot list this consumer in %s (%s); it will not share host copies",
                        self.model_name, SHM_DIR, exc.strerror)
            self._share = None

    def close(self) -> None:
        """Stop listening; raises the subscriber thread's error if it died of one."""
        self._stop.set()
        with self._version_changed:
            self._version_changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._context is not None:
            self._context.term()
            self._context = self._loaders.context = None
        self._loaders.close(self._buffers.models())
        if self._share is not None:
            self._share.leave()
        self._raise_if_failed()

    def __enter__(self) -> ModelSubscriber:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- serving ---------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The version answering new requests, or None before the first update."""
        return self._buffers.version

    @property
    def failure(self) -> BaseException | None:
        """The error the subscriber thread died of (a bug, not bad input), or None."""
        return self._error

    @property
    def lag(self) -> int:
        """How many versions the one serving is behind the newest valid notice seen."""
        return max(0, self._newest_announced - (self.version or 0))

    @property
    def stats(self) -> SubscriberStats:
        return self._recorder.snapshot()

    @contextmanager
    def serving(self) -> Iterator[torch.nn.Module]:
        """The model for one request; it is never swapped while the block runs."""
        with self._buffers.lease() as lease:
            yield lease.model

    def lease(self) -> AbstractContextManager[Lease]:
        """Like `serving()`, but also says which version answers (for responses that name it)."""
        return self._buffers.lease()

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Wait until `version` or a newer one is serving; False on timeout or after close."""
        with self._version_changed:
            reached = self._version_changed.wait_for(
                lambda: (self.version or 0) >= version or self._error is not None or self._stop.is_set(),
                timeout)
        self._raise_if_failed()
        return reached and (self.version or 0) >= version

    # -- the subscriber thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            with NoticeListener(self._context, self.endpoint, self.model_name) as listener, \
                    closing(ReportSender(self._context)) as reports:
                self._report_sender, self._listener = reports, listener
                self._listening.set()
                if self._load_latest and self._pfs is not None:
                    self._load_latest_version()
                while not self._stop.is_set():
                    newest = self._newest_acceptable(listener.receive(self._poll_interval))
                    if newest is not None:
                        self._update(*newest, "notice")
                    elif listener.idle:  # no message for a whole poll: work no update waits for
                        self._housekeeping()
        except BaseException as exc:  # a bug, not bad input: kept and raised by close()
            self._error = exc
            log.exception("subscriber of %r stopped", self.model_name)
        finally:
            self._listening.set()
            with self._version_changed:
                self._version_changed.notify_all()

    def _housekeeping(self) -> None:
        self._loaders.housekeeping()
        if self._share is not None and self.version is not None:
            try:
                self._share.remove_unused(below=self.version)  # the host copies nobody serves from any more
            except OSError as exc:  # e.g. /dev/shm unreadable for a moment: the next idle poll tries again
                log.debug("%s: could not tidy the host copies: %s", self.model_name, exc)

    def _load_latest_version(self) -> None:
        try:
            latest = self._load_version or self._pfs.latest(self.model_name)
            if latest is None or latest <= (self.version or 0):
                return
            notice = self._stored(latest)
        except ViperError as exc:
            self._refuse(None, f"cannot load LATEST from {self._pfs.root}: {exc}")
            return
        self._update(notice, time.time(), "LATEST on start")

    def _stored(self, version: int) -> Notice:
        """The signed manifest of `version` on the file-system tier, located there."""
        notice = self._pfs.read_manifest(self.model_name, version, self._verifying_key())
        location = Location("pfs", self._planner.host, self._pfs.address(self.model_name, version))
        return notice.with_locations((location,))

    def _verifying_key(self) -> bytes | None:
        """The key notices, manifests and fetches are checked with: the configured one, else (unless
        keyless) the one this host's producer of the model created, read once it exists."""
        if self._key is None and self._key_source == "host":
            self._key = read_key(self.model_name)
            if self._key is None:
                raise ConfigurationError(f"no key yet for {self.model_name!r}: the producer creates "
                                         f"{key_file_for(self.model_name)} when it starts; on another host, "
                                         "set hmac_key")
            self._loaders.key = self._key
        return self._key

    def _decode(self, payload: bytes, key: bytes | None) -> Notice:
        """Notice.decode; with this host's key, once more with the key file's current key when the
        MAC does not match (the producer made a new key after the file was lost)."""
        try:
            return Notice.decode(payload, key)
        except ProtocolError as exc:
            if exc.code != "forged" or self._key_source != "host":
                raise
            renewed = read_key(self.model_name)
            if renewed is None or renewed == key:
                raise
            notice = Notice.decode(payload, renewed)
            log.warning("%s: the producer's key file changed; following the new key", self.model_name)
            self._key = self._loaders.key = renewed
            return notice

    def _newest_acceptable(self, payloads: Iterator[bytes]) -> tuple[Notice, float] | None:
        """Parse a burst of notices as they arrive, refuse the bad ones, keep only the newest.
        Each distinct notice is parsed once per burst, and a burst ends after _BURST_S: a big
        model's notice can take longer to parse than its heartbeat takes to come again."""
        newest: tuple[Notice, float] | None = None
        seen: set[str] = set()
        ends = time.monotonic() + _BURST_S
        for payload in payloads:
            if Switch.announced_by(payload):  # for replicas that switch together; others ignore it
                self._note_switch(payload)
                continue
            received_at = time.time()
            fingerprint = hashlib.blake2b(payload, digest_size=16).hexdigest()
            notice = self._parse(payload, fingerprint) if fingerprint not in seen else None
            seen.add(fingerprint)
            # the later of two notices of one version lists its tiers as they are now
            if notice is not None and (newest is None or notice.version >= newest[0].version):
                newest = (notice, received_at)
            if time.monotonic() > ends:
                break
        return newest

    def _note_switch(self, payload: bytes) -> None:
        if self._together is None:
            return
        try:
            key = self._verifying_key()
        except ConfigurationError:  # no key yet: nothing this replica could have loaded either
            return
        self._together.note(payload, key, self.model_name)

    def _await_switch(self, notice: Notice) -> str | None:
        """For a replica that switches together: report ready, wait for the switch (see _together)."""
        if self._together is None or self._listener is None:
            return None
        how = self._together.wait(notice, self._listener.receive, lambda: self._report_ready(notice), self._stop,
                                  self._poll_interval, self._verifying_key())
        if how == "alone":
            log.warning("%s v%d: no switch from the producer within %.0f s of being ready; swapping alone (is the "
                        "producer made with together=True, and is its fetch endpoint reachable for reports?)",
                        self.model_name, notice.version, self._together.timeout)
        return how

    def _parse(self, payload: bytes, fingerprint: str) -> Notice | None:
        if fingerprint in self._refused:
            return None  # a heartbeat repeating something already refused, or already served
        try:
            key = self._verifying_key()
        except ConfigurationError as exc:  # e.g. no key file yet: the producer may still be starting
            self._refuse(None, f"refused a notice: {exc}")
            return None
        try:
            notice = self._decode(payload, key)
        except Exception as exc:  # noqa: BLE001 - any parse failure is bad input, never fatal
            self._remember_refused(fingerprint)
            self._refuse(None, f"refused a notice: {exc}")
            return None
        if notice.model != self.model_name:  # a key shared between models must not cross them
            self._remember_refused(fingerprint)
            self._refuse(notice.version, f"refused a notice for model {notice.model!r}: this subscriber serves "
                                         f"{self.model_name!r}")
            return None
        self._newest_announced = max(self._newest_announced, notice.version)
        current = self.version or 0
        if notice.version < current:
            self._remember_refused(fingerprint)
            self._refuse(notice.version, f"refused version {notice.version}: older than the "
                                         f"version {current} now serving")
            return None
        if notice.version == current:
            self._remember_refused(fingerprint)  # the heartbeat of what serves: no need to parse it again
            return None
        return notice

    def _update(self, notice: Notice, received_at: float, trigger: str) -> None:
        fingerprint = f"{notice.version}:{notice.digest}:{notice.layout.nbytes}"
        if fingerprint in self._refused:
            return
        try:
            record = self._apply(notice, received_at, trigger)
        except Exception as exc:  # noqa: BLE001 - a bad update must never stop the subscriber
            if isinstance(exc, TransferError) and exc.code == "gone" and not exc.tiers:
                log.warning("%s: skipped version %d: no tier holds it any more (a newer one replaced it before "
                            "it could be fetched)", self.model_name, notice.version)
                return
            if not isinstance(exc, ViperError) or isinstance(exc, _PERMANENT):
                self._remember_refused(fingerprint)  # a retry on the next heartbeat could not help
            if not isinstance(exc, ViperError):
                log.exception("unexpected error while applying %s v%d", self.model_name, notice.version)
            self._refuse(notice.version, f"refused version {notice.version}: {exc}")
            return
        self._recorder.applied(record)
        log.info("serving %s v%d via %s (%.1f ms after publish)", self.model_name, record.version,
                 record.route, record.latency_s * 1e3)
        with self._version_changed:
            self._version_changed.notify_all()
        call_hook(self._on_update, record, self.model_name)
        if trigger == "notice" and self._recorder.snapshot().applied > 1:
            # a joiner's first update measures how late it joined, not how long a load takes
            self._report_to_producer(notice, record)

    def _apply(self, notice: Notice, received_at: float, trigger: str) -> UpdateRecord:
        check_compatible(self._expected, notice.layout)
        routes = self._planner.routes(notice)
        if not routes:
            allowed = [str(kind) for kind in self._planner.allowed]
            raise TransferError(f"none of its locations is reachable over the allowed routes {allowed}: "
                                f"{[loc.to_json() for loc in notice.locations]}")
        standby = self._wait_for_idle_standby()
        try:
            route, why, loaded = self._load(notice, routes, standby)
        except (TransferError, StorageError) as exc:
            durable = self._durable_copy(notice)
            if durable is None:
                raise
            route, why, loaded = self._load(durable, self._planner.routes(durable), standby)
            why = f"the announced routes failed ({exc}); read the file-system tier's copy instead"
        together = self._await_switch(notice)
        swap_started = time.perf_counter()
        self._buffers.swap(notice.version)
        swapped_at = time.time()
        record = UpdateRecord(
            version=notice.version, step=notice.step, route=route.kind.value, nbytes=notice.nbytes,
            discovery_s=max(0.0, received_at - notice.created_at), transfer_s=loaded.transfer_s,
            verify_s=loaded.verify_s, swap_s=time.perf_counter() - swap_started, moved_bytes=loaded.moved_bytes,
            latency_s=max(0.0, time.time() - notice.created_at), trigger=trigger, why=why, swapped_at=swapped_at,
            together=together, part=notice.part)
        self._loaders.after_swap()
        return record

    def _load(self, notice: Notice, routes: list[Route], standby: torch.nn.Module) -> tuple[Route, str, Loaded]:
        """Try the routes cheapest first; the first that delivers wins. A version that comes
        from off this host comes through the host's shared copy when allowed (see _host_share)."""
        failures: list[ViperError] = []
        if self._share is not None and routes and routes[0].kind in FROM_OFF_HOST:
            shared = self._load_shared(notice, routes, standby, failures)
            if shared is not None:
                return shared
            routes = [route for route in routes if route.kind not in FROM_OFF_HOST or not failures]

        def load(route: Route) -> Loaded:
            self._loaders.before(route.kind, standby)
            return self._loaders.loader(route.kind)(notice, route.location, standby)

        delivered = self._first_delivering(notice, routes, failures, load)
        if delivered is not None:
            route, loaded = delivered
            return route, explain(route, routes, [str(f) for f in failures]), loaded
        if len(failures) == 1:
            raise failures[0]  # keep its kind: integrity and storage errors say more than "transfer"
        gone = any(isinstance(f, TransferError) and f.code == "gone" and not f.tiers for f in failures)
        raise TransferError("every route failed: " + "; ".join(str(f) for f in failures),
                            code="gone" if gone else None)  # gone: the producer says no tier holds it

    def _load_shared(self, notice: Notice, routes: list[Route], standby: torch.nn.Module,
                     failures: list[ViperError]) -> tuple[Route, str, Loaded] | None:
        """Through the host copy: map another consumer's, or fetch it for every consumer here
        (by the routes from off the host, cheapest first) and then map it. None when it could
        not be done; `failures` then says which fetches failed (each was tried once)."""
        claim = self._share.claim(notice)
        if claim is None:
            return None
        if isinstance(claim, Location):  # another consumer here fetched it
            route = Route(RouteKind.HOST_SHM, claim, self._planner.estimate(RouteKind.HOST_SHM, notice.nbytes))
            try:
                loaded = self._map_host_copy(notice, claim, standby)
            except ViperError as exc:
                log.warning("%s v%d: the host copy failed (%s); fetching it for this consumer", notice.model,
                            notice.version, exc)
                return None
            return route, f"another consumer on this host fetched it ({claim.address})", loaded
        with claim:
            delivered = self._first_delivering(
                notice, [route for route in routes if route.kind in FROM_OFF_HOST], failures,
                lambda route: self._loaders.fetcher(route.kind, claim.buffer)(notice, route.location))
            if delivered is None:
                return None
            route, fetched = delivered
            claim.publish()
        try:
            mapped = self._map_host_copy(notice, claim.location, standby)
        except ViperError as exc:  # removed meanwhile, say: the routes are tried again, into private memory
            log.warning("%s v%d: could not map the host copy just fetched (%s); fetching it again",
                        notice.model, notice.version, exc)
            return None
        why = explain(route, routes, [str(f) for f in failures]) + f"; shared on this host as {claim.location.address}"
        return route, why, fetched._replace(transfer_s=fetched.transfer_s + mapped.transfer_s)

    def _first_delivering(self, notice: Notice, routes: list[Route], failures: list[ViperError],
                          attempt: Callable[[Route], Loaded]) -> tuple[Route, Loaded] | None:
        """`attempt(route)` on each route in turn, cheapest first: the first that delivers wins,
        and its speed is learned; each failure is logged and added to `failures`."""
        for route in routes:
            try:
                loaded = attempt(route)
            except ViperError as exc:
                failures.append(exc)
                log.warning("%s v%d via %s failed, trying the next route: %s", notice.model,
                            notice.version, route.kind, exc)
                continue
            self._planner.observe(route.kind, loaded.moved_bytes, loaded.transfer_s + loaded.verify_s)
            return route, loaded
        return None

    def _map_host_copy(self, notice: Notice, location: Location, standby: torch.nn.Module) -> Loaded:
        self._loaders.before(RouteKind.HOST_SHM, standby)
        return self._loaders.loader(RouteKind.HOST_SHM)(notice, location, standby)

    def _report_to_producer(self, notice: Notice, record: UpdateRecord) -> None:
        """Tell the producer (its fetch endpoint, if the notice names one) how long this update
        took to serve: its schedule plans with that. One-way, it never waits."""
        endpoint = _fetch_endpoint_of(notice)
        if endpoint is not None and self._report_sender is not None:
            self._report_sender.send(endpoint, self.model_name, self._key,
                                     ConsumerReport(record.version, record.latency_s, record.route))

    def _report_ready(self, notice: Notice) -> None:
        """Tell the producer this replica has `notice`'s version loaded (one-way)."""
        endpoint = _fetch_endpoint_of(notice)
        if endpoint is not None and self._report_sender is not None and self._together is not None:
            self._report_sender.ready(endpoint, self.model_name, self._key, notice.version, self._together.name)

    def _durable_copy(self, notice: Notice) -> Notice | None:
        """The version as the file-system tier holds it, when the notice predates its write (the
        producer may have exited since, taking its memory tiers); None when it is not there (yet)."""
        if (self._pfs is None or RouteKind.PFS not in self._planner.allowed
                or any(location.tier == "pfs" for location in notice.locations)):
            return None
        try:
            stored = self._stored(notice.version)
        except (TransferError, StorageError):
            return None
        same = (stored.producer == notice.producer and stored.step == notice.step and stored.layout == notice.layout
                and notice.digest in (None, stored.digest))
        if not same:  # e.g. a signed copy from another run with the same key, put there by a storage writer
            raise IntegrityError(f"version {notice.version} on the file-system tier at {self._pfs.root} is not the "
                                 f"version the notice announced (producer {stored.producer!r} at step {stored.step}, "
                                 f"announced: {notice.producer!r} at step {notice.step})")
        return stored

    def _wait_for_idle_standby(self) -> torch.nn.Module:
        standby = self._buffers.wait_idle_standby(self._stop, self.model_name)
        if standby is None:
            raise TransferError("subscriber closed while waiting for in-flight requests")
        return standby

    def _remember_refused(self, fingerprint: str) -> None:
        self._refused[fingerprint] = None
        while len(self._refused) > _REMEMBERED_REFUSALS:
            self._refused.popitem(last=False)

    def _refuse(self, version: int | None, reason: str) -> None:
        log.error("%s: %s (still serving version %s)", self.model_name, reason, self.version)
        refusal = Refusal(version, reason)
        self._recorder.refused(refusal)
        call_hook(self._on_refusal, refusal, self.model_name)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _device_of(model: torch.nn.Module) -> torch.device | None:
    """Where the model's weights live; None for a model split across devices (it loads
    through the host routes, copying each tensor to its own device)."""
    devices = {tensor.device for tensor in model.state_dict().values()} or {torch.device("cpu")}
    return devices.pop() if len(devices) == 1 else None


def _is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def _fetch_endpoint_of(notice: Notice) -> str | None:
    """The producer's fetch endpoint, where reports go, if the notice names one."""
    return next((location.address for location in notice.locations
                 if location.tier == "dram" and location.address.startswith("tcp://")), None)
