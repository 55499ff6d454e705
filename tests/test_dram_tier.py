"""The DRAM tier: private segments, eviction and byte budgets, cleanup at exit and after a crash,
and the burst buffer draining to the file system behind it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

from viper_lightning import (ConfigurationError, FileSystemTier, ModelPublisher, ModelSubscriber, StorageError,
                             TransferError, take_snapshot)
from viper_lightning.storage._shm import HEADER, HEADER_BYTES, MAGIC, SHM_DIR, READY
from viper_lightning.transport._fetch import FetchClient

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, FullDisk, TinyNet, assert_same_weights, needs_dev_full, perturbed


def segments(model: str) -> list[str]:
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(f"viper.{model}."))


def test_segments_are_private_evicted_and_removed_at_exit(model_name, pfs_root) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, dram_versions=1, allow_keyless=True,
                        keep_every_version=True) as publisher:
        publisher.publish(perturbed(TinyNet(), 1))
        publisher.publish(perturbed(TinyNet(), 2))
        publisher.flush(WAIT_S)
        named = [s for s in segments(model_name) if ".v" in s]
        assert named == [f"viper.{model_name}.v2"]  # v1 left memory; it lives on in the pfs tier
        mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIR, named[0])).st_mode)
        assert mode == 0o600
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="still lives in: pfs"):
            client.fetch_into(1, torch.empty(1 << 20, dtype=torch.uint8), 1)
    assert segments(model_name) == []


def test_memory_only_publisher_needs_no_file_system(model_name, events) -> None:
    producer = perturbed(TinyNet(), 5)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, routes=["dram-zmq"]) as subscriber:
        version = publisher.publish(producer)
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)


@needs_dev_full
def test_full_disk_during_flush_surfaces_while_memory_keeps_serving(model_name, tmp_path, events) -> None:
    """The strict mode (on_tier_error="raise"): the write's failure is raised on the caller."""
    tier = FileSystemTier(str(tmp_path), files=FullDisk())
    producer = perturbed(TinyNet(), 6)
    publisher = ModelPublisher(model_name, LOOPBACK_ANY_PORT, tier, on_tier_error="raise")
    with ModelSubscriber(TinyNet(), model_name, publisher.endpoint, load_latest=False) as subscriber:
        version = publisher.publish(producer)
        assert subscriber.wait_for_version(version, WAIT_S)  # served from memory regardless
        with pytest.raises(StorageError, match="disk full"):
            publisher.flush(WAIT_S)
        with pytest.raises(StorageError, match="disk full"):
            publisher.publish(producer)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
    with pytest.raises(StorageError, match="disk full"):
        publisher.close()
    assert segments(model_name) == []


def test_stale_segments_of_a_dead_producer_are_reclaimed(model_name) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = os.path.join(SHM_DIR, f"viper.{model_name}.v7")
    with open(path, "wb") as handle:
        handle.write(HEADER.pack(MAGIC, 7, READY, 0, 1, dead.pid).ljust(HEADER_BYTES, b"\0"))
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT):
        assert not os.path.exists(path)


def test_segments_are_removed_when_a_producer_exits_without_close(model_name) -> None:
    script = (f"import torch\nfrom viper_lightning import ModelPublisher\n"
              f"publisher = ModelPublisher({model_name!r}, 'tcp://127.0.0.1:*')\n"
              f"publisher.publish(torch.nn.Linear(64, 64))\npublisher.flush(60)\n"
              f"import os; print(sorted(n for n in os.listdir('/dev/shm') if n.startswith('viper.')))\n")
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert f"viper.{model_name}.v1" in finished.stdout  # it existed while the producer ran
    assert segments(model_name) == []


def test_dram_byte_budget_keeps_only_what_fits(model_name, pfs_root) -> None:
    nbytes = take_snapshot(TinyNet().state_dict()).layout.nbytes
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, dram_versions=10,
                        dram_bytes=int(2.5 * nbytes)) as publisher:
        for seed in range(5):
            publisher.publish(perturbed(TinyNet(), seed))
        assert publisher.flush(WAIT_S)
        assert [s for s in segments(model_name) if ".v" in s] == [f"viper.{model_name}.v4", f"viper.{model_name}.v5"]
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, dram_bytes=1) as publisher:
        version = publisher.publish(TinyNet())  # bigger than the budget: the newest stays anyway
        assert publisher.flush(WAIT_S)
        assert f"viper.{model_name}.v{version}" in segments(model_name)
    with pytest.raises(ConfigurationError, match="dram_bytes=0"):
        ModelPublisher(model_name, LOOPBACK_ANY_PORT, dram_bytes=0)


def test_the_newest_version_stays_in_memory_while_an_older_one_is_borrowed(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, dram_versions=1) as publisher:
        first = publisher.publish(perturbed(TinyNet(), 1))
        held = publisher._store.borrow(first)  # e.g. a remote transfer still reading it
        second = publisher.publish(perturbed(TinyNet(), 2))
        assert publisher._store.borrow(second) is not None
        publisher._store.give_back(held)
        assert f"viper.{model_name}.v{second}" in segments(model_name)
        assert f"viper.{model_name}.v{first}" not in segments(model_name)


def test_flush_delay_holds_the_write_back_but_never_flush_or_close(model_name, pfs_root) -> None:
    for finish in (lambda publisher: publisher.flush(WAIT_S), lambda publisher: publisher.close()):
        publisher = ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, flush_delay=59)
        version = publisher.publish(perturbed(TinyNet(), 1))
        assert FileSystemTier(pfs_root).latest(model_name) == (version - 1 or None)  # in memory; the write waits
        finish(publisher)  # drains at once
        assert FileSystemTier(pfs_root).latest(model_name) == version
        publisher.close()
    with pytest.raises(ConfigurationError, match="flush_delay=-1"):
        ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, flush_delay=-1)


def test_a_producer_waiting_for_a_slot_cuts_the_flush_delay_short(model_name, pfs_root) -> None:
    """With every slot held by the delayed drain, the next publish would wait out the delay:
    instead it makes the flusher drain at once (no timing: the delay is a minute)."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, flush_delay=59,
                        keep_every_version=True) as publisher:
        published = threading.Event()

        def publish_more_than_the_pool_holds() -> None:  # 4 slots
            for seed in range(8):
                publisher.publish(perturbed(TinyNet(), seed))
            published.set()

        threading.Thread(target=publish_more_than_the_pool_holds, daemon=True).start()
        assert published.wait(WAIT_S)  # not 59 s per slot
        assert FileSystemTier(pfs_root).latest(model_name) >= 4  # drained to free the slots


@needs_dev_full
def test_a_full_disk_degrades_the_file_system_tier_and_training_goes_on(model_name, tmp_path, events) -> None:
    """Issue 11, defect 10: the default policy reports a failed write, keeps the version in
    memory, and retries the tier with backoff until the disk has room again."""
    disk = FullDisk()
    tier = FileSystemTier(str(tmp_path), files=disk)
    producer = perturbed(TinyNet(), 7)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, tier) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, load_latest=False) as subscriber:
        first = publisher.publish(producer)
        assert not publisher.flush(WAIT_S)  # no raise: the tier is degraded, not the publisher
        assert publisher.health["file-system tier"].startswith("degraded: ") and "disk full" in publisher.health["file-system tier"]
        assert subscriber.wait_for_version(first, WAIT_S)  # memory keeps serving
        second = publisher.publish(perturbed(producer, 8))  # training goes on
        assert subscriber.wait_for_version(second, WAIT_S)
        disk.full = False
        deadline = time.monotonic() + WAIT_S  # the tier is retried after its backoff
        while publisher.health["file-system tier"] != "ok" and time.monotonic() < deadline:
            latest = publisher.publish(perturbed(producer, 9))
            publisher.flush(WAIT_S)
        assert publisher.health["file-system tier"] == "ok"
        assert tier.latest(model_name) == latest and first not in tier.versions(model_name)


def test_a_stray_version_directory_costs_one_version_not_the_run(model_name, pfs_root) -> None:
    """Issue 11, defect 10: another writer's directory where the next version goes."""
    tier = FileSystemTier(pfs_root)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, flush_delay=0) as publisher:
        first = publisher.publish(TinyNet())
        assert publisher.flush(WAIT_S)
        os.makedirs(tier.version_dir(model_name, first + 1))
        second = publisher.publish(TinyNet())
        assert not publisher.flush(WAIT_S)  # that version is in memory only
        assert "already exists" in publisher.health["file-system tier"]
        deadline = time.monotonic() + WAIT_S
        while publisher.health["file-system tier"] != "ok" and time.monotonic() < deadline:
            later = publisher.publish(TinyNet())
            publisher.flush(WAIT_S)
        assert publisher.health["file-system tier"] == "ok" and tier.latest(model_name) == later > second


@needs_dev_full
def test_the_last_version_gets_its_write_even_during_a_backoff(model_name, tmp_path) -> None:
    """A failure just before the end of training must not lose the final weights: flush() and
    close() try the write whatever the backoff says."""
    disk = FullDisk()
    tier = FileSystemTier(str(tmp_path), files=disk)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, tier) as publisher:
        publisher.publish(TinyNet())
        assert not publisher.flush(WAIT_S)  # failed, and now in a backoff
        disk.full = False
        last = publisher.publish(TinyNet())
        assert publisher.flush(WAIT_S) and publisher.health["file-system tier"] == "ok"
    assert tier.latest(model_name) == last


def test_prepare_faults_the_first_slot_in_before_the_first_publish(model_name) -> None:
    """The first publish copies into the slot `prepare` made in the background, not a new one."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, dram_versions=1) as publisher:
        model = perturbed(TinyNet(), 1)
        publisher.prepare(model)
        deadline = time.monotonic() + WAIT_S
        while not (prepared := [name for name in segments(model_name) if ".free." in name]):
            assert time.monotonic() < deadline, "prepare made no slot"
            time.sleep(0.01)  # polling for the background thread's segment, not timing it
        inode = os.stat(os.path.join(SHM_DIR, prepared[0])).st_ino
        version = publisher.publish(model)
        assert os.stat(os.path.join(SHM_DIR, f"viper.{model_name}.v{version}")).st_ino == inode


def test_a_publish_is_skipped_not_stalled_while_every_slot_is_held(model_name) -> None:
    """Transfers that never end hold every slot the pool may grow to: publish returns None at
    once and counts it, rather than wait for them; once they end, publishing goes on."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, dram_versions=1) as publisher:
        borrowed, versions = [], []
        for seed in range(64):
            version = publisher.publish(perturbed(TinyNet(), seed))
            versions.append(version)
            if version is None:
                break
            borrowed.append(publisher._store.borrow(version))  # e.g. a remote transfer still reading it
        assert versions[-1] is None and None not in versions[:-1]
        assert publisher.publishes_skipped == 1
        for held in borrowed:
            publisher._store.give_back(held)
        assert publisher.publish(perturbed(TinyNet(), 99)) == versions[-2] + 1
        assert publisher.publishes_skipped == 1


def test_keep_every_version_waits_for_a_slot_instead_of_skipping(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, dram_versions=1, keep_every_version=True) as publisher:
        borrowed = [publisher._store.borrow(publisher.publish(perturbed(TinyNet(), seed))) for seed in range(16)]
        waiting, results = threading.Event(), []
        publisher._store.on_starved = waiting.set  # called while a publish waits for a slot
        worker = threading.Thread(target=lambda: results.append(publisher.publish(perturbed(TinyNet(), 99))))
        worker.start()
        assert waiting.wait(WAIT_S)
        assert not results  # still waiting: every slot is held
        for held in borrowed:
            publisher._store.give_back(held)
        worker.join(WAIT_S)
        assert results == [17] and publisher.publishes_skipped == 0


def test_a_model_that_grew_gets_a_slot_of_its_new_size(model_name) -> None:
    """Slots made ahead for the old size are too small for the new one: the publish gets a slot
    of the new size, it does not wait on warming after warming of the old one."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, dram_versions=1) as publisher:
        publisher.prepare(TinyNet())
        bigger = {"weight": torch.ones(1 << 20)}
        results: list[int | None] = []
        worker = threading.Thread(target=lambda: results.append(publisher.publish(bigger)), daemon=True)
        worker.start()
        worker.join(WAIT_S)
        assert results == [1]
        assert publisher.publish(TinyNet().state_dict(), wait_for_slot=True) == 2  # smaller fits the bigger slots


def test_a_notice_built_just_after_the_write_carries_the_digest_the_write_computed() -> None:
    """The announcer reads the digest, then builds the notice; if the flusher wrote the version
    in between, the notice names the file system: it must carry the digest the write computed
    (an unsigned file location would make the announcer fail), never a location without one."""
    from viper_lightning._layout import Layout
    from viper_lightning.producer._catalog import VersionCatalog, VersionRecord
    from viper_lightning.producer._store import TieredStore

    model = TinyNet()
    layout = Layout.for_state_dict(model.state_dict())
    catalog = VersionCatalog("m", "here", "producer", 1)
    store = TieredStore("m", "here", dram_versions=0)
    try:
        version = catalog.add(VersionRecord(layout, None, None, 0.0))
        host_copy = store.commit(version, layout, store.capture(layout, model.state_dict()), borrowed=False)
        catalog.reached_host(version, host_copy)
        digest_read_before = catalog.known_digest(version)  # what the announcer read: none yet
        digest = host_copy.digest()  # the flusher: digest, write...
        catalog.flushed(version, "/pfs/m/v1", 0.0, 0.0)  # ...and the location
        notice = catalog.notice(version, digest_read_before, ())
        assert digest_read_before is None
        assert notice.digest == digest and [loc.tier for loc in notice.locations] == ["pfs"]
        notice.encode()  # a file-system location with its digest: no ProtocolError
    finally:
        store.close()


def _nice_of(thread_name: str) -> int:
    thread = next(t for t in threading.enumerate() if t.name == thread_name)
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value belongs to a thread on Linux only")
@pytest.mark.parametrize("niceness", [19, 0])
def test_background_writers_run_below_training_priority(model_name, pfs_root, niceness) -> None:
    """The flusher (digest and write) runs `background_niceness` below training; the demoter,
    which a publish may wait for, and the caller's thread keep their priority."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, gpu_device="cpu", allow_keyless=True,
                        background_niceness=niceness) as publisher:
        publisher.publish(perturbed(TinyNet(), 1))
        publisher.flush(WAIT_S)  # both threads have run their first version: their priority is set
        expected = min(19, own + niceness)
        assert _nice_of(f"viper-flusher-{model_name}") == expected
        assert _nice_of(f"viper-demoter-{model_name}") == own
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
