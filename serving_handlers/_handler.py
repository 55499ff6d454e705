"""ViperHandler: a TorchServe handler whose model follows a Viper-published training run."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from ts.torch_handler.base_handler import BaseHandler

from viper_lightning import (ConfigurationError, EnsembleLease, EnsembleSubscriber, ModelSubscriber, Refusal,
                             ShardedSubscriber, UpdateRecord)

from ._settings import ViperSettings

__all__ = ["ViperHandler", "Served", "worker_device"]

log = logging.getLogger("serving_handlers.viper")


@dataclass(frozen=True)
class Served:
    """Which version answered a batch: handed to `ViperHandler.annotate`."""

    # None: the archive's initial weights, before any update; an ensemble's: each member's, by name
    version: int | None | dict[str, int | None]
    worker: int  # the worker's process id
    route: str | None | dict[str, str | None]  # how that version reached this worker (e.g. "dram-shm")
    batch: int  # how many requests TorchServe batched into this call


class ViperHandler(BaseHandler):
    """Serves the newest Viper version of a model; every response names the version that
    computed it. Updates load in the background and swap in between requests, so no request
    waits for a transfer or sees mixed weights.

    It follows BaseHandler's contract: `initialize`, then per batch `preprocess` ->
    `inference` -> `postprocess`, each overridable. `inference` runs inside one lease of the
    serving copy (`self.model` is that copy while it runs), so a whole batch is answered by one
    version; `annotate` then names it in every answer. The model is placed on `cuda:<gpu_id>`
    when TorchServe gives the worker a GPU (so the GPU routes can be taken), on the CPU otherwise.

    With `viper.members` (each member's name and endpoint) it serves an ensemble: the model is
    built once per member, each follows its own producer (EnsembleSubscriber), a batch is
    answered by the mean of the members' outputs, and `version` and `route` name each member's.

    Default request body: JSON `{"inputs": [[...], ...]}` (a batch of rows) or a single list,
    read as `viper.input_dtype` (float32 by default; int64 for token ids).
    Default response: `{"outputs": [[...], ...], "version": int | null, "worker": pid,
    "route": str | null, "batch": int}`; every response also carries the headers
    `X-Viper-Version`, `X-Viper-Worker` and `X-Viper-Route`, whatever `postprocess` returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.subscriber: ModelSubscriber | ShardedSubscriber | EnsembleSubscriber | None = None
        self.settings: ViperSettings | None = None
        self._metrics: Any = None
        self._routes: dict[int, str] = {}
        self._sizes: list[int] | None = None  # rows per request of the batch being answered
        self._errors: dict[int, str] = {}  # requests of that batch refused by preprocess, and why

    def initialize(self, context: Any) -> None:
        self.context = context
        self.manifest = context.manifest
        self._metrics = getattr(context, "metrics", None)
        self.settings = ViperSettings.from_config(getattr(context, "model_yaml_config", None))
        properties = context.system_properties
        self.device = worker_device(properties, torch.cuda.is_available())
        model_dir = properties.get("model_dir")
        settings = self.settings
        models = [_build_model(model_dir, self.manifest["model"].get("modelFile"), settings)
                  for _ in range(len(settings.members) if settings.members else 1)]
        for model in models:
            _load_initial_weights(model, model_dir, settings.initial_weights)
            model.to(self.device).eval()
        common = dict(routes=settings.routes, fetch_timeout=settings.fetch_timeout, zero_copy=settings.zero_copy,
                      allow_keyless=settings.allow_keyless, on_update=self._updated, on_refusal=self._refused)
        if settings.members:
            self.subscriber = EnsembleSubscriber(models, [name for name, _ in settings.members],
                                                 [endpoint for _, endpoint in settings.members], settings.pfs_root,
                                                 settings.key(), **common).start()
        elif settings.endpoints:
            self.subscriber = ShardedSubscriber(models[0], settings.model_name, settings.endpoints, settings.pfs_root,
                                                settings.key(), **common).start()
        else:
            self.subscriber = ModelSubscriber(models[0], settings.model_name, settings.endpoint, settings.pfs_root,
                                              settings.key(), together=settings.together, **common).start()
        self.model = None  # the serving copy is leased per batch (see inference)
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """preprocess -> inference (or explain_handle, for TorchServe's explanations API) inside
        one lease -> postprocess -> annotate; a describe request answers `describe_handle()`."""
        started = time.perf_counter()
        self.context = context
        self._sizes, self._errors = None, {}
        if self._is_describe():
            return [self.describe_handle()]
        inputs = self.preprocess(data)
        explaining = self._is_explain()
        with self.subscriber.lease() as lease:
            self.model = lease.model
            try:
                if inputs is None:  # every request of the batch was refused by preprocess
                    outputs = None
                else:
                    outputs = self.explain_handle(inputs, data) if explaining else self.inference(inputs)
            finally:
                self.model = None  # a load may write this copy once the lease ends
        answers = outputs if explaining else self.postprocess(outputs)
        if isinstance(lease, EnsembleLease):
            served = Served(lease.versions, os.getpid(), lease.routes, len(data))
        else:
            served = Served(lease.version, os.getpid(), self._routes.get(lease.version), len(data))
        answers = self.annotate(answers, served)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return answers

    def preprocess(self, data: list[Any]) -> torch.Tensor | None:
        """Each request's JSON rows (`{"inputs": [...]}` or a bare list) as one batch tensor of
        `viper.input_dtype`; how many rows each request sent is kept for `postprocess`. A request
        that does not parse, or whose rows differ in shape from the batch's first, is answered
        with an error (status 400) and the others are answered as usual; None if none is left."""
        dtype = getattr(torch, self.settings.input_dtype)
        batches: list[torch.Tensor] = []
        self._sizes = []
        for index, request in enumerate(data):
            try:
                rows = _rows_of(request, dtype)
                if batches and rows.shape[1:] != batches[0].shape[1:]:
                    raise ValueError(f"rows of shape {list(rows.shape[1:])}, the batch's are {list(batches[0].shape[1:])}")
            except (ValueError, TypeError, RuntimeError, AttributeError) as exc:
                self._errors[index] = f"request refused: {exc}"[:500]
                self._sizes.append(0)
                continue
            batches.append(rows)
            self._sizes.append(len(rows))
        return torch.cat(batches) if batches else None

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The leased model (`self.model`) on the batch, on the model's device."""
        with torch.no_grad():
            return self.model(data.to(self.device), *args, **kwargs)

    def postprocess(self, data: torch.Tensor | None) -> list[dict[str, Any]]:
        """One answer per request: its rows of the outputs (one row each, unless the default
        `preprocess` recorded more), or the error preprocess refused it with."""
        sizes = self._sizes if self._sizes is not None else [1] * len(data)
        answers, start = [], 0
        for index, size in enumerate(sizes):
            if index in self._errors:
                answers.append({"error": self._errors[index]})
                set_status = getattr(self.context, "set_response_status", None)
                if set_status is not None:
                    set_status(400, "Bad Request", index)
                continue
            rows = data[start:start + size].cpu()
            answers.append({"outputs": (rows if self._sizes is not None else rows[0]).tolist()})
            start += size
        return answers

    def annotate(self, answers: list[Any], served: Served) -> list[Any]:
        """Name the version that answered: in each dict answer ("version", "worker", "route",
        "batch", unless postprocess set them) and in every response's X-Viper-* headers. Override
        it to put them elsewhere; a subclass that changes only postprocess keeps them."""
        for index, answer in enumerate(answers):
            if isinstance(answer, dict):
                for key, value in (("version", served.version), ("worker", served.worker), ("route", served.route),
                                   ("batch", served.batch)):
                    answer.setdefault(key, value)
            set_header = getattr(self.context, "set_response_header", None)
            if set_header is not None:
                set_header(index, "X-Viper-Version", json.dumps(served.version))
                set_header(index, "X-Viper-Worker", str(served.worker))
                set_header(index, "X-Viper-Route", json.dumps(served.route))
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


def worker_device(properties: dict[str, Any], cuda_available: bool) -> torch.device:
    """Where a worker's model goes: the GPU TorchServe assigned it (`gpu_id`), else the CPU."""
    gpu_id = properties.get("gpu_id")
    if gpu_id is not None and cuda_available:
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")


def _rows_of(request: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    body = request.get("body", request.get("data"))
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)
    rows = body.get("inputs") if isinstance(body, dict) else body
    tensor = torch.as_tensor(rows, dtype=dtype)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
