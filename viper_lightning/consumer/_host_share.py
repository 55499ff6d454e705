"""HostShare: one copy per host of each version that comes over the network (DESIGN §3).

Several consumers on one host (TorchServe workers, replicas) that each fetched a remote version
would draw it over the host's link once per consumer, and hold a copy each. Instead the first
to claim a version fetches it into a shared-memory segment of its own (`viper.MODEL~host.TAG.V`,
0600, as the producer's segments are: '~' cannot appear in a model name, so no other model's
segment has these names); the others wait for it and map it, exactly as they map a same-host
producer's segment on the "dram-shm" route.

Claiming is linking a new, locked file to the copy's name (so the name never shows an unlocked
file being made): the winner holds it exclusively locked while it fetches, and publishes it
READY once the bytes arrived and their digest checked out. A consumer
that finds the file waits on that lock (a blocking flock on a helper thread, bounded by its
`wait_s`), so it wakes when the fetch ends. When the fetch failed, or its consumer died (the
kernel drops a dead process's lock), or the file is another user's, the waiter fetches the
version itself: sharing saves the host's link, it never makes a version unreachable.

A copy is removed once nobody serves from it: zero-copy consumers hold a shared lock on it for
as long as they serve from it, so a consumer that finds the exclusive lock free can unlink it
(those still mapping it keep their pages). Idle consumers remove the older ones so freed
(keeping one for the next version to rewrite), and the last consumer of the model on the host
removes what is left when it closes, or finds left over when it starts.

Every file here is opened without following links or blocking (a FIFO planted under one of
these names by another user would otherwise hang the opener) and used only if it is a regular
file of this user's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time

from .._errors import ConfigurationError, TransferError
from ..storage._shm import HEADER, READY, SHM_DIR, Segment, open_ours, read_header
from ..transport._protocol import Location, Notice

__all__ = ["HostShare", "Lead"]

log = logging.getLogger("viper_lightning.subscriber")
_serial = itertools.count()  # temporary names of claims in this process
_STOP_CHECK_S = 0.1  # how often a wait for another consumer's fetch checks that the subscriber is not closing


class Lead:
    """This consumer's claim on a version: fetch into `buffer`, then `publish()`; a lead left
    unpublished (`abandon()`, or leaving the `with` block) is removed, so waiters fetch it
    themselves."""

    def __init__(self, segment: Segment, notice: Notice, host: str) -> None:
        self._segment, self._version, self._nbytes = segment, notice.version, notice.nbytes
        self.buffer = segment.buffer[:notice.nbytes]
        self.location = Location("dram", host, f"shm://{segment.name}")
        self.published = False

    def publish(self) -> None:
        """The bytes are in and verified: mark the copy READY and let the waiters map it."""
        self.buffer = None
        self._segment.publish(self._version, self._nbytes, self._segment.name)
        self._segment.close()
        self.published = True

    def abandon(self) -> None:
        if not self.published:
            self.buffer = None
            self._segment.unlink()

    def __enter__(self) -> Lead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abandon()


class HostShare:
    """The host copies of `model` for one consumer on `host` (see the module docstring).

    Between `join()` and `leave()` the consumer is listed on the host (a file it holds locked,
    which the kernel unlocks if it dies): a consumer alone on its host makes no copy to share
    and fetches as it would without sharing, into memory of its own."""

    def __init__(self, model: str, host: str, wait_s: float, stop: threading.Event) -> None:
        self._prefix = f"viper.{model}~host."
        self._copy_name = re.compile(re.escape(self._prefix) + r"[0-9a-f]{16}\.([0-9]+)")
        self._host, self._wait_s, self._stop = host, wait_s, stop
        self._membership: int | None = None  # the descriptor of this consumer's listing, locked
        self._member_path = ""

    def join(self) -> None:
        """List this consumer (locked before its name appears, so nobody takes it for a dead
        one's); the first consumer of the model here removes what earlier ones left."""
        if self.alone():
            self.remove_unused()
        serial = f"{os.getpid()}.{next(_serial)}"
        temporary = os.path.join(SHM_DIR, f"{self._prefix}new.{serial}")
        fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._member_path = os.path.join(SHM_DIR, f"{self._prefix}member.{serial}")
            os.rename(temporary, self._member_path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._membership = fd

    def leave(self) -> None:
        """Unlist this consumer; the last one here removes the copies nobody serves from."""
        if self._membership is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._member_path)
        os.close(self._membership)
        self._membership = None
        if self.alone():
            self.remove_unused()

    def alone(self) -> bool:
        """Whether no other consumer of the model is listed on this host (listings their dead
        consumers left are removed on the way)."""
        for name in self._names():
            path = os.path.join(SHM_DIR, name)
            if not name.startswith(f"{self._prefix}member.") or path == self._member_path:
                continue
            fd = open_ours(path)
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                os.unlink(path)  # nobody holds it: its consumer is gone
            except BlockingIOError:
                return False
            except OSError:
                pass
            finally:
                os.close(fd)
        return True

    def name(self, notice: Notice) -> str:
        """A copy's name: the version, and a tag of its producer and layout, so that a copy made
        for another producer's (or another model shape's) version of the same number is never
        taken for it."""
        described = json.dumps([notice.producer, notice.layout.to_json()], sort_keys=True).encode()
        tag = hashlib.blake2b(described, digest_size=8).hexdigest()
        return f"{self._prefix}{tag}.{notice.version}"

    def claim(self, notice: Notice) -> Lead | Location | None:
        """A Lead when this consumer is the first on the host to want `notice`'s version; the
        location of the copy when another consumer has it (waiting up to `wait_s` for its fetch
        to end); None when there is no usable copy to wait for (the reason is logged). A lead
        rewrites an older copy that nobody serves from any more, when there is one: its pages
        (and the page tables of the consumers that mapped it) are already in place."""
        name = self.name(notice)
        try:
            if not os.path.lexists(os.path.join(SHM_DIR, name)):  # else: no need to allocate to find out
                if self.alone():
                    return None
                temporary = f"{self._prefix}new.{os.getpid()}.{next(_serial)}"
                segment = Segment.claimed(name, notice.nbytes, temporary, self._older(notice.version))
                return Lead(segment, notice, self._host)
        except FileExistsError:  # another consumer claimed it first
            pass
        except (ConfigurationError, OSError) as exc:  # e.g. /dev/shm full: fetch privately, as without sharing
            log.warning("%s v%d: cannot make a host copy to share (%s); fetching it for this consumer alone",
                        notice.model, notice.version, exc)
            return None
        try:
            return self._await_copy(name, notice)
        except (TransferError, OSError) as exc:
            log.warning("%s v%d: not using the host copy %s: %s", notice.model, notice.version, name, exc)
            return None

    def _await_copy(self, name: str, notice: Notice) -> Location | None:
        fd = open_ours(os.path.join(SHM_DIR, name))
        if fd is None:  # gone (its fetch failed and it was removed just now), or not ours
            return None
        try:
            if not _unlocked_within(fd, self._wait_s, self._stop):
                raise TransferError(f"the consumer fetching it did not finish within {self._wait_s:g} s")
            raw = os.pread(fd, HEADER.size, 0)
        finally:
            os.close(fd)
        try:
            header = read_header(raw, name) if len(raw) == HEADER.size else None
        except TransferError:  # not a segment (bad magic)
            header = None
        if header is None or (header.state, header.version, header.nbytes) != (READY, notice.version, notice.nbytes):
            return None  # its fetch failed (or it is not a copy of this version): fetch it here
        return Location("dram", self._host, f"shm://{name}")

    def remove_unused(self, below: int | None = None) -> None:
        """Unlink this model's host copies (of versions below `below`, or all) that nobody
        serves from; a copy being fetched or served stays. Those of the two versions before
        `below` stay too, for a later lead to rewrite (see `claim`)."""
        copies = self._copies()
        if below is not None:
            kept = sorted({version for version, _ in copies if 0 < version < below})[-2:]
            copies = [(version, path) for version, path in copies if version < below and version not in kept]
        for _, path in copies:
            _unlink_if_unused(path)

    def _older(self, version: int) -> list[str]:
        """The copies of versions before `version`, oldest first."""
        return [path for copy_version, path in sorted(self._copies()) if copy_version < version]

    def _names(self) -> list[str]:
        try:
            return [name for name in os.listdir(SHM_DIR) if name.startswith(self._prefix)]
        except OSError:
            return []

    def _copies(self) -> list[tuple[int, str]]:
        """(version, path) of this model's host copies; a claim that died before it linked its
        copy counts as version 0."""
        found = []
        for name in self._names():
            if name.startswith(f"{self._prefix}new."):
                found.append((0, os.path.join(SHM_DIR, name)))
            elif match := self._copy_name.fullmatch(name):
                found.append((int(match.group(1)), os.path.join(SHM_DIR, name)))
        return found


def _unlocked_within(fd: int, wait_s: float, stop: threading.Event) -> bool:
    """Whether the exclusive lock on `fd`'s file (held while its copy is fetched) is let go
    within `wait_s` (or before `stop` is set): a shared lock taken on a helper thread, through
    a separate open file description, so a wait that ends first leaves nothing locked once
    that thread gets the lock (it ends with the lock's holder)."""
    separate = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    unlocked = threading.Event()

    def take() -> None:
        try:
            fcntl.flock(separate, fcntl.LOCK_SH)
            unlocked.set()
        finally:
            os.close(separate)

    try:
        threading.Thread(target=take, name="viper-host-copy-wait", daemon=True).start()
    except BaseException:
        os.close(separate)
        raise
    deadline = time.monotonic() + wait_s
    while not unlocked.wait(min(_STOP_CHECK_S, max(0.0, deadline - time.monotonic()))):
        if stop.is_set() or time.monotonic() >= deadline:
            return False
    return True


def _unlink_if_unused(path: str) -> None:
    """Unlink a copy that nobody holds (a lead holds its copy while it fetches, and zero-copy
    consumers while they serve from it; an unlocked copy is finished or abandoned)."""
    fd = open_ours(path)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:  # held (BlockingIOError), or already gone
        pass
    finally:
        os.close(fd)
