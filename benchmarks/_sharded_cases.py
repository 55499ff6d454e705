"""The sharded cases of benchmarks.update_latency: one model sharded with FSDP2 over 2 or 4 CPU
ranks (Gloo), published either by every rank (`sharded`: each its own shard, ShardedPublisher)
or gathered onto rank 0 first (`gathered`: torch.distributed.checkpoint's full state dict, as
Lightning gathers a single-file checkpoint, then ModelPublisher). One consumer process with the
unsharded model follows it on this host (ShardedSubscriber or ModelSubscriber), once over
`dram-shm` (it maps each part: the producer copies nothing for it) and once over `dram-zmq`
(the remote path: each rank's fetch server sends its part in chunks).

e2e: from the first rank's publish call (for `gathered`, the start of the gather) to the
consumer swapping the whole version in. training_stall_s: the longest any rank's publish call
took (for `gathered`, with the gather). max_rank_peak_extra_bytes: the most any rank's peak
resident memory rose above its memory at the publish call, over the whole window until the
consumer applied that version (Linux /proc/self/status, reset through clear_refs after giving
the heap's free memory back, so that memory a previous gather left cannot hide a new one). The
ranks `prepare` their publishers first, as ViperCallback does when training starts: the DRAM
tier's snapshot slots (a few times each rank's own part, see ModelPublisher.prepare) are made
then, and are not counted here. Every
version changes every weight (each rank adds a constant to its shard: a step of a big model
without its cost).
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import secrets
import select
import subprocess
import sys
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from viper_lightning import ModelSubscriber, ShardedSubscriber
from viper_lightning.transport._fetch import CHUNK_BYTES

from ._models import layered_of_size

SHARDED_STRATEGIES = ("sharded", "gathered")
SHARDED_ROUTES = ("dram-shm", "dram-zmq")  # a consumer on this host maps the parts; one elsewhere fetches them
START_S = 300.0  # ranks build and shard the model
WAIT_S = 300.0
WARMUP_PUBLISHES = 1


class _Ranks:
    """The rank processes, driven over stdin and stdout (see benchmarks._sharded_rank)."""

    def __init__(self, strategy: str, megabytes: float, world: int, root: Path, model_name: str) -> None:
        (root / "key").write_text(secrets.token_hex(32))
        self.key = (root / "key").read_text()
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "benchmarks._sharded_rank", "--rank", str(rank), "--world",
                              str(world), "--init", f"file://{root / 'rendezvous'}", "--model-name", model_name,
                              "--key-file", str(root / "key"), "--size-mb", str(megabytes), "--mode", strategy],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            for rank in range(world)]
        answers = self.answers(START_S)
        self.endpoints = answers[0]["endpoints"]

    def send(self, command: str) -> list[dict[str, Any]]:
        for process in self.processes:  # every rank starts at once, as under training
            process.stdin.write(command + "\n")
            process.stdin.flush()
        return self.answers(WAIT_S)

    def answers(self, timeout: float) -> list[dict[str, Any]]:
        result = []
        for rank, process in enumerate(self.processes):
            readable, _, _ = select.select([process.stdout], [], [], timeout)
            line = process.stdout.readline() if readable else ""
            if not line:
                raise RuntimeError(f"rank {rank} gave no answer within {timeout:.0f} s (exit code {process.poll()})")
            result.append(json.loads(line))
        return result

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.stdin.write("close\n")
                process.stdin.flush()
        for process in self.processes:
            try:
                process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()


def _follow(strategy: str, megabytes: float, model_name: str, endpoints: list[str], key: str, route: str,
            reports, done) -> None:
    """The consumer process: report each version once it serves."""
    def report(record) -> None:
        reports.put(asdict(record))

    model = layered_of_size(megabytes)
    subscriber = ShardedSubscriber(model, model_name, endpoints, hmac_key=key, load_latest=False, routes=[route],
                                   on_update=report) if strategy == "sharded" else \
        ModelSubscriber(model, model_name, endpoints[0], hmac_key=key, load_latest=False, routes=[route],
                        on_update=report)
    with subscriber:
        reports.put({"ready": True})
        done.wait(WAIT_S * 10)


def measure_sharded(strategy: str, megabytes: float, world: int, repeat: int, route: str = "dram-shm"
                    ) -> dict[str, Any]:
    """Publish `repeat` versions (after WARMUP_PUBLISHES) of a model sharded over `world` ranks to
    a consumer that takes `route`."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="viper-bench-sharded-") as root:
        model_name = f"bench-{strategy}-{world}-{uuid.uuid4().hex[:6]}"
        ranks = _Ranks(strategy, megabytes, world, Path(root), model_name)
        reports, done = context.Queue(), context.Event()
        consumer = context.Process(target=_follow, args=(strategy, megabytes, model_name, ranks.endpoints,
                                                         ranks.key, route, reports, done), daemon=True)
        consumer.start()
        try:
            if not reports.get(timeout=START_S).get("ready"):
                raise RuntimeError("the consumer did not start")
            samples = [_one_version(ranks, reports) for _ in range(WARMUP_PUBLISHES + repeat)]
        finally:
            done.set()
            consumer.join(WAIT_S)
            ranks.close()
    measured = samples[WARMUP_PUBLISHES:]
    middle = sorted(measured, key=lambda sample: sample["e2e_s"])[len(measured) // 2]
    return {"ranks": world, "e2e_s": middle["e2e_s"], "training_stall_s": middle["training_stall_s"],
            "e2e_s_all": [sample["e2e_s"] for sample in measured],
            "max_rank_peak_extra_bytes_all": [sample["max_peak"] for sample in samples],
            "stages": {"stall (slowest rank)": middle["training_stall_s"],
                       "to consumer swapped": middle["e2e_s"] - middle["training_stall_s"]},
            "bytes_moved": middle["bytes_moved"], "route": middle["route"],
            # every publish counts, the first (which makes the slots) too
            "max_rank_peak_extra_bytes": max(sample["max_peak"] for sample in samples),
            "rank0_peak_extra_bytes": max(sample["rank0_peak"] for sample in samples),
            "largest_part_bytes": max(sample["largest_part"] for sample in samples),
            "chunk_bytes": CHUNK_BYTES}


def _one_version(ranks: _Ranks, reports) -> dict[str, Any]:
    ranks.send("nudge")
    published = ranks.send("publish")
    version = max(answer["version"] or 0 for answer in published)
    while True:
        try:
            record = reports.get(timeout=WAIT_S)
        except queue.Empty:
            raise RuntimeError(f"the consumer did not apply version {version} within {WAIT_S:.0f} s") from None
        if record.get("version", 0) >= version:
            break
    peaks = [answer["peak_extra_bytes"] for answer in ranks.send("peak")]
    started_at = min(answer["started_at"] for answer in published)
    return {"e2e_s": record["swapped_at"] - started_at,
            "training_stall_s": max(answer["stall_s"] for answer in published),
            "bytes_moved": record["moved_bytes"], "route": record["route"], "max_peak": max(peaks),
            "rank0_peak": peaks[0], "largest_part": max(answer["part_bytes"] for answer in published)}


def sharded_checks(results: list[dict[str, Any]]) -> list[tuple[float, str, float, str]]:
    """(size, label, value, aim) for each ranks count with both strategies measured."""
    checks = []
    for result in (r for r in results if r["strategy"] == "sharded"):
        size, world, route = result["size_bytes"], result["ranks"], result["route"]
        gathered = next((r for r in results if r["strategy"] == "gathered" and r["ranks"] == world
                         and r["size_bytes"] == size and r["route"] == route), None)
        bound = result["largest_part_bytes"] + result["chunk_bytes"]
        label = f"sharded x{world} {route}"
        checks.append((size, f"{label}: most any rank's peak grew / (own shard + one chunk)",
                       result["max_rank_peak_extra_bytes"] / bound, "<= 1"))
        if gathered is not None:
            checks.append((size, f"{label}: e2e / gathered e2e", result["e2e_s"] / gathered["e2e_s"],
                           "lower is better"))
            checks.append((size, f"{label}: rank 0 peak grew / gathered's",
                           result["rank0_peak_extra_bytes"] / max(1, gathered["rank0_peak_extra_bytes"]),
                           "lower is better"))
    return checks


def print_sharded(results: list[dict[str, Any]]) -> None:
    rows = [r for r in results if r["strategy"] in SHARDED_STRATEGIES]
    if not rows:
        return
    print(f"\n{'sharded model':<18}{'ranks':>6}{'MB':>6}{'e2e ms':>9}{'stall ms':>10}{'max rank peak +MB':>19}"
          f"{'rank 0 +MB':>12}{'largest part MB':>17}")
    for r in rows:
        print(f"{r['strategy']:<18}{r['ranks']:>6}{r['size_bytes'] / 1e6:>6.0f}{r['e2e_s'] * 1e3:>9.0f}"
              f"{r['training_stall_s'] * 1e3:>10.0f}{r['max_rank_peak_extra_bytes'] / 1e6:>19.1f}"
              f"{r['rank0_peak_extra_bytes'] / 1e6:>12.1f}{r['largest_part_bytes'] / 1e6:>17.1f}"
              f"   e2e each: {', '.join(f'{e * 1e3:.0f}' for e in r['e2e_s_all'])} ms; route {r['route']}")
