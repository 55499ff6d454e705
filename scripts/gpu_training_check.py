"""A real Lightning run on a GPU publishing through ViperCallback's GPU tier, followed by a
consumer in another process whose model sits on the same GPU; the consumer's final weights are
checked bit for bit against the trainer's.

    python scripts/gpu_training_check.py --device cuda --json OUT.json

`--device cpu` runs the same flow on the GPU tier's host stand-in (gpu_device="cpu", served
over Gloo): that is what `scripts/gpu_check.sh --dry-run` runs where there is no GPU, so the
check cannot rot. Exits 0 when the consumer served the final version bit for bit and took the
expected device route at least once, 1 otherwise; the JSON says what happened either way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import safetensors.torch
import torch
from torch.utils.data import DataLoader, TensorDataset

from viper_lightning import ModelSubscriber, ViperCallback
from viper_lightning.schedules import EveryNSteps

MODEL_NAME = "gpu-check"
WAIT_S = 60.0
STEPS = 60
PUBLISH_EVERY = 10
# Route the consumer must take at least once, per device: the point of the check.
EXPECTED_ROUTE = {"cuda": "gpu-ipc", "cpu": "collective"}
ROUTES = {"cuda": ["gpu-ipc", "dram-shm", "pfs"], "cpu": ["collective", "dram-shm", "pfs"]}


def build_net() -> torch.nn.Sequential:
    """About 19 MB of float32 weights plus an int64 buffer (BatchNorm's counter)."""
    return torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.BatchNorm1d(2048), torch.nn.ReLU(),
                               torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1))


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = build_net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(STEPS * 32, 256, generator=generator)
        return DataLoader(TensorDataset(x, x[:, :8].sum(dim=1, keepdim=True)), batch_size=32)


class StallRecorder(L.Callback):
    """Reads what ViperCallback measured on the training thread after each publish."""

    def __init__(self, viper: ViperCallback) -> None:
        self.viper = viper
        self.stalls: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.viper.last_version and self.viper.last_stall_s is not None:
            self.stalls.setdefault(self.viper.last_version, self.viper.last_stall_s)


def follow(endpoint: str, pfs_root: str, key: str, device: str, out_path: str, outbox, inbox) -> None:
    """The consumer process: follow the run, then save the served weights once told the final version."""
    refusals: list[str] = []
    with ModelSubscriber(Regression().to(device), MODEL_NAME, endpoint, pfs_root, hmac_key=key,
                         routes=ROUTES[torch.device(device).type], load_latest=False,
                         on_refusal=lambda refusal: refusals.append(refusal.reason)) as subscriber:
        outbox.put("ready")
        final = inbox.get(timeout=WAIT_S * 5)
        reached = subscriber.wait_for_version(final, WAIT_S)
        with subscriber.lease() as lease:
            served = {name: tensor.detach().cpu().contiguous() for name, tensor in lease.model.state_dict().items()}
            safetensors.torch.save_file(served, out_path)
            outbox.put({"reached": reached, "served_version": lease.version, "refusals": refusals,
                        "updates": [{"version": u.version, "route": u.route, "latency_ms": u.latency_s * 1e3,
                                     "transfer_ms": u.transfer_s * 1e3} for u in subscriber.stats.updates]})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def same_bits(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> list[str]:
    """Names whose bytes, dtype or shape differ (or that only one side has)."""
    differ = sorted(set(left) ^ set(right))
    for name in sorted(set(left) & set(right)):
        a, b = left[name].contiguous(), right[name].contiguous()
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(-1).view(torch.uint8),
                                                                       b.view(-1).view(torch.uint8)):
            differ.append(name)
    return differ


def run(device: str) -> dict[str, Any]:
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device; --device cpu runs the host stand-in")
    key = secrets.token_hex(16)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    with tempfile.TemporaryDirectory(prefix="viper-gpu-check-") as workdir:
        pfs_root, out_path = f"{workdir}/pfs", f"{workdir}/served.safetensors"
        viper = ViperCallback(MODEL_NAME, endpoint, pfs_root, schedule=EveryNSteps(PUBLISH_EVERY), hmac_key=key,
                              gpu_device="auto" if kind == "cuda" else "cpu",
                              collective_endpoint=None if kind == "cuda" else "gloo://127.0.0.1:0")
        recorder = StallRecorder(viper)
        outbox, inbox = spawn.Queue(), spawn.Queue()
        consumer = spawn.Process(target=follow, args=(endpoint, pfs_root, key, device, out_path, outbox, inbox))
        consumer.start()
        try:
            if outbox.get(timeout=WAIT_S * 2) != "ready":
                raise RuntimeError("the consumer did not start")
            module = Regression()
            trainer = L.Trainer(accelerator="gpu" if kind == "cuda" else "cpu", devices=1, max_steps=STEPS,
                                callbacks=[viper, recorder], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir)
            started = time.perf_counter()
            trainer.fit(module)
            train_s = time.perf_counter() - started
            inbox.put(viper.last_version)
            report = outbox.get(timeout=WAIT_S * 2)
        finally:
            consumer.join(WAIT_S)
            if consumer.is_alive():
                consumer.kill()
        trained = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
        differ = same_bits(trained, safetensors.torch.load_file(out_path)) if Path(out_path).exists() else ["<none>"]
    routes = [update["route"] for update in report["updates"]]
    stalls = list(recorder.stalls.values())
    return {
        "device": device, "module_device": str(next(module.parameters()).device),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu_name": torch.cuda.get_device_name(0) if kind == "cuda" else None,
        "steps": STEPS, "publish_every": PUBLISH_EVERY, "train_s": train_s,
        "final_version": viper.last_version, **report,
        "expected_route": EXPECTED_ROUTE[kind], "routes_taken": sorted(set(routes)),
        "stall_ms_median": statistics.median(stalls) * 1e3 if stalls else None,
        "stall_ms_max": max(stalls) * 1e3 if stalls else None,
        "weights_bytes": sum(t.nbytes for t in trained.values()),
        "tensors_differing": differ,
        "bit_exact": not differ and report["reached"] and report["served_version"] == viper.last_version,
        "consumer_exitcode": consumer.exitcode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    result = run(args.device)
    result["passed"] = bool(result["bit_exact"] and result["expected_route"] in result["routes_taken"])
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
