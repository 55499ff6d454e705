"""Sharded producers: real FSDP2 ranks (Gloo, CPU device mesh) each publish their own part; an
unsharded consumer applies a version only when every part of it is in, assembled bit-exact."""

from __future__ import annotations

import json
import secrets
import shutil
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from benchmarks._sharded_rank import tiny_model
from tests.conftest import WAIT_S, Events, free_port
from serving_handlers import TorchServe, build_archive
from tests.lightning_models import Regressor
from tests.serving_model import TinySharded
from viper_lightning import ShardedSubscriber
from viper_lightning._errors import ConfigurationError, IntegrityError, ProtocolError
from viper_lightning._layout import Layout
from viper_lightning._shards import PartInfo, Piece, check_tiling
from viper_lightning.producer._sharded import _endpoint_of_rank
from viper_lightning.transport._protocol import Notice

SERVING_MODEL = Path(__file__).with_name("serving_model.py")
START_S = 120.0  # a rank imports torch and joins its group: slow on a loaded 2-core machine


class Ranks:
    """The rank processes of one sharded run, driven over their stdin and stdout."""

    def __init__(self, world: int, tmp_path: Path, model_name: str, pfs_root: str | None = None,
                 replicas: int = 1) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.key = secrets.token_hex(32)
        key_file = tmp_path / "key"
        key_file.write_text(self.key)
        init = f"file://{tmp_path / 'rendezvous'}"
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "benchmarks._sharded_rank", "--rank", str(rank), "--world", str(world),
                              "--init", init, "--model-name", model_name, "--key-file", str(key_file),
                              "--replicas", str(replicas)]
                             + (["--pfs-root", pfs_root] if pfs_root else []),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                             cwd=Path(__file__).resolve().parent.parent)
            for rank in range(world)]
        self.endpoints = self.answer(0, START_S)["endpoints"]
        for rank in range(1, world):
            self.answer(rank, START_S)

    def answer(self, rank: int, timeout: float = WAIT_S) -> dict:
        process = self.processes[rank]
        readable, _, _ = select.select([process.stdout], [], [], timeout)
        assert readable, f"rank {rank} gave no answer within {timeout} s"
        line = process.stdout.readline()
        assert line, f"rank {rank} exited (code {process.poll()})"
        return json.loads(line)

    def send(self, command: str, ranks: list[int] | None = None) -> list[dict]:
        ranks = list(range(len(self.processes))) if ranks is None else ranks
        for rank in ranks:
            self.processes[rank].stdin.write(command + "\n")
            self.processes[rank].stdin.flush()
        return [self.answer(rank) for rank in ranks] if command != "die" else []

    def full_weights(self, path: Path) -> dict[str, torch.Tensor]:
        self.send(f"full {path}")
        return safetensors.torch.load_file(path)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.stdin.write("close\n")
                    process.stdin.flush()
                except BrokenPipeError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def ranks_of(tmp_path, model_name):
    started: list[Ranks] = []

    def start(world: int, pfs_root: str | None = None, replicas: int = 1) -> Ranks:
        started.append(Ranks(world, tmp_path / f"run{len(started)}", model_name, pfs_root, replicas))
        return started[-1]

    yield start
    for ranks in started:
        ranks.close()


def served(subscriber) -> tuple[int | None, dict[str, torch.Tensor]]:
    with subscriber.lease() as lease:
        return lease.version, {name: tensor.detach().clone() for name, tensor in lease.model.state_dict().items()}


def assert_bit_exact(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].dtype == actual[name].dtype, name
        assert torch.equal(expected[name], actual[name]), f"tensor {name!r} differs"


@pytest.mark.parametrize("world, routes", [(2, None), (4, None), (2, ["dram-zmq"])])
def test_every_rank_publishes_its_shard_and_the_consumer_assembles_bit_exact(ranks_of, model_name, tmp_path, world,
                                                                            routes):
    ranks = ranks_of(world)
    events = Events()
    with ShardedSubscriber(tiny_model(), model_name, ranks.endpoints, hmac_key=ranks.key,
                           routes=routes, on_update=events.on_update) as subscriber:
        for expected_version in (1, 2):
            ranks.send("step")
            answers = ranks.send("publish")
            assert [a["version"] for a in answers] == [expected_version] * world  # numbered alike on every rank
            assert subscriber.wait_for_version(expected_version, WAIT_S)
            version, weights = served(subscriber)
            assert version == expected_version
            assert_bit_exact(ranks.full_weights(tmp_path / f"full{version}.safetensors"), weights)
        record = subscriber.stats.last
        assert record.trigger == "parts" and record.version == 2
        # each rank sent its own shard only: the parts' bytes add up to the model's, not world times it
        whole = Layout.for_state_dict(tiny_model().state_dict()).nbytes
        assert record.nbytes == whole
        parts = subscriber.parts
        assert all(part is not None and part.version == 2 for part in parts)
        assert max(part.stats.last.nbytes for part in parts) < whole
        assert {part.stats.last.route for part in parts} == {routes[0] if routes else "dram-shm"}


def test_a_rank_that_dies_mid_publish_leaves_the_last_whole_version_serving(ranks_of, model_name, tmp_path):
    world = 3
    ranks = ranks_of(world)
    with ShardedSubscriber(tiny_model(), model_name, ranks.endpoints, hmac_key=ranks.key) \
            as subscriber:
        ranks.send("publish")
        assert subscriber.wait_for_version(1, WAIT_S)
        first = ranks.full_weights(tmp_path / "full1.safetensors")
        ranks.send("step")
        survivors = list(range(world - 1))
        ranks.send("die", [world - 1])  # the last rank dies before its part of version 2 is out
        assert [a["version"] for a in ranks.send("publish", survivors)] == [2] * len(survivors)
        # every surviving part of version 2 arrives, verified, and is held...
        deadline = time.monotonic() + WAIT_S
        while not all((subscriber.parts[rank].version or 0) >= 2 for rank in survivors):
            assert time.monotonic() < deadline, "the surviving parts of version 2 never arrived"
            subscriber.parts[0].wait_for_version(2, 0.1)
        # ...but version 2 is never served: the model still answers with version 1, bit-exact
        assert not subscriber.wait_for_version(2, 1.0)
        version, weights = served(subscriber)
        assert version == 1
        assert_bit_exact(first, weights)
        assert ranks.processes[world - 1].wait(WAIT_S) == 3


def test_a_late_consumer_assembles_the_parts_from_the_file_system(ranks_of, model_name, tmp_path):
    pfs_root = str(tmp_path / "pfs")
    ranks = ranks_of(2, pfs_root)
    ranks.send("step")
    ranks.send("publish")
    full = ranks.full_weights(tmp_path / "full.safetensors")
    ranks.close()  # every producer gone: only the file-system tier holds the parts
    with ShardedSubscriber(tiny_model(), model_name, ranks.endpoints, pfs_root,
                           hmac_key=ranks.key) as subscriber:
        assert subscriber.wait_for_version(1, WAIT_S)
        version, weights = served(subscriber)
        assert version == 1 and {p.stats.last.route for p in subscriber.parts} == {"pfs"}
        assert_bit_exact(full, weights)


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are both free now (rank r of the run binds p + r)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def test_lightning_model_parallel_strategy_publishes_every_rank_s_shard(model_name, tmp_path):
    """A real Trainer (ModelParallelStrategy, FSDP2 on CPU with Gloo, two ranks) with ViperCallback;
    a consumer with the plain, unsharded model follows it live."""
    key = secrets.token_hex(32)
    (tmp_path / "key").write_text(key)
    port = _free_port_pair()
    events = Events()
    with ShardedSubscriber(Regressor(), model_name, [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"],
                           hmac_key=key, on_update=events.on_update) as subscriber:
        run = subprocess.run([sys.executable, "-m", "tests._lightning_sharded", "--model-name", model_name,
                              "--port", str(port), "--key-file", str(tmp_path / "key"), "--out", str(tmp_path)],
                             cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                             timeout=START_S * 2)
        assert run.returncode == 0, run.stderr[-3000:]
        last = json.loads((tmp_path / "run.json").read_text())["last_version"]
        assert last == 3  # steps 4 and 8, and the end of training at step 10
        assert subscriber.wait_for_version(last, WAIT_S)
        version, weights = served(subscriber)
        assert version == last
        assert_bit_exact(safetensors.torch.load_file(tmp_path / "full.safetensors"), weights)
        assert all(record.trigger == "parts" for record in events.updates)


def test_hsdp_replicas_publish_nothing_twice_and_the_consumer_assembles_bit_exact(ranks_of, model_name, tmp_path):
    """HSDP on a 2x2 mesh: the replica group at coordinate 1 publishes empty parts."""
    ranks = ranks_of(4, replicas=2)
    with ShardedSubscriber(tiny_model(), model_name, ranks.endpoints, hmac_key=ranks.key) as subscriber:
        ranks.send("step")
        ranks.send("publish")
        assert subscriber.wait_for_version(1, WAIT_S)
        assert [part is None for part in subscriber.parts] == [False, False, True, True]
        assert_bit_exact(ranks.full_weights(tmp_path / "full.safetensors"), served(subscriber)[1])


# -- parts published from one process (no process group): restarts and mixed runs -----------
KEY = secrets.token_hex(32)


def _halves(full: torch.Tensor, run: str, swapped: bool) -> list[tuple[dict, PartInfo]]:
    """Rows 0-1 and 2-3 of `full` as parts 0 and 1 (or 1 and 0 when `swapped`)."""
    halves = [(0, full[:2]), (2, full[2:])]
    if swapped:
        halves.reverse()
    return [({"weight": rows.clone()}, PartInfo("m", index, 2, run, {"weight": Piece((4, 4), (offset, 0), (2,),
                                                                                       ("S(0)",))}))
            for index, (offset, rows) in enumerate(halves)]


@pytest.fixture
def part_publishers(tmp_path):
    from viper_lightning import ModelPublisher

    with ModelPublisher("m.part0of2", "tcp://127.0.0.1:*", str(tmp_path / "pfs"), KEY) as first, \
            ModelPublisher("m.part1of2", "tcp://127.0.0.1:*", str(tmp_path / "pfs"), KEY) as second:
        yield [first, second]


def _publish(publishers, full: torch.Tensor, version: int, run: str, swapped: bool = False, parts=(0, 1)) -> None:
    for index, (tensors, info) in enumerate(_halves(full, run, swapped)):
        if index in parts:
            publishers[index].publish(tensors, version=version, part=info)


def _served_weight(subscriber) -> torch.Tensor:
    return served(subscriber)[1]["weight"]


def test_each_version_is_placed_as_its_own_notices_say(part_publishers):
    """A restarted run that puts the same shapes at other offsets is assembled by its placements."""
    with ShardedSubscriber(torch.nn.Linear(4, 4, bias=False), "m", [p.endpoint for p in part_publishers],
                           hmac_key=KEY) as subscriber:
        first, second = torch.arange(16.0).view(4, 4), torch.arange(100.0, 116.0).view(4, 4)
        _publish(part_publishers, first, 1, "run-a")
        assert subscriber.wait_for_version(1, WAIT_S) and torch.equal(_served_weight(subscriber), first)
        _publish(part_publishers, second, 2, "run-b", swapped=True)
        assert subscriber.wait_for_version(2, WAIT_S)
        assert torch.equal(_served_weight(subscriber), second)


def test_parts_of_two_runs_are_never_assembled_together(part_publishers):
    with ShardedSubscriber(torch.nn.Linear(4, 4, bias=False), "m", [p.endpoint for p in part_publishers],
                           hmac_key=KEY) as subscriber:
        first = torch.full((4, 4), 1.0)
        _publish(part_publishers, first, 1, "run-a")
        assert subscriber.wait_for_version(1, WAIT_S)
        _publish(part_publishers, torch.full((4, 4), 2.0), 2, "run-a", parts=(0,))  # then run a's rank 1 died
        _publish(part_publishers, torch.full((4, 4), -2.0), 2, "run-b", parts=(1,))  # run b resumed at 1
        for part in subscriber.parts:
            assert part.wait_for_version(2, WAIT_S)
        assert not subscriber.wait_for_version(2, 1.0)  # both parts hold a version 2, of two runs
        assert torch.equal(_served_weight(subscriber), first)
        third = torch.full((4, 4), -3.0)
        _publish(part_publishers, third, 3, "run-b")
        assert subscriber.wait_for_version(3, WAIT_S) and torch.equal(_served_weight(subscriber), third)


def test_a_late_consumer_loads_the_newest_version_every_part_stored(part_publishers, tmp_path):
    first = torch.arange(16.0).view(4, 4)
    _publish(part_publishers, first, 1, "run-a")
    assert all(publisher.flush(WAIT_S) for publisher in part_publishers)  # both parts of v1 stored
    _publish(part_publishers, first + 1, 2, "run-a", parts=(0,))  # rank 1 died before its part of v2
    endpoints = [p.endpoint for p in part_publishers]
    for publisher in part_publishers:
        publisher.close()
    with ShardedSubscriber(torch.nn.Linear(4, 4, bias=False), "m", endpoints, str(tmp_path / "pfs"),
                           hmac_key=KEY) as subscriber:
        assert subscriber.wait_for_version(1, WAIT_S)
        assert subscriber.version == 1 and torch.equal(_served_weight(subscriber), first)


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")
def test_torchserve_serves_a_sharded_producer_assembled(ranks_of, model_name, tmp_path):
    """ViperHandler with `viper.endpoints` (each part's endpoint) in a real TorchServe."""
    ranks = ranks_of(2)
    store = tmp_path / "model_store"
    build_archive("tinysharded", SERVING_MODEL, "TinySharded",
                  {"model_name": model_name, "endpoints": ranks.endpoints, "hmac_key": ranks.key},
                  export_path=store)
    rows = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with TorchServe(tmp_path / "ts", store) as server:
        server.register("tinysharded.mar", "tinysharded")
        ranks.send("step")
        ranks.send("publish")
        full = TinySharded()
        full.load_state_dict(ranks.full_weights(tmp_path / "full.safetensors"))
        deadline = time.monotonic() + WAIT_S
        while (response := server.predict("tinysharded", {"inputs": rows.tolist()}))["version"] != 1:
            assert time.monotonic() < deadline, f"TorchServe still answers with {response['version']}"
        with torch.no_grad():
            assert torch.allclose(torch.tensor(response["outputs"]), full.eval()(rows), atol=1e-6)
        assert response["route"] == "dram-shm"


# -- the placements in the protocol (no processes) ------------------------------------------
def _part_notice(pieces: dict, index: int = 0, count: int = 2, model: str = "m") -> bytes:
    tensors = {"w": torch.zeros(2, 4)}
    info = {"format": 1, "of": model, "index": index, "count": count, "run": "r1", "tensors": pieces}
    notice = Notice(model=f"{model}.part{index}of{count}", version=1, nbytes=32, digest=None,
                    layout=Layout.for_state_dict(tensors), producer="p")
    payload = notice.to_json()
    payload["part"] = info
    return json.dumps(payload).encode()


GOOD_PIECE = {"full_shape": [4, 4], "offsets": [0, 0], "mesh": [2], "placements": ["S(0)"]}


def test_a_notice_carries_its_part_and_round_trips():
    notice = Notice.decode(_part_notice({"w": GOOD_PIECE}))
    assert notice.part == PartInfo("m", 0, 2, "r1", {"w": Piece((4, 4), (0, 0), (2,), ("S(0)",))})
    assert Notice.decode(notice.encode()).part == notice.part
    whole = Notice(model="m", version=1, nbytes=0, digest=None, layout=Layout((), 0), producer="p")
    assert "part" not in whole.to_json()  # a whole model's notice reads as before


@pytest.mark.parametrize("piece, index, model, fragment", [
    ({**GOOD_PIECE, "offsets": [3, 0]}, 0, "m", "outside the full shape"),
    ({**GOOD_PIECE, "placements": ["P"]}, 0, "m", "'placements'"),
    ({**GOOD_PIECE, "placements": ["S(2)"]}, 0, "m", "'placements'"),
    ({**GOOD_PIECE, "mesh": []}, 0, "m", "'mesh'"),
    ({**GOOD_PIECE, "full_shape": [4]}, 0, "m", "'full_shape'"),
    (GOOD_PIECE, 2, "m", "'count' must be at least 3"),
])
def test_a_bad_part_is_refused_naming_the_field(piece, index, model, fragment):
    payload = _part_notice({"w": piece}, index=index, model=model)
    with pytest.raises(ProtocolError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Notice.decode(payload)


def test_a_part_announced_under_another_name_or_format_is_refused():
    payload = json.loads(_part_notice({"w": GOOD_PIECE}))
    payload["model"] = "m.part1of2"
    with pytest.raises(ProtocolError, match="announced under 'm.part1of2'"):
        Notice.decode(json.dumps(payload).encode())
    payload = json.loads(_part_notice({"w": GOOD_PIECE}))
    payload["part"]["format"] = 2
    with pytest.raises(ProtocolError, match="upgrade viper_lightning"):
        Notice.decode(json.dumps(payload).encode())
    payload = json.loads(_part_notice({"w": GOOD_PIECE}))
    payload["part"]["run"] = "a run/with a slash"
    with pytest.raises(ProtocolError, match="'run' must be"):
        Notice.decode(json.dumps(payload).encode())


def test_parts_that_overlap_or_leave_a_gap_are_refused():
    expected = Layout.for_state_dict({"w": torch.zeros(4, 4)})
    half = Layout.for_state_dict({"w": torch.zeros(2, 4)})

    def part(index: int, offset: int) -> tuple[PartInfo, Layout]:
        return PartInfo("m", index, 2, "r", {"w": Piece((4, 4), (offset, 0), (2,), ("S(0)",))}), half

    check_tiling(expected, [part(0, 0), part(1, 2)])
    with pytest.raises(IntegrityError, match="overlap"):
        check_tiling(expected, [part(0, 0), part(1, 1)])
    with pytest.raises(IntegrityError, match="cover 8 of its 16"):
        check_tiling(expected, [part(0, 0)])
    wrong = Layout.for_state_dict({"w": torch.zeros(2, 4, dtype=torch.float64)})
    with pytest.raises(IntegrityError, match="F64"):
        check_tiling(expected, [part(0, 0), (part(1, 2)[0], wrong)])



@pytest.mark.parametrize("endpoint, rank, expected", [
    ("tcp://127.0.0.1:5555", 2, "tcp://127.0.0.1:5557"),
    ("tcp://127.0.0.1:*", 3, "tcp://127.0.0.1:*"),
    ("gloo://0.0.0.0:0", 1, "gloo://0.0.0.0:0"),
    ("gloo://0.0.0.0:29500", 1, "gloo://0.0.0.0:29501"),
    ("ipc:///tmp/viper-notices", 1, "ipc:///tmp/viper-notices.1"),
])
def test_each_rank_binds_its_own_port(endpoint, rank, expected):
    assert _endpoint_of_rank(endpoint, rank) == expected


def test_a_port_past_the_last_is_refused():
    with pytest.raises(ConfigurationError, match="rank 1 would bind port 65536"):
        _endpoint_of_rank("tcp://127.0.0.1:65535", 1)
