"""One member of the ensemble: a Lightning Trainer on the shared pipeline, publishing its own model.

    python -m examples.ensemble.member fit --config examples/ensemble/member.yaml \\
        --data.directory DIR --data.member 1 --model.seed 1 --trainer.callbacks.init_args.model_name ensemble-1

(examples.ensemble.run starts the loader and every member with these arguments.)
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from viper_lightning.data import SharedBatchesDataModule

from .pipeline import Member

__all__ = ["main"]


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(Member, SharedBatchesDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
