"""Cross-host GPU tier: point-to-point transfers over torch.distributed.

One code path for both backends: NCCL moves CUDA tensors between GPUs on different hosts,
Gloo moves CPU tensors, and CI exercises the protocol with Gloo, so what runs on the GPU
cluster is the code the tests ran. Consumers never call init_process_group: every transfer
builds its own two-rank group (producer rank 0, consumer rank 1) on a prefix of the
producer's TCPStore, so a consumer that comes and goes never disturbs the others.

Requests go through the store, as JSON (nothing is ever pickled). Tickets are served in order:
  server:   publishes "viper/next" (the ticket it waits for) and waits for "viper/req/<next>"
  consumer: claims a ticket and writes its request in one atomic step, starting at "viper/next":
            compare_set("viper/req/<t>", absent -> {"proto": 1, "version", "nbytes", "nonce"}),
            trying t+1 when another consumer holds t; if "viper/next" has moved past t meanwhile
            and "viper/ans/<t>" does not carry its nonce, the server had passed t before the
            write (the request will never be read), so it claims again from "viper/next"
  server:   answers "viper/ans/<t>" (every answer echoes the request's "nonce") with
            {"proto": 1, "status": "ok", "nbytes", "digest", "chunk_bytes"}
            | {"status": "gone", "tiers": [...]}        (evicted: where it still lives)
            | {"status": "mismatch", "nbytes": <actual>} (the consumer expects another size)
            | {"status": "error", "code": str, "reason": str}  (codes: see viper_lightning._errors)
  then both build the group on PrefixStore("viper/<t>") and the producer sends the bytes in
  chunks of `chunk_bytes` (tag = chunk index), a small window of them in flight.
Relay (fan-out to many hosts, see _relay): a request may add "relay": true and "member" (the
consumer's name). The server then reads the next tickets for a join window, and every relay
request for the same version and size joins the round; each member's "ok" answer adds
"relay": {"round": <first ticket>, "rank": 1..n, "size": n + 1}, and all build one group on
PrefixStore("viper/<first ticket>"): the producer sends to rank 1, rank r receives from r - 1
and passes each chunk on to r + 1. A direct transfer is the round of one: rank 1 of 2.
Claiming with one compare_set (rather than a ticket counter, then a request) means a consumer
that dies at any point can never leave the server waiting on a ticket nobody will fill. The
consumer sends its expected size so a size disagreement is settled before either side builds a
group: otherwise the producer would wait a whole timeout for a consumer that never joins.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from typing import NamedTuple, TYPE_CHECKING

import torch
import torch.distributed as dist

from .._digest import ALL_THREADS, Digester, algorithm, mismatch
from .._errors import ConfigurationError, IntegrityError, ProtocolError, TransferError, ViperError
from ._loans import Lender, MemoryLoan
from ._messages import count, first_line, is_count, load_object, raise_for_answer, refusal
from ._protocol import PROTO, check_proto, consumer_name, sign, verify_mac
from ._relay import (BROKEN_ROUND, JOIN_WINDOW_S, RELAY_CHUNK_BYTES, RELAY_WINDOW, RelayMember, RelayRole, gather_round,
                     receive_and_forward, relay_role, spans, stall_timeout, wait_for)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch._C._distributed_c10d import Backend as _Group  # ProcessGroupGloo/NCCL's base

__all__ = ["CollectiveServer", "CollectiveClient", "CHUNK_BYTES", "BACKENDS", "parse_address"]

log = logging.getLogger("viper_lightning.collective")

BACKENDS = {"gloo": "cpu", "nccl": "cuda"}  # backend -> the device type of its tensors
CHUNK_BYTES = 64 * 1024 * 1024
WINDOW = 2  # chunks in flight: the next one lands while the previous one is digested
# A request says how long its consumer waits without progress (at most MAX_TIMEOUT_S); the
# server sends to a round no longer than its members wait, nor less than MIN_SEND_TIMEOUT_S.
MAX_TIMEOUT_S = 24 * 3600.0
MIN_SEND_TIMEOUT_S = 1.0
MAX_CHUNK_BYTES = 1 << 30
_NEXT = "viper/next"
_MAX_CLAIM_TRIES = 1000  # each try that fails means another consumer claimed a ticket meanwhile
_MAX_JSON_BYTES = 64 * 1024
# How long one idle store wait lasts. close() wakes the wait at once, so it only bounds how
# often torch logs a timeout warning while nobody asks for anything.
_IDLE_WAIT_S = 3600.0
_ABSENT = b"\x00absent"  # not JSON, so never a real answer
_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
_ADDRESS = re.compile(r"^(gloo|nccl)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")


class _Relayed(NamedTuple):
    """Who fetched what by relay, for a round to know whom it waits for: those that fetched
    the newest version relayed (over all its rounds: a host that joined late had one of its
    own), those that fetched the one before, and the members of the last round."""

    version: int
    members: frozenset[str]
    before: frozenset[str]
    last: frozenset[str]

    def asked_for(self, version: int) -> _Relayed:
        """A request for `version`: a newer version starts a new set."""
        return _Relayed(version, frozenset(), self.members, self.last) if version > self.version else self

    def expected(self, version: int) -> frozenset[str]:
        """Whom a round of `version` closes early for: everyone who fetched the version before
        it (or, before there was one, the last round); an older version's round waits its window."""
        if version != self.version:
            return frozenset()
        return self.before or self.last

    def served(self, version: int, names: set[str]) -> _Relayed:
        members = self.members | names if version == self.version else self.members
        return _Relayed(self.version, members, self.before, frozenset(names))


class CollectiveServer:
    """The producer's side: a TCPStore for requests and rendezvous, served by its own thread.

    It borrows versions from `lender` as flat uint8 tensors on the backend's device (CUDA for
    nccl, CPU for gloo), already written (their stream synchronised), and answers "gone" with
    the tiers that still hold an evicted version. Transfers run one at a time; a transfer that fails (consumer
    gone, timeout) is logged and the next ticket is served. Any other error stops the thread and
    is kept in `.error` for the owner to raise. The store listens on `host` only; anyone who can
    reach host:port can read the versions it serves, so bind it to a trusted network.
    """

    def __init__(self, host: str, port: int, backend: str,
                 lender: Lender, key: bytes | None = None,
                 timeout: float = 30.0, chunk_bytes: int = CHUNK_BYTES, join_window_s: float = JOIN_WINDOW_S) -> None:
        self._backend = _check_backend(backend)
        self._timeout = _check_timeout(timeout)
        self._chunk_bytes = _check_chunk_bytes(chunk_bytes)
        self._host = host
        self._lender, self._key = lender, key
        self._store = _listen(host, port, self._timeout)
        self._store.set(_NEXT, "1")
        self._waker = self._store.clone()  # a second connection: the thread blocks on the first
        self.address = _format_address(backend, _advertised_host(host), self._store.port)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ticket = 1
        self._askers: list[RelayMember] = []  # whom the request being served is answered to
        self._relayed = _Relayed(0, frozenset(), frozenset(), frozenset())  # whom a round expects back
        self._join_window_s = join_window_s
        self._group: _Group | None = None
        self._thread = threading.Thread(target=self._run, name=f"viper-collective-{self._store.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def backend(self) -> str:
        """"gloo" or "nccl"."""
        return self._backend

    @property
    def load(self) -> int:
        """Transfers in flight (0 or 1), reported to consumers so they can pick a less busy path."""
        return 0 if self._group is None else 1

    def close(self) -> None:
        """Stop the thread and the store; returns once the pinned bytes are no longer read.

        A transfer in flight stops at its next chunk (NCCL aborts at once). Gloo cannot cancel a
        send already posted, so a consumer that stalls mid-chunk delays close() by at most one
        timeout: the bytes must not be freed while a send may still read them."""
        if self._store is None:
            return
        self._stop.set()
        group = self._group
        if group is not None:
            _abort(group)
        with _torch_errors(lambda why: f"could not wake the collective server thread: {why}"):
            self._waker.set(_request_key(self._ticket), b"")  # wakes the thread's store wait
        self._thread.join(self._timeout + 5.0)  # a transfer being set up may take one timeout
        if self._thread.is_alive():
            log.warning("collective server %s: its thread did not stop; it is left to end on its own",
                        self.address)
        self._waker = self._store = None  # the store's listener stops with its last reference

    def __enter__(self) -> CollectiveServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        ticket = 1
        try:
            while not self._stop.is_set():
                self._ticket = ticket  # set before the stop check, so close() wakes the right key
                if self._stop.is_set():
                    break
                raw = self._await_request(ticket)
                if raw is None:
                    break
                served = self._serve(ticket, raw)
                self._store.set(_NEXT, str(served[-1] + 1))  # before the requests go: see CollectiveClient
                for done in served:
                    self._forget(done)
                ticket = served[-1] + 1
        except BaseException as exc:  # kept for the owner to raise
            self.error = exc
            log.exception("collective server %s stopped", self.address)

    def _await_request(self, ticket: int) -> bytes | None:
        """The request of `ticket`, or None once stopping."""
        key = _request_key(ticket)
        while not self._stop.is_set():
            try:
                self._store.wait([key], timedelta(seconds=_IDLE_WAIT_S))
            except dist.DistStoreError:  # nobody asked for an hour: wait again
                continue
            return None if self._stop.is_set() else self._store.get(key)
        return None

    def _serve(self, ticket: int, raw: bytes) -> list[int]:
        """Serve the request of `ticket`, with the relay requests that join its round; returns
        the tickets served."""
        self._askers = [RelayMember(ticket, "", "")]
        try:
            request = _parse_request(raw)
        except ProtocolError as exc:
            self._answer(refusal(exc), unread=True)
            return [ticket]
        self._askers = [RelayMember(ticket, request["nonce"], request.get("member", ""), request.get("timeout"))]
        if request.get("relay"):
            self._relayed = self._relayed.asked_for(request["version"])
            self._askers = gather_round(self._askers[0], functools.partial(self._joining, request),
                                        expected=self._relayed.expected(request["version"]),
                                        window_s=self._join_window_s)
            self._relayed = self._relayed.served(request["version"], {asker.name for asker in self._askers})
        version = request["version"]
        try:
            loan = self._lender.lend_memory(version, BACKENDS[self._backend])
            if loan is None:
                self._answer({"status": "gone", "version": version, "tiers": list(self._lender.tiers_of(version))})
                return [asker.ticket for asker in self._askers]
        except BaseException as exc:
            self._answer_failure(exc)
            raise
        try:
            self._offer(version, request["nbytes"], loan, relay=bool(request.get("relay")))
        except ViperError as exc:  # this request's trouble (e.g. no digest yet): answered, serving goes on
            log.warning("%s: could not serve version %d: %s", self.address, version, exc)
            self._answer_failure(exc)
        except BaseException as exc:
            self._answer_failure(exc)
            raise
        finally:
            loan.release()
        return [asker.ticket for asker in self._askers]

    def _joining(self, first: dict, ticket: int, wait_s: float) -> dict | None:
        """The request of `ticket` if it arrives within wait_s and joins `first`'s relay round."""
        key = _request_key(ticket)
        self._ticket = ticket  # close() wakes this wait
        try:
            self._store.wait([key], timedelta(seconds=wait_s))
        except dist.DistStoreError:
            return None
        if self._stop.is_set():
            return None
        try:
            request = _parse_request(self._store.get(key))
        except ProtocolError:
            return None  # answered on its own, next
        joins = request.get("relay") is True and (request["version"], request["nbytes"]) == (first["version"],
                                                                                              first["nbytes"])
        return request if joins else None

    def _offer(self, version: int, nbytes: int, loan: MemoryLoan, *, relay: bool) -> None:
        data = _check_served(loan.data, self._backend, version)
        if data.numel() != nbytes:
            self._answer({"status": "mismatch", "version": version, "nbytes": data.numel()})
            return
        chunk_bytes = min(self._chunk_bytes, RELAY_CHUNK_BYTES) if relay else self._chunk_bytes
        self._answer({"status": "ok", "version": version, "nbytes": nbytes, "digest": loan.digest(),
                      "chunk_bytes": chunk_bytes}, relay=relay)
        if nbytes:
            self._send(version, data, chunk_bytes, relay)

    def _send(self, version: int, data: torch.Tensor, chunk_bytes: int, relay: bool) -> None:
        """Send `data` to rank 1 (the consumer, or the first member of a relay round); a failure
        is the consumers', so it is logged."""
        sent, done, first = 0, False, self._askers[0].ticket
        window = RELAY_WINDOW if relay else WINDOW
        # No longer than the consumers wait: a dead first member must not hold the server (and
        # everyone's next request, such as the round the others form again) for its own timeout.
        timeout = min([self._timeout, *(a.timeout_s for a in self._askers if a.timeout_s)])
        timeout = max(MIN_SEND_TIMEOUT_S, stall_timeout(timeout) if relay else timeout)

        def failed(why: str) -> str | None:  # nothing to say when the server is closing
            return None if self._stop.is_set() else (f"{self.address}: transfer of version {version} (ticket "
                                                     f"{first}) failed after {sent} of {data.numel()} bytes: {why}")
        try:
            with _torch_errors(failed, level=logging.WARNING):
                self._group = _new_group(self._backend, self._store, first, 0, len(self._askers) + 1,
                                         timeout, self._host)
                pending: deque[tuple[dist.Work, int]] = deque()
                for index, (offset, length) in enumerate(spans(data.numel(), chunk_bytes)):
                    if self._stop.is_set():
                        raise RuntimeError("the server is closing")
                    pending.append((self._group.send([data[offset:offset + length]], 1, index), length))
                    if len(pending) >= window:
                        sent += _finish(pending.popleft(), timeout)
                while pending:
                    sent += _finish(pending.popleft(), timeout)
                done = True
        finally:
            group, self._group = self._group, None
            _release(group, done)

    def _answer(self, answer: dict[str, object], *, relay: bool = False, unread: bool = False) -> None:
        """Answer every asker of the request being served. Answers echo each request's nonce:
        the consumer's proof that the answer is its own. With a key they are signed: the store
        is readable by anyone who reaches it, so another peer could otherwise answer in the
        server's place, with a digest of its own bytes. A relay answer gives each member its
        place in the round. `unread`: the request could not be read, so there is no nonce to echo."""
        first, size = self._askers[0].ticket, len(self._askers) + 1
        for rank, asker in enumerate(self._askers, start=1):
            payload = {"proto": PROTO, "nonce": None if unread else asker.nonce, **answer}
            if relay:
                payload["relay"] = RelayRole(first, rank, size).describe()
            if self._key is not None:
                payload["mac"] = sign(payload, self._key)
            self._store.set(_answer_key(asker.ticket), json.dumps(payload))

    def _answer_failure(self, exc: BaseException) -> None:
        """Tell the consumers at once, rather than letting them wait out their timeout."""
        with _torch_errors(lambda why: f"{self.address}: could not tell tickets "
                                       f"{[asker.ticket for asker in self._askers]} of a failure: {why}"):
            self._answer({"status": "error", "code": "server-error", "reason": f"producer error: {first_line(exc)}"})

    def _forget(self, ticket: int) -> None:
        """Drop the ticket's keys (the answer is the consumer's to delete, once read)."""
        self._store.delete_key(_request_key(ticket))
        if hasattr(self._store, "list_keys"):  # the group's rendezvous keys
            for key in self._store.list_keys():
                if key.startswith(f"viper/{ticket}/"):
                    self._store.delete_key(key)


class CollectiveClient:
    """The consumer's side: one fetch from one producer address per call."""

    def __init__(self, address: str, timeout: float = 30.0, key: bytes | None = None, *,
                 member: str | None = None) -> None:
        self._backend, self._host, self._port = parse_address(address)
        self._timeout = _check_timeout(timeout)
        self._key = key  # with a key, only a signed answer vouches for the bytes
        self.address = address
        # the name relay requests carry: the same consumer gives the same one from version to
        # version, so a steady round starts as soon as everyone is back (see _relay)
        self.member = member or f"{socket.gethostname()}:{os.getpid()}"

    def fetch_into(self, version: int, buffer: torch.Tensor, nbytes: int, *, relay: bool = False) -> tuple[str, float]:
        """Receive `version` into `buffer[:nbytes]`; returns (digest, seconds spent digesting).

        `relay`: join (or open) a relay round with the other hosts asking for this version now,
        and pass the bytes on to the next of them as they land (see `_relay`).

        A CPU buffer is digested chunk by chunk as the bytes land, and a mismatch raises
        IntegrityError. A CUDA buffer (nccl) is digested on a host copy when a key is set (bytes
        are never accepted unverified then); without one it is not digested here, since copying
        the weights back would cost more than the transfer; the returned digest is then the
        producer's, and the caller's layout check still applies."""
        _check_request(version, nbytes)
        _check_buffer(buffer, nbytes, self._backend)
        try:
            return self._fetch(version, buffer, nbytes, relay, self._timeout)
        except TransferError as exc:
            if exc.code != BROKEN_ROUND:
                raise
            log.warning("%s: %s; asking again, as a new round", self.address, exc)
        # The members after the failure ask again together and form a new round, so the producer's
        # link carries one more copy rather than one per member left. The server may still be
        # finishing the broken round for as long as its members wait (our timeout): wait that too.
        return self._fetch(version, buffer, nbytes, relay, 2 * self._timeout)

    def _fetch(self, version: int, buffer: torch.Tensor, nbytes: int, relay: bool,
               answer_wait_s: float) -> tuple[str, float]:
        store = self._connect()
        ticket, nonce = self._claim(store, version, nbytes, relay)
        answer = self._await_answer(store, ticket, version, answer_wait_s)
        verify_mac(answer, self._key, f"collective answer from {self.address}")
        if answer.get("nonce") != nonce:
            raise ProtocolError(f"{self.address} answered ticket {ticket} with another consumer's nonce")
        digest, chunk_bytes = _accept(answer, version, nbytes, self.address, algorithm(self._key))
        role = relay_role(answer, f"collective answer from {self.address}") if relay else RelayRole(ticket, 1, 2)
        if not nbytes:
            return digest, 0.0
        return digest, self._receive(store, role, version, buffer[:nbytes], chunk_bytes, digest)

    def _connect(self) -> dist.TCPStore:
        with _torch_errors(lambda why: f"cannot reach the collective server at {self.address} within "
                                       f"{self._timeout:g} s ({why}); the producer is gone or the address "
                                       "is wrong; 0 bytes received", TransferError):
            return dist.TCPStore(self._host.strip("[]"), self._port, None, False,
                                 timedelta(seconds=self._timeout), wait_for_workers=False)

    def _claim(self, store: dist.TCPStore, version: int, nbytes: int, relay: bool) -> tuple[int, str]:
        """Claim a ticket the server will read, with our request in it (see the module doc);
        returns (ticket, nonce)."""
        nonce = os.urandom(8).hex()
        fields = {"proto": PROTO, "version": version, "nbytes": nbytes, "nonce": nonce,
                  "timeout": min(self._timeout, MAX_TIMEOUT_S)}
        if relay:
            fields.update(relay=True, member=self.member)
        request = json.dumps(fields).encode()
        with _torch_errors(lambda why: f"{self.address} did not take the request for version {version} within "
                                       f"{self._timeout:g} s ({why}); producer gone or busy; 0 bytes received",
                           TransferError):
            ticket = _next_ticket(store)
            for _ in range(_MAX_CLAIM_TRIES):
                if store.compare_set(_request_key(ticket), b"", request) != request:
                    ticket += 1  # another consumer's
                elif _next_ticket(store) <= ticket or _answered(store, ticket, nonce):
                    return ticket, nonce
                else:  # written after the server had passed (and removed) this ticket: never read
                    store.delete_key(_request_key(ticket))
                    ticket = _next_ticket(store)
        raise TransferError(f"{self.address}: no free ticket after {_MAX_CLAIM_TRIES} tries; too many "
                            "consumers at once, retry later")

    def _await_answer(self, store: dist.TCPStore, ticket: int, version: int, wait_s: float) -> dict:
        key = _answer_key(ticket)
        with _torch_errors(lambda why: f"{self.address} did not answer the request for version {version} within "
                                       f"{wait_s:g} s ({why}); producer gone or busy; 0 bytes received",
                           TransferError):
            store.wait([key], timedelta(seconds=wait_s))
            raw = store.get(key)
            store.delete_key(key)
        return load_object(raw, "collective answer", limit=_MAX_JSON_BYTES, invalid="is not JSON")

    def _receive(self, store: dist.TCPStore, role: RelayRole, version: int, target: torch.Tensor,
                 chunk_bytes: int, expected: str) -> float:
        """Receive from rank - 1 of `role` (rank 1 of 2 for a direct transfer), passing chunks on
        to the next member of a relay round, digesting as they land; returns the digest seconds."""
        digester = Digester(self._key, threads=ALL_THREADS) if target.device.type == "cpu" else None
        digest_s, received, group, done = 0.0, 0, None, False

        def landed(offset: int, length: int) -> None:
            nonlocal digest_s, received
            received += length
            if digester is not None:
                started = time.perf_counter()
                digester.update(target[offset:offset + length])
                digest_s += time.perf_counter() - started
        failure, relay = None, role.size > 2
        timeout = stall_timeout(self._timeout) if relay else self._timeout
        try:
            group = _new_group(self._backend, store, role.round, role.rank, role.size, timeout,
                               _local_host_towards(self._host, self._port))
            receive_and_forward(group, role, target, chunk_bytes, timeout, landed,
                                window=RELAY_WINDOW if relay else WINDOW)
            done = True
        except RuntimeError as exc:
            failure = first_line(exc)
            # The frames of the traceback hold the group and its pending receives: cleared, the
            # group goes with the last reference below, and its connections close, so the next
            # member of a relay round sees its receive fail now rather than after its timeout
            # (an abort alone leaves them open), and so on down the chain.
            traceback.clear_frames(exc.__traceback__)
        finally:
            _release(group, done)
            group = None
        if failure is not None:
            message = f"transfer of version {version} from {self.address} failed after {received} of " \
                      f"{target.numel()} bytes: {failure}"
            if not relay:
                raise TransferError(message)
            raise TransferError(f"{message} (relay round {role.round}, member {role.rank} of {role.size - 1})",
                                code=BROKEN_ROUND)
        if digester is None and self._key is not None:  # keyed: device bytes are checked too
            started = time.perf_counter()
            digester = Digester(self._key, threads=ALL_THREADS)
            digester.update(target.cpu())
            digest_s += time.perf_counter() - started
        why = mismatch(expected, digester.hexdigest()) if digester is not None else None
        if why is not None:
            raise IntegrityError(f"version {version} from {self.address}: {why}")
        return digest_s


def _new_group(backend: str, store: dist.Store, ticket: int, rank: int, size: int, timeout: float,
               host: str) -> _Group:
    """A group of its own for one transfer, named by its (first) ticket: two ranks, or a relay
    round's (blocks until every rank joins, or times out)."""
    prefixed = dist.PrefixStore(f"viper/{ticket}", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._devices = [_gloo_device(host)]
        options._timeout = timedelta(seconds=timeout)
        options._threads = 1  # only collectives use the worker threads; send/recv do not
        return dist.ProcessGroupGloo(prefixed, rank, size, options)
    from torch.distributed import ProcessGroupNCCL  # exists only in CUDA builds

    options = ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timedelta(seconds=timeout)
    return ProcessGroupNCCL(prefixed, rank, size, options)


def _gloo_device(host: str) -> object:
    """Gloo listens on the interface that faces the peer (the default may pick another one)."""
    if host in _WILDCARD_HOSTS:
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=host)


def _finish(item: tuple[dist.Work, int], timeout: float) -> int:
    """Wait for one chunk's send; returns its length, raises RuntimeError on failure."""
    work, length = item
    wait_for(work, timeout, "sending a chunk")
    return length


def _abort(group: _Group) -> None:
    """Cancel what is in flight so neither side waits out its timeout (callable from any thread)."""
    with _torch_errors(lambda why: f"aborting a transfer group failed: {why}"):
        group.abort()


def _release(group: _Group | None, done: bool) -> None:
    """Release the group's connections now (NCCL communicators hold GPU memory): a clean
    shutdown after a complete transfer, an abort when anything may still be in flight."""
    if group is None:
        return
    if not done:
        _abort(group)
        return
    # AttributeError: torch builds without Backend.shutdown
    with _torch_errors(lambda why: f"shutting a transfer group down failed: {why}", also=(AttributeError,)):
        group.shutdown()


def _listen(host: str, port: int, timeout: float) -> dist.TCPStore:
    """A master TCPStore listening on host:port only (TCPStore alone listens on every interface)."""
    if not is_count(port) or port > 65535:
        raise ConfigurationError(f"port {port!r} is not valid: use 0 (any free port) or 1-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
        except OSError:
            listener.close()
            raise
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host!r} port {port}: {exc}; pick a free port, or 0 to "
                                 "let the system choose one, and a host that names this machine") from None
    bound_port = listener.getsockname()[1]
    # the store owns the descriptor from here on and closes it when it stops
    with _torch_errors(lambda why: f"cannot start a TCPStore on {host!r} port {bound_port}: {why}",
                       ConfigurationError):
        return dist.TCPStore(host or "127.0.0.1", bound_port, None, True, timedelta(seconds=timeout),
                             wait_for_workers=False, master_listen_fd=listener.detach())


def _local_host_towards(host: str, port: int) -> str:
    """This host's address on the route to the producer (a UDP connect sends nothing)."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(address)
            return probe.getsockname()[0]
    except OSError as exc:
        raise RuntimeError(f"no route to {host}: {exc}") from None


def parse_address(address: object, *, any_port: bool = False) -> tuple[str, str, int]:
    """(backend, host, port) of 'gloo://HOST:PORT'; port 0 (any free port) only for binding."""
    match = _ADDRESS.match(address) if isinstance(address, str) else None
    port = int(match.group(4)) if match else 0
    if match is None or not (0 if any_port else 1) <= port <= 65535:
        raise ConfigurationError(f"collective address {address!r} is not valid: use 'gloo://HOST:PORT' for CPU "
                                 "tensors or 'nccl://HOST:PORT' for CUDA tensors, PORT in 1-65535 "
                                 "(for example 'gloo://127.0.0.1:29500'; IPv6 hosts in brackets)")
    backend = _check_backend(match.group(1))
    return backend, match.group(2), port


def _format_address(backend: str, host: str, port: int) -> str:
    return f"{backend}://{f'[{host}]' if ':' in host else host}:{port}"


def _advertised_host(host: str) -> str:
    """The host consumers should dial: the bound one, or this machine's name for a wildcard."""
    return socket.gethostname() if host in _WILDCARD_HOSTS else host


def _check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ConfigurationError(f"backend {backend!r} is not supported: use 'gloo' (CPU tensors) or "
                                 "'nccl' (CUDA tensors)")
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        raise ConfigurationError("this torch build has no torch.distributed/Gloo support; install a "
                                 "standard torch build")
    if backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise ConfigurationError("backend 'nccl' needs a CUDA build of torch and a visible GPU; use "
                                 "'gloo' to move CPU tensors instead")
    return backend


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigurationError(f"timeout {timeout!r} is not valid: use a positive number of seconds, "
                                 "for example 30")
    return float(timeout)


def _check_chunk_bytes(chunk_bytes: object) -> int:
    if not is_count(chunk_bytes) or not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigurationError(f"chunk_bytes {chunk_bytes!r} is not valid: use an integer in "
                                 f"1-{MAX_CHUNK_BYTES}, for example {CHUNK_BYTES} (64 MiB)")
    return chunk_bytes


def _check_request(version: object, nbytes: object) -> None:
    for name, value in (("version", version), ("nbytes", nbytes)):
        if not is_count(value):
            raise ConfigurationError(f"{name} {value!r} is not valid: use a non-negative integer")


def _check_buffer(buffer: object, nbytes: int, backend: str) -> None:
    device_type = BACKENDS[backend]
    if not _flat_bytes(buffer, device_type):
        raise ConfigurationError(f"the {backend} path receives into a contiguous 1-D uint8 {device_type} tensor; "
                                 f"got {_describe(buffer)}")
    if buffer.numel() < nbytes:
        raise ConfigurationError(f"buffer of {buffer.numel()} bytes cannot hold {nbytes} bytes; allocate at "
                                 "least the version's nbytes")


def _check_served(data: object, backend: str, version: int) -> torch.Tensor:
    """The store must hand over a flat uint8 tensor on the backend's device: a bug otherwise."""
    device_type = BACKENDS[backend]
    if not _flat_bytes(data, device_type):
        raise ConfigurationError(f"lookup({version}) returned {_describe(data)}; the {backend} server sends "
                                 f"contiguous 1-D uint8 {device_type} tensors")
    return data


def _flat_bytes(value: object, device_type: str) -> bool:
    """A contiguous 1-D uint8 tensor on a device of `device_type`: what both sides move."""
    return (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and value.is_contiguous() and value.device.type == device_type)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {value.dtype} tensor on {value.device}"
    return f"a {type(value).__name__}"


def _parse_request(raw: bytes) -> dict:
    request = load_object(raw, "collective request", limit=_MAX_JSON_BYTES, invalid="is not JSON")
    check_proto(request, "collective request")
    for key in ("version", "nbytes"):
        count(request, key, "collective request")
    nonce = request.get("nonce")
    if not isinstance(nonce, str) or not _NONCE.match(nonce):
        raise ProtocolError(f"collective request field 'nonce' must be 16-64 hex digits, got {nonce!r:.80}")
    if not isinstance(request.get("relay", False), bool):
        raise ProtocolError(f"collective request field 'relay' must be true or false, got {request['relay']!r:.80}")
    consumer_name(request, "member", "collective request", required=False)
    timeout = request.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= MAX_TIMEOUT_S):
        raise ProtocolError(f"collective request field 'timeout' must be seconds in (0, {MAX_TIMEOUT_S:g}], "
                            f"got {timeout!r:.80}")
    return request


def _accept(answer: dict, version: int, nbytes: int, address: str, expected: str) -> tuple[str, int]:
    """Check the server's answer; returns (digest, chunk_bytes) or raises what the answer means."""
    if answer.get("status") == "mismatch":
        raise IntegrityError(f"{address} serves {answer.get('nbytes')!r} bytes for version {version}, the "
                             f"notice announced {nbytes}", code="mismatch")
    raise_for_answer(answer, version, holder=address, refused=f"{address} refused the request for version {version}")
    if answer.get("proto") != PROTO or count(answer, "nbytes", "collective answer") != nbytes:
        raise ProtocolError(f"{address} answered version {version} with proto {answer.get('proto')!r} and "
                            f"nbytes {answer.get('nbytes')!r}; expected proto {PROTO} and {nbytes}")
    digest = answer.get("digest")
    if not isinstance(digest, str) or not digest.startswith(f"{expected}:"):
        raise ProtocolError(f"{address} answered version {version} with digest {digest!r:.100}; expected "
                            f"'{expected}:<hex>'")
    return digest, count(answer, "chunk_bytes", "collective answer", minimum=1, maximum=MAX_CHUNK_BYTES)


def _next_ticket(store: dist.Store) -> int:
    raw = store.get(_NEXT)
    if not raw.isdigit():
        raise ProtocolError(f"the collective server published {raw[:40]!r} as its next ticket")
    return int(raw)


def _answered(store: dist.Store, ticket: int, nonce: str) -> bool:
    """Whether the server has already answered our request (it answers before moving on).

    compare_set with a sentinel reads without blocking (get waits for a key that another
    consumer may delete at any moment) and never writes: an absent key stays absent."""
    raw = store.compare_set(_answer_key(ticket), _ABSENT, _ABSENT)
    if raw == _ABSENT:
        return False
    try:
        return load_object(raw, "collective answer", limit=_MAX_JSON_BYTES).get("nonce") == nonce
    except ProtocolError:
        return False


def _request_key(ticket: int) -> str:
    return f"viper/req/{ticket}"


def _answer_key(ticket: int) -> str:
    return f"viper/ans/{ticket}"


@contextmanager
def _torch_errors(describe: Callable[[str], str | None], raise_as: type[ViperError] | None = None, *,
                  level: int = logging.DEBUG, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Map what torch.distributed raises (a RuntimeError: store timeout, peer gone, Gloo or NCCL
    failure) inside the block: raise `raise_as(describe(first line of the error))`, or without
    `raise_as` log that message at `level` and go on (nothing is logged for None)."""
    try:
        yield
    except (RuntimeError, *also) as exc:
        message = describe(first_line(exc))
        if raise_as is not None:
            raise raise_as(message) from None
        if message is not None:
            log.log(level, message)
