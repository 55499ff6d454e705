"""The memory-first transfer engine: shared-memory and ZeroMQ routes, eviction, the planner,
and every fault falling back to the next tier while the consumer keeps serving."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
import zmq

from viper_lightning import (ConfigurationError, FileSystemTier, ProtocolError, Location, ModelPublisher, ModelSubscriber, Notice, StorageError,
                             TransferError, TransferPlanner, take_snapshot)
from viper_lightning.storage._shm import HEADER, HEADER_BYTES, MAGIC, SHM_DIR, READY
from viper_lightning.transport._fetch import FetchClient
from viper_lightning.transport._protocol import sign

from .conftest import (LOOPBACK_ANY_PORT, WAIT_S, FullDisk, TinyNet, assert_same_weights, needs_dev_full, perturbed,
                       publish_and_check)
from .test_bad_input import ForgedProducer

KEY = b"a key for the tier tests, 32 b.."


def segments(model: str) -> list[str]:
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(f"viper.{model}."))


@pytest.mark.parametrize("route", ["dram-shm", "dram-zmq", "pfs"])
def test_each_route_delivers_bit_exact_weights(route, model_name, pfs_root, events) -> None:
    producer = perturbed(TinyNet(), 1)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, KEY) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, pfs_root, KEY, routes=[route],
                         load_latest=False, on_update=events.on_update) as subscriber:
        record = publish_and_check(publisher, subscriber, producer, events)
        assert record.route == route and "cheapest reachable route" in record.why


def test_same_host_consumer_prefers_shared_memory(model_name, pfs_root, events) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, pfs_root, load_latest=False,
                         on_update=events.on_update) as subscriber:
        version = publisher.publish(perturbed(TinyNet(), 2))
        assert subscriber.wait_for_version(version, WAIT_S)
        assert events.wait_for_updates(1)[0].route == "dram-shm"


def test_segments_are_private_evicted_and_removed_at_exit(model_name, pfs_root) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, dram_versions=1) as publisher:
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


def test_latest_op_answers_a_late_joiner(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        version = publisher.publish(TinyNet())
        publisher.flush(WAIT_S)
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, KEY, WAIT_S)
        notice = Notice.decode(client.latest_notice(), KEY)
        assert notice.version == version
        assert [loc.tier for loc in notice.locations] == ["dram", "dram"]


def test_fetch_requests_without_the_key_are_refused(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        version = publisher.publish(TinyNet())
        publisher.flush(WAIT_S)
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="carries no MAC"):
            client.fetch_into(version, torch.empty(1 << 20, dtype=torch.uint8), 1)


def test_memory_only_publisher_needs_no_file_system(model_name, events) -> None:
    producer = perturbed(TinyNet(), 5)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, routes=["dram-zmq"]) as subscriber:
        version = publisher.publish(producer)
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)


def test_vanished_segment_falls_back_to_the_next_route(model_name, pfs_root, events) -> None:
    producer = perturbed(TinyNet(), 3)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root) as publisher:
        version = publisher.publish(producer)
        publisher.flush(WAIT_S)
        os.unlink(os.path.join(SHM_DIR, f"viper.{model_name}.v{version}"))
        with ModelSubscriber(TinyNet(), model_name, publisher.endpoint, pfs_root, load_latest=False,
                             on_update=events.on_update) as subscriber:
            assert subscriber.wait_for_version(version, WAIT_S)
            record = events.wait_for_updates(1)[0]
            assert record.route == "dram-zmq" and "is gone" in record.why
            with subscriber.serving() as served:
                assert_same_weights(producer, served)


class SilentProducer:
    """A fetch endpoint that answers 'open' and then dies: a producer lost mid-transfer."""

    def __init__(self, context: zmq.Context, model: str, version: int, nbytes: int, digest: str) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(LOOPBACK_ANY_PORT)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.answer = {"status": "ok", "model": model, "version": version, "nbytes": nbytes, "digest": digest,
                       "chunk_bytes": 8388608}
        self.answer["mac"] = sign(self.answer, KEY)

    def answer_open_then_die(self) -> None:
        if not self.socket.poll(int(WAIT_S * 1000)):
            raise AssertionError("the consumer never asked")
        peer, _ = self.socket.recv_multipart()
        self.socket.send_multipart([peer, json.dumps(self.answer).encode()])
        self.socket.close(0)


def test_producer_lost_mid_transfer_falls_back_to_files(model_name, pfs_root, zmq_context, events) -> None:
    producer = perturbed(TinyNet(), 4)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, KEY, dram_versions=0) as publisher:
        version = publisher.publish(producer)
    tier = FileSystemTier(pfs_root)
    stored = tier.read_manifest(model_name, version, KEY)
    silent = SilentProducer(zmq_context, model_name, version, stored.nbytes, stored.digest)
    forged = ForgedProducer(zmq_context, topic=model_name.encode())
    notice = stored.with_locations((Location("dram", "other-host", silent.endpoint),
                                    Location("pfs", "host", tier.address(model_name, version))))
    try:
        with ModelSubscriber(TinyNet(), model_name, forged.endpoint, pfs_root, KEY, load_latest=False,
                             fetch_timeout=0.5, on_update=events.on_update) as subscriber:
            forged.wait_for_subscriber()
            forged.send(notice.encode(KEY))
            silent.answer_open_then_die()
            assert subscriber.wait_for_version(version, WAIT_S)
            record = events.wait_for_updates(1)[0]
            assert record.route == "pfs" and "did not answer" in record.why
            with subscriber.serving() as served:
                assert_same_weights(producer, served)
    finally:
        forged.close()


@needs_dev_full
def test_full_disk_during_flush_surfaces_while_memory_keeps_serving(model_name, tmp_path, events) -> None:
    tier = FileSystemTier(str(tmp_path), files=FullDisk())
    producer = perturbed(TinyNet(), 6)
    publisher = ModelPublisher(model_name, LOOPBACK_ANY_PORT, tier)
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


def test_planner_ranks_by_cost_and_learns_bandwidth() -> None:
    snapshot = take_snapshot({"w": torch.zeros(64 << 20, dtype=torch.uint8)})
    notice = Notice(model="m", version=1, nbytes=snapshot.layout.nbytes, digest="xxh3_128:0",
                    layout=snapshot.layout, producer="p",
                    locations=(Location("pfs", "here", "/pfs/m/v1"), Location("dram", "here", "tcp://h:1"),
                               Location("dram", "here", "shm://viper.m.v1")))
    planner = TransferPlanner("here")
    assert [r.kind for r in planner.routes(notice)] == ["dram-shm", "dram-zmq", "pfs"]
    assert [r.kind for r in TransferPlanner("elsewhere").routes(notice)] == ["dram-zmq", "pfs"]
    assert [r.kind for r in TransferPlanner("here", ["pfs"]).routes(notice)] == ["pfs"]
    for _ in range(10):  # the network turns out far slower than the file system here
        planner.observe("dram-zmq", 64 << 20, 2.0)
    assert [r.kind for r in planner.routes(notice)] == ["dram-shm", "pfs", "dram-zmq"]
    busy = notice.with_locations((Location("dram", "here", "shm://viper.m.v1", load=100),
                                  Location("pfs", "here", "/pfs/m/v1")))
    assert [r.kind for r in planner.routes(busy)][0] == "pfs"


def test_zero_copy_consumer_serves_from_the_segment_and_pins_it(model_name, pfs_root) -> None:
    producer = TinyNet()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, pfs_root, load_latest=False) as subscriber:
        first = publisher.publish(perturbed(producer, 1))
        assert subscriber.wait_for_version(first, WAIT_S)
        expected_first = {k: v.clone() for k, v in producer.state_dict().items()}
        with subscriber.lease() as in_flight:
            assert in_flight.version == first
            for seed in range(2, 6):  # the producer keeps going while a request holds v1
                version = publisher.publish(perturbed(producer, seed))
                publisher.flush(WAIT_S)
                if version == first + 1:
                    assert subscriber.wait_for_version(version, WAIT_S)
            # v1's segment is pinned: the producer rewrote other segments, never this one.
            assert_same_weights(expected_first, in_flight.model)
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
            assert subscriber.stats.last.route == "dram-shm"


def test_a_write_to_zero_copy_weights_never_reaches_the_producer(model_name) -> None:
    producer = perturbed(TinyNet(), 9)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint) as careless, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, zero_copy=False) as careful:
        version = publisher.publish(producer)
        assert careless.wait_for_version(version, WAIT_S)
        with careless.serving() as served, torch.no_grad():
            served.hidden.weight.add_(1.0)  # copy-on-write: only this process sees it
        assert careful.wait_for_version(version, WAIT_S)
        with careful.serving() as served:
            assert_same_weights(producer, served)


def test_segments_are_removed_when_a_producer_exits_without_close(model_name) -> None:
    script = (f"import torch\nfrom viper_lightning import ModelPublisher\n"
              f"publisher = ModelPublisher({model_name!r}, 'tcp://127.0.0.1:*')\n"
              f"publisher.publish(torch.nn.Linear(64, 64))\npublisher.flush(60)\n"
              f"import os; print(sorted(n for n in os.listdir('/dev/shm') if n.startswith('viper.')))\n")
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert f"viper.{model_name}.v1" in finished.stdout  # it existed while the producer ran
    assert segments(model_name) == []


def test_collective_route_delivers_over_gloo(model_name, events) -> None:
    producer = perturbed(TinyNet(), 11)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, collective_endpoint="gloo://127.0.0.1:0") as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, routes=["collective"],
                         on_update=events.on_update) as subscriber:
        version = publisher.publish(producer)
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
        assert events.wait_for_updates(1)[0].route == "collective"


def test_nccl_without_a_gpu_tier_is_a_configuration_error(model_name) -> None:
    # without CUDA the backend check refuses first; with it, the missing GPU tier is named
    with pytest.raises(ConfigurationError, match="needs a CUDA build|NCCL serves the GPU tier"):
        ModelPublisher(model_name, LOOPBACK_ANY_PORT, collective_endpoint="nccl://127.0.0.1:0")


@pytest.mark.parametrize("request_body", [
    {"op": "read", "version": 1},                       # no offset/length: must not leak a borrow
    {"op": ["read"], "version": 1},                     # unhashable op
    {"op": "read", "version": 1, "offset": "0", "length": 8},
])
def test_malformed_fetch_requests_are_answered_and_leak_nothing(model_name, zmq_context, request_body) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher:
        version = publisher.publish(TinyNet())
        publisher.flush(WAIT_S)
        with zmq_context.socket(zmq.DEALER) as peer:
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(publisher.fetch_endpoint)
            peer.send_json({"proto": 1, "model": model_name, **request_body})
            assert peer.poll(int(WAIT_S * 1000))
            assert peer.recv_json()["status"] == "error"
        held = publisher._store.borrow(version)
        assert held is not None and held.borrowers == 1  # only the borrow just taken: none leaked
        publisher._store.give_back(held)
        assert publisher.version == version and publisher.publish(TinyNet()) == version + 1  # server alive


def test_unsigned_fetch_answers_are_refused_when_keyed(model_name, zmq_context) -> None:
    """With a key, the digest that vouches for the bytes must be signed: an impostor endpoint is refused."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as unkeyed:  # an impostor without the key
        version = unkeyed.publish(TinyNet())
        unkeyed.flush(WAIT_S)
        client = FetchClient(zmq_context, unkeyed.fetch_endpoint, model_name, None, WAIT_S)
        keyed = FetchClient(zmq_context, unkeyed.fetch_endpoint, model_name, KEY, WAIT_S)
        buffer = torch.empty(1 << 20, dtype=torch.uint8)
        nbytes = take_snapshot(TinyNet().state_dict()).layout.nbytes
        client.fetch_into(version, buffer, nbytes)  # without a key, the digest is all there is
        with pytest.raises(ProtocolError, match="fetch answer .* carries no MAC"):
            keyed.fetch_into(version, buffer, nbytes)


def _segment_holding(segment, version: int, fill: int) -> None:
    """Rewrite a producer segment in place as `version`, every byte `fill` (as the store does)."""
    assert segment.try_lock()
    segment.begin_write()
    segment.buffer.fill_(fill)
    segment.publish(version, segment.capacity, f"viper.{segment.name.split('.')[1]}.v{version}")


def test_zero_copy_mappings_are_reused_for_later_versions_of_a_segment(model_name) -> None:
    """Kept mappings keep their page tables (no faults on the next version) and still show the
    producer's rewrite."""
    from viper_lightning.storage._shm import ZeroCopyMappings, Segment

    segment = Segment(f"viper.{model_name}.free.1", 1 << 20)
    mappings = ZeroCopyMappings()
    try:
        _segment_holding(segment, 1, 1)
        first = mappings.lock(segment.name, 1, 1 << 20)
        assert int(first.buffer[::4096].sum()) == 256  # every page touched, as a request would
        mapping = first.mapping
        first.release()
        mappings.retired(first)  # no tensor views it now
        _segment_holding(segment, 3, 7)
        second = mappings.lock(segment.name, 3, 1 << 20)
        assert second.mapping is mapping
        assert torch.equal(second.buffer[::4096], torch.full((256,), 7, dtype=torch.uint8))
        second.release()
    finally:
        mappings.close()
        segment.unlink()


@pytest.mark.parametrize("offset", [5000, -1], ids=["inside", "partial-last-page"])
def test_a_mapping_the_model_wrote_to_is_not_reused(model_name, offset) -> None:
    """A written page became a private copy holding the old bytes: reusing the mapping would
    serve them in the next version, so it is mapped afresh. The last page is partial (a 64-byte
    header + 1 MiB) and must be checked too."""
    from viper_lightning.storage._shm import ZeroCopyMappings, Segment

    segment = Segment(f"viper.{model_name}.free.1", 1 << 20)
    mappings = ZeroCopyMappings()
    try:
        _segment_holding(segment, 1, 1)
        first = mappings.lock(segment.name, 1, 1 << 20)
        first.buffer[offset] = 99  # e.g. a BatchNorm running mean updated in train mode
        mapping = first.mapping
        first.release()
        mappings.retired(first)
        _segment_holding(segment, 2, 7)
        second = mappings.lock(segment.name, 2, 1 << 20)
        assert second.mapping is not mapping
        assert int(second.buffer[offset]) == 7
        second.release()
    finally:
        mappings.close()
        segment.unlink()


def test_mappings_of_unlinked_segments_are_let_go(model_name) -> None:
    from viper_lightning.storage._shm import ZeroCopyMappings, Segment

    gone, kept = (Segment(f"viper.{model_name}.free.{n}", 4096) for n in (1, 2))
    mappings = ZeroCopyMappings()
    try:
        _segment_holding(gone, 1, 1)
        mappings.lock(gone.name, 1, 4096).release()
        gone.unlink()  # evicted by the producer: a kept mapping would hold its memory
        _segment_holding(kept, 2, 2)
        mappings.lock(kept.name, 2, 4096).release()
        assert len(mappings._kept) == 1
    finally:
        mappings.close()
        kept.unlink()


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
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, flush_delay=59) as publisher:
        published = threading.Event()

        def publish_more_than_the_pool_holds() -> None:  # 4 slots
            for seed in range(8):
                publisher.publish(perturbed(TinyNet(), seed))
            published.set()

        threading.Thread(target=publish_more_than_the_pool_holds, daemon=True).start()
        assert published.wait(WAIT_S)  # not 59 s per slot
        assert FileSystemTier(pfs_root).latest(model_name) >= 4  # drained to free the slots
