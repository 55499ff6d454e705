"""LitServe beside TorchServe: a LitAPI whose model follows a Viper-published training run.

    python -m serving_handlers.litserve --model-class examples.nt3.model:NT3 \\
        --model-kwargs '{"input_length": 2000}' --model-name nt3 --endpoint tcp://127.0.0.1:5555 \\
        --pfs-root runs/nt3/pfs --port 8000

Needs the 'litserve' extra. It keeps the TorchServe handler's guarantees: the model is built from
a class path and keyword arguments (and a safetensors file of initial weights, if given); a
ModelSubscriber (a ShardedSubscriber for a sharded producer) follows the run; each response
names the version that computed it; swaps happen between requests, so a batch is answered by
one version; bad updates are refused and the last good version keeps answering. The server
binds loopback unless told otherwise.

Request: `{"inputs": [[...], ...]}` (rows, read as `input_dtype`) or one row. Response:
`{"outputs": [[...], ...], "version": int | null, "route": str | null, "worker": pid}`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import litserve as ls
import torch

from viper_lightning import ConfigurationError, ModelSubscriber, ShardedSubscriber, TransferError, UpdateRecord
from viper_lightning.transport._protocol import DEFAULT_ENDPOINT

from ._settings import INPUT_DTYPES
from ._torchserve import _free_port

__all__ = ["ViperLitAPI", "LitServeProcess", "main"]


class ViperLitAPI(ls.LitAPI):
    """Serves the newest Viper version of a model with LitServe (see the module docstring).

    Args:
        model_class: "module:Class" of a torch.nn.Module, importable where the server runs.
        model_name: the Viper model name to follow.
        endpoint: the producer's notice endpoint; `endpoints`: each part's, for a sharded producer.
        model_kwargs: the class's constructor arguments.
        initial_weights: a safetensors file served before the first update (None: the class's own).
        pfs_root, hmac_key, routes, fetch_timeout, allow_keyless: as for ModelSubscriber.
        input_dtype: what request inputs are read as (float32; int64 for token ids).
        max_batch_size, batch_timeout: LitServe's batching; a batch is answered by one version.
    """

    def __init__(self, model_class: str, model_name: str, endpoint: str = DEFAULT_ENDPOINT, *,
                 endpoints: Sequence[str] | None = None, model_kwargs: dict[str, Any] | None = None,
                 initial_weights: str | None = None, pfs_root: str | None = None, hmac_key: str | None = None,
                 routes: Sequence[str] | None = None, fetch_timeout: float = 10.0, allow_keyless: bool = False,
                 input_dtype: str = "float32", max_batch_size: int = 1, batch_timeout: float = 0.0) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        if input_dtype not in INPUT_DTYPES:
            raise ConfigurationError(f"input_dtype {input_dtype!r} is not one of {INPUT_DTYPES}")
        self.model_class, self.model_kwargs = model_class, dict(model_kwargs or {})
        self.model_name, self.endpoint, self.endpoints = model_name, endpoint, list(endpoints) if endpoints else None
        self.initial_weights, self.pfs_root, self._hmac_key = initial_weights, pfs_root, hmac_key
        self.routes, self.fetch_timeout, self.allow_keyless = routes, fetch_timeout, allow_keyless
        self.input_dtype = input_dtype
        self.subscriber: ModelSubscriber | ShardedSubscriber | None = None  # made in setup, in the worker
        self._routes: dict[int, str] = {}

    def setup(self, device: str) -> None:
        model = model_from_path(self.model_class, self.model_kwargs)
        if self.initial_weights is not None:
            import safetensors.torch

            safetensors.torch.load_model(model, self.initial_weights, strict=True)
        model.to(device).eval()
        common = dict(routes=self.routes, fetch_timeout=self.fetch_timeout, allow_keyless=self.allow_keyless,
                      on_update=self._updated)
        self.subscriber = ShardedSubscriber(model, self.model_name, self.endpoints, self.pfs_root, self._hmac_key,
                                            **common).start() if self.endpoints else \
            ModelSubscriber(model, self.model_name, self.endpoint, self.pfs_root, self._hmac_key, **common).start()
        self._device = torch.device(device)

    # `request` and encode_response's result stay unannotated: LitServe reads those annotations as
    # the endpoint's request and response types (none: a JSON body, a JSON response)
    def decode_request(self, request, **kwargs: Any) -> torch.Tensor:  # noqa: ANN001
        rows = request.get("inputs") if isinstance(request, dict) else request
        tensor = torch.as_tensor(rows, dtype=getattr(torch, self.input_dtype))
        return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return inputs  # requests may carry several rows each: predict concatenates and splits

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def predict(self, x: torch.Tensor | list[torch.Tensor], **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        requests = x if isinstance(x, list) else [x]
        with self.subscriber.lease() as lease, torch.no_grad():  # the whole batch from one version
            outputs = lease.model(torch.cat(requests).to(self._device)).cpu()
        answers, start = [], 0
        for rows in requests:
            answers.append({"outputs": outputs[start:start + len(rows)].tolist(), "version": lease.version,
                            "route": self._routes.get(lease.version), "worker": os.getpid()})
            start += len(rows)
        return answers if isinstance(x, list) else answers[0]

    def encode_response(self, output: dict[str, Any], **kwargs: Any):  # noqa: ANN201
        return output

    def _updated(self, record: UpdateRecord) -> None:
        self._routes = {record.version: record.route}


def model_from_path(path: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """Instantiate "module:Class" with `kwargs`."""
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise ConfigurationError(f"model class {path!r}: give it as 'module:Class' (e.g. examples.nt3.model:NT3)")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise ConfigurationError(f"{path!r} is not a torch.nn.Module class")
    return cls(**kwargs)


class LitServeProcess:
    """The one-command server (`python -m serving_handlers.litserve ARGS`) as a child process on
    a free loopback port, for tests, the demo and benchmarks: `start()` returns once /health
    answers, `stop()` (or leaving the context) stops it and its workers."""

    def __init__(self, args: Sequence[str], workdir: str | os.PathLike, startup_timeout: float = 120.0) -> None:
        self.port = _free_port()
        self.args = [*args, "--port", str(self.port)]
        self.workdir = Path(workdir)
        self.log_path = self.workdir / "litserve.log"
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LitServeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:  # a file, not a pipe nobody reads
            self._process = subprocess.Popen([sys.executable, "-m", "serving_handlers.litserve", *self.args],
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, pause = time.monotonic() + self.startup_timeout, threading.Event()
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self.stop()
                raise TransferError(f"LitServe exited with {code}; see {self.log_path}")
            if self._healthy():
                return self
            pause.wait(0.1)
        self.stop()
        raise TransferError(f"LitServe did not become healthy within {self.startup_timeout} s; see {self.log_path}")

    def predict(self, payload: object, timeout: float = 60.0) -> Any:
        request = urllib.request.Request(f"{self.url}/predict", data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise TransferError(f"LitServe answered {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for signum, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                break
            try:
                process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (OSError, ValueError):
            return False

    def __enter__(self) -> LitServeProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-class", required=True, help="module:Class of the model")
    parser.add_argument("--model-kwargs", default="{}", help="constructor arguments, as JSON")
    parser.add_argument("--model-name", required=True, help="the Viper model name to follow")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    parser.add_argument("--endpoints", nargs="+", help="each part's notice endpoint (a sharded producer)")
    parser.add_argument("--initial-weights", help="a .safetensors file served before the first update")
    parser.add_argument("--pfs-root")
    parser.add_argument("--hmac-key-file")
    parser.add_argument("--routes", nargs="+")
    parser.add_argument("--input-dtype", default="float32", choices=INPUT_DTYPES)
    parser.add_argument("--allow-keyless", action="store_true")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout", type=float, default=0.0)
    parser.add_argument("--accelerator", default="auto", help="cpu, cuda or auto (LitServe's)")
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    key = None
    if args.hmac_key_file:
        with open(args.hmac_key_file, "rb") as handle:
            key = handle.read().strip().decode()
    api = ViperLitAPI(args.model_class, args.model_name, args.endpoint, endpoints=args.endpoints,
                      model_kwargs=json.loads(args.model_kwargs), initial_weights=args.initial_weights,
                      pfs_root=args.pfs_root, hmac_key=key, routes=args.routes, allow_keyless=args.allow_keyless,
                      input_dtype=args.input_dtype, max_batch_size=args.max_batch_size,
                      batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=args.workers_per_device)
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
