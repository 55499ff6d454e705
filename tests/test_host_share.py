"""Consumers on one host sharing a version that comes from off the host (host-shm): one fetches it
into shared memory, the others map it. Real sockets on loopback, real /dev/shm segments; the
route to the producer is forced to "dram-zmq", as from another host."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time

import pytest
import torch

from viper_lightning import ModelPublisher, ModelSubscriber
from viper_lightning.consumer._host_share import HostShare
from viper_lightning._layout import Layout
from viper_lightning.storage._shm import HEADER, MAGIC, READY, SHM_DIR, WRITING
from viper_lightning.transport._protocol import Notice

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, Events, TinyNet, assert_same_weights, perturbed

OFF_HOST = ["host-shm", "dram-zmq"]  # as a remote host sees the producer: no same-host segment

needs_shm = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"needs {SHM_DIR} for shared memory")


def _host_files(model_name: str) -> list[str]:
    """The host copies of the model, and the listings of its consumers on this host."""
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(f"viper.{model_name}~host."))


def _host_copies(model_name: str) -> list[str]:
    return [name for name in _host_files(model_name) if "~host.member." not in name]


def _publisher(model_name: str, pfs_root: str) -> ModelPublisher:
    return ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, fetch_endpoint=LOOPBACK_ANY_PORT,
                          allow_keyless=True)


def _subscriber(publisher: ModelPublisher, model_name: str, events: Events, **options) -> ModelSubscriber:
    return ModelSubscriber(TinyNet(), model_name, publisher.endpoint, routes=options.pop("routes", OFF_HOST),
                           load_latest=False, allow_keyless=True, on_update=events.on_update,
                           on_refusal=events.on_refusal, **options)


def _eventually(condition, timeout: float = WAIT_S) -> bool:
    """Poll `condition` until it holds or `timeout` passes (what it waits for has no event)."""
    deadline, tick = time.monotonic() + timeout, threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True


def _copy_path(publisher: ModelPublisher, producer: torch.nn.Module, version: int) -> str:
    """Where the consumers of `publisher` will look for the host copy of `version`."""
    layout = Layout.for_state_dict(producer.state_dict())
    notice = Notice(publisher.model_name, version, layout.nbytes, None, layout, publisher.producer_id)
    return os.path.join(SHM_DIR, HostShare(publisher.model_name, "any", 1.0, threading.Event()).name(notice))


def _leave_copy(path: str, state: int, version: int, nbytes: int) -> int:
    """A host copy as another consumer left it (header in `state`); its open descriptor."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 64 + nbytes)
    os.pwrite(fd, HEADER.pack(MAGIC, version, state, nbytes, 1, os.getpid()), 0)
    return fd


@needs_shm
@pytest.mark.parametrize("zero_copy", [True, False], ids=["mapped", "copied"])
def test_three_consumers_fetch_each_version_once_and_all_serve_it_bit_exact(model_name, pfs_root,
                                                                             zero_copy: bool) -> None:
    """zero_copy=False (as for a model on a GPU): the others copy out of the host copy; a copy
    they read is never rewritten under them unnoticed (the segment's seqlock)."""
    producer = TinyNet()
    inodes: set[int] = set()
    with _publisher(model_name, pfs_root) as publisher, contextlib.ExitStack() as stack:
        events = [Events() for _ in range(3)]
        subscribers = [stack.enter_context(_subscriber(publisher, model_name, e, zero_copy=zero_copy))
                       for e in events]
        assert publisher.wait_for_subscribers(3, WAIT_S)
        for round_ in range(1, 7):
            version = publisher.publish(perturbed(producer, round_))
            for subscriber in subscribers:
                assert subscriber.wait_for_version(version, WAIT_S)
                with subscriber.serving() as served:
                    assert_same_weights(producer, served)
            routes = sorted(e.wait_for_updates(round_)[round_ - 1].route for e in events)
            assert routes == ["dram-zmq", "host-shm", "host-shm"], f"version {version}: {routes}"
            inodes |= {os.stat(os.path.join(SHM_DIR, name)).st_ino for name in _host_copies(model_name)}
            # older copies go once nobody serves from them: this version's, the last one's (the
            # consumers' standby copies serve from it until the next update) and one spare
            assert _eventually(lambda: len(_host_copies(model_name)) <= 3), _host_copies(model_name)
            publisher.flush(WAIT_S)  # the next publish must find a free slot, not be skipped
    assert len(inodes) <= 4, f"six versions took {len(inodes)} segments: the spare copy was not rewritten"
    assert _host_files(model_name) == [], "closed consumers left their host copies or listings behind"


@needs_shm
def test_a_copy_whose_fetch_died_is_fetched_again_by_the_next_consumer(model_name, pfs_root, events) -> None:
    """A consumer died mid-fetch: its copy is WRITING and nobody holds its lock. The next consumer
    must not wait for it, nor serve its bytes: it fetches the version itself."""
    producer = perturbed(TinyNet(), 1)
    with _publisher(model_name, pfs_root) as publisher, \
            _subscriber(publisher, model_name, events, fetch_timeout=5.0) as subscriber:
        assert publisher.wait_for_subscribers(1, WAIT_S)
        path = _copy_path(publisher, producer, 1)
        os.close(_leave_copy(path, WRITING, 1, Layout.for_state_dict(producer.state_dict()).nbytes))
        assert publisher.publish(producer) == 1
        assert subscriber.wait_for_version(1, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
        record = events.wait_for_updates(1)[0]
        assert record.route == "dram-zmq"
        assert record.latency_s < 5.0, f"it waited for a dead fetch: {record}"  # its bound is 5 s and more


@needs_shm
def test_a_consumer_stuck_fetching_costs_the_others_only_their_wait(model_name, pfs_root, events) -> None:
    """A live consumer holds its copy locked and never finishes: the others wait their bound
    (fetch_timeout plus the bytes at 10 MB/s: about 1 s here), then fetch on their own."""
    producer = perturbed(TinyNet(), 2)
    nbytes = Layout.for_state_dict(producer.state_dict()).nbytes
    with _publisher(model_name, pfs_root) as publisher, \
            _subscriber(publisher, model_name, events, fetch_timeout=1.0) as subscriber:
        assert publisher.wait_for_subscribers(1, WAIT_S)
        fd = _leave_copy(_copy_path(publisher, producer, 1), WRITING, 1, nbytes)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert publisher.publish(producer) == 1
            assert subscriber.wait_for_version(1, WAIT_S)
            record = events.wait_for_updates(1)[0]
        finally:
            os.close(fd)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
        assert record.route == "dram-zmq"
        assert 1.0 <= record.latency_s < WAIT_S / 2, record


@needs_shm
def test_another_users_file_under_the_copys_name_is_never_mapped(model_name, pfs_root, events) -> None:
    """A local user squats the name with bytes of their own: the consumer fetches for itself and
    serves the producer's weights, and the squatter's file is left alone."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another user")
    producer = perturbed(TinyNet(), 3)
    nbytes = Layout.for_state_dict(producer.state_dict()).nbytes
    with _publisher(model_name, pfs_root) as publisher, _subscriber(publisher, model_name, events) as subscriber:
        assert publisher.wait_for_subscribers(1, WAIT_S)
        path = _copy_path(publisher, producer, 1)
        fd = _leave_copy(path, READY, 1, nbytes)  # "ready", with zeros for weights
        os.fchown(fd, 65534, 65534)
        os.close(fd)
        try:
            assert publisher.publish(producer) == 1
            assert subscriber.wait_for_version(1, WAIT_S)
            with subscriber.serving() as served:
                assert_same_weights(producer, served)
            assert events.wait_for_updates(1)[0].route == "dram-zmq"
            assert os.path.exists(path)
        finally:
            os.unlink(path)


@needs_shm
def test_without_host_shm_in_routes_each_consumer_fetches_its_own(model_name, pfs_root) -> None:
    producer = perturbed(TinyNet(), 4)
    with _publisher(model_name, pfs_root) as publisher, contextlib.ExitStack() as stack:
        events = [Events() for _ in range(2)]
        subscribers = [stack.enter_context(_subscriber(publisher, model_name, e, routes=["dram-zmq"]))
                       for e in events]
        assert publisher.wait_for_subscribers(2, WAIT_S)
        version = publisher.publish(producer)
        for subscriber in subscribers:
            assert subscriber.wait_for_version(version, WAIT_S)
        assert [e.wait_for_updates(1)[0].route for e in events] == ["dram-zmq", "dram-zmq"]
        assert _host_copies(model_name) == []


@needs_shm
def test_a_consumer_alone_on_its_host_makes_no_copy_to_share(model_name, pfs_root, events) -> None:
    producer = perturbed(TinyNet(), 5)
    with _publisher(model_name, pfs_root) as publisher, _subscriber(publisher, model_name, events) as subscriber:
        assert publisher.wait_for_subscribers(1, WAIT_S)
        version = publisher.publish(producer)
        assert subscriber.wait_for_version(version, WAIT_S)
        assert events.wait_for_updates(1)[0].route == "dram-zmq"
        assert _host_copies(model_name) == []


@needs_shm
def test_fifos_planted_under_the_shared_names_hang_nobody(model_name, pfs_root) -> None:
    """A FIFO under a listing's name and under the next copy's name (opening one for reading
    would block until someone writes): the consumers pass them by and serve the version."""
    producer = perturbed(TinyNet(), 6)
    with _publisher(model_name, pfs_root) as publisher, contextlib.ExitStack() as stack:
        planted = [os.path.join(SHM_DIR, f"viper.{model_name}~host.member.1.1"), _copy_path(publisher, producer, 1)]
        for path in planted:
            os.mkfifo(path, 0o600)
            stack.callback(os.unlink, path)
        events = [Events() for _ in range(2)]
        subscribers = [stack.enter_context(_subscriber(publisher, model_name, e)) for e in events]
        assert publisher.wait_for_subscribers(2, WAIT_S)
        assert publisher.publish(producer) == 1
        for subscriber in subscribers:
            assert subscriber.wait_for_version(1, WAIT_S)
            with subscriber.serving() as served:
                assert_same_weights(producer, served)
        assert [e.wait_for_updates(1)[0].route for e in events] == ["dram-zmq", "dram-zmq"]
