"""Same-host GPU sharing through a JSON description: the validation runs everywhere, the round
trip between two processes needs a GPU."""

from __future__ import annotations

import copy
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from viper_lightning import ConfigurationError, ProtocolError
from viper_lightning.transport._cuda_ipc import _validate, export_cuda_tensor, import_cuda_tensor

WAIT_S = 60.0
ROWS = COLUMNS = 256

# What export_cuda_tensor writes for a 16x16 float32 view at element 0 of a 4096-byte storage.
VALID = {
    "proto": 1, "kind": "cuda_ipc", "pid": 1, "device": 0, "handle": "ab" * 64,
    "storage_size_bytes": 4096, "storage_offset_bytes": 512,
    "ref_counter_handle": b"/torch_1_2_0".hex(), "ref_counter_offset": 3,
    "event_handle": "cd" * 64, "event_sync_required": True,
    "dtype": "F32", "shape": [16, 16], "stride": [16, 1], "offset": 0,
}


def changed(**fields: object) -> dict:
    description = copy.deepcopy(VALID)
    description.update(fields)
    return description


def test_a_valid_description_is_accepted_with_its_values() -> None:
    spec = _validate(json.loads(json.dumps(VALID)))  # survives the wire
    assert spec.handle == bytes.fromhex("ab" * 64) and spec.ref_counter_handle == b"/torch_1_2_0"
    assert (spec.dtype, spec.shape, spec.stride, spec.offset) == (torch.float32, (16, 16), (16, 1), 0)
    assert spec.event_sync_required and spec.storage_offset_bytes == 512


def test_an_empty_storage_needs_no_handles() -> None:
    spec = _validate(changed(handle=None, ref_counter_handle=None, event_handle=None, storage_size_bytes=0,
                             shape=[0, 16], event_sync_required=False))
    assert spec.handle is None and spec.event_handle == b""


@pytest.mark.parametrize("description, field", [
    ("not a dict", "JSON object"),
    ({key: value for key, value in VALID.items() if key != "handle"}, r"missing field\(s\) \['handle'\]"),
    (changed(evil="__reduce__"), r"unknown field\(s\) \['evil'\]"),
    (changed(proto=2), "'proto'/'kind'"),
    (changed(kind="pickle"), "'proto'/'kind'"),
    (changed(device=-1), "'device'"),
    (changed(device="0"), "'device'"),
    (changed(device=True), "'device'"),
    (changed(handle="zz" * 64), "'handle'"),
    (changed(handle="AB" * 64), "'handle'"),
    (changed(handle="abc"), "'handle'"),
    (changed(handle="ab cd"), "'handle'"),
    (changed(handle=None), "'handle'"),
    (changed(handle=64), "'handle'"),
    (changed(storage_size_bytes=-1), "'storage_size_bytes'"),
    (changed(storage_offset_bytes=1.5), "'storage_offset_bytes'"),
    (changed(ref_counter_handle=None), "'ref_counter_handle'"),
    (changed(ref_counter_offset=-3), "'ref_counter_offset'"),
    (changed(event_sync_required="yes"), "'event_sync_required'"),
    (changed(event_handle=None), "'event_handle'"),
    (changed(dtype="float32"), "'dtype'"),
    (changed(shape=[16, -1]), "'shape'"),
    (changed(shape="16x16"), "'shape'"),
    (changed(shape=[1] * 65, stride=[1] * 65), "'shape'"),
    (changed(stride=[1]), "'stride' has 1 entries"),
    (changed(stride=[16, True]), "'stride'"),
    (changed(offset=769), r"reach byte 4100 .*'storage_size_bytes'"),
    (changed(offset=-1), "'offset'"),
    (changed(pid=0), "'pid'"),
])
def test_malformed_descriptions_are_refused_naming_the_field(description: object, field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        import_cuda_tensor(description)


def test_importing_in_the_exporting_process_is_refused_before_cuda() -> None:
    with pytest.raises(ConfigurationError, match="use the tensor itself"):
        import_cuda_tensor(changed(pid=os.getpid()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_import_without_cuda_is_refused_after_validation() -> None:
    with pytest.raises(ConfigurationError, match="needs CUDA"):
        import_cuda_tensor(VALID)


def test_export_refuses_cpu_tensors() -> None:
    with pytest.raises(ConfigurationError, match="takes a CUDA tensor, got one on cpu"):
        export_cuda_tensor(torch.zeros(4))


class FakeSharedStorage:
    """What torch's UntypedStorage._share_cuda_ returns for a shared block (fixed bytes)."""

    def _share_cuda_(self) -> tuple:
        return (0, b"\x01" * 64, 4096, 512, b"/torch_9_9_0", 3, b"\x02" * 64, True)


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that claims to live on cuda:0, so the export path runs without a GPU."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)

    def untyped_storage(self) -> FakeSharedStorage:
        return FakeSharedStorage()


def test_export_and_import_match_torchs_rebuild_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU: what export writes is what import validates and hands to torch, in the order
    torch.multiprocessing.reductions.rebuild_cuda_tensor takes its arguments."""
    from torch.multiprocessing import reductions

    assert list(inspect.signature(reductions.rebuild_cuda_tensor).parameters) == [
        "tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype",
        "storage_device", "storage_handle", "storage_size_bytes", "storage_offset_bytes", "requires_grad",
        "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required"]
    view = torch.Tensor._make_subclass(FakeCudaTensor, torch.zeros(32, 32))[3:, 5:]
    description = json.loads(json.dumps(export_cuda_tensor(view)))
    assert description["pid"] == os.getpid() and description["offset"] == 3 * 32 + 5
    calls = []
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *args: calls.append(args) or "mapped")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert import_cuda_tensor({**description, "pid": os.getpid() + 1}) == "mapped"
    assert calls == [(torch.Tensor, torch.Size([29, 27]), (32, 1), 101, torch.storage.TypedStorage,
                      torch.float32, 0, b"\x01" * 64, 4096, 512, False, b"/torch_9_9_0", 3, b"\x02" * 64, True)]


def test_importing_the_module_touches_no_cuda() -> None:
    code = ("import torch, viper_lightning.transport._cuda_ipc; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT_S, cwd=Path(__file__).parents[1])


def expected_view() -> torch.Tensor:
    """The non-contiguous view under test: it exercises storage offset and strides."""
    return torch.arange(ROWS * COLUMNS, dtype=torch.float32).view(ROWS, COLUMNS)[3:, 5:]


def consume_in_child(description_json: str, results: multiprocessing.Queue) -> None:
    """Map the producer's tensor, check it, and write to it in place (the memory is shared)."""
    shared = import_cuda_tensor(json.loads(description_json))
    exact = bool(torch.equal(shared.cpu(), expected_view()))
    shared.add_(1.0)
    torch.cuda.synchronize()
    results.put({"exact": exact, "device": shared.device.type, "shape": list(shared.shape)})
    del shared  # gives the producer's reference count back


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device")
def test_round_trip_between_two_processes_shares_the_memory() -> None:
    base = torch.arange(ROWS * COLUMNS, dtype=torch.float32, device="cuda").view(ROWS, COLUMNS)
    view = base[3:, 5:]
    description = export_cuda_tensor(view)
    assert description["offset"] == 3 * COLUMNS + 5 and description["stride"] == [COLUMNS, 1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=consume_in_child, args=(json.dumps(description), results), daemon=True)
    child.start()
    report = results.get(timeout=WAIT_S)
    child.join(WAIT_S)
    assert child.exitcode == 0
    assert report == {"exact": True, "device": "cuda", "shape": [ROWS - 3, COLUMNS - 5]}
    assert torch.equal(view.cpu(), expected_view() + 1.0), "the child's write is not visible here"
    assert torch.equal(base[:3].cpu(), torch.arange(3 * COLUMNS, dtype=torch.float32).view(3, COLUMNS))
