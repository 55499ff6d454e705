"""Replaying a schedule against a recorded trajectory, and scoring what the consumer served.

The replay is a discrete-event timeline in seconds: each step takes the measured step time;
a publish stalls training by the measured stall (what a publish adds to the callback's hook in
a real run, plus any wait for a snapshot buffer while the writer is two versions behind, as
`SnapshotPool` does) and goes live the measured publish-to-serving latency after the publish
call; a served-loss probe costs one measured forward pass; the schedule's own decision time
(its CPU time) and the callback's per-step work are training time too. Requests arrive
uniformly; request j at time t sees the data at drift position t / step_time and is answered
by the newest live version: its real loss on that request's samples is the realised CIL
contribution.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from viper_lightning.schedules import Fixed, Greedy, PublishSchedule

from ._cil_workloads import MeasuredCosts, Trajectory, Workload

_SNAPSHOT_SLOTS = 2  # ModelPublisher's default number of snapshot buffers


@dataclass(frozen=True)
class Requests:
    """The consumer's traffic: when each request arrives, and the drift position of its data."""

    rate: float
    times: np.ndarray
    positions: np.ndarray

    @classmethod
    def uniform(cls, workload: Workload, steps: int, step_time_s: float) -> Requests:
        rate = workload.requests_per_step / step_time_s
        total = int(workload.requests_per_step * steps)
        times = np.arange(total) / rate
        return cls(rate, times, np.minimum((times / step_time_s).astype(np.int64), steps))


class Scorer:
    """Real losses of recorded versions, cached: on request samples, and on training batches."""

    def __init__(self, workload: Workload, trajectory: Trajectory, requests: Requests) -> None:
        self.workload, self.trajectory = workload, trajectory
        self.model = copy.deepcopy(trajectory.module).eval()
        self._loaded: int | None = None
        positions, counts = np.unique(requests.positions, return_counts=True)
        self._per_position = dict(zip(positions.tolist(), counts.tolist()))
        self._samples: dict[int, tuple[Tensor, Tensor]] = {}
        self._request_losses: dict[tuple[int, int], np.ndarray] = {}
        self._probe_losses: dict[tuple[int, int], float] = {}

    def request_losses(self, version: int, position: int) -> np.ndarray:
        """Loss of each request at `position` if `version` answered it (one value per request)."""
        key = (version, position)
        if key not in self._request_losses:
            x, y = self._request_samples(position)
            per_sample = self._per_sample(version, x, y)
            self._request_losses[key] = per_sample.view(-1, self.workload.request_size).mean(dim=1).numpy()
        return self._request_losses[key]

    def probe_loss(self, version: int, step: int) -> float:
        """Loss of `version` on the batch training used at `step` (what a producer-side probe sees)."""
        key = (version, step)
        if key not in self._probe_losses:
            x, y = self.trajectory.batches[step - 1]
            self._probe_losses[key] = float(self._per_sample(version, x, y).mean())
        return self._probe_losses[key]

    def _request_samples(self, position: int) -> tuple[Tensor, Tensor]:
        if position not in self._samples:
            count = self._per_position[position] * self.workload.request_size
            self._samples[position] = self.trajectory.data.sample_batch(count, position)
        return self._samples[position]

    def _per_sample(self, version: int, x: Tensor, y: Tensor) -> Tensor:
        if self._loaded != version:
            self.model.load_state_dict(self.trajectory.state_dict(version))
            self._loaded = version
        with torch.no_grad():
            return self.workload.per_sample_loss(self.model(x), y)


@dataclass
class Replay:
    """What happened under one schedule."""

    live: list[tuple[int, float]] = field(default_factory=lambda: [(0, 0.0)])
    publishes: int = 0
    stall_s: float = 0.0
    probe_s: float = 0.0
    decision_s: float = 0.0
    predicted_cil: float | None = None

    @property
    def overhead_s(self) -> float:
        return self.stall_s + self.probe_s + self.decision_s


class _Writer:
    """The publisher's background writer, to know when a publish has to wait for a buffer."""

    def __init__(self, commit_s: float) -> None:
        self.commit_s = commit_s
        self.done_at: list[float] = []

    def wait_for_slot(self, now_s: float) -> float:
        pending = [t for t in self.done_at if t > now_s]
        return max(0.0, sorted(pending)[-_SNAPSHOT_SLOTS] - now_s) if len(pending) >= _SNAPSHOT_SLOTS else 0.0

    def enqueue(self, ready_s: float) -> None:
        start = max(ready_s, self.done_at[-1] if self.done_at else 0.0)
        self.done_at.append(start + self.commit_s)


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def replay(schedule: PublishSchedule, trajectory: Trajectory, costs: MeasuredCosts, workload: Workload,
           scorer: Scorer) -> Replay:
    """Drive `schedule` through the recorded run, as `ViperCallback` would, on a simulated clock.

    The garbage collector is paused meanwhile (as `timeit` does), so a collection triggered by
    the scorer's tensors is not billed to whichever schedule call happens to be running.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _replay(schedule, trajectory, costs, workload, scorer)
    finally:
        if collecting:
            gc.enable()


def _replay(schedule: PublishSchedule, trajectory: Trajectory, costs: MeasuredCosts, workload: Workload,
            scorer: Scorer) -> Replay:
    clock, writer, result = _Clock(), _Writer(costs.commit_s), Replay()
    adaptive = isinstance(schedule, (Fixed, Greedy))
    if adaptive:
        schedule.set_clock(clock)
    for step in range(1, trajectory.steps + 1):
        clock.now_s += trajectory.step_time_s
        loss = float(trajectory.losses[step - 1])
        started = time.thread_time()
        decision = schedule.should_publish(step, loss if schedule.needs_loss else None)
        if not decision and step % workload.steps_per_epoch == 0:
            decision = schedule.should_publish_at_epoch_end(step // workload.steps_per_epoch - 1, step)
        _spend(clock, result, "decision_s", time.thread_time() - started + costs.hook_s)
        if decision:
            _publish(schedule, step, loss, clock, writer, costs, result)
        if adaptive:
            for version in schedule.probe_versions(step):
                _probe(schedule, version, step, clock, costs, scorer, result)
    if adaptive:
        result.predicted_cil = schedule.predicted_cil
    return result


def _spend(clock: _Clock, result: Replay, account: str, seconds: float) -> None:
    clock.now_s += seconds
    setattr(result, account, getattr(result, account) + seconds)


def _publish(schedule: PublishSchedule, step: int, loss: float, clock: _Clock, writer: _Writer,
             costs: MeasuredCosts, result: Replay) -> None:
    called_at = clock.now_s
    wait = writer.wait_for_slot(called_at)
    _spend(clock, result, "stall_s", wait + costs.stall_s)
    writer.enqueue(clock.now_s)
    result.live.append((step, called_at + wait + costs.latency_s))
    result.publishes += 1
    schedule.published(step, loss, wait + costs.stall_s)
    if isinstance(schedule, (Fixed, Greedy)):
        schedule.observe_load_time(costs.latency_s)  # what the consumer's stats report back
        schedule.observe_commit_time(costs.commit_s)  # what the publisher's last commit reports


def _probe(schedule: Fixed | Greedy, version: int, step: int, clock: _Clock, costs: MeasuredCosts,
           scorer: Scorer, result: Replay) -> None:
    """What a producer-side probe does: score a kept published version on this step's batch."""
    loss = scorer.probe_loss(version, step)
    _spend(clock, result, "probe_s", costs.probe_s)
    schedule.observe_served_loss(version, loss)


def realised(live: list[tuple[int, float]], requests: Requests, scorer: Scorer) -> tuple[float, np.ndarray]:
    """The real CIL, and each request's loss, given when each version went live."""
    order = sorted(live, key=lambda item: item[1])
    live_at = np.array([t for _, t in order])
    versions = np.maximum.accumulate(np.array([s for s, _ in order]))
    served = versions[np.searchsorted(live_at, requests.times, side="right") - 1]
    losses = np.empty(len(requests.times))
    starts = np.searchsorted(requests.positions, requests.positions, side="left")
    for index in range(len(requests.times)):
        position = int(requests.positions[index])
        losses[index] = scorer.request_losses(int(served[index]), position)[index - starts[index]]
    return float(losses.sum()), losses
