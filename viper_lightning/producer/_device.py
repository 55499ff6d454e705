"""DeviceTier: the GPU tier, a device-resident copy of the latest version.

The snapshot into device memory is a device-to-device copy on a side stream: the training
stream waits on the copy's event on the GPU, so the host (and with it the training loop) does
not wait at all; the copy down to host memory (the DRAM tier) happens later, off the training
thread (see Demoter). Consumers read the copy with CUDA IPC on this host and with NCCL
point-to-point from other hosts.

`device="cpu"` runs the same tier in host memory. It needs no GPU and is served over Gloo,
which is how CI exercises the tier, the publish cascade (device, then DRAM, then file system)
and the cross-host path; only the stream handling differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .._errors import ConfigurationError, TransferError
from .._layout import Layout
from ._snapshot import fill_buffer

__all__ = ["DeviceTier", "DeviceCopy", "check_device"]

# The latest (served, or being copied down to DRAM) and the one being written; a third only
# while a transfer still reads an older copy.
MAX_COPIES = 3


@dataclass(eq=False)
class DeviceCopy:
    """One device buffer and the version it holds; `pins` count the readers of its bytes."""

    buffer: torch.Tensor
    layout: Layout | None = None
    version: int = 0
    event: object | None = None  # torch.cuda.Event recorded after the copy; None on CPU
    pins: int = 0
    _digest: str | None = None
    _failure: str | None = None
    _digested: threading.Event = field(default_factory=threading.Event)

    @property
    def data(self) -> torch.Tensor:
        return self.buffer[: self.layout.nbytes]

    def wait(self) -> None:
        """Block until the copy's bytes are written (a no-op on CPU)."""
        if self.event is not None:
            self.event.synchronize()

    def set_digest(self, digest: str | None, failure: str | None = None) -> None:
        """Called once the DRAM copy is made: its digest vouches for these bytes too."""
        self._digest, self._failure = digest, failure
        self._digested.set()

    def digest(self, timeout: float = 30.0) -> str:
        """The version's digest, computed from its DRAM copy (xxh3 runs on the host)."""
        if not self._digested.wait(timeout):
            raise TransferError(f"version {self.version}: its host copy was not digested within {timeout:g} s")
        if self._digest is None:
            raise TransferError(f"version {self.version}: no digest ({self._failure or 'the host copy failed'})")
        return self._digest


class DeviceTier:
    """The device copies of one model: the latest version stays, older ones are reused."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = check_device(device)
        self._copies: list[DeviceCopy] = []
        self._latest: DeviceCopy | None = None
        self._changed = threading.Condition()
        self._stream: object | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def capture(self, layout: Layout, state_dict: Mapping[str, torch.Tensor],
                timeout: float | None = None) -> DeviceCopy:
        """Copy a state_dict into a free device copy; on CUDA the host does not wait for the copy."""
        copy = self._acquire(layout.nbytes, timeout)
        copy.layout, copy.version, copy.event = layout, 0, None
        copy._digested = threading.Event()
        try:
            if self.on_gpu:
                copy.event = self._copy_on_side_stream(layout, state_dict, copy.buffer)
            else:
                fill_buffer(layout, state_dict, copy.buffer)
        except BaseException:
            self.release(copy)
            raise
        return copy

    def commit(self, version: int, copy: DeviceCopy) -> None:
        """`copy` now holds `version` and replaces the latest (which stays readable while pinned)."""
        with self._changed:
            copy.version = version
            copy.pins -= 1  # the capture's own hold
            self._latest = copy
            self._changed.notify_all()

    def pin(self, version: int) -> DeviceCopy | None:
        """Hold the copy of `version` while it is read; None unless it is the latest."""
        with self._changed:
            copy = self._latest
            if copy is None or copy.version != version:
                return None
            copy.pins += 1
            return copy

    def hold(self, copy: DeviceCopy) -> Callable[[], None]:
        """One more reader of a copy the caller already holds, for another thread to keep;
        returns the release, which does nothing when called again."""
        with self._changed:
            copy.pins += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self.release(copy)

        return release

    def release(self, copy: DeviceCopy) -> None:
        with self._changed:
            copy.pins -= 1
            self._changed.notify_all()

    def holds(self, version: int) -> bool:
        with self._changed:
            return self._latest is not None and self._latest.version == version

    def close(self) -> None:
        with self._changed:
            self._latest = None
            self._copies.clear()

    def _acquire(self, nbytes: int, timeout: float | None) -> DeviceCopy:
        """A copy that is neither the latest nor read by anyone (waits for one at most `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                free = next((c for c in self._copies if c is not self._latest and c.pins == 0), None)
                if free is not None and free.buffer.numel() < nbytes:  # the model grew
                    self._copies.remove(free)
                    free = None
                    continue
                if free is None and len(self._copies) < MAX_COPIES:
                    free = DeviceCopy(torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device))
                    self._copies.append(free)
                if free is not None:
                    free.pins = 1  # held by the capture until commit() or release()
                    return free
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransferError(f"no free {self.device} copy within {timeout} s: the host copies "
                                        "and transfers of earlier versions still read them")
                self._changed.wait(remaining)

    def _copy_on_side_stream(self, layout: Layout, state_dict: Mapping[str, torch.Tensor],
                             buffer: torch.Tensor) -> object:
        """Copy on a side stream that starts after the training stream's pending work (the
        weights as of now); the training stream then waits for the copy's event before it may
        change the weights again. Neither wait blocks the host."""
        training = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(training)
        with torch.cuda.stream(self._stream):
            fill_buffer(layout, state_dict, buffer)
            event = torch.cuda.Event()
            event.record(self._stream)
        training.wait_event(event)
        return event


def check_device(device: object) -> torch.device:
    """The GPU tier's device: 'cuda', 'cuda:N', or 'cpu' (the host-memory stand-in)."""
    try:
        parsed = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cuda", "cpu"):
        raise ConfigurationError(f"gpu_device={device!r}: use 'cuda', 'cuda:N', 'cpu' (the tier in host "
                                 "memory, for testing without a GPU), or None for no GPU tier")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"gpu_device={device!r} but this process sees no CUDA device; set "
                                 "gpu_device=None (the DRAM tier still serves) or run on a GPU node")
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed
