"""End-to-end update latency, per strategy and model size, measured side by side.

    python -m benchmarks.update_latency --sizes-mb 64 256 --repeat 3 --json OUT.json --plot OUT.png

A version is published in this process and applied by consumers in other processes (as
TorchServe workers would be). e2e is the publish call to the last consumer ready to answer with
the new weights (swapped in, and every page of them touched once, as a first request would). Strategies: `pfs` (file-system tier, push-notified), `dram-shm` (same-host shared
memory), `dram-zmq` (the remote path, forced), and the baselines `memcpy` (one in-process copy
of the same bytes into a reused buffer: the physical limit) and `lightning-modelcheckpoint`
(the training stall of Lightning's ModelCheckpoint saving the model with its Adam state),
`torchserve-register` (archive, register and set-default a new .mar version in a real
TorchServe, until its first answer) and `torchserve-viper` (publish until TorchServe's
ViperHandler answers with the new version; both on a one-layer model of the same size, cheap to
run).
`--consumers 8` adds `dram-shm-x8`: eight same-host consumers updating together, measured
update by update alternately with a second publisher of the same model that has one consumer:
its `over_one` is the median over those pairs of the eight's e2e over the one's (`one_e2e_s`),
and the ratio to the separate `dram-shm` case is printed beside it as a cross-check.
`lightning-throughput` is not an update's latency but what publishing every 10 steps through
`ViperCallback` (its defaults) to `--consumers` same-host consumers (default 1) costs a real
Lightning run of the same model (batch 8; the run fails unless every consumer served the last
version published): `throughput_cost` pairs, within one run, blocks of 10
steps that start with a publish with the blocks of 10 steps after them, which have none (6 pairs
after the first); `throughput_cost_runs` cross-checks it on separate runs with and without
publishing (see measure_throughput; `copies_per_step`: how many memory copies of the weights a
step takes). `lightning-throughput-nice19` is the paired measure with `background_niceness=19`.
Each version changes every weight, as training does (`changed_fraction` 1.0 in the JSON).
`--changed-fraction 1 0.2 0.05` runs each Viper strategy once per fraction on another model of
the same size, 20 equal layers (`_models.layered_of_size`), all but the last layers holding that
fraction of the bytes frozen (requires_grad=False), with the publisher's
`skip_unchanged_frozen=True`, the setting users training with frozen parts are told to use: the
producer copies and digests only the trained layers, and `dram-zmq` moves only the changed
blocks (consumer._delta). `bytes_moved` is what the slowest consumer read from the producer (0
for a mapping).
`--strategies sharded gathered --ranks 2 4`: one model of the size (`_models.layered_of_size`)
sharded with FSDP2 over 2 and 4 CPU ranks (Gloo), each rank publishing its own shard
(`sharded`, ShardedPublisher) or the model gathered onto rank 0 first (`gathered`); the JSON
adds `ranks` and `max_rank_peak_extra_bytes` (the most any rank's peak memory grew while
publishing) to those results (see benchmarks._sharded_cases).
`--runs K` repeats the whole measurement K times, each in a fresh interpreter, and prints each
ratio's best, median and worst over runs (a user gets every run, not the median); the JSON
then has `"runs": K` and, per result, the run with the median e2e plus `e2e_s_worst`,
`e2e_s_best`, `training_stall_s_worst`, `training_stall_s_best` and every run's values.
Where CUDA exists, `memcpy-gpu` (one device-to-device copy of the same bytes: the GPU tier's limit),
`gpu-ipc` (the GPU tier, a consumer on the same GPU over CUDA IPC) and, with two GPUs,
`gpu-nccl` (a consumer on the second GPU over NCCL) join them; without, they are skipped with a
note. The GPU routes run keyed (a random per-run key), since the producer lends device memory
over CUDA IPC only to authenticated consumers. The others run as users get them by default: keyed
with this host's key of the model, so the file-system and remote routes verify keyed BLAKE3;
`--keyless` runs them with the explicit keyless opt-out (xxh3), to see what the keyed digest costs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import multiprocessing
import os
import platform
import queue
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from viper_lightning import ModelPublisher, ModelSubscriber
from viper_lightning._buffers import copy_tensor

from ._sharded_cases import SHARDED_ROUTES, SHARDED_STRATEGIES, measure_sharded, print_sharded, sharded_checks
from ._models import freeze_all_but, layered_of_size, nt3_of_size, nudge, state_nbytes
from ._torchserve_cases import measure_torchserve_register, measure_torchserve_viper

WAIT_S = 300.0
WARMUP_PUBLISHES = 4  # per Viper strategy, before the measured ones


def measure_memcpy(model: torch.nn.Module, repeat: int) -> dict[str, Any]:
    """One warm copy of all the weights into a preallocated buffer."""
    limit = _CopyLimit(model)
    e2e = statistics.median(limit.copy_s() for _ in range(repeat))
    return {"e2e_s": e2e, "stages": {"copy": e2e}, "training_stall_s": e2e}


def measure_memcpy_gpu(model: torch.nn.Module, repeat: int) -> dict[str, Any]:
    """One device-to-device copy of all the weights into a preallocated buffer on cuda:0, timed
    with the device synchronised: what the GPU tier's snapshot costs the GPU itself."""
    device = torch.device("cuda", 0)
    source = torch.cat([t.reshape(-1).view(torch.uint8) for t in model.state_dict().values()]).to(device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    e2e = statistics.median(times)
    return {"e2e_s": e2e, "stages": {"copy": e2e}, "training_stall_s": e2e}


@dataclass(frozen=True)
class ViperCase:
    """One Viper strategy: which tiers the producer keeps and which route consumers may take."""

    dram_versions: int
    route: str
    gpu_device: str | None = None  # the producer's GPU tier
    collective: str | None = None
    consumer_device: str = "cpu"
    gpus_needed: int = 0
    keyed: bool = False  # CUDA IPC leases are lent to authenticated consumers only


VIPER_CASES = {
    "pfs": ViperCase(dram_versions=0, route="pfs"),
    "dram-shm": ViperCase(dram_versions=1, route="dram-shm"),
    "dram-zmq": ViperCase(dram_versions=1, route="dram-zmq"),
    "gpu-ipc": ViperCase(dram_versions=1, route="gpu-ipc", gpu_device="cuda:0", consumer_device="cuda:0",
                         gpus_needed=1, keyed=True),
    "gpu-nccl": ViperCase(dram_versions=1, route="gpu-nccl", gpu_device="cuda:0", collective="nccl://127.0.0.1:0",
                          consumer_device="cuda:1", gpus_needed=2, keyed=True),  # NCCL refuses two ranks on one GPU
}


def unavailable(strategy: str) -> str | None:
    """Why a strategy cannot run on this machine, or None."""
    case = VIPER_CASES.get(strategy)
    gpus_needed = 1 if strategy == "memcpy-gpu" else case.gpus_needed if case is not None else 0
    if gpus_needed <= torch.cuda.device_count():
        return None
    return f"needs {gpus_needed} CUDA device(s), this machine has {torch.cuda.device_count()}"


def skipped(strategies: list[str]) -> dict[str, str]:
    """The strategies this machine cannot run, with the reason."""
    return {name: why for name in strategies if (why := unavailable(name)) is not None}


def measure_viper(strategy: str, model: torch.nn.Module, repeat: int, megabytes: float,
                  consumers: int = 1, keyless: bool = False, fraction: float | None = None) -> dict[str, Any]:
    """Publish `repeat` versions (after WARMUP_PUBLISHES cold ones) to `consumers` processes; e2e is the
    publish call to the last consumer serving the version. The file-system tier is always on:
    for the memory strategies it is the burst buffer draining in the background. With a
    `fraction`, the model is the layered one with all but that fraction of its bytes frozen, and
    the publisher skips unchanged frozen tensors, as users training so are told to set."""
    if fraction is not None:
        model = layered_of_size(megabytes)
        freeze_all_but(model, fraction)
    with _Followed(strategy, model, megabytes, consumers, keyless, "bench", fraction) as followed:
        runs = [followed.update(seed) for seed in range(repeat + WARMUP_PUBLISHES)][WARMUP_PUBLISHES:]
    extra = {} if fraction is None else {"model": "layered", "size_bytes": state_nbytes(model)}
    return {**_summarise(runs), "keyed": followed.keyed, "changed_fraction": fraction or 1.0, **extra}


def measure_fanout(model: torch.nn.Module, repeat: int, megabytes: float, consumers: int,
                   keyless: bool = False) -> dict[str, Any]:
    """`dram-shm` to `consumers` same-host processes, alternating update by update with a second
    publisher of the same model that has one consumer: `over_one` is the median over these
    pairs of the fanned-out e2e over the single consumer's. Measured side by side, the ratio
    does not carry the drift of a busy machine between two cases run a minute apart (the
    separate `dram-shm` case still gives the cross-check)."""
    with _Followed("dram-shm", model, megabytes, 1, keyless, "bench-one") as one, \
            _Followed("dram-shm", model, megabytes, consumers, keyless, "bench-fan") as fanned:
        pairs = [(one.update(seed), fanned.update(seed)) for seed in range(repeat + WARMUP_PUBLISHES)]
    pairs = pairs[WARMUP_PUBLISHES:]
    runs = [many for _, many in pairs]
    return {**_summarise(runs), "keyed": fanned.keyed, "consumers": consumers,
            "one_e2e_s": statistics.median(single["e2e_s"] for single, _ in pairs),
            "over_one": statistics.median(many["e2e_s"] / single["e2e_s"] for single, many in pairs)}


class _Followed:
    """A publisher of `model` (as `name`) set up for `strategy`, with `consumers` consumer
    processes following it; `update(seed)` publishes once and waits for all of them."""

    def __init__(self, strategy: str, model: torch.nn.Module, megabytes: float, consumers: int,
                 keyless: bool, name: str, fraction: float | None = None) -> None:
        self.case = VIPER_CASES[strategy]
        self.key = secrets.token_hex(16) if self.case.keyed else None
        self.keyed = not (keyless and self.key is None)
        self.model = copy.deepcopy(model).to(self.case.gpu_device) if self.case.gpu_device is not None else model
        self.megabytes, self.consumers, self.name, self.fraction = megabytes, consumers, name, fraction
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Followed:
        case = self.case
        with contextlib.ExitStack() as stack:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="viper-bench-"))
            self.publisher = stack.enter_context(ModelPublisher(
                self.name, "tcp://127.0.0.1:*", root, hmac_key=self.key, dram_versions=case.dram_versions,
                gpu_device=case.gpu_device, collective_endpoint=case.collective, allow_keyless=not self.keyed,
                skip_unchanged_frozen=self.fraction is not None))
            followers = _ConsumerProcesses(self.consumers)
            stack.callback(followers.stop)
            followers.start(self.publisher, self.megabytes, root, case.route, case.consumer_device, self.key,
                            not self.keyed, self.name, "nt3" if self.fraction is None else "layered")
            self.reports = followers.reports
            # The first publishes fault in fresh slots (and, with many zero-copy consumers, grow the
            # pool to what their pins need): not the steady state of a long training run.
            self.limit = None if case.gpu_device is not None else _CopyLimit(self.model)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def update(self, seed: int) -> dict[str, float]:
        return _one_update(self.publisher, self.model, self.reports, self.consumers, seed, self.limit)


class _ConsumerProcesses:
    """`count` consumer processes (`_follow`) of one publisher, each reporting its updates."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._spawn = multiprocessing.get_context("spawn")
        self.reports, self._done = self._spawn.Queue(), self._spawn.Event()
        self._processes: list[Any] = []

    def start(self, publisher: ModelPublisher, megabytes: float, root: str, route: str, device: str,
              key: str | None, keyless: bool, name: str = "bench", model: str = "nt3") -> None:
        """Start them and wait until every one has subscribed."""
        self._processes = [self._spawn.Process(target=_follow, args=(megabytes, publisher.endpoint, root, route,
                                                                     device, key, keyless, self.reports, self._done,
                                                                     name, model))
                           for _ in range(self.count)]
        for process in self._processes:
            process.start()
        if not publisher.wait_for_subscribers(self.count, WAIT_S):
            raise RuntimeError("the consumer processes never subscribed")

    def stop(self) -> None:
        self._done.set()
        for process in self._processes:
            process.join(WAIT_S)


def _follow(megabytes: float, endpoint: str, pfs_root: str, route: str, device: str, key: str | None,
            keyless: bool, reports, done, name: str, model: str = "nt3") -> None:
    """A consumer process: report each update once the new weights are ready to answer."""

    def report(record) -> None:
        with subscriber.serving() as served:
            touch_s = _first_touch(served)
        reports.put({**asdict(record), "touch_s": touch_s})

    served = nt3_of_size(megabytes) if model == "nt3" else layered_of_size(megabytes)
    subscriber = ModelSubscriber(served.to(device), name, endpoint, pfs_root, hmac_key=key,
                                 routes=[route], allow_keyless=keyless,
                                 load_latest=False, on_update=report,
                                 on_refusal=lambda refusal: reports.put({"refused": refusal.reason}))
    with subscriber:
        done.wait(WAIT_S * 10)


def _first_touch(model: torch.nn.Module) -> float:
    """Read one element of every 4 KiB page of the weights, as a first request would: weights
    that are mapped rather than copied pay their page-table faults here, so e2e counts them."""
    started = time.perf_counter()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            flat = tensor.reshape(-1)
            flat[:: max(1, 4096 // tensor.element_size())].sum()
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
    return time.perf_counter() - started


class _CopyLimit:
    """A warm copy of all the model's bytes into a preallocated buffer: the memory-copy limit.
    Timed right before each publish too, so a ratio to it does not mix two moments of a busy
    machine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.source = torch.cat([t.reshape(-1).view(torch.uint8) for t in model.state_dict().values()])
        self.target = torch.empty_like(self.source)
        copy_tensor(self.target, self.source)  # fault the pages in once: only warm copies count

    def copy_s(self) -> float:
        started = time.perf_counter()
        copy_tensor(self.target, self.source)
        return time.perf_counter() - started

    def time(self) -> float:
        """The faster of two copies: a ratio to it errs on the strict side."""
        return min(self.copy_s(), self.copy_s())


def _one_update(publisher: ModelPublisher, model: torch.nn.Module, reports, consumers: int,
                seed: int, limit: _CopyLimit | None = None) -> dict[str, float]:
    """Publish once and wait until every consumer serves it; then let the flush finish. With
    `limit`, a memory copy of the same bytes is timed just before (not part of the e2e)."""
    nudge(model, seed)
    memcpy = limit.time() if limit is not None else None
    device_stall = None
    if on_gpu := next(model.parameters()).is_cuda:
        torch.cuda.synchronize()  # the training stream idle, so what follows times the publish alone
    started = time.perf_counter()
    version = publisher.publish(model)
    if version is None:
        raise RuntimeError("the publish was skipped: every snapshot slot was still held by the consumers or the "
                           "flush (publisher.publishes_skipped)")
    stall = publisher.last_stall_s
    if on_gpu:  # the training stream waits for the device copy: its own stall, beside the host's
        torch.cuda.current_stream().synchronize()
        device_stall = time.perf_counter() - started
    records = [reports.get(timeout=WAIT_S) for _ in range(consumers)]
    publisher.flush(WAIT_S)
    for record in records:
        if "refused" in record or record["version"] != version:
            raise RuntimeError(f"a consumer did not apply version {version}: {record}")
    slowest = max(records, key=lambda record: record["latency_s"] + record["touch_s"])
    first_ready = min(record["latency_s"] + record["touch_s"] for record in records)
    stages = {"snapshot": stall}
    commit = publisher.last_commit
    if publisher.fetch_endpoint is None:  # the file-system path: the notice waits for the write
        stages.update(digest=commit.digest_s, store=commit.store_s)
    stages["notify"] = max(0.0, slowest["discovery_s"] - sum(stages.values()))
    stages.update(transfer=slowest["transfer_s"], verify=slowest["verify_s"], swap=slowest["swap_s"],
                  first_touch=slowest["touch_s"])
    return {"e2e_s": slowest["latency_s"] + slowest["touch_s"], **stages, "training_stall_s": stall,
            "device_stall_s": device_stall, "memcpy_s": memcpy, "first_ready_s": first_ready,
            "bytes_moved": slowest["moved_bytes"]}


def measure_modelcheckpoint(model: torch.nn.Module, repeat: int, workdir: str) -> dict[str, Any]:
    """The training stall of Lightning's ModelCheckpoint: `trainer.save_checkpoint` (what it
    calls) of the same model with its Adam state, after one real optimizer step."""
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir)
    trainer.fit(model, DataLoader(_one_sample(model), batch_size=1))
    times = []
    for index in range(repeat):
        path = os.path.join(workdir, f"checkpoint-{index}.ckpt")
        started = time.perf_counter()
        trainer.save_checkpoint(path)
        times.append(time.perf_counter() - started)
        os.remove(path)
    stall = statistics.median(times)
    return {"e2e_s": stall, "stages": {"save_checkpoint": stall}, "training_stall_s": stall}


PUBLISH_EVERY = 10  # steps between publishes in the throughput measure
THROUGHPUT_PAIRS = 6  # timed pairs of blocks (one block with a publish, one without) in the paired run
THROUGHPUT_STEPS = 4 * PUBLISH_EVERY  # steps timed per separate run: four publishes, at steps 20 to 50
THROUGHPUT_WARMUP = PUBLISH_EVERY + 1  # not timed: torch's first steps, the slots made at the start
#                                        and the first publish (each consumer's first mapping of a slot)
THROUGHPUT_BATCH = 8


class _StepClock(L.Callback):
    """When each optimizer step ended (after every other callback's hook: it is listed last)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.ends.append(time.perf_counter())


class _Consumers(L.Callback):
    """Same-host consumer processes (dram-shm) of the callback's publisher, started once it is up."""

    def __init__(self, viper: Any, megabytes: float, count: int, root: str) -> None:
        self.viper, self.megabytes, self.root = viper, megabytes, root
        self.followers = _ConsumerProcesses(count)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.followers.start(self.viper.publisher, self.megabytes, self.root, "dram-shm", "cpu", None, False,
                             self.viper.model_name)

    def close(self) -> None:
        """Stop them, once each served the last version published; raise if one did not: a
        consumer that followed nothing would make publishing look cheaper than it is."""
        try:
            last, served, refused = self.viper.last_version, 0, []
            deadline = time.monotonic() + WAIT_S
            while last and served < self.followers.count and time.monotonic() < deadline:
                try:
                    report = self.followers.reports.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                refused += [report["refused"]] if "refused" in report else []
                served += report.get("version") == last
        finally:
            self.followers.stop()
        if last and (refused or served < self.followers.count):
            raise RuntimeError(f"{served} of {self.followers.count} consumer(s) served the last version {last}"
                               + (f"; refusals: {refused[:3]}" if refused else ""))


def measure_throughput(megabytes: float, consumers: int = 1, niceness: int = 0) -> dict[str, Any]:
    """What publishing every PUBLISH_EVERY steps costs a real Lightning run of this model,
    publishing through `ViperCallback` (its defaults: keyed, the file-system tier on, here a
    temporary directory) to `consumers` same-host consumer processes.

    `throughput_cost` comes from one run that publishes every 2 * PUBLISH_EVERY steps: its
    steps fall in blocks of PUBLISH_EVERY, alternately one that starts with a publish (the
    stall, then the background digest and write, the consumers' update) and one without. The
    cost is 1 - (mean step of the quiet blocks) / (mean step of the publishing blocks), over
    THROUGHPUT_PAIRS pairs after the first (the first publish maps each consumer's slot). Each
    pair is measured within 2 * PUBLISH_EVERY steps, so it is not moved by the machine's own
    drift, which on a shared host changes step times by more than publishing does over the
    minutes between two runs. `spill_s` checks the pairing: how much longer the first step of a
    quiet block is than the block's median (the publishing block's work running over into it).

    `throughput_cost_runs` cross-checks it on separate runs, as a user would compare them: the
    mean step of a run publishing every PUBLISH_EVERY steps against the same run without
    publishing, each run twice, alternating, the faster of each kept; that figure carries the
    drift between runs. `copies_per_step` says how heavy the step is against one memory copy.

    `niceness` is ViperCallback's `background_niceness` (0, its default, or 19, what it tells
    CPU training of big models to set); with 19 only the paired run is made."""
    from viper_lightning.schedules import EveryNSteps

    paired = _paired_blocks(megabytes, consumers, niceness)
    if niceness:
        return {"e2e_s": paired["step_s_with"], "training_stall_s": None, "stages": {}, **paired,
                "background_niceness": niceness, "publish_every": PUBLISH_EVERY, "consumers": consumers}
    step_s = {"without": [], "with": []}
    for _ in range(2):
        for mode in ("without", "with"):
            with tempfile.TemporaryDirectory(prefix="viper-bench-tput-") as root:
                durations = _step_durations(megabytes, THROUGHPUT_STEPS + THROUGHPUT_WARMUP, root,
                                            EveryNSteps(PUBLISH_EVERY) if mode == "with" else None, consumers)
                step_s[mode].append(statistics.fmean(durations[THROUGHPUT_WARMUP:]))
    model = nt3_of_size(megabytes)
    copy_s = measure_memcpy(model, 5)["e2e_s"]
    without, with_publishing = min(step_s["without"]), min(step_s["with"])
    return {"e2e_s": paired["step_s_with"], "training_stall_s": None, "stages": {}, **paired,
            "throughput_cost_runs": 1.0 - without / with_publishing,
            "step_s_runs": {"without": without, "with": with_publishing, "all": step_s},
            "publish_every": PUBLISH_EVERY, "copies_per_step": paired["step_s_without"] / copy_s,
            "consumers": consumers, "background_niceness": 0}


def _paired_blocks(megabytes: float, consumers: int, niceness: int = 0) -> dict[str, Any]:
    """The paired-block run (see measure_throughput)."""
    from viper_lightning.schedules import EveryNSteps

    block = PUBLISH_EVERY
    first = 2 * block  # EveryNSteps publishes after steps 2 * block, 4 * block, ...
    with tempfile.TemporaryDirectory(prefix="viper-bench-tput-") as root:
        durations = _step_durations(megabytes, first + 2 * block * (THROUGHPUT_PAIRS + 1), root,
                                    EveryNSteps(2 * block), consumers, niceness)
    # durations[k] is step k + 1's. A publish at the end of step p is in that step's time (the
    # stall), its background work in the steps after: its block is steps p to p + block - 1.
    pairs = []
    for pair in range(1, THROUGHPUT_PAIRS + 1):
        busy_from = first + 2 * block * pair - 1
        pairs.append((durations[busy_from:busy_from + block], durations[busy_from + block:busy_from + 2 * block]))
    busy = statistics.fmean(statistics.fmean(b) for b, _ in pairs)
    quiet = statistics.fmean(statistics.fmean(q) for _, q in pairs)
    return {"throughput_cost": 1.0 - quiet / busy, "step_s_with": busy, "step_s_without": quiet,
            "throughput_cost_pairs": [1.0 - statistics.fmean(q) / statistics.fmean(b) for b, q in pairs],
            "spill_s": statistics.median(q[0] - statistics.median(q) for _, q in pairs),
            "paired_block_steps": block, "pairs": THROUGHPUT_PAIRS}


def _step_durations(megabytes: float, steps: int, root: str, schedule: Any, consumers: int,
                    niceness: int = 0) -> list[float]:
    """Each step's duration in a real Lightning run of `steps` steps, publishing on `schedule`
    (None: no publishing): item k is step k + 1's (NaN for the first, which has no start)."""
    from viper_lightning import ViperCallback

    model = nt3_of_size(megabytes)
    clock = _StepClock()
    callbacks: list[L.Callback] = []
    followers = None
    if schedule is not None:
        viper = ViperCallback("bench-tput", "tcp://127.0.0.1:*", pfs_root=root, schedule=schedule,
                              fetch_endpoint="tcp://127.0.0.1:*", background_niceness=niceness)
        followers = _Consumers(viper, megabytes, consumers, root)
        callbacks = [viper, followers]
    inputs = torch.randn(THROUGHPUT_BATCH, model.hparams["input_length"])
    data = DataLoader(TensorDataset(inputs, torch.zeros(THROUGHPUT_BATCH, dtype=torch.int64)),
                      batch_size=1, sampler=torch.utils.data.RandomSampler(range(THROUGHPUT_BATCH), replacement=True,
                                                                          num_samples=steps))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[*callbacks, clock])
    try:
        trainer.fit(model, data)
    finally:
        if followers is not None:
            followers.close()
    return [math.nan, *(end - start for start, end in zip(clock.ends, clock.ends[1:]))]


def _one_sample(model: torch.nn.Module) -> TensorDataset:
    length = model.hparams["input_length"]
    return TensorDataset(torch.randn(1, length), torch.zeros(1, dtype=torch.int64))


def _summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The run with the median e2e, whole, so its stages add up to its e2e; and, where a copy
    was timed before each publish, the median over publishes of e2e and stall over that copy."""
    median = sorted(runs, key=lambda run: run["e2e_s"])[len(runs) // 2]
    totals = ("e2e_s", "training_stall_s", "device_stall_s", "memcpy_s", "first_ready_s", "bytes_moved")
    stages = {key: value for key, value in median.items() if key not in totals}
    summary = {"e2e_s": median["e2e_s"], "stages": stages, "training_stall_s": median["training_stall_s"],
               "bytes_moved": statistics.median(run["bytes_moved"] for run in runs)}
    if median["device_stall_s"] is not None:
        summary["device_stall_s"] = median["device_stall_s"]
    if all(run["memcpy_s"] for run in runs):
        summary["paired_memcpy"] = {
            "e2e": statistics.median(run["e2e_s"] / run["memcpy_s"] for run in runs),
            "training_stall": statistics.median(run["training_stall_s"] / run["memcpy_s"] for run in runs)}
    summary["last_over_first_ready"] = statistics.median(run["e2e_s"] / run["first_ready_s"] for run in runs)
    return summary


STRATEGIES: dict[str, Callable[[torch.nn.Module, int, float], dict[str, Any]]] = {
    "memcpy": lambda model, repeat, megabytes: measure_memcpy(model, repeat),
    "memcpy-gpu": lambda model, repeat, megabytes: measure_memcpy_gpu(model, repeat),
    **{name: functools.partial(measure_viper, name) for name in VIPER_CASES},
    "lightning-modelcheckpoint": lambda model, repeat, megabytes: _in_temp_dir(measure_modelcheckpoint,
                                                                               model, repeat),
    "torchserve-register": lambda model, repeat, megabytes: measure_torchserve_register(megabytes, repeat),
    "torchserve-viper": lambda model, repeat, megabytes: measure_torchserve_viper(megabytes, repeat),
    "lightning-throughput": lambda model, repeat, megabytes: measure_throughput(megabytes),
    "lightning-throughput-nice19": lambda model, repeat, megabytes: measure_throughput(megabytes, niceness=19),
    # run once per --ranks count (see run)
    **{name: functools.partial(lambda model, repeat, megabytes, name, world, route: measure_sharded(
        name, megabytes, world, repeat, route), name=name) for name in SHARDED_STRATEGIES},
}


def _in_temp_dir(measure, model, repeat):
    with tempfile.TemporaryDirectory(prefix="viper-bench-ckpt-", dir=".") as workdir:
        return measure(model, repeat, workdir)


def run(sizes_mb: list[float], repeat: int, strategies: list[str], consumers: int = 1,
        on_result: Callable[[list[dict[str, Any]]], None] | None = None, keyless: bool = False,
        fractions: tuple[float, ...] = (1.0,), ranks: tuple[int, ...] = (2, 4)) -> list[dict[str, Any]]:
    """Every strategy at every size, side by side; with consumers > 1 also `dram-shm` fanned out.
    `on_result` sees the results so far after each case (a run cut short keeps what it measured);
    `keyless` runs the Viper strategies that need no key with the keyless opt-out; each Viper
    strategy runs once per changed fraction in `fractions`, and each sharded one once per count
    of `ranks`."""
    fractions_asked = tuple(fractions) != (1.0,)
    cases = [(name, functools.partial(measure_viper, name, keyless=keyless,
                                      fraction=fraction if fractions_asked else None))
             for name in strategies if name in VIPER_CASES for fraction in fractions]
    cases += [(name, (lambda model, repeat, megabytes, nice=int(name.endswith("19")) * 19:
                      measure_throughput(megabytes, consumers, nice))
               if name.startswith("lightning-throughput") else STRATEGIES[name])
              for name in strategies if name not in VIPER_CASES and name not in SHARDED_STRATEGIES]
    cases += [(name, functools.partial(STRATEGIES[name], world=world, route=route))
              for name in strategies if name in SHARDED_STRATEGIES for world in ranks for route in SHARDED_ROUTES]
    order = {name: index for index, name in enumerate(strategies)}
    cases.sort(key=lambda case: order[case[0]])  # as asked, each Viper strategy's fractions together
    if consumers > 1:
        cases.append((f"dram-shm-x{consumers}",
                      functools.partial(measure_fanout, consumers=consumers, keyless=keyless)))
    for name, why in skipped(strategies).items():
        print(f"skipping {name}: {why}")
    cases = [(name, measure) for name, measure in cases if unavailable(name) is None]
    results = []
    with tqdm(total=len(sizes_mb) * len(cases), desc="update latency", unit="case") as bar:
        for megabytes in sizes_mb:
            model = nt3_of_size(megabytes)
            for name, measure in cases:
                bar.set_postfix_str(f"{name} @ {megabytes:g} MB")
                size = state_nbytes(model)
                results.append({"strategy": name, "size_mb": megabytes, "size_bytes": size, "repeat": repeat,
                                "changed_fraction": 1.0, "bytes_moved": size if name.startswith("memcpy") else None,
                                **measure(model, repeat, megabytes)})
                bar.update()
                if on_result is not None:
                    on_result(results)
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    """Each strategy against the memcpy limit and the file-system path at the same size."""
    if all("ranks" in result for result in results):
        return  # only sharded cases: print_sharded
    print(f"\n{'strategy':<26}{'MB':>6}{'e2e ms':>10}{'stall ms':>10}{'e2e/memcpy':>12}{'pfs/e2e':>9}")
    for result in results:
        if "ranks" in result:
            continue  # print_sharded
        if "throughput_cost" in result:
            print(f"{result['strategy']:<26}{result['size_bytes'] / 1e6:>6.0f}  step {result['step_s_without'] * 1e3:.0f} ms "
                  f"in quiet blocks, {result['step_s_with'] * 1e3:.0f} ms in blocks with a publish "
                  f"(every {result['publish_every']} steps, {result['consumers']} consumer(s), background_niceness "
                  f"{result['background_niceness']}): {result['throughput_cost'] * 100:.1f}% of the throughput")
            if "throughput_cost_runs" in result:
                print(f"{'':<26}separate runs: {result['step_s_runs']['without'] * 1e3:.0f} ms against "
                      f"{result['step_s_runs']['with'] * 1e3:.0f} ms, {result['throughput_cost_runs'] * 100:.1f}%")
            print(f"{'':<26}each pair: " + ", ".join(f"{c * 100:.1f}%" for c in result["throughput_cost_pairs"])
                  + f"; a quiet block's first step over its median: {result['spill_s'] * 1e3:+.0f} ms")
            continue
        peers = _peers(results, result["size_bytes"])
        memcpy, pfs = peers.get("memcpy"), peers.get("pfs")
        fraction = result.get("changed_fraction", 1.0)
        label = result["strategy"] + (f" {fraction:g} changed" if fraction != 1.0 else "")
        print(f"{label:<26}{result['size_bytes'] / 1e6:>6.0f}{result['e2e_s'] * 1e3:>10.1f}"
              f"{(result['training_stall_s'] or 0) * 1e3:>10.1f}"
              f"{_ratio(result, memcpy, 'e2e_s'):>12.2f}{_ratio(pfs, result, 'e2e_s'):>9.2f}")
        print(f"{'':<26}stages ms: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in result["stages"].items())
              + (f"; {result['bytes_moved'] / 1e6:.1f} MB moved" if result.get("bytes_moved") is not None else ""))
        if "device_stall_s" in result:
            print(f"{'':<26}the training stream waited {result['device_stall_s'] * 1e3:.2f} ms for the device copy")


def ratios(results: list[dict[str, Any]]) -> list[tuple[float, str, float, str]]:
    """The ratios the project aims for (DESIGN.md §5), from results of one run: (size, label,
    value, aim)."""
    measured = []
    for size in sorted({r["size_bytes"] for r in results if "ranks" not in r}):
        peers = _peers(results, size)
        shm, memcpy = peers.get("dram-shm"), peers.get("memcpy")
        paired = (shm or {}).get("paired_memcpy", {})
        checks = [("dram-shm e2e / memcpy", _ratio(shm, memcpy, "e2e_s"), "<= 1.2"),
                  ("dram-shm e2e / memcpy timed before each publish", paired.get("e2e", math.nan), "<= 1.2"),
                  ("pfs e2e / dram-shm e2e", _ratio(peers.get("pfs"), shm, "e2e_s"), ">= 5"),
                  ("dram-shm stall / memcpy", _ratio(shm, memcpy, "training_stall_s"), "<= 1.2"),
                  ("dram-shm stall / memcpy timed before each publish", paired.get("training_stall", math.nan),
                   "<= 1.2"),
                  ("modelcheckpoint stall / dram-shm stall",
                   _ratio(peers.get("lightning-modelcheckpoint"), shm, "training_stall_s"), ">= 20")]
        register = peers.get("torchserve-register")
        checks.append(("torchserve-register e2e / dram-shm e2e", _ratio(register, shm, "e2e_s"), ">= 50"))
        checks.append(("torchserve-register e2e / torchserve-viper e2e",
                       _ratio(register, peers.get("torchserve-viper"), "e2e_s"), "higher is better"))
        gpu = peers.get("gpu-ipc")
        if gpu is not None:
            checks += [("gpu-ipc e2e / memcpy", _ratio(gpu, memcpy, "e2e_s"), "lower is better"),
                       ("pfs e2e / gpu-ipc e2e", _ratio(peers.get("pfs"), gpu, "e2e_s"), "paper: 9"),
                       ("gpu-ipc host stall / memcpy", _ratio(gpu, memcpy, "training_stall_s"), "near 0"),
                       ("gpu-ipc device stall / memcpy-gpu",
                        _ratio({"s": gpu.get("device_stall_s")}, {"s": (peers.get("memcpy-gpu") or {}).get("e2e_s")},
                               "s"), "about 1: one device copy")]
        fanned = next((r for name, r in peers.items() if name.startswith("dram-shm-x")), None)
        if fanned is not None:
            checks.append((f"{fanned['strategy']} e2e / one consumer, alternating", fanned["over_one"], "<= 1.5"))
            checks.append(("  same, against the separate dram-shm case", _ratio(fanned, shm, "e2e_s"), "<= 1.5"))
            checks.append((f"{fanned['strategy']}: last / first consumer ready, same update",
                           fanned.get("last_over_first_ready", math.nan), "<= 1.5"))
        throughput = peers.get("lightning-throughput")
        if throughput is not None:
            checks.append((f"throughput cost, publishing every {throughput['publish_every']} steps",
                           throughput["throughput_cost"], "<= 0.05"))
            checks.append(("  same, separate runs (carries the drift between runs)",
                           throughput["throughput_cost_runs"], "<= 0.05"))
        niced = peers.get("lightning-throughput-nice19")
        if niced is not None:
            checks.append(("  same, background_niceness=19", niced["throughput_cost"], "<= 0.05"))
        for fraction in sorted({r.get("changed_fraction", 1.0) for r in results} - {1.0}, reverse=True):
            delta = _peers(results, size, fraction).get("dram-zmq")
            checks.append((f"dram-zmq e2e, {fraction:g} of the bytes changed / all", _ratio(delta, peers.get("dram-zmq"),
                                                                                         "e2e_s"),
                           "<= 0.15" if fraction <= 0.05 else "lower is better"))
            checks.append((f"  bytes moved, {fraction:g} changed / all",
                           _ratio(delta, peers.get("dram-zmq"), "bytes_moved"), f"about {fraction:g}"))
        measured += [(size, label, value, aim) for label, value, aim in checks if value == value]  # not NaN
    return measured + sharded_checks(results)


def print_checks(runs: list[list[dict[str, Any]]]) -> None:
    """Each ratio measured within each run: with one run its value, with several the best,
    the median and the worst over runs (worst by the aim's direction)."""
    per_run = [ratios(results) for results in runs]
    print("\nratios measured within each run" + (f" (best / median / worst of {len(runs)} runs):"
                                                 if len(runs) > 1 else ":"))
    for size, label, _, aim in per_run[0]:
        values = [value for run in per_run for s, l, value, _ in run if (s, l) == (size, label)]
        if len(runs) == 1:
            print(f"  {size / 1e6:>6.0f} MB  {label:<52}{values[0]:>8.2f}   (aim {aim})")
            continue
        higher_is_worse = aim.startswith("<=") or aim.startswith("lower")
        ordered = sorted(values, reverse=not higher_is_worse)  # best first
        print(f"  {size / 1e6:>6.0f} MB  {label:<52}{ordered[0]:>8.2f} /{statistics.median(values):>6.2f} /"
              f"{ordered[-1]:>6.2f}   (aim {aim})")
    _print_scaling(runs[0])


def _print_scaling(results: list[dict[str, Any]]) -> None:
    results = [r for r in results if r.get("changed_fraction", 1.0) == 1.0 and "ranks" not in r]  # whole updates
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        points = sorted((r["size_bytes"], r["e2e_s"]) for r in results if r["strategy"] == strategy)
        if len(points) > 1:
            per_gb = ", ".join(f"{e2e / size * 1e12:.0f}" for size, e2e in points)
            print(f"  {strategy:<26} ms per GB at each size: {per_gb} (flat = linear)")


def _peers(results: list[dict[str, Any]], size: int, fraction: float = 1.0) -> dict[str, dict[str, Any]]:
    """Strategies measured at the same requested size (the TorchServe ones use another model
    of that size, so exact byte counts differ slightly), with `fraction` of the bytes changed
    by each version (1.0: whole updates)."""
    requested = next(r["size_mb"] for r in results if r["size_bytes"] == size)
    return {r["strategy"]: r for r in results
            if r["size_mb"] == requested and r.get("changed_fraction", 1.0) == fraction}


def _ratio(numerator: dict | None, denominator: dict | None, key: str) -> float:
    if not numerator or not denominator or not denominator[key]:
        return float("nan")
    return numerator[key] / denominator[key]


BASELINES = ("pfs", "lightning-modelcheckpoint", "torchserve-register")  # the slow paths, plotted on their own scale


def plot(results: list[dict[str, Any]], path: str) -> None:
    """The latency anatomy at the largest size (the fast routes, and the slow baselines in a panel
    of their own so that the fast stages stay visible beside a many-second path), and e2e against
    size on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # steps are not an update's latency; deltas are compared in the checks, whole updates here
    results = [r for r in results if "throughput_cost" not in r and r.get("changed_fraction", 1.0) == 1.0]
    figure, (fast, slow, scaling) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [3, 1.4, 3]})
    largest = max(r["size_bytes"] for r in results)
    at_largest = [r for r in results if r["size_bytes"] == largest]
    _plot_anatomy(fast, [r for r in at_largest if r["strategy"] not in BASELINES], f"at {largest / 1e6:.0f} MB")
    _plot_anatomy(slow, [r for r in at_largest if r["strategy"] in BASELINES], "baselines (own scale)")
    _plot_scaling(scaling, results)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _label(result: dict[str, Any]) -> str:
    return result["strategy"] + (f" x{result['ranks']} {result['route']}" if "ranks" in result else "")


def _plot_anatomy(axes, results: list[dict[str, Any]], what: str) -> None:
    if not results:
        axes.set_visible(False)
        return
    names = [_label(r) for r in results]
    stage_names = list(dict.fromkeys(stage for r in results for stage in r["stages"]))
    bottoms = [0.0] * len(results)
    for stage in stage_names:
        heights = [r["stages"].get(stage, 0.0) * 1e3 for r in results]
        axes.bar(names, heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes.set_ylabel("ms")
    axes.tick_params(axis="x", labelrotation=25)
    axes.set_title(f"Latency anatomy, {what}")
    axes.legend(fontsize=8)


def _plot_scaling(axes, results: list[dict[str, Any]]) -> None:
    for strategy in dict.fromkeys(_label(r) for r in results):
        points = sorted((r["size_bytes"] / 1e6, r["e2e_s"] * 1e3) for r in results if _label(r) == strategy)
        axes.plot(*zip(*points), marker="o", label=strategy)
    axes.set_yscale("log")
    axes.set_xlabel("model size (MB)")
    axes.set_ylabel("end-to-end update latency (ms)")
    axes.set_title("Latency against model size")
    axes.legend(fontsize=8)


def host_info() -> dict[str, Any]:
    return {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": multiprocessing.cpu_count(), "node": platform.node()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[64, 256])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--consumers", type=int, default=1,
                        help="also measure this many same-host consumer processes updating together")
    parser.add_argument("--keyless", action="store_true",
                        help="run the Viper strategies keyless (xxh3 digests), to compare with the keyed default")
    parser.add_argument("--changed-fraction", type=_fraction, nargs="+", default=[1.0],
                        help="run each Viper strategy with versions that change this fraction of the bytes "
                             "(1: every weight; each fraction a case)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                        help="run the sharded and gathered cases with this many ranks (each count a case)")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", help="write the figure here (PNG)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole measurement this many times, each in a fresh process, and "
                             "report each ratio's best, median and worst over runs")
    args = parser.parse_args(argv)

    def save(results: list[dict[str, Any]], runs: list[list[dict[str, Any]]] | None = None) -> None:
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"host": host_info(), "runs": len(runs) if runs else 1, "results": results,
                           "skipped": skipped(args.strategies)}, out, indent=2)

    if args.runs > 1:
        runs = []
        for index in range(args.runs):
            runs.append(_run_in_fresh_process(argv if argv is not None else sys.argv[1:], index))
            save(combine_runs(runs), runs)  # a later run that fails leaves these
        results = combine_runs(runs)
    else:
        results = run(args.sizes_mb, args.repeat, args.strategies, args.consumers, on_result=save,
                      keyless=args.keyless, fractions=tuple(args.changed_fraction), ranks=tuple(args.ranks))
        runs = [results]
    print_table(results)
    print_sharded(results)
    print_checks(runs)
    if args.plot:
        plot(results, args.plot)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a changed fraction is more than 0 and at most 1")
    return value


def _run_in_fresh_process(argv: list[str], index: int) -> list[dict[str, Any]]:
    """One whole measurement in a new interpreter (nothing warm carried over from another run)."""
    with tempfile.TemporaryDirectory(prefix="viper-bench-run-") as workdir:
        out = os.path.join(workdir, "run.json")
        options = _without_option(_without_option(_without_option(argv, "--runs"), "--json"), "--plot")
        print(f"run {index + 1}: {sys.executable} -m benchmarks.update_latency {' '.join(options)}", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.update_latency", *options, "--json", out], check=True)
        with open(out) as handle:
            return json.load(handle)["results"]


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv without `option` and the value that follows it."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def combine_runs(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per strategy and size: the run with the median e2e, whole (its stages add up),
    with the worst and best e2e and training stall over runs, and every run's values."""
    combined = []
    def case(result: dict[str, Any]) -> tuple[str, float, float, int | None, str | None]:
        return (result["strategy"], result["size_mb"], result.get("changed_fraction", 1.0), result.get("ranks"),
                result.get("route") if "ranks" in result else None)

    for first in runs[0]:
        same = [result for results in runs for result in results if case(result) == case(first)]
        median = sorted(same, key=lambda result: result["e2e_s"])[len(same) // 2]
        entry = dict(median)
        for key in ("e2e_s", "training_stall_s", "throughput_cost", "throughput_cost_runs", "over_one"):
            values = [result[key] for result in same if result.get(key) is not None]
            if values:
                entry[f"{key}_worst"], entry[f"{key}_best"] = max(values), min(values)
        entry["runs"] = [{key: result.get(key) for key in ("e2e_s", "training_stall_s", "throughput_cost",
                                                           "throughput_cost_runs", "over_one")
                          if result.get(key) is not None} for result in same]
        combined.append(entry)
    return combined


if __name__ == "__main__":
    main()
