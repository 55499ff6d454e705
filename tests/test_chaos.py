"""Chaos (issue 11): a real Lightning run publishes every few steps while consumer processes
serve it, and at fixed steps the test stops, resumes and kills consumers, sends garbage to every
endpoint the producer binds, and fills the file system under the file-system tier. Training must
finish every step; every surviving consumer converges to the final version; every answer any
consumer gave came from exactly the weights the producer published under that version."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch.distributed as dist
import zmq

from viper_lightning import FileSystemTier, ViperCallback, take_snapshot
from viper_lightning._digest import digest_buffer
from viper_lightning.schedules import EveryNSteps
from viper_lightning.storage._keys import key_file_for

from ._consumer_process import serve_and_record
from .conftest import LOOPBACK_ANY_PORT
from .lightning_models import Regressor

WAIT_S = 60.0
STEPS = 300
EVERY = 5
# (routes of each consumer): the default plan (shared memory first), the remote path, the collective
ROUTES = {"shm": None, "zmq": ["dram-zmq", "pfs"], "gloo": ["collective", "pfs"]}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs the test can fill; skipped where mounting is not allowed (not root)."""
    mount_point = tmp_path / "pfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or mounted.returncode}); "
                    "the chaos test fills one, run it as root")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class Consumers:
    """Consumer processes, each answering from leased versions and logging what it answered."""

    def __init__(self, model_name: str, pfs_root: str, logs: Path) -> None:
        self._spawn = multiprocessing.get_context("spawn")
        self.model_name, self.pfs_root, self.logs = model_name, pfs_root, logs
        self.final_version = self._spawn.Value("q", 0, lock=False)  # set once: the run is over
        self.processes: dict[str, multiprocessing.Process] = {}
        self.killed: set[str] = set()

    def start(self, name: str, routes: list[str] | None, endpoint: str) -> None:
        ready = self._spawn.Event()
        process = self._spawn.Process(target=serve_and_record, daemon=True, args=(
            Regressor, self.model_name, endpoint, self.pfs_root, routes, str(self.logs / f"{name}.jsonl"),
            ready, self.final_version))
        process.start()
        self.processes[name] = process
        if not ready.wait(WAIT_S):
            raise AssertionError(f"consumer {name} never became ready")

    def answers(self, name: str) -> list[dict]:
        path = self.logs / f"{name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def wait_until_all_served(self, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.answers(name) for name in self.processes):
            if time.monotonic() > deadline:
                raise AssertionError("not every consumer served a version in time")
            time.sleep(0.05)  # a poll with a deadline

    def signal(self, name: str, signum: int) -> None:
        os.kill(self.processes[name].pid, signum)
        if signum == signal.SIGKILL:
            self.killed.add(name)
            self.processes[name].join(WAIT_S)

    def finish(self, final_version: int) -> None:
        self.final_version.value = final_version
        for process in self.processes.values():
            process.join(WAIT_S * 2)
            if process.is_alive():
                process.kill()

    def close(self) -> None:
        for name, process in self.processes.items():
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                process.kill()
                process.join(WAIT_S)


def raw_tcp_garbage(endpoint: str) -> None:
    """Bytes that are not ZMTP (nor the TCPStore's protocol), then a vanished peer."""
    host, port = endpoint.removeprefix("tcp://").removeprefix("gloo://").rsplit(":", 1)
    for garbage in [b"\xff" * 64, b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096)]:
        with socket.create_connection((host, int(port)), timeout=5) as peer:
            peer.sendall(garbage)


def zmq_garbage(context: zmq.Context, fetch_endpoint: str, model_name: str, version: int) -> None:
    """Malformed requests from peers that vanish, and a peer that asks for many chunks and never
    reads them."""
    for garbage in [b"\xff" * 64, b"{", b'{"proto": 1}', b"[" * 10_000, b"[]"] * 5:
        with context.socket(zmq.DEALER) as peer:
            peer.setsockopt(zmq.LINGER, 100)
            peer.connect(fetch_endpoint)
            peer.send(garbage)
    with context.socket(zmq.DEALER) as hog:
        hog.setsockopt(zmq.LINGER, 0)
        hog.setsockopt(zmq.RCVHWM, 1)
        hog.connect(fetch_endpoint)
        read = json.dumps({"proto": 1, "model": model_name, "op": "read", "version": version, "offset": 0,
                           "length": 1024}).encode()
        for _ in range(500):
            hog.send(read)


def collective_garbage(address: str) -> None:
    """Requests that are not JSON, nested too deep, or not requests at all, written straight
    into the collective server's store."""
    host, port = address.removeprefix("gloo://").rsplit(":", 1)
    store = dist.TCPStore(host, int(port), None, False, timedelta(seconds=5), wait_for_workers=False)
    ticket = int(store.get("viper/next"))
    for offset, garbage in enumerate([b"\x80not json", b"[" * 100_000, b'{"proto": 1, "version": "x"}']):
        store.compare_set(f"viper/req/{ticket + offset}", b"", garbage)


def fill(directory: Path) -> Path:
    """Fill the file system holding `directory` until it refuses another byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


class Chaos(L.Callback):
    """Runs after the ViperCallback in each hook: records what each version holds and injects
    the faults at fixed steps."""

    def __init__(self, viper: ViperCallback, consumers: Consumers, disk: Path) -> None:
        self.viper, self.consumers, self.disk = viper, consumers, disk
        self.published: dict[int, str] = {}
        self.degraded_seen = False
        self._filler: Path | None = None
        self._context = zmq.Context()

    def on_train_start(self, trainer, pl_module) -> None:
        endpoint = self.viper.publisher.endpoint
        for name, routes in ROUTES.items():
            self.consumers.start(name, routes, endpoint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module)
        step, publisher = trainer.global_step, self.viper.publisher
        if step == 30:
            self.consumers.wait_until_all_served()
        elif step == 50:
            self.consumers.signal("shm", signal.SIGSTOP)  # it may hold pins on shared memory
        elif step in (70, 220):
            raw_tcp_garbage(publisher.endpoint)
            raw_tcp_garbage(publisher.fetch_endpoint)
            raw_tcp_garbage(publisher.collective_endpoint)
            zmq_garbage(self._context, publisher.fetch_endpoint, publisher.model_name, self.viper.last_version)
            collective_garbage(publisher.collective_endpoint)
        elif step == 90:
            self._filler = fill(self.disk)
        elif step == 100:
            self.degraded_seen = _wait_for(lambda: publisher.health["file-system tier"].startswith("degraded"))
        elif step == 150:
            self.consumers.signal("zmq", signal.SIGKILL)
            self.consumers.start("late", None, publisher.endpoint)  # joins late, while the disk is full
        elif step == 180:
            self.consumers.signal("shm", signal.SIGCONT)
        elif step == 200:
            self._filler.unlink()

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(pl_module)
        self._context.destroy(linger=0)

    def _record(self, pl_module) -> None:
        version = self.viper.last_version
        if version and version not in self.published:
            self.published[version] = digest_buffer(take_snapshot(pl_module.state_dict()).data)


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # a poll with a deadline, on the training thread the test controls
    return True


@pytest.mark.timeout(900)  # its waits are bounded, and add up to more than the default on a loaded machine
def test_training_survives_chaos_and_every_answer_comes_from_published_weights(tmp_path, small_disk,
                                                                                model_name) -> None:
    logs = tmp_path / "answers"
    logs.mkdir()
    viper = ViperCallback(model_name, LOOPBACK_ANY_PORT, str(small_disk), schedule=EveryNSteps(EVERY),
                          collective_endpoint="gloo://127.0.0.1:0", heartbeat_interval=0.2)
    consumers = Consumers(model_name, str(small_disk), logs)
    chaos = Chaos(viper, consumers, small_disk)
    trainer = L.Trainer(callbacks=[viper, chaos], max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    try:
        trainer.fit(Regressor())
        consumers.finish(viper.last_version)
    finally:
        consumers.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(key_file_for(model_name))

    assert trainer.global_step == STEPS  # every step trained
    final = viper.last_version
    assert final == STEPS // EVERY and sorted(chaos.published) == list(range(1, final + 1))
    assert chaos.degraded_seen, "the full disk was never reported as a degraded file-system tier"
    assert FileSystemTier(str(small_disk)).latest(model_name) == final  # the tier recovered
    survivors = [name for name in consumers.processes if name not in consumers.killed]
    assert sorted(survivors) == ["gloo", "late", "shm"]
    for name in consumers.processes:
        lines = consumers.answers(name)
        answers = [line for line in lines if "digest" in line]
        for answer in answers:
            version = answer.get("version", answer.get("final"))
            assert answer["digest"] == chaos.published[version], \
                f"consumer {name} answered with weights that are not version {version}'s"
        if name in survivors:
            assert answers and answers[-1].get("final") == final and answers[-1]["reached"], \
                f"consumer {name} did not converge to v{final}: {answers[-1:]}"
            assert len(answers) >= 3, f"consumer {name} followed too little of the run: {answers}"
    # the routes the garbage attacked kept serving after it
    assert _applied_via(consumers.answers("zmq"), "dram-zmq", after=70 // EVERY), consumers.answers("zmq")
    assert _applied_via(consumers.answers("gloo"), "collective", after=220 // EVERY), consumers.answers("gloo")


def _applied_via(lines: list[dict], route: str, after: int) -> bool:
    return any(line.get("route") == route and line["applied"] > after for line in lines)
