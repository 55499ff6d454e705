"""Keyed digests (issue 11, DESIGN §6): with a key, bytes that come over a network or from shared
storage are vouched for by keyed BLAKE3, which only key holders can compute. xxh3 is no defence
against a writer on the storage or a peer on the network: anyone can make bytes match it."""

from __future__ import annotations

import pytest
import torch

from viper_lightning import FileSystemTier, IntegrityError, ModelPublisher, Notice, take_snapshot
from viper_lightning._buffers import allocate_buffer
from viper_lightning._digest import KEYED, PLAIN, Digester, digest_buffer
from viper_lightning.transport._collective import CollectiveClient
from viper_lightning.transport._fetch import FetchClient

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, perturbed

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def test_a_keyed_digest_depends_on_the_key_and_streams_like_one_pass() -> None:
    data = take_snapshot(perturbed(TinyNet(), 1).state_dict()).data
    keyed = digest_buffer(data, KEY)
    assert keyed.startswith(f"{KEYED}:") and digest_buffer(data, None).startswith(f"{PLAIN}:")
    assert keyed != digest_buffer(data, OTHER_KEY)
    streamed = Digester(KEY)
    for start in range(0, data.numel(), 1000):
        streamed.update(data[start:start + 1000])
    assert streamed.hexdigest() == keyed


@pytest.mark.parametrize("route", ["pfs", "dram-zmq", "collective"])
def test_a_keyed_producer_vouches_for_its_bytes_with_keyed_blake3_on_every_copying_route(route, model_name,
                                                                                         pfs_root,
                                                                                         zmq_context) -> None:
    producer = perturbed(TinyNet(), 2)
    expected = digest_buffer(take_snapshot(producer.state_dict()).data, KEY)
    collective = "gloo://127.0.0.1:0" if route == "collective" else None
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, hmac_key=KEY,
                        collective_endpoint=collective) as publisher:
        version = publisher.publish(producer)
        buffer = allocate_buffer(take_snapshot(producer.state_dict()).layout.nbytes)
        if route == "pfs":
            assert publisher.flush(WAIT_S)
            tier = FileSystemTier(pfs_root)
            notice = tier.read_manifest(model_name, version, KEY)
            tier.read_into(notice, buffer, key=KEY)
            served = notice.digest
        elif route == "dram-zmq":
            client = FetchClient(zmq_context, publisher.fetch_endpoint, model_name, KEY, WAIT_S)
            served, _ = client.fetch_into(version, buffer, buffer.numel())
        else:
            served, _ = CollectiveClient(publisher.collective_endpoint, WAIT_S, KEY).fetch_into(
                version, buffer, buffer.numel())
    assert served == expected
    assert torch.equal(buffer, take_snapshot(producer.state_dict()).data)


def test_a_keyed_reader_refuses_bytes_vouched_for_by_xxh3_alone(pfs_root) -> None:
    """A signed manifest that vouches with xxh3 (an old or misconfigured producer) leaves the
    bytes forgeable by whoever can write the storage: a keyed reader refuses it by name."""
    tier = FileSystemTier(pfs_root)
    snapshot = take_snapshot(TinyNet().state_dict())
    notice = Notice(model="tiny", version=1, nbytes=snapshot.layout.nbytes, digest=digest_buffer(snapshot.data),
                    layout=snapshot.layout, producer="test")
    tier.write(notice, snapshot.data, notice.encode(KEY, with_locations=False))
    manifest = tier.read_manifest("tiny", 1, KEY)  # the MAC is good
    with pytest.raises(IntegrityError, match="announced as 'xxh3_128_blocks'.*verifies with 'blake3_keyed_blocks'"):
        tier.read_into(manifest, allocate_buffer(manifest.nbytes), key=KEY)


@pytest.mark.parametrize("legacy", ["xxh3_128", "blake3_keyed"])
def test_a_version_digested_before_the_block_digest_is_refused_with_the_reason(pfs_root, legacy) -> None:
    """A release before the block digest wrote whole-buffer digests: its versions are refused,
    and the message says why and what to do, not that the bytes were damaged."""
    tier = FileSystemTier(pfs_root)
    snapshot = take_snapshot(TinyNet().state_dict())
    notice = Notice(model="tiny", version=1, nbytes=snapshot.layout.nbytes, digest=f"{legacy}:{'0' * 32}",
                    layout=snapshot.layout, producer="test")
    tier.write(notice, snapshot.data, notice.encode(KEY, with_locations=False))
    manifest = tier.read_manifest("tiny", 1, KEY)
    with pytest.raises(IntegrityError, match="older than the block digest: publish the version again"):
        tier.read_into(manifest, allocate_buffer(manifest.nbytes), key=KEY)


def test_a_storage_writer_without_the_key_cannot_make_forged_bytes_pass(pfs_root) -> None:
    """The attacker rewrites the weights and recomputes every digest it can: without the key, the
    keyed one it cannot, so the signed manifest's digest no longer matches."""
    tier = FileSystemTier(pfs_root)
    honest = take_snapshot(TinyNet().state_dict())
    notice = Notice(model="tiny", version=1, nbytes=honest.layout.nbytes, digest=digest_buffer(honest.data, KEY),
                    layout=honest.layout, producer="test")
    tier.write(notice, honest.data, notice.encode(KEY, with_locations=False))
    forged = take_snapshot(perturbed(TinyNet(), 9).state_dict())
    path = f"{tier.version_dir('tiny', 1)}/model.safetensors"
    with open(path, "r+b") as handle:
        handle.seek(-forged.layout.nbytes, 2)
        handle.write(forged.data.numpy().tobytes())
    manifest = tier.read_manifest("tiny", 1, KEY)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        tier.read_into(manifest, allocate_buffer(manifest.nbytes), key=KEY)
