"""Remote fetch over ZeroMQ: a consumer's DEALER asks the producer's ROUTER for a version.

Requests (JSON, signed when a key is configured):
  {"op": "open", "model", "version"}  -> {"status": "ok", "nbytes", "digest", "chunk_bytes"}
  {"op": "read", "model", "version", "offset", "length"} -> header frame + one data frame
  {"op": "blocks", "model", "version"} -> {"status": "ok", "nbytes", "digest"} + the block map
                                          (see _digest: what a delta is taken by)
  {"op": "latest", "model"}           -> {"status": "ok", "notice": <the latest notice>}
  {"op": "ipc", "model", "version"}   -> {"status": "ok", "nbytes", "ipc": <CUDA IPC description>,
                                          "lease", "lease_s"}   (the GPU tier, same host only)
  {"op": "release", "model", "lease"} -> {"status": "ok"}
  {"op": "report", "model", "version", "latency_s", "route"} -> no answer (see _reports)
  {"op": "ready", "model", "version", "replica"} -> no answer (a replica switching together is ready)
An evicted version is answered {"status": "gone", "tiers": [...]} naming where it still lives, a
refused request {"status": "error", "code", "reason"} (codes: see viper_lightning._errors).
The client keeps a small window of chunk reads in flight, receives each data frame straight
into its buffer (no intermediate copy) and digests it as it lands. A client whose buffer holds
another version of the same size asks for the block map first, checks it against the signed
digest, and reads only the blocks whose leaves differ, each checked against its leaf. A CUDA IPC lease keeps the
producer from reusing its device copy while the consumer copies from it; a consumer that never
releases loses the lease after `lease_s`, so a crashed consumer cannot pin the copy forever.

Every peer is untrusted: the server never blocks on a send (an answer to a peer that has gone,
or that stops reading, is dropped), a peer may have only a few chunk reads in flight, and a
chunk zeroMQ has not sent within `lease_s` gives its bytes back to the producer (the late
bytes then fail the peer's digest check). A slow or hostile peer costs only itself.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import zmq

from .._digest import (ALL_THREADS, BLOCK_BYTES, Digester, algorithm, block_count, changed_spans, digest_of_blocks,
                       leaf_bytes, leaf_of, mismatch)
from .._errors import ConfigurationError, IntegrityError, ProtocolError, TransferError
from ._loans import IpcLoan, Lender, MemoryLoan
from ._messages import count, load_object, raise_for_answer, refusal
from ._protocol import MAX_NOTICE_BYTES, check_proto, sign, signed_request, verify_mac
from ._reports import ReadyBoard, ReportBox, parse_ready, parse_report

__all__ = ["FetchServer", "FetchClient", "Fetched", "CHUNK_BYTES", "LEASE_S"]

log = logging.getLogger("viper_lightning.fetch")

CHUNK_BYTES = 8 * 1024 * 1024
WINDOW = 4  # chunk reads in flight: enough to keep loopback TCP busy, little memory in zmq
_POLL_MS = 50
LEASE_S = 30.0  # how long a CUDA IPC import may take before the producer reuses the copy
MAX_LEASES = 64
MAX_READS_PER_PEER = 2 * WINDOW  # chunk reads one peer may have queued and unsent
MAX_REQUEST_BYTES = 1 << 20  # the server socket's MAXMSGSIZE: requests are small
_FRAME_MARGIN = 1 << 16  # over the largest payload a frame carries: its JSON header


class FetchServer:
    """The producer's ROUTER, served by its own thread so big transfers never delay notices.

    It reads versions through `lender` (host memory for streamed reads, the GPU tier's copy for
    CUDA IPC leases) and answers "gone" with the tiers that still hold an evicted version."""

    def __init__(self, context: zmq.Context, endpoint: str, model: str, key: bytes | None, lender: Lender, *,
                 lease_s: float = LEASE_S, reports: ReportBox | None = None,
                 ready: ReadyBoard | None = None, producer: str | None = None) -> None:
        self._producer = producer  # named in the answers that vouch for bytes (see FetchClient)
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise ConfigurationError(f"cannot bind fetch endpoint {endpoint!r}: {exc.strerror}; pick a free "
                                     "port, or 'tcp://127.0.0.1:*' to let the system choose one") from None
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._model, self._key = model, key
        self._lender = lender
        self._reports = reports  # consumers' update reports go here (None: dropped)
        self._ready = ready  # replicas' ready reports (None: nobody switches together)
        # (peer, tracker, loan, deadline): chunks zmq is still sending, their bytes kept in place
        self._in_flight: list[tuple[bytes, zmq.MessageTracker, MemoryLoan, float]] = []
        self._lease_s = lease_s
        self._leases: dict[str, tuple[IpcLoan, float]] = {}  # lease -> (export, deadline)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"viper-fetch-{model}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._socket.close(0)
        for _, _, loan, _ in self._in_flight:
            loan.release()
        self._in_flight.clear()
        for export, _ in self._leases.values():
            export.release()
        self._leases.clear()

    @property
    def load(self) -> int:
        """Transfers in flight, reported to consumers so they can pick a less busy path."""
        return len(self._in_flight) + len(self._leases)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._socket.poll(_POLL_MS, zmq.POLLIN):
                    frames = self._socket.recv_multipart()
                    self._answer(frames[0], frames[-1])
                self._release_sent()
                self._expire_leases()
        except BaseException as exc:  # kept for the publisher to raise
            self.error = exc
            log.exception("fetch server of %r stopped", self._model)

    def _answer(self, peer: bytes, raw: bytes) -> None:
        try:
            request = _parse_request(raw, self._key, self._model)
            op = request.get("op")
            handler = {"open": self._open, "read": self._read, "blocks": self._blocks, "latest": self._latest,
                       "ipc": self._lend, "release": self._end_lease, "report": self._report,
                       "ready": self._replica_ready}.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError(f"unknown fetch op {op!r}")
            handler(peer, request)
        except zmq.ZMQError as exc:
            log.warning("fetch peer went away before its answer was sent: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a bad request is answered, never fatal to the server
            self._reply(peer, refusal(exc))

    def _open(self, peer: bytes, request: dict) -> None:
        loan = self._borrowed(peer, request)
        if loan is not None:
            try:
                # the digest vouches for every byte that follows
                self._reply(peer, self._vouching(request, loan, chunk_bytes=CHUNK_BYTES))
            finally:
                loan.release()

    def _blocks(self, peer: bytes, request: dict) -> None:
        """The version's block map, after a header like open's (signed: its digest vouches for
        the map, and the map for each block)."""
        loan = self._borrowed(peer, request)
        if loan is None:
            return
        try:
            if loan.blocks is None:
                raise ProtocolError("the producer keeps no block map of this version; fetch it whole",
                                    code="no-blocks")
            blocks = loan.blocks()
            answer = self._vouching(request, loan)
            self._socket.send_multipart([peer, json.dumps(answer).encode(), blocks], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("dropped a block map for a fetch peer that is gone or not reading: %s", exc)
        finally:
            loan.release()

    def _vouching(self, request: dict, loan: MemoryLoan, **fields: object) -> dict:
        """A signed answer that names this version, its producer run and the digest its bytes
        must match (open's, and the block map's header)."""
        return self._signed({"status": "ok", "model": self._model, "producer": self._producer,
                             "version": _count(request, "version"), "nbytes": loan.data.numel(),
                             "digest": loan.digest(), **fields})

    def _signed(self, answer: dict) -> dict:
        """With a key, the answer carries its MAC: it vouches for what the consumer reads next."""
        if self._key is not None:
            answer["mac"] = sign(answer, self._key)
        return answer

    def _read(self, peer: bytes, request: dict) -> None:
        offset, length = _count(request, "offset"), _count(request, "length")  # before borrowing anything
        if sum(1 for item in self._in_flight if item[0] == peer) >= MAX_READS_PER_PEER:
            raise TransferError(f"{MAX_READS_PER_PEER} chunk reads of this peer are still unsent; read the "
                                "answers before asking for more", code="busy")
        loan = self._borrowed(peer, request)
        if loan is None:
            return
        if offset + length > loan.data.numel() or length > CHUNK_BYTES:
            loan.release()
            raise ProtocolError(f"read of {length} bytes at {offset} is outside the version")
        chunk = memoryview(loan.data.numpy())[offset:offset + length]
        header = json.dumps({"status": "ok", "offset": offset}).encode()
        try:
            tracker = self._socket.send_multipart([peer, header, chunk], zmq.NOBLOCK, copy=False, track=True)
        except zmq.ZMQError as exc:  # gone, or not reading: its problem, not the server's
            loan.release()
            log.debug("dropped a chunk for a fetch peer that is gone or not reading: %s", exc)
            return
        except BaseException:
            loan.release()
            raise
        self._in_flight.append((peer, tracker, loan, time.monotonic() + self._lease_s))

    def _report(self, peer: bytes, request: dict) -> None:
        report = parse_report(request)  # a bad one is answered with the refusal
        if self._reports is not None:
            self._reports.add(report)

    def _replica_ready(self, peer: bytes, request: dict) -> None:
        version, replica = parse_ready(request)  # a bad one is answered with the refusal
        if self._ready is not None:
            self._ready.add(version, replica)

    def _latest(self, peer: bytes, request: dict) -> None:
        notice = self._lender.latest_notice()
        self._reply(peer, {"status": "ok", "notice": notice.decode() if notice else None})

    def _lend(self, peer: bytes, request: dict) -> None:
        """A same-host consumer maps the GPU tier's copy; it stays pinned until released or expired."""
        version = _count(request, "version")
        if not self._lender.lends_device_memory:
            raise ProtocolError("this producer lends no device memory: that needs a GPU tier on CUDA and an "
                                "hmac_key (an IPC mapping is writable); fetch the dram or pfs tier instead",
                                code="no-ipc")
        if len(self._leases) >= MAX_LEASES:
            raise TransferError(f"{MAX_LEASES} IPC leases are outstanding; retry once some are released", code="busy")
        export = self._lender.lend_ipc(version)
        if export is None:
            self._reply(peer, {"status": "gone", "version": version, "tiers": self._lender.tiers_of(version)})
            return
        lease = os.urandom(8).hex()
        self._leases[lease] = (export, time.monotonic() + self._lease_s)
        # the description says which memory to read
        self._reply(peer, self._signed({"status": "ok", "model": self._model, "producer": self._producer,
                                        "version": version, "nbytes": export.nbytes, "ipc": export.description,
                                        "lease": lease, "lease_s": self._lease_s}))

    def _end_lease(self, peer: bytes, request: dict) -> None:
        entry = self._leases.pop(str(request.get("lease")), None)
        if entry is not None:
            entry[0].release()
        self._reply(peer, {"status": "ok", "released": entry is not None})

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for lease in [lease for lease, (_, deadline) in self._leases.items() if deadline <= now]:
            export, _ = self._leases.pop(lease)
            log.warning("a CUDA IPC lease of %r was not released within %g s; the copy may be reused",
                        self._model, self._lease_s)
            export.release()

    def _borrowed(self, peer: bytes, request: dict) -> MemoryLoan | None:
        version = _count(request, "version")
        loan = self._lender.lend_memory(version)
        if loan is None:
            self._reply(peer, {"status": "gone", "version": version, "tiers": self._lender.tiers_of(version)})
        return loan

    def _reply(self, peer: bytes, answer: dict) -> None:
        """Send an answer without ever blocking: one to a peer that has gone or stopped reading is dropped."""
        try:
            self._socket.send_multipart([peer, json.dumps(answer).encode()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("dropped an answer to a fetch peer that is gone or not reading: %s", exc)

    def _release_sent(self) -> None:
        """Give back the bytes of chunks zmq has sent, and of those stuck past their deadline."""
        now, still = time.monotonic(), []
        for item in self._in_flight:
            _, tracker, loan, deadline = item
            if tracker.done or now > deadline:
                loan.release()
            else:
                still.append(item)
        self._in_flight = still


class Fetched(NamedTuple):
    """What a fetch brought: the digest verified, the seconds spent verifying, the bytes read
    from the producer, and the version's block map (for the next fetch's delta)."""

    digest: str
    digest_s: float
    moved_bytes: int
    blocks: bytes


class FetchClient:
    """One fetch from one producer endpoint (a DEALER created and closed per fetch).

    `producer`: the producer run the notice came from. An answer that vouches for bytes names
    its producer, signed, so an answer of another run of the same model (the same version
    number, replayed by whoever sits on the path, or a stale producer still bound there) is
    refused rather than taken for this run's."""

    def __init__(self, context: zmq.Context, endpoint: str, model: str, key: bytes | None,
                 timeout: float, *, producer: str | None = None) -> None:
        self._context, self._endpoint, self._model, self._key = context, endpoint, model, key
        self._producer = producer
        self._timeout_ms = int(timeout * 1000)

    def fetch_into(self, version: int, buffer: torch.Tensor, nbytes: int) -> tuple[str, float]:
        """Stream `version` into `buffer`, verifying its digest; returns (digest, digest seconds)."""
        fetched = self.fetch_changed_into(version, buffer, nbytes, None)
        return fetched.digest, fetched.digest_s

    def fetch_changed_into(self, version: int, buffer: torch.Tensor, nbytes: int, held: bytes | None) -> Fetched:
        """Make `buffer[:nbytes]` hold `version`, verified. `held`: the block map of the version
        the buffer holds now (verified when it was fetched): then only the blocks whose leaves
        differ are read, each checked against the version's block map, itself checked against
        the version's signed digest. Without one, or when the maps cannot be compared (another
        size), the whole version is streamed."""
        with self._dealer(block_count(nbytes) * leaf_bytes(self._key)) as socket:
            if held is None:
                return self._stream(socket, version, buffer, nbytes)
            try:
                answer, blocks = self._block_map(socket, version, nbytes)
            except TransferError as exc:  # no map of this version, or a server that has no "blocks"
                if exc.code not in ("no-blocks", "malformed"):
                    raise
                return self._stream(socket, version, buffer, nbytes)
            if len(held) != len(blocks):
                return self._stream(socket, version, buffer, nbytes)
            size = leaf_bytes(self._key)
            spans = [(start, end - start) for start, end in changed_spans(held, blocks, nbytes)]
            target = memoryview(buffer[:nbytes].numpy()).cast("B")
            checked_s = 0.0

            def landed(offset: int, length: int) -> None:
                nonlocal checked_s
                started = time.perf_counter()
                for start in range(offset, offset + length, BLOCK_BYTES):
                    index = start // BLOCK_BYTES
                    leaf = leaf_of(target[start:min(start + BLOCK_BYTES, nbytes)], self._key, threads=ALL_THREADS)
                    if leaf != blocks[index * size:(index + 1) * size]:
                        raise IntegrityError(f"version {version} from {self._endpoint}: block {index} does not "
                                             "match the version's block map; the bytes were damaged or replaced")
                checked_s += time.perf_counter() - started
            self._read_spans(socket, version, target, spans, landed)
            return Fetched(answer["digest"], checked_s, sum(length for _, length in spans), blocks)

    def _block_map(self, socket: zmq.Socket, version: int, nbytes: int) -> tuple[dict, bytes]:
        """The version's open answer and its block map, checked against the answer's digest."""
        answer = self._ask(socket, {"op": "blocks", "version": version})
        self._check_answer(answer, version, nbytes)
        ours = algorithm(self._key)
        if str(answer.get("digest")).partition(":")[0] != ours:  # another key setting: say so, not "size"
            raise IntegrityError(f"the block map of version {version} from {self._endpoint}: "
                                 f"{mismatch(answer.get('digest'), ours + ':')}")
        if not socket.getsockopt(zmq.RCVMORE):
            raise ProtocolError(f"{self._endpoint} answered the block map of version {version} without the map")
        blocks = self._recv(socket, "the block map")
        expected = block_count(nbytes) * leaf_bytes(self._key)
        if len(blocks) != expected:
            raise ProtocolError(f"{self._endpoint} sent a block map of {len(blocks)} bytes for version {version}; "
                                f"{nbytes} bytes take {expected}")
        why = mismatch(answer.get("digest"), digest_of_blocks(blocks, self._key))
        if why is not None:
            raise IntegrityError(f"the block map of version {version} from {self._endpoint}: {why}")
        return answer, blocks

    @contextmanager
    def borrow_device_copy(self, version: int, nbytes: int) -> Iterator[dict[str, object]]:
        """Lease the GPU tier's copy of `version`: yields its CUDA IPC description (import it
        once, copy, synchronise); the lease is released on exit."""
        with self._dealer() as socket:
            lent = self._ask(socket, {"op": "ipc", "version": version})
            self._check_answer(lent, version, nbytes)
            if not isinstance(lent.get("ipc"), dict) or not isinstance(lent.get("lease"), str):
                raise ProtocolError(f"{self._endpoint} answered the IPC request without a description and lease")
            try:
                yield lent["ipc"]
            except BaseException:
                self._release_lease(socket, version, lent["lease"])
                raise
            if not self._release_lease(socket, version, lent["lease"]):
                raise TransferError(f"the IPC lease of version {version} expired during the copy (after "
                                    f"{lent.get('lease_s')} s), so the producer may have reused the memory; "
                                    "the copy is discarded")

    def _release_lease(self, socket: zmq.Socket, version: int, lease: str) -> bool:
        """True if the lease was still ours when released."""
        try:
            return self._ask(socket, {"op": "release", "lease": lease}).get("released") is True
        except TransferError as exc:  # the lease then expires on its own
            log.warning("could not release the IPC lease of v%d: %s", version, exc)
            return False

    def _check_answer(self, answer: dict, version: int, nbytes: int) -> None:
        verify_mac(answer, self._key, f"fetch answer from {self._endpoint}")
        if answer.get("model") != self._model or answer.get("version") != version:
            raise ProtocolError(f"{self._endpoint} answered for {answer.get('model')!r} "
                                f"v{answer.get('version')}, not {self._model!r} v{version}")
        if self._producer is not None and answer.get("producer") != self._producer:
            raise ProtocolError(f"{self._endpoint} answered for producer {answer.get('producer')!r}, but the notice "
                                f"of version {version} came from {self._producer!r}: another run's answer "
                                "(replayed, or a stale producer at this address); refused")
        if answer.get("nbytes") != nbytes:
            raise IntegrityError(f"producer serves {answer.get('nbytes')} bytes for version {version}, "
                                 f"the notice announced {nbytes}")

    def latest_notice(self) -> bytes | None:
        with self._dealer() as socket:
            notice = self._ask(socket, {"op": "latest"}).get("notice")
            return notice.encode() if isinstance(notice, str) else None

    def _stream(self, socket: zmq.Socket, version: int, buffer: torch.Tensor, nbytes: int) -> Fetched:
        """The whole version, digested as it lands."""
        opened = self._ask(socket, {"op": "open", "version": version})
        self._check_answer(opened, version, nbytes)
        target = memoryview(buffer[:nbytes].numpy()).cast("B")
        digester, digest_s = Digester(self._key, threads=ALL_THREADS), 0.0

        def landed(offset: int, length: int) -> None:
            nonlocal digest_s
            started = time.perf_counter()
            digester.update(target[offset:offset + length])
            digest_s += time.perf_counter() - started
        self._read_spans(socket, version, target, [(0, nbytes)] if nbytes else [], landed)
        why = mismatch(opened["digest"], digester.hexdigest())
        if why is not None:
            raise IntegrityError(f"version {version} from {self._endpoint}: {why}")
        return Fetched(opened["digest"], digest_s, nbytes, digester.blocks())

    def _read_spans(self, socket: zmq.Socket, version: int, target: memoryview, spans: list[tuple[int, int]],
                    landed: Callable[[int, int], None]) -> None:
        """Read each (offset, length) span into `target` in chunks, WINDOW reads in flight, in
        order; `landed(offset, length)` runs on each chunk as it lands."""
        reads = [(offset + start, min(CHUNK_BYTES, length - start))
                 for offset, length in spans for start in range(0, length, CHUNK_BYTES)]
        sent = 0
        for received, (offset, length) in enumerate(reads):
            while sent < len(reads) and sent < received + WINDOW:
                self._send(socket, {"op": "read", "version": version, "offset": reads[sent][0],
                                    "length": reads[sent][1]})
                sent += 1
            self._receive_chunk(socket, target[offset:offset + length], offset, version)
            landed(offset, length)

    def _receive_chunk(self, socket: zmq.Socket, target: memoryview, offset: int, version: int) -> None:
        header = _load_answer(self._recv(socket, f"chunk at byte {offset}"), version)
        if header.get("offset") != offset or not socket.getsockopt(zmq.RCVMORE):
            raise ProtocolError(f"producer answered out of order at byte {offset}")
        got = socket.recv_into(target)
        if got != len(target):
            raise TransferError(f"chunk at byte {offset} of version {version} has {got} bytes, expected {len(target)}")

    def _dealer(self, largest: int = 0) -> zmq.Socket:
        """A socket of this fetch alone (use it in a with block: it is closed at the end). It takes
        no frame over a chunk, a notice, or `largest` (zmq holds a whole message before any
        check runs: a peer must not make this process hold more)."""
        socket = self._context.socket(zmq.DEALER)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, max(CHUNK_BYTES, MAX_NOTICE_BYTES, largest) + _FRAME_MARGIN)
            socket.connect(self._endpoint)
        except BaseException:
            socket.close(0)
            raise
        return socket

    def _ask(self, socket: zmq.Socket, request: dict) -> dict:
        self._send(socket, request)
        return _load_answer(self._recv(socket, request["op"]), request.get("version"))

    def _send(self, socket: zmq.Socket, request: dict) -> None:
        socket.send(signed_request(self._model, self._key, request))

    def _recv(self, socket: zmq.Socket, what: str) -> bytes:
        if not socket.poll(self._timeout_ms, zmq.POLLIN):
            raise TransferError(f"{self._endpoint} did not answer {what} within {self._timeout_ms / 1000:g} s "
                                "(producer gone or overloaded)")
        return socket.recv()


def _load_answer(raw: bytes, version: int | None) -> dict:
    answer = load_object(raw, "fetch answer", limit=None, invalid="is not JSON")
    raise_for_answer(answer, version, holder="the producer", refused="producer refused the fetch")
    return answer


def _parse_request(raw: bytes, key: bytes | None, model: str) -> dict:
    request = load_object(raw, "fetch request", limit=MAX_REQUEST_BYTES, invalid="is not JSON")
    check_proto(request, "fetch request")
    verify_mac(request, key, "fetch request")
    if request.get("model") != model:
        raise ProtocolError(f"this endpoint serves {model!r}, not {request.get('model')!r}")
    return request


def _count(request: dict, key: str) -> int:
    return count(request, key, "fetch request")
