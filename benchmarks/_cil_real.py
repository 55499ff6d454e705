"""Real-run mode: each schedule drives a real Trainer with `ViperCallback`, and a real subscriber
serves what it publishes.

The run trains the workload from the same seed as the recorded trajectory, so the weights
after step k are the trajectory's row k: training on CPU is deterministic, and the run checks
it (the version the subscriber serves at the end, and the newest version on the file-system
tier, must equal the trajectory's weights of their step bit for bit, or the run fails). That
lets the replay's scorer price what was served without keeping every version.

Nothing is simulated: the callback publishes through a real `ModelPublisher` (loopback
endpoints, a temporary file-system tier), a `ModelSubscriber` in the same process loads each
version (its update reports reach the schedule, as in production), and every cost and latency
is the real one. A version answers requests from the moment the subscriber applied it.

Time is the world's (`WorldClock`): a step trained counts one undisturbed step time (that of a
real run that never publishes), however long it really took, and the time the training
thread spent in the callback counts as it was. Run-to-run noise in how fast this 2-core
machine trains (15% between identical runs) would otherwise swamp every difference between
schedules; this way the time a schedule costs the training thread is charged as lost steps,
as in replay mode, while a step slowed by background work (the writer, the subscriber) is
not: that slowdown is measured as throughput, apart. The schedule plans on the same clock
(`set_clock`), so its request horizon ends where the benchmark's requests do.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from viper_lightning import ModelSubscriber, UpdateRecord, ViperCallback
from viper_lightning.schedules import EveryNSteps, Fixed, Greedy, PublishSchedule

from ._cil_workloads import WAIT_S, Trajectory, Workload

LOOPBACK = "tcp://127.0.0.1:*"
LOOPBACK_UNUSED = "tcp://127.0.0.1:9"  # nothing publishes there: the reader only loads the stored latest


class WorldClock:
    """The world's time in a real run, in seconds: `step_s` per step trained, however long the
    step really took, plus the time the training thread spent in the callback. The data drifts
    with it, requests arrive on it, and the schedule plans on it (`set_clock`), so the request
    horizon the schedule is told ends where the benchmark's requests do.

    The training thread moves it (the hooks) and the subscriber's thread reads it (when a
    version starts serving): a lock keeps every reading consistent and monotonic."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.steps = 0
        self.lost_s = 0.0  # time in the callback's hooks
        self._started_at = 0.0
        self._entered: float | None = None
        self._left = 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._started_at = time.perf_counter()

    def _wall(self) -> float:
        return time.perf_counter() - self._started_at

    def __call__(self) -> float:
        with self._lock:
            now = self._wall()
            in_step = now - self._entered if self._entered is not None else min(now - self._left, self.step_s)
            return self.steps * self.step_s + self.lost_s + in_step

    def enter(self, after_step: bool) -> float:
        with self._lock:
            self.steps += after_step
            self._entered = self._wall()
            return self._entered

    def leave(self) -> tuple[float, float]:
        """Leave the hook: when, and how long it took."""
        with self._lock:
            left = self._wall()
            spent = left - (self._entered if self._entered is not None else left)
            self.lost_s += spent
            self._entered, self._left = None, left
            return left, spent


@dataclass
class RealRun:
    """What happened under one schedule in a real run; `live` is as in replay mode: (step of the
    version, world time it began answering)."""

    live: list[tuple[int, float]] = field(default_factory=lambda: [(0, 0.0)])
    publishes: int = 0  # during training (the final publish at train end serves no request here)
    train_s: float = 0.0  # wall time of the whole training loop
    predicted_cil: float | None = None
    writes_skipped: int = 0
    computes: list[float] = field(default_factory=list)  # wall time of each step outside the callback
    hooks: list[tuple[float, bool]] = field(default_factory=list)  # each hook's time, and whether it published

    @property
    def hook_s(self) -> float:
        """Training-thread time in the callback's batch and epoch hooks."""
        return sum(seconds for seconds, _ in self.hooks)

    @property
    def step_time_s(self) -> float:
        """The median wall time of a step outside the callback (torch's first steps left out)."""
        return statistics.median((self.computes[5:] if len(self.computes) > 10 else self.computes) or [0.0])


class _Stopwatch:
    """Moves the world clock around `ViperCallback`'s hooks (`_Before` and `_After` sit on
    either side of it in the callback list) and counts its publishes."""

    def __init__(self, viper: ViperCallback, clock: WorldClock, result: RealRun) -> None:
        self.viper, self.clock, self.result = viper, clock, result
        self._left = 0.0
        self._version = 0

    def enter(self, after_step: bool) -> None:
        entered = self.clock.enter(after_step)
        if after_step:
            self.result.computes.append(entered - self._left)
        self._version = self.viper.last_version

    def leave(self) -> None:
        self._left, spent = self.clock.leave()
        published = self.viper.last_version != self._version
        self.result.hooks.append((spent, published))
        self.result.publishes += published


class _Before(L.Callback):
    def __init__(self, watch: _Stopwatch) -> None:
        self.watch = watch

    def on_train_batch_end(self, *args: Any) -> None:
        self.watch.enter(after_step=True)

    def on_train_epoch_end(self, *args: Any) -> None:
        self.watch.enter(after_step=False)


class _After(L.Callback):
    """Also owns the consumer: started once the publisher is up, before the first step."""

    def __init__(self, watch: _Stopwatch, model: torch.nn.Module, pfs_root: str) -> None:
        self.watch, self.model, self.pfs_root = watch, model, pfs_root
        self.subscriber: ModelSubscriber | None = None
        self._started_at = 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        publisher = self.watch.viper.publisher
        self.subscriber = ModelSubscriber(self.model, publisher.model_name, publisher.endpoint, self.pfs_root,
                                          load_latest=False, on_update=self._served)
        self.subscriber.start()
        if not publisher.wait_for_subscribers(1, WAIT_S):
            raise RuntimeError("the benchmark's subscriber never connected")
        self.watch.clock.start()
        self._started_at = time.perf_counter()

    def _served(self, record: UpdateRecord) -> None:
        if record.step is not None:
            self.watch.result.live.append((record.step, self.watch.clock()))

    def on_train_batch_end(self, *args: Any) -> None:
        self.watch.leave()

    def on_train_epoch_end(self, *args: Any) -> None:
        self.watch.leave()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.watch.result.train_s = time.perf_counter() - self._started_at
        self.watch.result.writes_skipped = self.watch.viper.publisher.writes_skipped


def hook_costs(workload: Workload, trajectory: Trajectory, steps: int = 100) -> tuple[float, float]:
    """What `ViperCallback` costs the training thread in a real run of this workload: the median
    time of its hook on a step that publishes, above that on a step that does not, and the
    latter (reading the loss, asking the schedule, taking consumer reports). Replay mode charges
    these, so that it prices a publish as the callback really costs, not the snapshot alone."""
    steps = min(steps, trajectory.steps)
    run = run_real(workload, EveryNSteps(2), trajectory, trajectory.step_time_s, steps=steps)
    settled = run.hooks[10:] if len(run.hooks) > 20 else run.hooks  # torch's and the publisher's first steps out
    quiet = statistics.median([seconds for seconds, published in settled if not published] or [0.0])
    busy = statistics.median([seconds for seconds, published in settled if published] or [quiet])
    return max(busy - quiet, 0.0), quiet


def run_real(workload: Workload, schedule: PublishSchedule, trajectory: Trajectory, world_step_s: float,
             steps: int | None = None) -> RealRun:
    """Train `steps` (default: the trajectory's) steps of `workload` with
    `ViperCallback(schedule)` (documented defaults, loopback endpoints, a temporary file-system
    tier) and a subscriber serving, on a world clock of `world_step_s` per step."""
    result, clock = RealRun(), WorldClock(world_step_s)
    if isinstance(schedule, (Fixed, Greedy)):
        schedule.set_clock(clock)
    L.seed_everything(0, verbose=False)
    module, data = workload.build()
    with tempfile.TemporaryDirectory(prefix="viper-cil-real-") as root:
        viper = ViperCallback(f"cil-{workload.name}", LOOPBACK, pfs_root=root, schedule=schedule,
                              fetch_endpoint=LOOPBACK)
        watch = _Stopwatch(viper, clock, result)
        consumer = _After(watch, copy.deepcopy(module), root)
        trainer = L.Trainer(max_steps=steps or trajectory.steps, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=root, callbacks=[_Before(watch), viper, consumer])
        try:
            trainer.fit(module, datamodule=data)
            subscriber = consumer.subscriber
            if not subscriber.wait_for_version(viper.last_version, WAIT_S):
                raise RuntimeError(f"the subscriber never served the final version {viper.last_version}")
            _check_same_run(trajectory, subscriber, root, viper.model_name)
        finally:
            if consumer.subscriber is not None:
                consumer.subscriber.close()
        result.predicted_cil = getattr(schedule, "predicted_cil", None)
    return result


def _check_same_run(trajectory: Trajectory, subscriber: ModelSubscriber, root: str, model_name: str) -> None:
    """The served version and the newest stored one equal the recorded run's weights of their step."""
    with subscriber.lease() as lease:
        _require_equal(trajectory, subscriber.stats.updates[-1].step, lease.model.state_dict(),
                       "the subscriber's final version")
    # a second consumer that only reads the file-system tier, as one started after the run would
    with ModelSubscriber(copy.deepcopy(trajectory.module), model_name, LOOPBACK_UNUSED, root, routes=["pfs"],
                         load_latest=True) as reader:
        if not reader.wait_for_version(1, WAIT_S):
            raise RuntimeError("no version could be read back from the file-system tier")
        with reader.lease() as lease:
            _require_equal(trajectory, reader.stats.updates[-1].step, lease.model.state_dict(),
                           "the newest version on the file-system tier")


def _require_equal(trajectory: Trajectory, step: int, state: dict[str, torch.Tensor], what: str) -> None:
    expected = trajectory.state_dict(step)
    for name, tensor in state.items():
        if not torch.equal(tensor.detach().reshape(-1).float(), expected[name].reshape(-1)):
            raise RuntimeError(f"{what} (step {step}) differs from the recorded run at {name!r}: training is not "
                               "deterministic here, so the replay's weights cannot score the real run")
