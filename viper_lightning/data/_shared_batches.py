"""One input pipeline for an ensemble, a member's side: the loader's batches (see BatchLoader),
as tensors viewing the shared ring."""

from __future__ import annotations

import logging
import mmap
import os
import socket
import time
from collections import deque
from collections.abc import Iterator

import numpy
import torch
from torch.utils.data import IterableDataset

from .._errors import ConfigurationError, IntegrityError, TransferError
from .._layout import Layout
from ..storage._shm import _address_of, open_ours
from ..transport._messages import canonical_json, is_count
from ._ring import HEADER_BYTES, MAX_MESSAGE_BYTES, RING, SOCKET, peer, receive

__all__ = ["SharedBatches"]

log = logging.getLogger("viper_lightning.data")

CONNECT_RETRY_S = 0.05


class SharedBatches(IterableDataset):
    """A trainer process's side: the loader's batches, as tensors viewing the shared ring.

    Use it as the dataset of a DataLoader with `batch_size=None` and `num_workers=0` (the batches
    are made already). Each epoch of the DataLoader is one epoch the loader serves (an epoch left
    early, by `limit_train_batches` say, skips the rest of the loader's). A batch is released to
    the loader `hold` batches later, since Lightning fetches one batch ahead of the step it runs.
    The tensors view the ring: a step that writes its batch writes a private copy, never the ring
    (dropped before the slot's next batch is yielded); but a tensor kept after its batch was
    released shows whatever the loader writes into that slot next: clone what you keep beyond
    the step (a metric's targets, an example batch). The member may start before the loader. An
    epoch left early still costs the loader the rest of its epoch, which it makes for the others.

    Args:
        directory: the loader's directory (BatchLoader.directory).
        member: this member's number (0 to K-1).
        hold: batches kept before releasing one: more than the DataLoader's consumer fetches ahead
            of its use (2 under Lightning; with less, a step may train on a later batch unseen),
            and fewer than the loader's slots.
        timeout: seconds to wait for a loader to be there at the start (then an error); later,
            seconds without a word from the loader before asking whether it is there: a loader
            that answers is waiting for a slower member, or for its next batch, and is waited
            for; one silent for another `timeout` is an error.
    """

    def __init__(self, directory: str, member: int, hold: int = 2, timeout: float = 120.0) -> None:
        super().__init__()
        if not is_count(hold) or hold < 1 or not is_count(member):
            raise ConfigurationError(f"SharedBatches(member={member}, hold={hold}): a member number of 0 or more, and "
                                     "a hold of at least 1 batch (the one its step trains on)")
        self.directory, self.member, self.hold, self.timeout = directory, member, hold, timeout
        self._socket: socket.socket | None = None
        self._ring_fd: int | None = None
        self._ring: mmap.mmap | None = None
        self._written: _WrittenPages | None = None
        self._buffer = bytearray(MAX_MESSAGE_BYTES)
        self._held: deque[tuple[int, int]] = deque()  # (seq, header offset) of each batch not released
        self._layout: Layout | None = None  # the loader sends a layout only when it changes
        self._views: dict[int, tuple[Layout, dict[str, torch.Tensor]]] = {}  # by offset in the ring
        self._state = "between epochs"  # or "in an epoch", or "ended"
        self.batches_seen = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._connect()
        self._release(len(self._held))  # the previous epoch's batches are done with
        skipping = self._state == "in an epoch"  # the last epoch was left early: the loader's goes on
        while self._state != "ended":
            message = self._next_message()
            kind = message.get("kind")
            if kind == "batch":
                batch = self._batch(message)
                if skipping:
                    self._release(len(self._held))
                    continue
                self._state = "in an epoch"
                self.batches_seen += 1
                yield batch
            elif kind == "epoch_end":
                if skipping:
                    skipping = False
                    continue
                self._state = "between epochs"
                return
            elif kind == "end":
                self._state = "ended"
                self._release(len(self._held))
                self._send({"kind": "bye"})
            else:
                self._raise_for(kind, message)

    def _raise_for(self, kind: object, message: dict) -> None:
        """A message that ends this member: the loader stopped, refused or dropped it (or an unknown kind)."""
        why = message.get("why") if isinstance(message.get("why"), str) else "no reason given"
        if kind == "stopped":
            raise TransferError(f"ensemble member {self.member}: the loader stopped serving: {why}")
        if kind == "refused":
            raise ConfigurationError(f"ensemble member {self.member}: the loader at {self.directory} refused it: {why}")
        if kind == "dropped":
            raise TransferError(f"ensemble member {self.member}: the loader dropped it (it held a batch past the "
                                "loader's member_timeout); the batches it held may have been overwritten")
        raise IntegrityError(f"ensemble member {self.member}: a message of unknown kind {kind!r} from the loader")

    def _connect(self) -> None:
        if self._socket is not None:
            return
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = os.path.join(self.directory, SOCKET)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                connection.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    connection.close()
                    raise TransferError(f"ensemble member {self.member}: no loader at {self.directory} within "
                                        f"{self.timeout:.0f} s: start the BatchLoader") from None
                time.sleep(CONNECT_RETRY_S)  # the loader may start after its members
        pid, uid = peer(connection)
        fd = open_ours(os.path.join(self.directory, RING)) if uid == os.geteuid() else None
        if fd is None:
            connection.close()
            raise ConfigurationError(f"ensemble member {self.member}: the loader at {self.directory} (pid {pid}, uid "
                                     f"{uid}) is not this user's, or has no ring: start your own BatchLoader")
        self._ring_fd = fd
        self._ring = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._written = _WrittenPages(self._ring)
        connection.settimeout(self.timeout)
        self._socket = connection
        self._send({"kind": "hello", "hold": self.hold})

    def _next_message(self) -> dict:
        asked = False
        while True:
            try:
                message = receive(self._socket, self._buffer)
            except TimeoutError:
                if asked:
                    raise TransferError(f"ensemble member {self.member}: no word from the loader at {self.directory} "
                                        f"for {2 * self.timeout:.0f} s, asked or not (does it hang?)") from None
                self._send({"kind": "ping"})
                asked = True
                continue
            except IntegrityError as exc:
                raise IntegrityError(f"ensemble member {self.member}: from the loader, {exc}") from None
            except ConnectionResetError:  # closed with messages of ours unread: said once, then what it sent
                continue
            except ConnectionError:
                message = None
            if message is None:
                raise TransferError(f"ensemble member {self.member}: the loader at {self.directory} closed the "
                                    "connection before the end (it stopped or dropped this member: see its log)")
            if message.get("kind") != "pong":
                return message
            if message.get("state") == "joining":
                log.info("ensemble member %d: no batch for %.0f s; the loader is there, waiting for members to "
                         "join", self.member, self.timeout)
            else:
                log.info("ensemble member %d: no batch for %.0f s; the loader is there, waiting for member(s) %s",
                         self.member, self.timeout, message.get("waiting_for"))
            asked = False

    def _batch(self, message: dict) -> dict[str, torch.Tensor]:
        if "layout" in message:
            self._layout = Layout.from_json(message["layout"], message.get("nbytes"))
        layout = self._layout
        offset, seq = message.get("offset"), message.get("seq")
        if layout is None:
            raise IntegrityError(f"ensemble member {self.member}: batch {seq!r} came without a layout, and none before")
        if not is_count(offset) or offset < HEADER_BYTES or offset + layout.nbytes > len(self._ring) or not is_count(seq):
            raise IntegrityError(f"ensemble member {self.member}: a batch at {offset!r} lies outside the ring")
        # MAP_PRIVATE: a page this process wrote (a step's in-place op on an earlier batch in this
        # slot, even after its release) is its own copy, which would hide the ring: dropped first
        start = (offset - HEADER_BYTES) // mmap.PAGESIZE * mmap.PAGESIZE
        self._written.drop(start, min(-(-(offset + layout.nbytes - start) // mmap.PAGESIZE) * mmap.PAGESIZE,
                                      len(self._ring) - start))
        views = self._views.get(offset)  # a slot's tensors are made once per layout; each batch gets aliases
        if views is None or views[0] is not layout:
            buffer = torch.frombuffer(self._ring, dtype=torch.uint8, count=layout.nbytes, offset=offset)
            views = self._views[offset] = (layout, layout.views(buffer))
        self._held.append((seq, offset - HEADER_BYTES))
        if len(self._held) > self.hold:
            self._release(len(self._held) - self.hold)
        return {name: tensor.detach() for name, tensor in views[1].items()}

    def _release(self, count_: int) -> None:
        if count_ <= 0 or self._socket is None:
            return
        released = [self._held.popleft() for _ in range(count_)]
        for seq, header in released:
            if int.from_bytes(os.pread(self._ring_fd, 8, header), "little") != seq:  # the ring's, not a private copy
                raise IntegrityError(f"ensemble member {self.member}: batch {seq} was overwritten while in use (the "
                                     "loader dropped this member?); its steps may have trained on another batch")
        self._send({"kind": "done", "seqs": [seq for seq, _ in released]})

    def _send(self, message: dict[str, object]) -> None:
        try:
            self._socket.send(canonical_json({**message, "member": self.member}))
        except OSError as exc:
            raise TransferError(f"ensemble member {self.member}: the loader at {self.directory} is gone "
                                f"({exc.strerror or exc})") from None

    def close(self) -> None:
        """Release what this member holds and tell the loader it left (training ended or stopped)."""
        if self._socket is not None:
            try:
                self._release(len(self._held))
                if self._state != "ended":
                    self._send({"kind": "bye"})
            except (TransferError, IntegrityError):
                pass  # the loader is gone, or dropped this member: nothing to tell it
            finally:
                self._socket.close()
                self._written.close()
                os.close(self._ring_fd)
                self._socket = self._written = self._ring_fd = None


class _WrittenPages:
    """The pages of a private mapping of the ring that this process wrote (its own copies, which
    would hide the next batches in their slot), read from /proc/self/pagemap so that only those
    are dropped: the pages it only read stay mapped to the ring, and the next batch in the slot
    costs no page faults. Without pagemap, every page of the range is dropped."""

    PRESENT, SWAPPED, SHARED = 1 << 63, 1 << 62, 1 << 61  # pagemap bits: in memory, swapped out, a file's page

    def __init__(self, mapping: mmap.mmap) -> None:
        self.mapping, self.base = mapping, _address_of(mapping)
        self._masks: tuple[int, int, int] = (0, 0, 0)  # each bit in every entry of the largest range yet, as one int
        self._mask_pages = 0
        try:
            self.fd: int | None = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = None

    def drop(self, start: int, length: int) -> None:
        pages = length // mmap.PAGESIZE
        if pages <= 0:
            return
        try:
            raw = os.pread(self.fd, 8 * pages, 8 * ((self.base + start) // mmap.PAGESIZE)) if self.fd is not None else b""
        except OSError:
            raw = b""
        if len(raw) != 8 * pages:
            self.mapping.madvise(mmap.MADV_DONTNEED, start, length)
            return
        # every entry at once, as one integer: most batches find nothing written, in a few operations
        if pages > self._mask_pages:  # grows to a slot's pages, once
            self._masks = tuple(int.from_bytes(bit.to_bytes(8, "little") * pages, "little")
                                for bit in (self.PRESENT, self.SWAPPED, self.SHARED))
            self._mask_pages = pages
        entries, (present, swapped, shared) = int.from_bytes(raw, "little"), self._masks
        written = (entries & swapped) << 1 | ((entries & present) & ~((entries & shared) << 2))
        if not written:
            return
        flags = numpy.frombuffer(written.to_bytes(8 * pages, "little"), dtype=numpy.uint64) != 0
        pages_written = numpy.flatnonzero(flags)
        for run in numpy.split(pages_written, numpy.flatnonzero(numpy.diff(pages_written) != 1) + 1):
            self.mapping.madvise(mmap.MADV_DONTNEED, start + int(run[0]) * mmap.PAGESIZE, len(run) * mmap.PAGESIZE)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
