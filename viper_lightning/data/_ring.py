"""What the shared pipeline's loader and members agree on: the ring's and the socket's names in
the loader's private directory, each slot's header, and the messages between them.

Messages are JSON, one per datagram of a Unix SOCK_SEQPACKET connection: the kernel keeps their
boundaries and order, says who is at the other end (SO_PEERCRED) and closes the connection when
that process is gone, and no helper thread stands between a sender and its receiver.
"""

from __future__ import annotations

import json
import socket
import struct

from .._errors import IntegrityError

RING = "ring"
SOCKET = "loader.sock"
HEADER_BYTES = 64  # each slot's sequence number (int64, little-endian), then its batch at this offset
MAX_MESSAGE_BYTES = 128 * 1024  # a batch's layout travels in its message (only when it changes)


def count(value: object) -> bool:
    """A non-negative int (not a bool): what every number in a message must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def peer(connection: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix connection, as the kernel saw it
    connect (or listen)."""
    pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
    return pid, uid


def encode(message: dict[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def receive(connection: socket.socket, buffer: bytearray) -> dict | None:
    """The next message on a connection (None: the other end closed it). Raises BlockingIOError or
    TimeoutError as the socket's mode says, IntegrityError for a datagram that is too long or not
    a JSON object."""
    length = connection.recv_into(buffer, 0, socket.MSG_TRUNC)  # MSG_TRUNC: the datagram's whole length
    if length == 0:
        return None
    if length > len(buffer):
        raise IntegrityError(f"a message of {length} bytes, over the {len(buffer)}-byte limit")
    try:
        message = json.loads(bytes(buffer[:length]))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's depth
        raise IntegrityError(f"a message that is not JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise IntegrityError("a message that is not a JSON object")
    return message
