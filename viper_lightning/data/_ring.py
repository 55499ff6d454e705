"""What the shared pipeline's loader and members agree on: the ring's and the socket's names in
the loader's private directory, each slot's header, and the messages between them.

Messages are JSON, encoded and read as every transport's are (transport._messages'
canonical_json and load_object), one per datagram of a Unix SOCK_SEQPACKET connection: the
kernel keeps their boundaries and order, says who is at the other end (SO_PEERCRED) and closes
the connection when that process is gone, and no helper thread stands between a sender and its
receiver.
"""

from __future__ import annotations

import socket
import struct

from .._errors import IntegrityError, ProtocolError
from ..transport._messages import load_object

RING = "ring"
SOCKET = "loader.sock"
HEADER_BYTES = 64  # each slot's sequence number (int64, little-endian), then its batch at this offset
MAX_MESSAGE_BYTES = 128 * 1024  # a batch's layout travels in its message (only when it changes)


def peer(connection: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix connection, as the kernel saw it
    connect (or listen)."""
    pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
    return pid, uid


def receive(connection: socket.socket, buffer: bytearray) -> dict | None:
    """The next message on a connection (None: the other end closed it). Raises BlockingIOError or
    TimeoutError as the socket's mode says, IntegrityError for a datagram that is too long or not
    one JSON object within the transports' limits (transport._messages.load_object)."""
    length = connection.recv_into(buffer, 0, socket.MSG_TRUNC)  # MSG_TRUNC: the datagram's whole length
    if length == 0:
        return None
    if length > len(buffer):
        raise IntegrityError(f"a message of {length} bytes, over the {len(buffer)}-byte limit")
    try:
        return load_object(bytes(buffer[:length]), "a message", limit=None)
    except ProtocolError as exc:
        raise IntegrityError(str(exc)) from None
