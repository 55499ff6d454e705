"""Same-host GPU sharing: a CUDA tensor described as plain JSON and mapped by another process.

torch.multiprocessing shares CUDA tensors by pickling them; Viper never unpickles, so this module
puts torch's own primitives (`UntypedStorage._share_cuda_` on the producer,
`torch.multiprocessing.reductions.rebuild_cuda_tensor` on the consumer) behind a JSON-able dict
that is validated field by field before anything reaches CUDA.

What torch's CUDA IPC implies, and callers must respect:
- Import each description exactly once. Every export opens a reference count in a shared file;
  the importer's storage gives it back when freed. Until then the producer's caching allocator
  keeps the memory block, even after the producer drops its tensor, so a description that is
  never imported pins its block until the producer exits.
- The producer process must outlive the consumers' use of the memory, and both must run on the
  same host with the device visible to both.
- Export after the tensor's data is written (or from the stream that wrote it): torch records an
  event at export and the importer's current stream waits on it before reading.
- An imported tensor cannot be exported again (torch refuses); clone it first.
Nothing here touches CUDA at import time, so the module imports on machines without a GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .._errors import ConfigurationError, ProtocolError, TransferError
from .._layout import DTYPES
from ._messages import count, first_line, is_count, object_of
from ._protocol import PROTO

__all__ = ["IPC_KIND", "export_cuda_tensor", "import_cuda_tensor"]

IPC_KIND = "cuda_ipc"
_FIELDS = frozenset({
    "proto", "kind", "pid", "device", "handle", "storage_size_bytes", "storage_offset_bytes",
    "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required",
    "dtype", "shape", "stride", "offset",
})
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
_MAX_HANDLE_BYTES = 1 << 20  # expandable segments put one handle per mapped page in the string
_MAX_DIMS = 64
_MAX_DEVICE = (1 << 16) - 1
_MAX_PID = (1 << 32) - 1
_MAX_BYTES = (1 << 56) - 1  # sizes, offsets, shapes and strides


@dataclass(frozen=True)
class _Description:
    """A validated description, in the types torch's rebuild function takes."""

    device: int
    handle: bytes | None
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes | None
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    pid: int


def export_cuda_tensor(tensor: torch.Tensor) -> dict[str, object]:
    """Describe a CUDA tensor so another process on this host can map it (JSON-able dict)."""
    _check_exportable(tensor)
    try:
        (device, handle, size_bytes, offset_bytes, ref_counter, ref_counter_offset,
         event_handle, event_sync_required) = tensor.untyped_storage()._share_cuda_()
    except RuntimeError as exc:
        raise ConfigurationError(f"cannot export this CUDA tensor: {first_line(exc)}; a tensor imported "
                                 "from another process must be cloned before it is exported") from None
    return {
        "proto": PROTO, "kind": IPC_KIND, "pid": os.getpid(), "device": int(device),
        "handle": _hex_or_none(handle), "storage_size_bytes": int(size_bytes),
        "storage_offset_bytes": int(offset_bytes), "ref_counter_handle": _hex_or_none(ref_counter),
        "ref_counter_offset": int(ref_counter_offset),
        # torch fills the event handle with uninitialised bytes when no sync is required
        "event_handle": _hex_or_none(event_handle) if event_sync_required else None,
        "event_sync_required": bool(event_sync_required),
        "dtype": _CODES[tensor.dtype], "shape": list(tensor.shape), "stride": list(tensor.stride()),
        "offset": tensor.storage_offset(),
    }


def import_cuda_tensor(description: object) -> torch.Tensor:
    """Map a tensor exported by another process on this host; the memory is shared, not copied.

    Raises ProtocolError naming the field when the description is malformed, ConfigurationError
    when this process cannot import it (no CUDA, or it is the exporting process), TransferError
    when CUDA refuses the handle (producer gone, other host, device not visible)."""
    spec = _validate(description)
    if spec.pid == os.getpid():
        raise ConfigurationError("this CUDA tensor was exported by this very process, where CUDA cannot open "
                                 "its own IPC handle; use the tensor itself")
    if not torch.cuda.is_available():
        raise ConfigurationError("importing a CUDA IPC tensor needs CUDA in this process; take the dram or "
                                 "pfs tier instead")
    if spec.device >= torch.cuda.device_count():
        raise ProtocolError(f"cuda_ipc field 'device' is {spec.device} but this process sees "
                            f"{torch.cuda.device_count()} GPU(s); CUDA_VISIBLE_DEVICES must match the producer's")
    return _rebuild(spec)


def _rebuild(spec: _Description) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor  # its storage cache and refcounts

    try:
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(spec.shape), spec.stride, spec.offset, torch.storage.TypedStorage,
            spec.dtype, spec.device, spec.handle, spec.storage_size_bytes, spec.storage_offset_bytes,
            False, spec.ref_counter_handle, spec.ref_counter_offset, spec.event_handle,
            spec.event_sync_required)
    except RuntimeError as exc:
        raise TransferError(f"CUDA refused the IPC handle of device {spec.device} from process {spec.pid}: "
                            f"{first_line(exc)}; the producer may have exited or run on another host") from None


def _check_exportable(tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
        where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ConfigurationError(f"export_cuda_tensor takes a CUDA tensor, got one on {where}; the dram tier "
                                 "shares CPU tensors")
    if tensor.layout != torch.strided or tensor.is_nested:
        raise ConfigurationError(f"export_cuda_tensor takes a dense (strided) tensor, got layout {tensor.layout}; "
                                 "call .to_dense() first")
    if tensor.dtype not in _CODES:
        raise ConfigurationError(f"export_cuda_tensor cannot describe dtype {tensor.dtype}; use one of "
                                 f"{', '.join(str(d) for d in _CODES)}")


def _validate(description: object) -> _Description:
    """Check every field before anything reaches CUDA: a bad handle there is a crash, not an error."""
    description = object_of(description, "cuda_ipc description")
    missing, unknown = _FIELDS - description.keys(), description.keys() - _FIELDS
    if missing or unknown:
        raise ProtocolError(f"cuda_ipc description: missing field(s) {sorted(missing)}, unknown field(s) "
                            f"{sorted(map(str, unknown))}; export it with export_cuda_tensor")
    if description["proto"] != PROTO or description["kind"] != IPC_KIND:
        raise ProtocolError(f"cuda_ipc fields 'proto'/'kind' are {description['proto']!r}/{description['kind']!r}; "
                            f"expected {PROTO}/{IPC_KIND!r}")
    size = _count(description, "storage_size_bytes")
    dtype = _dtype(description)
    shape, stride, offset = _geometry(description, size, dtype)
    sync = description["event_sync_required"]
    if not isinstance(sync, bool):
        raise ProtocolError(f"cuda_ipc field 'event_sync_required' must be true or false, got {sync!r:.40}")
    return _Description(
        device=_count(description, "device", _MAX_DEVICE), handle=_bytes(description, "handle", size > 0),
        storage_size_bytes=size, storage_offset_bytes=_count(description, "storage_offset_bytes"),
        ref_counter_handle=_bytes(description, "ref_counter_handle", size > 0),
        ref_counter_offset=_count(description, "ref_counter_offset"),
        event_handle=_bytes(description, "event_handle", sync and size > 0) or b"",
        event_sync_required=sync, dtype=dtype, shape=shape, stride=stride, offset=offset,
        pid=_count(description, "pid", _MAX_PID, minimum=1))


def _geometry(description: dict, size: int, dtype: torch.dtype) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Shape, stride and offset, checked to stay inside the shared storage."""
    shape, stride = description["shape"], description["stride"]
    for name, value in (("shape", shape), ("stride", stride)):
        if (not isinstance(value, list) or len(value) > _MAX_DIMS
                or not all(is_count(v) and v <= _MAX_BYTES for v in value)):
            raise ProtocolError(f"cuda_ipc field {name!r} must be a list of at most {_MAX_DIMS} non-negative "
                                f"integers, got {value!r:.80}")
    if len(stride) != len(shape):
        raise ProtocolError(f"cuda_ipc field 'stride' has {len(stride)} entries for a {len(shape)}-D 'shape'")
    offset = _count(description, "offset")
    if all(shape):  # an empty tensor reads nothing, wherever it points
        end = (offset + sum((d - 1) * s for d, s in zip(shape, stride)) + 1) * dtype.itemsize
        if end > size:
            raise ProtocolError(f"cuda_ipc fields 'shape'/'stride'/'offset' reach byte {end} of a storage of "
                                f"{size} bytes ('storage_size_bytes')")
    return tuple(shape), tuple(stride), offset


def _dtype(description: dict) -> torch.dtype:
    code = description["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise ProtocolError(f"cuda_ipc field 'dtype' is {code!r:.40}; expected one of {', '.join(DTYPES)}")
    return DTYPES[code]


def _count(description: dict, key: str, maximum: int = _MAX_BYTES, minimum: int = 0) -> int:
    return count(description, key, "cuda_ipc", minimum=minimum, maximum=maximum)


def _bytes(description: dict, key: str, required: bool) -> bytes | None:
    """A lowercase hex field: required for a non-empty storage, null allowed otherwise."""
    value = description[key]
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > 2 * _MAX_HANDLE_BYTES or not _HEX.match(value):
        raise ProtocolError(f"cuda_ipc field {key!r} must be lowercase hex (an even number of digits, at most "
                            f"{_MAX_HANDLE_BYTES} bytes){'' if required else ' or null'}, got {value!r:.40}")
    return bytes.fromhex(value)


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).hex()

