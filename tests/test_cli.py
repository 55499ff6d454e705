"""ViperCallback configured entirely from a LightningCLI YAML file (the NT3 example's CLI)."""

from __future__ import annotations

import yaml

from viper_lightning import FileSystemTier, ViperCallback
from viper_lightning.schedules import EveryNSteps

from examples.nt3.train import main as nt3_cli

from .conftest import LOOPBACK_ANY_PORT


def test_lightning_cli_yaml_configures_and_runs_the_callback(tmp_path) -> None:
    pfs_root = tmp_path / "pfs"
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 30, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{
                "class_path": "viper_lightning.ViperCallback",
                "init_args": {"model_name": "nt3", "endpoint": LOOPBACK_ANY_PORT, "pfs_root": str(pfs_root),
                              "keep_versions": 2, "keep_every_version": True,
                              "schedule": {"class_path": "viper_lightning.schedules.EveryNSteps",
                                           "init_args": {"n": 10}}},
            }],
        },
        "model": {"conv_channels": 4, "dense_units": 8},
        "data": {"input_length": 200, "batch_size": 8, "steps_per_epoch": 50},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = nt3_cli(["fit", "--config", str(path)])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ViperCallback))
    assert isinstance(callback.schedule, EveryNSteps) and callback.schedule.n == 10
    assert callback.settings.keep_versions == 2 and callback.last_version == 3
    tier = FileSystemTier(str(pfs_root))
    assert tier.versions("nt3") == [2, 3]  # keep_versions pruned v1
    manifest = tier.read_manifest("nt3", 3, None)
    assert manifest.step == 30
    assert (tmp_path / "run" / "config.yaml").exists()  # LightningCLI's own copy, beside ours
