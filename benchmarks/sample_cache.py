"""The importance-aware sample cache (SHADE) against LRU and uncached uniform sampling.

    python -m benchmarks.sample_cache --fractions 0.1 0.2 0.4 --json OUT.json --plot OUT.png

A skewed workload: `--samples` points of a 4-class problem labelled by a fixed random linear
teacher, of which `--hard-fraction` lie close to its decision boundaries (hard: their loss stays
high) and the rest far from them (easy). The samples are stored one file each (SampleStore) and
served over HTTP on loopback by a server that waits `--latency-ms` before each answer: the
injected storage latency. Each case trains the same MLP with a real Lightning Trainer for the
same number of steps (`--epochs` epochs of the data set), through ImportanceDataModule with its
documented defaults and SampleLossCallback:
  uniform     no cache, a shuffled permutation per epoch (a plain DataLoader's sampling);
  lru         that sampling through an LRU cache of `cache_fraction` of the data set's bytes;
  importance  the importance cache and sampler (policy "importance", its defaults);
  importance-substitute  the same with SHADE's substitution of misses by cached samples of
              similar rank, `--substitute-window` (a value the user sets; off by default).
It prints, per case: the hit ratio over all draws, the mean time per epoch, and the accuracy on
a held-out test set of the same mix; and the ratios the issue checks, measured in this run.
`--json OUT` writes `{"results": [{"policy", "cache_fraction", "hit_ratio", "epoch_s", "final_accuracy"}]}`.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from examples.sample_cache.data import skewed_workload
from examples.sample_cache.model import Classifier
from viper_lightning.data import ImportanceDataModule, SampleLossCallback, SampleStore


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    latency_s = 0.0

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        threading.Event().wait(self.latency_s)  # the injected storage latency, before each answer
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


class SlowStorage:
    """A directory served over HTTP on loopback, each answer delayed by `latency_ms`."""

    def __init__(self, directory: str, latency_ms: float) -> None:
        handler = type("Handler", (_SlowHandler,), {"latency_s": latency_ms / 1e3})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                       functools.partial(handler, directory=directory))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> SlowStorage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _EpochTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._started)


def train_once(url: str, policy: str, fraction: float, epochs: int, samples: int, dim: int, workers: int,
               test: tuple[torch.Tensor, torch.Tensor], substitute_window: float = 0.0) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    settings = {"uniform": {"cache_affinity": 0.0}, "lru": {"policy": "lru"}, "importance": {},
                "importance-substitute": {"substitute_window": substitute_window}}[policy]
    data = ImportanceDataModule(url, num_workers=workers, cache_fraction=fraction, **settings)
    losses, times = SampleLossCallback(), _EpochTimes()
    model = Classifier(dim)
    steps = epochs * (samples // data.batch_size)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[losses, times], accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=data)
    with torch.no_grad():
        accuracy = (model.net(test[0]).argmax(dim=1) == test[1]).float().mean().item()
    return {"policy": policy, "cache_fraction": fraction, "hit_ratio": losses.hit_ratio,
            "epoch_s": sum(times.times) / len(times.times), "final_accuracy": accuracy, "steps": steps,
            "epoch_s_each": times.times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hard-fraction", type=float, default=0.15)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--substitute-window", type=float, default=0.01,
                        help="the importance-substitute case's substitute_window")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    x, y = skewed_workload(args.samples, args.dim, args.hard_fraction, seed=0)
    test = skewed_workload(2000, args.dim, args.hard_fraction, seed=1)
    results = []
    with tempfile.TemporaryDirectory(prefix="viper-bench-samples-") as root:
        SampleStore.write(root, zip(x, y))
        with SlowStorage(root, args.latency_ms) as storage:
            cases = [("uniform", 0.0)] + [(policy, fraction) for fraction in args.fractions
                                          for policy in ("lru", "importance", "importance-substitute")]
            for policy, fraction in cases:
                results.append(train_once(storage.url, policy, fraction, args.epochs, args.samples, args.dim,
                                          args.workers, test, args.substitute_window))
                r = results[-1]
                print(f"{policy:<22} cache {fraction:>4.0%}  hit ratio {r['hit_ratio']:.3f}  epoch "
                      f"{r['epoch_s']:.2f} s  accuracy {r['final_accuracy']:.4f}", flush=True)
    uniform = results[0]
    print(f"\nratios measured in this run ({args.samples} samples, {args.latency_ms:g} ms storage latency, "
          f"{args.epochs} epochs):")
    for fraction in args.fractions:
        lru = next(r for r in results if r["policy"] == "lru" and r["cache_fraction"] == fraction)
        for name in ("importance", "importance-substitute"):
            case = next(r for r in results if r["policy"] == name and r["cache_fraction"] == fraction)
            print(f"  cache {fraction:>4.0%} {name:<22}: hit ratio / lru's {case['hit_ratio'] / max(lru['hit_ratio'], 1e-9):6.2f}"
                  f"   epoch time / uniform's {case['epoch_s'] / uniform['epoch_s']:.2f}   accuracy - uniform's "
                  f"{(case['final_accuracy'] - uniform['final_accuracy']) * 100:+.2f} points")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"samples": args.samples, "latency_ms": args.latency_ms, "epochs": args.epochs,
                       "results": results}, out, indent=2)
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, ax, label in (("hit_ratio", axes[0], "hit ratio"), ("epoch_s", axes[1], "seconds per epoch"),
                           ("final_accuracy", axes[2], "final accuracy")):
        for policy in ("lru", "importance", "importance-substitute"):
            points = sorted((r["cache_fraction"], r[key]) for r in results if r["policy"] == policy)
            ax.plot(*zip(*points), marker="o", label=policy)
        uniform = next(r for r in results if r["policy"] == "uniform")
        ax.axhline(uniform[key], color="grey", linestyle="--", label="uniform, no cache")
        ax.set(xlabel="cache size (fraction of the data set)", ylabel=label)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(Path(path), dpi=120)


if __name__ == "__main__":
    main()
