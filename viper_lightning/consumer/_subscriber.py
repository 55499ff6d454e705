"""ModelSubscriber: listens for notices, fetches the newest version into a standby copy,
verifies it, and swaps it in between requests. Bad input is refused and logged; the model
keeps serving the last good version and the subscriber keeps listening."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType

import torch
import zmq

from .._buffers import copy_tensor, ensure_capacity
from .._errors import ConfigurationError, TransferError, ViperError
from .._layout import Layout, check_compatible
from ..producer._publisher import DEFAULT_ENDPOINT
from ..storage._pfs import FileSystemTier
from ..transport._protocol import TIERS, Location, Notice, check_endpoint, check_model_name, normalize_key
from ..transport._pubsub import NoticeListener
from ._slots import Lease, ModelSlots
from ._stats import Refusal, StatsRecorder, SubscriberStats, UpdateRecord

__all__ = ["ModelSubscriber"]

log = logging.getLogger("viper_lightning.subscriber")

_IDLE_WAIT_S = 1.0  # how long one wait for in-flight requests on the standby copy lasts


class ModelSubscriber:
    """Keeps `model` at the newest published version of `model_name`.

    Args:
        model: the serving model; a second copy is made for double buffering.
        model_name: the producer's model name (the notice topic).
        endpoint: the producer's notice endpoint (connected to here).
        pfs_root: the file-system tier as this host sees it; when None, the path in the
            notice is used.
        hmac_key: the producer's shared key; notices and manifests without a valid MAC are refused.
        load_latest: on start, load the newest version found under `pfs_root` (late joiner).
        poll_interval: how long the listener waits per poll (bounds shutdown latency).
        on_update / on_refusal: called on the subscriber thread after each applied or refused update.
        history: how many update and refusal records `stats` keeps.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_name: str,
        endpoint: str = DEFAULT_ENDPOINT,
        pfs_root: str | None = None,
        hmac_key: str | bytes | None = None,
        *,
        load_latest: bool = True,
        poll_interval: float = 0.05,
        on_update: Callable[[UpdateRecord], None] | None = None,
        on_refusal: Callable[[Refusal], None] | None = None,
        history: int = 1000,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not poll_interval > 0:
            raise ConfigurationError(f"poll_interval={poll_interval}: use a positive number of seconds")
        self.model_name = check_model_name(model_name)
        self.endpoint = check_endpoint(endpoint)
        self._key = normalize_key(hmac_key)
        self._pfs = FileSystemTier(pfs_root) if pfs_root is not None else None
        self._load_latest = load_latest
        self._poll_interval = poll_interval
        self._on_update = on_update
        self._on_refusal = on_refusal
        self._expected = Layout.for_state_dict(model.state_dict())
        self._slots = ModelSlots(model)
        self._recorder = StatsRecorder(history)
        self._staging: torch.Tensor | None = None
        self._seen_bad: set[str] = set()
        self._version_changed = threading.Condition()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._context: zmq.Context | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ModelSubscriber:
        """Connect and start following updates (returns once the socket is connected)."""
        if self._thread is None:
            self._context = zmq.Context()
            self._thread = threading.Thread(target=self._run, name=f"viper-subscriber-{self.model_name}",
                                            daemon=True)
            self._thread.start()
            self._listening.wait()
            self._raise_if_failed()
        return self

    def close(self) -> None:
        """Stop listening; raises the subscriber thread's error if it died of one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._context is not None:
            self._context.term()
            self._context = None
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
        return self._slots.version

    @property
    def stats(self) -> SubscriberStats:
        return self._recorder.snapshot()

    @contextmanager
    def serving(self) -> Iterator[torch.nn.Module]:
        """The model for one request; it is never swapped while the block runs."""
        with self._slots.lease() as lease:
            yield lease.model

    def lease(self) -> AbstractContextManager[Lease]:
        """Like `serving()`, but also says which version answers (for responses that name it)."""
        return self._slots.lease()

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Wait until `version` or a newer one is serving; False on timeout."""
        with self._version_changed:
            reached = self._version_changed.wait_for(
                lambda: (self.version or 0) >= version or self._error is not None, timeout)
        self._raise_if_failed()
        return reached

    # -- the subscriber thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            with NoticeListener(self._context, self.endpoint, self.model_name) as listener:
                self._listening.set()
                if self._load_latest and self._pfs is not None:
                    self._load_latest_version()
                while not self._stop.is_set():
                    payloads = listener.receive(self._poll_interval)
                    received_at = time.time()
                    newest = self._newest_acceptable(payloads)
                    if newest is not None:
                        self._update(newest, received_at, "notice")
        except BaseException as exc:  # a bug, not bad input: kept and raised by close()
            self._error = exc
            log.exception("subscriber of %r stopped", self.model_name)
        finally:
            self._listening.set()
            with self._version_changed:
                self._version_changed.notify_all()

    def _load_latest_version(self) -> None:
        try:
            latest = self._pfs.latest(self.model_name)
            if latest is None or latest <= (self.version or 0):
                return
            notice = self._pfs.read_manifest(self.model_name, latest, self._key)
        except ViperError as exc:
            self._refuse(None, f"cannot load LATEST from {self._pfs.root}: {exc}")
            return
        location = Location("pfs", socket.gethostname(), self._pfs.address(self.model_name, latest))
        self._update(notice.with_locations((location,)), time.time(), "LATEST on start")

    def _newest_acceptable(self, payloads: list[bytes]) -> Notice | None:
        """Parse a burst of notices, refuse the bad ones, and keep only the newest (coalescing)."""
        newest: Notice | None = None
        for payload in payloads:
            notice = self._parse(payload)
            if notice is not None and (newest is None or notice.version > newest.version):
                newest = notice
        return newest

    def _parse(self, payload: bytes) -> Notice | None:
        fingerprint = hashlib.blake2b(payload, digest_size=16).hexdigest()
        if fingerprint in self._seen_bad:
            return None  # a heartbeat repeating something already refused
        try:
            notice = Notice.decode(payload, self._key)
            if notice.model != self.model_name:
                raise ViperError(f"notice is for model {notice.model!r}, not {self.model_name!r}")
        except ViperError as exc:
            self._seen_bad.add(fingerprint)
            self._refuse(None, f"refused a notice: {exc}")
            return None
        current = self.version or 0
        if notice.version < current:
            self._seen_bad.add(fingerprint)
            self._refuse(notice.version, f"refused version {notice.version}: older than the "
                                         f"version {current} now serving")
            return None
        return notice if notice.version > current else None

    def _update(self, notice: Notice, received_at: float, reason: str) -> None:
        fingerprint = f"{notice.version}:{notice.digest}"
        if fingerprint in self._seen_bad:
            return
        try:
            record = self._apply(notice, received_at, reason)
        except ViperError as exc:
            self._seen_bad.add(fingerprint)
            self._refuse(notice.version, f"refused version {notice.version}: {exc}")
            return
        self._recorder.applied(record)
        log.info("serving %s v%d from %s (%.1f ms after publish)", self.model_name, record.version,
                 record.tier, record.latency_s * 1e3)
        with self._version_changed:
            self._version_changed.notify_all()
        if self._on_update is not None:
            self._on_update(record)

    def _apply(self, notice: Notice, received_at: float, reason: str) -> UpdateRecord:
        started = time.perf_counter()
        check_compatible(self._expected, notice.layout)
        self._staging = ensure_capacity(self._staging, notice.nbytes)
        tier, digest_s = self._fetch(notice, self._staging)
        fetched = time.perf_counter()
        _load_into(self._wait_for_idle_standby(), notice.layout.views(self._staging))
        self._slots.swap(notice.version)
        swapped = time.perf_counter()
        return UpdateRecord(
            version=notice.version, step=notice.step, tier=tier, nbytes=notice.nbytes,
            discovery_s=max(0.0, received_at - notice.created_at),
            transfer_s=fetched - started - digest_s, verify_s=digest_s, swap_s=swapped - fetched,
            latency_s=max(0.0, time.time() - notice.created_at), reason=reason)

    def _fetch(self, notice: Notice, buffer: torch.Tensor) -> tuple[str, float]:
        """Try each location the notice lists, fastest tier first; the first success wins.

        Returns the tier that delivered and the seconds its digest check took."""
        failures: list[ViperError] = []
        for location in sorted(notice.locations, key=lambda loc: TIERS.index(loc.tier)):
            try:
                return location.tier, self._fetch_from(location, notice, buffer)
            except ViperError as exc:
                failures.append(exc)
                log.warning("fetching %s v%d from %s failed: %s", notice.model, notice.version,
                            location.tier, exc)
        if len(failures) == 1:
            raise failures[0]  # keep its kind: integrity and storage errors say more than "transfer"
        reasons = "; ".join(str(exc) for exc in failures) or "the notice lists no location"
        raise TransferError(f"no tier could deliver it: {reasons}")

    def _fetch_from(self, location: Location, notice: Notice, buffer: torch.Tensor) -> float:
        if location.tier != "pfs":
            raise TransferError(f"the {location.tier} tier is not available to this consumer")
        if self._pfs is not None:
            return self._pfs.read_into(notice, buffer)
        announced = FileSystemTier(location.address)
        return announced.read_into(notice, buffer, directory=announced.root)

    def _wait_for_idle_standby(self) -> torch.nn.Module:
        while not self._stop.is_set():
            standby = self._slots.idle_standby(_IDLE_WAIT_S)
            if standby is not None:
                return standby
            log.warning("a request has held the previous version for over %.0f s; update waits", _IDLE_WAIT_S)
        raise TransferError("subscriber closed while waiting for in-flight requests")

    def _refuse(self, version: int | None, reason: str) -> None:
        log.error("%s: %s (still serving version %s)", self.model_name, reason, self.version)
        refusal = Refusal(version, reason)
        self._recorder.refused(refusal)
        if self._on_refusal is not None:
            self._on_refusal(refusal)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def _load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    loaded: set[int] = set()
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if id(target) not in loaded:  # tied weights appear under several names
                copy_tensor(target, tensors[name])
                loaded.add(id(target))

