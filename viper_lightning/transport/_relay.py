"""Fan-out to many hosts over torch.distributed: a pipelined chain relay (DESIGN §9).

Consumers that ask the producer's collective server for the same version with `relay` set,
within a join window of each other, form one round: a group of the producer (rank 0) and the
members (ranks 1 to n, in the order they asked), built like a direct transfer's group on the
producer's store. The producer sends each chunk to rank 1 only; each member receives chunk i
from the rank before it and passes it on to the rank after it while the next chunks land. So
each byte crosses the producer's uplink once, and each host's link carries the model once in
each direction, whatever the number of hosts; the last member has it (n - 1) chunks after the
first. Gloo moves CPU tensors, NCCL CUDA tensors: the same calls (point-to-point send/recv), as
for a direct transfer. (A group broadcast would not do: Gloo's sends every byte from the root
to each member, which is the star this replaces.)

The join window closes early once every host that fetched the previous version (in any of its
rounds) has asked again, so with a steady set of hosts a round starts as soon as the last of
them asks; a host that left costs the others one window, once, and a host that joins late gets
a round of its own, and is in the others' from the next version on.

A member whose successor fails stops forwarding and keeps its own copy; a member whose
predecessor fails (died, stalled) gives up, and every member after it at once (it drops its
group, whose closed connections fail their receives); they ask again once, together, as a new
round (BROKEN_ROUND), and if that fails too they fall back to their next route (a direct fetch,
the file system). A member, and the producer sending to a round, gives up on a peer that makes
no progress for half its timeout (`stall_timeout`): Gloo does not report every dead peer (a
receive under way when its sender dies waits out its timeout, seen with a host killed mid-chunk
on shaped links), so the other half is left for the new round, and a dead host delays the others
by at most their timeout when one round's transfer takes less than half of it. Each member checks the digest of what it received against the
producer's signed answer, exactly as on a direct transfer, so a member that relays altered
bytes is caught by the next one.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .._errors import ProtocolError
from ._messages import count

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Backend as _Group

__all__ = ["RelayRole", "RelayMember", "RELAY_CHUNK_BYTES", "RELAY_WINDOW", "JOIN_WINDOW_S", "MAX_MEMBERS",
           "BROKEN_ROUND", "STALL_SHARE", "gather_round", "stall_timeout", "relay_role", "receive_and_forward", "spans", "wait_for"]

log = logging.getLogger("viper_lightning.collective")

# Chunks of a relay are small so the pipeline fills fast: the last of n members is (n - 1)
# chunks behind the first, 60 MiB for 16 hosts, against 64 MiB chunks for one direct transfer.
RELAY_CHUNK_BYTES = 4 * 1024 * 1024
RELAY_WINDOW = 4  # chunks in flight each way per member: receiving, digesting, forwarding overlap
# How long a round waits for more members after the first asks: long enough for every host
# woken by the same notice (a notice reaches them within a millisecond, a busy worker may take
# a while to ask), short against a transfer. Only paid in full when the set of hosts changed.
JOIN_WINDOW_S = 0.25
MAX_MEMBERS = 1024
# The code of the TransferError a member raises when its round broke mid-transfer (a member
# before it, or the producer, failed): the members after the failure may ask again as a new
# round, rather than each fetching the whole version over the producer's link at once.
BROKEN_ROUND = "broken-round"
# The share of a member's timeout it waits on a relay peer that makes no progress: the rest is
# for the round the members form again without a dead one (see the module doc).
STALL_SHARE = 0.5


@dataclass(frozen=True)
class RelayMember:
    """A consumer that asked to join a round: its ticket, its request's nonce, and the name it
    gave (host and process: used only to know when everyone of the last version is back, never
    trusted for anything else)."""

    ticket: int
    nonce: str
    name: str
    timeout_s: float | None = None  # how long it waits without progress before giving up


@dataclass(frozen=True)
class RelayRole:
    """A member's place in a round: the round's id (its first ticket), its rank, the group size."""

    round: int
    rank: int
    size: int

    def describe(self) -> dict[str, int]:
        return {"round": self.round, "rank": self.rank, "size": self.size}


def relay_role(answer: dict, what: str) -> RelayRole:
    """The role an answer assigns (checked: it comes over a store anyone on the network reaches)."""
    raw = answer.get("relay")
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what} carries no 'relay' object for a relay request")
    size = count(raw, "size", what, minimum=2, maximum=MAX_MEMBERS + 1)
    return RelayRole(count(raw, "round", what, minimum=1), count(raw, "rank", what, minimum=1, maximum=size - 1),
                     size)


def gather_round(first: RelayMember, next_request: Callable[[int, float], dict | None], *,
                 expected: frozenset[str], window_s: float = JOIN_WINDOW_S) -> list[RelayMember]:
    """The members of the round `first` opens: the relay requests for the same version and size
    on the tickets after it, until the window closes, every member named in `expected` (those
    that fetched the previous version, over all its rounds) has asked, or a ticket asks for
    something else (it is then served on its own).

    `next_request(ticket, wait_s)` returns that ticket's request if it is a matching relay
    request that arrived within wait_s, else None."""
    members = [first]
    deadline = time.monotonic() + window_s
    while len(members) < MAX_MEMBERS:
        if expected and expected <= {member.name for member in members}:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ticket = members[-1].ticket + 1
        request = next_request(ticket, left)
        if request is None:
            break
        members.append(RelayMember(ticket, request["nonce"], request.get("member", ""), request.get("timeout")))
    return members


def stall_timeout(timeout: float) -> float:
    """How long a relay round waits on a peer that makes no progress, for a member's `timeout`."""
    return timeout * STALL_SHARE


def spans(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of `nbytes`."""
    return [(offset, min(chunk_bytes, nbytes - offset)) for offset in range(0, nbytes, chunk_bytes)]


def receive_and_forward(group: _Group, role: RelayRole, target: torch.Tensor, chunk_bytes: int, timeout: float,
                        landed: Callable[[int, int], None], *, window: int = RELAY_WINDOW) -> None:
    """Receive `target` chunk by chunk from rank - 1 and pass each chunk on to rank + 1 (unless
    last), keeping `window` chunks in flight each way; `landed(offset, length)` runs on each
    chunk as it lands (the digest). A direct transfer is rank 1 of 2. A failed receive raises
    RuntimeError (the caller falls back); a failed forward is logged and forwarding stops (the
    ranks after this one fall back): this member's own copy does not depend on it."""
    chunks = spans(target.numel(), chunk_bytes)
    receives: deque[dist.Work] = deque()
    sends: deque[dist.Work] = deque()
    forwarding, posted = role.rank + 1 < role.size, 0
    for index, (offset, length) in enumerate(chunks):
        while posted < len(chunks) and len(receives) < window:
            start, size = chunks[posted]
            receives.append(group.recv([target[start:start + size]], role.rank - 1, posted))
            posted += 1
        wait_for(receives.popleft(), timeout, f"chunk {index} from rank {role.rank - 1}")
        landed(offset, length)
        if forwarding:
            forwarding = _forward(group, role, sends, target[offset:offset + length], index, timeout, window)
    while forwarding and sends:
        forwarding = _settle(sends, role, timeout)


def _forward(group: _Group, role: RelayRole, sends: deque[dist.Work], chunk: torch.Tensor, index: int,
             timeout: float, window: int) -> bool:
    """Post `chunk` to rank + 1, keeping `window` sends in flight; False once forwarding failed."""
    try:
        sends.append(group.send([chunk], role.rank + 1, index))
    except RuntimeError as exc:
        log.warning("relay round %d: rank %d stopped forwarding: chunk %d to rank %d failed: %s", role.round,
                    role.rank, index, role.rank + 1, exc)
        return False
    while len(sends) > window:
        if not _settle(sends, role, timeout):
            return False
    return True


def _settle(sends: deque[dist.Work], role: RelayRole, timeout: float) -> bool:
    """Wait for the oldest send; False (logged) when it failed."""
    try:
        wait_for(sends.popleft(), timeout, f"forwarding to rank {role.rank + 1}")
    except RuntimeError as exc:
        log.warning("relay round %d: rank %d stopped forwarding: %s", role.round, role.rank, exc)
        return False
    return True


def wait_for(work: dist.Work, timeout: float, what: str) -> None:
    """Wait for one send or receive; raises RuntimeError on failure or after `timeout`.

    With a timeout, Work.wait blocks the CPU for both backends; NCCL is also polled until its
    event completes, in case a torch version only made the current stream wait."""
    deadline = time.monotonic() + timeout
    if not work.wait(timedelta(seconds=timeout)):
        raise RuntimeError(f"{what}: no progress within {timeout:g} s")
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no progress within {timeout:g} s")
        time.sleep(0.0005)
