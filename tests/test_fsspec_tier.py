"""The file-system tier on an object store: s3:// against a local S3-compatible server (moto in
server mode) on loopback, started by the test."""

from __future__ import annotations


import pytest

from viper_lightning import FileSystemTier, ModelPublisher, ModelSubscriber
from viper_lightning.storage._files import FsspecFiles

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, assert_same_weights, perturbed

s3fs = pytest.importorskip("s3fs", reason="the optional 's3' extra (s3fs, moto[server]) is not installed")
pytest.importorskip("moto", reason="the optional 's3' extra (s3fs, moto[server]) is not installed")


def test_versions_round_trip_through_s3(s3, events) -> None:
    tier = FileSystemTier("viper-bucket/models", files=FsspecFiles(s3))
    producer = perturbed(TinyNet(), 8)
    with ModelPublisher("tiny", LOOPBACK_ANY_PORT, tier, dram_versions=0, keep_versions=2,
                        keep_every_version=True) as publisher:
        for seed in range(3):
            publisher.publish(perturbed(producer, seed))
    assert tier.versions("tiny") == [2, 3] and tier.latest("tiny") == 3
    assert s3.exists("viper-bucket/models/tiny/v3/model.safetensors")
    with ModelSubscriber(TinyNet(), "tiny", "tcp://127.0.0.1:1", tier, on_update=events.on_update) as subscriber:
        assert subscriber.wait_for_version(3, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
    assert events.updates[0].route == "pfs"
