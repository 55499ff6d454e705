"""The flat snapshot layout: where each tensor of a state_dict lives in one contiguous buffer.

The layout is shared by every tier and both sides of the wire, so it is validated as
untrusted input whenever it is parsed. Tensors are packed back to back, widest dtype first
and then by name: every offset is then naturally aligned for its dtype, and the packed
buffer is exactly the data section of a safetensors file, so the file tier writes it with
one sequential write and reads it back with one read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ._errors import IntegrityError, ProtocolError

__all__ = ["TensorSpec", "Layout", "DTYPES", "dtype_code", "check_compatible"]

# safetensors dtype codes, the names used everywhere on the wire and on disk.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)
_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}

MAX_TENSORS = 1_000_000
MAX_DIMS = 64  # torch itself allows no more
MAX_EXTENT = 2**53  # bytes, elements per dimension: far beyond any real model, small enough to compute with


def dtype_code(dtype: torch.dtype, name: str = "?") -> str:
    """The safetensors code of a torch dtype, or an IntegrityError naming the tensor."""
    try:
        return _CODES[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in _CODES)
        raise IntegrityError(
            f"tensor {name!r} has dtype {dtype}, which Viper cannot snapshot; "
            f"convert it to one of: {supported}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """One state_dict entry: its name, safetensors dtype code, shape and byte offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize

    @property
    def region(self) -> tuple[int, int, str, tuple[int, ...]]:
        """Identity of the bytes: two specs with the same region are aliases (tied weights)."""
        return (self.offset, self.nbytes, self.dtype, self.shape)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset}


@dataclass(frozen=True)
class Layout:
    """Every tensor of a snapshot and the total size of its packed buffer."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int

    @classmethod
    def for_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> Layout:
        """Pack a state_dict: aliases of one tensor share its bytes; widest dtypes go first."""
        regions: dict[tuple[object, ...], str] = {}
        aliases: dict[str, str] = {}
        for name, tensor in state_dict.items():
            _check_tensor(name, tensor)
            key = _storage_identity(tensor)
            if key in regions:
                aliases[name] = regions[key]
            else:
                regions[key] = name
        unique = sorted(regions.values(),
                        key=lambda n: (-state_dict[n].element_size(), n))
        specs: dict[str, TensorSpec] = {}
        offset = 0
        for name in unique:
            tensor = state_dict[name]
            specs[name] = TensorSpec(name, dtype_code(tensor.dtype, name),
                                     tuple(tensor.shape), offset)
            offset += tensor.nelement() * tensor.element_size()
        for name, target in aliases.items():
            specs[name] = TensorSpec(name, specs[target].dtype, specs[target].shape,
                                     specs[target].offset)
        return cls(tuple(specs[name] for name in state_dict), offset)

    @classmethod
    def from_json(cls, entries: object, nbytes: object) -> Layout:
        """Parse and validate a layout that came from the wire or from storage."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 <= nbytes <= MAX_EXTENT:
            raise ProtocolError(f"layout size 'nbytes' must be a non-negative integer of at most {MAX_EXTENT}, "
                                f"got {_describe(nbytes)}")
        if not isinstance(entries, list) or len(entries) > MAX_TENSORS:
            raise ProtocolError("'layout' must be a list of tensor entries")
        layout = cls(tuple(_parse_spec(entry, index) for index, entry in enumerate(entries)), nbytes)
        layout.validate()
        return layout

    def to_json(self) -> list[dict[str, object]]:
        return [spec.to_json() for spec in self.tensors]

    def validate(self) -> None:
        """Names unique, offsets aligned, regions either identical (aliases) or disjoint and
        tiling the buffer exactly: anything else could read outside the buffer or mix tensors."""
        seen: set[str] = set()
        for spec in self.tensors:
            if spec.name in seen:
                raise ProtocolError(f"layout names tensor {spec.name!r} more than once")
            seen.add(spec.name)
        end = 0
        for spec in self.unique_tensors():
            if spec.offset % spec.torch_dtype.itemsize:
                raise ProtocolError(
                    f"tensor {spec.name!r}: offset {spec.offset} is not aligned to its dtype {spec.dtype}")
            if spec.offset != end:
                raise ProtocolError(
                    f"tensor {spec.name!r}: offset {spec.offset} overlaps or leaves a gap "
                    f"(expected {end}); the layout must pack tensors back to back")
            end = spec.offset + spec.nbytes
        if end != self.nbytes:
            raise ProtocolError(f"layout tensors cover {end} bytes but the layout announces {self.nbytes}")

    def unique_tensors(self) -> list[TensorSpec]:
        """One spec per distinct region, in buffer order (the safetensors entries)."""
        seen: dict[tuple[object, ...], TensorSpec] = {}
        for spec in self.tensors:
            seen.setdefault(spec.region, spec)
        return sorted(seen.values(), key=lambda s: (s.offset, s.nbytes))

    def aliases(self) -> dict[str, str]:
        """Names that share another entry's bytes, mapped to the entry stored in the file."""
        stored = {spec.region: spec.name for spec in self.unique_tensors()}
        return {s.name: stored[s.region] for s in self.tensors if stored[s.region] != s.name}

    def signature(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Names, dtypes and shapes: what a consumer's model must match to take a version."""
        return sorted((spec.name, spec.dtype, spec.shape) for spec in self.tensors)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors viewing a flat uint8 buffer laid out by this layout (no copy)."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < self.nbytes:
            raise IntegrityError(
                f"buffer of {buffer.numel()} {buffer.dtype} elements cannot hold a {self.nbytes}-byte layout")
        return {spec.name: buffer[spec.offset:spec.offset + spec.nbytes]
                .view(spec.torch_dtype).view(spec.shape) for spec in self.tensors}


def check_compatible(expected: Layout, offered: Layout) -> None:
    """Raise IntegrityError naming the first tensor whose name, dtype or shape differ."""
    mine = {name: (dtype, shape) for name, dtype, shape in expected.signature()}
    theirs = {name: (dtype, shape) for name, dtype, shape in offered.signature()}
    missing = sorted(mine.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - mine.keys())
    if missing or unexpected:
        raise IntegrityError(
            f"tensor names differ from the serving model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the producer and consumer must build the same architecture")
    for name, (dtype, shape) in sorted(mine.items()):
        other_dtype, other_shape = theirs[name]
        if dtype != other_dtype:
            raise IntegrityError(f"tensor {name!r}: dtype {other_dtype} offered, the serving model has {dtype}")
        if shape != other_shape:
            raise IntegrityError(
                f"tensor {name!r}: shape {list(other_shape)} offered, the serving model has {list(shape)}")


def _check_tensor(name: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise IntegrityError(
            f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor; "
            "Viper snapshots tensors only (move extra state into buffers)")
    if tensor.is_sparse or tensor.device.type == "meta":
        raise IntegrityError(f"tensor {name!r} is sparse or on the meta device; materialise it dense first")
    dtype_code(tensor.dtype, name)


def _storage_identity(tensor: torch.Tensor) -> tuple[object, ...]:
    """Equal for tensors that view exactly the same elements (tied weights)."""
    if tensor.nelement() == 0:
        return ("empty", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.stride()), tuple(tensor.shape), tensor.dtype)


def _parse_spec(entry: object, index: int) -> TensorSpec:
    if not isinstance(entry, dict):
        raise ProtocolError(f"layout entry {index} is not an object")
    name, dtype, shape, offset = (entry.get(k) for k in ("name", "dtype", "shape", "offset"))
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"layout entry {index}: 'name' must be a non-empty string")
    if dtype not in DTYPES:
        raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    # Bounded before any arithmetic: a forged shape of huge integers would cost minutes of CPU.
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"tensor {name!r}: 'shape' must be a list of at most {MAX_DIMS} dimensions")
    if not all(_is_count(d) and d <= MAX_EXTENT for d in shape):
        raise ProtocolError(f"tensor {name!r}: 'shape' must hold non-negative integers of at most {MAX_EXTENT}")
    if not _is_count(offset) or offset > MAX_EXTENT:
        raise ProtocolError(f"tensor {name!r}: 'offset' must be a non-negative integer of at most {MAX_EXTENT}")
    return TensorSpec(name, dtype, tuple(shape), offset)


def _describe(value: object) -> str:
    """A short, safe description of a bad value (repr of a huge integer raises, or floods a log)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)[:60]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
