"""RouteLoaders: for one consumer, the function that loads a version by each route, with the
buffers those functions reuse from one update to the next."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import zmq

from .._buffers import ensure_capacity
from ..storage._pfs import FileSystemTier
from ..storage._shm import ReadOnlyMappings
from ..transport._protocol import Location, Notice
from ._delta import DeltaLoads
from ._planner import RouteKind
from ._routes import (Loaded, ZeroCopyWeights, load_from_collective, load_from_device, load_from_files,
                      load_from_peer, load_from_segment)

__all__ = ["RouteLoaders", "Loader", "Fetcher", "FROM_OFF_HOST"]

# (notice, location, standby model) -> what the load cost
Loader = Callable[[Notice, Location, torch.nn.Module], Loaded]
# (notice, location) -> what the fetch cost: fetched into a host copy, no model loaded
Fetcher = Callable[[Notice, Location], Loaded]
# The routes that bring a version's bytes to this host's memory from off the host: what a host
# copy (see _host_share) is fetched by.
FROM_OFF_HOST = frozenset({RouteKind.RELAY, RouteKind.COLLECTIVE, RouteKind.DRAM_ZMQ})


class RouteLoaders:
    """Loads into a model on `device` (None: split across devices); `zero_copy` serves a CPU
    model straight from the producer's segments on the "dram-shm" route."""

    def __init__(self, device: torch.device | None, pfs: FileSystemTier | None, key: bytes | None,
                 fetch_timeout: float, nbytes: int, *, zero_copy: bool, member: str) -> None:
        self._device, self._pfs, self._timeout, self._nbytes = device, pfs, fetch_timeout, nbytes
        self.key = key  # the subscriber's, once it has one
        self.context: zmq.Context | None = None  # the subscriber's, while it runs
        self._staging: torch.Tensor | None = None
        self._device_staging: torch.Tensor | None = None
        self._read_only_maps = ReadOnlyMappings()
        self.zero_copy = ZeroCopyWeights() if zero_copy and device == torch.device("cpu") else None
        self._member = member  # this consumer's name in relay rounds
        self._deltas = DeltaLoads()  # what staging and the standby models hold, for dram-zmq deltas

    def loader(self, kind: RouteKind | str) -> Loader:
        kind = RouteKind(kind)
        if kind in (RouteKind.DRAM_SHM, RouteKind.HOST_SHM):
            return self.zero_copy.load if self.zero_copy is not None \
                else functools.partial(load_from_segment, self._read_only_maps)
        if kind is RouteKind.GPU_IPC:
            return functools.partial(load_from_device, self.context, self.key, self._timeout)
        if kind is RouteKind.GPU_NCCL:
            return functools.partial(load_from_collective, self._timeout, self.key, self._device_staging_for())
        if kind is RouteKind.DRAM_ZMQ:
            return functools.partial(self._deltas.load, self.context, self.key, self._timeout, self._staging_buffer())
        if kind in FROM_OFF_HOST:
            return self._streamed(kind, self._staging_for())
        return functools.partial(load_from_files, self._pfs, self.key, self._staging_for())

    def fetcher(self, kind: RouteKind | str, buffer: torch.Tensor) -> Fetcher:
        """For a route in FROM_OFF_HOST: fetch a version into `buffer` and check its digest."""
        kind = RouteKind(kind)
        if kind not in FROM_OFF_HOST:
            raise ValueError(f"{kind} does not fetch from off this host")
        load = self._streamed(kind, buffer)
        return lambda notice, location: load(notice, location, None)

    def _streamed(self, kind: RouteKind, buffer: torch.Tensor) -> Loader:
        """The loader of a route in FROM_OFF_HOST, streaming the version through `buffer`."""
        if kind is RouteKind.DRAM_ZMQ:
            return functools.partial(load_from_peer, self.context, self.key, self._timeout, buffer)
        return functools.partial(load_from_collective, self._timeout, self.key, buffer,
                                 relay=self._member if kind is RouteKind.RELAY else None)

    def before(self, kind: RouteKind | str, standby: torch.nn.Module) -> None:
        """A route other than zero-copy loads into `standby`'s own memory: give it back first.
        A route other than dram-zmq leaves it holding what no delta can start from."""
        kind = RouteKind(kind)
        if self.zero_copy is not None and kind not in (RouteKind.DRAM_SHM, RouteKind.HOST_SHM):
            self.zero_copy.unshare(standby)
        if kind is not RouteKind.DRAM_ZMQ:
            self._deltas.forget(standby)

    def after_swap(self) -> None:
        if self.zero_copy is not None:
            self.zero_copy.reap()

    def housekeeping(self) -> None:
        """When the subscriber has nothing to apply: work no update waits for."""
        if self.zero_copy is not None:
            self.zero_copy.housekeeping()

    def close(self, models: list[torch.nn.Module]) -> None:
        if self.zero_copy is not None:
            self.zero_copy.close(models)

    def _staging_for(self) -> torch.Tensor:
        """The staging buffer, for a route that overwrites it whole."""
        self._deltas.forget_staging()
        return self._staging_buffer()

    def _staging_buffer(self) -> torch.Tensor:
        # pinned only for a model on a GPU: the staged bytes go on to the device from there
        pin = self._device is not None and self._device.type == "cuda"
        self._staging = ensure_capacity(self._staging, self._nbytes, pin=pin)
        return self._staging

    def _device_staging_for(self) -> torch.Tensor:
        """NCCL receives into device memory: a reused buffer on the model's GPU."""
        self._device_staging = ensure_capacity(self._device_staging, self._nbytes, self._device)
        return self._device_staging
