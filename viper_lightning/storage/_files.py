"""The file-system seam: the few operations the file tier needs, for a local path (with fsync,
so a rename really publishes durable bytes) and for any other fsspec URL (NFS/Lustre mounts are
local paths; object stores such as s3:// go through fsspec).

A local path writes large payloads with direct I/O (O_DIRECT) where the file system takes it:
a buffered write copies every byte into the page cache first, on the writing thread, and the
kernel's writeback works on them again; the producer's flusher runs beside training, so that
CPU comes out of training's steps. Direct I/O needs the file offset, the length and the memory
address aligned (DIRECT_ALIGN): the file tier pads the safetensors header so the payload lands
in the file at the offset its memory has within a page, the unaligned ends are written buffered,
and a file system without direct I/O (tmpfs) gets a buffered write."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Iterable
from typing import BinaryIO, Protocol

import fsspec
import numpy
from fsspec.implementations.local import LocalFileSystem

from .._errors import StorageError

__all__ = ["Files", "LocalFiles", "FsspecFiles", "files_for", "DIRECT_ALIGN", "address_of"]

Chunk = bytes | memoryview
# O_DIRECT wants offset, length and memory aligned to the device's logical block: a page covers
# every common one (512 and 4096 bytes).
DIRECT_ALIGN = 4096
DIRECT_MIN_BYTES = 8 * 1024 * 1024  # below this the page-cache copy is cheap: written buffered
DIRECT_WRITE_BYTES = 64 * 1024 * 1024  # one pwrite at most: the kernel pins the pages it writes


class Files(Protocol):
    renames_atomically: bool  # False: a directory rename is a copy (object stores)
    direct_io: bool  # large chunks may go straight to the device if aligned (see the module doc)

    def join(self, *parts: str) -> str: ...
    def makedirs(self, path: str) -> None: ...
    def write_file(self, path: str, chunks: Iterable[Chunk]) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def open_read(self, path: str) -> BinaryIO: ...
    def size(self, path: str) -> int: ...
    def listdir(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def remove_tree(self, path: str) -> None: ...
    def uri(self, path: str) -> str: ...


class LocalFiles:
    """Plain POSIX files: write, fsync, rename, and fsync the directory so the rename survives."""

    renames_atomically = True
    direct_io = True

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o755, exist_ok=True)

    def write_file(self, path: str, chunks: Iterable[Chunk]) -> None:
        with open(path, "wb") as out:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                if len(view) < DIRECT_MIN_BYTES or not _write_direct(out, path, view):
                    out.write(view)
            out.flush()
            os.fsync(out.fileno())  # the direct writes' too: it flushes the device's cache

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)
        _fsync_dir(os.path.dirname(dst))

    def open_read(self, path: str) -> BinaryIO:
        """Regular files only: a FIFO or device named by a forged notice would block or never end."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise StorageError(f"{path} is not a regular file (mode {stat.filemode(mode)}); refusing to read it")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path) if os.path.isdir(path) else []

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def remove_tree(self, path: str) -> None:
        """A directory with all it holds, or a single file; nothing there is no error."""
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)

    def uri(self, path: str) -> str:
        return path


class FsspecFiles:
    """Any fsspec file system. Object stores have no fsync; a completed PUT is durable and
    atomic, but a directory "rename" is a copy, so versions are written in place instead."""

    renames_atomically = False
    direct_io = False

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self._fs = fs

    def join(self, *parts: str) -> str:
        return "/".join(part.rstrip("/") for part in parts)

    def makedirs(self, path: str) -> None:
        self._fs.makedirs(path, exist_ok=True)

    def write_file(self, path: str, chunks: Iterable[Chunk]) -> None:
        with self._fs.open(path, "wb") as out:
            for chunk in chunks:
                out.write(chunk)

    def rename(self, src: str, dst: str) -> None:
        self._fs.mv(src, dst, recursive=True)

    def open_read(self, path: str) -> BinaryIO:
        return self._fs.open(path, "rb")

    def size(self, path: str) -> int:
        return int(self._fs.size(path))

    def listdir(self, path: str) -> list[str]:
        if not self._fs.exists(path):
            return []
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self._fs.ls(path, detail=False)]

    def exists(self, path: str) -> bool:
        return bool(self._fs.exists(path))

    def remove_tree(self, path: str) -> None:
        if self._fs.exists(path):
            self._fs.rm(path, recursive=True)

    def uri(self, path: str) -> str:
        return self._fs.unstrip_protocol(path)


def files_for(root: str) -> tuple[Files, str]:
    """The seam and the root path inside it for a local path or an fsspec URL."""
    fs, path = fsspec.core.url_to_fs(root)
    if isinstance(fs, LocalFileSystem):
        return LocalFiles(), os.path.abspath(path)
    return FsspecFiles(fs), path.rstrip("/")


def address_of(view: memoryview) -> int:
    """The memory address of a buffer's first byte."""
    return numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data if len(view) else 0


def _write_direct(out: BinaryIO, path: str, view: memoryview) -> bool:
    """Append `view` to `out` (a buffered file open on `path`), its aligned middle by direct I/O;
    False, with nothing written, where that cannot be done (then the caller writes it buffered)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    out.flush()
    start = out.tell()
    head = -start % DIRECT_ALIGN  # buffered, up to the first aligned offset
    middle = (len(view) - head) // DIRECT_ALIGN * DIRECT_ALIGN
    if (address_of(view) + head) % DIRECT_ALIGN or middle <= 0:
        return False  # memory and file offsets disagree within a block: see the module doc
    try:  # the same file as `out` (through its descriptor: a path could be swapped meanwhile)
        direct = os.open(f"/proc/self/fd/{out.fileno()}", os.O_WRONLY | os.O_DIRECT)
    except OSError:  # this file system has no direct I/O (tmpfs: EINVAL), or no /proc
        return False
    try:
        out.write(view[:head])
        out.flush()
        done = head
        while done < head + middle:
            end = min(done + DIRECT_WRITE_BYTES, head + middle)
            try:
                written = os.pwrite(direct, view[done:end], start + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a full disk, an I/O error: the caller's to report
                    raise
                break  # this device refuses the alignment: the rest goes buffered
            done += max(written, 0)
            if written <= 0 or written % DIRECT_ALIGN:
                break  # nothing written, or a short write off the alignment: the rest goes buffered
    finally:
        os.close(direct)
    out.seek(start + done)
    out.write(view[done:])
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
