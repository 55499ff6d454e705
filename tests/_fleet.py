"""A producer and consumers on an emulated cluster, each a `_cluster_node` process on its own
host, driven through their JSON lines. Shared by the tests and `benchmarks.fanout`."""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ._cluster import EmulatedCluster, Host

__all__ = ["Fleet", "Node"]

_ROOT = Path(__file__).resolve().parent.parent  # the nodes import this checkout, as the spawner does
FORWARDED_BYTES = 1_000_000  # sent by a consumer's host: it is relaying to the next one
_COUNTER_POLL_S = 0.005


class Node:
    """One `_cluster_node` process: its events in order, its stderr kept for error messages."""

    def __init__(self, host: Host, process: subprocess.Popen) -> None:
        self.host, self.process = host, process
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=40)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def wait_for(self, event: str, timeout: float, **fields: object) -> dict:
        """The next event named `event` (with these fields), skipping others; raises after `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self._events.get(timeout=left)
            except queue.Empty:
                break
            if got is None:
                raise AssertionError(f"{self.host.name} exited ({self.process.poll()}) before {event} {fields}; "
                                     f"its stderr ends:\n{self.stderr()}")
            if got.get("event") == event and all(got.get(k) == v for k, v in fields.items()):
                return got
        raise AssertionError(f"{self.host.name}: no {event} {fields} within {timeout:g} s; its stderr ends:\n"
                             f"{self.stderr()}")

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self, timeout: float) -> None:
        """Close its stdin (it leaves cleanly) and wait for it to exit."""
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait(timeout)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stderr(self) -> str:
        return "".join(self._stderr)

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                self._stderr.append(line)
        self._events.put(None)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line)


class Fleet:
    """The producer on the cluster's first host, consumers on the others."""

    def __init__(self, cluster: EmulatedCluster, megabytes: float, key_dir: Path, *, deadline: float = 10.0,
                 start_timeout: float = 120.0, pfs_root: str | None = None) -> None:
        self.cluster, self.megabytes, self.deadline = cluster, megabytes, deadline
        self.pfs_root = pfs_root  # a directory every host sees (None: no file-system tier)
        self.start_timeout = start_timeout
        self.key_file = key_dir / "fleet.key"
        self.key_file.write_bytes(secrets.token_bytes(32))
        self.key_file.chmod(0o600)
        self.producer: Node | None = None
        self.endpoint = ""
        self.consumers: dict[str, Node] = {}

    def start_producer(self, *options: str) -> Node:
        """The producer, with `_cluster_node` producer options (e.g. "--together", "--quorum", "2")."""
        host = self.cluster.hosts[0]
        self.producer = self._spawn(host, "producer", "--address", host.address, *options)
        self.endpoint = self.producer.wait_for("ready", self.start_timeout)["endpoint"]
        return self.producer

    def add_consumer(self, host: Host, routes: list[str] | None = None, *, together: bool = False,
                     name: str | None = None) -> Node:
        """A consumer process on `host`, known as `name` (default: the host's name)."""
        extra = (["--routes", *routes] if routes else []) + (["--together"] if together else [])
        node = self._spawn(host, "consumer", "--endpoint", self.endpoint, "--deadline", str(self.deadline), *extra)
        node.wait_for("ready", self.start_timeout)
        self.consumers[name or host.name] = node
        return node

    def served(self, names: list[str], published: dict, timeout: float) -> dict[str, dict]:
        """Each named consumer's update to the published version, once all have it; then each
        is asked for the SHA-256 of the weights it serves, which must be the producer's."""
        updates = {name: self.consumers[name].wait_for("updated", timeout, version=published["version"])
                   for name in names}
        for name in names:
            self.consumers[name].send("sha")
        for name in names:
            served = self.consumers[name].wait_for("sha", timeout)
            if (served["version"], served["sha256"]) != (published["version"], published["sha256"]):
                raise AssertionError(f"{name} serves version {served['version']} with SHA-256 {served['sha256']}, "
                                     f"not version {published['version']} as published ({published['sha256']})")
        return updates

    def kill_first_forwarder(self, seed: int, timeout: float) -> Host | None:
        """Publish `seed` and kill, mid-transfer, the first consumer whose host passes bytes on
        (sends more than FORWARDED_BYTES: someone is after it in the relay); its host, or None
        if none did within `timeout`. The interface counters have no event to wait on: polled."""
        before = {name: self.cluster.tx_bytes(node.host) for name, node in self.consumers.items()}
        self.producer.send(f"publish {seed}")
        deadline, tick = time.monotonic() + timeout, threading.Event()
        while time.monotonic() < deadline:
            for name, node in list(self.consumers.items()):
                if self.cluster.tx_bytes(node.host) - before[name] > FORWARDED_BYTES:
                    self.consumers.pop(name).kill()
                    return node.host
            tick.wait(_COUNTER_POLL_S)
        return None

    def publish(self, seed: int, timeout: float = 60.0) -> dict:
        self.producer.send(f"publish {seed}")
        return self.producer.wait_for("published", timeout)

    def _spawn(self, host: Host, role: str, *args: str) -> Node:
        argv = [sys.executable, "-m", "tests._cluster_node", role, "--megabytes", str(self.megabytes),
                "--key-file", str(self.key_file), *(["--pfs-root", self.pfs_root] if self.pfs_root else []), *args]
        process = self.cluster.spawn(host, argv, cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        return Node(host, process)
