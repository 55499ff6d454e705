"""The file-system tier: `<root>/<model>/v<version>/{model.safetensors,manifest.json}` and
`<root>/<model>/LATEST`.

A version is written into a hidden temporary directory, fsynced and renamed into place, and
LATEST moves last, so a reader never sees a half-written version. The safetensors data section
is the snapshot buffer itself (see _layout), so a version is one sequential write and one read.
"""

from __future__ import annotations

import errno
import json
import re
import struct
import time
import uuid

import torch

from .._digest import ALL_THREADS, Digester, mismatch
from .._errors import IntegrityError, StorageError
from .._layout import Layout
from ..transport._protocol import MAX_VERSION, Notice
from ._files import DIRECT_ALIGN, DIRECT_MIN_BYTES, Files, address_of, files_for

__all__ = ["FileSystemTier", "safetensors_header"]

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
LATEST = "LATEST"
RESERVED = "RESERVED"  # the highest version number a producer may have announced from memory
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
READ_CHUNK = 64 * 1024 * 1024
_VERSION_DIR = re.compile(r"^v([0-9]+)$")
_TEMPORARY = re.compile(r"^\.(v[0-9]+|LATEST|RESERVED)\.tmp-[0-9a-f]{32}$")


def safetensors_header(layout: Layout, metadata: dict[str, str], *, data_at: int | None = None) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose data section is the buffer.

    `data_at`: the header is padded (with spaces, as safetensors allows) so that the data
    section starts at an offset congruent to it modulo DIRECT_ALIGN, the buffer's own offset
    within a page, so the payload can be written with direct I/O (see `_files`). A multiple
    of 8: safetensors aligns the data section to 8 bytes."""
    header: dict[str, object] = {
        spec.name: {"dtype": spec.dtype, "shape": list(spec.shape),
                    "data_offsets": [spec.offset, spec.offset + spec.nbytes]}
        for spec in layout.unique_tensors()
    }
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    modulus, target = (8, 0) if data_at is None else (DIRECT_ALIGN, data_at)
    raw += b" " * ((target - 8 - len(raw)) % modulus)
    return struct.pack("<Q", len(raw)) + raw


class FileSystemTier:
    """Durable versions on a local path, a parallel file system mount, or any fsspec URL."""

    def __init__(self, root: str, *, files: Files | None = None) -> None:
        if files is None:
            files, root = files_for(root)
        self._files = files
        self.root = root

    # -- paths -------------------------------------------------------------------------------
    def _model_dir(self, model: str) -> str:
        return self._files.join(self.root, model)

    def version_dir(self, model: str, version: int) -> str:
        return self._files.join(self.root, model, f"v{version}")

    def address(self, model: str, version: int) -> str:
        return self._files.uri(self.version_dir(model, version))

    # -- discovery ---------------------------------------------------------------------------
    def versions(self, model: str) -> list[int]:
        """Every complete version on storage, oldest first."""
        found = (_VERSION_DIR.match(name) for name in self._files.listdir(self._model_dir(model)))
        return sorted(int(match.group(1)) for match in found if match)

    def latest(self, model: str) -> int | None:
        """The version LATEST points at, or None when nothing was published yet."""
        return self._read_number(model, LATEST)

    def reserved(self, model: str) -> int:
        """The highest version number reserved for announcing from memory (0 if none)."""
        return self._read_number(model, RESERVED) or 0

    def reserve(self, model: str, upto: int) -> None:
        """Record durably that versions up to `upto` may be announced, before any of them is: a
        producer restarted after a crash then never announces one of those numbers again, even
        for a version that only ever lived in memory."""
        try:
            self._files.makedirs(self._model_dir(model))
            self._write_number(model, RESERVED, upto)
        except OSError as exc:
            raise _storage_error(exc, f"reserving versions of {model!r} up to {upto} under {self.root}") from exc

    def _read_number(self, model: str, name: str) -> int | None:
        path = self._files.join(self._model_dir(model), name)
        if not self._files.exists(path):
            return None
        with self._files.open_read(path) as handle:
            text = handle.read(64).decode(errors="replace").strip()
        if not re.fullmatch(r"[0-9]+", text) or len(text) > len(str(MAX_VERSION)):
            raise StorageError(f"{path} holds {text!r}, not a version number; delete it or rewrite it")
        return int(text)

    def _write_number(self, model: str, name: str, value: int) -> None:
        """Replace a small number file atomically (temp file, fsync, rename)."""
        directory = self._model_dir(model)
        path = self._files.join(directory, name)
        if not self._files.renames_atomically:  # one PUT replaces the object atomically
            self._files.write_file(path, [f"{value}\n".encode()])
            return
        temp = self._files.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
        self._files.write_file(temp, [f"{value}\n".encode()])
        self._files.rename(temp, path)

    def remove_temporaries(self, model: str) -> list[str]:
        """Remove what crashed writes left (`.v<N>.tmp-*`, `.LATEST.tmp-*`); returns their names.
        Only for a producer starting up: it is the model's one writer."""
        directory = self._model_dir(model)
        found = [name for name in self._files.listdir(directory) if _TEMPORARY.match(name)]
        for name in found:
            self._files.remove_tree(self._files.join(directory, name))
        return found

    def highest(self, model: str) -> int:
        """The highest version ever written or reserved (0 if none): a restarted producer
        continues after it."""
        return max([0, *self.versions(model), self.latest(model) or 0, self.reserved(model)])

    # -- writing -----------------------------------------------------------------------------
    def write(self, notice: Notice, data: torch.Tensor, manifest: bytes) -> str:
        """Write one version durably and move LATEST to it; returns the version's address."""
        model, version = notice.model, notice.version
        final = self.version_dir(model, version)
        if self._files.exists(final):
            raise StorageError(f"version {version} of {model!r} already exists at {final}; "
                               "another producer is publishing under the same model name")
        temp = self._files.join(self._model_dir(model), f".v{version}.tmp-{uuid.uuid4().hex}")
        if not self._files.renames_atomically:
            temp = final  # the manifest, written last, is what makes the version readable
        try:
            self._write_version(temp, notice, data, manifest)
            if temp != final:
                self._files.rename(temp, final)
            self._advance_latest(model, version)
        except OSError as exc:
            self._files.remove_tree(temp)
            raise _storage_error(exc, f"writing version {version} of {model!r} under {self.root}") from exc
        return self._files.uri(final)

    def _write_version(self, directory: str, notice: Notice, data: torch.Tensor, manifest: bytes) -> None:
        self._files.makedirs(directory)
        metadata = {"format": "pt", "viper.model": notice.model, "viper.version": str(notice.version),
                    "viper.digest": notice.digest, "viper.aliases": json.dumps(notice.layout.aliases())}
        payload = memoryview(data[:notice.nbytes].numpy())
        page_offset = address_of(payload) % DIRECT_ALIGN
        aligned = self._files.direct_io and notice.nbytes >= DIRECT_MIN_BYTES and page_offset % 8 == 0
        header = safetensors_header(notice.layout, metadata, data_at=page_offset if aligned else None)
        self._files.write_file(self._files.join(directory, WEIGHTS), [header, payload])
        self._files.write_file(self._files.join(directory, MANIFEST), [manifest])

    def _advance_latest(self, model: str, version: int) -> None:
        current = self.latest(model)
        if current is None or current < version:
            self._write_number(model, LATEST, version)

    def prune(self, model: str, keep: int) -> list[int]:
        """Remove all but the newest `keep` versions; returns the removed ones."""
        doomed = self.versions(model)[:-keep] if keep > 0 else []
        for version in doomed:
            self._files.remove_tree(self.version_dir(model, version))
        return doomed

    # -- reading -----------------------------------------------------------------------------
    def read_manifest(self, model: str, version: int, key: bytes | None) -> Notice:
        """The version's manifest, parsed, validated and (with a key) authenticated."""
        path = self._files.join(self.version_dir(model, version), MANIFEST)
        raw = self._read_small(path, MAX_MANIFEST_BYTES, f"manifest of version {version} of {model!r}")
        notice = Notice.decode(raw, key, what=f"manifest {path}")
        if notice.model != model or notice.version != version:
            raise IntegrityError(f"manifest {path} describes {notice.model!r} v{notice.version}, "
                                 f"not {model!r} v{version}")
        return notice

    def read_into(self, notice: Notice, buffer: torch.Tensor, directory: str | None = None,
                  key: bytes | None = None) -> float:
        """Read a version's bytes into `buffer`, verifying header, size and digest as they stream
        (keyed BLAKE3 with `key`: whoever can write the storage cannot forge it).

        Returns the seconds spent on the digest (part of the read, reported separately)."""
        directory = directory or self.version_dir(notice.model, notice.version)
        path = self._files.join(directory, WEIGHTS)
        what = f"version {notice.version} of {notice.model!r} at {path}"
        try:
            with self._files.open_read(path) as handle:
                header_bytes = self._check_header(handle, notice, what)
                self._check_size(path, header_bytes + notice.nbytes, what)
                return self._stream_into(handle, buffer, notice, key, what)
        except FileNotFoundError:
            raise StorageError(f"{what}: the file is missing (evicted, or never written)") from None
        except OSError as exc:
            raise _storage_error(exc, f"reading {what}") from exc

    def _check_header(self, handle, notice: Notice, what: str) -> int:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise StorageError(f"{what}: truncated before its safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise IntegrityError(f"{what}: safetensors header claims {length} bytes, over the limit")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):
            raise IntegrityError(f"{what}: the safetensors header is not valid JSON (truncated or damaged)") from None
        if not isinstance(header, dict):
            raise IntegrityError(f"{what}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        expected = json.loads(safetensors_header(notice.layout, {})[8:])
        expected.pop("__metadata__")
        if header != expected:
            raise IntegrityError(f"{what}: the file's tensors do not match its manifest "
                                 f"({_first_difference(expected, header)})")
        return 8 + length

    def _check_size(self, path: str, expected: int, what: str) -> None:
        actual = self._files.size(path)
        if actual != expected:
            state = "truncated" if actual < expected else "longer than announced"
            raise StorageError(f"{what}: file is {state} ({actual} bytes, expected {expected})")

    def _stream_into(self, handle, buffer: torch.Tensor, notice: Notice, key: bytes | None, what: str) -> float:
        target = memoryview(buffer[:notice.nbytes].numpy()).cast("B")
        digester = Digester(key, threads=ALL_THREADS)
        digest_s = 0.0
        position = 0
        while position < notice.nbytes:
            end = min(position + READ_CHUNK, notice.nbytes)
            got = handle.readinto(target[position:end])
            if not got:
                raise StorageError(f"{what}: truncated at byte {position} of {notice.nbytes}")
            started = time.perf_counter()
            digester.update(target[position:position + got])
            digest_s += time.perf_counter() - started
            position += got
        why = mismatch(notice.digest, digester.hexdigest())
        if why is not None:
            raise IntegrityError(f"{what}: {why}")
        return digest_s

    def _read_small(self, path: str, limit: int, what: str) -> bytes:
        try:
            with self._files.open_read(path) as handle:
                raw = handle.read(limit + 1)
        except FileNotFoundError:
            raise StorageError(f"{what} is missing at {path}") from None
        except OSError as exc:
            raise _storage_error(exc, f"reading {what}") from exc
        if len(raw) > limit:
            raise StorageError(f"{what} at {path} is over {limit} bytes; refusing to parse it")
        return raw


def _first_difference(expected: dict[str, object], actual: dict[str, object]) -> str:
    for name in sorted(expected.keys() | actual.keys()):
        if expected.get(name) != actual.get(name):
            return f"tensor {name!r}: manifest {expected.get(name)}, file {actual.get(name)}"
    return "no difference"


def _storage_error(exc: OSError, doing: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"disk full while {doing}: free space or lower keep_versions")
    return StorageError(f"{type(exc).__name__} while {doing}: {exc}")

