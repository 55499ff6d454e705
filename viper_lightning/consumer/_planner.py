"""TransferPlanner: which location to fetch a version from (DESIGN §3).

cost = setup + nbytes / bandwidth × (1 + load), with bandwidth learned from this consumer's own
transfers (an exponential moving average seeded with figures measured on a 2-core host) and
load from what the producer reported in the notice. The cheapest route is tried first; on any
failure the next one, with the file system last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import ConfigurationError
from ..transport._protocol import Location, Notice

__all__ = ["Route", "TransferPlanner", "ROUTE_KINDS"]

# (setup seconds, bytes per second): seeds, replaced by measurements as transfers happen.
DEFAULT_COSTS: dict[str, tuple[float, float]] = {
    "gpu-ipc": (0.002, 100e9),  # a device-to-device copy out of the producer's GPU memory
    "dram-shm": (0.001, 8e9),
    "gpu-nccl": (0.025, 20e9),  # NCCL point-to-point: a new group per transfer
    "dram-zmq": (0.002, 1.2e9),
    "collective": (0.025, 1.9e9),  # torch.distributed point-to-point: a new group per transfer
    "pfs": (0.005, 1.0e9),
}
ROUTE_KINDS = tuple(DEFAULT_COSTS)
SMOOTHING = 0.3  # weight of the newest measurement


@dataclass(frozen=True)
class Route:
    kind: str
    location: Location
    cost_s: float


class TransferPlanner:
    """Ranks the routes to a version for one consumer on `host`; the GPU tier's routes need a
    consumer whose model is on a GPU (`on_gpu`)."""

    def __init__(self, host: str, allowed: Sequence[str] | None = None, *, on_gpu: bool = False) -> None:
        unknown = sorted(set(allowed or ()) - set(ROUTE_KINDS))
        if unknown:
            raise ConfigurationError(f"unknown transfer routes {unknown}; choose from {list(ROUTE_KINDS)}")
        self.host = host
        self.on_gpu = on_gpu
        self.allowed = tuple(allowed) if allowed else ROUTE_KINDS
        self._bandwidth = {kind: rate for kind, (_, rate) in DEFAULT_COSTS.items()}

    def routes(self, notice: Notice) -> list[Route]:
        """Every usable route to the version, cheapest first (the file system last on ties)."""
        found = [Route(kind, loc, self.estimate(kind, notice.nbytes, loc.load))
                 for loc in notice.locations if (kind := self._kind(loc)) in self.allowed]
        return sorted(found, key=lambda route: (route.cost_s, ROUTE_KINDS.index(route.kind)))

    def estimate(self, kind: str, nbytes: int, load: int = 0) -> float:
        setup, _ = DEFAULT_COSTS[kind]
        return setup + nbytes / self._bandwidth[kind] * (1 + load)

    def observe(self, kind: str, nbytes: int, seconds: float) -> None:
        """Learn from a completed transfer (tiny ones say more about latency than bandwidth)."""
        if nbytes >= 1 << 20 and seconds > 0:
            measured = nbytes / seconds
            self._bandwidth[kind] = (1 - SMOOTHING) * self._bandwidth[kind] + SMOOTHING * measured

    def _kind(self, location: Location) -> str | None:
        if location.tier == "pfs":
            return "pfs"
        if location.tier == "gpu":
            return self._gpu_kind(location)
        if location.tier == "dram" and location.address.startswith("shm://"):
            return "dram-shm" if location.host == self.host else None  # a segment is host-local
        if location.tier == "dram" and location.address.startswith(("gloo://", "nccl://")):
            return "collective"
        if location.tier == "dram":
            return "dram-zmq"
        return None

    def _gpu_kind(self, location: Location) -> str | None:
        if location.address.startswith("gloo://"):
            return "collective"  # the GPU tier kept in host memory (gpu_device="cpu")
        if not self.on_gpu:
            return None  # a CPU model gains nothing from a device copy: the dram tier is closer
        if location.address.startswith("nccl://"):
            return "gpu-nccl"
        return "gpu-ipc" if location.host == self.host else None  # IPC handles are host-local


def explain(chosen: Route, routes: list[Route], failures: list[str]) -> str:
    """Why this route: the estimates it was picked from, and what failed before it."""
    estimates = ", ".join(f"{r.kind} {r.cost_s * 1e3:.1f} ms" for r in routes)
    text = f"{chosen.kind} was the cheapest reachable route (estimates: {estimates})"
    return text + (f" after failures: {'; '.join(failures)}" if failures else "")
