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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .._errors import ConfigurationError, TransferError
from .._buffers import allocate_buffer, copy_tensor
from .._layout import Layout
from ._snapshot import fill_buffer

__all__ = ["DeviceTier", "DeviceCopy", "check_device", "parse_device"]

# The latest (served, or being copied down to DRAM) and the one being written; a third only
# while a transfer still reads an older copy.
MAX_COPIES = 3


@dataclass(eq=False)
class DeviceCopy:
    """One device buffer and the version it holds; `borrowers` count the readers of its bytes."""

    buffer: torch.Tensor
    layout: Layout | None = None
    version: int = 0
    event: object | None = None  # torch.cuda.Event recorded after the copy; None on CPU
    borrowers: int = 0

    @property
    def data(self) -> torch.Tensor:
        return self.buffer[: self.layout.nbytes]

    def wait(self) -> None:
        """Block until the copy's bytes are written (a no-op on CPU)."""
        if self.event is not None:
            self.event.synchronize()


class DeviceTier:
    """The device copies of one model: the latest version stays, older ones are reused."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = check_device(device)
        self._copies: list[DeviceCopy] = []
        self._latest: DeviceCopy | None = None
        self._changed = threading.Condition()
        self._streams: dict[str, object] = {}

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def capture(self, layout: Layout, state_dict: Mapping[str, torch.Tensor],
                timeout: float | None = None) -> DeviceCopy:
        """Copy a state_dict into a free device copy; on CUDA the host does not wait for the copy."""
        copy = self._acquire(layout.nbytes, timeout)
        copy.layout, copy.version, copy.event = layout, 0, None
        try:
            if self.on_gpu:
                copy.event = self._copy_on_side_stream(layout, state_dict, copy.buffer)
            else:
                fill_buffer(layout, state_dict, copy.buffer)
        except BaseException:
            self.give_back(copy)
            raise
        return copy

    def download(self, copy: DeviceCopy, target: torch.Tensor) -> None:
        """Copy a device copy into host memory, on a stream of its own: on the default stream
        the copy would queue behind the training kernels, and they behind it."""
        if not self.on_gpu:
            copy_tensor(target, copy.data)
            return
        stream = self._stream("download")
        with torch.cuda.stream(stream):
            stream.wait_event(copy.event)
            target.copy_(copy.data)
        stream.synchronize()

    def stream_context(self) -> AbstractContextManager:
        """Run CUDA work of a serving thread (IPC export) off the default stream, so it waits
        for nothing the training loop queued."""
        return torch.cuda.stream(self._stream("serve")) if self.on_gpu else nullcontext()

    def commit(self, version: int, copy: DeviceCopy) -> None:
        """`copy` now holds `version` and replaces the latest (which stays readable while borrowed)."""
        with self._changed:
            copy.version = version
            copy.borrowers -= 1  # the capture's own hold
            self._latest = copy
            self._changed.notify_all()

    def borrow(self, version: int) -> DeviceCopy | None:
        """Hold the copy of `version` while it is read; None unless it is the latest."""
        with self._changed:
            copy = self._latest
            if copy is None or copy.version != version:
                return None
            copy.borrowers += 1
            return copy

    def hold(self, copy: DeviceCopy) -> Callable[[], None]:
        """One more reader of a copy the caller already holds, for another thread to keep;
        returns its give-back, which does nothing when called again."""
        with self._changed:
            copy.borrowers += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self.give_back(copy)

        return release

    def give_back(self, copy: DeviceCopy) -> None:
        with self._changed:
            copy.borrowers -= 1
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
                free = next((c for c in self._copies if c is not self._latest and c.borrowers == 0), None)
                if free is not None and free.buffer.numel() < nbytes:  # the model grew
                    free.wait()  # the side stream may still write it: only then may it be freed
                    self._copies.remove(free)
                    free = None
                    continue
                if free is None and len(self._copies) < MAX_COPIES:
                    free = DeviceCopy(allocate_buffer(nbytes, self.device))
                    self._copies.append(free)
                if free is not None:
                    free.borrowers = 1  # held by the capture until commit() or give_back()
                    return free
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise BusyError(f"no free {self.device} copy within {timeout:g} s: transfers of "
                                    "earlier versions still read them")
                self._changed.wait(remaining)

    def _copy_on_side_stream(self, layout: Layout, state_dict: Mapping[str, torch.Tensor],
                             buffer: torch.Tensor) -> object:
        """Copy on a side stream that starts after the training stream's pending work (the
        weights as of now); the training stream then waits for the copy's event before it may
        change the weights again. Neither wait blocks the host."""
        training = torch.cuda.current_stream(self.device)
        side = self._stream("snapshot")
        side.wait_stream(training)
        with torch.cuda.stream(side):
            fill_buffer(layout, state_dict, buffer)
            event = torch.cuda.Event(blocking=True)  # waiters yield the CPU instead of spinning
            event.record(side)
        training.wait_event(event)
        return event

    def _stream(self, purpose: str) -> object:
        if purpose not in self._streams:
            self._streams[purpose] = torch.cuda.Stream(self.device)
        return self._streams[purpose]


class BusyError(TransferError):
    """Every device copy is still read by a transfer."""


def parse_device(device: object) -> torch.device:
    """'cuda', 'cuda:N' or 'cpu' (the host-memory stand-in), checked without touching CUDA
    (a callback is built before Lightning forks its workers)."""
    try:
        parsed = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cuda", "cpu"):
        raise ConfigurationError(f"gpu_device={device!r}: use 'cuda', 'cuda:N', 'cpu' (the tier in host "
                                 "memory, for testing without a GPU), or None for no GPU tier")
    return parsed


def check_device(device: object) -> torch.device:
    """The GPU tier's device, which must exist in this process."""
    parsed = parse_device(device)
    if parsed.type == "cpu":
        return parsed
    if not torch.cuda.is_available():
        raise ConfigurationError(f"gpu_device={device!r} but this process sees no CUDA device; set "
                                 "gpu_device=None (the DRAM tier still serves) or run on a GPU node")
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    if index >= torch.cuda.device_count():
        raise ConfigurationError(f"gpu_device={device!r} but this process sees {torch.cuda.device_count()} "
                                 "GPU(s); check CUDA_VISIBLE_DEVICES or use the rank's own device")
    return torch.device("cuda", index)
