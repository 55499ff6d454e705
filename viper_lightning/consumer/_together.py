"""A replica that switches together with the others (opt-in, see the producer's _switcher).

The subscriber loads each version into its standby copy as usual, then, instead of swapping at
once, reports "ready" to the producer and keeps serving the previous version until the
producer's signed switch to this version arrives on the notice socket: every replica then
swaps within the notice's delivery time of the others. How each swap went is the update
record's `together`:
- "together": on the producer's switch, with the replicas that were ready;
- "left-out": the switch had gone (to this version or a newer one) before this replica was
  ready, so it swaps at once, alone (it reports ready all the same, so the producer waits for
  it at the next version: a replica that is always late delays every switch by the deadline);
- "alone": no switch came within `timeout` of being ready (the producer is gone or stalled).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from .._errors import ProtocolError
from ..transport._protocol import Notice, Switch

__all__ = ["TogetherSwitch", "DEFAULT_TOGETHER_TIMEOUT_S"]

log = logging.getLogger("viper_lightning.subscriber")

DEFAULT_TOGETHER_TIMEOUT_S = 60.0  # past the producer's own deadline (10 s) for a slow replica


class TogetherSwitch:
    """One replica's side: its name, the switches seen, the wait for its own."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name  # in ready reports
        self.timeout = timeout
        self._switched: dict[str, int] = {}  # producer id -> newest version it switched to

    def note(self, payload: bytes, key: bytes | None, model: str) -> None:
        """A switch message from the notice socket; a bad one is logged and ignored (the
        version it names, if real, is never served late for it: see `timeout`)."""
        try:
            switch = Switch.decode(payload, key)
        except ProtocolError as exc:
            log.warning("%s: ignored a switch: %s", model, exc)
            return
        if switch.model != model:
            log.warning("%s: ignored a switch for model %r", model, switch.model)
            return
        self._switched[switch.producer] = max(self._switched.get(switch.producer, 0), switch.version)

    def wait(self, notice: Notice, messages: Callable[[float], Iterator[bytes]], report_ready: Callable[[], None],
             stop: threading.Event, poll_s: float, key: bytes | None) -> str:
        """Until the switch to `notice`'s version (or a newer one) is seen; returns how the swap
        goes (see the module doc). `messages(timeout)` yields what arrives on the notice socket:
        notices met while waiting are dropped (the heartbeat repeats the newest)."""
        self._read(messages(0.0), key, notice.model)  # what came while this replica was loading
        report_ready()  # also when left out: the producer waits for this replica from the next version on
        if self._switched.get(notice.producer, 0) >= notice.version:
            return "left-out"
        deadline = time.monotonic() + self.timeout
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self._read(messages(min(poll_s, left)), key, notice.model)
            switched = self._switched.get(notice.producer, 0)
            if switched >= notice.version:
                return "together" if switched == notice.version else "left-out"
        return "alone"

    def _read(self, payloads: Iterator[bytes], key: bytes | None, model: str) -> None:
        for payload in payloads:
            if Switch.announced_by(payload):
                self.note(payload, key, model)
