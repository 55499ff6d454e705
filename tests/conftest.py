"""Shared fixtures: real sockets on loopback, real files under tmp_path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from viper_lightning import Refusal, UpdateRecord
from viper_lightning.storage._files import LocalFiles

LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to simulate a full disk")


class FullDisk(LocalFiles):
    """The file seam with every write failing as on a full disk (ENOSPC from /dev/full) while
    `full` holds; set it False and the disk has room again."""

    full = True

    def write_file(self, path, chunks):
        if not self.full:
            return super().write_file(path, chunks)
        with open("/dev/full", "wb") as full:
            for chunk in chunks:
                full.write(chunk)
            full.flush()
WAIT_S = 20.0


class TinyNet(torch.nn.Module):
    """A small model with several dtypes, a buffer and tied weights."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, width)
        self.hidden = torch.nn.Linear(width, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.out = torch.nn.Linear(width, 32, bias=False)
        self.out.weight = self.embed.weight  # tied, as in language models

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.hidden(self.embed(tokens)))))


class Events:
    """Collects a subscriber's callbacks so tests wait on events, never on sleeps."""

    def __init__(self) -> None:
        self.updates: list[UpdateRecord] = []
        self.refusals: list[Refusal] = []
        self._changed = threading.Condition()

    def on_update(self, record: UpdateRecord) -> None:
        with self._changed:
            self.updates.append(record)
            self._changed.notify_all()

    def on_refusal(self, refusal: Refusal) -> None:
        with self._changed:
            self.refusals.append(refusal)
            self._changed.notify_all()

    def wait_for_refusals(self, count: int, timeout: float = WAIT_S) -> list[Refusal]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.refusals) >= count, timeout):
                raise AssertionError(f"expected {count} refusals within {timeout} s, got {self.refusals}")
            return list(self.refusals)

    def wait_for_updates(self, count: int, timeout: float = WAIT_S) -> list[UpdateRecord]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.updates) >= count, timeout):
                raise AssertionError(f"expected {count} updates within {timeout} s, got {self.updates}")
            return list(self.updates)


def free_port() -> int:
    """A loopback port free right now, for servers whose address must be known before they start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Change every floating-point parameter deterministically (a 'training step')."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    return model


def assert_same_weights(expected: torch.nn.Module | dict, actual: torch.nn.Module | dict) -> None:
    expected_sd = expected.state_dict() if isinstance(expected, torch.nn.Module) else expected
    actual_sd = actual.state_dict() if isinstance(actual, torch.nn.Module) else actual
    assert expected_sd.keys() == actual_sd.keys()
    for name, tensor in expected_sd.items():
        assert tensor.dtype == actual_sd[name].dtype, name
        assert torch.equal(tensor, actual_sd[name]), f"tensor {name} differs"


def publish_and_check(publisher, subscriber, producer: torch.nn.Module, events: Events) -> UpdateRecord:
    """Publish once; the subscriber must serve exactly the producer's weights. Returns its record."""
    version = publisher.publish(producer)
    assert subscriber.wait_for_version(version, WAIT_S)
    with subscriber.serving() as served:
        assert_same_weights(producer, served)
    return events.wait_for_updates(1)[0]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def model_name(request) -> str:
    """A model name unique to the test, so /dev/shm checks see only this test's segments."""
    return f"m-{request.node.name[:40].replace('[', '-').replace(']', '')}-{os.getpid()}"


@pytest.fixture
def pfs_root(tmp_path) -> str:
    return str(tmp_path / "pfs")


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()


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
    """A local S3-compatible server (moto) with the bucket `viper-bucket`; its S3FileSystem."""
    s3fs = pytest.importorskip("s3fs", reason="the optional 's3' extra (s3fs, moto[server]) is not installed")
    pytest.importorskip("moto", reason="the optional 's3' extra (s3fs, moto[server]) is not installed")
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
