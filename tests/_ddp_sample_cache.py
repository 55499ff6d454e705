"""A real two-rank DDP run (CPU, Gloo) through ImportanceDataModule and SampleLossCallback.
Lightning starts rank 1 by running this script again; each rank writes what it saw.

    python -m tests._ddp_sample_cache --root STORE --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch.distributed

from examples.sample_cache.model import Classifier
from viper_lightning.data import ImportanceDataModule, SampleLossCallback


class _Drawn(L.Callback):
    def __init__(self) -> None:
        self.indices: set[int] = set()
        self.cache_dir: str | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.cache_dir = trainer.datamodule.cache.directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.indices.update(int(i) for i in batch["index"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    data = ImportanceDataModule(args.root, batch_size=20, num_workers=0, cache_fraction=0.3)
    drawn, recorder = _Drawn(), SampleLossCallback()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder, drawn])
    trainer.fit(Classifier(dim=8), datamodule=data)
    scored = np.flatnonzero(np.isfinite(data.scores._losses))
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "scored": [int(i) for i in scored], "drawn": sorted(drawn.indices),
        "cache_dir": drawn.cache_dir, "draws": recorder.total_draws}))
    torch.distributed.destroy_process_group()  # before the interpreter exits, not in its teardown


if __name__ == "__main__":
    main()
