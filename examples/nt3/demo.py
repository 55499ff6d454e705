"""The demo: NT3 trains and publishes while TorchServe serves it and follows every version.

    bash scripts/demo.sh            (or: python -m examples.nt3.demo)

1. archives NT3 for TorchServe with `serving_handlers` (initial weights + Viper settings),
2. starts a real TorchServe on loopback (ports chosen free) and registers the archive,
3. trains NT3 with `examples.nt3.train` and `examples/nt3/train.yaml` (ViperCallback publishes),
4. queries TorchServe's standard inference API and prints each new version as it starts
   answering, with its accuracy on fresh data from the drifting stream,
5. draws the served accuracy against time, each version swap marked, and prints the PNG's path.
Ctrl-C, or the end of training, stops everything cleanly. Logs go to runs/<model>/.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from serving_handlers import TorchServe, build_archive
from viper_lightning import FileSystemTier

from .consume import DemoSettings
from .data import DriftingGeneStream
from .model import NT3

__all__ = ["main"]

QUERY_ROWS = 64
QUERY_PAUSE_S = 0.2  # pacing between demo queries (a demo client, not a synchronisation)
FINAL_WAIT_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/nt3/train.yaml")
    args = parser.parse_args(argv)
    settings = DemoSettings.from_yaml(args.config)
    run_dir = Path("runs") / settings.model_name
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    store = build_archive(settings.model_name, Path(__file__).with_name("model.py"), "NT3",
                          {"endpoint": settings.endpoint, "pfs_root": str(Path(settings.pfs_root).resolve())},
                          export_path=run_dir / "model_store", model_kwargs=settings.model,
                          initial_weights=NT3(**settings.model)).parent
    print(f"starting TorchServe (logs: {run_dir / 'torchserve'})", flush=True)
    with TorchServe(run_dir / "torchserve", store) as server:
        server.register(f"{settings.model_name}.mar", settings.model_name)
        print(f"training {settings.model_name} (log: {run_dir / 'train.log'}); querying "
              f"{server.inference_url}/predictions/{settings.model_name}", flush=True)
        trainer = start_training(args.config, run_dir / "train.log")
        client = Client(server, settings)
        try:
            served = client.follow(lambda: interrupted.is_set() or trainer.poll() is not None)
        finally:
            stop(trainer)
        if trainer.returncode not in (0, -signal.SIGINT) and not interrupted.is_set():
            print(f"training failed (exit {trainer.returncode}); see {run_dir / 'train.log'}", file=sys.stderr)
            return 1
        final = FileSystemTier(settings.pfs_root).latest(settings.model_name)
        if final is not None and not interrupted.is_set():
            served = client.follow(lambda: False, until=final)
    print(f"done: TorchServe answered with {len(served)} versions, the last v{max(served, default=0)}")
    picture = run_dir / "served_accuracy.png"
    client.plot(picture, settings.model_name)
    print(f"served accuracy against time, each version swap marked: {picture.resolve()}")
    return 0


class Client:
    """Queries TorchServe like any client and reports each version the first time it answers."""

    def __init__(self, server: TorchServe, settings: DemoSettings) -> None:
        self._server, self._settings = server, settings
        self._stream = DriftingGeneStream(**settings.data)
        self._tier = FileSystemTier(settings.pfs_root)
        self._seen: set[int] = set()
        self._pause = threading.Event()
        self._started = time.monotonic()
        self._answers: list[tuple[float, int | None, float]] = []  # (seconds, version, accuracy) per query

    def follow(self, done, until: int | None = None) -> set[int]:
        for _ in range(int(FINAL_WAIT_S / QUERY_PAUSE_S) if until else 10**9):
            if done():
                break
            version = self._query()
            if until is not None and version is not None and version >= until:
                break
            self._pause.wait(QUERY_PAUSE_S)
        return self._seen

    def _query(self) -> int | None:
        step = self._step_of(max(self._seen, default=None))
        x, y = self._stream.sample_batch(QUERY_ROWS, step)
        response = self._server.predict(self._settings.model_name, {"inputs": x.tolist()})
        version = response["version"]
        accuracy = (torch.tensor(response["outputs"]).argmax(dim=1) == y).float().mean().item()
        self._answers.append((time.monotonic() - self._started, version, accuracy))
        if version is not None and version not in self._seen:
            self._seen.add(version)
            print(f"TorchServe answers with v{version:<4} (trained to step {self._step_of(version):>5}, "
                  f"via {response.get('route')})  accuracy on fresh data {accuracy:5.3f}", flush=True)
        return version

    def plot(self, path: Path, model_name: str) -> None:
        """Served accuracy against time, with a line where each version first answered."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(9, 4))
        axes.plot([t for t, _, _ in self._answers], [a for _, _, a in self._answers], ".-", lw=1, ms=3,
                  label="accuracy of each answer on fresh data")
        first: dict[int, float] = {}
        for seconds, version, _ in self._answers:
            if version is not None:
                first.setdefault(version, seconds)
        for version, seconds in first.items():
            axes.axvline(seconds, color="tab:red", alpha=0.4, lw=1)
            axes.annotate(f"v{version}", (seconds, 1.0), xytext=(2, -10), textcoords="offset points",
                          fontsize=8, color="tab:red")
        axes.set(xlabel="seconds since training started", ylabel="served accuracy", ylim=(0, 1.05),
                 title=f"{model_name}: what TorchServe answered with (red: a new version starts answering)")
        axes.legend(loc="lower right")
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)

    def _step_of(self, version: int | None) -> int:
        if version is None:
            return 0
        try:
            return self._tier.read_manifest(self._settings.model_name, version, None).step or 0
        except Exception:  # noqa: BLE001 - pruned already: only the printout loses its step
            return 0


def start_training(config: str, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # a file, not a pipe: nobody has to drain it
        return subprocess.Popen([sys.executable, "-m", "examples.nt3.train", "fit", "--config", config],
                                stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    """Ask training to stop (SIGINT lets Lightning tear down), then insist."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())
