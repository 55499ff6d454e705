"""Request latency of the servers that follow a training run, without updates and during them.

    python -m benchmarks.serving_latency --servers litserve torchserve --requests 400 --updates 20 --json OUT

For each server (LitServe through `serving_handlers.litserve`, TorchServe through ViperHandler,
each with one worker and its defaults), `--clients` threads send requests on loopback as fast as
answers come: first `--requests` with no update (`quiet`), then, while a producer on this host
publishes `--updates` versions (each once the previous one has been answered), every request
until the last is answered and at least `--requests` in all (`updating`). It prints p50 and p99 of each phase, and their ratio, measured in the same run,
and counts failed requests (there must be none). The model is `benchmarks.serving_model.Wide`
of `--size-mb` (one wide layer: a request costs one pass over the weights).
`--json OUT` writes `{"results": [{"server", "phase", "requests", "failed", "p50_ms", "p99_ms", "versions"}]}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from serving_handlers import TorchServe, build_archive
from viper_lightning import ModelPublisher

from ._models import wide_kwargs
from .serving_model import Wide

WAIT_S = 120.0
MODEL_FILE = Path(__file__).with_name("serving_model.py")


class _Load:
    """Client threads calling `ask(rows)` until `requests` answers are in (or stopped)."""

    def __init__(self, ask, rows: torch.Tensor, clients: int) -> None:
        self.ask, self.payload = ask, {"inputs": rows.tolist()}
        self.clients = clients
        self.latencies: list[float] = []
        self.versions: list[int | None] = []
        self.failed = 0
        self.changed = threading.Condition()

    def run(self, requests: int, during=None) -> dict[str, Any]:
        """Until `requests` answers and `during()` (run meanwhile on this thread) has returned:
        every request of the phase counts."""
        self.latencies, self.versions, self.failed = [], [], 0
        stop = threading.Event()
        threads = [threading.Thread(target=self._client, args=(stop,)) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        if during is not None:
            during()
        with self.changed:
            self.changed.wait_for(lambda: len(self.latencies) + self.failed >= requests, WAIT_S * 10)
        stop.set()
        for thread in threads:
            thread.join(WAIT_S)
        ordered = sorted(self.latencies)
        return {"requests": len(ordered), "failed": self.failed, "versions": len(set(self.versions)),
                "p50_ms": statistics.median(ordered) * 1e3,
                "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3}

    def _client(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                answer = self.ask(self.payload)
            except Exception:  # noqa: BLE001 - counted: a failed request is a result
                with self.changed:
                    self.failed += 1
                    self.changed.notify_all()
                continue
            with self.changed:
                self.latencies.append(time.perf_counter() - started)
                self.versions.append(answer["version"])
                self.changed.notify_all()

    def wait_for_version(self, version: int) -> None:
        with self.changed:
            self.changed.wait_for(lambda: version in self.versions[-64:], WAIT_S)


def _publishing(publisher: ModelPublisher, model: torch.nn.Module, load: _Load, updates: int):
    def publish_all() -> None:
        for seed in range(updates):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(float(seed + 1) * 1e-3)
            version = publisher.publish(model, wait_for_slot=True)
            load.wait_for_version(version)
    return publish_all


def measure(server: str, size_mb: float, requests: int, updates: int, clients: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    kwargs = wide_kwargs(size_mb)
    model = Wide(**kwargs)
    rows = torch.randn(2, kwargs["features"])
    name = f"bench-serving-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="viper-bench-serving-") as root, \
            ModelPublisher(name, "tcp://127.0.0.1:*", allow_keyless=True) as publisher:
        root = Path(root)
        if server == "litserve":
            from serving_handlers.litserve import LitServeProcess

            safetensors.torch.save_model(model, str(root / "initial.safetensors"))
            running = LitServeProcess(["--model-class", "benchmarks.serving_model:Wide", "--model-kwargs",
                                       json.dumps(kwargs), "--model-name", name, "--endpoint", publisher.endpoint,
                                       "--allow-keyless", "--accelerator", "cpu", "--initial-weights",
                                       str(root / "initial.safetensors")], root / "ls")
            ask = running.predict
        else:
            build_archive("wide", MODEL_FILE, "Wide", {"model_name": name, "endpoint": publisher.endpoint,
                                                       "allow_keyless": True},
                          export_path=root / "store", model_kwargs=kwargs, initial_weights=model)
            running = TorchServe(root / "ts", root / "store")
            ask = lambda payload: running.predict("wide", payload)  # noqa: E731
        with running:
            if server == "torchserve":
                running.register("wide.mar", "wide")
            load = _Load(ask, rows, clients)
            load.run(max(10, requests // 10))  # warm-up, not counted
            quiet = load.run(requests)
            updating = load.run(requests, during=_publishing(publisher, model, load, updates))
    return [{"server": server, "phase": "quiet", **quiet}, {"server": server, "phase": "updating", **updating}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["litserve", "torchserve"], choices=["litserve", "torchserve"])
    parser.add_argument("--size-mb", type=float, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = []
    for server in args.servers:
        results += measure(server, args.size_mb, args.requests, args.updates, args.clients)
    print(f"\n{'server':<12}{'phase':<10}{'requests':>9}{'failed':>7}{'versions':>9}{'p50 ms':>8}{'p99 ms':>8}")
    for r in results:
        print(f"{r['server']:<12}{r['phase']:<10}{r['requests']:>9}{r['failed']:>7}{r['versions']:>9}"
              f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}")
    for server in args.servers:
        quiet, updating = (r for r in results if r["server"] == server)
        print(f"{server}: p50 during updates / quiet {updating['p50_ms'] / quiet['p50_ms']:.2f}, "
              f"p99 {updating['p99_ms'] / quiet['p99_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"size_mb": args.size_mb, "clients": args.clients, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
