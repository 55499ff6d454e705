"""Parts of a sharded model: which piece of which full tensor each published tensor is.

Under FSDP2 or tensor parallelism (DTensor) every rank holds pieces of the weights. Each rank
publishes its own pieces as one *part*, an ordinary version of the model `<model>.part<i>of<n>`
whose notice also carries a `PartInfo`: for every tensor of the part, the full tensor's shape,
the offsets of the piece in it, and the placements that put it there (mesh shape and, per mesh
dimension, `S(d)` for sharded along tensor dimension d or `R` for replicated). A consumer with
an unsharded model checks that the parts tile every tensor exactly once and copies each piece
into place; it applies a version only when every part of it is in and verified.

A piece replicated over some mesh dimensions is published once, by the rank at coordinate 0 on
those dimensions; a tensor that is not a DTensor (a buffer, say) is taken as replicated on every
rank and published by part 0. Partial placements (values still to be reduced) and strided shards
(FSDP2 over a tensor-parallel dimension of the same tensor dimension) do not tile as boxes and
are refused with what to do instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ._errors import ConfigurationError, IntegrityError, ProtocolError
from ._layout import MAX_DIMS, MAX_EXTENT, Layout
from .transport._messages import check_model_name, count, object_of

__all__ = ["PART_FORMAT", "MAX_PARTS", "Piece", "PartInfo", "part_name", "local_part", "check_tiling", "assemble"]

PART_FORMAT = 1  # the version of the "part" object in notices and manifests
MAX_PARTS = 65536
MAX_MESH_DIMS = 8
_PLACEMENT = re.compile(r"^(R|S\((\d{1,2})\))$")
_RUN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def part_name(model: str, index: int, count_: int) -> str:
    """The model name part `index` of `count_` is published under (its topic and directory)."""
    if not 0 <= index < count_ <= MAX_PARTS:
        raise ConfigurationError(f"part {index} of {count_}: need 0 <= index < count <= {MAX_PARTS}")
    return check_model_name(f"{model}.part{index}of{count_}")


@dataclass(frozen=True)
class Piece:
    """Where one published tensor sits in its full tensor, and the placements that put it there."""

    full_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    mesh: tuple[int, ...]
    placements: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"full_shape": list(self.full_shape), "offsets": list(self.offsets), "mesh": list(self.mesh),
                "placements": list(self.placements)}

    def slices(self, shape: Sequence[int]) -> tuple[slice, ...]:
        """The index of this piece (of local `shape`) in the full tensor."""
        return tuple(slice(start, start + extent) for start, extent in zip(self.offsets, shape))


@dataclass(frozen=True)
class PartInfo:
    """One rank's part of a sharded model (see the module docstring)."""

    of: str
    index: int
    count: int
    run: str  # the same on every part of one sharded run: parts of two runs are never assembled together
    pieces: Mapping[str, Piece]

    @property
    def name(self) -> str:
        return part_name(self.of, self.index, self.count)

    def to_json(self) -> dict[str, object]:
        return {"format": PART_FORMAT, "of": self.of, "index": self.index, "count": self.count, "run": self.run,
                "tensors": {name: piece.to_json() for name, piece in self.pieces.items()}}

    @classmethod
    def from_json(cls, value: object, layout: Layout, model: str) -> PartInfo:
        """Parse and check a notice's part against the notice's own layout and model name."""
        entry = object_of(value, "notice field 'part'")
        if entry.get("format") != PART_FORMAT:
            raise ProtocolError(f"notice field 'part' has format {entry.get('format')!r:.20}; this consumer "
                                f"understands {PART_FORMAT}: upgrade viper_lightning on this side")
        try:
            of = check_model_name(entry.get("of"))
        except ConfigurationError:
            raise ProtocolError(f"part: 'of' {entry.get('of')!r:.80} is not a valid model name") from None
        index = count(entry, "index", "part", maximum=MAX_PARTS - 1)
        total = count(entry, "count", "part", minimum=index + 1, maximum=MAX_PARTS)
        if model != part_name(of, index, total):
            raise ProtocolError(f"part {index} of {total} of {of!r} is announced under {model!r}, not "
                                f"{part_name(of, index, total)!r}")
        run = entry.get("run")
        if not isinstance(run, str) or not _RUN.match(run):
            raise ProtocolError(f"part: 'run' must be 1-128 letters, digits or '._:-', got {run!r:.80}")
        tensors = object_of(entry.get("tensors"), "part field 'tensors'")
        shapes = {spec.name: spec.shape for spec in layout.tensors}
        if set(tensors) != set(shapes):
            raise ProtocolError(f"part {index} of {of!r} places tensors {sorted(set(tensors) ^ set(shapes))[:5]} "
                                "that its layout does not hold, or leaves some of the layout's unplaced")
        return cls(of, index, total, run, {name: _piece(tensors[name], name, shapes[name]) for name in sorted(tensors)})


def _piece(value: object, name: str, local_shape: tuple[int, ...]) -> Piece:
    entry = object_of(value, f"part tensor {name!r}")
    full, offsets, mesh, placements = (entry.get(k) for k in ("full_shape", "offsets", "mesh", "placements"))
    if not (_counts(full, MAX_DIMS) and _counts(offsets, MAX_DIMS) and len(full) == len(offsets) == len(local_shape)):
        raise ProtocolError(f"part tensor {name!r}: 'full_shape' and 'offsets' must be lists of "
                            f"{len(local_shape)} non-negative integers (its dimensions)")
    if any(start + extent > whole for start, extent, whole in zip(offsets, local_shape, full)) \
            or any(whole > MAX_EXTENT for whole in full):
        raise ProtocolError(f"part tensor {name!r}: its piece {list(local_shape)} at {offsets} lies outside the "
                            f"full shape {full}")
    if not (_counts(mesh, MAX_MESH_DIMS) and mesh and all(0 < size <= MAX_PARTS for size in mesh)):
        raise ProtocolError(f"part tensor {name!r}: 'mesh' must list 1-{MAX_MESH_DIMS} mesh dimension sizes")
    if not isinstance(placements, list) or len(placements) != len(mesh) or not all(
            isinstance(p, str) and (m := _PLACEMENT.match(p)) and (m.group(2) is None or int(m.group(2)) < len(full))
            for p in placements):
        raise ProtocolError(f"part tensor {name!r}: 'placements' must give one of 'R' or 'S(dim)' (dim < "
                            f"{len(full)}) per mesh dimension, got {placements!r:.80}")
    return Piece(tuple(full), tuple(offsets), tuple(mesh), tuple(placements))


def _counts(value: object, most: int) -> bool:
    return isinstance(value, list) and len(value) <= most and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


# -- the producer's side -------------------------------------------------------------------
def local_part(state_dict: Mapping[str, torch.Tensor], of: str, index: int, count_: int, run: str
               ) -> tuple[dict[str, torch.Tensor], PartInfo]:
    """The tensors this rank publishes (local pieces, no copy and no collective) and where they go."""
    tensors: dict[str, torch.Tensor] = {}
    pieces: dict[str, Piece] = {}
    for name, tensor in state_dict.items():
        placed = _placed(name, tensor, index)
        if placed is not None and placed[0].numel() > 0:  # an uneven split can leave a rank an empty piece
            tensors[name], pieces[name] = placed
    return tensors, PartInfo(of, index, count_, run, pieces)


def _placed(name: str, tensor: torch.Tensor, index: int) -> tuple[torch.Tensor, Piece] | None:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(tensor, DTensor):
        if index != 0:
            return None
        return tensor, Piece(tuple(tensor.shape), (0,) * tensor.dim(), (1,), ("R",))
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the tensor's mesh: it holds none of it
        return None
    placements: list[str] = []
    for mesh_dim, placement in enumerate(tensor.placements):
        if type(placement) is Shard:
            placements.append(f"S({placement.dim})")
        elif isinstance(placement, Replicate):
            if coordinate[mesh_dim]:
                return None  # a replica: the rank at coordinate 0 of this mesh dimension publishes it
            placements.append("R")
        else:
            raise IntegrityError(
                f"tensor {name!r} has placement {placement} on mesh dimension {mesh_dim}, which is not a box of the "
                "full tensor; publish it as Shard(dim) or Replicate() (reduce a Partial first, and shard FSDP2 and "
                "tensor parallelism along different tensor dimensions)")
    local = tensor.to_local()
    if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad:
        # still a frozen parameter (no copy: same storage and version counter), so that the
        # publisher's skip_unchanged_frozen recognises it
        local = torch.nn.Parameter(local, requires_grad=False)
    shape, offsets = compute_local_shape_and_global_offset(tensor.shape, mesh, tensor.placements)
    if tuple(local.shape) != tuple(shape):
        raise IntegrityError(f"tensor {name!r}: its local piece has shape {list(local.shape)}, but its placements "
                             f"give {list(shape)}; publish the DTensor as torch keeps it (not padded)")
    return local, Piece(tuple(tensor.shape), tuple(offsets), tuple(mesh.shape), tuple(placements))


# -- the consumer's side -------------------------------------------------------------------
def check_tiling(expected: Layout, parts: Sequence[tuple[PartInfo, Layout]]) -> None:
    """Refuse parts that do not tile every tensor of `expected` exactly once, with the same
    dtypes: assembling them would leave stale bytes or write one piece over another."""
    full = {spec.name: spec for spec in expected.tensors}
    covered = {name: 0 for name in full}
    boxes: dict[str, list[tuple[int, tuple[int, ...], tuple[int, ...]]]] = {name: [] for name in full}
    for info, layout in parts:
        for spec in layout.tensors:
            target = full.get(spec.name)
            piece = info.pieces[spec.name]
            if target is None:
                raise IntegrityError(f"part {info.index} of {info.of!r} has tensor {spec.name!r}, which the serving "
                                     "model lacks; the producer and consumer must build the same architecture")
            if piece.full_shape != target.shape or spec.dtype != target.dtype:
                raise IntegrityError(
                    f"tensor {spec.name!r}: part {info.index} holds a piece of a {spec.dtype} {list(piece.full_shape)}, "
                    f"the serving model has {target.dtype} {list(target.shape)}")
            for other_index, other_offsets, other_shape in boxes[spec.name]:
                if _overlap(piece.offsets, spec.shape, other_offsets, other_shape):
                    raise IntegrityError(f"tensor {spec.name!r}: parts {other_index} and {info.index} place pieces "
                                         "that overlap; their placements disagree (were they made by one run?)")
            boxes[spec.name].append((info.index, piece.offsets, spec.shape))
            covered[spec.name] += math.prod(spec.shape)
    for name, spec in full.items():
        if covered[name] != math.prod(spec.shape):
            raise IntegrityError(f"tensor {name!r}: the parts cover {covered[name]} of its {math.prod(spec.shape)} "
                                 "elements; every part of one sharded run must be subscribed to")


def _overlap(a: tuple[int, ...], a_shape: tuple[int, ...], b: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    return all(x < y + n and y < x + m for x, m, y, n in zip(a, a_shape, b, b_shape)) \
        and 0 not in a_shape and 0 not in b_shape


@torch.no_grad()
def assemble(target: Mapping[str, torch.Tensor], parts: Sequence[tuple[PartInfo, Mapping[str, torch.Tensor]]]) -> None:
    """Copy every part's pieces into their places in `target` (full tensors, checked by check_tiling)."""
    for info, tensors in parts:
        for name, piece_tensor in tensors.items():
            target[name][info.pieces[name].slices(piece_tensor.shape)].copy_(piece_tensor)
