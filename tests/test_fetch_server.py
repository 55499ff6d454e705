"""The producer's fetch endpoint: late joiners, keys, malformed requests answered without leaks."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
import zmq

from viper_lightning import ProtocolError, ModelPublisher, Notice, TransferError, take_snapshot
from viper_lightning.producer._store import SLACK_SLOTS
from viper_lightning.transport._fetch import FetchClient

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet

KEY = b"a key for the tier tests, 32 b.."


def test_latest_op_answers_a_late_joiner(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        version = publisher.publish(TinyNet())
        publisher.flush(WAIT_S)
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, KEY, WAIT_S)
        notice = Notice.decode(client.latest_notice(), KEY)
        assert notice.version == version
        assert [loc.tier for loc in notice.locations] == ["dram", "dram"]


def test_an_answer_of_another_producer_run_is_refused(model_name) -> None:
    """The same model, version number and key from another run (replayed on the path, or a stale
    producer still bound there) must not pass for the run the notice came from."""
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        version = publisher.publish(TinyNet())
        notice = Notice.decode(FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, KEY,
                                           WAIT_S).latest_notice(), KEY)
        nbytes, buffer = notice.nbytes, torch.empty(notice.nbytes, dtype=torch.uint8)
        ours = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, KEY, WAIT_S,
                           producer=notice.producer)
        assert ours.fetch_into(version, buffer, nbytes)[0].startswith("blake3_keyed_blocks:")
        for held in (None, bytes(32)):  # the whole version, and the block map a delta starts with
            other = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, KEY, WAIT_S,
                                producer="elsewhere:1:00000000")
            with pytest.raises(ProtocolError, match="another run's answer"):
                other.fetch_changed_into(version, buffer, nbytes, held)


def test_fetch_requests_without_the_key_are_refused(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        version = publisher.publish(TinyNet())
        publisher.flush(WAIT_S)
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="carries no MAC"):
            client.fetch_into(version, torch.empty(1 << 20, dtype=torch.uint8), 1)


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
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True) as unkeyed:  # an impostor without the key
        version = unkeyed.publish(TinyNet())
        unkeyed.flush(WAIT_S)
        client = FetchClient(zmq_context, unkeyed.fetch_endpoint, model_name, None, WAIT_S)
        keyed = FetchClient(zmq_context, unkeyed.fetch_endpoint, model_name, KEY, WAIT_S)
        buffer = torch.empty(1 << 20, dtype=torch.uint8)
        nbytes = take_snapshot(TinyNet().state_dict()).layout.nbytes
        client.fetch_into(version, buffer, nbytes)  # without a key, the digest is all there is
        with pytest.raises(ProtocolError, match="fetch answer .* carries no MAC"):
            keyed.fetch_into(version, buffer, nbytes)


def fetched_exactly(publisher: ModelPublisher, version: int, model: torch.nn.Module) -> bool:
    """An honest consumer's fetch of `version`, compared byte for byte with `model`'s snapshot."""
    expected = take_snapshot(model.state_dict()).data
    client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, publisher.model_name, None, WAIT_S)
    received = torch.empty(expected.numel(), dtype=torch.uint8)
    client.fetch_into(version, received, expected.numel())
    return torch.equal(received, expected)


def test_garbage_from_peers_that_vanish_never_stops_the_fetch_server(model_name, zmq_context) -> None:
    """Each answer goes to a peer that has already gone (EHOSTUNREACH under ROUTER_MANDATORY)."""
    model = TinyNet()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True) as publisher:
        version = publisher.publish(model)
        for garbage in [b"\xff" * 64, b"{", b'{"proto": 1}', b"[]"] * 25:
            with zmq_context.socket(zmq.DEALER) as peer:
                peer.setsockopt(zmq.LINGER, 100)  # the garbage goes out, then the peer is gone
                peer.connect(publisher.fetch_endpoint)
                peer.send(garbage)
        assert fetched_exactly(publisher, version, model)
        assert publisher.publish(TinyNet()) == version + 1  # the next publish does not raise
        assert publisher.health["fetch server"] == "ok"


def test_a_peer_that_never_reads_costs_only_itself(model_name, zmq_context) -> None:
    """More chunk reads than zmq queues for one peer (its send high-water mark), none read."""
    model = torch.nn.Linear(2048, 2048)  # 16 MB: reads of 8 MB chunks
    publisher = ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True)
    hog = zmq_context.socket(zmq.DEALER)
    try:
        version = publisher.publish(model)
        hog.setsockopt(zmq.LINGER, 0)
        hog.setsockopt(zmq.RCVHWM, 1)
        hog.setsockopt(zmq.RCVBUF, 4096)
        hog.setsockopt(zmq.SNDHWM, 0)  # every request goes out
        hog.connect(publisher.fetch_endpoint)
        read = json.dumps({"proto": 1, "model": model_name, "op": "read", "version": version, "offset": 0,
                           "length": 8 << 20}).encode()
        for _ in range(3000):  # and never reads an answer
            hog.send(read)
        # honest fetches keep succeeding while the server works through the hog's backlog
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert fetched_exactly(publisher, version, model)
        assert publisher.publish(torch.nn.Linear(2048, 2048)) == version + 1
    finally:
        hog.close()
        closed = threading.Thread(target=publisher.close, daemon=True)  # bounded even if it hangs
        closed.start()
        closed.join(WAIT_S)
    assert not closed.is_alive(), "close() hung on a peer that never read"


def stalled_reader(zmq_context, publisher: ModelPublisher, version: int) -> zmq.Socket:
    """A consumer that asks for a version's chunks and then stops reading (as if SIGSTOPped)."""
    reader = zmq_context.socket(zmq.DEALER)
    reader.setsockopt(zmq.LINGER, 0)
    reader.setsockopt(zmq.RCVHWM, 1)
    reader.setsockopt(zmq.RCVBUF, 4096)
    reader.connect(publisher.fetch_endpoint)
    for offset in [0, 8 << 20] * 4:  # as many chunks as a peer may have unsent
        reader.send(json.dumps({"proto": 1, "model": publisher.model_name, "op": "read", "version": version,
                                "offset": offset, "length": 8 << 20}).encode())
    return reader


def test_consumers_stopped_mid_transfer_never_block_a_publish(model_name, zmq_context) -> None:
    """Issue 11, defect 5: consumers stopped mid-transfer, one on each of as many versions as the
    producer keeps slots for, kept those versions borrowed, and the next publish waited for a free
    slot (for ever, before reads had a deadline; now the slot pool grows instead)."""
    publisher = ModelPublisher(model_name, LOOPBACK_ANY_PORT, dram_versions=1, allow_keyless=True)
    readers = []
    try:
        for _ in range(1 + SLACK_SLOTS):  # dram_versions=1: every slot of the pool
            model = torch.nn.Linear(2048, 2048)
            version = publisher.publish(model)
            readers.append(stalled_reader(zmq_context, publisher, version))
            assert fetched_exactly(publisher, version, model)  # by now the server has taken the stalled reads
        published = threading.Thread(target=publisher.publish, args=(torch.nn.Linear(2048, 2048),), daemon=True)
        published.start()
        published.join(WAIT_S / 2)  # well inside the fetch lease that would free the borrowed slots
        assert not published.is_alive(), "publish() waited for consumers that stopped reading"
    finally:
        for reader in readers:
            reader.close()
        publisher.close()
