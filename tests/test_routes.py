"""The routes a consumer takes to a version (shared memory, ZeroMQ, Gloo, files), the planner
that ranks them, and every fault falling back to the next route while the consumer keeps serving."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import pytest
import torch
import zmq

from viper_lightning import (ConfigurationError, FileSystemTier, Location, ModelPublisher, ModelSubscriber, Notice,
                             TransferPlanner, take_snapshot)
from viper_lightning.storage._shm import SHM_DIR
from viper_lightning.transport._fetch import FetchClient
from viper_lightning.transport._protocol import sign

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, assert_same_weights, perturbed, publish_and_check
from .test_refusals import ForgedProducer

KEY = b"a key for the tier tests, 32 b.."


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

    def __init__(self, context: zmq.Context, model: str, version: int, nbytes: int, digest: str,
                 producer: str) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(LOOPBACK_ANY_PORT)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.answer = {"status": "ok", "model": model, "producer": producer, "version": version, "nbytes": nbytes,
                       "digest": digest, "chunk_bytes": 8388608}
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
    silent = SilentProducer(zmq_context, model_name, version, stored.nbytes, stored.digest, stored.producer)
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


def test_a_notice_from_before_the_write_falls_back_to_the_file_system_copy(model_name, pfs_root, events,
                                                                          zmq_context) -> None:
    """Found by the chaos test: the last notice a consumer got named only memory tiers (it was
    sent before the flush), and the producer exited before the consumer fetched. The version is on
    the file-system tier, so the consumer reads it there rather than refuse it and stay behind."""
    producer = perturbed(TinyNet(), 12)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, KEY, flush_delay=50.0) as publisher:
        version = publisher.publish(producer)
        early = FetchClient(zmq_context, publisher.fetch_endpoint, model_name, KEY, WAIT_S).latest_notice()
        assert [location["tier"] for location in json.loads(early)["locations"]] == ["dram", "dram"]
        assert publisher.flush(WAIT_S)
    with replayed(zmq_context, model_name, early, pfs_root, events) as subscriber:
        record = events.wait_for_updates(1)[0]
        assert record.version == version and record.route == "pfs"
        assert "read the file-system tier's copy" in record.why
        with subscriber.serving() as served:
            assert_same_weights(producer, served)


@contextlib.contextmanager
def replayed(zmq_context, model_name: str, notice: bytes, pfs_root: str, events) -> Iterator[ModelSubscriber]:
    """A subscriber (remote fetch, then files) that has been sent this real, signed notice again."""
    forged = ForgedProducer(zmq_context, model_name.encode())
    try:
        with ModelSubscriber(TinyNet(), model_name, forged.endpoint, pfs_root, KEY, routes=["dram-zmq", "pfs"],
                             fetch_timeout=1.0, load_latest=False, on_update=events.on_update,
                             on_refusal=events.on_refusal) as subscriber:
            forged.wait_for_subscriber()
            forged.send(notice)
            yield subscriber
    finally:
        forged.close()


def test_the_fallback_refuses_a_stored_copy_another_producer_wrote(model_name, tmp_path, events,
                                                                   zmq_context) -> None:
    """The file-system copy must be the announced version itself: a signed v1 of another run with
    the same key (put there by whoever can write the storage) is not it."""
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, ours, KEY, flush_delay=50.0) as publisher:
        publisher.publish(perturbed(TinyNet(), 13))
        early = FetchClient(zmq_context, publisher.fetch_endpoint, model_name, KEY, WAIT_S).latest_notice()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, theirs, KEY) as other:
        other.publish(perturbed(TinyNet(), 14))
    with replayed(zmq_context, model_name, early, theirs, events) as subscriber:
        refusal = events.wait_for_refusals(1)[0]
        assert "is not the version the notice announced" in refusal.reason and subscriber.version is None
