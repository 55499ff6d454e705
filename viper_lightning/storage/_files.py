"""The file-system seam: the few operations the file tier needs, for a local path (with fsync,
so a rename really publishes durable bytes) and for any other fsspec URL (NFS/Lustre mounts are
local paths; object stores such as s3:// go through fsspec)."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from collections.abc import Iterable
from typing import BinaryIO, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .._errors import StorageError

__all__ = ["Files", "LocalFiles", "FsspecFiles", "files_for"]

Chunk = bytes | memoryview


class Files(Protocol):
    renames_atomically: bool  # False: a directory rename is a copy (object stores)

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

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o755, exist_ok=True)

    def write_file(self, path: str, chunks: Iterable[Chunk]) -> None:
        with open(path, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())

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


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
