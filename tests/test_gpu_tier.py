"""The GPU tier: a device-resident copy of the latest version, copied down to DRAM and the file
system in the background, served over CUDA IPC on the host and torch.distributed elsewhere.

Without a GPU the tier runs in host memory (gpu_device="cpu") and is served over Gloo: the
same publish cascade and the same collective code path NCCL takes. What needs CUDA itself
(side streams, IPC handles, NCCL) is marked and skipped with the reason."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading

import pytest
import safetensors.torch
import torch
import zmq

from viper_lightning import (ConfigurationError, FileSystemTier, Layout, Location, ModelPublisher, ModelSubscriber,
                             Notice, TransferError, TransferPlanner)
from viper_lightning.producer._catalog import VersionCatalog, VersionRecord
from viper_lightning.producer._demoter import Demoter
from viper_lightning.producer._device import DeviceTier
from viper_lightning.producer._health import Health
from viper_lightning.producer._store import TieredStore
from viper_lightning.transport._fetch import FetchClient, FetchServer
from viper_lightning.transport._loans import IpcLoan

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, assert_same_weights, perturbed, publish_and_check

KEY = b"a key for the gpu tier tests...."
GLOO = "gloo://127.0.0.1:0"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA side of the GPU tier needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason="NCCL point-to-point between two processes needs two GPUs")


def latest_notice(publisher: ModelPublisher, key: bytes | None = None) -> Notice:
    client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, publisher.model_name, key, WAIT_S)
    return Notice.decode(client.latest_notice(), key)


def test_host_memory_gpu_tier_serves_over_the_collective_path(model_name, events) -> None:
    producer = perturbed(TinyNet(), 1)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY, gpu_device="cpu",
                        collective_endpoint=GLOO) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, hmac_key=KEY, routes=["collective"],
                         load_latest=False, on_update=events.on_update) as subscriber:
        assert publish_and_check(publisher, subscriber, producer, events).route == "collective"


def test_every_tier_holds_the_version_once_the_cascade_settles(model_name, pfs_root, events) -> None:
    producer = perturbed(TinyNet(), 2)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, KEY, gpu_device="cpu",
                        collective_endpoint=GLOO) as publisher:
        version = publisher.publish(producer)
        assert publisher.flush(WAIT_S)
        notice = latest_notice(publisher, KEY)
        assert notice.version == version and notice.digest is not None
        assert sorted({loc.tier for loc in notice.locations}) == ["dram", "gpu", "pfs"]
        assert [loc.address for loc in notice.locations if loc.tier == "gpu"] == [publisher.collective_endpoint]
        for route in ("dram-shm", "pfs"):
            with ModelSubscriber(TinyNet(), model_name, publisher.endpoint, pfs_root, KEY, routes=[route]) as sub:
                assert sub.wait_for_version(version, WAIT_S)
                with sub.serving() as served:
                    assert_same_weights(producer, served)


def test_gpu_tier_alone_with_the_file_system(model_name, pfs_root) -> None:
    """dram_versions=0: the device copy goes straight on to the file system."""
    producer = perturbed(TinyNet(), 3)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, gpu_device="cpu", dram_versions=0) as publisher:
        version = publisher.publish(producer)
        assert publisher.flush(WAIT_S)
        assert publisher.version == version
        endpoint = publisher.endpoint
    with ModelSubscriber(TinyNet(), model_name, endpoint, pfs_root) as subscriber:  # reads LATEST at start
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)


def test_many_publishes_keep_versions_in_order(model_name, pfs_root) -> None:
    models = [perturbed(TinyNet(), seed) for seed in range(6)]
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, gpu_device="cpu", dram_versions=2,
                        keep_every_version=True) as publisher:
        versions = [publisher.publish(model) for model in models]
        assert publisher.flush(WAIT_S)
        assert versions == sorted(versions) and publisher.version == versions[-1]
        assert publisher._store.latest() == versions[-1]
    for version, model in zip(versions, models):
        stored = safetensors.torch.load_file(os.path.join(pfs_root, model_name, f"v{version}", "model.safetensors"))
        assert_same_weights({name: model.state_dict()[name] for name in stored}, stored)  # tied: stored once


def test_device_tier_keeps_the_latest_and_reuses_the_others() -> None:
    tier = DeviceTier("cpu")
    state = TinyNet().state_dict()
    layout = Layout.for_state_dict(state)
    first = tier.capture(layout, state)
    tier.commit(1, first)
    second = tier.capture(layout, state)
    assert second is not first  # the latest is never overwritten
    tier.commit(2, second)
    assert tier.borrow(1) is None and tier.holds(2)
    assert tier.capture(layout, state) is first  # no longer the latest, nobody reads it


def test_device_tier_waits_for_readers_then_gives_up_clearly() -> None:
    tier = DeviceTier("cpu")
    state = TinyNet().state_dict()
    layout = Layout.for_state_dict(state)
    for version in (1, 2, 3):
        tier.commit(version, tier.capture(layout, state))
        assert tier.borrow(version) is not None  # a transfer keeps reading each one
    with pytest.raises(TransferError, match="no free cpu copy within 0.05 s"):
        tier.capture(layout, state, timeout=0.05)


def test_device_tier_hold_is_released_once() -> None:
    tier = DeviceTier("cpu")
    state = TinyNet().state_dict()
    copy = tier.capture(Layout.for_state_dict(state), state)
    release = tier.hold(copy)
    tier.commit(1, copy)
    release()
    release()
    assert copy.borrowers == 0


class FullHostMemory(DeviceTier):
    """The GPU tier kept in host memory, whose copies down to the DRAM tier fail."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.attempted: list[object] = []

    def download(self, copy, target) -> None:
        self.attempted.append(copy)
        raise OSError("host memory is full")


def test_a_failed_demotion_is_kept_and_later_versions_are_not_copied() -> None:
    device, released, health = FullHostMemory(), [], Health()
    catalog = VersionCatalog("m", "here", "producer", 1)
    layout = Layout.for_state_dict(TinyNet().state_dict())
    versions = [catalog.add(VersionRecord(layout, None, None, 0.0)) for _ in range(2)]
    store = TieredStore("m", "here", dram_versions=0)
    demoter = Demoter("m", device, store, catalog, cascade=None, health=health, keeps_borrow=False)  # never reached
    for version in versions:
        demoter.submit(version, f"copy {version}", lambda version=version: released.append(version))
    demoter.close()
    store.close()
    assert device.attempted == ["copy 1"]
    assert [catalog.get(v).demote_failure for v in versions] == ["copying it to host memory failed: host memory is full"] * 2
    assert released == versions
    assert isinstance(health.failure_of("demoter"), OSError)
    assert health.view() == {"demoter": "failed: host memory is full"}


def test_gpu_device_is_checked_up_front(model_name) -> None:
    with pytest.raises(ConfigurationError, match="gpu_device='tpu'"):
        ModelPublisher(model_name, LOOPBACK_ANY_PORT, gpu_device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="sees no CUDA device"):
            ModelPublisher(model_name, LOOPBACK_ANY_PORT, gpu_device="cuda")
    with pytest.raises(ConfigurationError, match="NCCL|nccl"):
        ModelPublisher(model_name, LOOPBACK_ANY_PORT, collective_endpoint="nccl://127.0.0.1:0")


def test_planner_takes_gpu_routes_only_for_a_gpu_model() -> None:
    notice_locations = (Location("gpu", "here", "tcp://127.0.0.1:5000"), Location("gpu", "here", "nccl://10.0.0.1:29500"),
                        Location("dram", "here", "shm://viper.m.v1"), Location("dram", "here", "tcp://127.0.0.1:5000"),
                        Location("pfs", "here", "/scratch/viper"))
    state = TinyNet().state_dict()
    notice = Notice(model="m", version=1, nbytes=256 << 20, digest="0" * 32, layout=Layout.for_state_dict(state),
                    producer="p", step=None, epoch=None, created_at=0.0, locations=notice_locations)
    kinds = lambda planner: [route.kind for route in planner.routes(notice)]  # noqa: E731
    assert kinds(TransferPlanner("here")) == ["dram-shm", "dram-zmq", "pfs"]
    assert kinds(TransferPlanner("here", on_gpu=True))[:2] == ["gpu-ipc", "dram-shm"]
    assert kinds(TransferPlanner("elsewhere", on_gpu=True))[0] == "gpu-nccl"  # IPC handles are host-local


class LendingProducer:
    """A fetch server lending a stand-in description, to test leases without CUDA."""

    lends_device_memory = True

    def __init__(self, lease_s: float = 30.0, key: bytes | None = None) -> None:
        self.released = threading.Event()
        self.context = zmq.Context()
        self.server = FetchServer(self.context, LOOPBACK_ANY_PORT, "m", key, self, lease_s=lease_s)
        self.server.start()

    def lend_memory(self, version: int, device_type: str | None = None) -> None:
        return None

    def lend_ipc(self, version: int) -> IpcLoan | None:
        if version != 7:
            return None
        self.released.clear()
        return IpcLoan({"stand-in": True}, 64, self.released.set)

    def tiers_of(self, version: int) -> list[str]:
        return ["pfs"]

    def latest_notice(self) -> None:
        return None

    def close(self) -> None:
        self.server.close()
        self.context.term()


def test_ipc_lease_is_signed_and_released_after_use() -> None:
    producer = LendingProducer(key=KEY)
    try:
        client = FetchClient(zmq.Context.instance(), producer.server.endpoint, "m", KEY, WAIT_S)
        with client.borrow_device_copy(7, 64) as description:
            assert description == {"stand-in": True}
            assert producer.server.load == 1 and not producer.released.is_set()
        assert producer.released.wait(WAIT_S)
        with pytest.raises(TransferError, match="still lives in: pfs"):
            with client.borrow_device_copy(6, 64):
                pass
        unsigned = FetchClient(zmq.Context.instance(), producer.server.endpoint, "m", None, WAIT_S)
        with pytest.raises(TransferError, match="MAC"):
            with unsigned.borrow_device_copy(7, 64):
                pass
    finally:
        producer.close()


def test_ipc_lease_that_expired_during_the_copy_discards_it() -> None:
    producer = LendingProducer(lease_s=0.1)
    try:
        client = FetchClient(zmq.Context.instance(), producer.server.endpoint, "m", None, WAIT_S)
        with pytest.raises(TransferError, match="expired during the copy"):
            with client.borrow_device_copy(7, 64):
                assert producer.released.wait(WAIT_S)  # a consumer that stalled past its lease
                assert producer.server.load == 0
    finally:
        producer.close()


def test_ipc_request_to_a_producer_without_a_cuda_gpu_tier_is_refused(model_name) -> None:
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, gpu_device="cpu", allow_keyless=True) as publisher:
        version = publisher.publish(TinyNet())
        client = FetchClient(zmq.Context.instance(), publisher.fetch_endpoint, model_name, None, WAIT_S)
        with pytest.raises(TransferError, match="lends no device memory.*hmac_key"):
            with client.borrow_device_copy(version, 1):
                pass


# -- on a GPU ------------------------------------------------------------------------------
def _follow_on_gpu(model_name: str, endpoint: str, routes: list[str], device: str, out_path: str,
                   outbox: multiprocessing.Queue, inbox: multiprocessing.Queue) -> None:
    with ModelSubscriber(TinyNet().to(device), model_name, endpoint, hmac_key=KEY, routes=routes,
                         load_latest=False) as subscriber:
        outbox.put("ready")
        version = inbox.get(timeout=WAIT_S)
        reached = subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            safetensors.torch.save_file({k: v.cpu().contiguous() for k, v in served.state_dict().items()}, out_path)
        outbox.put({"reached": reached, "route": subscriber.stats.updates[-1].route if reached else None})


def _publish_to_gpu_consumer(model_name: str, routes: list[str], device: str, tmp_path, **publisher_args) -> None:
    producer = perturbed(TinyNet(), 4).cuda()
    context = multiprocessing.get_context("spawn")
    outbox, inbox = context.Queue(), context.Queue()
    out_path = str(tmp_path / "served.safetensors")
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY, gpu_device="cuda", **publisher_args) as publisher:
        consumer = context.Process(target=_follow_on_gpu,
                                   args=(model_name, publisher.endpoint, routes, device, out_path, outbox, inbox))
        consumer.start()
        try:
            assert outbox.get(timeout=WAIT_S * 2) == "ready"
            assert publisher.wait_for_subscribers(1, WAIT_S)
            inbox.put(publisher.publish(producer))
            result = outbox.get(timeout=WAIT_S * 2)
        finally:
            consumer.join(WAIT_S)
    assert result == {"reached": True, "route": routes[0]}
    assert_same_weights({k: v.cpu() for k, v in producer.state_dict().items()},
                        safetensors.torch.load_file(out_path))


@pytest.mark.gpu
@needs_cuda
def test_same_host_gpu_consumer_reads_the_device_copy_over_cuda_ipc(model_name, tmp_path) -> None:
    _publish_to_gpu_consumer(model_name, ["gpu-ipc"], "cuda:0", tmp_path)


@pytest.mark.gpu
@needs_two_gpus
def test_gpu_consumer_receives_the_device_copy_over_nccl(model_name, tmp_path) -> None:
    # NCCL refuses two ranks on one GPU: the consumer takes the second one
    _publish_to_gpu_consumer(model_name, ["gpu-nccl"], "cuda:1", tmp_path, collective_endpoint="nccl://127.0.0.1:0")


def test_collective_answers_carry_each_versions_own_digest(model_name, pfs_root) -> None:
    """Device copies are reused round-robin; the digest a transfer announces must be the
    version's own, not one left over from an earlier version in the same buffer."""
    from viper_lightning.transport._collective import CollectiveClient

    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root, gpu_device="cpu",
                        collective_endpoint=GLOO, allow_keyless=True) as publisher:
        versions = [publisher.publish(perturbed(TinyNet(), seed)) for seed in range(5)]
        assert publisher.flush(WAIT_S)
        notice = latest_notice(publisher)
        staging = torch.empty(notice.nbytes, dtype=torch.uint8)
        digest, _ = CollectiveClient(publisher.collective_endpoint, WAIT_S).fetch_into(versions[-1], staging, notice.nbytes)
        stored = FileSystemTier(pfs_root).read_manifest(model_name, versions[-1], None)
        assert digest == stored.digest == notice.digest


def test_a_wildcard_collective_keeps_announcing_whatever_the_host_name(model_name, events, monkeypatch) -> None:
    """A collective bound to 0.0.0.0 advertises the host name, which need not parse as an
    address (underscores): the notices must not depend on re-reading it."""
    monkeypatch.setattr(socket, "gethostname", lambda: "build_node01")
    producer = perturbed(TinyNet(), 5)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, hmac_key=KEY, gpu_device="cpu", host_id="here",
                        collective_endpoint="gloo://0.0.0.0:0") as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, hmac_key=KEY, host_id="here", routes=["dram-shm"],
                         load_latest=False, on_update=events.on_update) as subscriber:
        assert publish_and_check(publisher, subscriber, producer, events).route == "dram-shm"
        assert publisher.health["announcer"] == "ok"
