"""One input pipeline for an ensemble: a loader process reads and preprocesses each batch once,
and K trainer processes read it from shared memory.

The loader (BatchLoader) writes each batch into a slot of a ring in /dev/shm and tells every
member which slot holds it; a member (SharedBatches, the dataset of its DataLoader) maps the
ring and yields tensors that view the slot, so no member copies the batch. A slot is written
again only once every member still alive said it is done with it: the slowest member sets the
pace, and the ring's size bounds how far the loader runs ahead. A member that dies (its process
is gone; members share the loader's PID namespace), or that holds the oldest batch while the
ring stays full past `member_timeout` when one is set, is dropped, and the others go on. Each slot
starts with the sequence number of the batch in it, which a member checks when it releases
the batch: a batch overwritten while in use is an error, never silently trained on.

The ring and the loader's socket live in a private directory (mode 0700) of the user who runs
them; messages are JSON over a ZeroMQ unix socket there, never pickles.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType

import torch
import zmq
from torch.utils.data import IterableDataset

from .._errors import ConfigurationError, IntegrityError, TransferError
from .._layout import Layout
from ..storage._shm import open_ours

__all__ = ["BatchLoader", "SharedBatches"]

log = logging.getLogger("viper_lightning.data")

RING = "ring"
SOCKET = "loader.sock"
HEADER_BYTES = 64  # each slot's sequence number (int64), then its batch at this offset
POLL_S = 0.1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class _Member:
    pid: int
    identity: bytes


class BatchLoader:
    """The loader's side: serves batches (dicts of tensors) to `members` trainer processes.

    Args:
        members: how many trainer processes read the batches.
        slot_bytes: the largest batch, in bytes (its tensors packed; see viper_lightning.Layout).
        slots: the ring's slots: how many batches may be out at once (at least 2 + each member's
            `hold`, so that the loader can run ahead of the slowest member).
        directory: where the ring and the socket go (default: a fresh private directory in
            /dev/shm); members are given the same path.
        join_timeout: seconds to wait for every member to join before serving those that did.
        member_timeout: seconds the ring may stay full before the members holding its oldest batch
            are dropped and told so (None, the default: never; the slowest member sets the pace,
            however slow). A member whose process is gone is dropped at once.
    """

    def __init__(self, members: int, slot_bytes: int, slots: int = 6, directory: str | None = None,
                 join_timeout: float = 120.0, member_timeout: float | None = None) -> None:
        if members < 1 or slots < 2 or slot_bytes < 1:
            raise ConfigurationError(f"BatchLoader(members={members}, slots={slots}, slot_bytes={slot_bytes}): need "
                                     "at least one member, two slots and one byte per slot")
        # whole pages, so that members drop a slot's pages on their own
        slot_bytes = -(-(slot_bytes + HEADER_BYTES) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.members_expected, self.slots, self.slot_bytes = members, slots, slot_bytes
        self.join_timeout, self.member_timeout = join_timeout, member_timeout
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = directory or tempfile.mkdtemp(prefix="viper-pipeline-", dir=base)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        ring_path = os.path.join(self.directory, RING)
        fd = os.open(ring_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, slots * slot_bytes)
            self._ring = mmap.mmap(fd, slots * slot_bytes)
        finally:
            os.close(fd)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socket.bind(f"ipc://{os.path.join(self.directory, SOCKET)}")
        self._members: dict[int, _Member] = {}
        self._holders: list[set[int]] = [set() for _ in range(slots)]  # members yet to release each slot
        self._free: deque[int] = deque(range(slots))
        self._slot_of: dict[int, int] = {}  # batch sequence number -> its slot, while held
        self._seq = 0
        self.dropped: list[int] = []  # members dropped as dead or silent

    @property
    def joined(self) -> list[int]:
        """The members being served now (by number)."""
        return sorted(self._members)

    @property
    def served(self) -> int:
        """Batches sent so far."""
        return self._seq

    @property
    def in_flight(self) -> int:
        """Slots some member has not released yet."""
        return self.slots - len(self._free)

    # -- serving -------------------------------------------------------------------------------
    def serve(self, batches: Iterable[Mapping[str, torch.Tensor]], epochs: int = 1) -> int:
        """Send every batch of `batches` to every member, `epochs` times (each epoch iterates
        `batches` again and ends with a marker); returns how many batches went out."""
        self._wait_for_members()
        for epoch in range(epochs):
            for batch in batches:
                if not self._members:
                    raise TransferError("every member of the ensemble is gone; nothing left to serve")
                self._send_batch(batch, epoch)
            self._announce({"kind": "epoch_end", "epoch": epoch})
        self._announce({"kind": "end"})
        self._drain()
        return self._seq

    def _wait_for_members(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        while len(self._members) < self.members_expected and time.monotonic() < deadline:
            self._receive(POLL_S)
        if not self._members:
            raise TransferError(f"no member joined within {self.join_timeout:.0f} s (directory {self.directory})")
        if len(self._members) < self.members_expected:
            log.warning("%d of %d members joined within %.0f s; serving those", len(self._members),
                        self.members_expected, self.join_timeout)

    def _send_batch(self, batch: Mapping[str, torch.Tensor], epoch: int) -> None:
        layout = Layout.for_state_dict(batch)
        if layout.nbytes > self.slot_bytes - HEADER_BYTES:
            raise ConfigurationError(f"a batch of {layout.nbytes} bytes does not fit a {self.slot_bytes}-byte slot; "
                                     "give BatchLoader a larger slot_bytes")
        slot = self._free_slot()
        self._seq += 1
        start = slot * self.slot_bytes + HEADER_BYTES
        self._ring[start - HEADER_BYTES:start - HEADER_BYTES + 8] = self._seq.to_bytes(8, "little")
        target = torch.frombuffer(self._ring, dtype=torch.uint8, count=layout.nbytes, offset=start)
        views = layout.views(target)
        for spec in layout.unique_tensors():
            views[spec.name].copy_(batch[spec.name])
        self._slot_of[self._seq] = slot
        self._holders[slot] = set(self._members)
        self._announce({"kind": "batch", "seq": self._seq, "epoch": epoch, "offset": start,
                        "nbytes": layout.nbytes, "layout": layout.to_json()})

    def _free_slot(self) -> int:
        waiting_since = time.monotonic()
        while not self._free:
            self._receive(POLL_S)
            self._drop_gone()
            if self.member_timeout is not None and time.monotonic() - waiting_since > self.member_timeout:
                self._drop_blocking()
                waiting_since = time.monotonic()
        return self._free.popleft()

    def _drop_blocking(self) -> None:
        """The ring has been full for member_timeout: drop the members that still hold its oldest
        batch (the others hold only newer ones, waiting for the next), and tell them."""
        oldest = min(self._slot_of)
        for number in sorted(self._holders[self._slot_of[oldest]]):
            member = self._members.get(number)
            if member is not None:
                self._socket.send_multipart([member.identity, json.dumps({"kind": "dropped"}).encode()])
                self._drop(number, f"it held batch {oldest} for over {self.member_timeout:.0f} s while the others waited")

    def _announce(self, message: dict[str, object]) -> None:
        payload = json.dumps(message).encode()
        for member in self._members.values():
            self._socket.send_multipart([member.identity, payload])

    def _drain(self) -> None:
        """After the end: until every member released its slots or left (bounded by the timeout)."""
        deadline = time.monotonic() + (self.member_timeout or 60.0)
        while self._members and len(self._free) < self.slots and time.monotonic() < deadline:
            self._receive(POLL_S)
            self._drop_gone(finished=True)

    # -- members ---------------------------------------------------------------------------
    def _receive(self, timeout_s: float) -> None:
        if not self._socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return
        while self._socket.poll(0, zmq.POLLIN):
            frames = self._socket.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                message = json.loads(frames[1])
                kind, member = message["kind"], message["member"]
                seqs, pid = message.get("seqs", []), message.get("pid", 0)
                if not (isinstance(kind, str) and _count(member) and _count(pid) and isinstance(seqs, list)
                        and all(_count(seq) for seq in seqs)):
                    raise TypeError(kind)
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignored a malformed message on %s", self.directory)
                continue
            self._handle(kind, member, frames[0], message)

    def _handle(self, kind: str, member: int, identity: bytes, message: dict) -> None:
        if kind == "hello" and member not in self._members and member not in self.dropped:
            self._members[member] = _Member(message.get("pid", 0), identity)
            return
        known = self._members.get(member)
        if known is None or known.identity != identity:
            return  # not a member, or another process claiming one's number
        if kind == "done":
            for seq in message.get("seqs", []):
                self._release(member, seq)
        elif kind == "bye":
            self._drop(member, "left")

    def _release(self, member: int, seq: int) -> None:
        slot = self._slot_of.get(seq)
        if slot is None:
            return
        self._holders[slot].discard(member)
        if not self._holders[slot]:
            del self._slot_of[seq]
            self._free.append(slot)

    def _drop_gone(self, finished: bool = False) -> None:
        """Drop members whose process is gone (after the end, one that exited just finished)."""
        for number, member in list(self._members.items()):
            if not _alive(member.pid):
                self._drop(number, "left" if finished else "its process is gone")

    def _drop(self, number: int, why: str) -> None:
        self._members.pop(number, None)
        if why != "left":
            self.dropped.append(number)
            log.warning("ensemble member %d dropped (%s); the others go on", number, why)
        for seq in list(self._slot_of):
            self._release(number, seq)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._socket.close(0)
        self._context.term()
        self._ring.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: only silence can drop it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class SharedBatches(IterableDataset):
    """A trainer process's side: the loader's batches, as tensors viewing the shared ring.

    Use it as the dataset of a DataLoader with `batch_size=None` and `num_workers=0` (the batches
    are made already). Each epoch of the DataLoader is one epoch the loader serves. A batch is
    released to the loader `hold` batches later, since Lightning fetches one batch ahead of the
    step it runs; the views are copy-on-write, so a step that writes its batch writes a private
    copy, never the ring.

    Args:
        directory: the loader's directory (BatchLoader.directory).
        member: this member's number (0 to K-1).
        hold: batches kept before releasing one (2 under Lightning).
        timeout: seconds without a message from the loader before giving up with an error.
    """

    def __init__(self, directory: str, member: int, hold: int = 2, timeout: float = 120.0) -> None:
        super().__init__()
        self.directory, self.member, self.hold, self.timeout = directory, member, hold, timeout
        self._socket: zmq.Socket | None = None
        self._context: zmq.Context | None = None
        self._ring: mmap.mmap | None = None
        self._held: deque[tuple[int, int, int]] = deque()  # (seq, offset, nbytes) of each batch not released
        self._layout: tuple[object, object, Layout] | None = None  # the last batch's layout, as sent and parsed
        self._ended = False
        self.batches_seen = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._connect()
        self._release(len(self._held))  # the previous epoch's batches are done with
        while not self._ended:
            message = self._next_message()
            kind = message.get("kind")
            if kind == "batch":
                yield self._batch(message)
            elif kind == "epoch_end":
                return
            elif kind == "end":
                self._ended = True
                self._release(len(self._held))
                self._send({"kind": "bye"})
            elif kind == "dropped":
                raise TransferError(f"ensemble member {self.member}: the loader dropped it (it held a batch past the "
                                    "loader's member_timeout); the batches it held may have been overwritten")

    def _connect(self) -> None:
        if self._socket is not None:
            return
        fd = open_ours(os.path.join(self.directory, RING))
        if fd is None:
            raise ConfigurationError(f"no ring of this user's under {self.directory}: start the BatchLoader first")
        try:
            self._ring = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socket.connect(f"ipc://{os.path.join(self.directory, SOCKET)}")
        self._send({"kind": "hello", "pid": os.getpid()})

    def _next_message(self) -> dict:
        if not self._socket.poll(int(self.timeout * 1000), zmq.POLLIN):
            raise TransferError(f"ensemble member {self.member}: no batch from the loader at {self.directory} for "
                                f"{self.timeout:.0f} s (did it stop?)")
        try:
            return json.loads(self._socket.recv())
        except ValueError as exc:
            raise IntegrityError(f"ensemble member {self.member}: a malformed message from the loader: {exc}") from None

    def _batch(self, message: dict) -> dict[str, torch.Tensor]:
        sent = (message.get("layout"), message.get("nbytes"))
        if self._layout is None or self._layout[:2] != sent:  # batches mostly share one layout: parsed once
            self._layout = (*sent, Layout.from_json(*sent))
        layout = self._layout[2]
        offset, seq = message.get("offset"), message.get("seq")
        if not _count(offset) or offset < HEADER_BYTES or offset + layout.nbytes > len(self._ring) or not _count(seq):
            raise IntegrityError(f"ensemble member {self.member}: a batch at {offset!r} lies outside the ring")
        # MAP_PRIVATE: a page a step writes becomes this process's own copy; on release the slot's
        # pages are dropped (MADV_DONTNEED), so the next batch in the slot is read from the ring
        buffer = torch.frombuffer(self._ring, dtype=torch.uint8, count=layout.nbytes, offset=offset)
        self._held.append((seq, offset, layout.nbytes))
        self.batches_seen += 1
        if len(self._held) > self.hold:
            self._release(len(self._held) - self.hold)
        return layout.views(buffer)

    def _release(self, count: int) -> None:
        if count <= 0 or self._socket is None:
            return
        released = [self._held.popleft() for _ in range(count)]
        for seq, offset, nbytes in released:
            header = offset - HEADER_BYTES
            if int.from_bytes(self._ring[header:header + 8], "little") != seq:
                raise IntegrityError(f"ensemble member {self.member}: batch {seq} was overwritten while in use (the "
                                     "loader dropped this member?); its steps may have trained on another batch")
            start = header - header % mmap.PAGESIZE
            length = -(-(offset + nbytes - start) // mmap.PAGESIZE) * mmap.PAGESIZE
            if length:
                self._ring.madvise(mmap.MADV_DONTNEED, start, min(length, len(self._ring) - start))
        self._send({"kind": "done", "seqs": [seq for seq, _, _ in released]})

    def _send(self, message: dict[str, object]) -> None:
        self._socket.send(json.dumps({**message, "member": self.member}).encode())

    def close(self) -> None:
        """Release what this member holds and tell the loader it left (training ended or stopped)."""
        if self._socket is not None:
            self._release(len(self._held))
            if not self._ended:
                self._send({"kind": "bye"})
            self._socket.close()  # lingers up to a second to deliver those
            self._context.term()
            self._socket = self._context = None
