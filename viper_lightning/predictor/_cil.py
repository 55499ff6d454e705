"""The cumulative inference loss (CIL) of a publish schedule: the Viper paper's Algorithm 1.

The consumer answers `total_requests` requests, one every 1/`request_rate` seconds from the
start of training. Each request is answered by the newest version that is live by then, and
costs that version's loss. Publishing is not free: each publish stalls training by `stall_s`
(so every later version arrives later), and a version goes live `load_time_s` after its
publish call (the consumer's measured publish-to-serving latency).

Beyond the paper, the requests' data may drift: a request at time t sees the data at position
t / step_time_s (the stream moves at the pace of undisturbed training), and a `StalenessModel`
says how much worse a version answers data that many steps newer than itself. With the default
(no staleness) this is exactly the paper's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .._errors import ConfigurationError
from ._staleness import StalenessModel

__all__ = ["InferenceLoad", "PublishCosts", "CILPrediction", "predict_cil"]

VersionLoss = Callable[[np.ndarray], np.ndarray]
"""Predicted loss of the version published after each of these steps (step 0: initial weights)."""

DEFAULT_MAX_POINTS = 20_000  # beyond this many requests, evaluate a uniform subsample, weighted


@dataclass(frozen=True)
class InferenceLoad:
    """The consumer's load: `total_requests` requests at `request_rate` per second."""

    request_rate: float
    total_requests: int

    def __post_init__(self) -> None:
        if not (isinstance(self.total_requests, int) and self.total_requests >= 0):
            raise ConfigurationError(f"total_requests={self.total_requests!r}: use an integer >= 0")
        if not (math.isfinite(self.request_rate) and self.request_rate > 0):
            raise ConfigurationError(f"request_rate={self.request_rate!r}: use a positive number of "
                                     "requests per second")

    @property
    def horizon_s(self) -> float:
        """When the last request arrives (the schedule only matters until then)."""
        return self.total_requests / self.request_rate


@dataclass(frozen=True)
class PublishCosts:
    """Seconds per training step, training stall per publish, and publish-to-serving latency.

    `commit_s` is the publisher's background writer time per version. The writer works while
    training goes on, but it writes one version at a time: publishing more often than every
    `commit_s` makes training wait for a free snapshot buffer, so in a steady stream each
    publish costs max(stall_s, commit_s − the training time since the previous publish).
    """

    step_time_s: float
    stall_s: float
    load_time_s: float
    commit_s: float = 0.0

    def stalls(self, gaps: np.ndarray) -> np.ndarray:
        """The stall of publishes made `gaps` training steps after the previous one."""
        return np.maximum(self.stall_s, self.commit_s - np.asarray(gaps, dtype=np.float64) * self.step_time_s)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.step_time_s) and self.step_time_s > 0):
            raise ConfigurationError(f"step_time_s={self.step_time_s!r}: use a positive number of seconds")
        for name in ("stall_s", "load_time_s", "commit_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name}={value!r}: use a number of seconds >= 0")


@dataclass(frozen=True)
class CILPrediction:
    """Predicted CIL of the requests arriving from `since_s` to the end of the load.

    `publishes` counts the planned publishes that happen before the last request. The
    per-request arrays (subsampled and weighted for very large loads) allow `between`.
    """

    cil: float
    requests: int
    publishes: int
    since_s: float
    times: np.ndarray = field(repr=False, compare=False)
    losses: np.ndarray = field(repr=False, compare=False)
    weights: np.ndarray = field(repr=False, compare=False)

    @property
    def mean_loss(self) -> float:
        return self.cil / self.requests if self.requests else 0.0

    def between(self, start_s: float, end_s: float) -> float:
        """Predicted CIL of the requests arriving in [start_s, end_s)."""
        inside = (self.times >= start_s) & (self.times < end_s)
        return float(np.sum(self.losses[inside] * self.weights[inside]))


def predict_cil(version_loss: VersionLoss, plan: Sequence[int], load: InferenceLoad, costs: PublishCosts,
                staleness: StalenessModel | None = None, *, now_step: int = 0, now_s: float = 0.0,
                live: Sequence[tuple[int, float]] = ((0, 0.0),), max_step: int | None = None,
                max_loss: float = math.inf, repeat_every: int | None = None,
                max_points: int = DEFAULT_MAX_POINTS) -> CILPrediction:
    """Algorithm 1: the CIL of the requests from `now_s` on if training publishes after each
    step in `plan`.

    Args:
        version_loss: predicted loss of the version published after a step (vectorised).
        plan: future publish steps (>= now_step; step now_step means "publish right now").
        now_step, now_s: the step training has just finished, and when (on the schedule's clock).
        live: versions already published as (step, seconds when it starts serving); the
            initial weights are step 0, serving from time 0.
        max_step: training stops after this step (later plan entries never happen).
        max_loss: no answer is predicted to cost more than this (bounds extrapolated staleness;
            e.g. the loss of the untrained model).
        repeat_every: after the plan's last step, keep publishing every this many steps until
            the last request. Evaluated in closed form, so a long horizon costs no more than a
            short one (a plan of 10^6 explicit steps would).
    """
    times, weights = _request_times(load, now_s, max_points)
    previous = max((step for step, _ in live), default=0)
    plan_steps, plan_live, resume = _plan_timeline(plan, costs, now_step, now_s, load.horizon_s, max_step, previous)
    steps, live_at = _merge_live(live, plan_steps, plan_live)
    repeats = _Repeats(resume, repeat_every, _steady(costs, repeat_every), load.horizon_s, max_step) \
        if repeat_every else None
    publishes = len(plan_steps) + (repeats.count() if repeats else 0)
    if len(times) == 0:
        return CILPrediction(0.0, 0, publishes, now_s, times, times.copy(), weights)
    served = steps[np.searchsorted(live_at, times, side="right") - 1]
    if repeats:
        served = np.maximum(served, repeats.serving(times))
    unique, inverse = np.unique(served, return_inverse=True)
    losses = np.asarray(version_loss(unique.astype(np.float64)), dtype=np.float64)[inverse]
    if staleness is not None:
        losses = losses + staleness(times / costs.step_time_s - served)
    losses = np.minimum(losses, max_loss)
    return CILPrediction(float(np.sum(losses * weights)), int(round(weights.sum())), publishes, now_s,
                         times, losses, weights)


def _steady(costs: PublishCosts, every: int) -> PublishCosts:
    """The costs of publishing every `every` steps, the writer's wait folded in: it stalls
    training and delays the version going live."""
    stall = float(costs.stalls(every))
    return replace(costs, stall_s=stall, load_time_s=costs.load_time_s + stall - costs.stall_s, commit_s=0.0)


def _request_times(load: InferenceLoad, since_s: float, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times of the requests at or after `since_s`, with the weight each point stands for."""
    first = max(0, math.ceil(since_s * load.request_rate - 1e-9))
    count = load.total_requests - first
    if count <= 0:
        return np.zeros(0), np.zeros(0)
    if count <= max_points:
        return (first + np.arange(count)) / load.request_rate, np.ones(count)
    per_point = count / max_points  # uniform arrivals: the middle of each bin stands for the bin
    centres = first + (np.arange(max_points) + 0.5) * per_point - 0.5
    return centres / load.request_rate, np.full(max_points, per_point)


def _plan_timeline(plan: Sequence[int], costs: PublishCosts, now_step: int, now_s: float, horizon_s: float,
                   max_step: int | None, previous: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[int, float]]:
    """Steps of the plan that happen before the horizon, when each version starts serving, and
    (step, seconds) at which training resumes after the plan's last publish."""
    steps = np.unique(np.asarray(plan, dtype=np.int64).reshape(-1))
    steps = steps[(steps >= now_step) & (steps <= (max_step if max_step is not None else np.iinfo(np.int64).max))]
    stalls = costs.stalls(np.diff(steps, prepend=previous))
    # Each earlier publish in the plan has stalled training once more by the time step s ends.
    finished = now_s + (steps - now_step) * costs.step_time_s + np.concatenate([[0.0], np.cumsum(stalls)[:-1]])
    inside = finished < horizon_s
    steps, finished, stalls = steps[inside], finished[inside], stalls[inside]
    resume = (int(steps[-1]), float(finished[-1] + stalls[-1])) if len(steps) else (now_step, now_s)
    # A publish that waited for the writer goes live that much later.
    return steps, finished + (stalls - costs.stall_s) + costs.load_time_s, resume


@dataclass(frozen=True)
class _Repeats:
    """Publishes every `every` steps after `anchor` (step, time training resumed), in closed form:
    the k-th ends at resumed + k·every·step_time + (k − 1)·stall."""

    anchor: tuple[int, float]
    every: int
    costs: PublishCosts
    horizon_s: float
    max_step: int | None

    @property
    def _period_s(self) -> float:
        return self.every * self.costs.step_time_s + self.costs.stall_s

    def _limit(self) -> float:
        if self.max_step is None:
            return math.inf
        return max((self.max_step - self.anchor[0]) // self.every, 0)

    def count(self) -> int:
        """How many of them end before the horizon."""
        first_end = self.anchor[1] + self.every * self.costs.step_time_s
        if first_end >= self.horizon_s:
            return 0
        return int(min(math.floor((self.horizon_s - first_end) / self._period_s - 1e-12) + 1, self._limit()))

    def serving(self, times: np.ndarray) -> np.ndarray:
        """The newest repeated version live at each time (−1 where none is yet)."""
        offset = times - self.costs.load_time_s - self.anchor[1] + self.costs.stall_s
        k = np.minimum(np.floor(offset / self._period_s + 1e-12), self._limit())
        return np.where(k >= 1, self.anchor[0] + k * self.every, -1).astype(np.int64)


def _merge_live(live: Sequence[tuple[int, float]], plan_steps: np.ndarray, plan_live: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """All versions ordered by when they start serving; a version that would go live after a
    newer one is never served (the consumer coalesces to the newest), so it is dropped."""
    steps = np.concatenate([np.asarray([s for s, _ in live], dtype=np.int64), plan_steps])
    live_at = np.concatenate([np.asarray([t for _, t in live], dtype=np.float64), plan_live])
    order = np.lexsort((steps, live_at))
    steps, live_at = steps[order], live_at[order]
    newest = np.maximum.accumulate(steps)
    keep = steps == newest
    return steps[keep], live_at[keep]
