"""An emulated cluster on one machine: each host a network namespace (with its own host name),
all joined to one bridge through veth pairs, each link shaped by `tc`, each with a /dev/shm of
its own (processes on one host share memory, as on a real one; hosts do not).

    with EmulatedCluster(hosts=4, link_gbit=1.0) as cluster:
        producer = cluster.spawn(cluster.hosts[0], [sys.executable, "-m", "some.module"])
        ...

Shared by the tests and `benchmarks.fanout`. Everything it makes lives in namespaces it made:
the bridge sits in a "switch" namespace of its own, so the machine's own interfaces, routes and
firewall are never touched, and traffic between hosts stays on the bridge. Leaving the block
always kills the processes it spawned and deletes the namespaces (their interfaces go with
them), also when setup or the test failed. `unavailable()` says why no cluster can be made
here (not root, no `ip`), for a test to skip with.

Each host's link is shaped in both directions with a token bucket (`tbf`): the host's egress
is its uplink and the switch port's egress its downlink. The link's delay is not emulated:
delay needs the `netem` qdisc, which some kernels (this project's CI machines among them) do
not build; at the transfer sizes measured here the link's rate, not a fraction of a
millisecond, sets the time. `delay_supported()` says whether netem exists, and `delay_ms`
is applied when it does.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

__all__ = ["EmulatedCluster", "Host", "unavailable", "delay_supported"]

SUBNET = "10.213.0"  # hosts are SUBNET.1, SUBNET.2, ...; only inside the namespaces made here
TIMER_TICK_S = 0.004  # tbf's bucket must hold a timer tick of link time: 4 ms covers HZ >= 250
QUEUE_S = 0.05  # how long a packet may wait in a link's queue before it is dropped
_serial = itertools.count()


@dataclass(frozen=True)
class Host:
    name: str  # its host name inside its namespaces (what socket.gethostname() says there)
    namespace: str
    address: str  # on the bridge


def unavailable() -> str | None:
    """Why no emulated cluster can be made on this machine, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root or in a privileged container"
    for tool in ("ip", "tc", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    return None


def delay_supported() -> bool:
    """Whether this kernel has the netem qdisc (link delay)."""
    probe = f"vpdly{os.getpid() % 100000}"
    try:
        _ip("link", "add", probe, "type", "dummy")
    except subprocess.CalledProcessError:
        return False
    try:
        return subprocess.run(["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "link", "del", probe], capture_output=True)


class EmulatedCluster:
    """`hosts` namespaces on one bridge, each link `link_gbit` Gbit/s each way (None: unshaped),
    plus `delay_ms` one way where the kernel has netem."""

    def __init__(self, hosts: int, link_gbit: float | None = 1.0, delay_ms: float = 0.0) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts={hosts}: use 1 to 250")
        self.link_gbit, self.delay_ms = link_gbit, delay_ms
        tag = f"vp{os.getpid() % 100000}x{next(_serial)}"
        self._switch = f"{tag}-sw"
        self.hosts = [Host(f"{tag}-h{index}", f"{tag}-h{index}", f"{SUBNET}.{index + 1}") for index in range(hosts)]
        self._made: list[str] = []
        self._spawned: list[subprocess.Popen] = []
        self._shm = ""  # a directory per host, mounted as that host's /dev/shm

    def __enter__(self) -> EmulatedCluster:
        why = unavailable()
        if why is not None:
            raise RuntimeError(f"cannot make an emulated cluster: {why}")
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def spawn(self, host: Host, argv: list[str], **popen: Any) -> subprocess.Popen:
        """Run `argv` on `host`: in its network namespace, under its host name, with its own
        /dev/shm (`ip netns exec` gives each process a mount namespace that does not pass its
        mounts back, so the host's directory is bound there for this process alone)."""
        command = ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "sh", "-c",
                   'hostname "$0" && mount --bind "$1" /dev/shm && shift && exec "$@"', host.name,
                   os.path.join(self._shm, host.name), *argv]
        process = subprocess.Popen(command, start_new_session=True, **popen)
        self._spawned.append(process)
        return process

    def reshape(self, host: Host, link_gbit: float) -> None:
        """Give `host`'s link another rate, both ways (a slow host among fast ones)."""
        index = self.hosts.index(host)
        for namespace, device in ((host.namespace, "eth0"), (self._switch, f"p{index}")):
            subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"], capture_output=True)
            self._shape(namespace, device, 0.0, link_gbit)

    def tx_bytes(self, host: Host) -> int:
        """Bytes `host` has sent on its link (its interface's counter)."""
        return self._counter(host, "tx")

    def rx_bytes(self, host: Host) -> int:
        """Bytes `host` has received on its link."""
        return self._counter(host, "rx")

    @staticmethod
    def _counter(host: Host, direction: str) -> int:
        shown = subprocess.run(["ip", "-n", host.namespace, "-s", "-j", "link", "show", "eth0"],
                               check=True, capture_output=True, text=True).stdout
        return int(json.loads(shown)[0]["stats64"][direction]["bytes"])

    def close(self) -> None:
        """Kill what was spawned here, then delete the namespaces (their links go with them)."""
        for process in self._spawned:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
        self._spawned.clear()
        for namespace in reversed(self._made):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self._made.clear()
        if self._shm:
            shutil.rmtree(self._shm, ignore_errors=True)
            self._shm = ""

    def _make(self) -> None:
        self._shm = tempfile.mkdtemp(prefix=f"{self._switch}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        for host in self.hosts:
            os.mkdir(os.path.join(self._shm, host.name), 0o1777)
            os.chmod(os.path.join(self._shm, host.name), 0o1777)  # as /dev/shm is (mkdir applies the umask)
        self._namespace(self._switch)
        _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._switch, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts):
            self._namespace(host.namespace)
            port = f"p{index}"
            _ip("link", "add", "eth0", "netns", host.namespace, "type", "veth", "peer", "name", port,
                "netns", self._switch)
            _ip("-n", self._switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            self._shape(host.namespace, "eth0", self.delay_ms, self.link_gbit)  # uplink
            self._shape(self._switch, port, 0.0, self.link_gbit)  # downlink

    def _namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    @staticmethod
    def _shape(namespace: str, device: str, delay_ms: float, link_gbit: float | None) -> None:
        if link_gbit is None and not delay_ms:
            return
        tc = ["tc", "-n", namespace, "qdisc", "add", "dev", device]
        if delay_ms:
            rate = [] if link_gbit is None else ["rate", f"{link_gbit}gbit"]
            subprocess.run([*tc, "root", "netem", "delay", f"{delay_ms}ms", *rate], check=True, capture_output=True)
            return
        bytes_per_s = link_gbit * 1e9 / 8
        burst = max(64 * 1024, int(bytes_per_s * TIMER_TICK_S))
        subprocess.run([*tc, "root", "tbf", "rate", f"{link_gbit}gbit", "burst", str(burst),
                        "latency", f"{QUEUE_S * 1e3:g}ms"], check=True, capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
