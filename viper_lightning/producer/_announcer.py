"""The announcer: the one thread that owns the notice socket (ZeroMQ sockets are not
thread-safe). It sends each version's notice, re-sends the newest to every new subscriber and
as a heartbeat, and never sends a version older than one already announced (consumers would
rightly refuse it). It also sends the switches of replicas that switch together (see
_switcher), repeating the newest with each heartbeat."""

from __future__ import annotations

import logging
import queue
import threading
import time

import zmq

from ..transport._pubsub import NoticeBroadcaster
from ._catalog import VersionCatalog
from ._health import Health
from ._notices import NoticeBoard

__all__ = ["Announcer"]

log = logging.getLogger("viper_lightning.publisher")

_POLL_S = 0.02  # how often the idle announcer looks for new subscribers
_STOP = object()
_SWITCH = "switch"


class Announcer:
    """Sends the notices `notices` builds (none for a version no tier holds any more), and tells
    `catalog` when a version's final notice is out."""

    def __init__(self, context: zmq.Context, endpoint: str, model: str, heartbeat_s: float,
                 notices: NoticeBoard, catalog: VersionCatalog, health: Health) -> None:
        self._model, self._heartbeat_s = model, heartbeat_s
        self._notices, self._catalog, self._health = notices, catalog, health
        self._inbox: queue.Queue[object] = queue.Queue()
        self._changed = threading.Condition()
        self._subscriptions = 0
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.endpoint = endpoint
        self._thread = threading.Thread(target=self._run, args=(context,), name=f"viper-announcer-{model}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def announce(self, version: int, final: bool) -> None:
        """Queue a notice; `final` marks the last notice a version gets (its tiers are settled)."""
        self._inbox.put((version, final))

    def switch(self, version: int) -> None:
        """Queue the switch to `version` for replicas that switch together."""
        self._inbox.put((version, _SWITCH))

    def wait_for_subscribers(self, count: int, timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._subscriptions >= count, timeout)

    def close(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join()

    def _run(self, context: zmq.Context) -> None:
        try:
            with NoticeBroadcaster(context, self.endpoint) as broadcaster:
                self.endpoint = broadcaster.endpoint
                self._ready.set()
                self._serve(broadcaster)
        except BaseException as exc:  # raised by the publisher on its caller's thread
            if not self._ready.is_set():
                self._startup_error = exc
            self._health.report("announcer", exc)
            log.error("announcer of %r failed: %s", self._model, exc)
        finally:
            self._ready.set()

    def _serve(self, broadcaster: NoticeBroadcaster) -> None:
        newest = 0
        switch: bytes | None = None  # the newest switch, repeated with the heartbeat
        last_sent = time.monotonic()
        while True:
            try:
                item = self._inbox.get(timeout=_POLL_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None and item[1] == _SWITCH:
                switch = self._notices.switch(item[0])
                broadcaster.send(self._model, switch)
            elif item is not None:
                version, final = item
                if version >= newest and self._send(broadcaster, version):
                    newest, last_sent = version, time.monotonic()
                if final:
                    self._catalog.finished(version)
            joined = self._count_subscriptions(broadcaster)
            if newest and (joined or time.monotonic() - last_sent >= self._heartbeat_s):
                self._send(broadcaster, newest)
                if switch is not None:
                    broadcaster.send(self._model, switch)
                last_sent = time.monotonic()

    def _send(self, broadcaster: NoticeBroadcaster, version: int) -> bool:
        payload = self._notices.encoded(version)
        if payload is not None:
            broadcaster.send(self._model, payload)
        return payload is not None

    def _count_subscriptions(self, broadcaster: NoticeBroadcaster) -> int:
        joined = broadcaster.new_subscriptions()
        if joined:
            with self._changed:
                self._subscriptions += joined
                self._changed.notify_all()
        return joined
