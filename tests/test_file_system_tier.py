"""The file-system tier: atomic versions, LATEST, restarts, and damaged files refused."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy
import pytest
import safetensors.torch
import torch

from viper_lightning import (ConfigurationError, FileSystemTier, IntegrityError, ModelPublisher, Notice, StorageError,
                             take_snapshot)
from viper_lightning._buffers import allocate_buffer
from viper_lightning._digest import digest_buffer
from viper_lightning.storage._files import DIRECT_ALIGN, DIRECT_MIN_BYTES, LocalFiles

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, FullDisk, TinyNet, assert_same_weights, needs_dev_full, perturbed

ROOT = Path(__file__).resolve().parent.parent


def write_version(tier: FileSystemTier, model: torch.nn.Module, version: int) -> Notice:
    snapshot = take_snapshot(model.state_dict())
    notice = Notice(model="tiny", version=version, nbytes=snapshot.layout.nbytes,
                    digest=digest_buffer(snapshot.data), layout=snapshot.layout, producer="test")
    tier.write(notice, snapshot.data, notice.encode(with_locations=False))
    return notice


def read_back(tier: FileSystemTier, version: int) -> dict[str, torch.Tensor]:
    notice = tier.read_manifest("tiny", version, None)
    buffer = allocate_buffer(notice.nbytes)
    tier.read_into(notice, buffer)
    return notice.layout.views(buffer)


def test_write_then_read_is_bit_exact(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    model = TinyNet()
    write_version(tier, model, 1)
    assert tier.latest("tiny") == 1
    assert sorted(os.listdir(os.path.join(pfs_root, "tiny", "v1"))) == ["manifest.json", "model.safetensors"]
    assert_same_weights(model.state_dict(), read_back(tier, 1))


def test_no_temporary_directory_is_left_or_listed(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    for version in (1, 2, 3):
        write_version(tier, perturbed(TinyNet(), version), version)
    assert sorted(os.listdir(os.path.join(pfs_root, "tiny"))) == ["LATEST", "v1", "v2", "v3"]
    assert tier.versions("tiny") == [1, 2, 3]
    assert tier.prune("tiny", keep=2) == [1]
    assert tier.versions("tiny") == [2, 3]


def test_latest_never_moves_backwards(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    write_version(tier, TinyNet(), 5)
    write_version(tier, TinyNet(), 4)
    assert tier.latest("tiny") == 5


def test_existing_version_is_never_overwritten(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    write_version(tier, TinyNet(), 1)
    with pytest.raises(StorageError, match="already exists"):
        write_version(tier, TinyNet(), 1)


def test_versions_continue_after_a_producer_restart(pfs_root) -> None:
    model = TinyNet()
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as first:
        assert [first.publish(model), first.publish(model)] == [1, 2]
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as second:
        assert second.publish(model) == 3
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, resume_after=10) as third:
        assert third.publish(model) == 11
        third.flush()
        assert third.version == 11


def test_truncated_file_is_refused(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    write_version(tier, TinyNet(), 1)
    path = os.path.join(pfs_root, "tiny", "v1", "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(StorageError, match="truncated"):
        read_back(tier, 1)


def test_flipped_byte_fails_the_digest(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    write_version(tier, TinyNet(), 1)
    path = os.path.join(pfs_root, "tiny", "v1", "model.safetensors")
    with open(path, "r+b") as handle:
        handle.seek(-10, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-10, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match="digest mismatch"):
        read_back(tier, 1)


def test_missing_files_are_named(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    write_version(tier, TinyNet(), 1)
    notice = tier.read_manifest("tiny", 1, None)
    os.remove(os.path.join(pfs_root, "tiny", "v1", "model.safetensors"))
    with pytest.raises(StorageError, match="the file is missing"):
        tier.read_into(notice, allocate_buffer(notice.nbytes))
    with pytest.raises(StorageError, match="manifest of version 2 of 'tiny' is missing"):
        tier.read_manifest("tiny", 2, None)


def test_header_that_disagrees_with_the_manifest_is_refused(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    write_version(tier, TinyNet(), 1)
    other = FileSystemTier(str(os.path.join(pfs_root, "other")))
    write_version(other, TinyNet(width=32), 1)
    os.replace(os.path.join(pfs_root, "other", "tiny", "v1", "model.safetensors"),
               os.path.join(pfs_root, "tiny", "v1", "model.safetensors"))
    with pytest.raises(IntegrityError, match="do not match its manifest"):
        read_back(tier, 1)


@needs_dev_full
def test_full_disk_is_a_storage_error_and_leaves_no_partial_version(tmp_path) -> None:
    os.makedirs(tmp_path / "tiny")
    tier = FileSystemTier(str(tmp_path), files=FullDisk())
    with pytest.raises(StorageError, match="disk full"):
        write_version(tier, TinyNet(), 1)
    assert os.listdir(tmp_path / "tiny") == []


def test_the_highest_version_a_producer_can_write_is_one_its_reader_reads(pfs_root) -> None:
    """LATEST holds at most 18 digits: a producer must never write a number its own reader
    rejects (issue 11, defect 15)."""
    with pytest.raises(ConfigurationError, match="resume_after=1000000000000000000"):
        ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, resume_after=10**18)
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, resume_after=10**18 - 2) as publisher:
        last = publisher.publish(TinyNet())
        assert publisher.flush(WAIT_S)
        with pytest.raises(ConfigurationError, match="used up"):
            publisher.publish(TinyNet())
    assert FileSystemTier(pfs_root).latest("tiny") == last == 10**18 - 1


def test_a_named_pipe_is_refused_rather_than_waited_on(pfs_root) -> None:
    """A forged notice or a hostile user can name a FIFO: reading it would block the subscriber
    thread for ever (issue 11, defect 12)."""
    directory = os.path.join(pfs_root, "tiny", "v1")
    os.makedirs(directory)
    os.mkfifo(os.path.join(directory, "manifest.json"))
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            FileSystemTier(pfs_root).read_manifest("tiny", 1, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(WAIT_S)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome[0], StorageError) and "not a regular file" in str(outcome[0])


def test_leftovers_of_crashed_writes_are_removed_at_the_next_start(pfs_root) -> None:
    """Issue 11, defect 14."""
    model_dir = os.path.join(pfs_root, "tiny")
    os.makedirs(os.path.join(model_dir, ".v3.tmp-" + "a" * 32))
    open(os.path.join(model_dir, ".LATEST.tmp-" + "b" * 32), "w").close()
    os.makedirs(os.path.join(model_dir, ".keep-me"))
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root):
        pass
    assert sorted(os.listdir(model_dir)) == [".keep-me", "RESERVED"]


CRASHING_PRODUCER = """
import os, sys
from viper_lightning import ModelPublisher
from tests.conftest import TinyNet, perturbed
publisher = ModelPublisher("tiny", "tcp://127.0.0.1:*", sys.argv[1], flush_delay=59)  # announced, not yet written
print(publisher.publish(perturbed(TinyNet(), 1)), flush=True)
os._exit(0)  # a crash: no close, no flush
"""


def test_a_version_announced_before_a_crash_is_never_numbered_again(pfs_root) -> None:
    """Issue 11, defect 7: v1 lived only in memory when its producer died; a restarted producer
    must not call other weights v1 (consumers that served the first would keep them)."""
    crashed = subprocess.run([sys.executable, "-c", CRASHING_PRODUCER, pfs_root], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert crashed.returncode == 0, crashed.stderr
    announced = int(crashed.stdout.split()[-1])
    assert FileSystemTier(pfs_root).versions("tiny") == []  # it never reached the file system
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher:
        assert publisher.publish(perturbed(TinyNet(), 2)) > announced


def test_a_clean_restart_continues_without_a_gap(pfs_root) -> None:
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher:
        first = publisher.publish(TinyNet())
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher:
        assert publisher.publish(TinyNet()) == first + 1


def test_a_clean_close_never_lowers_another_producers_reservation(pfs_root) -> None:
    tier = FileSystemTier(pfs_root)
    first = ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root)
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root):  # started meanwhile: reserves above the first
        reserved = tier.reserved("tiny")
        first.close()
        assert tier.reserved("tiny") == reserved


@pytest.mark.parametrize("keep_every_version, expected", [(False, [1, 6]), (True, [1, 2, 3, 4, 5, 6])])
def test_the_writer_skips_versions_replaced_before_their_write_started(pfs_root, keep_every_version,
                                                                       expected) -> None:
    """Issue 12, item 5: five versions published faster than the writer starts (its flush delay)
    cost one write, the newest, unless every version is asked for."""
    models = [perturbed(TinyNet(), seed) for seed in range(1, 7)]
    # slots for every version, and a first version flushed while the pool warms up, so that no
    # publish of the burst waits for (and hurries) the writer
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, flush_delay=5.0, allow_keyless=True, dram_versions=8,
                        keep_every_version=keep_every_version) as publisher:
        publisher.publish(models[0])
        assert publisher.flush(WAIT_S)
        for model in models[1:]:
            publisher.publish(model)
        assert publisher.flush(WAIT_S)
        assert publisher.writes_skipped == 6 - len(expected)
        assert publisher.health["file-system tier"] == "ok"
    tier = FileSystemTier(pfs_root)
    assert tier.versions("tiny") == expected and tier.latest("tiny") == 6
    assert_same_weights(models[-1].state_dict(), read_back(tier, 6))


def _direct_io_refused(directory: str) -> str | None:
    """Why files in `directory` cannot be opened for direct I/O, or None."""
    probe = os.path.join(directory, ".direct-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600))
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return None if hasattr(os, "O_DIRECT") else "no O_DIRECT on this system"


def _resident_pages(path: str) -> int:
    """How many of the file's pages are in the page cache (mincore on a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapping:
        vector = (ctypes.c_ubyte * pages)()
        address = numpy.frombuffer(mapping, dtype=numpy.uint8).ctypes.data
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(byte & 1 for byte in vector)


@pytest.mark.parametrize("file_offset", [0, 13, 4096 - 8, 4096])
@pytest.mark.parametrize("memory_offset", [0, 64, 3])
def test_large_chunks_are_written_bit_exact_whatever_their_alignment(tmp_path, file_offset, memory_offset) -> None:
    """Direct I/O for the aligned middle where memory and file offsets agree within a page,
    buffered ends, and a buffered write where they cannot agree (memory offset 3)."""
    size = DIRECT_MIN_BYTES + 4097
    backing = mmap.mmap(-1, size + memory_offset)  # page-aligned, as a segment is
    payload = numpy.frombuffer(backing, dtype=numpy.uint8, count=size, offset=memory_offset)
    payload[:] = numpy.random.default_rng(file_offset).integers(0, 256, size, dtype=numpy.uint8)
    path = str(tmp_path / "chunks")
    LocalFiles().write_file(path, [b"h" * file_offset, memoryview(payload), b"tail"])
    with open(path, "rb") as handle:
        written = handle.read()
    assert written[:file_offset] == b"h" * file_offset
    assert written[file_offset:file_offset + size] == payload.tobytes()
    assert written[file_offset + size:] == b"tail"


def test_a_large_version_goes_to_the_file_system_past_the_page_cache(pfs_root) -> None:
    """The payload of a version in a segment (64 bytes into a page) is written with direct I/O:
    its pages are not left in the page cache, the data section starts at the same offset within
    a page, and the file is a safetensors file that reads back bit-exact."""
    os.makedirs(pfs_root)
    if (why := _direct_io_refused(pfs_root)) is not None:
        pytest.skip(f"the file system takes no direct I/O: {why}")
    tensors = {"w": torch.arange(3 * DIRECT_MIN_BYTES // 4, dtype=torch.float32), "b": torch.ones(5)}
    snapshot = take_snapshot(tensors)
    backing = mmap.mmap(-1, 64 + snapshot.layout.nbytes)
    data = torch.frombuffer(backing, dtype=torch.uint8, count=snapshot.layout.nbytes, offset=64)
    data.copy_(snapshot.data[:snapshot.layout.nbytes])
    notice = Notice(model="big", version=1, nbytes=snapshot.layout.nbytes, digest=digest_buffer(data),
                    layout=snapshot.layout, producer="test")
    tier = FileSystemTier(pfs_root)
    tier.write(notice, data, notice.encode(with_locations=False))
    path = os.path.join(pfs_root, "big", "v1", "model.safetensors")
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
    assert (8 + header_length) % DIRECT_ALIGN == 64
    resident = _resident_pages(path)
    assert resident <= 3, f"{resident} of the file's pages are in the page cache after the write"
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    buffer = allocate_buffer(notice.nbytes)
    tier.read_into(tier.read_manifest("big", 1, None), buffer)
    assert torch.equal(buffer[:notice.nbytes], data)
