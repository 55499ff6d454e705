"""One input pipeline for an ensemble, the loader's side: it reads and preprocesses each batch
once, and K trainer processes (SharedBatches) read it from shared memory.

The loader writes each batch into a slot of a ring in /dev/shm and tells every member which slot
holds it; a member maps the ring and yields tensors that view the slot, so no member copies the
batch. A slot is written again only once every member still there said it is done with it: the
slowest member sets the pace, and the ring's size bounds how far the loader runs ahead. A member
whose connection closes before the end (its process is gone, wherever it runs), or that holds the
oldest batch while the ring stays full past `member_timeout` when one is set, is dropped, and the
others go on. Each slot starts with the sequence number of the batch in it, which a member checks
when it releases the batch: a batch overwritten while in use is an error, never silently trained on.

The ring and the loader's socket live in a private directory (mode 0700) of the user who runs
them, and the loader also refuses a connection from another user; messages are JSON, never
pickles (see `_ring`).
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import torch

from .._errors import ConfigurationError, IntegrityError, TransferError
from .._layout import Layout
from ._allocator import keep_freed_memory
from ._ring import HEADER_BYTES, MAX_MESSAGE_BYTES, RING, SOCKET, count, encode, peer, receive

__all__ = ["BatchLoader"]

log = logging.getLogger("viper_lightning.data")

POLL_S = 0.1
DEFAULT_KEEP_FREED_BYTES = 256 * 1024 * 1024
MEMBER_MESSAGE_BYTES = 64 * 1024  # a member sends only small messages: hello, done, bye


@dataclass
class _Member:
    number: int
    connection: socket.socket
    pid: int  # as the kernel gave it at connect (for the log)
    layout: Layout | None = None  # the layout this member was sent last
    outbox: deque[bytes] = field(default_factory=deque)  # messages its socket had no room for yet


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
            however slow). A member whose connection closes is dropped at once.
        keep_freed_bytes: when serving starts, have this process's allocator keep up to this much
            freed memory for the next batches (see keep_freed_memory: glibc would otherwise give
            each batch's temporaries back to the kernel and fault them in afresh for the next);
            None leaves the allocator as it is.
    """

    def __init__(self, members: int, slot_bytes: int, slots: int = 6, directory: str | None = None,
                 join_timeout: float = 120.0, member_timeout: float | None = None,
                 keep_freed_bytes: int | None = DEFAULT_KEEP_FREED_BYTES) -> None:
        if members < 1 or slots < 2 or slot_bytes < 1:
            raise ConfigurationError(f"BatchLoader(members={members}, slots={slots}, slot_bytes={slot_bytes}): need "
                                     "at least one member, two slots and one byte per slot")
        # whole pages, so that members drop a slot's pages on their own
        slot_bytes = -(-(slot_bytes + HEADER_BYTES) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.members_expected, self.slots, self.slot_bytes = members, slots, slot_bytes
        self.join_timeout, self.member_timeout, self.keep_freed_bytes = join_timeout, member_timeout, keep_freed_bytes
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = directory or tempfile.mkdtemp(prefix="viper-pipeline-", dir=base)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        fd = os.open(os.path.join(self.directory, RING), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, slots * slot_bytes)
            self._ring = mmap.mmap(fd, slots * slot_bytes)
        finally:
            os.close(fd)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(os.path.join(self.directory, SOCKET))  # after the ring: a member connects, then maps
        self._listener.listen(max(members, 8))
        self._listener.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._listener, select.POLLIN)
        self._pending: dict[int, socket.socket] = {}  # by descriptor: connected, yet to say hello
        self._members: dict[int, _Member] = {}  # by member number
        self._by_fd: dict[int, int] = {}  # descriptor -> member number
        self._buffer = bytearray(MEMBER_MESSAGE_BYTES)
        self._holders: list[set[int]] = [set() for _ in range(slots)]  # members yet to release each slot
        self._free: deque[int] = deque(range(slots))
        self._slot_of: dict[int, int] = {}  # batch sequence number -> its slot, while held
        self._seq = 0
        self._layout: Layout | None = None  # the last batch's
        self._ended = False
        self.dropped: list[int] = []  # members dropped as gone or silent

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
        if self.keep_freed_bytes is not None:
            keep_freed_memory(self.keep_freed_bytes)
        self._wait_for_members()
        try:
            for epoch in range(epochs):
                for batch in batches:
                    if not self._members:
                        raise TransferError("every member of the ensemble is gone; nothing left to serve")
                    self._send_batch(batch, epoch)
                self._announce({"kind": "epoch_end", "epoch": epoch})
        except BaseException as exc:  # the members stop at once, with the reason, rather than wait for a batch
            self._ended = True
            self._announce({"kind": "stopped", "why": f"{type(exc).__name__}: {exc}"[:1000]})
            raise
        self._ended = True
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
        if layout != self._layout:  # members are told a layout once, with the first batch of it
            described = encode({"layout": layout.to_json(), "nbytes": layout.nbytes})
            if len(described) > MAX_MESSAGE_BYTES - 256:
                raise ConfigurationError(
                    f"a batch of {len(layout.tensors)} tensors takes {len(described)} bytes to describe, over the "
                    f"{MAX_MESSAGE_BYTES - 256}-byte message limit; stack its tensors into fewer, larger ones")
            self._layout = layout
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
        message = {"kind": "batch", "seq": self._seq, "epoch": epoch, "offset": start}
        plain, described = encode(message), None
        for member in list(self._members.values()):
            if member.layout == layout:
                self._send(member, plain)
                continue
            if described is None:
                described = encode({**message, "nbytes": layout.nbytes, "layout": layout.to_json()})
            member.layout = layout
            self._send(member, described)

    def _free_slot(self) -> int:
        waiting_since = time.monotonic()
        while not self._free:
            self._receive(POLL_S)
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
                self._send(member, encode({"kind": "dropped"}))
                self._drop(number, f"it held batch {oldest} for over {self.member_timeout:.0f} s while the others waited")

    def _announce(self, message: dict[str, object]) -> None:
        payload = encode(message)
        for member in list(self._members.values()):
            self._send(member, payload)

    def _drain(self) -> None:
        """After the end: until every member released its slots or left (bounded by the timeout)."""
        deadline = time.monotonic() + (self.member_timeout or 60.0)
        while self._members and len(self._free) < self.slots and time.monotonic() < deadline:
            self._receive(POLL_S)

    # -- members ---------------------------------------------------------------------------
    def _send(self, member: _Member, payload: bytes) -> None:
        """Send, or queue what the member's socket has no room for (it is sent as room frees). An
        honest member never has more than two messages per slot unread: one that lets more pile
        up stopped reading, and is dropped."""
        if member.outbox:
            member.outbox.append(payload)
        else:
            try:
                member.connection.send(payload)
                return
            except BlockingIOError:
                member.outbox.append(payload)
                self._poller.modify(member.connection, select.POLLIN | select.POLLOUT)
            except OSError:
                self._drop(member.number, "its connection closed")
                return
        if len(member.outbox) > 2 * self.slots + 8:
            self._drop(member.number, f"{len(member.outbox)} messages to it are unread: it stopped reading")

    def _flush(self, member: _Member) -> None:
        try:
            while member.outbox:
                member.connection.send(member.outbox[0])
                member.outbox.popleft()
        except BlockingIOError:
            return
        except OSError:
            self._drop(member.number, "its connection closed")
            return
        self._poller.modify(member.connection, select.POLLIN)

    def _receive(self, timeout_s: float) -> None:
        for fd, events in self._poller.poll(int(timeout_s * 1000)):
            if fd == self._listener.fileno():
                self._accept()
                continue
            number = self._by_fd.get(fd)
            if number is not None and events & select.POLLOUT:
                self._flush(self._members[number])
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read(fd)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except BlockingIOError:
                return
            pid, uid = peer(connection)
            if uid != os.geteuid():  # the directory is private already: this is a second lock
                log.warning("refused a connection from pid %d of uid %d to %s", pid, uid, self.directory)
                connection.close()
                continue
            connection.setblocking(False)
            self._pending[connection.fileno()] = connection
            self._poller.register(connection, select.POLLIN)

    def _connection(self, fd: int) -> socket.socket | None:
        if fd in self._pending:
            return self._pending[fd]
        number = self._by_fd.get(fd)
        return self._members[number].connection if number is not None else None

    def _read(self, fd: int) -> None:
        while (connection := self._connection(fd)) is not None:
            try:
                message = receive(connection, self._buffer)
            except BlockingIOError:
                return
            except IntegrityError as exc:
                log.warning("ignored a message on %s: %s", self.directory, exc)
                continue
            except OSError:
                message = None
            if message is None:  # closed: the process left or is gone
                self._closed(fd)
                return
            self._handle(fd, message)

    def _handle(self, fd: int, message: dict) -> None:
        kind, number, seqs = message.get("kind"), message.get("member"), message.get("seqs", [])
        if not (count(number) and isinstance(seqs, list) and all(count(seq) for seq in seqs)):
            log.warning("ignored a malformed message on %s", self.directory)
            return
        if kind == "hello" and fd in self._pending:
            connection = self._pending.pop(fd)
            if number in self._members or number in self.dropped or self._ended:
                log.warning("refused a second member %d on %s", number, self.directory)
                self._poller.unregister(connection)
                connection.close()  # it reads the end of its connection, and says why
                return
            self._members[number] = _Member(number, connection, peer(connection)[0])
            self._by_fd[fd] = number
            return
        if self._by_fd.get(fd) != number:
            return  # not a member yet, or a member claiming another's number
        if kind == "done":
            for seq in seqs:
                self._release(number, seq)
        elif kind == "bye":
            self._drop(number, "left")

    def _closed(self, fd: int) -> None:
        connection = self._pending.pop(fd, None)
        if connection is not None:
            self._poller.unregister(connection)
            connection.close()
        elif fd in self._by_fd:
            self._drop(self._by_fd[fd], "left" if self._ended else "its process is gone (its connection closed)")

    def _release(self, member: int, seq: int) -> None:
        slot = self._slot_of.get(seq)
        if slot is None:
            return
        self._holders[slot].discard(member)
        if not self._holders[slot]:
            del self._slot_of[seq]
            self._free.append(slot)

    def _drop(self, number: int, why: str) -> None:
        member = self._members.pop(number, None)
        if member is None:
            return
        del self._by_fd[member.connection.fileno()]
        self._poller.unregister(member.connection)
        member.connection.close()
        if why != "left":
            self.dropped.append(number)
            log.warning("ensemble member %d (pid %d) dropped (%s); the others go on", number, member.pid, why)
        for seq in list(self._slot_of):
            self._release(number, seq)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        for member in list(self._members.values()):
            member.connection.close()
        for connection in self._pending.values():
            connection.close()
        self._members.clear()
        self._pending.clear()
        self._listener.close()
        self._ring.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
