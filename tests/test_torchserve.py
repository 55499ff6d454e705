"""ViperHandler inside a real TorchServe (Java 17) on loopback, started and stopped by the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from viper_lightning import ModelPublisher
from serving_handlers import TorchServe, build_archive

from .conftest import LOOPBACK_ANY_PORT, perturbed
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
