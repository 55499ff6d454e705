"""EnsembleSubscriber: follows the K published members of an ensemble and answers with their
combination, naming every member's version."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import TracebackType

import torch

from .._errors import ConfigurationError
from ..storage._pfs import FileSystemTier
from ._stats import Refusal, UpdateRecord
from ._subscriber import ModelSubscriber

__all__ = ["EnsembleSubscriber", "EnsembleLease", "Combined"]

COMBINATIONS = ("mean",)


class Combined(torch.nn.Module):
    """The members as one module: their outputs on the same input, combined (the mean)."""

    def __init__(self, members: Sequence[torch.nn.Module], combine: Callable[[list[torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self._combine = combine

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self._combine([member(*args, **kwargs) for member in self.members])


def _mean(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(outputs).mean(dim=0)


@dataclass(frozen=True)
class EnsembleLease:
    """What one request holds: the members combined (`model`), and each member's version and
    route (by model name; None before its first update)."""

    model: Combined
    versions: dict[str, int | None]
    routes: dict[str, str | None]


class EnsembleSubscriber:
    """Keeps each member model at the newest version its producer published (one ModelSubscriber
    per member, each with every guarantee of one) and leases them together, so that one request
    is answered by one version of each member, combined.

    Args:
        models: the serving models, one per member (each gets its own standby copy).
        model_names: each member's published name, in the same order.
        endpoints: each member's notice endpoint, in the same order.
        combine: "mean" (of the members' outputs), or a callable taking the list of outputs.
        pfs_root, hmac_key, routes, zero_copy, host_id, fetch_timeout, load_latest, poll_interval,
        allow_keyless: as for ModelSubscriber, for every member.
        on_update / on_refusal: called with each member's UpdateRecord or Refusal.
    """

    def __init__(self, models: Sequence[torch.nn.Module], model_names: Sequence[str], endpoints: Sequence[str],
                 pfs_root: str | FileSystemTier | None = None, hmac_key: str | bytes | None = None, *,
                 combine: str | Callable[[list[torch.Tensor]], torch.Tensor] = "mean",
                 routes: Sequence[str] | None = None, zero_copy: bool = True, host_id: str | None = None,
                 fetch_timeout: float = 10.0, load_latest: bool = True, poll_interval: float = 0.05,
                 on_update: Callable[[UpdateRecord], None] | None = None,
                 on_refusal: Callable[[Refusal], None] | None = None, allow_keyless: bool = False) -> None:
        if not (len(models) == len(model_names) == len(endpoints)) or not models:
            raise ConfigurationError(f"an ensemble needs one model, name and endpoint per member; got {len(models)} "
                                     f"models, {len(model_names)} names and {len(endpoints)} endpoints")
        if len(set(model_names)) != len(model_names):
            raise ConfigurationError(f"the members' names repeat: {list(model_names)}")
        if isinstance(combine, str) and combine not in COMBINATIONS:
            raise ConfigurationError(f"combine={combine!r}: use one of {COMBINATIONS} or a callable")
        self._combine = _mean if combine == "mean" else combine
        self.model_names = list(model_names)
        self.members = [ModelSubscriber(model, name, endpoint, pfs_root, hmac_key, routes=routes, zero_copy=zero_copy,
                                        host_id=host_id, fetch_timeout=fetch_timeout, load_latest=load_latest,
                                        poll_interval=poll_interval, on_update=on_update, on_refusal=on_refusal,
                                        allow_keyless=allow_keyless)
                        for model, name, endpoint in zip(models, model_names, endpoints)]
        self._routes: dict[str, dict[int, str]] = {name: {} for name in model_names}

    def start(self) -> EnsembleSubscriber:
        for member in self.members:
            member.start()
        return self

    def close(self) -> None:
        errors = []
        for member in self.members:
            try:
                member.close()
            except BaseException as exc:  # noqa: BLE001 - close them all, then raise the first
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> EnsembleSubscriber:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def versions(self) -> dict[str, int | None]:
        """Each member's serving version."""
        return {name: member.version for name, member in zip(self.model_names, self.members)}

    @property
    def lag(self) -> int:
        """The most versions any member is behind its newest notice."""
        return max(member.lag for member in self.members)

    @contextmanager
    def lease(self) -> Iterator[EnsembleLease]:
        """Every member's serving copy for one request; none is swapped while the block runs."""
        with ExitStack() as stack:
            leases = [stack.enter_context(member.lease()) for member in self.members]
            routes = {}
            for name, member_lease, member in zip(self.model_names, leases, self.members):
                last = member.stats.last
                routes[name] = last.route if last is not None and last.version == member_lease.version else None
            yield EnsembleLease(Combined([lease.model for lease in leases], self._combine),
                                {name: lease.version for name, lease in zip(self.model_names, leases)}, routes)

    def wait_for_versions(self, versions: dict[str, int], timeout: float | None = None) -> bool:
        """Wait until each named member serves at least its version (one timeout per member)."""
        return all(self.members[self.model_names.index(name)].wait_for_version(version, timeout)
                   for name, version in versions.items())
