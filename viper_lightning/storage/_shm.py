"""The DRAM tier's memory: POSIX shared-memory segments in /dev/shm.

A segment is a 64-byte header followed by one snapshot's packed bytes. Segments are reused
(renamed, then overwritten) rather than created per version, because faulting fresh pages in
costs far more than a warm copy. Reuse is made safe for readers with a
seqlock: the producer bumps `generation` and clears READY before overwriting; a reader checks
the header before and after its copy and discards the copy if either changed.

Consumers may also use a segment as their weights without copying (zero-copy): they hold a
shared flock on it for as long as they serve from it, and the producer reuses a segment only
when it gets the exclusive lock, so weights in use are never overwritten.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import logging
import mmap
import os
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import torch

from .._errors import ConfigurationError, TransferError

__all__ = ["SHM_DIR", "Segment", "SegmentView", "ReadOnlyMappings", "LockedMapping", "ZeroCopyMappings",
           "reclaim_stale_segments", "segment_prefix", "read_header", "open_ours"]

log = logging.getLogger("viper_lightning.subscriber")

SHM_DIR = "/dev/shm"
MAGIC = b"VIPERSHM"
HEADER = struct.Struct("<8sQQQQQ")  # magic, version, state, nbytes, generation, owner pid
HEADER_BYTES = 64
FREE, WRITING, READY = 0, 1, 2
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python 3.11 lacks the name


def segment_prefix(model: str) -> str:
    return f"viper.{model}."


@dataclass(frozen=True)
class _Header:
    version: int
    state: int
    nbytes: int
    generation: int
    owner: int


def read_header(buffer: mmap.mmap | bytes, what: str) -> _Header:
    magic, version, state, nbytes, generation, owner = HEADER.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise TransferError(f"{what} is not a Viper segment (bad magic)")
    return _Header(version, state, nbytes, generation, owner)


class Segment:
    """A producer-owned segment: created 0600, written in place, renamed per version."""

    def __init__(self, name: str, capacity: int) -> None:
        if not os.path.isdir(SHM_DIR):
            raise ConfigurationError(f"{SHM_DIR} does not exist, so the DRAM tier cannot work here; "
                                     "set dram_versions=0 and use pfs_root")
        self.name = name
        self.capacity = capacity
        self._fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve the memory now: tmpfs files are sparse, and a full /dev/shm would otherwise
            # surface as SIGBUS on the training thread's first copy instead of as an error here.
            os.posix_fallocate(self._fd, 0, HEADER_BYTES + max(capacity, 1))
            self._map = mmap.mmap(self._fd, HEADER_BYTES + max(capacity, 1))
        except OSError as exc:
            os.close(self._fd)
            os.unlink(self.path)
            raise ConfigurationError(
                f"cannot reserve {capacity} bytes in {SHM_DIR} ({exc.strerror}); enlarge it (e.g. "
                "docker --shm-size) or turn the DRAM tier off with dram_versions=0") from None
        except BaseException:
            os.close(self._fd)
            os.unlink(self.path)
            raise
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # new: nobody else can hold it yet
        self._generation = 0
        self._write_header(0, FREE, 0)
        array = numpy.frombuffer(self._map, dtype=numpy.uint8, count=capacity, offset=HEADER_BYTES)
        self.buffer = torch.from_numpy(array)  # the snapshot is copied straight in here

    @classmethod
    def claimed(cls, name: str, capacity: int, temporary: str, reuse: list[str] = ()) -> Segment:
        """A segment that appears under `name` already locked and marked WRITING, so whoever
        finds it there can wait on its lock; FileExistsError when `name` exists. It is made
        (or, when one of the `reuse` paths is of the right size and nobody holds it, taken
        over: its pages are already in) under `temporary`, then linked to `name`: an atomic claim."""
        segment = next(filter(None, (cls._taken_over(path, capacity, temporary) for path in reuse)), None)
        segment = segment if segment is not None else cls(temporary, capacity)
        segment.begin_write()
        try:
            os.link(segment.path, os.path.join(SHM_DIR, name))
        except BaseException:
            segment.unlink()
            raise
        os.unlink(segment.path)
        segment.name = name
        return segment

    @classmethod
    def _taken_over(cls, path: str, capacity: int, temporary: str) -> Segment | None:
        """The segment at `path`, renamed to `temporary` and locked for rewriting; None unless it
        is ours, of `capacity`, and nobody holds it."""
        fd = open_ours(path, os.O_RDWR)
        if fd is None:
            return None
        try:
            info = os.fstat(fd)
            if info.st_size != HEADER_BYTES + max(capacity, 1):
                raise BlockingIOError
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.lstat(path).st_ino != info.st_ino:
                raise BlockingIOError  # the name went to another file meanwhile: not ours to move
            mapping = mmap.mmap(fd, info.st_size)
            header = read_header(mapping, path)
            os.rename(path, os.path.join(SHM_DIR, temporary))
        except (OSError, TransferError):
            os.close(fd)
            return None
        segment = cls.__new__(cls)
        segment.name, segment.capacity, segment._fd, segment._map = temporary, capacity, fd, mapping
        segment._generation = header.generation  # carried on, so a reader's seqlock sees the rewrite
        segment.buffer = torch.from_numpy(numpy.frombuffer(mapping, dtype=numpy.uint8, count=capacity,
                                                           offset=HEADER_BYTES))
        return segment

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    def populate(self) -> None:
        """Fault every page of the mapping in now, so that the first copy into it runs at memory
        speed: a copy into fresh pages pays a fault per page, several times the copy itself.
        MADV_POPULATE_WRITE (Linux 5.14+) maps them without writing; elsewhere one byte per page
        is written (the contents do not matter: a segment is written whole before it is read)."""
        populate(self._map, _MADV_POPULATE_WRITE)

    def try_lock(self) -> bool:
        """Take the segment for rewriting unless a consumer still serves from it."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def begin_write(self) -> None:
        """Invalidate readers of the previous contents before they are overwritten
        (the caller holds the lock from `try_lock` or creation)."""
        self._generation += 1
        self._write_header(0, WRITING, 0)

    def publish(self, version: int, nbytes: int, name: str) -> None:
        """Contents complete: give the segment its version name, mark it READY, unlock it."""
        self.rename(name)
        self._write_header(version, READY, nbytes)
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def retire(self, name: str) -> None:
        """Evicted: the version's name disappears and the memory waits for reuse."""
        self._generation += 1
        self._write_header(0, FREE, 0)
        self.rename(name)

    def rename(self, name: str) -> bool:
        """Give the segment `name`; False (and the old name kept) when another user's file holds
        it. Notices name segments as they are, so a squatted name costs nothing but the log line."""
        if name == self.name:
            return True
        target = os.path.join(SHM_DIR, name)
        if os.path.lexists(target) and os.lstat(target).st_uid != os.geteuid():
            log.warning("%s is another user's file; the segment keeps the name %s", target, self.name)
            return False
        try:
            os.rename(self.path, target)
        except PermissionError as exc:
            log.warning("cannot rename %s to %s (%s); it keeps its name", self.path, target, exc.strerror)
            return False
        self.name = name
        return True

    def close(self) -> None:
        """Let go of this process's handle (descriptor and mapping); the segment stays, for the
        processes that open it by name."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.buffer = None
        try:
            self._map.close()
        except BufferError:  # a tensor somewhere still views it: it goes with that tensor
            pass

    def unlink(self) -> None:
        """Remove the name and let go of the memory: the descriptor now, the mapping as soon as no
        tensor views it (right away when the owner dropped its views first)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.close()

    def _write_header(self, version: int, state: int, nbytes: int) -> None:
        HEADER.pack_into(self._map, 0, MAGIC, version, state, nbytes, self._generation, os.getpid())


def open_ours(path: str, flags: int = os.O_RDONLY) -> int | None:
    """A descriptor of `path` if it is a regular file of this user's (None otherwise, or if it
    is gone): opened without following a link or blocking on a FIFO, which another user may
    have planted under a name this process expects."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        return None
    return fd


def populate(mapping: mmap.mmap, advice: int) -> None:
    """Fault every page of a writable shared mapping in: with `advice` (MADV_POPULATE_WRITE)
    where the kernel knows it, else by writing a zero to each page after the first (which holds
    the header, written already). libc's madvise is called through ctypes, which lets go of the
    GIL for the call (Python's `mmap.madvise` holds it, and would stall the training thread for
    as long as the faults take); the numpy writes let go of it too."""
    madvise = _libc_madvise()
    if madvise is not None and madvise(ctypes.c_void_p(_address_of(mapping)), ctypes.c_size_t(len(mapping)),
                                       advice) == 0:
        return
    view = numpy.frombuffer(mapping, dtype=numpy.uint8)
    view[mmap.PAGESIZE::mmap.PAGESIZE] = 0
    del view


def _address_of(mapping: mmap.mmap) -> int:
    """Where a mapping starts in this process's memory."""
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor  # an exported buffer would keep the mapping from ever closing
    return address


@functools.cache
def _libc_madvise() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no libc to call (not Linux): the page writes do it
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


class SegmentView:
    """One version's bytes in a mapped segment, checked before and after a copy."""

    def __init__(self, mapping: mmap.mmap, what: str, version: int, nbytes: int) -> None:
        self.what = what
        self._map, self._version, self._nbytes = mapping, version, nbytes
        self._generation = self._check().generation
        self.data = numpy.frombuffer(mapping, dtype=numpy.uint8, count=nbytes, offset=HEADER_BYTES)

    def _check(self) -> _Header:
        header = read_header(self._map, self.what)
        if header.state != READY or header.version != self._version or header.nbytes != self._nbytes:
            raise TransferError(f"{self.what} no longer holds that version (it was reused)")
        return header

    def confirm(self) -> None:
        """After copying out: raise if the producer started reusing the segment meanwhile."""
        if self._check().generation != self._generation:
            raise TransferError(f"{self.what} was overwritten during the copy; the copy is discarded")


class LockedMapping:
    """A version's segment used as weights: a private copy-on-write mapping (a stray write by
    the model can never reach the producer's memory) and a shared lock that keeps the producer
    from reusing the segment until `release()`."""

    def __init__(self, fd: int, what: str, version: int, nbytes: int, mapping: mmap.mmap | None = None) -> None:
        self.what = what
        self.key: tuple[int, int, int] | None = None  # set by ZeroCopyMappings: which segment file
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TransferError(f"{what} is being rewritten by its producer") from None
        self._fd = fd
        try:
            self.mapping = mapping if mapping is not None else _private_mapping(fd)
            SegmentView(self.mapping, what, version, nbytes)  # header check, now stable under the lock
            self.buffer = torch.frombuffer(self.mapping, dtype=torch.uint8, count=nbytes, offset=HEADER_BYTES)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let the producer reuse the segment (call once no tensor of the model views it)."""
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


@dataclass
class _ReusableMapping:
    mapping: mmap.mmap
    fd: int  # open only to notice when the producer unlinks the segment
    clean: bool = False  # retired, and no page of it became a private copy
    unchecked: bool = False  # retired, and its pages not checked yet


class ZeroCopyMappings:
    """Locked mappings for zero-copy weights, kept after their lock ends for a later version of
    the same segment.

    The producer reuses its few segments round-robin, so the mapping a consumer served one
    version from is the one it will serve a later version from. Keeping it keeps its page
    tables: a later version costs no page faults (the bulk of an update when many workers share
    few cores) and no unmapping. The producer's
    rewrites show through, because an untouched page of a private mapping is the segment's own
    page. A page the model wrote to, though, became a private copy that would keep its old
    bytes, so a mapping is reused only if /proc/self/pagemap shows no such page after it was
    retired; otherwise (or where pagemap cannot be read) it is dropped and mapped afresh.

    The check reads a page-table entry per page, a few milliseconds for a large model: `retired`
    only notes it, and `check_retired` runs it when the subscriber has nothing else to do (or
    `lock` runs it, if the segment comes back first). Run at once after every swap it would
    fall inside the update of every other worker on a host with few cores."""

    def __init__(self, capacity: int = 16) -> None:
        # Enough for a producer pool grown by consumers' locks (its slots, times LOCKED_GROWTH):
        # an LRU smaller than the round robin it follows would miss every time. A kept mapping
        # costs only its page tables; the segment exists anyway (unlinked ones are let go).
        self._capacity = capacity
        self._kept: OrderedDict[tuple[int, int, int], _ReusableMapping] = OrderedDict()

    def lock(self, name: str, version: int, nbytes: int) -> LockedMapping:
        fd, what = _open_segment(name, version, nbytes)
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino, info.st_size)
        self._drop_unlinked()
        kept = self._kept.pop(key, None)
        if kept is not None and kept.unchecked:
            self._check(kept)
        mapping = kept.mapping if kept is not None and kept.clean else None
        if kept is not None:
            os.close(kept.fd)
        locked = LockedMapping(fd, what, version, nbytes, mapping)
        locked.key = key
        try:
            # A new open file description (not dup): the flock must go when the locked mapping closes.
            self._kept[key] = _ReusableMapping(locked.mapping, os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))
        except OSError:
            locked.release()  # e.g. out of descriptors: never leave the producer locked out
            raise
        while len(self._kept) > self._capacity:
            os.close(self._kept.popitem(last=False)[1].fd)  # unmapped once no tensor views it
        return locked

    def retired(self, locked: LockedMapping) -> None:
        """The lock is released and no tensor views its mapping any more: it may be reused once
        checked (by `check_retired`, or by `lock` when it is needed first)."""
        kept = self._kept.get(locked.key)
        if kept is not None and kept.mapping is locked.mapping:
            kept.unchecked = True

    def check_retired(self) -> None:
        """Check the retired mappings for reuse now (when nothing else waits), and let go of
        those whose segment is gone or whose pages the model wrote to."""
        self._drop_unlinked()
        for key, kept in list(self._kept.items()):
            if kept.unchecked and not self._check(kept):
                os.close(self._kept.pop(key).fd)

    @staticmethod
    def _check(kept: _ReusableMapping) -> bool:
        kept.clean, kept.unchecked = _only_shared_pages(kept.mapping), False
        return kept.clean

    def close(self) -> None:
        for kept in self._kept.values():
            os.close(kept.fd)
        self._kept.clear()

    def _drop_unlinked(self) -> None:
        """A mapping keeps an unlinked segment's memory alive: let go of those."""
        for key in [key for key, kept in self._kept.items() if os.fstat(kept.fd).st_nlink == 0]:
            os.close(self._kept.pop(key).fd)


_PAGE = mmap.PAGESIZE
# pagemap entry bits: present in RAM, swapped out (or migrating), file page or shared anonymous
_PRESENT, _SWAPPED, _FILE_OR_SHARED = numpy.uint64(1 << 63), numpy.uint64(1 << 62), numpy.uint64(1 << 61)


def _only_shared_pages(mapping: mmap.mmap) -> bool:
    """True when no page of this private mapping has become a private copy (written to).

    Every page counts, the partial last one too (a segment is a header plus the packed bytes, so
    its size is rarely whole pages). A private page may be in RAM or swapped out; a page never
    touched is the segment's own. If pagemap shows nothing at all in RAM, though the header page
    was just read, it is not telling the truth (some sandboxes zero it): no reuse then."""
    address = _address_of(mapping)
    pages = -(-len(mapping) // _PAGE)
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(address // _PAGE * 8)
            entries = numpy.frombuffer(pagemap.read(pages * 8), dtype=numpy.uint64)
    except OSError as exc:
        log.debug("cannot read /proc/self/pagemap (%s): zero-copy mappings are not reused", exc)
        return False
    if len(entries) != pages or not (entries & _PRESENT).any():
        return False
    private = ((entries & (_PRESENT | _SWAPPED)) != 0) & ((entries & _FILE_OR_SHARED) == 0)
    return not private.any()


def _private_mapping(fd: int) -> mmap.mmap:
    """A copy-on-write mapping of the whole segment. Python's mmap keeps a dup of the fd it maps,
    and a dup shares the flock: map through a separate open of the file, so the flock goes
    when the lock is released even while the mapping lives on."""
    separate = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        return mmap.mmap(separate, os.fstat(separate).st_size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(separate)


class ReadOnlyMappings:
    """A consumer's read-only mappings of producer segments, kept across updates.

    The producer reuses a few segments round-robin (renaming them per version), so a mapping
    made for one version serves later ones too: mapping afresh each time would page-fault the
    whole model in again."""

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._maps: OrderedDict[tuple[int, int, int], mmap.mmap] = OrderedDict()

    def view(self, name: str, version: int, nbytes: int) -> SegmentView:
        """A mapping to copy from (reused across versions of the same segment)."""
        fd, what = _open_segment(name, version, nbytes)
        try:
            return SegmentView(self._mapping(fd, what, nbytes), what, version, nbytes)
        finally:
            os.close(fd)

    def _mapping(self, fd: int, what: str, nbytes: int) -> mmap.mmap:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino, info.st_size)
        if key not in self._maps:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._maps[key] = mmap.mmap(fd, info.st_size, flags=flags, prot=mmap.PROT_READ)
            while len(self._maps) > self._capacity:
                self._maps.popitem(last=False)  # unmapped once no array views it
        self._maps.move_to_end(key)
        return self._maps[key]


def _open_segment(name: str, version: int, nbytes: int) -> tuple[int, str]:
    """Open a producer's segment read-only after checking its name, owner and size."""
    if "/" in name or not name.startswith("viper."):
        raise TransferError(f"segment name {name!r} is not a Viper segment name")
    what = f"segment {name} (version {version})"
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TransferError(f"{what} is gone (evicted, or its producer exited)") from None
    except OSError as exc:  # a link planted under the name (ELOOP), say
        raise TransferError(f"{what} cannot be opened ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise TransferError(f"{what} is not a regular file; refusing it")
    if info.st_uid != os.getuid() or info.st_size < HEADER_BYTES + nbytes:
        os.close(fd)
        problem = (f"belongs to uid {info.st_uid}, not to this user" if info.st_uid != os.getuid()
                   else f"holds {info.st_size} bytes, too small for {nbytes}")
        raise TransferError(f"{what} {problem}; refusing it")
    return fd, what


def reclaim_stale_segments(model: str) -> list[str]:
    """Remove this model's segments whose owning process no longer exists (a crashed producer)."""
    if not os.path.isdir(SHM_DIR):
        return []
    removed = []
    for name in os.listdir(SHM_DIR):
        path = os.path.join(SHM_DIR, name)
        if not name.startswith(segment_prefix(model)) or not _is_ours(path) or not _owner_is_dead(path):
            continue  # another user's file is never ours to judge (nor to unlink)
        try:
            os.unlink(path)
            removed.append(name)
        except (FileNotFoundError, PermissionError):
            pass
    return removed


def _is_ours(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except OSError:
        return False


def _owner_is_dead(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(HEADER.size)
    except OSError:
        return False
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        return False
    owner = HEADER.unpack(raw)[5]
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
