"""ViperHandler: a TorchServe handler whose model follows a Viper-published training run."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import sys
from typing import Any

import safetensors.torch
import torch
from ts.torch_handler.base_handler import BaseHandler

from viper_lightning import ConfigurationError, ModelSubscriber, Refusal, ShardedSubscriber, UpdateRecord

from ._settings import ViperSettings

__all__ = ["ViperHandler"]

log = logging.getLogger("serving_handlers.viper")


class ViperHandler(BaseHandler):
    """Serves the newest Viper version of a model; every response names the version that
    computed it. Updates load in the background and swap in between requests, so no request
    waits for a transfer or sees mixed weights.

    Request body: JSON `{"inputs": [[...], ...]}` (a batch) or a single list of numbers.
    Response: `{"version": int | null, "outputs": [[...], ...], "worker": pid, "route": str | null}`
    (`route`: how that version reached this worker, e.g. "dram-shm").
    """

    def __init__(self) -> None:
        super().__init__()
        self.subscriber: ModelSubscriber | ShardedSubscriber | None = None
        self.settings: ViperSettings | None = None
        self._metrics: Any = None
        self._routes: dict[int, str] = {}

    def initialize(self, context: Any) -> None:
        self.context = context
        self.manifest = context.manifest
        self._metrics = getattr(context, "metrics", None)
        self.settings = ViperSettings.from_config(getattr(context, "model_yaml_config", None))
        model_dir = context.system_properties.get("model_dir")
        model = _build_model(model_dir, self.manifest["model"].get("modelFile"), self.settings)
        _load_initial_weights(model, model_dir, self.settings.initial_weights)
        model.eval()
        settings = self.settings
        common = dict(routes=settings.routes, fetch_timeout=settings.fetch_timeout, zero_copy=settings.zero_copy,
                      allow_keyless=settings.allow_keyless, on_update=self._updated, on_refusal=self._refused)
        self.subscriber = ShardedSubscriber(model, settings.model_name, settings.endpoints, settings.pfs_root,
                                            settings.key(), **common).start() if settings.endpoints else \
            ModelSubscriber(model, settings.model_name, settings.endpoint, settings.pfs_root, settings.key(),
                            together=settings.together, **common).start()
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        batches = [_inputs_of(request) for request in data]
        sizes = [len(batch) for batch in batches]
        with self.subscriber.lease() as lease, torch.no_grad():
            outputs = lease.model(torch.cat(batches))
        answers, start = [], 0
        for size in sizes:
            answers.append({"version": lease.version, "outputs": outputs[start:start + size].tolist(),
                            "worker": os.getpid(), "route": self._routes.get(lease.version)})
            start += size
        return answers

    # -- metrics (called on the subscriber thread) -------------------------------------------
    def _updated(self, record: UpdateRecord) -> None:
        self._routes = {record.version: record.route}
        self._emit("ViperUpdateLatencyMs", record.latency_s * 1e3, "Milliseconds", "gauge")
        self._emit("ViperVersionsApplied", 1, "Count", "counter")
        self._emit("ViperVersion", record.version, "Count", "gauge")
        self._emit("ViperVersionLag", self.subscriber.lag if self.subscriber else 0, "Count", "gauge")

    def _refused(self, refusal: Refusal) -> None:
        self._emit("ViperFailedUpdates", 1, "Count", "counter")
        self._emit("ViperVersionLag", self.subscriber.lag if self.subscriber else 0, "Count", "gauge")

    def _emit(self, name: str, value: float, unit: str, kind: str) -> None:
        if self._metrics is None:
            return
        try:
            from ts.metrics.metric_type_enum import MetricTypes

            metric_type = MetricTypes.COUNTER if kind == "counter" else MetricTypes.GAUGE
            self._metrics.add_metric(name=name, value=value, unit=unit, dimensions=[], metric_type=metric_type)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            log.exception("could not emit metric %s", name)


def _build_model(model_dir: str, model_file: str | None, settings: ViperSettings) -> torch.nn.Module:
    """Instantiate `model_class` from the archive's model file with `model_kwargs`."""
    if not model_file:
        raise ConfigurationError("the archive has no model file; archive it with --model-file")
    path = os.path.join(model_dir, model_file)
    module_name = os.path.splitext(os.path.basename(model_file))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, settings.model_class, None)
    if not inspect.isclass(cls) or not issubclass(cls, torch.nn.Module):
        raise ConfigurationError(f"{model_file} defines no torch.nn.Module named {settings.model_class!r}")
    return cls(**settings.model_kwargs)


def _load_initial_weights(model: torch.nn.Module, model_dir: str, name: str | None) -> None:
    """The archive's safetensors weights, if it has them (never a pickle)."""
    if name is None:
        return
    path = os.path.join(model_dir, name)
    if os.path.exists(path):
        safetensors.torch.load_model(model, path, strict=True)  # handles tied weights


def _inputs_of(request: dict[str, Any]) -> torch.Tensor:
    body = request.get("body", request.get("data"))
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)
    rows = body.get("inputs") if isinstance(body, dict) else body
    tensor = torch.as_tensor(rows, dtype=torch.float32)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
