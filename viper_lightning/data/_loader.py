"""One input pipeline for an ensemble, the loader's side: it reads and preprocesses each batch
once, and K trainer processes (SharedBatches) read it from shared memory.

The loader writes each batch into a slot of a ring in /dev/shm and tells every member which slot
holds it; a member maps the ring and yields tensors that view the slot, so no member copies the
batch. A slot is written again only once every member still there said it is done with it: the
slowest member sets the pace, and the ring's size bounds how far the loader runs ahead. A member
whose connection closes before the end (its process is gone, wherever it runs) is dropped, and so,
when `member_timeout` is set, are the members that hold the oldest batch while the ring stays full
that long; the others go on. Each slot starts with the sequence number of the batch in it, which a
member checks when it releases the batch: as long as a member holds each batch until its step is
done (its `hold`), a batch overwritten while in use is an error, never silently trained on.

The ring and the loader's socket live in a private directory (mode 0700) of the user who runs
them, and the loader also refuses a connection from another user; messages are JSON, never
pickles (see `_ring`).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import shutil
import socket
import stat
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import torch

from .._errors import ConfigurationError, IntegrityError, TransferError
from .._layout import Layout
from ._allocator import keep_freed_memory
from ..transport._messages import canonical_json, is_count
from ._ring import HEADER_BYTES, MAX_MESSAGE_BYTES, RING, SOCKET, peer, receive

__all__ = ["BatchLoader"]

log = logging.getLogger("viper_lightning.data")

POLL_S = 0.1
DEFAULT_KEEP_FREED_BYTES = 256 * 1024 * 1024
MEMBER_MESSAGE_BYTES = 64 * 1024  # a member sends only small messages: hello, done, ping, bye
READS_PER_ROUND = 64  # messages taken from one connection before the others get a turn
MAX_PENDING = 64  # connections yet to say hello beyond the members expected; the oldest goes when more come


@dataclass
class _Member:
    number: int
    connection: socket.socket
    pid: int  # as the kernel gave it at connect (for the log)
    layout: Layout | None = None  # the layout this member was sent last
    outbox: deque[bytes] = field(default_factory=deque)  # messages its socket had no room for yet
    closed: bool = False  # a send failed: its connection is being read to its end, and sent nothing more


class _AllLeft(Exception):
    """Every member said it left: serving ends early, and well."""


class _Slots:
    """The ring and who still holds each of its slots (the loader's only shared state)."""

    def __init__(self, path: str, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:  # every page now: a full /dev/shm later would kill the loader with SIGBUS mid-write
                os.posix_fallocate(fd, 0, slots * slot_bytes)
            except OSError as exc:
                os.unlink(path)
                raise ConfigurationError(
                    f"no room for a ring of {slots} slots of {slot_bytes} bytes in {os.path.dirname(path)} "
                    f"({exc.strerror}): give the file system more room (Docker: --shm-size), or BatchLoader fewer "
                    "slots or a smaller slot_bytes") from None
            self.mapping = mmap.mmap(fd, slots * slot_bytes)
        finally:
            os.close(fd)
        self.holders: list[set[int]] = [set() for _ in range(slots)]  # members yet to release each slot
        self.free: deque[int] = deque(range(slots))
        self.slot_of: dict[int, int] = {}  # batch sequence number -> its slot, while held

    def write(self, seq: int, batch: Mapping[str, torch.Tensor], layout: Layout, holders: set[int]) -> int:
        """Write a batch into the next free slot; returns where its tensors start in the ring."""
        slot = self.free.popleft()
        start = slot * self.slot_bytes + HEADER_BYTES
        self.mapping[start - HEADER_BYTES:start - HEADER_BYTES + 8] = seq.to_bytes(8, "little")
        views = layout.views(torch.frombuffer(self.mapping, dtype=torch.uint8, count=layout.nbytes, offset=start))
        for spec in layout.unique_tensors():
            views[spec.name].copy_(batch[spec.name])
        if holders:
            self.slot_of[seq], self.holders[slot] = slot, set(holders)
        else:
            self.free.append(slot)
        return start

    def release(self, member: int, seq: int) -> None:
        slot = self.slot_of.get(seq)
        if slot is None:
            return
        self.holders[slot].discard(member)
        if not self.holders[slot]:
            del self.slot_of[seq]
            self.free.append(slot)

    def release_all(self, member: int) -> None:
        for seq in list(self.slot_of):
            self.release(member, seq)

    def oldest(self) -> tuple[int, set[int]]:
        seq = min(self.slot_of)
        return seq, set(self.holders[self.slot_of[seq]])

    def close(self) -> None:
        self.mapping.close()


class BatchLoader:
    """The loader's side: serves batches (dicts of tensors) to `members` trainer processes,
    numbered 0 to `members` - 1.

    Args:
        members: how many trainer processes read the batches.
        slot_bytes: the largest batch, in bytes (its tensors packed; see viper_lightning.Layout).
        slots: the ring's slots: how many batches may be out at once (more than each member's
            `hold`, which a member says when it joins: one with a `hold` of `slots` or more is
            refused; 2 + `hold` lets the loader run ahead of the slowest member).
        directory: where the ring and the socket go (default: a fresh private directory in
            /dev/shm); members are given the same path. One that exists must be this user's.
        join_timeout: seconds to wait for every member to join before serving those that did
            (a member that comes once serving started is refused: it would start mid-epoch).
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
        self.members_expected = members
        self.join_timeout, self.member_timeout, self.keep_freed_bytes = join_timeout, member_timeout, keep_freed_bytes
        self.directory, self._made_directory = _private_directory(directory)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._slots = _Slots(os.path.join(self.directory, RING), slots, slot_bytes)
            self._listener.bind(os.path.join(self.directory, SOCKET))  # after the ring: a member connects, then maps
            self._listener.listen(max(members, 8))
        except BaseException:
            self._listener.close()
            _remove(self.directory, self._made_directory)
            raise
        self._listener.setblocking(False)
        self._poller = select.poll()
        self._poller.register(self._listener, select.POLLIN)
        self._pending: dict[int, socket.socket] = {}  # by descriptor: connected, yet to say hello
        self._members: dict[int, _Member] = {}  # by member number
        self._by_fd: dict[int, int] = {}  # descriptor -> member number
        self._buffer = bytearray(MEMBER_MESSAGE_BYTES)
        self._seq = 0
        self._layout: Layout | None = None  # the last batch's
        self._state = "joining"  # then "serving", then "ended"
        self._accept_again: float | None = None  # when to take connections again, after accept() failed
        self.dropped: list[int] = []  # members dropped: gone, holding the oldest batch too long, or not reading

    @property
    def slots(self) -> int:
        return self._slots.slots

    @property
    def slot_bytes(self) -> int:
        return self._slots.slot_bytes

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
        return self.slots - len(self._slots.free)

    # -- serving -------------------------------------------------------------------------------
    def serve(self, batches: Iterable[Mapping[str, torch.Tensor]], epochs: int = 1) -> int:
        """Send every batch of `batches` to every member, `epochs` times (each epoch iterates
        `batches` again and ends with a marker); returns how many batches went out. Serving ends
        early, and well, when every member left (its Trainer ended: max_steps, early stopping).
        A BatchLoader serves once: members joining later are refused."""
        if epochs > 1 and isinstance(batches, Iterator):
            raise ConfigurationError(f"serve(..., epochs={epochs}) got an iterator, which only one epoch can read; "
                                     "give it an iterable that makes each epoch anew (a list, or a class with __iter__)")
        if self.keep_freed_bytes is not None and not keep_freed_memory(self.keep_freed_bytes):
            log.info("the C library's allocator keeps its own policy for freed memory (not glibc, or it refused)")
        try:
            self._wait_for_members()
            self._state = "serving"
            for epoch in range(epochs):
                for batch in batches:
                    self._send_batch(batch, epoch)
                self._announce({"kind": "epoch_end", "epoch": epoch})
        except _AllLeft:  # every member ended its training (max_steps, early stopping): so does the loader
            log.info("every member of the ensemble left after %d batches; serving ends", self._seq)
        except BaseException as exc:  # the members stop at once, with the reason, rather than wait for a batch
            self._state = "ended"
            self._announce({"kind": "stopped", "why": f"{type(exc).__name__}: {exc}"[:1000]})
            raise
        self._state = "ended"
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
            described = canonical_json({"layout": layout.to_json(), "nbytes": layout.nbytes})
            if len(described) > MAX_MESSAGE_BYTES - 256:
                raise ConfigurationError(
                    f"a batch of {len(layout.tensors)} tensors takes {len(described)} bytes to describe, over the "
                    f"{MAX_MESSAGE_BYTES - 256}-byte message limit; stack its tensors into fewer, larger ones")
            self._layout = layout
        self._wait_for_free_slot()
        if not self._members:
            if self.dropped:
                raise TransferError(f"every member of the ensemble is gone (dropped: {self.dropped}); nothing left "
                                    "to serve")
            raise _AllLeft
        self._seq += 1
        start = self._slots.write(self._seq, batch, layout, set(self._members))
        message = {"kind": "batch", "seq": self._seq, "epoch": epoch, "offset": start}
        plain, described = canonical_json(message), None
        for member in list(self._members.values()):
            if member.layout == layout:
                self._send(member, plain)
                continue
            if described is None:
                described = canonical_json({**message, "nbytes": layout.nbytes, "layout": layout.to_json()})
            member.layout = layout
            self._send(member, described)

    def _wait_for_free_slot(self) -> None:
        waiting_since = time.monotonic()
        while not self._slots.free:
            self._receive(POLL_S)
            if self.member_timeout is not None and time.monotonic() - waiting_since > self.member_timeout:
                self._drop_blocking()
                waiting_since = time.monotonic()

    def _drop_blocking(self) -> None:
        """The ring has been full for member_timeout: drop the members that still hold its oldest
        batch (the others hold only newer ones, waiting for the next), and tell them."""
        oldest, holders = self._slots.oldest()
        for number in sorted(holders):
            member = self._members.get(number)
            if member is not None:
                self._send(member, canonical_json({"kind": "dropped"}))
                self._drop(number, f"it held batch {oldest} for over {self.member_timeout:.0f} s while the others waited")

    def _announce(self, message: dict[str, object]) -> None:
        payload = canonical_json(message)
        for member in list(self._members.values()):
            self._send(member, payload)

    def _drain(self) -> None:
        """After the end: until every member released its slots or left (bounded by the timeout)."""
        deadline = time.monotonic() + (self.member_timeout or 60.0)
        while self._members and self.in_flight and time.monotonic() < deadline:
            self._receive(POLL_S)

    # -- members ---------------------------------------------------------------------------
    def _send(self, member: _Member, payload: bytes) -> None:
        """Send, or queue what the member's socket has no room for (it is sent as room frees). An
        honest member never has more than two messages per slot unread: one that lets more pile
        up stopped reading, and is dropped."""
        if member.closed:
            return
        if member.outbox:
            member.outbox.append(payload)
        else:
            try:
                member.connection.send(payload)
                return
            except BlockingIOError:
                member.outbox.append(payload)
                self._poller.modify(member.connection, select.POLLIN | select.POLLOUT)
            except OSError as exc:
                self._send_failed(member, exc)
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
        except OSError as exc:
            self._send_failed(member, exc)
            return
        self._poller.modify(member.connection, select.POLLIN)

    def _send_failed(self, member: _Member, exc: OSError) -> None:
        if exc.errno == errno.EMSGSIZE:
            raise ConfigurationError(f"a message of the loader does not fit member {member.number}'s socket buffer "
                                     f"({exc.strerror}): raise net.core.wmem_default, or batch fewer tensors") from None
        member.closed = True
        fd = member.connection.fileno()
        self._read(fd, limit=None)  # what it sent before it closed (a bye, say) decides how it left
        if self._by_fd.get(fd) == member.number:
            self._drop(member.number, "left" if self._state == "ended" else "its connection closed")

    def _receive(self, timeout_s: float) -> None:
        if self._listener.fileno() < 0:
            raise TransferError(f"the loader at {self.directory} was closed while it served")
        if self._accept_again is not None and time.monotonic() >= self._accept_again:
            self._poller.register(self._listener, select.POLLIN)
            self._accept_again = None
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
            except OSError as exc:  # out of descriptors, say: those waiting are taken a second later
                log.warning("could not accept a member's connection on %s: %s", self.directory, exc.strerror)
                self._poller.unregister(self._listener)
                self._accept_again = time.monotonic() + 1.0
                return
            pid, uid = peer(connection)
            if uid != os.geteuid():  # the directory is private already: this is a second lock
                log.warning("refused a connection from pid %d of uid %d to %s", pid, uid, self.directory)
                connection.close()
                continue
            if len(self._pending) >= self.members_expected + MAX_PENDING:  # never said hello: the oldest goes
                oldest = next(iter(self._pending))
                self._poller.unregister(oldest)
                self._pending.pop(oldest).close()
            connection.setblocking(False)
            try:  # room for the largest message (a layout) and the markers behind it, where the host allows
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_MESSAGE_BYTES)
            except OSError:
                pass
            self._pending[connection.fileno()] = connection
            self._poller.register(connection, select.POLLIN)

    def _connection(self, fd: int) -> socket.socket | None:
        if fd in self._pending:
            return self._pending[fd]
        number = self._by_fd.get(fd)
        return self._members[number].connection if number is not None else None

    def _read(self, fd: int, limit: int | None = READS_PER_ROUND) -> None:
        """Take what a connection sent (at most `limit` messages, so that one peer cannot keep the
        loader from the others; the rest waits for the next round)."""
        taken, malformed = 0, 0
        while (connection := self._connection(fd)) is not None and (limit is None or taken < limit):
            taken += 1
            try:
                message = receive(connection, self._buffer)
            except BlockingIOError:
                break
            except IntegrityError as exc:
                if fd in self._pending:  # its first word must be a hello
                    self._closed(fd)
                    return
                malformed += 1
                if malformed == 1:
                    log.warning("ignored a message on %s: %s", self.directory, exc)
                continue
            except ConnectionResetError:
                continue  # it closed with messages of ours unread: said once, then what it sent, then the end
            except OSError:
                message = None
            if message is None:  # closed: the process left or is gone
                self._closed(fd)
                return
            try:
                self._handle(fd, message)
            except IntegrityError as exc:
                malformed += 1
                if malformed == 1:
                    log.warning("ignored a message on %s: %s", self.directory, exc)

    def _handle(self, fd: int, message: dict) -> None:
        kind, number, seqs = message.get("kind"), message.get("member"), message.get("seqs", [])
        if fd in self._pending:  # its first word must be a hello
            if kind == "hello" and is_count(number):
                self._join(fd, number, message.get("hold"))
            else:
                self._closed(fd)
            return
        if not (is_count(number) and isinstance(seqs, list) and all(is_count(seq) for seq in seqs)):
            raise IntegrityError(f"a malformed message from member {self._by_fd.get(fd)}")
        if self._by_fd.get(fd) != number:
            return  # not a member yet, or a member claiming another's number
        if kind == "done":
            for seq in seqs:
                self._slots.release(number, seq)
        elif kind == "ping":  # a member that waited long for a batch asks whether the loader is there
            oldest = sorted(self._slots.oldest()[1]) if self._slots.slot_of and not self._slots.free else []
            self._send(self._members[number], canonical_json({"kind": "pong", "state": self._state, "waiting_for": oldest}))
        elif kind == "bye":
            self._drop(number, "left")

    def _join(self, fd: int, number: int, hold: object) -> None:
        connection = self._pending.pop(fd)
        if number >= self.members_expected:
            why = f"member numbers run from 0 to {self.members_expected - 1}"
        elif number in self._members:
            why = f"member {number} has joined already (another process)"
        elif number in self.dropped:
            why = f"member {number} was dropped, and cannot join again"
        elif self._state != "joining":
            why = "serving has started without it (it would have begun mid-epoch): start members before join_timeout"
        elif not is_count(hold):
            why = "it did not say its hold (a SharedBatches of another version?)"
        elif hold >= self.slots:
            why = f"its hold of {hold} batches leaves the loader no slot of the ring's {self.slots} to write the next in"
        else:
            self._members[number] = _Member(number, connection, peer(connection)[0])
            self._by_fd[fd] = number
            return
        log.warning("refused member %d on %s: %s", number, self.directory, why)
        try:
            connection.send(canonical_json({"kind": "refused", "why": why}))
        except OSError:
            pass
        self._poller.unregister(connection)
        connection.close()

    def _closed(self, fd: int) -> None:
        connection = self._pending.pop(fd, None)
        if connection is not None:
            self._poller.unregister(connection)
            connection.close()
        elif fd in self._by_fd:
            self._drop(self._by_fd[fd], "left" if self._state == "ended" else "its process is gone (its connection closed)")

    def _drop(self, number: int, why: str) -> None:
        member = self._members.pop(number, None)
        if member is None:
            return
        del self._by_fd[member.connection.fileno()]
        self._poller.unregister(member.connection)
        for payload in member.outbox:  # a last word (stopped, dropped) that had no room yet: if it fits now
            try:
                member.connection.send(payload)
            except OSError:
                break
        member.connection.close()
        if why != "left":
            self.dropped.append(number)
            log.warning("ensemble member %d (pid %d) dropped (%s); the others go on", number, member.pid, why)
        self._slots.release_all(number)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        for member in list(self._members.values()):
            member.connection.close()
        for connection in self._pending.values():
            connection.close()
        self._members.clear()
        self._by_fd.clear()
        self._pending.clear()
        self._listener.close()
        self._slots.close()
        _remove(self.directory, self._made_directory)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _private_directory(directory: str | None) -> tuple[str, bool]:
    """A fresh private directory in /dev/shm, or the one given (made, mode 0700, when it does not
    exist), and whether it was made here. One that exists must be a directory of this user's that
    no one else may write in, without a loader's files: a link, another user's, a shared one or a
    loader's leftovers are refused."""
    if directory is None:
        return tempfile.mkdtemp(prefix="viper-pipeline-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None), True
    try:
        os.mkdir(directory, 0o700)
        return directory, True
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise ConfigurationError(f"BatchLoader directory {directory}: its parent does not exist") from None
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ConfigurationError(f"BatchLoader directory {directory} is not a directory of this user's that only "
                                 f"this user may write in (uid {info.st_uid}, mode {stat.filemode(info.st_mode)}): "
                                 "give it a path of your own")
    leftovers = [name for name in (RING, SOCKET) if os.path.lexists(os.path.join(directory, name))]
    if leftovers:
        raise ConfigurationError(f"BatchLoader directory {directory} holds a loader's {' and '.join(leftovers)} "
                                 "already (another loader's, or a crashed one's): remove them or give another path")
    return directory, False


def _remove(directory: str, made: bool) -> None:
    """The loader's own files, and the directory if the loader made it (a user's is left as it was)."""
    for name in (RING, SOCKET):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    if made:
        shutil.rmtree(directory, ignore_errors=True)
