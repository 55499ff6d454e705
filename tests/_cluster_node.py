"""A host's process on the emulated cluster (see `_cluster`): the producer, or a consumer.

    python -m tests._cluster_node producer --address 10.213.0.1 --megabytes 8 --key-file K
    python -m tests._cluster_node consumer --endpoint tcp://10.213.0.1:P --megabytes 8 --key-file K

Each prints JSON lines on stdout, flushed, for the test or benchmark that spawned it:
- producer: {"event": "ready", "endpoint": ...}, then for each line "publish SEED" read on
  stdin {"event": "published", "version": V, "sha256": ..., "t": ...}; "quit" ends it.
- consumer: {"event": "ready"} once subscribed, then {"event": "updated", "version": V,
  "route": ..., "t": ..., "transfer_s": ..., "verify_s": ..., "swapped_at": ..., "together": ...}
  after each update; for each line "sha" on stdin {"event": "sha", "version": V, "sha256": ...}
  of the weights it serves (asked for once every host is done: hashing in the update itself
  would take CPU from the hosts still loading).
`t` is time.time(): every namespace reads the same clock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time

import torch

from viper_lightning import ModelPublisher, ModelSubscriber
from viper_lightning.producer._switcher import DEFAULT_TOGETHER_DEADLINE_S

MODEL = "fleet"


class Weights(torch.nn.Module):
    """One float32 tensor of `megabytes` (the bytes, not the shape, are what is moved)."""

    def __init__(self, megabytes: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(int(megabytes * 1e6) // 4), requires_grad=False)


def weights_of(megabytes: float, seed: int) -> Weights:
    model = Weights(megabytes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=generator))
    return model


def sha256_of(model: torch.nn.Module) -> str:
    return hashlib.sha256(model.weight.detach().numpy().tobytes()).hexdigest()


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


def producer(args: argparse.Namespace) -> None:
    key = open(args.key_file, "rb").read()
    with ModelPublisher(MODEL, f"tcp://{args.address}:*", args.pfs_root, key, fetch_endpoint=f"tcp://{args.address}:*",
                        collective_endpoint=f"gloo://{args.address}:0", together=args.together,
                        together_quorum=args.quorum,
                        together_deadline=args.together_deadline) as publisher:
        say(event="ready", endpoint=publisher.endpoint)
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["quit"]:
                break
            if command[:1] == ["publish"]:
                model = weights_of(args.megabytes, int(command[1]))
                started = time.time()
                version = publisher.publish(model, wait_for_slot=True)
                say(event="published", version=version, sha256=sha256_of(model), t=started)


def consumer(args: argparse.Namespace) -> None:
    key = open(args.key_file, "rb").read()
    lock = threading.Lock()
    subscriber: ModelSubscriber | None = None

    def updated(record) -> None:
        with lock:
            say(event="updated", version=record.version, route=str(record.route), t=time.time(),
                transfer_s=record.transfer_s, verify_s=record.verify_s, swapped_at=record.swapped_at,
                together=record.together)

    with lock:
        subscriber = ModelSubscriber(Weights(args.megabytes), MODEL, args.endpoint, args.pfs_root, key, routes=args.routes,
                                     fetch_timeout=args.deadline, on_update=updated, together=args.together)
    with subscriber:
        say(event="ready")
        for line in sys.stdin:  # until the spawner closes our stdin (or kills us)
            if line.strip() == "sha":
                with subscriber.lease() as lease:
                    say(event="sha", version=lease.version, sha256=sha256_of(lease.model))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["producer", "consumer"])
    parser.add_argument("--address", help="producer: the host's address on the bridge")
    parser.add_argument("--endpoint", help="consumer: the producer's notice endpoint")
    parser.add_argument("--megabytes", type=float, required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--routes", nargs="+", default=["host-shm", "relay", "dram-zmq"])
    parser.add_argument("--pfs-root", help="the file-system tier: a directory every host sees")
    parser.add_argument("--together", action="store_true", help="replicas switch together")
    parser.add_argument("--quorum", type=int, help="producer: ready replicas that suffice for a switch")
    parser.add_argument("--together-deadline", type=float, default=DEFAULT_TOGETHER_DEADLINE_S,
                        help="producer: seconds (ModelPublisher's default)")
    parser.add_argument("--deadline", type=float, default=10.0, help="consumer: fetch_timeout, seconds (ModelSubscriber's default)")
    args = parser.parse_args()
    producer(args) if args.role == "producer" else consumer(args)


if __name__ == "__main__":
    main()
