"""Every kind of bad update is refused with a message naming what was wrong; the subscriber
keeps serving the last good version and keeps listening."""

from __future__ import annotations

import json
import logging
import os
import struct

import pytest
import torch
import zmq

from viper_lightning import FileSystemTier, Location, ModelPublisher, ModelSubscriber

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, assert_same_weights, perturbed

KEY = b"the producer's key, 32 bytes ok!"


class ForgedProducer:
    """A raw XPUB socket on loopback that sends whatever a test gives it."""

    def __init__(self, context: zmq.Context, topic: bytes = b"tiny") -> None:
        self.topic = topic
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(LOOPBACK_ANY_PORT)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def wait_for_subscriber(self) -> None:
        if not self.socket.poll(int(WAIT_S * 1000), zmq.POLLIN):
            raise AssertionError("no subscriber connected")
        assert self.socket.recv() == b"\x01" + self.topic

    def send(self, payload: bytes, topic: bytes | None = None) -> None:
        self.socket.send_multipart([topic or self.topic, payload])

    def close(self) -> None:
        self.socket.close(0)


@pytest.fixture
def stored_versions(pfs_root) -> dict[int, TinyNet]:
    """Three real versions on the file system, written by a real publisher."""
    models = {version: perturbed(TinyNet(), version) for version in (1, 2, 3)}
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, KEY, keep_every_version=True) as publisher:
        for model in models.values():
            publisher.publish(model)
    return models


def signed_notice(pfs_root: str, version: int, key: bytes | None = KEY) -> bytes:
    tier = FileSystemTier(pfs_root)
    notice = tier.read_manifest("tiny", version, KEY)
    location = Location("pfs", "host", tier.address("tiny", version))
    return notice.with_locations((location,)).encode(key)


@pytest.fixture
def forged(zmq_context):
    producer = ForgedProducer(zmq_context)
    yield producer
    producer.close()


def serving_v1(forged: ForgedProducer, pfs_root: str, events, model: torch.nn.Module | None = None,
               key: bytes | None = KEY) -> ModelSubscriber:
    subscriber = ModelSubscriber(model or TinyNet(), "tiny", forged.endpoint, pfs_root, key, load_latest=False,
                                 on_update=events.on_update, on_refusal=events.on_refusal).start()
    forged.wait_for_subscriber()
    forged.send(signed_notice(pfs_root, 1))
    assert subscriber.wait_for_version(1, WAIT_S)
    return subscriber


def assert_refused_and_still_serving_v1(subscriber: ModelSubscriber, events, stored, match: str,
                                        caplog, forged: ForgedProducer, pfs_root: str) -> None:
    refusal = events.wait_for_refusals(1)[0]
    assert match in refusal.reason
    assert any(match in record.getMessage() and record.levelno == logging.ERROR for record in caplog.records)
    assert subscriber.version == 1
    with subscriber.serving() as served:
        assert_same_weights(stored[1], served)
    # Still listening: a good update after the bad one is applied.
    forged.send(signed_notice(pfs_root, 3))
    assert subscriber.wait_for_version(3, WAIT_S)
    with subscriber.serving() as served:
        assert_same_weights(stored[3], served)


def corrupt(pfs_root: str, version: int, how: str) -> None:
    path = os.path.join(pfs_root, "tiny", f"v{version}", "model.safetensors")
    if how == "missing":
        os.remove(path)
    elif how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "bitflip":
        with open(path, "r+b") as handle:
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)[0]
            handle.seek(-1, os.SEEK_END)
            handle.write(bytes([last ^ 0x01]))


def tamper(payload: bytes, **changes: object) -> bytes:
    notice = json.loads(payload)
    notice.update(changes)
    return json.dumps(notice).encode()


@pytest.mark.parametrize(("make_payload", "match"), [
    (lambda root: b"{definitely not json", "not valid JSON"),
    (lambda root: b'["a", "list"]', "must be a JSON object"),
    (lambda root: signed_notice(root, 2, key=None), "carries no MAC"),
    (lambda root: signed_notice(root, 2, key=b"someone else's key, 32 bytes..."), "wrong MAC"),
    (lambda root: tamper(signed_notice(root, 2), step=12345), "wrong MAC"),
    (lambda root: tamper(signed_notice(root, 2), proto=9), "protocol 9 is not supported"),
    (lambda root: b'{"proto":1,"created_at":NaN,"mac":"0"}', "NaN is not allowed"),
    (lambda root: b"[" * 200_000, "not valid JSON"),
])
def test_bad_notices_are_refused(stored_versions, pfs_root, forged, events, caplog, make_payload, match) -> None:
    with serving_v1(forged, pfs_root, events) as subscriber:
        forged.send(make_payload(pfs_root))
        assert_refused_and_still_serving_v1(subscriber, events, stored_versions, match, caplog, forged, pfs_root)


def test_version_older_than_serving_is_refused(stored_versions, pfs_root, forged, events, caplog) -> None:
    with serving_v1(forged, pfs_root, events) as subscriber:
        forged.send(signed_notice(pfs_root, 2))
        assert subscriber.wait_for_version(2, WAIT_S)
        forged.send(signed_notice(pfs_root, 1))
        refusal = events.wait_for_refusals(1)[0]
        assert "older than the version 2 now serving" in refusal.reason
        assert subscriber.version == 2
        with subscriber.serving() as served:
            assert_same_weights(stored_versions[2], served)


@pytest.mark.parametrize(("how", "match"), [
    ("missing", "the file is missing"),
    ("truncated", "truncated"),
    ("bitflip", "digest mismatch"),
])
def test_damaged_files_are_refused(stored_versions, pfs_root, forged, events, caplog, how, match) -> None:
    with serving_v1(forged, pfs_root, events) as subscriber:
        corrupt(pfs_root, 2, how)
        forged.send(signed_notice(pfs_root, 2))
        assert_refused_and_still_serving_v1(subscriber, events, stored_versions, match, caplog, forged, pfs_root)


def test_a_refused_version_repeated_by_heartbeats_is_refused_once(stored_versions, pfs_root, forged, events) -> None:
    with serving_v1(forged, pfs_root, events) as subscriber:
        corrupt(pfs_root, 2, "bitflip")
        forged.send(signed_notice(pfs_root, 2))
        events.wait_for_refusals(1)
        for _ in range(3):  # heartbeats repeating the refused version
            forged.send(signed_notice(pfs_root, 2))
        forged.send(signed_notice(pfs_root, 3))
        assert subscriber.wait_for_version(3, WAIT_S)
        assert len(events.refusals) == 1


def test_a_transient_storage_failure_is_retried_on_the_next_notice(stored_versions, pfs_root, forged,
                                                                   events) -> None:
    path = os.path.join(pfs_root, "tiny", "v2", "model.safetensors")
    with serving_v1(forged, pfs_root, events) as subscriber:
        os.rename(path, path + ".away")  # e.g. not yet visible on a network file system
        forged.send(signed_notice(pfs_root, 2))
        assert "the file is missing" in events.wait_for_refusals(1)[0].reason
        os.rename(path + ".away", path)
        forged.send(signed_notice(pfs_root, 2))  # the heartbeat repeats it
        assert subscriber.wait_for_version(2, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(stored_versions[2], served)


def test_a_safetensors_header_that_is_not_an_object_is_refused(stored_versions, pfs_root, forged, events,
                                                               caplog) -> None:
    path = os.path.join(pfs_root, "tiny", "v2", "model.safetensors")
    with open(path, "r+b") as handle:
        handle.write(struct.pack("<Q", 2) + b"[]")
    with serving_v1(forged, pfs_root, events) as subscriber:
        forged.send(signed_notice(pfs_root, 2))
        assert_refused_and_still_serving_v1(subscriber, events, stored_versions, "is not a JSON object", caplog,
                                            forged, pfs_root)


class Wider(TinyNet):
    def __init__(self) -> None:
        super().__init__(width=96)


class Renamed(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Linear(2, 2)


@pytest.mark.parametrize(("make_model", "match"), [
    (Wider, "shape"),
    (lambda: TinyNet().double(), "dtype F32 offered, the serving model has F64"),
    (Renamed, "tensor names differ"),
])
def test_mismatched_architectures_are_refused(stored_versions, pfs_root, forged, events, caplog,
                                              make_model, match) -> None:
    consumer = make_model()
    original = {name: tensor.clone() for name, tensor in consumer.state_dict().items()}
    with ModelSubscriber(consumer, "tiny", forged.endpoint, pfs_root, KEY, load_latest=False,
                         on_refusal=events.on_refusal) as subscriber:
        forged.wait_for_subscriber()
        forged.send(signed_notice(pfs_root, 2))
        refusal = events.wait_for_refusals(1)[0]
        assert match in refusal.reason and refusal.version == 2
        assert any(match in record.getMessage() for record in caplog.records)
        assert subscriber.version is None
        with subscriber.serving() as served:
            assert_same_weights(original, served)


def test_forged_manifest_on_storage_is_refused_at_start(stored_versions, pfs_root, events) -> None:
    manifest = os.path.join(pfs_root, "tiny", "v3", "manifest.json")
    with open(manifest, "rb") as handle:
        payload = handle.read()
    with open(manifest, "wb") as handle:
        handle.write(tamper(payload, step=777))
    with ModelSubscriber(TinyNet(), "tiny", "tcp://127.0.0.1:1", pfs_root, KEY,
                         on_refusal=events.on_refusal) as subscriber:
        assert "wrong MAC" in events.wait_for_refusals(1)[0].reason
        assert subscriber.version is None


def test_notice_for_another_model_sharing_the_topic_prefix_is_ignored(stored_versions, pfs_root, forged,
                                                                     events) -> None:
    with serving_v1(forged, pfs_root, events) as subscriber:
        forged.send(signed_notice(pfs_root, 3), topic=b"tiny-large")
        forged.send(signed_notice(pfs_root, 2))
        assert subscriber.wait_for_version(2, WAIT_S)
        assert subscriber.version == 2 and not events.refusals


def test_lag_counts_versions_announced_but_not_serving(stored_versions, pfs_root, forged, events) -> None:
    with serving_v1(forged, pfs_root, events) as subscriber:
        assert subscriber.lag == 0
        corrupt(pfs_root, 3, "bitflip")
        forged.send(signed_notice(pfs_root, 3))
        events.wait_for_refusals(1)
        assert subscriber.lag == 2  # v3 was announced; v1 still serves


def test_a_signed_notice_for_another_model_is_refused(stored_versions, pfs_root, forged, events) -> None:
    """Two models share a key (and an architecture): a notice naming the other one, sent on this
    model's topic, must not be applied (issue 11, defect 11)."""
    with ModelPublisher("other", LOOPBACK_ANY_PORT, pfs_root, KEY) as other:
        for seed in (7, 8):
            version = other.publish(perturbed(TinyNet(), seed))
    tier = FileSystemTier(pfs_root)
    notice = tier.read_manifest("other", version, KEY)
    foreign = notice.with_locations((Location("pfs", "host", tier.address("other", version)),)).encode(KEY)
    with serving_v1(forged, pfs_root, events) as subscriber:
        forged.send(foreign)
        refusal = events.wait_for_refusals(1)[0]
        assert "'other'" in refusal.reason and "'tiny'" in refusal.reason
        assert subscriber.version == 1
