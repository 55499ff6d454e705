"""A hostile local user (issue 11): a real second uid, as a forked child that drops from root to
`nobody`, attacks a keyed-by-default producer with everything a local user can reach: the key
file, the shared-memory segments, the fetch and notice endpoints, the collective's store, and a
world-writable file-system tier. It gets no weights and no forged weights are served."""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import zmq

from viper_lightning import (FileSystemTier, IntegrityError, ModelPublisher, ModelSubscriber, Notice, ViperError,
                             take_snapshot)
from viper_lightning._buffers import allocate_buffer
from viper_lightning._digest import digest_buffer
from viper_lightning.storage._keys import key_file_for, read_key
from viper_lightning.storage._shm import segment_prefix
from viper_lightning.transport._fetch import FetchClient
from viper_lightning.transport._protocol import PROTO

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, perturbed

NOBODY = 65534
FORGED_VERSION = 99

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root to drop to it")


@pytest.fixture
def shared_root():
    """A file-system tier everyone can write, as a careless shared mount would be."""
    root = tempfile.mkdtemp(prefix="viper-shared-")
    os.chmod(root, 0o777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def as_nobody(attack, *args) -> dict[str, str]:
    """Run `attack(*args)` in a forked child as uid/gid nobody; returns what each step got."""
    context = multiprocessing.get_context("fork")  # root's home is private: no new interpreter
    results = context.Queue()

    def child() -> None:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            results.put(attack(*args))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results.put({"crashed": f"{type(exc).__name__}: {exc}"})

    process = context.Process(target=child)
    process.start()
    try:
        return results.get(timeout=WAIT_S * 2)
    finally:
        process.join(WAIT_S)
        if process.is_alive():
            process.kill()


def outcome(step) -> str:
    """'got: ...' if the step succeeded, else the exception's class and message."""
    try:
        return f"got: {step()!r:.80}"
    except Exception as exc:  # noqa: BLE001 - every refusal is a result here
        return f"{type(exc).__name__}: {exc}"


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(64)


def _steal(model: str, fetch_endpoint: str, version: int, nbytes: int) -> dict[str, str]:
    """Everything a local user can try to read the weights with."""
    segments = glob.glob(f"/dev/shm/{segment_prefix(model)}*")
    with zmq.Context() as context:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        return {
            "key file": outcome(lambda: _read(key_file_for(model))),
            "segments": "; ".join(outcome(lambda path=path: _read(path)) for path in segments) or "none found",
            "fetch keyless": outcome(lambda: FetchClient(context, fetch_endpoint, model, None, 5).fetch_into(
                version, buffer, nbytes)),
            "fetch guessed key": outcome(lambda: FetchClient(context, fetch_endpoint, model, b"g" * 32, 5).fetch_into(
                version, buffer, nbytes)),
            "latest keyless": outcome(lambda: FetchClient(context, fetch_endpoint, model, None, 5).latest_notice()),
        }


def test_another_user_reads_neither_key_nor_segments_nor_streams(model_name) -> None:
    producer = perturbed(TinyNet(), 1)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher:
        version = publisher.publish(producer)
        nbytes = take_snapshot(producer.state_dict()).layout.nbytes
        got = as_nobody(_steal, model_name, publisher.fetch_endpoint, version, nbytes)
        assert publisher.health["fetch server"] == "ok"
    with contextlib.suppress(FileNotFoundError):
        os.remove(key_file_for(model_name))
    assert "crashed" not in got, got
    assert got["key file"].startswith("PermissionError"), got
    assert got["segments"] != "none found" and all(
        part.startswith("PermissionError") for part in got["segments"].split("; ")), got
    for step in ("fetch keyless", "fetch guessed key", "latest keyless"):
        assert not got[step].startswith("got:") or got[step] == "got: None", (step, got[step])
    assert "MAC" in got["fetch keyless"] and "MAC" in got["fetch guessed key"], got


def _garbage_everywhere(notice_endpoint: str, fetch_endpoint: str, collective: str) -> dict[str, str]:
    """Bytes that are not the protocol on every port, malformed fetch requests, and requests in
    the collective's store that are not JSON or nest without end."""

    def raw(endpoint: str) -> str:
        host, port = endpoint.split("://")[1].rsplit(":", 1)
        for garbage in (b"\xff" * 64, os.urandom(4096)):
            with socket.create_connection((host, int(port)), timeout=5) as peer:
                peer.sendall(garbage)
        return "sent"

    def fetch_garbage() -> str:
        with zmq.Context() as context:
            for garbage in (b"{", b"[" * 50_000, b'{"proto": 1, "op": "read", "version": 1, "offset": -1}'):
                with context.socket(zmq.DEALER) as peer:
                    peer.setsockopt(zmq.LINGER, 100)
                    peer.connect(fetch_endpoint)
                    peer.send(garbage)
        return "sent"

    def store_garbage() -> str:
        host, port = collective.split("://")[1].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=5), wait_for_workers=False)
        ticket = int(store.get("viper/next"))
        bad_timeouts = [json.dumps({"proto": PROTO, "version": 1, "nbytes": 8, "nonce": "ab" * 8, "relay": True,
                                    "timeout": timeout}).encode() for timeout in (0, -1, 1e30, "soon", True)]
        for offset, garbage in enumerate((b"\x80not json", b"[" * 100_000, *bad_timeouts)):
            store.compare_set(f"viper/req/{ticket + offset}", b"", garbage)
        return "sent"

    return {"notice port": outcome(lambda: raw(notice_endpoint)), "fetch port": outcome(lambda: raw(fetch_endpoint)),
            "collective port": outcome(lambda: raw(collective)), "fetch requests": outcome(fetch_garbage),
            "collective requests": outcome(store_garbage)}


def test_garbage_from_another_user_costs_the_producer_nothing(model_name, events) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, collective_endpoint="gloo://127.0.0.1:0") as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, load_latest=False, routes=["collective"],
                         on_update=events.on_update) as subscriber:
        got = as_nobody(_garbage_everywhere, publisher.endpoint, publisher.fetch_endpoint,
                        publisher.collective_endpoint)
        assert "crashed" not in got and all(step == "got: 'sent'" for step in got.values()), got
        producer = perturbed(TinyNet(), 2)
        version = publisher.publish(producer)  # neither raises nor waits on anything the attacker did
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert all(torch.equal(a, b) for a, b in zip(producer.state_dict().values(),
                                                         served.state_dict().values()))
        assert events.wait_for_updates(1)[0].route == "collective"
        assert all(state == "ok" for state in publisher.health.values()), publisher.health
    with contextlib.suppress(FileNotFoundError):
        os.remove(key_file_for(model_name))


def _forge_storage(root: str, model: str, forged_bytes: bytes) -> dict[str, str]:
    """On a file-system tier it can write: swap the weights of v1 under its signed manifest, and
    plant a whole unsigned version with LATEST pointing at it."""
    directory = os.path.join(root, model)

    def swap_weights() -> str:
        real = os.path.join(directory, "v1")
        fake = os.path.join(directory, "v1.fake")
        shutil.copytree(real, fake)
        weights = os.path.join(fake, "model.safetensors")
        os.chmod(weights, 0o644)
        with open(weights, "r+b") as handle:
            handle.seek(-len(forged_bytes), 2)
            handle.write(forged_bytes)
        os.rename(real, os.path.join(directory, "v1.real"))
        os.rename(fake, real)
        return "swapped"

    def plant_version() -> str:
        planted = os.path.join(directory, f"v{FORGED_VERSION}")
        shutil.copytree(os.path.join(directory, "v1"), planted)
        manifest_path = os.path.join(planted, "manifest.json")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        manifest.pop("mac", None)
        manifest["version"] = FORGED_VERSION
        with open(manifest_path, "w") as handle:
            json.dump(manifest, handle)
        latest = os.path.join(directory, "LATEST")
        os.replace(_write_temp(directory, str(FORGED_VERSION)), latest)
        return "planted"

    return {"swap": outcome(swap_weights), "plant": outcome(plant_version)}


def _write_temp(directory: str, text: str) -> str:
    path = os.path.join(directory, ".forged-latest")
    with open(path, "w") as handle:
        handle.write(text)
    return path


def test_a_writer_on_shared_storage_gets_no_forged_weights_served(model_name, shared_root, events) -> None:
    """xxh3 alone would let the writer craft bytes matching the signed digest; keyed BLAKE3 (only
    key holders compute it) and signed manifests leave it nothing that a consumer applies."""
    honest = perturbed(TinyNet(), 3)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, shared_root) as publisher:
        publisher.publish(honest)
        assert publisher.flush(WAIT_S)
        os.chmod(os.path.join(shared_root, model_name), 0o777)  # shared storage others can write
        forged = take_snapshot(perturbed(TinyNet(), 66).state_dict()).data.numpy().tobytes()
        got = as_nobody(_forge_storage, shared_root, model_name, forged)
        assert got == {"swap": "got: 'swapped'", "plant": "got: 'planted'"}, got

        tier = FileSystemTier(shared_root)
        with ModelSubscriber(TinyNet(), model_name, publisher.endpoint, shared_root, routes=["pfs"],
                             on_update=events.on_update, on_refusal=events.on_refusal) as subscriber:
            refusals = events.wait_for_refusals(1)  # LATEST names the planted, unsigned version
            assert "MAC" in refusals[0].reason and subscriber.version is None, refusals
            second = perturbed(TinyNet(), 4)
            version = publisher.publish(second)
            assert subscriber.wait_for_version(version, WAIT_S)
            with subscriber.serving() as served:
                assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(),
                                                             served.state_dict().values()))
        notice = _signed_manifest(tier, model_name)
        with pytest.raises(IntegrityError, match="digest mismatch"):  # v1's swapped bytes
            tier.read_into(notice, allocate_buffer(notice.nbytes), key=_host_key(model_name))
        assert digest_buffer(take_snapshot(honest.state_dict()).data, _host_key(model_name)) == notice.digest
    with contextlib.suppress(FileNotFoundError):
        os.remove(key_file_for(model_name))


def _host_key(model: str) -> bytes:
    return read_key(model)


def _signed_manifest(tier: FileSystemTier, model: str) -> Notice:
    try:
        return tier.read_manifest(model, 1, _host_key(model))
    except ViperError as exc:
        raise AssertionError(f"v1's manifest is still the producer's, signed: {exc}") from None
