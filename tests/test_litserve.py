"""ViperLitAPI in a real LitServe server on loopback (the one-command start), under load while a
producer publishes: zero failed requests, every answer equal to its version's offline output,
a bad update refused while the last good version keeps answering."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from viper_lightning import ModelPublisher

from ._clients import Clients
from .conftest import LOOPBACK_ANY_PORT, WAIT_S, perturbed
from .serving_model import Scorer

litserve = pytest.importorskip("litserve", reason="LitServe is the 'litserve' extra")
from serving_handlers.litserve import LitServeProcess  # noqa: E402 - after the extra is known to be there

UPDATES = 22
ROWS = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))


def test_litserve_serves_every_update_under_load_with_zero_failed_requests(tmp_path, model_name):
    torch.manual_seed(0)
    initial = Scorer()
    safetensors.torch.save_model(initial, str(tmp_path / "initial.safetensors"))
    models: dict[int | None, torch.nn.Module] = {None: initial}
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, allow_keyless=True) as producer, \
            LitServeProcess(["--model-class", "tests.serving_model:Scorer", "--model-name", model_name,
                             "--endpoint", producer.endpoint, "--allow-keyless", "--accelerator", "cpu",
                             "--initial-weights", str(tmp_path / "initial.safetensors")], tmp_path / "ls") as server, \
            Clients(server.predict, [{"inputs": ROWS.tolist()}], 3) as clients:
        for seed in range(UPDATES):
            model = perturbed(Scorer(), seed)
            version = producer.publish(model)
            models[version] = model
            assert clients.wait_for_version(version, WAIT_S), f"version {version} never answered"
        last_good = version
        refused = producer.publish({**Scorer().state_dict(), "net.0.weight": torch.zeros(32, 17)})
        # the worker refuses it (its log says why) while the last good version keeps answering
        log = tmp_path / "ls" / "litserve.log"
        for _ in range(200):
            if f"refused version {refused}" in log.read_text():
                break
            clients.wait_for_more_answers(5, WAIT_S)
        assert f"refused version {refused}: tensor 'net.0.weight'" in log.read_text()
        assert {a["version"] for a in clients.wait_for_more_answers(10, WAIT_S)} == {last_good}
        after = perturbed(Scorer(), 99)
        following = producer.publish(after)
        models[following] = after
        assert clients.wait_for_version(following, WAIT_S)
    assert not clients.failures, clients.failures[:3]
    versions = [answer["version"] for _, answer in clients.answers]
    assert refused not in versions and last_good in versions
    assert set(versions) >= set(models) - {None}
    for _, answer in clients.answers:
        with torch.no_grad():
            offline = models[answer["version"]].eval()(ROWS)
        assert torch.allclose(torch.tensor(answer["outputs"]), offline, atol=1e-6), answer["version"]
