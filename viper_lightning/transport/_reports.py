"""Consumers' reports back to the producer: how long each update took them to serve.

A subscriber sends one `{"op": "report", "model", "version", "latency_s", "route"}` to the
producer's fetch endpoint after each update it applies (signed like every fetch request when
keyed; a one-way message, never answered, so a consumer never waits on it). The fetch server
keeps the newest few in a `ReportBox`, and the training side takes them: an adaptive schedule
then plans with the load time its consumers really see instead of a configured guess.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from .._errors import ProtocolError
from ._messages import count
from ._protocol import consumer_name, signed_request

__all__ = ["ConsumerReport", "ReportBox", "ReportSender", "ReadyBoard", "parse_report", "parse_ready", "send_report",
           "MAX_LATENCY_S"]

log = logging.getLogger("viper_lightning.subscriber")

MAX_LATENCY_S = 24 * 3600.0  # a report beyond a day is not a load time
LINGER_MS = 200  # how long a closed reporting socket may still try to deliver its report
REPORT_HWM = 16  # reports queued for a producer that is not reading; beyond, they are dropped
_ROUTE = re.compile(r"[a-z][a-z0-9-]{0,31}")
READY_VERSIONS = 8  # versions whose ready replicas are kept (older ones are never switched to)


@dataclass(frozen=True)
class ConsumerReport:
    """One applied update: its version, publish-to-serving seconds, and the route it came by."""

    version: int
    latency_s: float
    route: str


def send_report(context: zmq.Context, endpoint: str, model: str, key: bytes | None, report: ConsumerReport) -> None:
    """Send `report` to the producer's fetch endpoint, signed with `key`, on a socket of its own.
    One-way and non-blocking: a producer that is gone or slow costs the consumer nothing."""
    sender = ReportSender(context)
    try:
        sender.send(endpoint, model, key, report)
    finally:
        sender.close()


class ReportSender:
    """A subscriber's reports, on one DEALER socket per producer endpoint kept open across
    updates: a socket per report would cost a TCP connection on both ends every update, inside
    the moment when every worker on the host is updating. Owned by one thread (the
    subscriber's); one-way and non-blocking, a report that cannot go at once is dropped."""

    MAX_ENDPOINTS = 4  # producers reported to recently; older sockets are closed

    def __init__(self, context: zmq.Context) -> None:
        self._context = context
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()

    def send(self, endpoint: str, model: str, key: bytes | None, report: ConsumerReport) -> None:
        self._send(endpoint, model, key, report.version, {"op": "report", "version": report.version,
                                                          "latency_s": report.latency_s, "route": report.route})

    def ready(self, endpoint: str, model: str, key: bytes | None, version: int, replica: str) -> None:
        """A replica that switches together has `version` loaded and waits for the switch."""
        self._send(endpoint, model, key, version, {"op": "ready", "version": version, "replica": replica})

    def _send(self, endpoint: str, model: str, key: bytes | None, version: int, fields: dict) -> None:
        request = signed_request(model, key, fields)
        try:
            socket = self._socket(endpoint)
            while socket.poll(0, zmq.POLLIN):  # a producer's refusals: nothing waits for them
                socket.recv(zmq.NOBLOCK)
            socket.send(request, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("could not report %s v%d to %s: %s", model, version, endpoint, exc)

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close()
        self._sockets.clear()

    def _socket(self, endpoint: str) -> zmq.Socket:
        socket = self._sockets.get(endpoint)
        if socket is not None:
            self._sockets.move_to_end(endpoint)
            return socket
        socket = self._context.socket(zmq.DEALER)
        try:
            socket.setsockopt(zmq.LINGER, LINGER_MS)
            socket.setsockopt(zmq.SNDHWM, REPORT_HWM)
            socket.connect(endpoint)
        except zmq.ZMQError:
            socket.close()
            raise
        self._sockets[endpoint] = socket
        while len(self._sockets) > self.MAX_ENDPOINTS:
            self._sockets.popitem(last=False)[1].close()
        return socket


def parse_report(request: dict) -> ConsumerReport:
    """The report a (verified) request carries; bad fields raise ProtocolError naming them."""
    latency = request.get("latency_s")
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not (
            math.isfinite(latency) and 0 <= latency <= MAX_LATENCY_S):
        raise ProtocolError(f"report field 'latency_s' must be seconds in [0, {MAX_LATENCY_S:g}], got {latency!r:.40}")
    route = request.get("route")
    if not isinstance(route, str) or not _ROUTE.fullmatch(route):
        raise ProtocolError(f"report field 'route' must be a route name, got {route!r:.40}")
    return ConsumerReport(count(request, "version", "report"), float(latency), route)


class ReportBox:
    """The newest `capacity` reports; the fetch server adds, the training side takes (thread-safe).

    A report seen before is dropped: two consumers never measure the same latency to the
    nanosecond, so a repeat is a replay (a signed report captured and sent again), which must
    not be able to outvote the consumers' real load times."""

    def __init__(self, capacity: int = 256) -> None:
        self._reports: deque[ConsumerReport] = deque(maxlen=capacity)
        self._seen: OrderedDict[ConsumerReport, None] = OrderedDict()
        self._remember = 4 * capacity
        self._lock = threading.Lock()

    def add(self, report: ConsumerReport) -> bool:
        """Keep `report`; False (dropped) when the same report came before."""
        with self._lock:
            if report in self._seen:
                return False
            self._seen[report] = None
            while len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            self._reports.append(report)
            return True

    def take(self) -> list[ConsumerReport]:
        """Every report since the last take, oldest first."""
        with self._lock:
            taken = list(self._reports)
            self._reports.clear()
        return taken


def parse_ready(request: dict) -> tuple[int, str]:
    """(version, replica) of a (verified) ready report; bad fields raise ProtocolError naming them."""
    replica = consumer_name(request, "replica", "ready", required=True)
    return count(request, "version", "ready", minimum=1), replica


class ReadyBoard:
    """Which replicas that switch together have which version loaded: the fetch server adds,
    the switcher waits (thread-safe). Only the newest READY_VERSIONS versions are kept."""

    def __init__(self) -> None:
        self._ready: dict[int, set[str]] = {}
        self._changed = threading.Condition()

    def add(self, version: int, replica: str) -> None:
        with self._changed:
            if self._ready and version < min(self._ready) and len(self._ready) >= READY_VERSIONS:
                return  # too old to be switched to
            self._ready.setdefault(version, set()).add(replica)
            while len(self._ready) > READY_VERSIONS:
                del self._ready[min(self._ready)]
            self._changed.notify_all()

    def wait(self, version: int, enough: Callable[[frozenset[str]], bool], timeout: float) -> frozenset[str]:
        """The replicas ready with `version` once `enough` of them are, or when `timeout` ends."""
        with self._changed:
            self._changed.wait_for(lambda: enough(self.ready_with(version)), max(0.0, timeout))
            return self.ready_with(version)

    def wake(self) -> None:
        """Have every wait check its condition again now (e.g. its owner is closing)."""
        with self._changed:
            self._changed.notify_all()

    def ready_with(self, version: int) -> frozenset[str]:
        with self._changed:
            return frozenset(self._ready.get(version, ()))
