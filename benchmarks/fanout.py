"""Updating many inference hosts: time until the last host serves a version, and the bytes the
producer's link carries, against the host count, on an emulated cluster.

    sudo python -m benchmarks.fanout --hosts 1 2 4 8 16 --size-mb 256 --link-gbit 1 \\
        --json OUT.json --plot OUT.png

Each host is a network namespace on one bridge, its link shaped by `tc` to `--link-gbit` each
way (tests/_cluster.py; root needed). The producer runs on one host, one consumer process on
each of the others. Strategies:
- `star`: today's direct fetch: every host streams the version from the producer over ZeroMQ
  (route `dram-zmq`), so the producer's link carries one copy per host;
- `fanout`: the relay over Gloo (route `relay`, falling back to `dram-zmq`): the producer sends
  one copy, each host passes it on; received into the host's shared copy (`host-shm`, on by
  default), which the host's other consumers would map;
- `pfs`: the file-system tier, a directory every namespace sees. Here that is this machine's
  own disk, not a networked file system, so no link shapes it: it shows what the file system
  costs, not what a parallel file system would over these links.
`fanout` also runs with the replicas switching together (`"together": true`: each loads the
version into standby, reports ready, and swaps on the producer's switch; the producer's
defaults otherwise), so `swap_skew_s` is measured with and without it.
For each strategy and host count, one version is published untimed first (each consumer's
first load, and the relay's first join window), then `--repeat` timed versions: e2e is the
publish call to the last host serving it (every host's weights checked bit-exact against the
producer's), `producer_tx_bytes` what the producer's interface sent meanwhile (its counter),
`swap_skew_s` the spread of the hosts' swap times (and, switching together, `left_out` the
hosts that did not swap on the producer's switch). `raw_tcp_Bps` is a plain socket `sendall`
of the same bytes between two hosts, and `remote_Bps` the single-stream remote path (star, one
host: bytes over its transfer and verify time), both on the same links in the same run.
With `fanout` and more than one host, `dead_host` repeats the relay at the largest host count
with the first host that forwards killed mid-transfer (usually the chain's head): `delay_s` is
how much later the last survivor serves than without, against their `deadline_s` (the
consumers' `fetch_timeout`, its default 10 s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests._cluster import EmulatedCluster, unavailable
from tests._fleet import Fleet

ROUTES = {"star": ["dram-zmq"], "fanout": ["host-shm", "relay", "dram-zmq"], "pfs": ["pfs"]}
WAIT_S = 600.0
_RAW_SERVER = r"""
import socket, sys, time
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
peer, _ = listener.accept()
received, started = 0, None
while chunk := peer.recv(1 << 20):
    started = started or time.perf_counter()
    received += len(chunk)
print(received, time.perf_counter() - started, flush=True)
"""
_RAW_CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as peer:
    peer.sendall(bytes(int(sys.argv[3])))
"""


def measure_raw_tcp(cluster: EmulatedCluster, nbytes: int) -> float:
    """Bytes per second of one plain TCP stream from the first host to the second."""
    sender, receiver = cluster.hosts[0], cluster.hosts[1]
    server = cluster.spawn(receiver, [sys.executable, "-c", _RAW_SERVER, receiver.address],
                           stdout=subprocess.PIPE, text=True)
    port = server.stdout.readline().strip()
    cluster.spawn(sender, [sys.executable, "-c", _RAW_CLIENT, receiver.address, port, str(nbytes)]).wait(WAIT_S)
    received, seconds = server.stdout.readline().split()
    server.wait(WAIT_S)
    if int(received) != nbytes:
        raise RuntimeError(f"raw TCP: {received} of {nbytes} bytes arrived")
    return nbytes / float(seconds)


def measure(strategy: str, hosts: int, megabytes: float, link_gbit: float, repeat: int,
            together: bool = False) -> list[dict[str, Any]]:
    """`repeat` timed versions to `hosts` consumers (after one untimed)."""
    with EmulatedCluster(hosts=hosts + 1, link_gbit=link_gbit) as cluster, \
            tempfile.TemporaryDirectory(prefix="viper-fanout-") as workdir:
        fleet = Fleet(cluster, megabytes, Path(workdir), pfs_root=str(Path(workdir) / "pfs") if strategy == "pfs" else None)
        fleet.start_producer(*(["--together"] if together else []))
        for host in cluster.hosts[1:]:
            fleet.add_consumer(host, ROUTES[strategy], together=together)
        results = []
        for seed in range(repeat + 1):
            sent = cluster.tx_bytes(cluster.hosts[0])
            published = fleet.publish(seed)
            updates = list(fleet.served(list(fleet.consumers), published, WAIT_S).values())  # checked bit-exact
            if seed == 0:
                continue  # untimed: each consumer's first load
            times = [update["swapped_at"] for update in updates]
            sent = cluster.tx_bytes(cluster.hosts[0]) - sent
            results.append({"strategy": strategy, "hosts": hosts, "size_bytes": int(megabytes * 1e6) // 4 * 4,
                            "e2e_s": max(times) - published["t"],
                            "producer_tx_bytes": sent,
                            "swap_skew_s": max(times) - min(times), "together": together,
                            "left_out": sum(update["together"] not in (None, "together") for update in updates),
                            "routes": sorted({update["route"] for update in updates}),
                            "transfer_s": statistics.median(update["transfer_s"] + update["verify_s"]
                                                            for update in updates)})
        return results


def measure_dead_host(hosts: int, megabytes: float, link_gbit: float) -> dict[str, Any]:
    """The relay to `hosts` hosts with the first host that forwards killed mid-transfer (the head
    of the chain, as a rule: the worst place), against the same relay without: `delay_s` is how
    much later the last survivor serves, to compare with their `fetch_timeout` (`deadline_s`,
    ModelSubscriber's default)."""
    with EmulatedCluster(hosts=hosts + 1, link_gbit=link_gbit) as cluster, \
            tempfile.TemporaryDirectory(prefix="viper-fanout-") as workdir:
        fleet = Fleet(cluster, megabytes, Path(workdir))
        fleet.start_producer()
        consumers = cluster.hosts[1:]
        for host in consumers:
            fleet.add_consumer(host, ROUTES["fanout"])
        fleet.served(list(fleet.consumers), fleet.publish(0), WAIT_S)  # untimed: each consumer's first load
        published = fleet.publish(1)
        normal = max(u["t"] for u in fleet.served(list(fleet.consumers), published, WAIT_S).values()) - published["t"]
        if fleet.kill_first_forwarder(2, WAIT_S) is None:
            raise RuntimeError("no host forwarded anything: no relay round formed")
        published = fleet.producer.wait_for("published", WAIT_S)
        updates = fleet.served(list(fleet.consumers), published, WAIT_S)  # checked bit-exact
        last = max(u["t"] for u in updates.values()) - published["t"]
        return {"hosts": hosts, "e2e_s": last, "normal_e2e_s": normal, "delay_s": last - normal,
                "deadline_s": fleet.deadline, "routes": sorted({u["route"] for u in updates.values()})}


def run(hosts: list[int], megabytes: float, link_gbit: float, strategies: list[str], repeat: int) -> dict[str, Any]:
    nbytes = int(megabytes * 1e6) // 4 * 4
    with EmulatedCluster(hosts=2, link_gbit=link_gbit) as cluster:
        raw = measure_raw_tcp(cluster, nbytes)
    results = []
    for count in hosts:
        for strategy in strategies:
            print(f"{strategy} to {count} hosts ...", flush=True)
            results += measure(strategy, count, megabytes, link_gbit, repeat)
            if strategy == "fanout":
                print(f"{strategy} to {count} hosts, switching together ...", flush=True)
                results += measure(strategy, count, megabytes, link_gbit, repeat, together=True)
    dead_host = None
    if "fanout" in strategies and max(hosts) > 1:
        print(f"fanout to {max(hosts)} hosts, one killed mid-transfer ...", flush=True)
        dead_host = measure_dead_host(max(hosts), megabytes, link_gbit)
    single = [r for r in results if r["strategy"] == "star" and r["hosts"] == 1]
    remote = statistics.median(r["size_bytes"] / r["transfer_s"] for r in single) if single else None
    return {"host": {"machine": platform.machine(), "cpus": os.cpu_count() or 0, "python": platform.python_version()},
            "link_gbit": link_gbit, "raw_tcp_Bps": raw, "remote_Bps": remote, "results": results,
            "dead_host": dead_host}


def print_summary(report: dict[str, Any]) -> None:
    results = report["results"]
    print(f"\nlink {report['link_gbit']} Gbit/s; raw TCP {report['raw_tcp_Bps'] / 1e6:.0f} MB/s", end="")
    if report["remote_Bps"]:
        print(f"; remote path (one stream) {report['remote_Bps'] / 1e6:.0f} MB/s = "
              f"{report['remote_Bps'] / report['raw_tcp_Bps']:.2f} of raw TCP (aim >= 0.5)")
    print(f"\n{'strategy':<18}{'hosts':>6}{'e2e s':>9}{'x 1 host':>10}{'tx / model':>12}{'skew ms':>9}  routes")
    for result in results:
        one = [r["e2e_s"] for r in results if (r["strategy"], r["together"]) == (result["strategy"], result["together"])
               and r["hosts"] == 1]
        scale = result["e2e_s"] / statistics.median(one) if one else float("nan")
        name = result["strategy"] + (" together" if result["together"] else "")
        print(f"{name:<18}{result['hosts']:>6}{result['e2e_s']:>9.2f}{scale:>10.2f}"
              f"{result['producer_tx_bytes'] / result['size_bytes']:>12.2f}{result['swap_skew_s'] * 1e3:>9.0f}"
              f"  {','.join(result['routes'])}")
    dead = report.get("dead_host")
    if dead:
        print(f"fanout to {dead['hosts']} hosts, the first forwarder killed mid-transfer: the last survivor served "
              f"after {dead['e2e_s']:.2f} s against {dead['normal_e2e_s']:.2f} s without ({dead['delay_s']:.2f} s "
              f"later; deadline {dead['deadline_s']:g} s), by {','.join(dead['routes'])}")
    print("\nchecks (this run):")
    for label, value, aim in checks(report):
        print(f"  {label:<66}{value:>8.3f}   (aim {aim})")


def checks(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    """The figures issue 14 aims for, from this run: (label, value, aim)."""
    results = report["results"]

    def e2e(strategy: str, hosts: int, together: bool = False) -> float:
        found = [r["e2e_s"] for r in results if (r["strategy"], r["hosts"], r["together"]) == (strategy, hosts, together)]
        return statistics.median(found) if found else math.nan

    most = max((r["hosts"] for r in results), default=0)
    measured = [(f"fanout: {most} hosts / 1 host, e2e", e2e("fanout", most) / e2e("fanout", 1), "<= 2"),
                (f"star: {most} hosts / 1 host, e2e", e2e("star", most) / e2e("star", 1), f"about {most}"),
                ("fanout: producer's bytes sent / model bytes, most over host counts",
                 max((r["producer_tx_bytes"] / r["size_bytes"] for r in results if r["strategy"] == "fanout"),
                     default=math.nan), "<= 2"),
                ("remote path / raw TCP, same link", (report["remote_Bps"] or math.nan) / report["raw_tcp_Bps"], ">= 0.5"),
                ("swap skew switching together, most over host counts (s)",
                 max((r["swap_skew_s"] for r in results if r["together"]), default=math.nan), "<= 0.05"),
                ("dead host: delay of the last survivor / its deadline",
                 (report.get("dead_host") or {}).get("delay_s", math.nan)
                 / (report.get("dead_host") or {}).get("deadline_s", math.nan), "<= 1"),
                ("swap skew without, most over host counts (s)",
                 max((r["swap_skew_s"] for r in results if r["strategy"] == "fanout" and not r["together"]),
                     default=math.nan), "for comparison")]
    return [(label, value, aim) for label, value, aim in measured if value == value]


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for strategy, together in dict.fromkeys((r["strategy"], r["together"]) for r in report["results"]):
        points = sorted((r["hosts"], r["e2e_s"]) for r in report["results"]
                        if (r["strategy"], r["together"]) == (strategy, together))
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=strategy + (" (switch together)" if together else ""))
    axis.set_xscale("log", base=2)
    axis.set_xlabel("inference hosts")
    axis.set_ylabel("seconds until the last host serves")
    axis.set_title(f"{report['results'][0]['size_bytes'] / 1e6:.0f} MB over {report['link_gbit']:g} Gbit/s links")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--size-mb", type=float, default=256.0)
    parser.add_argument("--link-gbit", type=float, default=1.0)
    parser.add_argument("--strategies", nargs="+", choices=sorted(ROUTES), default=["star", "fanout", "pfs"])
    parser.add_argument("--repeat", type=int, default=1, help="timed versions per case (after one untimed)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    why = unavailable()
    if why is not None:
        sys.exit(f"benchmarks.fanout needs an emulated cluster: {why}")
    started = time.perf_counter()
    report = run(args.hosts, args.size_mb, args.link_gbit, args.strategies, args.repeat)
    report["wall_s"] = time.perf_counter() - started
    print_summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
