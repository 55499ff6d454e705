"""A real TorchServe server on loopback, for tests, the demo and benchmarks.

It works around TorchServe 0.12.0's snags: registering needs --enable-model-api; its PID file
lives in the temp directory, so each server gets its own TMPDIR; a child with captured pipes
hangs, so output goes to a file; metrics are served only in prometheus mode. Token
authorization stays on; the keys are read from the key file it writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType

from viper_lightning import ConfigurationError, TransferError

__all__ = ["TorchServe", "METRICS_CONFIG"]

_PROBE_S = 0.1
# What the README tells users to put in config.properties for the Viper metrics to show on
# TorchServe's metrics endpoint: prometheus mode, and custom metrics detected as they are emitted.
METRICS_CONFIG = {"metrics_mode": "prometheus", "model_metrics_auto_detect": "true"}


class TorchServe:
    """Start with `start()` (or as a context manager), stop with `stop()`; always stops."""

    def __init__(self, workdir: str | os.PathLike, model_store: str | os.PathLike,
                 workers_per_model: int = 1, startup_timeout: float = 120.0,
                 config: dict[str, str] | None = None) -> None:
        """`config`: config.properties settings besides addresses and the model store (default:
        METRICS_CONFIG, the README's metrics setup)."""
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.workers_per_model = workers_per_model
        self.startup_timeout = startup_timeout
        self.ports = {name: _free_port() for name in ("inference", "management", "metrics", "grpc_inference",
                                                      "grpc_management")}
        self.log_path = self.workdir / "torchserve.log"
        self._process: subprocess.Popen | None = None
        self._keys: dict[str, str] = {}
        self._config = dict(METRICS_CONFIG if config is None else config)

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def start(self) -> TorchServe:
        executable = shutil.which("torchserve", path=_venv_path())
        if executable is None:
            raise ConfigurationError("torchserve is not installed; install the 'serve' extra: "
                                     "pip install -e '.[serve]'")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.model_store.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        with open(self.log_path, "w") as log:  # a file, never a pipe: TorchServe's children hang on pipes
            self._process = subprocess.Popen(
                [executable, "--start", "--foreground", "--ts-config", str(config), "--model-store",
                 str(self.model_store), "--enable-model-api", "--no-config-snapshots"],
                cwd=self.workdir, env=self._environment(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own process group: the JVM and workers stop with it
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the JVM and its workers, and wait until they are gone."""
        process, self._process = self._process, None
        if process is None:
            return
        # Even if the launcher already exited, the JVM and workers of its group may not have.
        _signal_group(process, signal.SIGTERM)
        if not _group_gone(process, 60.0):
            _signal_group(process, signal.SIGKILL)
            _group_gone(process, 30.0)

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- APIs --------------------------------------------------------------------------------
    def register(self, archive: str, model_name: str, *, workers: int | None = None, batch_size: int = 1,
                 max_batch_delay_ms: int = 100, timeout: float = 300.0) -> dict:
        """Register an archive (file name in the model store, or a path) and wait for its workers;
        `batch_size` > 1 lets TorchServe batch up to that many requests into one handler call."""
        query = urllib.parse.urlencode({"url": archive, "model_name": model_name,
                                        "initial_workers": workers or self.workers_per_model,
                                        "batch_size": batch_size, "max_batch_delay": max_batch_delay_ms,
                                        "synchronous": "true"})
        return self.management("POST", f"/models?{query}", timeout=timeout)

    def set_default(self, model_name: str, version: str) -> dict:
        return self.management("PUT", f"/models/{model_name}/{version}/set-default")

    def predict(self, model_name: str, payload: object, timeout: float = 60.0) -> object:
        return self._request("POST", f"{self.inference_url}/predictions/{model_name}", "inference",
                             json.dumps(payload).encode(), timeout)

    def management(self, method: str, path: str, timeout: float = 60.0) -> dict:
        return self._request(method, f"{self.management_url}{path}", "management", None, timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            return response.read().decode()

    # -- internals ---------------------------------------------------------------------------
    def _request(self, method: str, url: str, key: str, body: bytes | None, timeout: float) -> object:
        headers = {"Authorization": f"Bearer {self._key(key)}"}
        if body is not None:  # TorchServe parses a JSON content type even with no body, and fails
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise TransferError(f"TorchServe answered {exc.code} to {method} {url}: "
                                f"{exc.read().decode(errors='replace')[:500]}") from None

    def _pings(self) -> bool:
        try:
            self._request("GET", f"{self.inference_url}/ping", "inference", None, 2)
        except (OSError, ValueError, KeyError, TransferError):
            self._keys = {}  # the key file may have been read half-written
            return False
        return True

    def _key(self, kind: str) -> str:
        if not self._keys:
            keys = json.loads((self.workdir / "key_file.json").read_text())
            self._keys = {"inference": keys["inference"]["key"], "management": keys["management"]["key"]}
        return self._keys[kind]

    def _write_config(self) -> Path:
        config = self.workdir / "config.properties"
        config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.ports['inference']}",
            f"management_address=http://127.0.0.1:{self.ports['management']}",
            f"metrics_address=http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_address=127.0.0.1",
            "grpc_management_address=127.0.0.1",
            f"grpc_inference_port={self.ports['grpc_inference']}",
            f"grpc_management_port={self.ports['grpc_management']}",
            f"model_store={self.model_store}",
            f"default_workers_per_model={self.workers_per_model}",
            "disable_system_metrics=true",
            "install_py_dep_per_model=false",
            "default_response_timeout=120",
            *(f"{key}={value}" for key, value in self._config.items()),
        ]) + "\n")
        return config

    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment["TMPDIR"] = str(self.workdir / "tmp")  # its PID file lives there: one per server
        environment["PATH"] = _venv_path()  # workers must run this interpreter
        return environment

    def _wait_until_ready(self) -> None:
        """Readiness probe: /ping answers 200 (and the key file exists) before the deadline."""
        deadline = time.monotonic() + self.startup_timeout
        pause = threading.Event()
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise TransferError(f"TorchServe exited with {self._process.returncode}; see {self.log_path}")
            if (self.workdir / "key_file.json").exists() and self._pings():
                return
            pause.wait(_PROBE_S)
        raise TransferError(f"TorchServe did not become ready within {self.startup_timeout} s; see {self.log_path}")




def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _group_gone(process: subprocess.Popen, timeout: float) -> bool:
    """Wait until every process of the server's group (wrapper, JVM, workers) has exited."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        process.poll()  # reap the wrapper
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        pause.wait(_PROBE_S)
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _venv_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
