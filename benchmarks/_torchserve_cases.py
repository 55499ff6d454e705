"""The TorchServe strategies of the update-latency benchmark.

`torchserve-register`: TorchServe's own way to ship new weights: archive them as a new .mar
version, register it, make it the default, and wait for the first answer from it.
`torchserve-viper`: publish with Viper; TorchServe's ViperHandler swaps the version in; e2e
ends at the first answer that names the new version.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from serving_handlers import TorchServe, build_archive
from viper_lightning import ModelPublisher

from ._models import wide_kwargs
from .serving_model import Wide

__all__ = ["measure_torchserve_register", "measure_torchserve_viper"]

MODEL_FILE = Path(__file__).with_name("serving_model.py")
UNUSED_ENDPOINT = "tcp://127.0.0.1:1"  # the register baseline follows nothing
MAX_POLLS = 100_000


def measure_torchserve_register(megabytes: float, repeat: int) -> dict[str, Any]:
    kwargs = wide_kwargs(megabytes)
    model = Wide(**kwargs)
    with tempfile.TemporaryDirectory(prefix="viper-bench-ts-") as workdir:
        store = Path(workdir) / "store"
        with TorchServe(Path(workdir) / "ts", store) as server:
            runs = [_register_once(server, store, model, kwargs, index) for index in range(repeat + 1)][1:]
    return _summary(runs, model)


def _register_once(server: TorchServe, store: Path, model: torch.nn.Module, kwargs: dict, index: int) -> dict:
    with torch.no_grad():
        model.layer.bias.add_(1.0)
    started = time.perf_counter()
    build_archive(f"bench-v{index}", MODEL_FILE, "Wide", {"model_name": "bench", "endpoint": UNUSED_ENDPOINT},
                  export_path=store, model_kwargs=kwargs, initial_weights=model, version=str(index))
    archived = time.perf_counter()
    server.register(f"bench-v{index}.mar", "bench")
    registered = time.perf_counter()
    server.set_default("bench", str(index))
    server.predict("bench", {"inputs": [[0.0] * kwargs["features"]]})
    answered = time.perf_counter()
    if index > 0:
        server.management("DELETE", f"/models/bench/{index - 1}")
    return {"e2e_s": answered - started, "archive": archived - started, "register": registered - archived,
            "first_answer": answered - registered}


def measure_torchserve_viper(megabytes: float, repeat: int) -> dict[str, Any]:
    kwargs = wide_kwargs(megabytes)
    model = Wide(**kwargs)
    with tempfile.TemporaryDirectory(prefix="viper-bench-ts-") as workdir, \
         ModelPublisher("bench", "tcp://127.0.0.1:*", str(Path(workdir) / "pfs")) as publisher:
        store = Path(workdir) / "store"
        build_archive("bench", MODEL_FILE, "Wide", {"endpoint": publisher.endpoint,
                                                     "pfs_root": str(Path(workdir) / "pfs")},
                      export_path=store, model_kwargs=kwargs, initial_weights=model)
        with TorchServe(Path(workdir) / "ts", store) as server:
            server.register("bench.mar", "bench")
            runs = [_publish_once(server, publisher, model, kwargs) for _ in range(repeat + 2)][2:]
    return _summary(runs, model)


def _publish_once(server: TorchServe, publisher: ModelPublisher, model: torch.nn.Module, kwargs: dict) -> dict:
    with torch.no_grad():
        model.layer.bias.add_(1.0)
    started = time.perf_counter()
    version = publisher.publish(model)
    if version is None:
        raise RuntimeError(f"a publish was skipped ({publisher.publishes_skipped} so far): every snapshot slot was "
                           "still held")
    stall = publisher.last_stall_s
    request = {"inputs": [[0.0] * kwargs["features"]]}
    for _ in range(MAX_POLLS):  # a client asking as fast as it can: the first answer from `version`
        if server.predict("bench", request)["version"] == version:
            break
    else:
        raise RuntimeError(f"TorchServe never answered with version {version}")
    answered = time.perf_counter()
    publisher.flush(300)
    return {"e2e_s": answered - started, "snapshot": stall, "until_answered": answered - started - stall}


def _summary(runs: list[dict], model: torch.nn.Module) -> dict[str, Any]:
    median = sorted(runs, key=lambda run: run["e2e_s"])[len(runs) // 2]
    stall = median.get("snapshot")
    return {"e2e_s": median["e2e_s"], "stages": {k: v for k, v in median.items() if k != "e2e_s"},
            "training_stall_s": stall, "e2e_spread_s": statistics.pstdev(run["e2e_s"] for run in runs),
            "model": f"Wide({sum(t.nbytes for t in model.state_dict().values())} bytes)"}
