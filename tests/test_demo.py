"""The README's demo, end to end on a tiny configuration: training publishes, a real TorchServe
answers with each version, and everything stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def test_demo_trains_publishes_and_serves(tmp_path) -> None:
    config = yaml.safe_load((REPO / "examples/nt3/train.yaml").read_text())
    config["trainer"]["max_steps"] = 60
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    viper = config["trainer"]["callbacks"][0]["init_args"]
    viper.update(endpoint=f"tcp://127.0.0.1:{free_port()}", pfs_root=str(tmp_path / "pfs"))
    viper["schedule"]["init_args"]["n"] = 20
    config["model"].update(conv_channels=4, dense_units=8)
    config["data"].update(input_length=300)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    finished = subprocess.run([sys.executable, "-m", "examples.nt3.demo", "--config", str(path)],
                              cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=400)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    served = [line for line in finished.stdout.splitlines() if line.startswith("TorchServe answers with v")]
    assert served and "via dram-shm" in served[0]
    assert "the last v3" in finished.stdout
    picture = finished.stdout.rsplit("each version swap marked: ", 1)[-1].strip()
    assert Path(picture).read_bytes().startswith(b"\x89PNG")
