"""ZeroMQ sockets for notices. Each socket is owned by exactly one thread (ZeroMQ sockets are
not thread-safe), closed with linger=0 so shutdown never blocks on unsent notices."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import zmq

from .._errors import ConfigurationError
from ._protocol import MAX_NOTICE_BYTES

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = ["NoticeBroadcaster", "NoticeListener"]

log = logging.getLogger("viper_lightning.publisher")

# Notices are small; a deep queue keeps a burst of publishes from being dropped silently.
NOTICE_HWM = 1_000
# A subscriber needs only the newest notice (heartbeats repeat it), and each queued frame can
# inflate to MAX_NOTICE_BYTES: a short queue bounds what a hostile publisher can make it hold.
LISTEN_HWM = 16
# A frame over this makes libzmq drop the subscriber's connection for good, so the producer
# never sends one; big models' notices (their layouts grow with the tensor count) are compressed.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
COMPRESS_ABOVE = 1 << 20
COMPRESSED = b"Z"  # first byte of a compressed notice (a JSON notice starts with "{")


class _OwnedSocket:
    """One ZeroMQ socket, closed at once (linger 0) by close() or at the end of a with block."""

    _socket: zmq.Socket

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NoticeBroadcaster(_OwnedSocket):
    """The producer's XPUB socket. XPUB (not PUB) reports every subscription, so a late joiner
    can be sent the latest notice the moment it subscribes instead of waiting for the next one."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self._socket = context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, NOTICE_HWM)
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # report repeated subscriptions too
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise ConfigurationError(
                f"cannot bind notice endpoint {endpoint!r}: {exc.strerror}; pick a free port, "
                "or 'tcp://127.0.0.1:*' to let the system choose one") from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._compressed: tuple[bytes | None, bytes] = (None, b"")

    def send(self, topic: str, payload: bytes) -> bool:
        """Send one notice (compressed when large); False, logged, when it cannot be sent at all."""
        frame = self._frame(payload) if len(payload) <= MAX_NOTICE_BYTES else b""
        if not frame or len(frame) > MAX_MESSAGE_BYTES:
            log.error("a notice of %d bytes is over what subscribers accept (%d bytes, %d on the wire); not "
                      "sent: consumers cannot follow this model until its layout is smaller (fewer tensors)",
                      len(payload), MAX_NOTICE_BYTES, MAX_MESSAGE_BYTES)
            return False
        self._socket.send_multipart([topic.encode(), frame], copy=False)
        return True

    def _frame(self, payload: bytes) -> bytes:
        if len(payload) <= COMPRESS_ABOVE:
            return payload
        if self._compressed[0] is not payload:  # heartbeats repeat the same notice: compress it once
            self._compressed = (payload, COMPRESSED + zlib.compress(payload, 1))
        return self._compressed[1]

    def new_subscriptions(self) -> int:
        """Drain subscription messages without blocking; returns how many subscribed."""
        joined = 0
        while self._socket.poll(0, zmq.POLLIN):
            message = self._socket.recv()
            joined += message[:1] == b"\x01"
        return joined


class NoticeListener(_OwnedSocket):
    """A consumer's SUB socket, filtered to one model's topic."""

    def __init__(self, context: zmq.Context, endpoint: str, topic: str) -> None:
        self._topic = topic.encode()
        self.idle = False  # whether the last `receive` waited its whole timeout for nothing
        self._socket = context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, LISTEN_HWM)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a hostile peer cannot exhaust memory
        self._socket.setsockopt(zmq.SUBSCRIBE, self._topic)
        try:
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise ConfigurationError(f"cannot connect to notice endpoint {endpoint!r}: {exc.strerror}") from None

    def receive(self, timeout_s: float) -> Iterator[bytes]:
        """Yield every payload waiting for this topic, after waiting up to `timeout_s` for the
        first; one at a time, so a burst is never held in memory at once.

        Topic filtering in ZeroMQ is by prefix ('nt3' also matches 'nt3-large'), so the topic
        frame is compared exactly here. A message of the wrong shape is yielded as empty bytes,
        for the caller to refuse with a logged reason."""
        self.idle = False
        timeout_ms = max(0, int(timeout_s * 1000))
        while self._socket.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            frames = self._socket.recv_multipart()
            if frames[0] == self._topic:
                yield _notice_bytes(frames[1]) if len(frames) == 2 else b""
        self.idle = timeout_ms > 0  # the whole wait passed without a message


def _notice_bytes(frame: bytes) -> bytes:
    """A notice frame as JSON bytes: decompressed, within MAX_NOTICE_BYTES, when compressed; empty
    bytes (refused by the caller) when it does not decompress within that bound."""
    if not frame.startswith(COMPRESSED):
        return frame
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(frame[1:], MAX_NOTICE_BYTES)
    except zlib.error:
        return b""
    return b"" if inflater.unconsumed_tail or not inflater.eof else data
