"""The ways a consumer loads a version into its idle standby model, one function per route.

Each returns a `Loaded` (transfer seconds, verify seconds, bytes moved) and raises a ViperError
naming what failed, so the subscriber can fall back to the next route."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy
import torch
import zmq

from .._buffers import copy_from_bytes, copy_tensor
from .._errors import IntegrityError, ProtocolError, TransferError
from ..storage._pfs import FileSystemTier
from ..storage._shm import ZeroCopyMappings, ReadOnlyMappings, LockedMapping
from ..transport._collective import CollectiveClient
from ..transport._cuda_ipc import import_cuda_tensor
from ..transport._fetch import FetchClient
from ..transport._protocol import Location, Notice

__all__ = ["Loaded", "load_from_segment", "load_from_peer", "load_from_collective", "load_from_device",
           "load_from_files", "load_tensors", "ZeroCopyWeights"]


class Loaded(NamedTuple):
    """What one load cost: seconds moving the bytes (the copy into the model included), seconds
    verifying them, and the bytes read from the version's source (all of them, but the blocks
    that changed for a delta, and none for a mapping)."""

    transfer_s: float
    verify_s: float
    moved_bytes: int

Loader = Callable[[Notice, Location, torch.nn.Module], Loaded]


def load_tensors(model: torch.nn.Module, sources: dict[str, torch.Tensor | numpy.ndarray],
                 only: set[str] | None = None) -> None:
    """Copy each source into the model's tensor of that name (tied weights copied once);
    `only`: these names alone (the others hold their bytes already)."""
    loaded: set[int] = set()
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if id(target) in loaded or (only is not None and name not in only):
                continue
            source = sources[name]
            if isinstance(source, numpy.ndarray):
                copy_from_bytes(target, source)
            else:
                copy_tensor(target, source)
            loaded.add(id(target))


def load_from_segment(maps: ReadOnlyMappings, notice: Notice, location: Location,
                      standby: torch.nn.Module) -> Loaded:
    """Same host: map the producer's segment and copy straight into the standby model.

    The segment is the producer's own 0600 memory announced by a (MAC'd) notice, so only the
    layout is checked (done before any route); the seqlock check catches a reused segment."""
    started = time.perf_counter()
    view = maps.view(location.address.removeprefix("shm://"), notice.version, notice.nbytes)
    load_tensors(standby, {spec.name: view.data[spec.offset:spec.offset + spec.nbytes]
                           for spec in notice.layout.tensors})
    view.confirm()
    return Loaded(time.perf_counter() - started, 0.0, notice.nbytes)


def load_from_peer(context: zmq.Context, key: bytes | None, timeout: float, staging: torch.Tensor,
                   notice: Notice, location: Location, standby: torch.nn.Module | None) -> Loaded:
    """Other host (or forced): stream from the producer's fetch endpoint, digest as it lands.
    With no `standby`, only into staging (a host copy, see _host_share)."""
    client = FetchClient(context, location.address, notice.model, key, timeout, producer=notice.producer)
    return _load_streamed(client.fetch_into, notice, staging, standby)


def load_from_collective(timeout: float, key: bytes | None, staging: torch.Tensor, notice: Notice,
                         location: Location, standby: torch.nn.Module | None, *,
                         relay: str | None = None) -> Loaded:
    """torch.distributed point-to-point (Gloo here; NCCL with the GPU tier), digest checked;
    with a key, the answer vouching for the bytes must be signed. `relay`: this consumer's name
    in a relay round with the other hosts loading this version (passing the bytes on)."""
    client = CollectiveClient(location.address, timeout, key, member=relay)
    return _load_streamed(functools.partial(client.fetch_into, relay=relay is not None), notice, staging, standby)


def load_from_device(context: zmq.Context, key: bytes | None, timeout: float, notice: Notice,
                     location: Location, standby: torch.nn.Module) -> Loaded:
    """Same host, GPU tier: lease the producer's device copy over CUDA IPC and copy device to
    device. No digest (it runs on the host copy): a same-user lease, the signed description and
    notice vouch for it."""
    started = time.perf_counter()
    client = FetchClient(context, location.address, notice.model, key, timeout, producer=notice.producer)
    with client.borrow_device_copy(notice.version, notice.nbytes) as description:
        shared = import_cuda_tensor(description)
        if shared.dtype != torch.uint8 or tuple(shared.shape) != (notice.nbytes,):
            raise ProtocolError(f"the producer lent a {tuple(shared.shape)} {shared.dtype} tensor for version "
                                f"{notice.version}; expected ({notice.nbytes},) uint8")
        load_tensors(standby, notice.layout.views(shared))
        torch.cuda.current_stream(shared.device).synchronize()  # done reading before the lease ends
        del shared
    return Loaded(time.perf_counter() - started, 0.0, notice.nbytes)


def _load_streamed(fetch_into: Callable[[int, torch.Tensor, int], tuple[str, float]], notice: Notice,
                   staging: torch.Tensor, standby: torch.nn.Module | None) -> Loaded:
    """A peer streams the version into staging (digesting it); check that digest against the
    notice's; then load `standby` from staging, if there is one."""
    started = time.perf_counter()
    digest, digest_s = fetch_into(notice.version, staging, notice.nbytes)
    if notice.digest is not None and digest != notice.digest:
        raise IntegrityError(f"the producer served digest {digest} for version {notice.version}, "
                             f"but its notice announced {notice.digest}")  # both verified before
    if standby is not None:
        load_tensors(standby, notice.layout.views(staging))
    return Loaded(time.perf_counter() - started - digest_s, digest_s, notice.nbytes)


def load_from_files(pfs: FileSystemTier | None, key: bytes | None, staging: torch.Tensor, notice: Notice,
                    location: Location, standby: torch.nn.Module) -> Loaded:
    """The file-system tier, read into staging with the digest (keyed with a key) checked as it streams."""
    started = time.perf_counter()
    if pfs is not None:
        digest_s = pfs.read_into(notice, staging, key=key)
    else:
        digest_s = _announced_tier(location).read_into(notice, staging, directory=location.address, key=key)
    load_tensors(standby, notice.layout.views(staging))
    return Loaded(time.perf_counter() - started - digest_s, digest_s, notice.nbytes)


def _announced_tier(location: Location) -> FileSystemTier:
    """Without a configured pfs_root, follow the notice, but only to a local absolute path:
    an unauthenticated notice must not make this process open arbitrary URLs."""
    if not os.path.isabs(location.address) or "://" in location.address:
        raise TransferError(f"the notice points at {location.address!r}; set pfs_root to read a "
                            "non-local file-system tier")
    try:
        return FileSystemTier(location.address)
    except ValueError as exc:
        raise ProtocolError(f"file-system location {location.address!r} is not usable: {exc}") from None


class ZeroCopyWeights:
    """The model copies (active and standby) that serve straight from producer segments.

    Zero-copy: instead of copying a version into the standby model, its tensors are rebound to
    views of the segment (see LockedMapping), so N workers on a host share one copy of the weights
    and an update costs a mapping, not a copy. The lock on a copy's segment is held until that
    copy is loaded again, i.e. until no request can still be using it."""

    def __init__(self) -> None:
        self._locks: dict[int, LockedMapping] = {}
        self._retired: list[object] = []
        self._mappings = ZeroCopyMappings()

    def load(self, notice: Notice, location: Location, standby: torch.nn.Module) -> Loaded:
        started = time.perf_counter()
        lock = self._mappings.lock(location.address.removeprefix("shm://"), notice.version, notice.nbytes)
        views = notice.layout.views(lock.buffer)
        with torch.no_grad():
            for name, target in standby.state_dict(keep_vars=True).items():
                self._retired.append(target.data)
                target.data = views[name]
        self._retired.append(self._locks.pop(id(standby), None))
        self._locks[id(standby)] = lock
        return Loaded(time.perf_counter() - started, 0.0, 0)

    def reap(self) -> None:
        """Drop what the last load replaced, after the swap (off the update's critical path).
        The mapping itself usually stays (ZeroCopyMappings), ready for a later version."""
        retired, self._retired = self._retired, []
        locks = [item for item in retired if isinstance(item, LockedMapping)]
        del retired  # the old tensors go first, then the locks that kept their bytes stable
        for lock in locks:
            lock.release()
            self._mappings.retired(lock)

    def housekeeping(self) -> None:
        """Work that no update waits for (checking retired mappings for reuse): when idle."""
        self._mappings.check_retired()

    def unshare(self, model: torch.nn.Module) -> None:
        """Give a copy private memory again before bytes are copied into it."""
        if id(model) not in self._locks:
            return
        with torch.no_grad():
            for target in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values():
                target.data = torch.empty_like(target.data)
        self._release(model)

    def close(self, models: list[torch.nn.Module]) -> None:
        """Give `models` private copies of the weights they view, then let go of the segments: a
        closed subscriber's model must not change when the producer reuses them, nor keep
        deleted segments alive."""
        self.reap()
        with torch.no_grad():
            for model in models:
                if id(model) in self._locks:
                    for target in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values():
                        target.data = target.data.clone()
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()
        self._mappings.close()

    def _release(self, model: torch.nn.Module) -> None:
        lock = self._locks.pop(id(model), None)
        if lock is not None:
            lock.release()
            self._mappings.retired(lock)
