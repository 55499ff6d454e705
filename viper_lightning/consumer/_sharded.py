"""ShardedSubscriber: an unsharded model kept at the newest version every part of a sharded
producer published, assembled from the parts' pieces."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from types import TracebackType

import torch
import zmq

from .._errors import ConfigurationError, IntegrityError, ViperError
from .._layout import Layout
from .._shards import PartInfo, assemble, check_tiling, part_name
from ..storage._keys import read_key
from ..storage._pfs import FileSystemTier
from ..transport._protocol import DEFAULT_ENDPOINT, Notice, Switch, check_endpoint, check_model_name, normalize_key
from ..transport._pubsub import NoticeListener
from ._double_buffer import DoubleBuffer, Lease
from ._stats import Refusal, StatsRecorder, SubscriberStats, UpdateRecord, call_hook
from ._subscriber import ModelSubscriber

__all__ = ["ShardedSubscriber"]

log = logging.getLogger("viper_lightning.subscriber")


@dataclass(frozen=True)
class _Discovered:
    """What the first valid notice (or stored manifest) of a part says about it."""

    info: PartInfo
    layout: Layout


class _PartGate:
    """Holds each part's subscriber at the version it just swapped in until every part has one
    at least as new: parts then meet at one version instead of chasing each other, and the
    last to arrive at a version every part holds, from one run, assembles it. It owns the parts'
    versions. A part with no pieces (a replica's, under HSDP) has no subscriber and never waits."""

    def __init__(self, count: int, stop: threading.Event, complete: Callable[[int, list[UpdateRecord]], None]):
        self._versions = [0] * count
        self._records: list[UpdateRecord | None] = [None] * count
        self._empty: set[int] = set()
        self._ready = False  # every part discovered and the tiling checked
        self._stop = stop
        self._complete = complete
        self._changed = threading.Condition()

    def open(self) -> None:
        """Every part is known and tiles the model: from now on complete versions are assembled."""
        with self._changed:
            self._ready = True
            self._assemble_if_complete()
            self._changed.notify_all()

    def empty(self, index: int) -> None:
        """Part `index` holds no pieces: it is present at every version."""
        with self._changed:
            self._empty.add(index)
            self._changed.notify_all()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def arrived(self, index: int, record: UpdateRecord) -> None:
        """On part `index`'s subscriber thread, after it swapped in `record.version`."""
        with self._changed:
            self._versions[index] = record.version
            self._records[index] = record
            self._assemble_if_complete()
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._stop.is_set() or self._oldest() >= record.version)

    def _oldest(self) -> int:
        return min((v for i, v in enumerate(self._versions) if i not in self._empty), default=0)

    def _assemble_if_complete(self) -> None:
        records = [r for i, r in enumerate(self._records) if i not in self._empty]
        if not self._ready or any(r is None for r in records) or not records:
            return
        first = records[0]
        if all(r.version == first.version and _run_of(r) == _run_of(first) for r in records):
            self._complete(first.version, records)


def _run_of(record: UpdateRecord) -> str | None:
    return record.part.run if record.part is not None else None


class ShardedSubscriber:
    """Keeps an unsharded `model` at the newest version that every part of a ShardedPublisher
    published, applying a version only when all its parts have arrived and verified.

    Each part is followed by its own ModelSubscriber (so every route, the file-system tier,
    changed-blocks-only updates and every refusal work per part as for a whole model). The
    parts' placements come with their first notice (or their stored manifest); they must tile
    every tensor of `model` exactly, or nothing is applied and a refusal says why.

    Args:
        model: the serving model, unsharded (a second copy is made for double buffering).
        model_name: the whole model's name, as given to ShardedPublisher.
        endpoints: each part's notice endpoint, part 0 first (ShardedPublisher.endpoints; with a
            fixed port the publisher's rank r binds that port + r).
        pfs_root, hmac_key, routes, zero_copy, host_id, fetch_timeout, load_latest, poll_interval,
        allow_keyless, history: as for ModelSubscriber, applied to every part.
        on_update / on_refusal: called after each assembled version, and each refusal (of a part
            or of the assembly).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        model_name: str,
        endpoints: Sequence[str] = (DEFAULT_ENDPOINT,),
        pfs_root: str | FileSystemTier | None = None,
        hmac_key: str | bytes | None = None,
        *,
        routes: Sequence[str] | None = None,
        zero_copy: bool = True,
        host_id: str | None = None,
        fetch_timeout: float = 10.0,
        load_latest: bool = True,
        poll_interval: float = 0.05,
        on_update: Callable[[UpdateRecord], None] | None = None,
        on_refusal: Callable[[Refusal], None] | None = None,
        history: int = 1000,
        allow_keyless: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(endpoints, str) or not endpoints:
            raise ConfigurationError("endpoints must list every part's notice endpoint, part 0 first")
        self.model_name = check_model_name(model_name)
        self.endpoints = [check_endpoint(endpoint) for endpoint in endpoints]
        self._names = [part_name(model_name, index, len(self.endpoints)) for index in range(len(self.endpoints))]
        self._key = normalize_key(hmac_key)
        self._allow_keyless = allow_keyless
        self._pfs = pfs_root if isinstance(pfs_root, FileSystemTier) or pfs_root is None else FileSystemTier(pfs_root)
        self._load_latest = load_latest
        self._options = dict(routes=routes, zero_copy=zero_copy, host_id=host_id, fetch_timeout=fetch_timeout,
                             poll_interval=poll_interval, history=history, allow_keyless=allow_keyless)
        self._poll_interval = poll_interval
        self._device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
        self._expected = Layout.for_state_dict(model.state_dict())
        self._buffers = DoubleBuffer(model)
        self._recorder = StatsRecorder(history)
        self._on_update, self._on_refusal = on_update, on_refusal
        self._stop = threading.Event()
        self._gate = _PartGate(len(self.endpoints), self._stop, self._assemble)
        self._parts: list[ModelSubscriber | None] = [None] * len(self.endpoints)
        self._layouts: list[Layout | None] = [None] * len(self.endpoints)  # each part's, fixed once found
        self._tiled: list[PartInfo] | None = None  # the placements last checked to tile the model
        self._refused_tilings: set[int] = set()  # versions whose placements were refused
        self._newest_complete = 0
        self._version_changed = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ShardedSubscriber:
        """Start finding the parts (in the background) and following each one found."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"viper-parts-{self.model_name}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop every part's subscriber; raises a part's or the finder's error, if one died of it."""
        self._stop.set()
        self._gate.wake()
        with self._version_changed:
            self._version_changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        errors = []
        for part in self._parts:
            if part is not None:
                try:
                    part.close()
                except BaseException as exc:  # noqa: BLE001 - close them all, then raise the first
                    errors.append(exc)
        if self._error is not None:
            raise self._error
        if errors:
            raise errors[0]

    def __enter__(self) -> ShardedSubscriber:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- serving ---------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The version answering new requests (every part of it applied), or None before the first."""
        return self._buffers.version

    @property
    def lag(self) -> int:
        """How many versions the one serving is behind the newest any part has applied."""
        return max(0, max((p.version or 0 for p in self._parts if p is not None), default=0) - (self.version or 0))

    @property
    def stats(self) -> SubscriberStats:
        """Assembled versions, and refusals of the parts and of the assembly."""
        return self._recorder.snapshot()

    @property
    def parts(self) -> list[ModelSubscriber | None]:
        """Each part's subscriber, once its first notice has been seen (None before)."""
        return list(self._parts)

    @contextmanager
    def serving(self) -> Iterator[torch.nn.Module]:
        with self._buffers.lease() as lease:
            yield lease.model

    def lease(self) -> AbstractContextManager[Lease]:
        return self._buffers.lease()

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Wait until `version` or a newer one is serving; False on timeout or after close."""
        with self._version_changed:
            reached = self._version_changed.wait_for(
                lambda: (self.version or 0) >= version or self._failure() is not None or self._stop.is_set(),
                timeout)
        failure = self._failure()
        if failure is not None:
            raise failure
        return reached and (self.version or 0) >= version

    def _failure(self) -> BaseException | None:
        """The finder's error, or the first part subscriber's that died of one (a bug)."""
        return self._error or next((p.failure for p in self._parts if p is not None and p.failure), None)

    # -- finding the parts -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            found = self._discover()
            if found is None:
                return
            try:
                self._check_tiling([part.info for part in found])
            except IntegrityError as exc:
                self._refuse(None, f"refused the parts of {self.model_name!r}: {exc}")
                return
            self._gate.open()
        except BaseException as exc:  # a bug, not bad input: kept and raised by close()
            self._error = exc
            log.exception("finding the parts of %r failed", self.model_name)
            with self._version_changed:
                self._version_changed.notify_all()

    def _discover(self) -> list[_Discovered] | None:
        """Each part's placements, from the stored manifests of the newest version every part
        stored (a late joiner loads that version), else from each part's first valid notice;
        each part's subscriber starts as soon as its part is known. None once closed."""
        found: list[_Discovered | None] = [None] * len(self.endpoints)
        stored = self._stored_together()
        if stored is not None:
            version, found = stored
            for index, part in enumerate(found):
                self._follow(index, part, version)
            return found
        with ExitStack() as stack:
            context = zmq.Context()
            stack.callback(context.term)
            listeners = [stack.enter_context(NoticeListener(context, endpoint, name))
                         for endpoint, name in zip(self.endpoints, self._names)]
            while not all(found):
                if self._stop.is_set():
                    return None
                for index, listener in enumerate(listeners):
                    if found[index] is None:
                        found[index] = self._heard(index, listener)
                        if found[index] is not None:
                            self._follow(index, found[index], None)
        return found

    def _stored_together(self) -> tuple[int, list[_Discovered]] | None:
        """The newest version every part has on the file-system tier, and its parts as stored;
        None without one. Each part's own LATEST would not do: a rank that died mid-publish
        leaves its part a version behind the others', and they would never meet."""
        if self._pfs is None or not self._load_latest:
            return None
        try:
            common = set.intersection(*(set(self._pfs.versions(name)) for name in self._names))
            for version in sorted(common, reverse=True):
                keys = [self._part_key(index) for index in range(len(self._names))]
                if any(key is None for key in keys) and not self._allow_keyless:
                    return None
                parts = [self._checked(index, self._pfs.read_manifest(name, version, keys[index]))
                         for index, name in enumerate(self._names)]
                if len({part.info.run for part in parts}) == 1:  # one run's parts, not a mix after a restart
                    return version, parts
        except ViperError as exc:
            self._refuse(None, f"cannot read the stored parts of {self.model_name!r}: {exc}")
        return None

    def _heard(self, index: int, listener: NoticeListener) -> _Discovered | None:
        for payload in listener.receive(self._poll_interval / len(self.endpoints)):
            if Switch.announced_by(payload):
                continue
            key = self._part_key(index)
            if key is None and not self._allow_keyless:
                return None  # the producer creates the key file as it starts: heard again at its next heartbeat
            try:
                return self._checked(index, Notice.decode(payload, key))
            except ViperError as exc:
                self._refuse(None, f"refused a notice of {self._names[index]}: {exc}")
        return None

    def _part_key(self, index: int) -> bytes | None:
        return self._key if self._key is not None or self._allow_keyless else read_key(self._names[index])

    def _checked(self, index: int, notice: Notice) -> _Discovered:
        info = notice.part
        if notice.model != self._names[index] or info is None:
            raise IntegrityError(f"{notice.model!r} v{notice.version} is not part {index} of {len(self.endpoints)} "
                                 f"of {self.model_name!r} (is endpoint {self.endpoints[index]} that part's?)")
        return _Discovered(info, notice.layout)

    def _follow(self, index: int, found: _Discovered, stored_version: int | None) -> None:
        """Start the subscriber of part `index`, into a model holding that part's pieces (none for
        a part without pieces), loading `stored_version` from the file-system tier first if given."""
        self._layouts[index] = found.layout
        if not found.layout.tensors:
            self._gate.empty(index)
            return

        def refused(refusal: Refusal) -> None:
            self._refuse(refusal.version, f"{self._names[index]}: {refusal.reason}")

        def arrived(record: UpdateRecord) -> None:
            self._gate.arrived(index, record)

        subscriber = ModelSubscriber(_module_for(found.layout, self._device), self._names[index],
                                     self.endpoints[index], self._pfs, self._key, on_update=arrived,
                                     on_refusal=refused, load_latest=stored_version is not None,
                                     load_version=stored_version, **self._options)
        self._parts[index] = subscriber.start()

    # -- assembling ------------------------------------------------------------------------
    def _assemble(self, version: int, records: list[UpdateRecord]) -> None:
        """On the thread of the part that completed `version`: copy every part's pieces, placed as
        that version's own notices say, into the standby model and swap it in. The other parts'
        threads are held by the gate meanwhile."""
        if version <= (self.version or 0) or version in self._refused_tilings:
            return
        infos = [record.part for record in records]
        try:
            if any(info is None for info in infos):
                raise IntegrityError("a part's notice does not say where its pieces go")
            self._check_tiling(infos)
        except IntegrityError as exc:
            self._refused_tilings.add(version)
            self._refuse(version, f"refused version {version} of {self.model_name!r}: {exc}")
            return
        started = time.perf_counter()
        with ExitStack() as leases:
            held = [leases.enter_context(part.lease()) for part in self._parts if part is not None]
            if any(lease.version != version for lease in held):
                return  # a part moved on meanwhile (cannot happen while the gate holds them): not complete
            standby = self._buffers.wait_idle_standby(self._stop, self.model_name)
            if standby is None:
                return
            assemble(standby.state_dict(), [(info, lease.model.state_dict()) for info, lease in zip(infos, held)])
        swap_started = time.perf_counter()
        self._buffers.swap(version)
        now = time.time()
        created_at = min(record.swapped_at - record.latency_s for record in records)
        record = UpdateRecord(
            version=version, step=records[0].step, route="+".join(sorted({r.route for r in records})),
            nbytes=sum(r.nbytes for r in records), discovery_s=max(r.discovery_s for r in records),
            transfer_s=max(r.transfer_s for r in records) + (swap_started - started),
            verify_s=max(r.verify_s for r in records), swap_s=time.perf_counter() - swap_started,
            latency_s=max(0.0, now - created_at), trigger="parts",
            why=f"all {len(records)} parts of version {version} applied and verified; assembled here",
            swapped_at=now, moved_bytes=sum(r.moved_bytes for r in records))
        self._recorder.applied(record)
        log.info("serving %s v%d, assembled from %d parts (%.1f ms after publish)", self.model_name, version,
                 len(records), record.latency_s * 1e3)
        with self._version_changed:
            self._version_changed.notify_all()
        call_hook(self._on_update, record, self.model_name)

    def _check_tiling(self, infos: list[PartInfo]) -> None:
        """check_tiling of these placements with the parts' layouts, unless they are the ones
        last checked (a part without pieces adds nothing to the tiling)."""
        if infos != self._tiled:
            check_tiling(self._expected, [(info, self._layouts[info.index]) for info in infos])
            self._tiled = list(infos)

    def _refuse(self, version: int | None, reason: str) -> None:
        log.error("%s: %s (still serving version %s)", self.model_name, reason, self.version)
        refusal = Refusal(version, reason)
        self._recorder.refused(refusal)
        call_hook(self._on_refusal, refusal, self.model_name)


def _module_for(layout: Layout, device: torch.device) -> torch.nn.Module:
    """A module whose state_dict has exactly the layout's names, shapes and dtypes (tied names
    share one tensor, as the producer's do), to receive one part."""
    root = torch.nn.Module()
    shared: dict[str, torch.Tensor] = {}
    aliases = layout.aliases()
    for spec in layout.tensors:
        stored = aliases.get(spec.name, spec.name)
        if stored not in shared:
            shared[stored] = torch.zeros(spec.shape, dtype=spec.torch_dtype, device=device)
        owner = root
        *path, leaf = spec.name.split(".")
        for step in path:
            child = getattr(owner, step, None)
            if not isinstance(child, torch.nn.Module):
                child = torch.nn.Module()
                owner.add_module(step, child)
            owner = child
        owner.register_buffer(leaf, shared[stored])
    return root
