"""The shared pipeline's transport, in one process: copy-on-write batches, members that start
first, numbers claimed twice, peers of another user, peers that stop reading, and batches too
many-tensored to describe. (Real member processes: test_ensemble.py.)"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from viper_lightning._errors import ConfigurationError, TransferError
from viper_lightning.data import BatchLoader, SharedBatches, SharedBatchesDataModule, keep_freed_memory
from viper_lightning.data._ring import RING, SOCKET
from viper_lightning.transport._messages import canonical_json
from viper_lightning.data._shared_batches import _WrittenPages
from viper_lightning.storage._shm import _address_of

from .conftest import WAIT_S

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root to drop to it")


def _batches(count: int) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.full((2048,), float(i)), "y": torch.tensor([i])} for i in range(count)]  # 2 pages each


def _read(member: SharedBatches, seen: list, key: int = 0) -> threading.Thread:
    """A member reading one epoch in a thread, then leaving (as a Trainer's teardown does)."""

    def read() -> None:
        try:
            seen.extend(float(batch["x"][key]) for batch in member)
        finally:
            member.close()

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    return reading


def _serve(loader: BatchLoader, batches: list) -> threading.Thread:
    serving = threading.Thread(target=loader.serve, args=(batches,), daemon=True)
    serving.start()
    return serving


def test_a_step_that_writes_its_batch_changes_neither_the_ring_nor_the_next_batches_in_its_slot():
    batches = _batches(12)  # 3 slots: every slot is written four times
    with BatchLoader(2, 8192 + 64, slots=3) as loader:
        serving = _serve(loader, batches)
        writer, reader = SharedBatches(loader.directory, 0, hold=1, timeout=WAIT_S), \
            SharedBatches(loader.directory, 1, hold=1, timeout=WAIT_S)
        read: list[float] = []
        reading = _read(reader, read, key=-1)
        written = []
        for batch in writer:
            written.append((float(batch["x"][0]), float(batch["x"][-1]), int(batch["y"]), tuple(batch["x"].shape),
                            batch["x"].requires_grad))
            batch["x"].fill_(-1.0)  # a step that normalises its batch in place
            batch["y"].zero_()
            batch["x"].unsqueeze_(0).requires_grad_()  # and reshapes it, asking for its gradient
        writer.close()
        reading.join(WAIT_S)
        serving.join(WAIT_S)
        assert not serving.is_alive()
    assert written == [(float(i), float(i), i, (2048,), False) for i in range(12)]  # as made, not as the last was left
    assert read == [float(i) for i in range(12)]  # the other member never saw them


def test_a_release_drops_the_pages_written_and_keeps_those_only_read():
    with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as file:
        file.truncate(4 * mmap.PAGESIZE)
        shared = mmap.mmap(file.fileno(), 0)
        private = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        written = _WrittenPages(private)
        try:
            private[0], private[2 * mmap.PAGESIZE] = 1, 2  # wrote pages 0 and 2
            _ = private[3 * mmap.PAGESIZE]  # read page 3
            shared[0], shared[2 * mmap.PAGESIZE], shared[3 * mmap.PAGESIZE] = 7, 8, 9  # the ring's next batch
            assert (private[0], private[2 * mmap.PAGESIZE]) == (1, 2)  # private copies hide it
            assert private[3 * mmap.PAGESIZE] == 9  # a page only read shows the ring
            written.drop(0, 4 * mmap.PAGESIZE)
            assert _present(private) == [False, False, False, True]  # the page only read was kept
            assert (private[0], private[2 * mmap.PAGESIZE], private[3 * mmap.PAGESIZE]) == (7, 8, 9)
        finally:
            written.close()
            private.close()
            shared.close()


def _present(mapping: mmap.mmap) -> list[bool]:
    """Which pages of a mapping are in this process's page table (from /proc/self/pagemap)."""
    first = _address_of(mapping) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(8 * first)
        entries = struct.unpack(f"{len(mapping) // mmap.PAGESIZE}Q", pagemap.read(len(mapping) // mmap.PAGESIZE * 8))
    return [bool(entry >> 63) for entry in entries]


def test_a_member_may_start_before_its_loader(tmp_path):
    directory = str(tmp_path / "pipeline")
    seen: list[float] = []
    reading = _read(SharedBatches(directory, 0, timeout=WAIT_S), seen)  # no loader yet: it waits for one
    with BatchLoader(1, 8192 + 64, directory=directory) as loader:
        loader.serve(_batches(5))
        reading.join(WAIT_S)
    assert seen == [float(i) for i in range(5)]


def test_a_second_process_claiming_a_member_s_number_is_refused_with_the_reason():
    with BatchLoader(1, 8192 + 64, slots=4) as loader:
        serving = _serve(loader, _batches(6))
        first = SharedBatches(loader.directory, 0, hold=2, timeout=WAIT_S)
        stream = iter(first)
        assert [float(next(stream)["x"][0]) for _ in range(2)] == [0.0, 1.0]  # it holds two: the ring fills, and waits
        impostor = SharedBatches(loader.directory, 0, timeout=WAIT_S)
        with pytest.raises(ConfigurationError, match="refused it: member 0 has joined already"):
            next(iter(impostor))
        assert [float(batch["x"][0]) for batch in stream] == [2.0, 3.0, 4.0, 5.0]  # the first goes on
        first.close()
        serving.join(WAIT_S)
    assert loader.dropped == []


def test_a_peer_that_releases_batches_it_never_reads_is_dropped(caplog):
    with BatchLoader(2, 64, slots=4) as loader:
        seen: list[float] = []
        reading = _read(SharedBatches(loader.directory, 0, hold=2, timeout=WAIT_S), seen)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
            peer.connect(os.path.join(loader.directory, SOCKET))
            peer.send(canonical_json({"kind": "hello", "member": 1, "hold": 2}))
            batches = [{"x": torch.full((4,), float(i))} for i in range(2000)]
            serving = _serve(loader, batches)
            while serving.is_alive() and not loader.dropped:  # releases the batches sent, reads none
                served = loader.served  # (again and again: one is released only once it went out)
                peer.send(canonical_json({"kind": "done", "member": 1, "seqs": list(range(max(1, served - 7), served + 1))}))
                serving.join(0.001)  # a poll of the loader's progress, bounded by the loop's condition
            reading.join(WAIT_S)
            serving.join(WAIT_S)
    assert loader.dropped == [1] and "stopped reading" in caplog.text
    assert seen == [float(i) for i in range(2000)]  # the honest member got every batch


def test_a_batch_with_too_many_tensors_to_describe_is_refused_before_it_is_written():
    with BatchLoader(1, 1 << 20) as loader:
        member = SharedBatches(loader.directory, 0, timeout=WAIT_S)
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                loader.serve([{f"tensor_{i:05d}": torch.zeros(1) for i in range(5000)}])
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                failure.append(exc)

        serving = threading.Thread(target=serve)
        serving.start()
        with pytest.raises(TransferError, match="the loader stopped serving: ConfigurationError.*message limit"):
            next(iter(member))  # told at once, with the reason
        serving.join(WAIT_S)
        member.close()
    assert isinstance(failure[0], ConfigurationError) and "message limit" in str(failure[0])
    assert loader.served == 0


def _other_users_loader(directory: str, ready, done) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(os.path.join(directory, SOCKET))
        os.chmod(os.path.join(directory, SOCKET), 0o777)
        listener.listen(1)
        ready.set()
        done.wait(WAIT_S)


@needs_root
def test_a_member_refuses_a_loader_of_another_user():
    directory = tempfile.mkdtemp(prefix="viper-test-foreign-")
    os.chmod(directory, 0o777)
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    squatter = context.Process(target=_other_users_loader, args=(directory, ready, done))
    squatter.start()
    ring = os.path.join(directory, RING)
    try:
        assert ready.wait(WAIT_S)
        with open(ring, "wb") as file:  # even beside a ring of this user's: the loader's own uid decides
            file.truncate(8192)
        with pytest.raises(ConfigurationError, match=f"uid {NOBODY}.* not this user's"):
            next(iter(SharedBatches(directory, 0, timeout=WAIT_S)))
    finally:
        done.set()
        squatter.join(WAIT_S)
        shutil.rmtree(directory)


def _join_as_other_user(path: str, results) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.settimeout(WAIT_S)
        connection.connect(path)
        try:
            connection.send(canonical_json({"kind": "hello", "member": 0, "hold": 2}))
            results.put(connection.recv(4096))  # b"": the loader closed it
        except (BrokenPipeError, ConnectionResetError):
            results.put(b"")  # closed before the hello, or with it unread


@needs_root
def test_the_loader_refuses_a_member_of_another_user_even_when_it_can_reach_the_socket():
    with BatchLoader(1, 8192 + 64) as loader:
        os.chmod(loader.directory, 0o711)  # as a careless user might open it up
        path = os.path.join(loader.directory, SOCKET)
        os.chmod(path, 0o777)
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        intruder = context.Process(target=_join_as_other_user, args=(path, results))
        intruder.start()
        serving = _serve(loader, _batches(3))
        assert results.get(timeout=WAIT_S) == b""
        intruder.join(WAIT_S)
        member = SharedBatches(loader.directory, 0, timeout=WAIT_S)
        assert [float(batch["x"][0]) for batch in member] == [0.0, 1.0, 2.0]
        member.close()
        serving.join(WAIT_S)
    assert loader.dropped == []


def test_a_member_waits_out_a_slower_member_however_long_and_logs_whom_it_waits_for(caplog):
    caplog.set_level(logging.INFO, logger="viper_lightning.data")
    with BatchLoader(2, 8192 + 64, slots=4) as loader:
        serving = _serve(loader, _batches(12))
        seen: list[float] = []
        reading = _read(SharedBatches(loader.directory, 0, timeout=0.2), seen)  # asks after 0.2 s without a batch
        slow = SharedBatches(loader.directory, 1, timeout=WAIT_S)
        stalled = iter(slow)
        first = [float(next(stalled)["x"][0]) for _ in range(2)]  # then it stalls, the ring fills, the other waits
        deadline = time.monotonic() + WAIT_S
        while caplog.text.count("the loader is there, waiting for member(s) [1]") < 3 and time.monotonic() < deadline:
            reading.join(0.05)  # a poll of the log, bounded by the deadline: three answers, 3 timeouts or more
        assert reading.is_alive()  # it kept waiting, past twice its timeout
        rest = [float(batch["x"][0]) for batch in stalled]
        slow.close()
        reading.join(WAIT_S)
        serving.join(WAIT_S)
    assert seen == first + rest == [float(i) for i in range(12)]
    assert loader.dropped == []


def test_a_hold_that_leaves_the_loader_no_slot_is_refused_with_both_numbers():
    with pytest.raises(ConfigurationError, match="hold of at least 1"):
        SharedBatches("/nonexistent", 0, hold=0)
    with pytest.raises(ConfigurationError, match="at least 2"):
        SharedBatchesDataModule("/nonexistent", 0, hold=1)
    with BatchLoader(1, 8192 + 64, slots=2, join_timeout=WAIT_S) as loader:
        failure: list[BaseException] = []
        serving = threading.Thread(target=lambda: _catch(failure, loader.serve, _batches(3)), daemon=True)
        serving.start()
        with pytest.raises(ConfigurationError, match="its hold of 2 batches leaves the loader no slot of the ring's 2"):
            next(iter(SharedBatches(loader.directory, 0, hold=2, timeout=WAIT_S)))
        assert loader.joined == []
        _read(SharedBatches(loader.directory, 0, hold=1, timeout=WAIT_S), []).join(WAIT_S)  # one that fits is served
        serving.join(WAIT_S)
    assert not serving.is_alive() and not failure


def test_a_member_that_comes_after_serving_started_is_refused_rather_than_start_mid_epoch():
    with BatchLoader(2, 8192 + 64, join_timeout=0.5) as loader:
        serving = _serve(loader, _batches(20))
        on_time = SharedBatches(loader.directory, 0, timeout=WAIT_S)
        stream = iter(on_time)
        assert float(next(stream)["x"][0]) == 0.0  # served alone, once the other's join_timeout passed
        with pytest.raises(ConfigurationError, match="serving has started without it"):
            next(iter(SharedBatches(loader.directory, 1, timeout=WAIT_S)))
        assert [float(batch["x"][0]) for batch in stream] == [float(i) for i in range(1, 20)]
        on_time.close()
        serving.join(WAIT_S)


def test_serving_an_iterator_for_several_epochs_is_refused_before_anything_waits():
    with BatchLoader(1, 64, join_timeout=WAIT_S) as loader:
        with pytest.raises(ConfigurationError, match="iterator, which only one epoch can read"):
            loader.serve(iter(_batches(3)), epochs=2)


def test_an_epoch_left_early_skips_the_rest_of_the_loader_s():
    with BatchLoader(1, 8192 + 64) as loader:
        serving = threading.Thread(target=loader.serve, args=(_batches(6), 2), daemon=True)
        serving.start()
        member = SharedBatches(loader.directory, 0, timeout=WAIT_S)
        first = []
        for batch in member:  # limit_train_batches=2, say
            first.append(float(batch["x"][0]))
            if len(first) == 2:
                break
        second = [float(batch["x"][0]) for batch in member]
        member.close()
        serving.join(WAIT_S)
    assert first == [0.0, 1.0] and second == [float(i) for i in range(6)]  # the second epoch whole, from its start


def test_a_write_into_a_batch_kept_past_its_release_never_shows_in_the_next_batches():
    with BatchLoader(1, 8192 + 64, slots=2) as loader:
        serving = _serve(loader, _batches(9))
        member = SharedBatches(loader.directory, 0, hold=1, timeout=WAIT_S)
        seen, kept = [], None
        for batch in member:
            seen.append((float(batch["x"][0]), float(batch["x"][-1])))
            if kept is not None:
                kept["x"].fill_(-92.0)  # the previous batch, released already: its slot is written again next
            kept = batch
        member.close()
        serving.join(WAIT_S)
    assert seen == [(float(i), float(i)) for i in range(9)]


def test_a_message_nested_past_the_parser_s_depth_is_ignored():
    with BatchLoader(1, 8192 + 64) as loader:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
            peer.connect(os.path.join(loader.directory, SOCKET))
            peer.send(b"[" * 100000)
            serving = _serve(loader, _batches(3))
            seen: list[float] = []
            _read(SharedBatches(loader.directory, 0, timeout=WAIT_S), seen).join(WAIT_S)
            serving.join(WAIT_S)
    assert seen == [0.0, 1.0, 2.0]


def test_a_directory_that_is_a_link_or_holds_a_loader_already_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConfigurationError, match="not a directory of this user's"):
        BatchLoader(1, 64, directory=str(tmp_path / "link"))
    with BatchLoader(1, 64, directory=str(tmp_path / "pipeline")):
        with pytest.raises(ConfigurationError, match="holds a loader's ring and loader.sock already"):
            BatchLoader(1, 64, directory=str(tmp_path / "pipeline"))


@needs_root
def test_a_ring_that_does_not_fit_its_file_system_is_refused_at_once(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with pytest.raises(ConfigurationError, match="no room for a ring of 6 slots.*--shm-size"):
            BatchLoader(1, 1 << 20, directory=str(mount / "pipeline"))
        assert os.listdir(mount) == []  # nothing left behind: the next loader there starts clean
        with BatchLoader(1, 64, directory=str(mount / "pipeline")):
            pass
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _catch(failure: list, function, *args) -> None:
    try:
        function(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        failure.append(exc)


def test_keeping_freed_memory_takes_on_glibc_and_refuses_a_size_out_of_range():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the thresholds are glibc's")
    took = subprocess.run([sys.executable, "-c", "from viper_lightning.data import keep_freed_memory as k; "
                           "print(k(), k(32 * 1024 * 1024))"], capture_output=True, text=True, timeout=WAIT_S)
    assert took.stdout.split() == ["True", "True"], took.stderr  # in a process of its own: it is for good
    for wrong in (-1, 0, 1 << 31):
        with pytest.raises(ConfigurationError, match="from 128 KiB to 2 GiB"):
            keep_freed_memory(wrong)


def test_a_member_that_leaves_with_batches_unread_is_counted_as_left_not_dropped():
    with BatchLoader(2, 8192 + 64, slots=4) as loader:
        serving = _serve(loader, _batches(40))
        seen: list[float] = []
        reading = _read(SharedBatches(loader.directory, 0, timeout=WAIT_S), seen)
        leaving = SharedBatches(loader.directory, 1, timeout=WAIT_S)
        stream = iter(leaving)
        [next(stream) for _ in range(3)]
        deadline = time.monotonic() + WAIT_S
        while loader.served < 5 and time.monotonic() < deadline:
            serving.join(0.01)  # a poll of the loader's progress: batches 4 and 5 are sent to it, unread
        leaving.close()  # early stopping, say: done, bye, and its socket closes with messages unread
        reading.join(WAIT_S)
        serving.join(WAIT_S)
    assert loader.dropped == [] and seen == [float(i) for i in range(40)]


def test_a_directory_of_the_user_s_is_left_as_it_was_and_a_shared_one_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    (mine / "checkpoint.ckpt").write_text("weeks of training")
    with BatchLoader(1, 64, directory=str(mine)):
        assert sorted(os.listdir(mine)) == ["checkpoint.ckpt", "loader.sock", "ring"]
    assert os.listdir(mine) == ["checkpoint.ckpt"] and stat.S_IMODE(os.stat(mine).st_mode) == 0o755
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigurationError, match="only this user may write in"):
        BatchLoader(1, 64, directory=str(shared))
