"""Secure by default (issue 11, defect 4): with no key configured, the producer creates one for
the model on this host (0600) and consumers of the same user read it; others get nothing served
and have nothing believed. Keyless operation is an explicit opt-out."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest
import torch

from viper_lightning import ConfigurationError, ModelPublisher, ModelSubscriber, TransferError, take_snapshot
from viper_lightning.storage._keys import key_file_for
from viper_lightning.storage._shm import HEADER, HEADER_BYTES, MAGIC, READY
from viper_lightning.transport._fetch import FetchClient

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, assert_same_weights, perturbed, publish_and_check
from .test_refusals import ForgedProducer

OTHER_UID = 65534  # nobody


@pytest.fixture
def key_file(model_name):
    path = key_file_for(model_name)
    yield path
    if os.path.lexists(path):
        os.remove(path)


def test_without_a_key_the_producer_makes_a_private_one_and_same_user_consumers_use_it(model_name, key_file,
                                                                                        events) -> None:
    producer = perturbed(TinyNet(), 1)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, load_latest=False,
                         on_update=events.on_update) as subscriber:
        info = os.stat(key_file)
        assert info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o600
        publish_and_check(publisher, subscriber, producer, events)


def test_without_the_key_nobody_streams_the_weights(model_name, key_file, zmq_context) -> None:
    """Any local user could stream the weights from the fetch endpoint although the segments are 0600."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher:
        version = publisher.publish(TinyNet())
        nbytes = take_snapshot(TinyNet().state_dict()).layout.nbytes
        stranger = FetchClient(zmq_context, publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="carries no MAC") as refused:
            stranger.fetch_into(version, torch.empty(nbytes, dtype=torch.uint8), nbytes)
        assert refused.value.code == "forged"


def test_a_consumer_without_a_key_believes_no_unsigned_notice(model_name, key_file, zmq_context, events) -> None:
    """Whoever binds the producer's port (or names any absolute path in a notice) is not believed."""
    with ModelPublisher("impostor-" + model_name[:20], LOOPBACK_ANY_PORT, allow_keyless=True) as impostor:
        impostor.publish(perturbed(TinyNet(), 2))
        raw = FetchClient(zmq_context, impostor.fetch_endpoint, impostor.model_name, None, WAIT_S).latest_notice()
    forged = ForgedProducer(zmq_context, model_name.encode())
    try:
        with ModelPublisher(model_name, LOOPBACK_ANY_PORT):  # the real producer made this host's key
            pass
        with ModelSubscriber(TinyNet(), model_name, forged.endpoint, load_latest=False,
                             on_refusal=events.on_refusal) as subscriber:
            forged.wait_for_subscriber()
            forged.send(raw.replace(impostor.model_name.encode(), model_name.encode()))
            refusal = events.wait_for_refusals(1)[0]
            assert "carries no MAC" in refusal.reason and subscriber.version is None
    finally:
        forged.close()


def test_a_key_file_planted_by_another_user_is_refused(model_name, key_file) -> None:
    if os.geteuid() != 0:
        pytest.skip("planting a file owned by another user needs root")
    with open(key_file, "wb") as planted:
        planted.write(b"0" * 64)
    os.chown(key_file, OTHER_UID, OTHER_UID)
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigurationError, match="not a private file of this user"):
        ModelPublisher(model_name, LOOPBACK_ANY_PORT)


def test_keyless_is_an_explicit_logged_opt_out(model_name, key_file, caplog, events) -> None:
    producer = perturbed(TinyNet(), 3)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, load_latest=False, allow_keyless=True,
                         on_update=events.on_update) as subscriber:
        assert not os.path.exists(key_file)
        publish_and_check(publisher, subscriber, producer, events)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
    warned = {record.name for record in caplog.records if "keyless (allow_keyless=True)" in record.getMessage()}
    assert warned == {"viper_lightning.publisher", "viper_lightning.subscriber"}


def _produce_as_another_user(model: str, results) -> None:
    """A forked child that drops to an unprivileged uid, then publishes and follows one version."""
    try:
        os.setgid(OTHER_UID)
        os.setuid(OTHER_UID)
        producer = perturbed(TinyNet(), 4)
        with ModelPublisher(model, LOOPBACK_ANY_PORT, allow_keyless=True) as publisher, \
             ModelSubscriber(TinyNet(), model, publisher.endpoint, load_latest=False, allow_keyless=True) as subscriber:
            version = publisher.publish(producer)
            reached = subscriber.wait_for_version(version, WAIT_S)
            with subscriber.serving() as served:
                exact = all(torch.equal(a, b) for a, b in zip(producer.state_dict().values(),
                                                              served.state_dict().values()))
            results.put({"version": version, "reached": reached, "exact": exact, "health": publisher.health})
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def test_another_users_files_in_shared_memory_cost_the_producer_nothing(model_name) -> None:
    """Issue 11, defect 8: files of another user under this model's segment names (the name the
    first version takes, and a 'stale segment' of a dead producer) once raised a raw
    PermissionError from the constructor or from publish()."""
    if os.geteuid() != 0:
        pytest.skip("a producer of another user than the planted files' needs root to set up")
    planted = [f"/dev/shm/viper.{model_name}.v1", f"/dev/shm/viper.{model_name}.free.999999.1"]
    with open(planted[0], "wb") as squat:
        squat.write(b"not a segment")
    with open(planted[1], "wb") as stale:
        stale.write(HEADER.pack(MAGIC, 1, READY, 0, 0, 999_999).ljust(HEADER_BYTES, b"\0"))
    context = multiprocessing.get_context("fork")  # the child needs no interpreter files (root's home is private)
    results = context.Queue()
    child = context.Process(target=_produce_as_another_user, args=(model_name, results))
    child.start()
    try:
        outcome = results.get(timeout=WAIT_S * 3)
    finally:
        child.join(WAIT_S)
        for path in planted:
            os.remove(path)
    assert outcome.get("error") is None, outcome["error"]
    assert outcome["version"] == 1 and outcome["reached"] and outcome["exact"]
    assert all(state == "ok" for state in outcome["health"].values())


def test_a_subscriber_follows_the_key_a_restarted_producer_made(model_name, key_file, events) -> None:
    """The host key lives in /dev/shm: lost at a reboot or by hand, a restarted producer makes a
    new one, and running subscribers must follow it rather than refuse every notice."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as first:
        endpoint = first.endpoint
        with ModelSubscriber(TinyNet(), model_name, endpoint, load_latest=False,
                             on_update=events.on_update) as subscriber:
            publish_and_check(first, subscriber, perturbed(TinyNet(), 5), events)
            first.close()
            os.remove(key_file)
            with ModelPublisher(model_name, endpoint, resume_after=first.version) as second:
                publish_and_check(second, subscriber, perturbed(TinyNet(), 6), events)


@pytest.mark.parametrize("make", [
    lambda name: ModelPublisher(name, LOOPBACK_ANY_PORT, allow_keyless="false"),
    lambda name: ModelSubscriber(TinyNet(), name, LOOPBACK_ANY_PORT.replace("*", "1"), allow_keyless="false"),
], ids=["publisher", "subscriber"])
def test_keyless_takes_a_real_boolean(model_name, make) -> None:
    with pytest.raises(ConfigurationError, match="allow_keyless='false'"):
        make(model_name)
