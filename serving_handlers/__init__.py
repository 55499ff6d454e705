"""TorchServe integration: a handler that follows a Viper-published training run, a one-command
archiver, and a TorchServe process manager for tests, demos and benchmarks.

`ViperHandler` is imported lazily: it needs TorchServe (the 'serve' extra) and nothing here
runs at import."""

from typing import TYPE_CHECKING, Any

from ._mar import build_archive
from ._settings import ViperSettings
from ._torchserve import TorchServe

if TYPE_CHECKING:
    from ._handler import Served, ViperHandler, worker_device

__all__ = ["ViperHandler", "Served", "worker_device", "ViperSettings", "TorchServe", "build_archive"]


def __getattr__(name: str) -> Any:
    if name in ("ViperHandler", "Served", "worker_device"):
        from . import _handler

        return getattr(_handler, name)
    raise AttributeError(f"module 'serving_handlers' has no attribute {name!r}")
