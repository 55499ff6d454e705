"""The cross-host GPU-tier protocol, exercised with Gloo on CPU tensors over a real TCPStore on
loopback: the code path NCCL runs on a GPU cluster. Consumers run in this process (another
thread than the server's) and in spawned processes, as TorchServe workers on another host would."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from viper_lightning._digest import PLAIN, digest_buffer
from viper_lightning import ConfigurationError, IntegrityError, TransferError
from viper_lightning.transport import _collective
from viper_lightning.transport._collective import CollectiveClient, CollectiveServer
from viper_lightning.transport._loans import MemoryLoan

WAIT_S = 20.0
CHUNK = 256 * 1024
VERSION = 7
DIED_MID_TRANSFER = 17  # exit code of the consumer that dies after its first chunk


def make_data(seed: int, nbytes: int) -> torch.Tensor:
    """Deterministic bytes, so a spawned consumer can check what it received without a copy."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


class CountingLender:
    """A lender stand-in: counts loans and releases so tests can wait for a transfer to end."""

    lends_device_memory = False

    def __init__(self, data: torch.Tensor, version: int = VERSION, digest: str | None = None) -> None:
        self.data, self.version = data, version
        self.digest = digest or digest_buffer(data)
        self.lent = self.released = 0
        self.asked_tiers: list[int] = []
        self._changed = threading.Condition()

    def lend_memory(self, version: int, device_type: str | None = None) -> MemoryLoan | None:
        if version != self.version:
            return None
        with self._changed:
            self.lent += 1
        return MemoryLoan(self.data, lambda: self.digest, self._release)

    def tiers_of(self, version: int) -> list[str]:
        self.asked_tiers.append(version)
        return ["pfs"]

    def _release(self) -> None:
        with self._changed:
            self.released += 1
            self._changed.notify_all()

    def wait_released(self, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.released >= count, WAIT_S):
                raise AssertionError(f"expected {count} releases within {WAIT_S} s, got {self.released}")


@pytest.fixture
def serve() -> Iterator[Callable[..., CollectiveServer]]:
    """Start servers on 127.0.0.1 (any free port); close them and check they kept no error."""
    servers: list[CollectiveServer] = []

    def start(lender: CountingLender, timeout: float = WAIT_S, chunk_bytes: int = CHUNK,
              join_window_s: float = 1.0) -> CollectiveServer:
        server = CollectiveServer("127.0.0.1", 0, "gloo", lender, timeout=timeout, chunk_bytes=chunk_bytes,
                                  join_window_s=join_window_s)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        assert server.error is None


def fetch(address: str, nbytes: int, version: int = VERSION,
          timeout: float = WAIT_S) -> tuple[torch.Tensor, str, float]:
    """Fetch into a buffer larger than the version, filled with a canary past nbytes."""
    buffer = torch.full((nbytes + 100,), 0xAB, dtype=torch.uint8)
    digest, digest_s = CollectiveClient(address, timeout=timeout).fetch_into(version, buffer, nbytes)
    assert torch.all(buffer[nbytes:] == 0xAB), "bytes past nbytes were written"
    return buffer[:nbytes], digest, digest_s


def consume_in_child(address: str, seed: int, nbytes: int, results: multiprocessing.Queue) -> None:
    """A consumer process: fetch, compare with the expected bytes, report (no tensors pickled)."""
    received, digest, _ = fetch(address, nbytes)
    results.put({"exact": bool(torch.equal(received, make_data(seed, nbytes))), "digest": digest})


def die_after_first_chunk(address: str, nbytes: int) -> None:
    """A consumer process that dies mid-transfer: it exits as soon as its first chunk lands."""

    class Dying:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def update(self, data: object) -> None:
            os._exit(DIED_MID_TRANSFER)

    _collective.Digester = Dying  # this child only; the digest of the first chunk is the trigger
    fetch(address, nbytes)
    os._exit(0)  # not reached unless the transfer had a single chunk


def run_child(target: Callable[..., None], *args: object) -> multiprocessing.Process:
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def test_in_thread_transfer_is_bit_exact_across_chunks(serve) -> None:
    data = make_data(1, 5 * CHUNK + 12345)  # six chunks, the last one short
    lender = CountingLender(data)
    server = serve(lender)
    received, digest, digest_s = fetch(server.address, data.numel())
    assert torch.equal(received, data)
    assert digest == digest_buffer(data) and digest_s >= 0.0
    lender.wait_released(1)
    assert lender.lent == 1
    assert server.address.startswith("gloo://127.0.0.1:")


def test_two_spawned_consumers_asking_at_once_both_get_exact_bytes(serve) -> None:
    nbytes = 9 * CHUNK + 7
    lender = CountingLender(make_data(2, nbytes))
    server = serve(lender)
    results = multiprocessing.get_context("spawn").Queue()
    children = [run_child(consume_in_child, server.address, 2, nbytes, results) for _ in range(2)]
    reports = [results.get(timeout=WAIT_S * 2) for _ in children]
    for child in children:
        child.join(WAIT_S)
        assert child.exitcode == 0
    assert reports == [{"exact": True, "digest": lender.digest}] * 2
    lender.wait_released(2)


def test_lying_digest_is_detected_and_the_server_keeps_serving(serve) -> None:
    data = make_data(3, 3 * CHUNK)
    lender = CountingLender(data, digest=f"{PLAIN}:" + "0" * 32)
    server = serve(lender)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        fetch(server.address, data.numel())
    lender.digest = digest_buffer(data)
    received, _, _ = fetch(server.address, data.numel())
    assert torch.equal(received, data)


def test_gone_version_is_answered_with_the_tiers_that_hold_it(serve) -> None:
    lender = CountingLender(make_data(4, CHUNK))
    server = serve(lender)
    with pytest.raises(TransferError, match="still lives in: pfs"):
        fetch(server.address, CHUNK, version=VERSION + 1)
    assert lender.asked_tiers == [VERSION + 1] and lender.lent == 0


def test_size_disagreement_is_settled_before_any_transfer(serve) -> None:
    lender = CountingLender(make_data(5, CHUNK))
    server = serve(lender)
    with pytest.raises(IntegrityError, match=f"serves {CHUNK} bytes"):
        fetch(server.address, CHUNK - 1)
    lender.wait_released(1)
    received, _, _ = fetch(server.address, CHUNK)
    assert torch.equal(received, lender.data)


def test_consumer_times_out_naming_the_address_when_the_server_is_closed(serve) -> None:
    server = serve(CountingLender(make_data(6, CHUNK)))
    address = server.address
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 5.0, "close() must not wait for the idle store wait"
    with pytest.raises(TransferError, match=f"{address}.*0 bytes received"):
        fetch(address, CHUNK, timeout=0.5)


def test_consumer_times_out_when_nobody_answers() -> None:
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    address = f"gloo://127.0.0.1:{store.port}"
    with pytest.raises(TransferError, match=f"{address} did not take the request.*0 bytes received"):
        fetch(address, CHUNK, timeout=0.5)  # a store, but no server behind it
    store.set("viper/next", "1")  # a server that publishes tickets, then hangs
    started = time.monotonic()
    with pytest.raises(TransferError, match=f"{address} did not answer.*0 bytes received"):
        fetch(address, CHUNK, timeout=0.5)
    assert time.monotonic() - started < 5.0
    request = json.loads(store.get("viper/req/1"))
    assert request.pop("nonce") and request == {"proto": 1, "version": VERSION, "nbytes": CHUNK, "timeout": 0.5}


def test_server_survives_a_consumer_that_dies_mid_transfer(serve, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="viper_lightning.collective")
    nbytes = 32 * CHUNK  # far more than the chunks in flight, so the death is mid-transfer
    lender = CountingLender(make_data(8, nbytes))
    server = serve(lender, timeout=5.0)
    child = run_child(die_after_first_chunk, server.address, nbytes)
    child.join(WAIT_S * 2)
    assert child.exitcode == DIED_MID_TRANSFER
    lender.wait_released(1)  # the pin is released once the server has given up on the dead consumer
    assert "failed after" in caplog.text
    received, _, _ = fetch(server.address, nbytes)
    assert torch.equal(received, lender.data)
    lender.wait_released(2)


def test_close_returns_within_a_timeout_while_a_consumer_stalls_mid_transfer(serve) -> None:
    chunk = 16 * CHUNK  # big enough that Gloo's send waits for the receiver (small ones do not)
    nbytes = 4 * chunk
    lender = CountingLender(make_data(10, nbytes))
    server = serve(lender, timeout=1.0, chunk_bytes=chunk)
    port = int(server.address.rsplit(":", 1)[1])
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=5), wait_for_workers=False)
    store.set("viper/req/1", json.dumps({"proto": 1, "version": VERSION, "nbytes": nbytes, "nonce": "cd" * 8}))
    group = _collective._new_group("gloo", store, 1, 1, 2, 5.0, "127.0.0.1")
    first = torch.empty(chunk, dtype=torch.uint8)
    group.recv([first], 0, 0).wait(timedelta(seconds=5))  # then stops receiving, still alive
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 4.0
    assert lender.released == 1 and torch.equal(first, lender.data[:chunk])
    group.abort()


def test_absent_consumer_and_garbage_request_do_not_block_the_next_consumer(serve) -> None:
    lender = CountingLender(make_data(9, CHUNK))
    server = serve(lender, timeout=0.5)
    port = int(server.address.rsplit(":", 1)[1])
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=5), wait_for_workers=False)
    # Ticket 1: a valid request whose consumer never joins the group (it died after asking).
    store.set("viper/req/1", json.dumps({"proto": 1, "version": VERSION, "nbytes": CHUNK, "nonce": "ab" * 8}))
    store.set("viper/req/2", b"\x80not json")
    received, _, _ = fetch(server.address, CHUNK)  # claims ticket 3, served once 1 timed out
    assert torch.equal(received, lender.data)
    assert json.loads(store.get("viper/ans/1"))["status"] == "ok"
    answer = json.loads(store.get("viper/ans/2"))
    assert answer["status"] == "error" and "not JSON" in answer["reason"]
    lender.wait_released(2)
    assert int(store.get("viper/next")) == 4


class ScriptedStore:
    """Just enough of a store (TCPStore's compare_set semantics) to replay the races a claim
    must survive; `served` tickets have an answer that echoes their request's nonce."""

    def __init__(self, next_values: list[bytes], taken: set[str], served: set[int] = frozenset()) -> None:
        self.next_values, self.served, self.deleted = next_values, served, []
        self.keys = dict.fromkeys(taken, b"x")

    def get(self, key: str) -> bytes:
        assert key == "viper/next"
        return self.next_values.pop(0)

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        ticket = int(key.rsplit("/", 1)[1])
        if key.startswith("viper/ans/") and ticket in self.served:
            request = json.loads(self.keys[f"viper/req/{ticket}"])
            return json.dumps({"status": "ok", "nonce": request["nonce"]}).encode()
        if key not in self.keys:
            if expected:
                return expected
            self.keys[key] = desired
        return self.keys[key]

    def delete_key(self, key: str) -> bool:
        self.deleted.append(key)
        return self.keys.pop(key, None) is not None


def test_claim_skips_taken_tickets_and_retries_when_the_server_had_passed_its_ticket() -> None:
    client = CollectiveClient("gloo://127.0.0.1:9")
    # 3 is taken; 4 is written after the server moved to 6 without reading it: claim 6 instead.
    store = ScriptedStore([b"3", b"6", b"6", b"6"], taken={"viper/req/3"})
    assert client._claim(store, VERSION, CHUNK, False)[0] == 6
    assert store.deleted == ["viper/req/4"] and "viper/req/6" in store.keys
    assert not store.next_values


def test_claim_keeps_a_ticket_the_server_answered_before_the_claim_looked_again() -> None:
    client = CollectiveClient("gloo://127.0.0.1:9")
    store = ScriptedStore([b"1", b"2"], taken=set(), served={1})
    ticket, nonce = client._claim(store, VERSION, CHUNK, False)
    assert ticket == 1 and json.loads(store.keys["viper/req/1"])["nonce"] == nonce
    assert store.deleted == []


def test_empty_version_needs_no_group(serve) -> None:
    lender = CountingLender(torch.empty(0, dtype=torch.uint8))
    server = serve(lender)
    received, digest, _ = fetch(server.address, 0)
    assert received.numel() == 0 and digest == digest_buffer(b"")


@pytest.mark.parametrize("address", [
    "tcp://127.0.0.1:5555", "gloo://127.0.0.1", "gloo://127.0.0.1:0", "gloo://127.0.0.1:70000",
    "gloo://:5555", "mpi://127.0.0.1:5555", "gloo://127.0.0.1:55 55", " gloo://127.0.0.1:5555", 5555,
])
def test_bad_addresses_are_refused_with_the_expected_form(address: object) -> None:
    with pytest.raises(ConfigurationError, match="gloo://HOST:PORT"):
        CollectiveClient(address)


def test_addresses_accept_names_and_bracketed_ipv6() -> None:
    assert CollectiveClient("gloo://viper-host.example:29500").address == "gloo://viper-host.example:29500"
    assert CollectiveClient("gloo://[::1]:29500", timeout=1).address == "gloo://[::1]:29500"


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "mpi"}, "backend 'mpi'"),
    ({"timeout": 0}, "timeout 0"),
    ({"timeout": float("nan")}, "timeout nan"),
    ({"chunk_bytes": 0}, "chunk_bytes 0"),
    ({"port": 70000}, "port 70000"),
])
def test_bad_server_arguments_name_value_and_fix(kwargs: dict, message: str) -> None:
    arguments = {"host": "127.0.0.1", "port": 0, "backend": "gloo", "lender": CountingLender(torch.zeros(1, dtype=torch.uint8)),
                 **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        CollectiveServer(**arguments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_without_cuda_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="use 'gloo'"):
        CollectiveClient("nccl://127.0.0.1:29500")


@pytest.mark.parametrize("buffer, nbytes, message", [
    (torch.zeros(10, dtype=torch.float32), 10, "uint8 cpu tensor"),
    (torch.zeros(2, 5, dtype=torch.uint8), 10, "1-D"),
    (torch.zeros(10, dtype=torch.uint8), 11, "cannot hold 11 bytes"),
])
def test_bad_buffers_are_refused_before_any_request(buffer: torch.Tensor, nbytes: int, message: str) -> None:
    client = CollectiveClient("gloo://127.0.0.1:9", timeout=0.2)  # nothing listens: refused first
    with pytest.raises(ConfigurationError, match=message):
        client.fetch_into(VERSION, buffer, nbytes)


class RelayMembers:
    """One relay member per name (threads of this process, each its own consumer), started at
    once; each checks its bytes."""

    def __init__(self, address: str, nbytes: int, names: list[str]) -> None:
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._member, args=(address, nbytes, name), daemon=True, name=name)
                         for name in names]
        for thread in self._threads:
            thread.start()

    def join(self, within: float) -> list[str]:
        """What went wrong (members still running after `within` seconds, or failed)."""
        deadline = time.monotonic() + within
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [f"{thread.name}: still running" for thread in self._threads if thread.is_alive()] + self.failures

    def _member(self, address: str, nbytes: int, name: str) -> None:
        try:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            CollectiveClient(address, timeout=WAIT_S, member=name).fetch_into(VERSION, buffer, nbytes, relay=True)
            if not torch.equal(buffer, make_data(3, nbytes)):
                self.failures.append(f"{name}: other bytes")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.failures.append(f"{name}: {exc}")


def wait_for_request(address: str, ticket: int) -> None:
    """Until the server's store holds `ticket`'s request (a poll with a deadline)."""
    host, port = address.removeprefix("gloo://").rsplit(":", 1)
    store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=WAIT_S), wait_for_workers=False)
    store.wait([f"viper/req/{ticket}"], timedelta(seconds=WAIT_S))


def test_a_relay_round_sends_once_and_every_member_gets_the_bytes(serve) -> None:
    nbytes = 5 * CHUNK + 123
    lender = CountingLender(make_data(3, nbytes))
    server = serve(lender, join_window_s=2.0)
    assert RelayMembers(server.address, nbytes, ["a", "b", "c"]).join(WAIT_S * 2) == []
    assert lender.lent == 1  # one round, one send from the producer, three copies


def test_a_round_ends_at_another_request_and_starts_at_once_when_everyone_is_back(serve) -> None:
    """A direct request in the window is served on its own, after the round. The next round
    has everyone of the last one back at once, so it starts without waiting out its window
    (here longer than the test allows)."""
    nbytes = 3 * CHUNK
    lender = CountingLender(make_data(3, nbytes))
    server = serve(lender, join_window_s=WAIT_S * 10)
    first = RelayMembers(server.address, nbytes, ["a", "b", "c"])
    wait_for_request(server.address, 3)
    received, _, _ = fetch(server.address, nbytes)  # ends the round: it starts, then this is served
    assert torch.equal(received, make_data(3, nbytes))
    assert first.join(WAIT_S) == []
    assert RelayMembers(server.address, nbytes, ["c", "a", "b"]).join(WAIT_S) == []
    assert lender.lent == 3
