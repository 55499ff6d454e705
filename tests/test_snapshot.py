"""Snapshot format: bit-exact round trips for every dtype, strided and tied tensors."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from viper_lightning import IntegrityError, Layout, ProtocolError, take_snapshot
from viper_lightning.storage._pfs import safetensors_header

from .conftest import TinyNet, assert_same_weights

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]


def mixed_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}
    for index, dtype in enumerate(ALL_DTYPES):
        raw = torch.randn(3, 5 + index, generator=generator) * 50
        state[f"t{index}.{str(dtype).split('.')[-1]}"] = (raw > 0) if dtype == torch.bool else raw.to(dtype)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state["strided.transposed"] = base.t()                      # non-contiguous
    state["strided.every_other"] = base[:, ::2]                 # non-contiguous slice
    state["scalar"] = torch.tensor(3.5, dtype=torch.float64)    # 0-dim
    state["empty"] = torch.empty(0, 4)
    state["tied.a"] = state["tied.b"] = torch.randn(4, 4, generator=generator)
    return state


def test_round_trip_is_bit_exact_for_every_dtype_and_stride() -> None:
    state = mixed_state_dict()
    restored = take_snapshot(state).state_dict()
    assert list(restored) == list(state)
    assert_same_weights(state, restored)
    assert all(restored[name].shape == tensor.shape for name, tensor in state.items())


def test_tied_tensors_are_stored_once_and_stay_tied() -> None:
    state = mixed_state_dict()
    snapshot = take_snapshot(state)
    layout = snapshot.layout
    specs = {spec.name: spec for spec in layout.tensors}
    assert specs["tied.a"].offset == specs["tied.b"].offset
    assert layout.aliases() == {"tied.b": "tied.a"}
    assert layout.nbytes == sum(spec.nbytes for spec in layout.unique_tensors())
    restored = snapshot.state_dict()
    assert restored["tied.a"].data_ptr() == restored["tied.b"].data_ptr()


def test_module_with_tied_weights_round_trips() -> None:
    model = TinyNet()
    snapshot = take_snapshot(model.state_dict())
    clone = TinyNet()
    clone.load_state_dict(snapshot.state_dict())
    assert_same_weights(model, clone)
    assert snapshot.layout.nbytes < sum(t.nbytes for t in model.state_dict().values())


def test_offsets_are_aligned_and_widest_dtypes_come_first() -> None:
    layout = take_snapshot(mixed_state_dict()).layout
    sizes = [spec.torch_dtype.itemsize for spec in layout.unique_tensors()]
    assert sizes == sorted(sizes, reverse=True)
    assert all(spec.offset % spec.torch_dtype.itemsize == 0 for spec in layout.tensors)


def test_buffer_is_reused_across_snapshots() -> None:
    model = TinyNet()
    first = take_snapshot(model.state_dict())
    with torch.no_grad():
        model.hidden.weight.add_(1)
    second = take_snapshot(model.state_dict(), first.buffer)
    assert second.buffer.data_ptr() == first.buffer.data_ptr()
    assert_same_weights(model.state_dict(), second.state_dict())


def test_layout_survives_json_and_rejects_overlaps() -> None:
    layout = take_snapshot(mixed_state_dict()).layout
    assert Layout.from_json(layout.to_json(), layout.nbytes) == layout
    entries = layout.to_json()
    entries[1] = dict(entries[1], offset=entries[1]["offset"] + 8)
    with pytest.raises(ProtocolError, match="overlaps or leaves a gap"):
        Layout.from_json(entries, layout.nbytes)
    with pytest.raises(ProtocolError, match="unknown dtype"):
        Layout.from_json([dict(entries[0], dtype="F128")], layout.nbytes)


def test_non_tensor_entries_are_refused_with_their_name() -> None:
    with pytest.raises(IntegrityError, match="'extra'"):
        take_snapshot({"weight": torch.zeros(2), "extra": 3})


def test_file_data_section_is_a_valid_safetensors_file(tmp_path) -> None:
    state = mixed_state_dict()
    snapshot = take_snapshot(state)
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_header(snapshot.layout, {"format": "pt"}) + snapshot.data.numpy().tobytes())
    loaded = safetensors.torch.load_file(str(path))
    assert set(loaded) == set(state) - {"tied.b"}  # the alias is stored once
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name].contiguous()), name
