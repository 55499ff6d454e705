"""One input pipeline for an ensemble, a member's side: the loader's batches (see BatchLoader),
as tensors viewing the shared ring."""

from __future__ import annotations

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
from ._ring import HEADER_BYTES, MAX_MESSAGE_BYTES, RING, SOCKET, count, encode, peer, receive

__all__ = ["SharedBatches"]

CONNECT_RETRY_S = 0.05


class SharedBatches(IterableDataset):
    """A trainer process's side: the loader's batches, as tensors viewing the shared ring.

    Use it as the dataset of a DataLoader with `batch_size=None` and `num_workers=0` (the batches
    are made already). Each epoch of the DataLoader is one epoch the loader serves. A batch is
    released to the loader `hold` batches later, since Lightning fetches one batch ahead of the
    step it runs; the views are copy-on-write, so a step that writes its batch writes a private
    copy, never the ring. The member may start before the loader: it waits for it up to `timeout`.

    Args:
        directory: the loader's directory (BatchLoader.directory).
        member: this member's number (0 to K-1).
        hold: batches kept before releasing one (2 under Lightning).
        timeout: seconds without a message from the loader before giving up with an error.
    """

    def __init__(self, directory: str, member: int, hold: int = 2, timeout: float = 120.0) -> None:
        super().__init__()
        self.directory, self.member, self.hold, self.timeout = directory, member, hold, timeout
        self._socket: socket.socket | None = None
        self._ring_fd: int | None = None
        self._ring: mmap.mmap | None = None
        self._written: _WrittenPages | None = None
        self._buffer = bytearray(MAX_MESSAGE_BYTES)
        self._held: deque[tuple[int, int, int]] = deque()  # (seq, offset, nbytes) of each batch not released
        self._layout: Layout | None = None  # the loader sends a layout only when it changes
        self._views: dict[int, tuple[Layout, dict[str, torch.Tensor]]] = {}  # by offset in the ring
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
            elif kind == "stopped":
                why = message.get("why")
                raise TransferError(f"ensemble member {self.member}: the loader stopped serving: "
                                    f"{why if isinstance(why, str) else 'no reason given'}")
            elif kind == "dropped":
                raise TransferError(f"ensemble member {self.member}: the loader dropped it (it held a batch past the "
                                    "loader's member_timeout); the batches it held may have been overwritten")

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
        self._send({"kind": "hello"})

    def _next_message(self) -> dict:
        try:
            message = receive(self._socket, self._buffer)
        except TimeoutError:
            raise TransferError(f"ensemble member {self.member}: no batch from the loader at {self.directory} for "
                                f"{self.timeout:.0f} s (did it stop?)") from None
        except IntegrityError as exc:
            raise IntegrityError(f"ensemble member {self.member}: from the loader, {exc}") from None
        except ConnectionError:  # closed with a message of ours unread
            message = None
        if message is None:
            raise TransferError(f"ensemble member {self.member}: the loader at {self.directory} closed the connection "
                                f"before the end (it stopped, or another process had joined as member {self.member})")
        return message

    def _batch(self, message: dict) -> dict[str, torch.Tensor]:
        if "layout" in message:
            self._layout = Layout.from_json(message["layout"], message.get("nbytes"))
        layout = self._layout
        offset, seq = message.get("offset"), message.get("seq")
        if layout is None:
            raise IntegrityError(f"ensemble member {self.member}: batch {seq!r} came without a layout, and none before")
        if not count(offset) or offset < HEADER_BYTES or offset + layout.nbytes > len(self._ring) or not count(seq):
            raise IntegrityError(f"ensemble member {self.member}: a batch at {offset!r} lies outside the ring")
        # MAP_PRIVATE: a page a step writes becomes this process's own copy, dropped on release
        # (the others keep showing the ring, so that the next batch in the slot is read from it).
        # A slot's tensors are made once per layout; each batch gets its own detached aliases of them.
        views = self._views.get(offset)
        if views is None or views[0] is not layout:
            buffer = torch.frombuffer(self._ring, dtype=torch.uint8, count=layout.nbytes, offset=offset)
            views = self._views[offset] = (layout, layout.views(buffer))
        self._held.append((seq, offset, layout.nbytes))
        self.batches_seen += 1
        if len(self._held) > self.hold:
            self._release(len(self._held) - self.hold)
        return {name: tensor.detach() for name, tensor in views[1].items()}

    def _release(self, count_: int) -> None:
        if count_ <= 0 or self._socket is None:
            return
        released = [self._held.popleft() for _ in range(count_)]
        for seq, offset, nbytes in released:
            header = offset - HEADER_BYTES
            if int.from_bytes(os.pread(self._ring_fd, 8, header), "little") != seq:  # the ring's, not a private copy
                raise IntegrityError(f"ensemble member {self.member}: batch {seq} was overwritten while in use (the "
                                     "loader dropped this member?); its steps may have trained on another batch")
            start = header - header % mmap.PAGESIZE
            length = min(-(-(offset + nbytes - start) // mmap.PAGESIZE) * mmap.PAGESIZE, len(self._ring) - start)
            self._written.drop(start, length)
        self._send({"kind": "done", "seqs": [seq for seq, _, _ in released]})

    def _send(self, message: dict[str, object]) -> None:
        try:
            self._socket.send(encode({**message, "member": self.member}))
        except OSError as exc:
            raise TransferError(f"ensemble member {self.member}: the loader at {self.directory} is gone "
                                f"({exc.strerror or exc})") from None

    def close(self) -> None:
        """Release what this member holds and tell the loader it left (training ended or stopped)."""
        if self._socket is not None:
            try:
                self._release(len(self._held))
                if not self._ended:
                    self._send({"kind": "bye"})
            except TransferError:
                pass  # the loader is gone: nothing to tell it
            finally:
                self._socket.close()
                self._written.close()
                os.close(self._ring_fd)
                self._socket = self._written = self._ring_fd = None


class _WrittenPages:
    """The pages of a private mapping of the ring that this process wrote (its own copies, which
    would hide the next batches in their slot), read from /proc/self/pagemap so that a release
    drops only those: the pages it only read stay mapped to the ring, and the next batch in the
    slot costs no page faults. Without pagemap, a release drops every page of the batch."""

    PRESENT, SWAPPED, SHARED = 1 << 63, 1 << 62, 1 << 61  # pagemap bits: in memory, swapped out, a file's page

    def __init__(self, mapping: mmap.mmap) -> None:
        self.mapping, self.base = mapping, _address_of(mapping)
        self._masks: dict[int, tuple[int, int, int]] = {}  # pages -> each bit in every entry, as one int
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
        # every entry at once, as one integer: most releases find nothing written, in a few operations
        entries, (present, swapped, shared) = int.from_bytes(raw, "little"), self._masks_for(pages)
        written = (entries & swapped) << 1 | ((entries & present) & ~((entries & shared) << 2))
        if not written:
            return
        flags = numpy.frombuffer(written.to_bytes(8 * pages, "little"), dtype=numpy.uint64) != 0
        pages_written = numpy.flatnonzero(flags)
        for run in numpy.split(pages_written, numpy.flatnonzero(numpy.diff(pages_written) != 1) + 1):
            self.mapping.madvise(mmap.MADV_DONTNEED, start + int(run[0]) * mmap.PAGESIZE, len(run) * mmap.PAGESIZE)

    def _masks_for(self, pages: int) -> tuple[int, int, int]:
        masks = self._masks.get(pages)
        if masks is None:
            masks = tuple(int.from_bytes(bit.to_bytes(8, "little") * pages, "little")
                          for bit in (self.PRESENT, self.SWAPPED, self.SHARED))
            self._masks[pages] = masks
        return masks

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
