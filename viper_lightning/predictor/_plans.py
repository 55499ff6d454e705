"""Turning a predicted loss curve into publish steps: the Viper paper's Algorithms 2 and 3.

Algorithm 2 (fixed) tries every interval and keeps the one with the lowest predicted CIL.
Algorithm 3 (greedy) publishes whenever the predicted loss has dropped below the last published
version's by more than a threshold taken from the warm-up (mean + std of step-to-step drops);
under drift the last version's loss also grows with its age. `significant_drop_plan` runs the
variant that `Greedy(follow_losses=True)` applies to the observed losses. Every plan respects
`PlanContext.max_interval`, the schedules' safety net.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._errors import ConfigurationError
from ._cil import CILPrediction, InferenceLoad, PublishCosts, VersionLoss, predict_cil
from ._curves import FitError
from ._staleness import StalenessModel

__all__ = ["PlanContext", "PLAN_WINDOW", "fixed_plan", "fixed_prediction", "best_fixed_interval", "greedy_threshold",
           "greedy_gain", "greedy_plan", "greedy_prediction", "best_greedy_threshold", "LossLevels",
           "significant_drop_plan"]

_DENSE_UP_TO = 8  # every interval up to this is tried, then ~30% apart, then the best bracket refined
_GROWTH = 1.3
_REFINE = 6  # extra intervals tried between the coarse winner's neighbours
PLAN_WINDOW = 5000  # greedy decides step by step this far ahead, then repeats its last interval
PLAN_POINTS = 5000  # requests evaluated per prediction when planning (more are subsampled, weighted)
_THRESHOLD_SCALES = tuple(2.0**k for k in range(-5, 3))  # multiples of the warm-up threshold tried


@dataclass(frozen=True)
class PlanContext:
    """Where training stands when a plan is made, and what it costs to publish."""

    version_loss: VersionLoss
    load: InferenceLoad
    costs: PublishCosts
    staleness: StalenessModel
    now_step: int
    now_s: float
    last_published: int
    live: tuple[tuple[int, float], ...] = ((0, 0.0),)
    max_step: int | None = None
    max_loss: float = math.inf
    max_interval: int | None = None  # a safety net: never more than this many steps between publishes

    @property
    def end_step(self) -> int:
        """The last step training could reach before the last request (no stalls assumed)."""
        remaining_s = max(self.load.horizon_s - self.now_s, 0.0)
        end = self.now_step + int(np.ceil(remaining_s / self.costs.step_time_s))
        return end if self.max_step is None else min(end, self.max_step)

    def predict(self, plan: Sequence[int], repeat_every: int | None = None) -> CILPrediction:
        """Algorithm 1 for `plan` (then every `repeat_every` steps until the end, if given)."""
        return predict_cil(self.version_loss, plan, self.load, self.costs, self.staleness,
                           now_step=self.now_step, now_s=self.now_s, live=self.live, max_step=self.max_step,
                           max_loss=self.max_loss, repeat_every=repeat_every, max_points=PLAN_POINTS)


@dataclass(frozen=True)
class FixedChoice:
    """The interval Algorithm 2 chose (None: publishing again does not pay) and its prediction."""

    interval: int | None
    prediction: CILPrediction


def fixed_plan(last_published: int, interval: int, now_step: int, end_step: int) -> range:
    """Every `interval` steps after the last publish, from now (a due publish happens now)."""
    if interval < 1:
        raise ConfigurationError(f"interval={interval}: use a positive number of steps")
    first = max(last_published + interval, now_step)
    return range(first, end_step + 1, interval)


def _candidate_intervals(span: int) -> list[int]:
    """Intervals worth trying over `span` steps: all short ones, then geometrically spaced."""
    intervals = list(range(1, min(span, _DENSE_UP_TO) + 1))
    value = float(_DENSE_UP_TO)
    while value * _GROWTH <= span:
        value *= _GROWTH
        intervals.append(int(round(value)))
    if span > _DENSE_UP_TO:
        intervals.append(span)
    return sorted(set(intervals))


def best_fixed_interval(context: PlanContext) -> FixedChoice:
    """Algorithm 2: the interval with the lowest predicted CIL (ties go to fewer publishes).

    All short intervals and a geometric ladder of longer ones are tried, then the gap around the
    best one is searched more finely: the predicted CIL is smooth in the interval.
    """
    span = max(context.end_step - context.now_step, 1)
    cap = context.max_interval
    coarse = [i for i in _candidate_intervals(span) if cap is None or i <= cap] or [cap]
    never = FixedChoice(None, context.predict([]))  # never again is a candidate, unless capped
    best = _best_of(context, coarse, never if cap is None else _fixed_choice(context, coarse[-1]))
    if best.interval is not None and best.interval > _DENSE_UP_TO:
        index = coarse.index(best.interval)
        low, high = coarse[index - 1], coarse[min(index + 1, len(coarse) - 1)]
        finer = np.unique(np.linspace(low, high, _REFINE + 2).round().astype(int)).tolist()
        best = _best_of(context, [i for i in finer if i not in coarse], best)
    return best


def _fixed_choice(context: PlanContext, interval: int) -> FixedChoice:
    """Publishing every `interval` steps, with its prediction."""
    return FixedChoice(interval, fixed_prediction(context, interval))


def fixed_prediction(context: PlanContext, interval: int) -> CILPrediction:
    """Algorithm 1 for publishing every `interval` steps after the last publish (closed form, so
    its cost does not grow with the horizon)."""
    first = fixed_plan(context.last_published, interval, context.now_step, context.end_step)[:1]
    return context.predict(first, repeat_every=interval if first else None)


def _best_of(context: PlanContext, intervals: list[int], best: FixedChoice) -> FixedChoice:
    for interval in sorted(intervals, reverse=True):
        prediction = fixed_prediction(context, interval)
        if _clearly_below(prediction.cil, best.prediction.cil) or (
                prediction.cil <= best.prediction.cil and best.interval is not None and interval > best.interval):
            best = FixedChoice(interval, prediction)
    return best


def greedy_threshold(warmup_losses: Sequence[float] | np.ndarray) -> float:
    """Mean + standard deviation of the step-to-step drops of the warm-up losses.

    Raises `FitError` with fewer than 3 finite losses. A warm-up whose loss only rose gives a
    threshold of zero: publish on any predicted improvement.
    """
    losses = np.asarray(warmup_losses, dtype=np.float64)
    losses = losses[np.isfinite(losses)]
    if len(losses) < 3:
        raise FitError(f"only {len(losses)} finite warm-up losses, need at least 3 for a threshold")
    drops = losses[:-1] - losses[1:]
    return max(float(np.mean(drops) + np.std(drops)), 0.0)


def greedy_gain(version_loss: VersionLoss, staleness: StalenessModel, step: int, last_published: int,
                max_loss: float = math.inf) -> float:
    """How much better the current weights are predicted to answer than the last published ones."""
    losses = version_loss(np.asarray([last_published, step], dtype=np.float64))
    served = min(float(losses[0] + staleness.increase(step - last_published)), max(max_loss, float(losses[0])))
    return served - float(losses[1])


def greedy_plan(context: PlanContext, threshold: float) -> list[int]:
    """Algorithm 3 run forward on the predicted curve: the steps where greedy would publish,
    up to `PLAN_WINDOW` steps ahead."""
    steps = np.arange(context.now_step, _window_end(context) + 1)
    if len(steps) == 0:
        return []
    predicted = np.asarray(context.version_loss(steps.astype(np.float64)), dtype=np.float64)
    last = context.last_published
    last_loss = float(context.version_loss(np.asarray([last], dtype=np.float64))[0])
    linear, quadratic = context.staleness.linear, context.staleness.quadratic
    cap, longest = max(context.max_loss, last_loss), context.max_interval or math.inf
    plan = []
    # Plain floats: this loop runs on the training thread, once per candidate threshold.
    for step, loss in zip(steps.tolist(), predicted.tolist()):
        age = max(step - last, 0)
        if age >= longest or min(last_loss + linear * age + quadratic * age * age, cap) - loss > threshold:
            plan.append(step)
            last, last_loss = step, loss
            cap = max(context.max_loss, last_loss)
    return plan


@dataclass(frozen=True)
class LossLevels:
    """Where the significant-drop rule stands: the mean training loss of the serving weights
    (`reference`), the sum and count of the losses seen since they were published, and the
    noise (standard deviation) of one loss."""

    reference: float
    since_sum: float
    since_count: int
    noise: float


def significant_drop_plan(context: PlanContext, levels: LossLevels, z: float) -> list[int]:
    """The steps where `Greedy(follow_losses=True)` would publish if the losses followed the
    curve: the mean loss since the last publish has fallen below the serving weights' level,
    plus their predicted staleness, by more than `z` standard errors; or `max_interval` is up.
    Up to `PLAN_WINDOW` steps ahead."""
    steps = np.arange(context.now_step + 1, _window_end(context) + 1)
    if len(steps) == 0:
        return []
    logged = np.asarray(context.version_loss(steps.astype(np.float64) - 1.0), dtype=np.float64)  # loss at step s
    linear, quadratic = context.staleness.linear, context.staleness.quadratic
    longest, last = context.max_interval or math.inf, context.last_published
    reference, total, count = levels.reference, levels.since_sum, levels.since_count
    plan = []
    for step, loss in zip(steps.tolist(), logged.tolist()):  # plain floats, as in greedy_plan
        total, count, age = total + loss, count + 1, step - last
        drop = reference + linear * age + quadratic * age * age - total / count
        if age >= longest or drop > z * levels.noise / math.sqrt(count):
            plan.append(step)
            reference, total, count, last = total / count, 0.0, 0, step
    return plan


def greedy_prediction(context: PlanContext, plan: list[int]) -> CILPrediction:
    """Algorithm 1 for a greedy plan; beyond the plan window its last interval is assumed to go
    on (on a flat curve under steady drift the rule does publish periodically)."""
    repeat = plan[-1] - plan[-2] if len(plan) >= 2 and _window_end(context) < context.end_step else None
    return context.predict(plan, repeat_every=repeat)


@dataclass(frozen=True)
class GreedyChoice:
    """The threshold chosen, the publish steps it leads to, and their predicted CIL."""

    threshold: float
    plan: list[int]
    prediction: CILPrediction


def best_greedy_threshold(context: PlanContext, base: float,
                          scales: Sequence[float] = _THRESHOLD_SCALES) -> GreedyChoice:
    """Algorithm 3 with its threshold chosen by Algorithm 1: of `base` × each scale, the one
    whose greedy plan has the lowest predicted CIL (ties go to the larger threshold: fewer
    publishes). The warm-up's mean + std sets the scale of the search, not the answer."""
    if not base > 0:
        raise ConfigurationError(f"base={base!r}: the threshold search needs a positive base")
    best: GreedyChoice | None = None
    for threshold in sorted((base * scale for scale in scales), reverse=True):
        plan = greedy_plan(context, threshold)
        prediction = greedy_prediction(context, plan)
        if best is None or _clearly_below(prediction.cil, best.prediction.cil):
            best = GreedyChoice(threshold, plan, prediction)
    return best


def _window_end(context: PlanContext) -> int:
    """The last step a greedy plan decides step by step (`PLAN_WINDOW` ahead, within the horizon)."""
    return min(context.end_step, context.now_step + PLAN_WINDOW)


def _clearly_below(cil: float, best: float) -> bool:
    """Whether a predicted CIL beats the best so far by more than rounding (ties keep the best)."""
    return cil < best * (1 - 1e-9) - 1e-12
