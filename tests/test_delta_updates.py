"""Updates that move only what changed. The producer copies and digests a frozen parameter only
when torch saw it change; a dram-zmq consumer holding one version fetches only the blocks whose
leaves differ in the next, checked against the signed digest, and patches only those bytes;
every swap stays bit-exact, and a forged block map or block is refused."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import zmq

from viper_lightning import FileSystemTier, IntegrityError, ModelPublisher, ModelSubscriber, take_snapshot
from viper_lightning._buffers import allocate_buffer
from viper_lightning._digest import BLOCK_BYTES, digest_buffer, leaf_of
from viper_lightning._layout import Layout
from viper_lightning._marks import mark_of, unchanged
from viper_lightning.producer._snapshot import fill_buffer
from viper_lightning.transport._fetch import FetchClient

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, Events, assert_same_weights


def _frozen_backbone_and_head() -> torch.nn.Module:
    """A 4 MB backbone (several blocks), frozen, under a small head, as in transfer learning."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 16))
    model[0].requires_grad_(False)
    return model


def _train(model: torch.nn.Module, *, backbone: bool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if backbone or name.startswith("2."):
                parameter.add_(torch.randn(parameter.shape, generator=generator))


@contextmanager
def _following(model_name: str, key: bytes | None = b"k" * 32, **options: object
               ) -> Iterator[tuple[ModelPublisher, ModelSubscriber, Events, Callable]]:
    events = Events()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=key, **options) as publisher, \
            ModelSubscriber(_frozen_backbone_and_head(), model_name, publisher.endpoint, hmac_key=key,
                            routes=["dram-zmq"], load_latest=False, on_update=events.on_update) as subscriber:

        def publish_and_check(producer: torch.nn.Module) -> int:
            """Publish; the subscriber must serve exactly these weights. Returns the bytes it moved."""
            version = publisher.publish(producer)
            assert subscriber.wait_for_version(version, WAIT_S)
            with subscriber.serving() as served:
                assert_same_weights(producer, served)
            record = [u for u in events.wait_for_updates(version) if u.version == version][0]
            assert record.route == "dram-zmq", record
            return record.moved_bytes
        yield publisher, subscriber, events, publish_and_check


@pytest.mark.parametrize("keyed", [False, True])
def test_a_head_only_update_moves_the_blocks_it_changed_and_serves_bit_exact(model_name, keyed) -> None:
    producer = _frozen_backbone_and_head()
    nbytes = take_snapshot(producer.state_dict()).layout.nbytes
    with _following(model_name, b"k" * 32 if keyed else None, skip_unchanged_frozen=True) as \
            (_, _, _, publish_and_check):
        assert publish_and_check(producer) == nbytes  # nothing held yet: the whole version
        _train(producer, backbone=False, seed=1)
        moved = publish_and_check(producer)
        assert 0 < moved <= 2 * BLOCK_BYTES, f"a head of 66 kB changed, {moved} bytes moved"
        _train(producer, backbone=True, seed=2)
        assert publish_and_check(producer) == nbytes  # every block changed


def test_the_standby_copy_takes_what_changed_since_the_version_it_holds(model_name) -> None:
    """The staging buffer holds the last version and the standby copy the one before: a head-only
    change after a backbone change moves one block, but the standby needs the backbone too."""
    producer = _frozen_backbone_and_head()
    with _following(model_name, skip_unchanged_frozen=True) as (_, _, _, publish_and_check):
        publish_and_check(producer)
        _train(producer, backbone=True, seed=1)
        publish_and_check(producer)
        for seed in (2, 3, 4):
            _train(producer, backbone=False, seed=seed)
            assert publish_and_check(producer) <= 2 * BLOCK_BYTES


def test_weights_written_in_place_by_the_serving_code_are_copied_again(model_name) -> None:
    """A served copy changed in place (a user's fine-tuning step, batch norm left in training
    mode) no longer holds its version: when it is the standby again it is loaded whole."""
    producer = _frozen_backbone_and_head()
    with _following(model_name) as (_, subscriber, _, publish_and_check):
        publish_and_check(producer)
        _train(producer, backbone=False, seed=1)
        publish_and_check(producer)
        with subscriber.serving() as served, torch.no_grad():
            served[0].weight.add_(1.0)
        for seed in (2, 3):  # the changed copy is the standby at the second of these
            _train(producer, backbone=False, seed=seed)
            publish_and_check(producer)


def test_a_frozen_tensor_is_copied_only_when_torch_saw_it_change() -> None:
    model = _frozen_backbone_and_head()
    state = model.state_dict(keep_vars=True)
    layout, buffer = Layout.for_state_dict(state), allocate_buffer(Layout.for_state_dict(state).nbytes)
    frozen = frozenset({"0.weight", "0.bias"})
    first = fill_buffer(layout, state, buffer, frozen=frozen)
    assert sum(end - start for start, end in first.written) == layout.nbytes
    _train(model, backbone=False, seed=1)
    second = fill_buffer(layout, state, buffer, frozen=frozen, before=first)
    head = {(spec.offset, spec.offset + spec.nbytes) for spec in layout.unique_tensors() if spec.name.startswith("2.")}
    assert set(second.written) == head
    with torch.no_grad():
        model[0].bias.add_(1.0)  # an in-place write: its version counter moves
    third = fill_buffer(layout, state, buffer, frozen=frozen, before=second)
    bias = next(spec for spec in layout.unique_tensors() if spec.name == "0.bias")
    assert (bias.offset, bias.offset + bias.nbytes) in third.written
    assert torch.equal(layout.views(buffer)["0.bias"], model[0].bias)


def test_versions_with_a_frozen_part_reach_the_file_system_with_their_digest(model_name, pfs_root) -> None:
    """The producer digests only the blocks a fill wrote: each version read back from the file
    system, where the whole digest is checked, is bit-exact, the frozen part changed in place too."""
    producer = _frozen_backbone_and_head()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, hmac_key=b"k" * 32, keep_every_version=True,
                        dram_versions=1, skip_unchanged_frozen=True) as publisher:
        expected = {}
        for seed in range(1, 6):
            _train(producer, backbone=False, seed=seed)
            if seed == 4:
                with torch.no_grad():
                    producer[0].weight.mul_(2.0)
            expected[publisher.publish(producer)] = {k: v.clone() for k, v in producer.state_dict().items()}
        assert publisher.flush(WAIT_S)
    tier = FileSystemTier(pfs_root)
    for version, weights in expected.items():
        notice = tier.read_manifest(model_name, version, b"k" * 32)
        buffer = allocate_buffer(notice.nbytes)
        tier.read_into(notice, buffer, key=b"k" * 32)
        assert_same_weights(weights, notice.layout.views(buffer))


def test_by_default_frozen_weights_written_where_torch_does_not_see_it_are_published(model_name) -> None:
    """A write through `.data` (PEFT's adapter merge writes so) moves no version counter: by
    default every tensor is copied every time, so every version carries it."""
    producer = _frozen_backbone_and_head()
    with _following(model_name) as (_, _, _, publish_and_check):
        for seed in range(1, 5):  # through every slot of the pool
            producer[0].weight.data.add_(float(seed))
            publish_and_check(producer)


def test_a_mark_tells_other_storage_at_the_same_address_apart() -> None:
    """An allocator hands a freed block out again: same address, version counter 0, other bytes."""
    memory = bytearray(4096)
    first = torch.frombuffer(memory, dtype=torch.uint8)
    mark = mark_of(first)
    assert unchanged(mark, first)
    del first
    second = torch.frombuffer(memory, dtype=torch.uint8)  # another storage over the same address
    assert (second.data_ptr(), second._version) == (mark.address, mark.version)
    assert not unchanged(mark, second)
    second.add_(1)
    assert not unchanged(mark_of(torch.zeros(1)), second)
    with torch.inference_mode():
        assert mark_of(torch.zeros(1)) is None


def test_frozen_weights_reassigned_to_recycled_memory_are_published(model_name) -> None:
    """load_state_dict(assign=True) gives a frozen parameter new storage at version 0, often at an
    address the allocator had handed out before: a mark by address and version alone would take
    it for unchanged."""
    producer = _frozen_backbone_and_head()
    generator = torch.Generator().manual_seed(7)
    with _following(model_name, skip_unchanged_frozen=True) as (_, _, _, publish_and_check):
        for _ in range(6):
            producer[0].load_state_dict({"weight": torch.randn(1024, 1024, generator=generator),
                                         "bias": torch.randn(1024, generator=generator)}, assign=True)
            producer[0].requires_grad_(False)
            publish_and_check(producer)


def test_tied_weights_are_patched_in_every_name_that_views_them(model_name) -> None:
    """The producer ties two names to one tensor (one region of its layout); a consumer that does
    not tie them gets that region's changed bytes in both."""
    def pair() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(1024, 1024),
                                   torch.nn.Linear(1024, 1024, bias=False))

    producer, served_model = pair(), pair()
    producer[2].weight = producer[0].weight
    events = Events()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=b"k" * 32) as publisher, \
            ModelSubscriber(served_model, model_name, publisher.endpoint, hmac_key=b"k" * 32, routes=["dram-zmq"],
                            load_latest=False, on_update=events.on_update) as subscriber:
        for version, changed in enumerate([None, producer[0], producer[1], producer[0]], start=1):
            if changed is not None:
                with torch.no_grad():
                    changed.weight.add_(1.0)
            assert publisher.publish(producer) == version
            assert subscriber.wait_for_version(version, WAIT_S)
            with subscriber.serving() as served:
                assert_same_weights(producer, served)
            moved = [u.moved_bytes for u in events.wait_for_updates(version)][-1]
            assert version == 1 or moved <= 5 << 20, f"one 4 MB tensor changed, {moved} bytes moved"


def test_a_model_made_under_inference_mode_takes_every_update(model_name) -> None:
    """Inference tensors keep no version counter: the standby they make is loaded whole."""
    with torch.inference_mode():
        served_model = _frozen_backbone_and_head()
    producer = _frozen_backbone_and_head()
    events = Events()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=b"k" * 32) as publisher, \
            ModelSubscriber(served_model, model_name, publisher.endpoint, hmac_key=b"k" * 32, routes=["dram-zmq"],
                            load_latest=False, on_update=events.on_update) as subscriber:
        for seed in range(1, 5):
            _train(producer, backbone=seed % 2 == 0, seed=seed)
            version = publisher.publish(producer)
            assert subscriber.wait_for_version(version, WAIT_S), subscriber.stats.refusals
            with subscriber.serving() as served:
                assert_same_weights(producer, served)


class _ForgingServer:
    """A fetch endpoint on loopback that serves one version of `data`, but whose block map or
    one block can be forged: what a hostile producer, or whoever sits between, could send."""

    def __init__(self, model: str, data: bytes, forge: str) -> None:
        self.model, self.data, self.forge = model, data, forge
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        blocks = b"".join(leaf_of(self.data[start:start + BLOCK_BYTES])
                          for start in range(0, len(self.data), BLOCK_BYTES))
        header = {"status": "ok", "model": self.model, "version": 2, "nbytes": len(self.data),
                  "digest": digest_buffer(self.data)}
        while not self._stop.is_set():
            if not self._socket.poll(20):
                continue
            peer, raw = self._socket.recv_multipart()
            request = json.loads(raw)
            if request["op"] == "blocks":
                forged = bytes(16) + blocks[16:] if self.forge == "map" else blocks
                self._socket.send_multipart([peer, json.dumps(header).encode(), forged])
            elif request["op"] == "read":
                chunk = bytearray(self.data[request["offset"]:request["offset"] + request["length"]])
                if self.forge == "block":
                    chunk[0] ^= 1
                self._socket.send_multipart([peer, json.dumps({"status": "ok", "offset": request["offset"]}).encode(),
                                             bytes(chunk)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self._socket.close(0)
        self._context.term()


@pytest.mark.parametrize("forge, message", [("map", "block map of version 2.*digest mismatch"),
                                            ("block", "block 1 does not match the version's block map")])
def test_a_forged_block_map_or_block_is_refused(forge, message) -> None:
    held = bytes(3 * BLOCK_BYTES)
    new = bytearray(held)
    new[BLOCK_BYTES + 5] = 7  # block 1 changed
    server = _ForgingServer("m", bytes(new), forge)
    try:
        buffer = torch.zeros(len(held), dtype=torch.uint8)
        held_blocks = b"".join(leaf_of(held[start:start + BLOCK_BYTES]) for start in range(0, len(held), BLOCK_BYTES))
        client = FetchClient(zmq.Context.instance(), server.endpoint, "m", None, WAIT_S)
        with pytest.raises(IntegrityError, match=message):
            client.fetch_changed_into(2, buffer, len(held), held_blocks)
    finally:
        server.close()
