"""A real Lightning run of an FSDP2-sharded model on CPU (ModelParallelStrategy, Gloo) with
ViperCallback: every rank publishes its shard. Lightning starts the other ranks by running
this script again. Rank 0 writes the final full weights and the last version for the test.

    python -m tests._lightning_sharded --model-name M --port P --key-file K --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import safetensors.torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from tests.lightning_models import ShardedRegressor
from viper_lightning import ViperCallback
from viper_lightning.schedules import EveryNSteps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    L.seed_everything(0)
    callback = ViperCallback(args.model_name, f"tcp://127.0.0.1:{args.port}", hmac_key_file=args.key_file,
                             schedule=EveryNSteps(4))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, max_steps=10, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1,
                                                       process_group_backend="gloo"),
                        callbacks=[callback])
    module = ShardedRegressor()
    trainer.fit(module)
    full = {name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().contiguous()
            for name, tensor in module.state_dict().items()}
    if trainer.is_global_zero:
        out = Path(args.out)
        safetensors.torch.save_file(full, out / "full.safetensors")
        (out / "run.json").write_text(json.dumps({"last_version": callback.last_version}))


if __name__ == "__main__":
    main()
