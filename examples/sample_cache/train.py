"""Train through the importance-aware sample cache while ViperCallback publishes.

    python -m examples.sample_cache.data --root runs/samples
    python -m examples.sample_cache.train fit --config examples/sample_cache/train.yaml

The data module, its cache and sampler, and both callbacks are configured in the YAML file.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from viper_lightning.data import ImportanceDataModule

from .model import Classifier

__all__ = ["main"]


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(Classifier, ImportanceDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
