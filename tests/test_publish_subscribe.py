"""Publisher and subscriber over real ZeroMQ sockets on loopback and real files."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from viper_lightning import ModelPublisher, ModelSubscriber, Notice

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, assert_same_weights, perturbed

KEY = "a shared key of at least sixteen bytes"


def test_subscriber_hot_swaps_to_each_published_version(pfs_root, events) -> None:
    producer, consumer = TinyNet(), TinyNet()
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, KEY) as publisher, \
         ModelSubscriber(consumer, "tiny", publisher.endpoint, pfs_root, KEY,
                         on_update=events.on_update) as subscriber:
        assert subscriber.version is None
        version = publisher.publish(perturbed(producer, 1), step=10, epoch=0)
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
        record = events.wait_for_updates(1)[0]
        assert (record.version, record.step, record.route) == (version, 10, "dram-shm")
        assert record.latency_s >= record.discovery_s >= 0
        assert subscriber.stats.applied == 1


def test_burst_of_publishes_is_coalesced_to_the_newest(pfs_root, events) -> None:
    producer = TinyNet()
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher, \
         ModelSubscriber(TinyNet(), "tiny", publisher.endpoint, pfs_root,
                         on_update=events.on_update) as subscriber:
        assert publisher.wait_for_subscribers(1, WAIT_S)
        # Back to back, a publish finds every slot still read (flushes, the consumer) and is
        # skipped rather than stall: None. The last one waits for a slot, as a run's last does.
        versions = [publisher.publish(perturbed(producer, seed)) for seed in range(19)]
        versions.append(publisher.publish(perturbed(producer, 19), wait_for_slot=True))
        published = [version for version in versions if version is not None]
        assert published == sorted(set(published)) and versions[-1] is not None
        assert publisher.publishes_skipped == versions.count(None)
        assert subscriber.wait_for_version(versions[-1], WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
    applied = [record.version for record in events.updates]
    assert applied == sorted(applied) and applied[-1] == versions[-1]
    assert subscriber.stats.refused == 0


def test_late_joiner_converges_without_a_new_publish(pfs_root) -> None:
    producer = perturbed(TinyNet(), 3)
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher:
        version = publisher.publish(producer)
        publisher.flush()
        # No pfs_root on the consumer: it learns the version only from the repeated notice.
        with ModelSubscriber(TinyNet(), "tiny", publisher.endpoint) as subscriber:
            assert subscriber.wait_for_version(version, WAIT_S)
            with subscriber.serving() as served:
                assert_same_weights(producer, served)


def test_subscriber_started_after_training_loads_latest_from_storage(pfs_root) -> None:
    producer = perturbed(TinyNet(), 4)
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, KEY) as publisher:
        publisher.publish(producer)
    # The producer is gone; the file-system tier still has the newest version.
    with ModelSubscriber(TinyNet(), "tiny", "tcp://127.0.0.1:1", pfs_root, KEY) as subscriber:
        assert subscriber.wait_for_version(1, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
        assert subscriber.stats.last.trigger == "LATEST on start"


def test_request_in_flight_finishes_on_the_old_weights(pfs_root) -> None:
    producer = TinyNet()
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher, \
         ModelSubscriber(TinyNet(), "tiny", publisher.endpoint, pfs_root) as subscriber:
        first = publisher.publish(perturbed(producer, 1))
        assert subscriber.wait_for_version(first, WAIT_S)
        expected_old = {k: v.clone() for k, v in producer.state_dict().items()}
        with subscriber.lease() as in_flight:
            second = publisher.publish(perturbed(producer, 2))
            assert subscriber.wait_for_version(second, WAIT_S)  # swapped while the request runs
            assert in_flight.version == first
            assert_same_weights(expected_old, in_flight.model)
            with subscriber.lease() as next_request:
                assert next_request.version == second
                assert_same_weights(producer, next_request.model)


def test_update_waits_for_requests_on_the_standby_copy(pfs_root) -> None:
    producer = TinyNet()
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher, \
         ModelSubscriber(TinyNet(), "tiny", publisher.endpoint, pfs_root) as subscriber:
        first = publisher.publish(perturbed(producer, 1))
        assert subscriber.wait_for_version(first, WAIT_S)
        release = threading.Event()
        held = threading.Event()

        def long_request() -> None:
            with subscriber.lease() as lease:
                held.set()
                release.wait(WAIT_S)
                assert lease.version == first

        worker = threading.Thread(target=long_request)
        worker.start()
        assert held.wait(WAIT_S)
        second = publisher.publish(perturbed(producer, 2))
        assert subscriber.wait_for_version(second, WAIT_S)  # the standby copy was idle
        third = publisher.publish(perturbed(producer, 3))
        # v3 must load into the copy the long request still reads: it waits for it.
        assert not subscriber.wait_for_version(third, 0.5)
        release.set()
        worker.join()
        assert subscriber.wait_for_version(third, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)


def test_publish_accepts_a_state_dict_and_rejects_other_things(pfs_root) -> None:
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root) as publisher:
        assert publisher.publish({"w": torch.ones(3)}) == 1
        with pytest.raises(ValueError, match="nn.Module or a state_dict"):
            publisher.publish([torch.ones(3)])


def test_heartbeat_repeats_the_latest_notice(pfs_root, zmq_context) -> None:
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, pfs_root, heartbeat_interval=0.05) as publisher:
        version = publisher.publish(TinyNet())
        publisher.flush(WAIT_S)
        with zmq_context.socket(zmq.SUB) as listener:
            listener.setsockopt(zmq.LINGER, 0)
            listener.setsockopt(zmq.SUBSCRIBE, b"tiny")
            listener.connect(publisher.endpoint)
            seen = []
            while len(seen) < 3 and listener.poll(int(WAIT_S * 1000)):
                seen.append(Notice.decode(listener.recv_multipart()[1]).version)
    # One resend for the new subscription, then heartbeats: no publish happened meanwhile.
    assert seen == [version] * 3


def test_close_releases_a_thread_waiting_for_a_version(pfs_root) -> None:
    subscriber = ModelSubscriber(TinyNet(), "tiny", "tcp://127.0.0.1:1").start()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(subscriber.wait_for_version(5)))
    waiter.start()
    subscriber.close()
    waiter.join(WAIT_S)
    assert result == [False]


class ManyTensors(torch.nn.Module):
    """A model whose layout alone makes a notice of about 19 MB (180k small tensors)."""

    def __init__(self, count: int = 180_000) -> None:
        super().__init__()
        for index in range(count):
            self.register_buffer(f"block_{index}_of_a_model_with_a_very_long_tensor_name", torch.zeros(1))


def test_a_model_whose_notice_is_over_16_mb_is_still_followed(model_name, events) -> None:
    """Issue 11, defect 6: a notice over the subscribers' 16 MB frame limit once made libzmq drop
    them for good (silently deaf); big notices are compressed on the wire."""
    producer = ManyTensors()
    with torch.no_grad():
        next(iter(producer.buffers())).fill_(7.0)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher, \
         ModelSubscriber(ManyTensors(), model_name, publisher.endpoint, load_latest=False,
                         on_update=events.on_update) as subscriber:
        assert publisher.wait_for_subscribers(1, WAIT_S)
        version = publisher.publish(producer)
        assert subscriber.wait_for_version(version, WAIT_S * 3)
        with subscriber.serving() as served:
            assert next(iter(served.buffers())).item() == 7.0


def test_a_publisher_switching_together_closes_without_waiting_out_its_deadline(model_name) -> None:
    """Nobody is ready for the switch: close() must not wait `together_deadline` for them."""
    publisher = ModelPublisher(model_name, LOOPBACK_ANY_PORT, together=True, together_deadline=WAIT_S * 3,
                               allow_keyless=True)
    publisher.publish(TinyNet())
    started = time.monotonic()
    publisher.close()
    assert time.monotonic() - started < WAIT_S
