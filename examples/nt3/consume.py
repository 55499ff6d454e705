"""Follow the NT3 training run and print each version as it starts serving.

    python -m examples.nt3.consume --config examples/nt3/train.yaml

It builds the same model the training config describes, subscribes to the callback's endpoint
and file-system tier, and scores every new version on fresh samples from the stream at the
version's training step (the data keeps drifting, so a stale model visibly loses accuracy).
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from viper_lightning import ModelSubscriber

from .data import DriftingGeneStream
from .model import NT3

__all__ = ["DemoSettings", "follow", "score", "main"]

EVAL_SAMPLES = 256


@dataclass(frozen=True)
class DemoSettings:
    """What the consumer needs from the training YAML."""

    model: dict[str, Any]
    data: dict[str, Any]
    model_name: str
    endpoint: str
    pfs_root: str

    @classmethod
    def from_yaml(cls, path: str) -> DemoSettings:
        with open(path) as handle:
            config = yaml.safe_load(handle)
        callback = next(c["init_args"] for c in config["trainer"]["callbacks"]
                        if c["class_path"].endswith("ViperCallback"))
        data = dict(config.get("data") or {})
        model = dict(config.get("model") or {}, input_length=data.get("input_length", 6000))
        return cls(model, data, callback["model_name"], callback.get("endpoint", "tcp://127.0.0.1:5555"),
                   callback["pfs_root"])

    def subscriber(self) -> ModelSubscriber:
        return ModelSubscriber(NT3(**self.model), self.model_name, self.endpoint, self.pfs_root)

    def stream(self) -> DriftingGeneStream:
        return DriftingGeneStream(**self.data)


def follow(subscriber: ModelSubscriber, stream: DriftingGeneStream, done: Callable[[], bool]) -> None:
    """Print one line per version that starts serving, until `done()` says stop.

    Runs like a request loop: it leases the serving model, so it never sees a half-swapped one."""
    shown = 0
    while not done():
        if not subscriber.wait_for_version(shown + 1, timeout=0.2):
            continue
        with subscriber.lease() as lease:
            record = next(r for r in reversed(subscriber.stats.updates) if r.version == lease.version)
            accuracy, loss = score(lease.model, stream, record.step or 0)
            shown = lease.version
        print(f"serving v{record.version:<4} step {record.step or 0:>5}  "
              f"{record.latency_s * 1e3:7.1f} ms after publish via {record.route}  "
              f"accuracy {accuracy:5.3f}  loss {loss:6.3f}", flush=True)


def score(model: torch.nn.Module, stream: DriftingGeneStream, step: int) -> tuple[float, float]:
    """Accuracy and loss on fresh samples drawn where the stream stood at `step`."""
    x, y = stream.sample_batch(EVAL_SAMPLES, step)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return (logits.argmax(dim=1) == y).float().mean().item(), torch.nn.functional.cross_entropy(logits, y).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/nt3/train.yaml", help="the training YAML to follow")
    args = parser.parse_args(argv)
    settings = DemoSettings.from_yaml(args.config)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"following {settings.model_name!r} at {settings.endpoint} (Ctrl-C to stop)", flush=True)
    with settings.subscriber() as subscriber:
        follow(subscriber, settings.stream(), stop.is_set)
        stats = subscriber.stats
    print(f"stopped at version {subscriber.version}: {stats.applied} applied, {stats.refused} refused")


if __name__ == "__main__":
    main()
