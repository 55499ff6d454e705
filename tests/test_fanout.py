"""Fan-out to many hosts on an emulated cluster (network namespaces on one bridge, `tc`-shaped
links): a relay round over Gloo sends each byte over the producer's link about once, follows
hosts that join and leave, and survives a host killed mid-transfer."""

from __future__ import annotations


import pytest

from ._cluster import EmulatedCluster, unavailable
from ._fleet import Fleet

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no emulated cluster: {unavailable()}")

WAIT_S = 60.0


def _served(fleet: Fleet, names: list[str], published: dict, timeout: float = WAIT_S) -> dict[str, dict]:
    """Each named consumer's update to the published version, checked bit-exact."""
    return fleet.served(names, published, timeout)


def test_relay_sends_each_byte_once_over_the_producers_link_as_hosts_join_and_leave(tmp_path) -> None:
    megabytes = 16.0
    with EmulatedCluster(hosts=4, link_gbit=1.0) as cluster:
        fleet = Fleet(cluster, megabytes, tmp_path)
        fleet.start_producer()
        producer_host = cluster.hosts[0]
        names = [host.name for host in cluster.hosts[1:]]
        for host in cluster.hosts[1:]:
            fleet.add_consumer(host)

        def fanned_out(seed: int, members: list[str], copies: int = 1) -> None:
            sent = cluster.tx_bytes(producer_host)
            published = fleet.publish(seed)
            updates = _served(fleet, members, published)
            assert {update["route"] for update in updates.values()} == {"relay"}, updates
            moved = cluster.tx_bytes(producer_host) - sent
            # a star would send len(members) copies; the relay `copies`, plus headers and notices
            assert moved < (copies + 0.25) * megabytes * 1e6, \
                f"the producer sent {moved} bytes for {len(members)} hosts"

        fanned_out(1, names)
        fleet.consumers.pop(names[2]).stop(WAIT_S)  # a host leaves between versions
        fanned_out(2, names[:2])
        fleet.add_consumer(cluster.hosts[3])  # and joins again, as a new consumer:
        fanned_out(3, names, copies=2)  # a round of its own if it asks after the others are back,
        fanned_out(4, names)  # and in theirs from the next version on


def test_consumers_on_one_host_draw_each_version_over_its_link_once(tmp_path) -> None:
    """Two consumers on one host: one joins the relay, the other maps its copy (host-shm), so the
    host's link carries the model once per version; a host with one consumer relays as before."""
    megabytes = 16.0
    with EmulatedCluster(hosts=3, link_gbit=1.0) as cluster:
        fleet = Fleet(cluster, megabytes, tmp_path)
        fleet.start_producer()
        shared, alone = cluster.hosts[1], cluster.hosts[2]
        fleet.add_consumer(shared, name="shared-a")
        fleet.add_consumer(shared, name="shared-b")
        fleet.add_consumer(alone)
        for seed in (1, 2):
            received = cluster.rx_bytes(shared)
            published = fleet.publish(seed)
            updates = _served(fleet, ["shared-a", "shared-b", alone.name], published)
            assert sorted(updates[name]["route"] for name in ("shared-a", "shared-b")) == ["host-shm", "relay"], \
                updates
            assert updates[alone.name]["route"] == "relay", updates
            moved = cluster.rx_bytes(shared) - received
            assert moved < 1.25 * megabytes * 1e6, f"the host of two consumers received {moved} bytes for one version"


def test_a_host_killed_mid_transfer_delays_the_others_by_at_most_the_deadline(tmp_path) -> None:
    """Those after it in the chain give up on it after half their deadline at most (at once where
    Gloo reports its closed connections) and form a new round in the other half."""
    megabytes, link_gbit = 16.0, 0.1  # a copy takes 1.3 s over a link, against the default deadline of 10 s
    with EmulatedCluster(hosts=4, link_gbit=link_gbit) as cluster:
        fleet = Fleet(cluster, megabytes, tmp_path)
        deadline = fleet.deadline
        fleet.start_producer()
        for host in cluster.hosts[1:]:
            fleet.add_consumer(host)
        _served(fleet, list(fleet.consumers), fleet.publish(0))  # each consumer's first load
        published = fleet.publish(1)
        normal = max(u["t"] for u in _served(fleet, list(fleet.consumers), published).values()) - published["t"]
        victim = fleet.kill_first_forwarder(2, WAIT_S)
        assert victim is not None, "no consumer forwarded anything: no relay round formed"
        published = fleet.producer.wait_for("published", WAIT_S)
        updates = _served(fleet, list(fleet.consumers), published)
        # those after it asked again as a new round, rather than each fetching over the producer's link
        assert {update["route"] for update in updates.values()} == {"relay"}, updates
        delays = {name: round(update["t"] - published["t"] - normal, 2) for name, update in updates.items()}
        assert max(delays.values()) <= deadline, \
            f"hosts were delayed past their deadline of {deadline} s (seconds, against {normal:.2f} s): {delays}; " \
            f"the producer's stderr ends:\n{fleet.producer.stderr()}"


def test_replicas_switch_together_and_one_not_ready_by_the_deadline_is_left_out(tmp_path) -> None:
    megabytes, deadline = 4.0, 2.0
    with EmulatedCluster(hosts=4, link_gbit=1.0) as cluster:
        fleet = Fleet(cluster, megabytes, tmp_path)
        fleet.start_producer("--together", "--together-deadline", str(deadline))
        names = [host.name for host in cluster.hosts[1:]]
        for host in cluster.hosts[1:]:
            fleet.add_consumer(host, ["dram-zmq"], together=True)

        def swaps(updates: dict[str, dict]) -> str:
            return ", ".join(f"{name} {u['together']} at {u['swapped_at']:.3f}" for name, u in updates.items())

        # the first switch waits its deadline (nobody to wait for yet), then everyone swaps at once
        updates = _served(fleet, names, fleet.publish(1))
        assert {u["together"] for u in updates.values()} == {"together"}, swaps(updates)
        times = [u["swapped_at"] for u in updates.values()]
        assert max(times) - min(times) <= 0.05, swaps(updates)

        slow = cluster.hosts[3]
        cluster.reshape(slow, 0.005)  # its 4 MB now take 6.4 s, past the deadline
        published = fleet.publish(2)
        updates = _served(fleet, names, published)
        fast = {name: u for name, u in updates.items() if name != slow.name}
        assert {u["together"] for u in fast.values()} == {"together"}, swaps(updates)
        times = [u["swapped_at"] for u in fast.values()]
        assert max(times) - min(times) <= 0.05, swaps(updates)
        assert max(times) - published["t"] < deadline + 1.5, swaps(updates)  # nobody waited for the slow one
        assert updates[slow.name]["together"] == "left-out", swaps(updates)
        assert updates[slow.name]["swapped_at"] > max(times), swaps(updates)

        # a replica left out is waited for from the next version on: it reported ready all the same
        cluster.reshape(slow, 0.03)  # within the deadline again: its 4 MB take about 1.1 s
        updates = _served(fleet, names, fleet.publish(3))
        assert {u["together"] for u in updates.values()} == {"together"}, swaps(updates)
        times = [u["swapped_at"] for u in updates.values()]
        assert max(times) - min(times) <= 0.05, swaps(updates)
