"""ViperHandler inside a real TorchServe (Java 17) on loopback, started and stopped by the tests."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from serving_handlers import TorchServe, build_archive
from viper_lightning import FileSystemTier, ModelPublisher, ViperCallback
from viper_lightning.storage._keys import read_key
from viper_lightning.schedules import EveryNSteps

from .conftest import LOOPBACK_ANY_PORT, free_port, perturbed
from .serving_model import Scorer

MODEL_FILE = Path(__file__).with_name("serving_model.py")
WAIT_S = 120.0

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")


def answer(server: TorchServe, rows: torch.Tensor) -> dict:
    return server.predict("scorer", {"inputs": rows.tolist()})


def expected(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(rows)


@pytest.fixture
def producer(tmp_path):
    with ModelPublisher("scorer", LOOPBACK_ANY_PORT, str(tmp_path / "pfs")) as publisher:
        yield publisher


@pytest.fixture
def server(tmp_path, producer):
    torch.manual_seed(0)
    initial = Scorer()
    store = tmp_path / "model_store"
    build_archive("scorer", MODEL_FILE, "Scorer", {"endpoint": producer.endpoint,
                                                    "pfs_root": str(tmp_path / "pfs")},
                  export_path=store, initial_weights=initial)
    with TorchServe(tmp_path / "ts", store) as running:
        running.register("scorer.mar", "scorer")
        running.initial = initial
        yield running


def test_handler_serves_initial_weights_then_follows_updates(server, producer) -> None:
    rows = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    first = answer(server, rows)
    assert first["version"] is None
    assert torch.allclose(torch.tensor(first["outputs"]), expected(server.initial, rows), atol=1e-6)
    trained = perturbed(Scorer(), 3)
    version = producer.publish(trained)
    producer.flush(WAIT_S)
    # Poll the real inference API until the worker answers with the new version.
    for _ in range(600):
        response = answer(server, rows)
        if response["version"] == version:
            break
    assert response["version"] == version
    assert torch.allclose(torch.tensor(response["outputs"]), expected(trained, rows), atol=1e-6)
    assert "ViperVersionsApplied" in server.metrics()


class LoadGenerator:
    """A bounded request loop against the real inference API (loopback only)."""

    def __init__(self, server: TorchServe, rows: torch.Tensor, max_requests: int, max_seconds: float) -> None:
        self.server, self.rows = server, rows
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.results: list[dict] = []

    def run(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not stop.is_set() and len(self.results) < self.max_requests and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = answer(self.server, self.rows)
                self.results.append({**response, "latency_s": time.perf_counter() - started})
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
                self.results.append({"error": repr(exc), "latency_s": time.perf_counter() - started})


def percentiles(results: list[dict]) -> tuple[float, float]:
    latencies = sorted(result["latency_s"] * 1e3 for result in results)
    return latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]


def outputs_of_every_version(pfs_root: str, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """What each published version computes offline, read back from the file-system tier."""
    tier, expected, key = FileSystemTier(pfs_root), {}, read_key("scorer")  # the producer's host key
    for version in tier.versions("scorer"):
        notice = tier.read_manifest("scorer", version, key)
        buffer = torch.empty(notice.nbytes, dtype=torch.uint8)
        tier.read_into(notice, buffer, key=key)
        model = Scorer()
        model.load_state_dict(notice.layout.views(buffer))
        expected[version] = expected_outputs(model, rows)
    return expected


def expected_outputs(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(rows)


def test_zero_downtime_while_a_trainer_publishes(tmp_path, record_property) -> None:
    pfs_root, endpoint = str(tmp_path / "pfs"), f"tcp://127.0.0.1:{free_port()}"
    torch.manual_seed(0)
    initial = Scorer()
    store = tmp_path / "model_store"
    build_archive("scorer", MODEL_FILE, "Scorer", {"endpoint": endpoint, "pfs_root": pfs_root},
                  export_path=store, initial_weights=initial)
    rows = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    callback = ViperCallback("scorer", endpoint, pfs_root, schedule=EveryNSteps(8),
                             keep_every_version=True)  # every served version is checked against its file
    trainer = L.Trainer(max_steps=200, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        default_root_dir=str(tmp_path))
    with TorchServe(tmp_path / "ts", store, workers_per_model=2) as server:
        server.register("scorer.mar", "scorer")
        quiet = LoadGenerator(server, rows, max_requests=200, max_seconds=60)
        quiet.run(threading.Event())
        busy = [LoadGenerator(server, rows, max_requests=20_000, max_seconds=180) for _ in range(2)]
        stop = threading.Event()
        threads = [threading.Thread(target=load.run, args=(stop,)) for load in busy]
        for thread in threads:
            thread.start()
        try:
            trainer.fit(Scorer())
            final = callback.last_version
            for _ in range(2000):  # until the workers answer with the final version
                if answer(server, rows)["version"] == final:
                    break
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    results = [result for load in busy for result in load.results]
    assert final >= 20
    assert [r for r in quiet.results + results if "error" in r] == []
    expected = outputs_of_every_version(pfs_root, rows)
    expected[None] = expected_outputs(initial, rows)
    for result in results:  # every answer is exactly what the version it names computes
        assert torch.allclose(torch.tensor(result["outputs"]), expected[result["version"]], atol=1e-5), result
    served = {result["version"] for result in results}
    assert final in served and len(served) >= 5
    (quiet_p50, quiet_p99), (busy_p50, busy_p99) = percentiles(quiet.results), percentiles(results)
    report = (f"request latency ms without updates p50 {quiet_p50:.2f} p99 {quiet_p99:.2f}; "
              f"during {final} updates p50 {busy_p50:.2f} p99 {busy_p99:.2f} over {len(results)} requests")
    record_property("latency", report)
    print(report)


def test_every_worker_converges_and_same_host_workers_share_memory(tmp_path, producer) -> None:
    store = tmp_path / "model_store"
    build_archive("scorer", MODEL_FILE, "Scorer", {"endpoint": producer.endpoint}, export_path=store,
                  initial_weights=Scorer())
    rows = torch.randn(2, 16)
    with TorchServe(tmp_path / "ts", store, workers_per_model=4) as server:
        server.register("scorer.mar", "scorer")
        version = producer.publish(perturbed(Scorer(), 5))
        converged: dict[int, dict] = {}
        for _ in range(5000):  # requests are spread over the workers; poll until all four answered
            response = answer(server, rows)
            if response["version"] == version:
                converged[response["worker"]] = response
            if len(converged) == 4:
                break
    assert len(converged) == 4
    assert {response["route"] for response in converged.values()} == {"dram-shm"}


def test_a_corrupt_update_is_refused_and_the_last_good_version_keeps_answering(tmp_path, server, producer) -> None:
    rows = torch.randn(3, 16)
    good = perturbed(Scorer(), 1)
    first = producer.publish(good)
    producer.flush(WAIT_S)
    for _ in range(2000):
        if answer(server, rows)["version"] == first:
            break
    wrong_shape = {"net.0.weight": torch.zeros(32, 17), **{k: v for k, v in Scorer().state_dict().items()
                                                           if k != "net.0.weight"}}
    refused = producer.publish(wrong_shape)
    producer.flush(WAIT_S)
    for _ in range(2000):
        if "ViperFailedUpdates" in server.metrics():
            break
    metrics = server.metrics()
    assert "ViperFailedUpdates" in metrics and "ViperVersionLag" in metrics
    response = answer(server, rows)
    assert response["version"] == first != refused
    assert torch.allclose(torch.tensor(response["outputs"]), expected_outputs(good, rows), atol=1e-6)
