"""Exceptions carry data beside their message: the refusal `code` a server put in its answer and,
for a version a peer no longer holds, the `tiers` that still do. Checked on real sockets (ZeroMQ
and a TCPStore on 127.0.0.1), and the message helpers' limits on their own."""

from __future__ import annotations

import dataclasses
import json
import pickle
import threading
from contextlib import ExitStack
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import zmq

import viper_lightning
from viper_lightning import (ConfigurationError, IntegrityError, ModelPublisher, Notice, ProtocolError, StorageError,
                             TransferError, ViperError, take_snapshot)
from viper_lightning._digest import digest_buffer
from viper_lightning.transport._collective import CollectiveClient
from viper_lightning.transport._fetch import MAX_LEASES, FetchClient
from viper_lightning.transport._loans import MemoryLoan
from viper_lightning.transport._messages import MAX_DEPTH, count, load_object
from viper_lightning.transport._protocol import DEFAULT_ENDPOINT

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, perturbed
from .test_collective import CHUNK, VERSION, CountingLender, fetch, make_data, serve  # noqa: F401 - serve is a fixture
from .test_gpu_tier import KEY as GPU_KEY
from .test_gpu_tier import LendingProducer

KEY = b"a key for the error tests, 32 b."


# -- the exceptions themselves -------------------------------------------------------------
def test_exceptions_keep_their_message_and_carry_code_and_tiers() -> None:
    assert str(TransferError("peer gone")) == "peer gone" and TransferError("x").tiers == ()
    assert TransferError("x").code is None and IntegrityError("x").code is None
    assert ProtocolError("bad field").code == "malformed"  # every ProtocolError is a refusal
    assert ProtocolError("bad MAC", code="forged").code == "forged"
    gone = TransferError("v3 gone", code="gone", tiers=["pfs"])
    assert gone.tiers == ("pfs",) and gone.code == "gone" and isinstance(gone, ViperError)
    again = pickle.loads(pickle.dumps(gone))  # crosses process boundaries intact
    assert (str(again), again.code, again.tiers) == ("v3 gone", "gone", ("pfs",))
    assert isinstance(ConfigurationError("x", code="c"), ValueError)


def test_default_endpoint_is_the_protocols() -> None:
    assert viper_lightning.DEFAULT_ENDPOINT is DEFAULT_ENDPOINT == "tcp://127.0.0.1:5555"


def test_forged_notices_say_so_in_their_code() -> None:
    notice = Notice(model="m", version=1, nbytes=0, digest="d", layout=viper_lightning.Layout((), 0), producer="p")
    with pytest.raises(ProtocolError, match="carries no MAC") as caught:
        Notice.decode(notice.encode(), KEY)
    assert caught.value.code == "forged"
    with pytest.raises(ProtocolError, match="protocol 2") as caught:
        Notice.decode(json.dumps({**json.loads(notice.encode()), "proto": 2}).encode())
    assert caught.value.code == "malformed"


# -- the message helpers -------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def test_messages_nested_past_the_limit_are_refused_before_anything_walks_them() -> None:
    assert load_object(nested(MAX_DEPTH), "request", limit=None)
    with pytest.raises(ProtocolError, match=f"request is not valid JSON: it nests deeper than {MAX_DEPTH}"):
        load_object(nested(MAX_DEPTH + 1), "request", limit=None)
    with pytest.raises(ProtocolError, match="answer is not JSON: it nests deeper"):
        load_object(b"[" * 100_000, "answer", limit=None, invalid="is not JSON")


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"n": 1}' + b" " * 100, "is 108 bytes, over the 100-byte limit"),
    (b'{"n": NaN}', "NaN is not allowed"),
    (b'{"n": Infinity}', "Infinity is not allowed"),
    (b"[1]", "must be a JSON object, got list"),
    (b"\xff", "is not valid JSON"),
])
def test_message_limits(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        load_object(raw, "message", limit=100)


@pytest.mark.parametrize(("value", "message"), [
    (True, "'n' must be a non-negative integer, got True"),
    (-1, "'n' must be a non-negative integer, got -1"),
    (None, "'n' must be a non-negative integer, got None"),
    (0, "'n' must be at least 1, got 0"),
    (11, "'n' must be at most 10, got 11"),
])
def test_counts_are_checked_with_their_bounds(value: object, message: str) -> None:
    assert count({"n": 10}, "n", "message", minimum=1, maximum=10) == 10
    with pytest.raises(ProtocolError, match=f"message field {message}"):
        count({"n": value}, "n", "message", minimum=1, maximum=10)


# -- ZeroMQ fetch --------------------------------------------------------------------------
def test_an_evicted_version_names_the_tiers_that_hold_it(model_name, pfs_root) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, dram_versions=1, allow_keyless=True,
                        keep_every_version=True) as publisher:
        publisher.publish(perturbed(TinyNet(), 1))
        publisher.publish(perturbed(TinyNet(), 2))
        publisher.flush(WAIT_S)
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="still lives in: pfs") as caught:
            client.fetch_into(1, torch.empty(1 << 20, dtype=torch.uint8), 1)
    assert caught.value.code == "gone" and caught.value.tiers == ("pfs",)


def test_a_request_without_the_key_is_refused_as_forged(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY) as publisher:
        version = publisher.publish(TinyNet())
        publisher.flush(WAIT_S)
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="carries no MAC") as caught:
            client.fetch_into(version, torch.empty(1 << 20, dtype=torch.uint8), 1)
    assert caught.value.code == "forged" and caught.value.tiers == ()


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x80not json", "fetch request is not JSON"),
    (b"[]", "fetch request must be a JSON object"),
    (b'{"proto": 9}', "protocol 9 is not supported"),
    (b'{"proto": 1, "model": "other", "op": "open", "version": 1}', "not 'other'"),
    (b'{"proto": 1, "model": "MODEL", "op": "open", "version": -1}', "'version' must be a non-negative integer"),
    (b'{"proto": 1, "model": "MODEL", "op": "fly"}', "unknown fetch op 'fly'"),
])
def test_malformed_fetch_requests_are_answered_with_their_code(model_name, zmq_context, raw, reason) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True) as publisher:
        publisher.publish(TinyNet())
        with zmq_context.socket(zmq.DEALER) as peer:
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(publisher.fetch_endpoint)
            peer.send(raw.replace(b"MODEL", model_name.encode()))
            assert peer.poll(int(WAIT_S * 1000))
            answer = peer.recv_json()
    assert answer["status"] == "error" and answer["code"] == "malformed" and reason in answer["reason"]


def test_an_ipc_request_to_a_producer_that_lends_none_is_refused_as_no_ipc(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, gpu_device="cpu", allow_keyless=True) as publisher:
        version = publisher.publish(TinyNet())
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="lends no device memory") as caught:
            with client.borrow_device_copy(version, 1):
                pass
    assert caught.value.code == "no-ipc"


def test_ipc_leases_past_the_cap_are_refused_as_busy() -> None:
    producer = LendingProducer(key=GPU_KEY)
    try:
        client = FetchClient(zmq.Context.instance(), producer.server.endpoint, "m", GPU_KEY, WAIT_S)
        with ExitStack() as held:
            for _ in range(MAX_LEASES):
                held.enter_context(client.borrow_device_copy(7, 64))
            with pytest.raises(TransferError, match="leases are outstanding") as caught:
                with client.borrow_device_copy(7, 64):
                    pass
        assert caught.value.code == "busy"
        with pytest.raises(TransferError, match="still lives in: pfs") as caught:
            with client.borrow_device_copy(6, 64):
                pass
        assert caught.value.code == "gone" and caught.value.tiers == ("pfs",)
    finally:
        producer.close()


# -- torch.distributed (Gloo over a TCPStore) ----------------------------------------------
def test_collective_gone_and_mismatch_carry_their_data(serve) -> None:  # noqa: F811 - the fixture
    server = serve(CountingLender(make_data(11, CHUNK)))
    with pytest.raises(TransferError, match="still lives in: pfs") as gone:
        fetch(server.address, CHUNK, version=VERSION + 1)
    assert gone.value.code == "gone" and gone.value.tiers == ("pfs",)
    with pytest.raises(IntegrityError, match=f"serves {CHUNK} bytes") as mismatch:
        fetch(server.address, CHUNK - 1)
    assert mismatch.value.code == "mismatch"


class NoDigestYet(CountingLender):
    """A store whose digest is not computed yet: the server answers the failure and goes on."""

    def lend_memory(self, version: int, device_type: str | None = None) -> MemoryLoan | None:
        loan = super().lend_memory(version, device_type)
        return None if loan is None else dataclasses.replace(loan, digest=self._no_digest)

    @staticmethod
    def _no_digest() -> str:
        raise StorageError("digest of the version is not computed yet")


def test_collective_failures_and_malformed_requests_carry_a_code(serve) -> None:  # noqa: F811 - the fixture
    lender = NoDigestYet(make_data(12, CHUNK))
    server = serve(lender)
    with pytest.raises(TransferError, match="refused the request.*not computed yet") as caught:
        fetch(server.address, CHUNK)
    assert caught.value.code == "server-error"
    port = int(server.address.rsplit(":", 1)[1])
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=5), wait_for_workers=False)
    store.set("viper/req/2", json.dumps({"proto": 1, "version": VERSION, "nbytes": -1, "nonce": "ab" * 8}))
    answer = json.loads(store.get("viper/ans/2"))
    assert answer["status"] == "error" and answer["code"] == "malformed"
    assert "'nbytes' must be a non-negative integer" in answer["reason"]
    lender.wait_released(1)


def test_a_deeply_nested_request_leaves_the_collective_server_serving(serve) -> None:  # noqa: F811 - the fixture
    """Issue 11, defect 9: a request nested far past the recursion limit once killed the server
    (RecursionError), and with it every later transfer."""
    data = make_data(13, CHUNK)
    server = serve(CountingLender(data))
    port = int(server.address.rsplit(":", 1)[1])
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=5), wait_for_workers=False)
    store.set("viper/req/1", nested(10_000))  # under the size limit, far past the recursion limit
    answer = json.loads(store.get("viper/ans/1"))
    assert answer["status"] == "error" and "nests deeper" in answer["reason"]
    received, _, _ = fetch(server.address, CHUNK)  # the next honest transfer is served
    assert torch.equal(received, data) and server.error is None


def test_a_keyed_consumer_refuses_collective_answers_the_server_did_not_sign() -> None:
    """Issue 11, defect 3: anyone who reaches the store can read a consumer's nonce and answer in
    the server's place, vouching with a digest of its own bytes. With a key, only a signed
    answer is believed, before a byte is received."""
    impostor = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=WAIT_S), wait_for_workers=False)
    impostor.set("viper/next", "1")
    own_bytes = torch.zeros(64, dtype=torch.uint8)

    def answer_in_the_servers_place() -> None:
        request = json.loads(impostor.get("viper/req/1"))  # waits for the consumer's request
        impostor.set("viper/next", "2")
        impostor.set("viper/ans/1", json.dumps({"proto": 1, "nonce": request["nonce"], "status": "ok", "version": 1,
                                                "nbytes": 64, "digest": digest_buffer(own_bytes), "chunk_bytes": 64}))

    responder = threading.Thread(target=answer_in_the_servers_place, daemon=True)
    responder.start()
    client = CollectiveClient(f"gloo://127.0.0.1:{impostor.port}", timeout=WAIT_S, key=GPU_KEY)
    with pytest.raises(ProtocolError, match="carries no MAC") as caught:
        client.fetch_into(1, torch.empty(64, dtype=torch.uint8), 64)
    assert caught.value.code == "forged"
    responder.join(WAIT_S)


def test_collective_answers_are_signed_and_keyed_transfers_verified(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=GPU_KEY,
                        collective_endpoint="gloo://127.0.0.1:0") as publisher:
        model = TinyNet()
        version = publisher.publish(model)
        expected = take_snapshot(model.state_dict()).data
        received = torch.empty(expected.numel(), dtype=torch.uint8)
        CollectiveClient(publisher.collective_endpoint, WAIT_S, GPU_KEY).fetch_into(version, received, expected.numel())
        assert torch.equal(received, expected)
        with pytest.raises(ProtocolError, match="wrong MAC") as caught:  # signed, with another key
            CollectiveClient(publisher.collective_endpoint, WAIT_S, b"another key, 16+ bytes").fetch_into(
                version, received, expected.numel())
        assert caught.value.code == "forged"
