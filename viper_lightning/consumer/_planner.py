"""TransferPlanner: which location to fetch a version from (DESIGN §3).

cost = setup + nbytes / bandwidth × (1 + load), with bandwidth learned from this consumer's own
transfers (an exponential moving average seeded with typical figures) and
load from what the producer reported in the notice. The cheapest route is tried first; on any
failure the next one, with the file system last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from .._errors import ConfigurationError
from ..transport._protocol import Location, Notice

__all__ = ["Route", "RouteKind", "TransferPlanner", "ROUTE_KINDS"]


class RouteKind(str, Enum):
    """How a version's bytes reach this consumer; the value is what settings and stats say."""

    GPU_IPC = "gpu-ipc"  # a device-to-device copy out of the producer's GPU memory (same host)
    DRAM_SHM = "dram-shm"  # the producer's shared-memory segment (same host)
    HOST_SHM = "host-shm"  # the copy another consumer on this host fetched from off the host (shared)
    GPU_NCCL = "gpu-nccl"  # NCCL point-to-point into this consumer's GPU
    RELAY = "relay"  # torch.distributed (Gloo) from host memory, relayed host to host (fan-out)
    DRAM_ZMQ = "dram-zmq"  # streamed from the producer's memory over ZeroMQ
    COLLECTIVE = "collective"  # torch.distributed point-to-point (Gloo) from host memory
    PFS = "pfs"  # the file-system tier

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# (setup seconds, bytes per second): seeds, replaced by measurements as transfers happen.
DEFAULT_COSTS: dict[RouteKind, tuple[float, float]] = {
    RouteKind.GPU_IPC: (0.002, 100e9),
    RouteKind.DRAM_SHM: (0.001, 8e9),
    RouteKind.HOST_SHM: (0.001, 8e9),
    RouteKind.GPU_NCCL: (0.025, 20e9),  # a new group per transfer
    RouteKind.DRAM_ZMQ: (0.002, 1.2e9),
    RouteKind.RELAY: (0.025, 1.9e9),  # a new group per round
    RouteKind.COLLECTIVE: (0.025, 1.9e9),  # a new group per transfer
    RouteKind.PFS: (0.005, 1.0e9),
}
ROUTE_KINDS = tuple(RouteKind)
# Routes that each draw a whole copy over the producer's own link, shared with every other host.
UPLINK_ROUTES = frozenset({RouteKind.DRAM_ZMQ, RouteKind.COLLECTIVE})
SMOOTHING = 0.3  # weight of the newest measurement


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    location: Location
    cost_s: float


class TransferPlanner:
    """Ranks the routes to a version for one consumer on `host`; the GPU tier's routes need a
    consumer whose model is on a GPU (`on_gpu`)."""

    def __init__(self, host: str, allowed: Sequence[str] | None = None, *, on_gpu: bool = False) -> None:
        values = [kind.value for kind in ROUTE_KINDS]
        unknown = sorted(str(kind) for kind in allowed or () if kind not in values)
        if unknown:
            raise ConfigurationError(f"unknown transfer routes {unknown}; choose from {values}")
        self.host = host
        self.on_gpu = on_gpu
        self.allowed = tuple(RouteKind(kind) for kind in allowed) if allowed else ROUTE_KINDS
        self._bandwidth = {kind: rate for kind, (_, rate) in DEFAULT_COSTS.items()}

    def routes(self, notice: Notice) -> list[Route]:
        """Every usable route to the version, cheapest first (the file system last on ties)."""
        found = [Route(kind, loc, self.estimate(kind, notice.nbytes, loc.load))
                 for loc in notice.locations if (kind := self._kind(loc)) in self.allowed]
        # A relay goes before the routes that draw a copy over the producer's link: their cost
        # grows with every other host fetching at once, which no one consumer's estimate sees.
        uplink = min((route.cost_s for route in found if route.kind in UPLINK_ROUTES), default=math.inf)

        def rank(route: Route) -> tuple[float, int]:
            cost = min(route.cost_s, uplink) if route.kind is RouteKind.RELAY else route.cost_s
            return cost, ROUTE_KINDS.index(route.kind)
        return sorted(found, key=rank)

    def estimate(self, kind: RouteKind, nbytes: int, load: int = 0) -> float:
        setup, _ = DEFAULT_COSTS[kind]
        return setup + nbytes / self._bandwidth[kind] * (1 + load)

    def observe(self, kind: RouteKind, nbytes: int, seconds: float) -> None:
        """Learn from a completed transfer (tiny ones say more about latency than bandwidth)."""
        if nbytes >= 1 << 20 and seconds > 0:
            measured = nbytes / seconds
            self._bandwidth[kind] = (1 - SMOOTHING) * self._bandwidth[kind] + SMOOTHING * measured

    def _kind(self, location: Location) -> RouteKind | None:
        if location.tier == "pfs":
            return RouteKind.PFS
        if location.tier == "gpu":
            return self._gpu_kind(location)
        if location.tier == "dram" and location.address.startswith("shm://"):
            return RouteKind.DRAM_SHM if location.host == self.host else None  # a segment is host-local
        if location.tier == "dram" and location.address.startswith(("gloo://", "nccl://")):
            return self._collective_kind()
        if location.tier == "dram":
            return RouteKind.DRAM_ZMQ
        return None

    def _collective_kind(self) -> RouteKind:
        """A Gloo location is taken by relay when allowed (the default), not by a direct
        transfer from the same place (see `routes`)."""
        return RouteKind.RELAY if RouteKind.RELAY in self.allowed else RouteKind.COLLECTIVE

    def _gpu_kind(self, location: Location) -> RouteKind | None:
        if location.address.startswith("gloo://"):
            return self._collective_kind()  # the GPU tier kept in host memory (gpu_device="cpu")
        if not self.on_gpu:
            return None  # a CPU model gains nothing from a device copy: the dram tier is closer
        if location.address.startswith("nccl://"):
            return RouteKind.GPU_NCCL
        return RouteKind.GPU_IPC if location.host == self.host else None  # IPC handles are host-local


def explain(chosen: Route, routes: list[Route], failures: list[str]) -> str:
    """Why this route: the estimates it was picked from, and what failed before it."""
    estimates = ", ".join(f"{r.kind} {r.cost_s * 1e3:.1f} ms" for r in routes)
    text = f"{chosen.kind} was the cheapest reachable route (estimates: {estimates})"
    return text + (f" after failures: {'; '.join(failures)}" if failures else "")
