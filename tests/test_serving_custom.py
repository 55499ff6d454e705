"""ViperHandler as TorchServe users customise it, in a real TorchServe (Java 17): a subclass
that overrides only preprocess (text to int64 token ids) under load and batching while versions
swap, the worker's GPU, and the README's metrics setup exactly as documented."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from examples.tokens.handler import byte_ids
from examples.tokens.model import ByteClassifier
from serving_handlers import TorchServe, build_archive
from viper_lightning import ModelPublisher, TransferError

from ._clients import Clients
from .conftest import LOOPBACK_ANY_PORT, WAIT_S, perturbed
from .serving_model import Scorer

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["hello", "a longer request, padded against the short ones", "ünïcode bytes", "x"]
VERSIONS = 10

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")


def test_a_worker_s_model_goes_to_the_gpu_torchserve_gave_it():
    from serving_handlers import worker_device

    assert worker_device({"gpu_id": 1}, cuda_available=True) == torch.device("cuda", 1)
    assert worker_device({"gpu_id": "0"}, cuda_available=True) == torch.device("cuda", 0)
    assert worker_device({"gpu_id": 1}, cuda_available=False) == torch.device("cpu")
    assert worker_device({}, cuda_available=True) == torch.device("cpu")


@needs_java
def test_a_subclass_overriding_only_preprocess_serves_token_ids_under_load_and_batching(tmp_path, model_name):
    torch.manual_seed(0)
    initial = ByteClassifier()
    store = tmp_path / "store"
    models = {None: initial}
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True) as producer:
        build_archive("tokens", ROOT / "examples/tokens/model.py", "ByteClassifier",
                      {"model_name": model_name, "endpoint": producer.endpoint, "allow_keyless": True},
                      export_path=store, initial_weights=initial, handler=ROOT / "examples/tokens/handler.py")
        with TorchServe(tmp_path / "ts", store) as server:
            server.register("tokens.mar", "tokens", batch_size=4, max_batch_delay_ms=20)
            with Clients(lambda payload: server.predict("tokens", payload), [{"text": text} for text in TEXTS],
                         4) as clients:
                for seed in range(VERSIONS):
                    model = perturbed(ByteClassifier(), seed)
                    version = producer.publish(model)
                    models[version] = model
                    assert clients.wait_for_version(version, WAIT_S), f"version {version} never answered"
    assert not clients.failures, clients.failures[:3]
    assert {answer["version"] for _, answer in clients.answers} >= set(models) - {None}
    assert max(answer["batch"] for _, answer in clients.answers) > 1  # TorchServe did batch requests
    for payload, answer in clients.answers:
        text = payload["text"]
        with torch.no_grad():
            offline = models[answer["version"]].eval()(torch.tensor([byte_ids(text)]))[0]
        assert torch.allclose(torch.tensor(answer["outputs"]), offline, atol=1e-5), (text, answer["version"])


def documented_metrics_config() -> dict[str, str]:
    """The config.properties block the README's TorchServe section gives, parsed."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Serving with TorchServe"):]
    block = re.search(r"```properties\n(.*?)```", section, re.S)
    assert block, "the README's TorchServe section has no config.properties block"
    return dict(line.split("=", 1) for line in block.group(1).splitlines() if line.strip())


@needs_java
def test_the_documented_metrics_setup_shows_every_viper_metric(tmp_path, model_name):
    config = documented_metrics_config()
    assert config  # and nothing else configures metrics below: the server gets exactly these
    torch.manual_seed(0)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True) as producer:
        build_archive("scorer", Path(__file__).with_name("serving_model.py"), "Scorer",
                      {"model_name": model_name, "endpoint": producer.endpoint, "allow_keyless": True},
                      export_path=tmp_path / "store", initial_weights=Scorer())
        with TorchServe(tmp_path / "ts", tmp_path / "store", config=config) as server:
            server.register("scorer.mar", "scorer")
            rows = torch.randn(2, 16)
            version = producer.publish(perturbed(Scorer(), 1))
            for _ in range(2000):
                if server.predict("scorer", {"inputs": rows.tolist()})["version"] == version:
                    break
            with pytest.raises(TransferError, match="(?s)400.*request refused"):  # bad input: its own error only
                server.predict("scorer", {"inputs": ["not a number"]})
            wrong_shape = {**Scorer().state_dict(), "net.0.weight": torch.zeros(32, 17)}
            producer.publish(wrong_shape)  # refused by the worker: ViperFailedUpdates
            names = ("ViperUpdateLatencyMs", "ViperVersion", "ViperVersionsApplied", "ViperFailedUpdates",
                     "ViperVersionLag")
            metrics = ""
            for _ in range(2000):
                metrics = server.metrics()
                if all(name in metrics for name in names):
                    break
            assert [name for name in names if name not in metrics] == []


@needs_java
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the worker's GPU needs a CUDA device")
def test_on_a_worker_with_a_gpu_the_model_serves_from_it(tmp_path, model_name):
    torch.manual_seed(0)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True, gpu_device="cuda:0") as producer:
        build_archive("scorer", Path(__file__).with_name("serving_model.py"), "Scorer",
                      {"model_name": model_name, "endpoint": producer.endpoint, "allow_keyless": True},
                      export_path=tmp_path / "store", initial_weights=Scorer())
        with TorchServe(tmp_path / "ts", tmp_path / "store") as server:
            server.register("scorer.mar", "scorer")
            version = producer.publish(perturbed(Scorer(), 1).cuda())
            for _ in range(2000):
                answer = server.predict("scorer", {"inputs": torch.randn(2, 16).tolist()})
                if answer["version"] == version:
                    break
            assert answer["version"] == version and answer["route"] == "gpu-ipc"  # taken only by a model on a GPU
