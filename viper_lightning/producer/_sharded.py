"""ShardedPublisher: every rank of a sharded model publishes the pieces it holds."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from .._errors import ConfigurationError, ViperError
from .._shards import PartInfo, local_part, part_name
from ..storage._pfs import FileSystemTier
from ..transport._reports import ConsumerReport
from ._catalog import CommitRecord
from ._publisher import ModelPublisher, _state_dict_of
from ._settings import DEFAULT_ENDPOINT

__all__ = ["ShardedPublisher"]

log = logging.getLogger("viper_lightning.publisher")

_ENDPOINT_BYTES = 512  # an endpoint as exchanged between the ranks at start (UTF-8, zero-padded)
_TOKEN_BYTES = 32  # a rank's random token (hex), rank 0's names the run
_PORT = re.compile(r"^((?:tcp|gloo|nccl)://.+):(\d{1,5})$")


class ShardedPublisher:
    """Publishes a model sharded over a process group (FSDP2, tensor parallelism: DTensor weights).

    Every rank copies its own pieces (`DTensor.to_local()`) into its own snapshot slot, with no
    all-gather, and publishes them as part `index` of `count`: an ordinary version of the model
    `<model_name>.part<index>of<count>` whose notice also says where each piece goes in the full
    tensors (viper_lightning._shards). Every route, the file-system tier and changed-blocks-only
    updates carry a part as they carry a whole model. A ShardedSubscriber applies a version only
    when every part of it has arrived and verified, so a rank that dies mid-publish leaves its
    consumers serving the last whole version.

    The ranks give each publish the same version number, so every rank must call `publish` at the
    same points of training (ViperCallback agrees on each decision across the ranks). A rank that
    skips a publish for lack of a free slot leaves that version incomplete: consumers go on to the
    next one. Nothing in `publish` waits for the other ranks.

    Args:
        model_name: the whole model's name; part i of n is published as `<model_name>.part<i>ofN`.
        endpoint: where this rank's notices go: a `tcp://HOST:PORT` endpoint is offset by the rank
            (rank r binds PORT + r), `tcp://HOST:*` takes free ports; `endpoints` lists them all.
            A fixed port of `fetch_endpoint` or `collective_endpoint` is offset the same way.
        pfs_root, hmac_key: as for ModelPublisher (each part has its own directory under pfs_root;
            without a key, each part has its own key file on this host).
        group: the process group sharing the model (None: the default group, which must exist).
        **options: any other ModelPublisher setting, for every rank's publisher.
    """

    def __init__(self, model_name: str, endpoint: str = DEFAULT_ENDPOINT,
                 pfs_root: str | FileSystemTier | None = None, hmac_key: str | bytes | None = None, *,
                 group: dist.ProcessGroup | None = None, **options: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigurationError("ShardedPublisher needs torch.distributed initialised (the ranks that share "
                                     "the model); for one process, use ModelPublisher")
        self.model_name = model_name
        self._group = group
        self.index, self.count = dist.get_rank(group), dist.get_world_size(group)
        self.part_name = part_name(model_name, self.index, self.count)
        publisher: ModelPublisher | None = None
        failure: BaseException | None = None
        try:
            for name in ("fetch_endpoint", "collective_endpoint"):  # one host may run several ranks
                if options.get(name) is not None:
                    options[name] = _endpoint_of_rank(options[name], self.index)
            publisher = ModelPublisher(self.part_name, _endpoint_of_rank(endpoint, self.index), pfs_root, hmac_key,
                                       **options)
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, not wait for this rank
            failure = exc
        # Every rank starts its versions above the highest any rank stored or reserved, and learns
        # where every part announces.
        agreed = self._exchange(publisher.next_version if publisher else 0, publisher.endpoint if publisher else "",
                                secrets.token_hex(16))
        if failure is not None or any(next_version == 0 for next_version, _, _ in agreed):
            if publisher is not None:
                publisher.close()
            failed = [rank for rank, (next_version, _, _) in enumerate(agreed) if next_version == 0]
            raise ConfigurationError(f"{model_name}: the publisher of rank(s) {failed} could not start"
                                     + (f": {failure}" if failure else "")) from failure
        self._publisher = publisher
        self._next = max(next_version for next_version, _, _ in agreed)
        self.endpoints = [address for _, address, _ in agreed]
        self.run = agreed[0][2]  # rank 0's token names this run in every part's notices
        self.endpoint = publisher.endpoint
        if self.index == 0:
            log.info("%s: published as %d parts; consumers subscribe to %s (ShardedSubscriber endpoints)",
                     model_name, self.count, self.endpoints)

    # -- delegated to this rank's publisher --------------------------------------------------
    @property
    def publisher(self) -> ModelPublisher:
        """This rank's publisher of its part."""
        return self._publisher

    @property
    def version(self) -> int | None:
        """The newest version of this rank's part that is settled and announced."""
        return self._publisher.version

    @property
    def health(self) -> dict[str, str]:
        return self._publisher.health

    @property
    def publishes_skipped(self) -> int:
        return self._publisher.publishes_skipped

    @property
    def writes_skipped(self) -> int:
        return self._publisher.writes_skipped

    @property
    def last_stall_s(self) -> float | None:
        return self._publisher.last_stall_s

    @property
    def last_commit(self) -> CommitRecord | None:
        return self._publisher.last_commit

    def take_consumer_reports(self) -> list[ConsumerReport]:
        return self._publisher.take_consumer_reports()

    def flush(self, timeout: float | None = None) -> bool:
        return self._publisher.flush(timeout)

    def wait_for_subscribers(self, count: int = 1, timeout: float | None = None) -> bool:
        return self._publisher.wait_for_subscribers(count, timeout)

    def close(self) -> None:
        self._publisher.close()

    def __enter__(self) -> ShardedPublisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except ViperError:
            log.exception("sharded publisher failed while the caller was already failing")

    # -- publishing ----------------------------------------------------------------------------
    def local_part(self, module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], PartInfo]:
        """This rank's pieces of the weights and where they go (no copy, no collective)."""
        return local_part(_state_dict_of(module_or_state_dict), self.model_name, self.index, self.count, self.run)

    def prepare(self, module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Warm this rank's snapshot slots for its pieces (see ModelPublisher.prepare)."""
        self._publisher.prepare(self.local_part(module_or_state_dict)[0])

    def publish(self, module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
                step: int | None = None, epoch: int | None = None, *, wait_for_slot: bool = False) -> int | None:
        """Publish this rank's pieces as its part of the next version; returns the version number,
        or None when this rank skipped it (every slot held: see ModelPublisher.publish)."""
        tensors, info = self.local_part(module_or_state_dict)
        version, self._next = self._next, self._next + 1  # every rank numbers its calls alike
        return self._publisher.publish(tensors, step, epoch, wait_for_slot=wait_for_slot, version=version, part=info)

    def _exchange(self, next_version: int, endpoint: str, token: str) -> list[tuple[int, str, str]]:
        """Each rank's next version number (0: its publisher failed), notice endpoint and token."""
        encoded = endpoint.encode()[:_ENDPOINT_BYTES]
        record = torch.zeros(8 + _TOKEN_BYTES + _ENDPOINT_BYTES, dtype=torch.uint8)
        record[:8] = torch.tensor([next_version], dtype=torch.int64).view(torch.uint8)
        record[8:8 + _TOKEN_BYTES] = torch.frombuffer(bytearray(token.encode()), dtype=torch.uint8)
        start = 8 + _TOKEN_BYTES
        record[start:start + len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8) if encoded else 0
        device = _collective_device(self._group)
        gathered = [torch.empty_like(record, device=device) for _ in range(self.count)]
        dist.all_gather(gathered, record.to(device), group=self._group)
        result = []
        for entry in gathered:
            raw = entry.cpu()
            number = int(raw[:8].view(torch.int64).item())
            token = bytes(raw[8:8 + _TOKEN_BYTES].tolist()).decode(errors="replace")
            address = bytes(raw[8 + _TOKEN_BYTES:].tolist()).rstrip(b"\0").decode(errors="replace")
            result.append((number, address, token))
        return result


def _endpoint_of_rank(endpoint: str, rank: int) -> str:
    """`endpoint` (ZeroMQ, or a collective's gloo:// or nccl://) with its port offset by `rank`;
    a wildcard or 0 port as given; an ipc:// path gets the rank appended."""
    match = _PORT.match(endpoint)
    if match is not None and int(match.group(2)) != 0:
        port = int(match.group(2)) + rank
        if port > 65535:
            raise ConfigurationError(f"endpoint {endpoint!r}: rank {rank} would bind port {port}; use a lower port")
        return f"{match.group(1)}:{port}"
    if endpoint.startswith(("ipc://", "inproc://")):
        return f"{endpoint}.{rank}"
    return endpoint


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a tensor for a collective of `group` must live: NCCL takes CUDA tensors only."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether `flag` holds on any rank of `group` (a collective: every rank must call it)."""
    return bool(highest_on_any_rank(int(bool(flag)), group))


def highest_on_any_rank(value: int, group: dist.ProcessGroup | None = None) -> int:
    """The highest of every rank's `value` (a collective: every rank must call it)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())
