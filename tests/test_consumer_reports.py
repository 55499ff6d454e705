"""Consumers report each applied update back to the producer (issue 12, item 1): the schedule
then plans with the load time its consumers really see, not a configured guess. Reports are
signed like every fetch request, bounded, and a bad one changes nothing."""

from __future__ import annotations

import time

import lightning as L
import pytest
import zmq

from viper_lightning import ConsumerReport, ModelPublisher, ModelSubscriber, ViperCallback
from viper_lightning.schedules import EveryNSteps
from viper_lightning.transport._protocol import signed_request
from viper_lightning.transport._reports import send_report

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, perturbed, publish_and_check
from .lightning_models import Regressor

KEY = b"a key for the report tests, 32 b"


def reports_within(publisher: ModelPublisher, count: int, timeout: float = WAIT_S) -> list[ConsumerReport]:
    """Reports taken from `publisher` until `count` have come (a poll with a deadline)."""
    reports, deadline = [], time.monotonic() + timeout
    while len(reports) < count and time.monotonic() < deadline:
        reports += publisher.take_consumer_reports()
        time.sleep(0.01)
    return reports


@pytest.mark.parametrize("route", ["dram-shm", "dram-zmq"])
def test_each_applied_update_is_reported_with_its_latency_and_route(route, model_name, events) -> None:
    """All but a consumer's first update: that one measures how late it joined, not a load."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, hmac_key=KEY, routes=[route], load_latest=False,
                         on_update=events.on_update) as subscriber:
        publish_and_check(publisher, subscriber, perturbed(TinyNet(), 1), events)
        events.updates.clear()
        record = publish_and_check(publisher, subscriber, perturbed(TinyNet(), 2), events)
        reports = reports_within(publisher, 1)
    assert reports == [ConsumerReport(record.version, record.latency_s, route)]


def test_reports_that_are_unsigned_or_malformed_are_dropped(model_name, zmq_context) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        send_report(zmq_context, publisher.fetch_endpoint, model_name, None, ConsumerReport(1, 0.5, "dram-shm"))
        send_report(zmq_context, publisher.fetch_endpoint, model_name, b"w" * 32, ConsumerReport(1, 0.5, "pfs"))
        with zmq_context.socket(zmq.DEALER) as peer:
            peer.setsockopt(zmq.LINGER, 100)
            peer.connect(publisher.fetch_endpoint)
            for latency in (-1, 1e12, "fast", True, None):
                peer.send(signed({"op": "report", "version": 1, "latency_s": latency, "route": "pfs"}, model_name))
            peer.send(signed({"op": "report", "version": 1, "latency_s": 0.5, "route": "../x"}, model_name))
            # a good one last, on the same connection: once it arrives, the others have been handled
            peer.send(signed({"op": "report", "version": 7, "latency_s": 0.25, "route": "pfs"}, model_name))
            assert reports_within(publisher, 1) == [ConsumerReport(7, 0.25, "pfs")]
        assert publisher.health["fetch server"] == "ok"


def signed(request: dict, model_name: str) -> bytes:
    return signed_request(model_name, KEY, request)


class LoadTimes(EveryNSteps):
    def __init__(self) -> None:
        super().__init__(10)
        self.load_times: list[float] = []

    def observe_load_time(self, seconds: float) -> None:
        self.load_times.append(seconds)


def test_the_callback_passes_consumer_load_times_to_the_schedule(tmp_path, model_name) -> None:
    schedule = LoadTimes()
    callback = ViperCallback(model_name, LOOPBACK_ANY_PORT, schedule=schedule, hmac_key=KEY.decode())
    latencies: list[float] = []

    class Consumer(L.Callback):
        """A subscriber in this process that the run waits for after each publish, so its report
        is back before the run ends."""

        def on_train_start(self, trainer, pl_module):
            self.subscriber = ModelSubscriber(Regressor(), model_name, callback.publisher.endpoint, hmac_key=KEY,
                                              load_latest=False,
                                              on_update=lambda record: latencies.append(record.latency_s))
            self.subscriber.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if callback.last_step == trainer.global_step:
                assert self.subscriber.wait_for_version(callback.last_version, WAIT_S)

        def on_train_end(self, trainer, pl_module):
            self.subscriber.close()

    trainer = L.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[callback, Consumer()])
    trainer.fit(Regressor())
    # reports of versions 2-3 reach the schedule within the run (v1 is the consumer's first
    # update, v4 comes after the last step); a report has ten steps to arrive
    assert len(schedule.load_times) >= 1 and schedule.load_times == latencies[1:1 + len(schedule.load_times)]


def test_a_replayed_report_is_counted_once(model_name, zmq_context) -> None:
    """A signed report captured and sent again must not outvote the consumers' real ones."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        with zmq_context.socket(zmq.DEALER) as peer:
            peer.setsockopt(zmq.LINGER, 100)
            peer.connect(publisher.fetch_endpoint)
            replayed = signed({"op": "report", "version": 3, "latency_s": 120.0, "route": "pfs"}, model_name)
            for _ in range(50):
                peer.send(replayed)
            peer.send(signed({"op": "report", "version": 3, "latency_s": 0.01, "route": "dram-shm"}, model_name))
            assert reports_within(publisher, 2) == [ConsumerReport(3, 120.0, "pfs"),
                                                    ConsumerReport(3, 0.01, "dram-shm")]



def test_reports_reuse_one_connection_per_producer(zmq_context) -> None:
    """A connection per report would cost a TCP handshake on both ends at every update, while
    every worker on the host updates: the sender keeps one per producer endpoint."""
    from viper_lightning.transport._reports import ReportSender

    with zmq_context.socket(zmq.ROUTER) as producer:
        producer.bind(LOOPBACK_ANY_PORT)
        endpoint = producer.getsockopt_string(zmq.LAST_ENDPOINT)
        sender = ReportSender(zmq_context)
        try:
            for version in (1, 2, 3):
                sender.send(endpoint, "tiny", None, ConsumerReport(version, 0.01, "dram-shm"))
            identities = set()
            for _ in range(3):
                assert producer.poll(int(WAIT_S * 1000))
                identity, _ = producer.recv_multipart()
                identities.add(identity)
        finally:
            sender.close()
    assert len(identities) == 1
