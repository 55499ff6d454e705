"""Host buffers shared by producer and consumer."""

from __future__ import annotations

import numpy
import torch

__all__ = ["allocate_buffer", "ensure_capacity", "copy_tensor", "copy_from_bytes"]


def allocate_buffer(nbytes: int, device: torch.device | None = None, pin: bool = False) -> torch.Tensor:
    """A flat uint8 buffer: on `device` when it is a GPU, else in host memory.

    pin: page-lock the host buffer, for one whose bytes go on to a GPU (copies from it then run
    at full speed and asynchronously). Only then: pinning creates a CUDA context in the process
    and locks memory, which a CPU-only consumer on a GPU host must not pay for."""
    if device is not None and device.type != "cpu":
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin and torch.cuda.is_available())


def ensure_capacity(buffer: torch.Tensor | None, nbytes: int, device: torch.device | None = None,
                    pin: bool = False) -> torch.Tensor:
    """Reuse `buffer` when it is large enough: fresh pages cost far more than a copy."""
    if buffer is None or buffer.numel() < nbytes:
        return allocate_buffer(nbytes, device, pin)
    return buffer


def copy_tensor(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy `source` into `target` (same shape and dtype), as fast as the memory bus allows.

    For contiguous host tensors this is one memmove through numpy, which beats `Tensor.copy_`
    on few cores: its thread pool costs more than it gains there."""
    source = source.detach()
    if source.nelement() == 0:
        return
    if _is_plain_host(target) and _is_plain_host(source):
        numpy.copyto(_bytes_of(target), _bytes_of(source))
    else:
        target.copy_(source)


def _is_plain_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


def _bytes_of(tensor: torch.Tensor) -> numpy.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def copy_from_bytes(target: torch.Tensor, source: numpy.ndarray) -> None:
    """Copy raw bytes (a uint8 array, e.g. a mapped segment) into a tensor of the same size."""
    if _is_plain_host(target):
        numpy.copyto(_bytes_of(target), source)
    else:
        staged = torch.from_numpy(numpy.array(source))  # writable copy: mapped memory is read-only
        target.copy_(staged.view(target.dtype).view(target.shape))
