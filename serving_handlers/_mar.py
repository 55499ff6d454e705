"""Build a TorchServe model archive (.mar, or a no-archive folder) served by ViperHandler."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml

from viper_lightning import ConfigurationError

__all__ = ["build_archive"]

_SHIM = '''"""TorchServe entry point: the Viper handler (TorchServe looks for a class defined here)."""

from serving_handlers import ViperHandler


class Handler(ViperHandler):
    """Serves the newest Viper-published version of this archive's model."""
'''


def build_archive(name: str, model_file: str | Path, model_class: str, viper: dict[str, Any], *,
                  export_path: str | Path, model_kwargs: dict[str, Any] | None = None,
                  initial_weights: torch.nn.Module | str | Path | None = None, version: str = "1.0",
                  archive_format: str = "default", handler: str | Path | None = None) -> Path:
    """Package the model file, initial weights (safetensors) and the `viper:` settings.

    `handler`: a Python file defining one subclass of ViperHandler (a custom preprocess, say),
    served instead of ViperHandler itself.

    Returns the archive's path (`<export_path>/<name>.mar`, or the folder for no-archive)."""
    if archive_format not in ("default", "no-archive"):
        raise ConfigurationError(f"archive_format={archive_format!r}: use 'default' (.mar) or 'no-archive'")
    settings = {"model_class": model_class, "model_kwargs": model_kwargs or {}, **viper}
    settings.setdefault("model_name", name)
    Path(export_path).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="viper-archive-") as staging:
        staging = Path(staging)
        if handler is None:
            (staging / "viper_handler.py").write_text(_SHIM)
        else:
            shutil.copyfile(handler, staging / "viper_handler.py")
        (staging / "model-config.yaml").write_text(yaml.safe_dump({"viper": settings}))
        extra = [_stage_weights(initial_weights, staging)] if initial_weights is not None else []
        _run_archiver(name, version, Path(model_file), staging, extra, Path(export_path), archive_format)
    return Path(export_path) / (name if archive_format == "no-archive" else f"{name}.mar")


def _stage_weights(weights: torch.nn.Module | str | Path, staging: Path) -> Path:
    target = staging / "model.safetensors"
    if isinstance(weights, torch.nn.Module):
        safetensors.torch.save_model(weights, str(target))
    else:
        shutil.copyfile(weights, target)
    return target


def _run_archiver(name: str, version: str, model_file: Path, staging: Path, extra: list[Path],
                  export_path: Path, archive_format: str) -> None:
    archiver = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent))
    if archiver is None:
        raise ConfigurationError("torch-model-archiver is not installed; install the 'serve' extra")
    command = [archiver, "--model-name", name, "--version", version, "--model-file", str(model_file),
               "--handler", str(staging / "viper_handler.py"), "--config-file", str(staging / "model-config.yaml"),
               "--export-path", str(export_path), "--archive-format", archive_format, "--force"]
    if extra:
        command += ["--extra-files", ",".join(str(path) for path in extra)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise ConfigurationError(f"torch-model-archiver failed: {finished.stderr.strip()[-2000:]}")
