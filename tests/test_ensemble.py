"""One input pipeline for an ensemble: real member processes (Lightning Trainers) reading one
loader's batches from shared memory, the same batches for all, back-pressure, a member that dies;
and the serving side, an ensemble answered by the mean of its members, each version named."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from examples.ensemble.run import EpochBatches
from viper_lightning import EnsembleSubscriber, ModelPublisher
from viper_lightning._errors import IntegrityError, TransferError
from viper_lightning.data import BatchLoader, SharedBatches

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, free_port, perturbed
from .serving_model import Scorer

REPO = Path(__file__).resolve().parent.parent
SAMPLES, BATCH, EPOCHS = 256, 32, 2


def _members(directory: str, count: int, tmp_path: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    outs = [tmp_path / f"member{k}.json" for k in range(count)]
    processes = [subprocess.Popen([sys.executable, "-m", "benchmarks.ensemble_pipeline", "--member", "shared", str(k),
                                   directory, str(SAMPLES), str(BATCH), str(EPOCHS), str(outs[k])], cwd=REPO)
                 for k in range(count)]
    return processes, outs


def _digests() -> list[str]:
    epochs = EpochBatches(SAMPLES, BATCH)
    return [hashlib.blake2b(batch["x"].numpy().tobytes(), digest_size=8).hexdigest()
            for _ in range(EPOCHS) for batch in epochs]


def test_every_member_trains_on_the_same_batches_read_from_shared_memory(tmp_path):
    with BatchLoader(3, EpochBatches(SAMPLES, BATCH).slot_bytes()) as loader:
        processes, outs = _members(loader.directory, 3, tmp_path)
        served = loader.serve(EpochBatches(SAMPLES, BATCH), EPOCHS)
        assert [process.wait(WAIT_S * 6) for process in processes] == [0, 0, 0]
    reports = [json.loads(out.read_text()) for out in outs]
    assert served == EPOCHS * (SAMPLES // BATCH)
    assert all(report["steps"] == served for report in reports)
    assert all(report["digests"] == _digests() for report in reports)  # each batch as made, for every member
    assert not loader.dropped


def test_a_member_that_dies_leaves_the_others_running(tmp_path):
    with BatchLoader(3, EpochBatches(SAMPLES, BATCH).slot_bytes()) as loader:
        processes, outs = _members(loader.directory, 3, tmp_path)

        def kill_member_one() -> None:  # once it has joined and training is under way
            while loader.served < 3:
                if processes[1].poll() is not None:
                    return
                threading.Event().wait(0.02)  # a poll of the loader's progress, bounded by serve below
            processes[1].send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_member_one)
        killer.start()
        served = loader.serve(EpochBatches(SAMPLES, BATCH), EPOCHS)
        killer.join()
        codes = [process.wait(WAIT_S * 6) for process in processes]
    assert codes[0] == codes[2] == 0 and codes[1] == -signal.SIGKILL
    assert loader.dropped == [1]
    for k in (0, 2):
        assert json.loads(outs[k].read_text())["steps"] == served


def test_the_slowest_member_sets_the_pace(tmp_path):
    batches = [{"x": torch.full((4,), float(i))} for i in range(20)]
    with BatchLoader(1, 64, slots=4) as loader:
        serving = threading.Thread(target=loader.serve, args=(batches,))
        member = SharedBatches(loader.directory, 0, hold=2, timeout=WAIT_S)
        stream = iter(member)
        serving.start()
        first = [float(next(stream)["x"][0]) for _ in range(3)]  # the member reads three, then stalls
        serving.join(1.0)
        assert serving.is_alive() and loader.in_flight == loader.slots  # the loader waits for it
        assert loader.served <= len(first) + loader.slots
        rest = [float(batch["x"][0]) for batch in stream]
        member.close()  # training over: what it held goes back, and the loader finishes
        serving.join(WAIT_S)
        assert not serving.is_alive()
    assert first + rest == [float(i) for i in range(20)]


def test_a_member_silent_past_its_timeout_is_dropped_and_never_trains_on_overwritten_batches(tmp_path):
    batches = [{"x": torch.full((4,), float(i))} for i in range(30)]
    with BatchLoader(2, 64, slots=4, member_timeout=0.5) as loader:
        fast, slow = (SharedBatches(loader.directory, k, hold=2, timeout=WAIT_S) for k in (0, 1))
        seen: list[float] = []
        reading = threading.Thread(target=lambda: seen.extend(float(batch["x"][0]) for batch in fast))
        serving = threading.Thread(target=loader.serve, args=(batches,))
        stalled = iter(slow)
        serving.start()
        reading.start()
        [next(stalled) for _ in range(3)]  # then silent: the loader drops it after half a second
        serving.join(WAIT_S)
        reading.join(WAIT_S)
        assert loader.dropped == [1] and seen == [float(i) for i in range(30)]  # the other went on
        with pytest.raises((TransferError, IntegrityError), match="overwritten|dropped"):
            for _ in stalled:
                pass
        fast.close()


def test_an_ensemble_answers_with_the_mean_of_its_members_naming_each_version():
    torch.manual_seed(0)
    with ModelPublisher("member-a", LOOPBACK_ANY_PORT, allow_keyless=True) as a, \
            ModelPublisher("member-b", LOOPBACK_ANY_PORT, allow_keyless=True) as b, \
            EnsembleSubscriber([Scorer(), Scorer()], ["member-a", "member-b"], [a.endpoint, b.endpoint],
                               allow_keyless=True) as ensemble:
        first, second = perturbed(Scorer(), 1), perturbed(Scorer(), 2)
        versions = {"member-a": a.publish(first), "member-b": b.publish(second)}
        assert ensemble.wait_for_versions(versions, WAIT_S)
        rows = torch.randn(3, 16)
        with ensemble.lease() as lease, torch.no_grad():
            assert lease.versions == versions and set(lease.routes.values()) == {"dram-shm"}
            assert torch.allclose(lease.model(rows), (first(rows) + second(rows)) / 2, atol=1e-6)
        newer = perturbed(Scorer(), 3)
        versions["member-b"] = b.publish(newer)
        assert ensemble.wait_for_versions(versions, WAIT_S)
        with ensemble.lease() as lease, torch.no_grad():
            assert lease.versions == versions
            assert torch.allclose(lease.model(rows), (first(rows) + newer(rows)) / 2, atol=1e-6)


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")
def test_torchserve_serves_an_ensemble_naming_every_member_s_version(tmp_path):
    from serving_handlers import TorchServe, build_archive

    torch.manual_seed(0)
    with ModelPublisher("ens-a", LOOPBACK_ANY_PORT, allow_keyless=True) as a, \
            ModelPublisher("ens-b", LOOPBACK_ANY_PORT, allow_keyless=True) as b:
        build_archive("ensemble", Path(__file__).with_name("serving_model.py"), "Scorer",
                      {"model_name": "ens-a", "allow_keyless": True,
                       "members": [{"model_name": "ens-a", "endpoint": a.endpoint},
                                   {"model_name": "ens-b", "endpoint": b.endpoint}]},
                      export_path=tmp_path / "store", initial_weights=Scorer())
        with TorchServe(tmp_path / "ts", tmp_path / "store") as server:
            server.register("ensemble.mar", "ensemble")
            first, second = perturbed(Scorer(), 1), perturbed(Scorer(), 2)
            expected = {"ens-a": a.publish(first), "ens-b": b.publish(second)}
            rows = torch.randn(2, 16)
            for _ in range(2000):
                answer = server.predict("ensemble", {"inputs": rows.tolist()})
                if answer["version"] == expected:
                    break
            assert answer["version"] == expected and answer["route"] == {"ens-a": "dram-shm", "ens-b": "dram-shm"}
            with torch.no_grad():
                assert torch.allclose(torch.tensor(answer["outputs"]), (first(rows) + second(rows)) / 2, atol=1e-5)


def test_the_example_runs_an_ensemble_from_its_lightningcli_yaml(tmp_path):
    base = free_port()
    finished = subprocess.run([sys.executable, "-m", "examples.ensemble.run", "--members", "2", "--epochs", "1",
                               "--samples", "128", "--batch-size", "32", "--base-port", str(base),
                               "--root", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=WAIT_S * 12)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert "served 4 batches to 2 members (exit codes [0, 0])" in finished.stdout
    saved = [yaml.safe_load((tmp_path / f"member-{k}" / "config.yaml").read_text()) for k in (0, 1)]
    assert [config["data"]["member"] for config in saved] == [0, 1]  # each member's own, none in the checkout
    assert not (REPO / "config.yaml").exists()
