"""Train an ensemble of K members on one shared input pipeline, each publishing its own model.

    python -m examples.ensemble.run --members 4 --epochs 2

Starts a BatchLoader here (it reads and preprocesses every batch once) and K member processes
(`examples.ensemble.member` with `examples/ensemble/member.yaml`), member k publishing
`ensemble-k` on notice port `--base-port` + k. Consumers follow them with an EnsembleSubscriber.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import torch

from viper_lightning.data import BatchLoader
from viper_lightning._layout import Layout

from .pipeline import batches

__all__ = ["EpochBatches", "start_members", "main"]


class EpochBatches:
    """`batches(...)` anew for each epoch, each epoch in another order."""

    def __init__(self, samples: int, batch_size: int) -> None:
        self.samples, self.batch_size, self.epoch = samples, batch_size, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.epoch += 1
        return batches(self.samples, self.batch_size, seed=self.epoch)

    def slot_bytes(self) -> int:
        return Layout.for_state_dict(next(batches(self.samples, self.batch_size))).nbytes


def start_members(directory: str, members: int, epochs: int, base_port: int,
                  config: str = "examples/ensemble/member.yaml", extra: list[str] = (),
                  root: str = "runs/ensemble") -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "examples.ensemble.member", "fit", "--config", config,
                              "--data.directory", directory, "--data.member", str(member),
                              "--model.seed", str(member), "--trainer.max_epochs", str(epochs),
                              "--trainer.callbacks.init_args.model_name", f"ensemble-{member}",
                              "--trainer.callbacks.init_args.endpoint", f"tcp://127.0.0.1:{base_port + member}",
                              "--trainer.default_root_dir", f"{root}/member-{member}",  # its config.yaml goes there
                              *extra])
            for member in range(members)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-port", type=int, default=5600)
    parser.add_argument("--root", default="runs/ensemble", help="each member saves its config.yaml in ROOT/member-k")
    args = parser.parse_args(argv)
    epochs = EpochBatches(args.samples, args.batch_size)
    with BatchLoader(args.members, epochs.slot_bytes()) as loader:
        processes = start_members(loader.directory, args.members, args.epochs, args.base_port, root=args.root)
        try:
            served = loader.serve(epochs, args.epochs)
        finally:
            codes = [process.wait() for process in processes]
    print(f"served {served} batches to {args.members} members (exit codes {codes}); dropped: {loader.dropped}")
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
