"""The file-system tier on an object store: s3:// against a local S3-compatible server (moto in
server mode) on loopback, started by the test."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from viper_lightning import FileSystemTier, ModelPublisher, ModelSubscriber
from viper_lightning.storage._files import FsspecFiles

from .conftest import LOOPBACK_ANY_PORT, free_port, WAIT_S, TinyNet, assert_same_weights, perturbed

s3fs = pytest.importorskip("s3fs", reason="the optional 's3' extra (s3fs, moto[server]) is not installed")
pytest.importorskip("moto", reason="the optional 's3' extra (s3fs, moto[server]) is not installed")


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Readiness probe: poll the server until it answers, its process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            pause.wait(0.05)
    raise AssertionError(f"the S3 server at {url} never became ready")


@pytest.fixture
def s3(tmp_path):
    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", server, WAIT_S)
        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={
            "endpoint_url": f"http://127.0.0.1:{port}", "region_name": "eu-west-1"})
        fs.mkdir("viper-bucket")
        yield fs
    finally:
        server.terminate()
        server.wait(WAIT_S)
        log.close()


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
