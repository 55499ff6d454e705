"""One rank of a model sharded with FSDP2 on a CPU device mesh (Gloo), publishing it.

Started once per rank by tests/test_sharded.py and benchmarks._sharded_cases, and driven line by
line on stdin, so that the driver decides when each rank trains, publishes or dies. Each
command's answer is one JSON line on stdout:
  step          one optimizer step of FSDP2 training on this rank's batch
  nudge         change every weight, without an optimizer (a step of a big model, cheaply)
  publish       publish: {"version", "started_at" (time.time() at the call), "stall_s",
                "peak_extra_bytes" (how far this process's peak memory rose above its memory
                at the call, until now, from /proc/self/status), "part_bytes"}
  peak          {"peak_extra_bytes"} since the last publish began (read after consumers applied it)
  full PATH     gather the full weights (send to every rank) and save them on rank 0
  die           exit at once, as a killed rank does (no answer)
  close         close the publisher and exit
`--mode sharded` publishes each rank's pieces (ShardedPublisher); `--mode gathered` gathers the
full weights onto rank 0 (torch.distributed.checkpoint's full state dict, as Lightning does
for a single-file checkpoint) and publishes them there (ModelPublisher).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from benchmarks._models import layered_of_size
from viper_lightning import ModelPublisher, ShardedPublisher
from viper_lightning._layout import Layout


def tiny_model() -> torch.nn.Module:
    """Uneven shapes on purpose: over 4 ranks, the last layer's 5 rows leave one rank no piece,
    and the BatchNorm's buffers (one of them int64) are plain tensors, not DTensors."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 30), torch.nn.BatchNorm1d(30), torch.nn.ReLU(),
                               torch.nn.Linear(30, 5))


def model_of(size_mb: float) -> torch.nn.Module:
    """The tests' tiny model (0), or benchmarks._models.layered_of_size."""
    return tiny_model() if size_mb == 0 else layered_of_size(size_mb)


def shard(model: torch.nn.Module, world: int, replicas: int = 1) -> torch.nn.Module:
    """FSDP2 over all ranks, or HSDP (`replicas` groups, each sharding the model) on a 2-D mesh."""
    mesh = init_device_mesh("cpu", (world,)) if replicas == 1 else \
        init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class PeakMemory:
    """This process's peak resident memory above a baseline (Linux: clear_refs resets the peak)."""

    def __init__(self) -> None:
        self.baseline = 0

    def reset(self) -> None:
        _trim_heap()  # memory freed since (a previous gather) leaves, so it cannot hide a new peak
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # the peak (VmHWM) restarts from the memory resident now
        self.baseline = self._status("VmHWM")

    def extra(self) -> int:
        return self._status("VmHWM") - self.baseline

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")


def _trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Rank:
    """The model, its optimizer and its publisher on this rank."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rank, self.mode = args.rank, args.mode
        self.model = shard(model_of(args.size_mb), args.world, args.replicas)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.peak = PeakMemory()
        self.nudges = 0
        key = open(args.key_file, "rb").read().strip()
        torch.manual_seed(100 + args.rank)
        if self.mode == "sharded":
            self.publisher = ShardedPublisher(args.model_name, "tcp://127.0.0.1:*", args.pfs_root, key)
            self.endpoints = self.publisher.endpoints
        else:
            self.publisher = ModelPublisher(args.model_name, "tcp://127.0.0.1:*", args.pfs_root, key) \
                if self.rank == 0 else None
            self.endpoints = [self.publisher.endpoint] if self.publisher else []
        # as ViperCallback at the start of training: the snapshot slots are made and warmed then
        if self.mode == "sharded":
            self.publisher.prepare(self.model)
        else:
            full = self.gather()
            if self.publisher is not None:
                self.publisher.prepare(full)

    def step(self) -> dict:
        loss = self.model(torch.randn(16, self.model[0].in_features)).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"loss": float(loss)}

    def nudge(self) -> dict:
        self.nudges += 1
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.to_local().add_(float(self.nudges))
        return {"nudged": self.nudges}

    def publish(self) -> dict:
        self.peak.reset()
        started_at, started = time.time(), time.perf_counter()
        if self.mode == "sharded":
            tensors = self.publisher.local_part(self.model)[0]
            version = self.publisher.publish(self.model, wait_for_slot=True)
        else:
            tensors = self.gather()
            version = self.publisher.publish(tensors, wait_for_slot=True) if self.publisher else None
        return {"version": version, "started_at": started_at, "stall_s": time.perf_counter() - started,
                "peak_extra_bytes": self.peak.extra(), "part_bytes": Layout.for_state_dict(tensors).nbytes}

    def gather(self) -> dict[str, torch.Tensor]:
        """The full weights on rank 0 (empty elsewhere), as a single-file checkpoint gathers them."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full(self, path: str) -> dict:
        full = {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                for name, tensor in self.model.state_dict().items()}
        if self.rank == 0:
            safetensors.torch.save_file({k: v.detach().contiguous() for k, v in full.items()}, path)
        return {"saved": self.rank == 0}

    def close(self) -> dict:
        if self.publisher is not None:
            self.publisher.close()
        return {"closed": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True, help="file:// rendezvous for the Gloo group")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--pfs-root", default=None)
    parser.add_argument("--size-mb", type=float, default=0, help="0: the tests' tiny model")
    parser.add_argument("--mode", choices=["sharded", "gathered"], default="sharded")
    parser.add_argument("--replicas", type=int, default=1, help="HSDP: replica groups (a 2-D mesh)")
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
    rank = Rank(args)
    answer({"ready": True, "endpoints": rank.endpoints, "pid": os.getpid()})
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "die":
            os._exit(3)
        handlers = {"step": rank.step, "nudge": rank.nudge, "publish": rank.publish, "close": rank.close,
                    "peak": lambda: {"peak_extra_bytes": rank.peak.extra()}, "full": lambda: rank.full(argument)}
        answer(handlers[command]())
        if command == "close":
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
