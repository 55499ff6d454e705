"""The producer's fetch endpoint: late joiners, keys, malformed requests answered without leaks."""

from __future__ import annotations

import pytest
import torch
import zmq

from viper_lightning import ProtocolError, ModelPublisher, Notice, TransferError, take_snapshot
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
