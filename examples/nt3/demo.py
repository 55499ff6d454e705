"""The demo: NT3 trains and publishes in one process while a consumer follows it live.

    bash scripts/demo.sh            (or: python -m examples.nt3.demo)

Training runs `examples.nt3.train` with `examples/nt3/train.yaml` (its log goes to
runs/nt3/train.log); this process subscribes and prints every version as it starts serving,
with its accuracy on fresh data. Ctrl-C stops both cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from viper_lightning import FileSystemTier

from .consume import DemoSettings, follow

FINAL_WAIT_S = 60.0


def start_training(config: str, log_path: str) -> subprocess.Popen:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:  # a file, not a pipe: nobody has to drain it
        return subprocess.Popen([sys.executable, "-m", "examples.nt3.train", "fit", "--config", config],
                                stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/nt3/train.yaml")
    args = parser.parse_args(argv)
    settings = DemoSettings.from_yaml(args.config)
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    log_path = os.path.join("runs", settings.model_name, "train.log")
    print(f"training {settings.model_name} (log: {log_path}); the consumer prints each version it serves",
          flush=True)
    with settings.subscriber() as subscriber:
        trainer = start_training(args.config, log_path)
        try:
            follow(subscriber, settings.stream(), lambda: interrupted.is_set() or trainer.poll() is not None)
        finally:
            stop(trainer)
        if trainer.returncode not in (0, -signal.SIGINT) and not interrupted.is_set():
            print(f"training failed (exit {trainer.returncode}); see {log_path}", file=sys.stderr)
            return 1
        final = FileSystemTier(settings.pfs_root).latest(settings.model_name)
        if final is not None and not interrupted.is_set():
            subscriber.wait_for_version(final, FINAL_WAIT_S)
            follow(subscriber, settings.stream(), lambda: subscriber.version == final)
        stats = subscriber.stats
    print(f"done: serving v{subscriber.version}; {stats.applied} versions applied, {stats.refused} refused")
    return 0


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
